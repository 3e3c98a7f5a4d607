"""Compute hosts: GET /v1/hosts over HTTP and the `mycloud-compute host` commands.

Listing, paging and scopes run on the session's server and its default inventory.
Placement and usage run on a server of their own with two small hosts, because
they need to know every instance placed on every host. Each of those tests leaves
the hosts enabled and empty for the next one. The CLI runs as a subprocess on that
server's database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org, new_backend, start_api
from helpers import (
    CIRROS_IMAGE,
    MEDIUM_FLAVOR,
    SMALL_FLAVOR,
    TINY_FLAVOR,
    assert_error,
    create_instance,
    wait_for,
)
from sqlalchemy import select

from mycloud_compute.drivers.simulated import SimulatedDriver, parse_host_inventory
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import instances
from mycloud_compute.services import hosts as host_service
from mycloud_compute.worker.runner import sync_hosts

CLI = [sys.executable, "-m", "mycloud_compute.cli.admin"]
CLI_TIMEOUT = 60
HOST_FIELDS = [
    "id", "name", "vcpus", "ram", "disk", "vcpus_used", "ram_used", "disk_used",
    "instance_count", "status",
]
DEFAULT_HOST_NAMES = ["sim-compute-1", "sim-compute-2", "sim-compute-3", "sim-compute-4"]
SMALL_INVENTORY = "h1:8:16384:200,h2:8:16384:200"
SMALL_HOSTS = ["h1", "h2"]
# (vcpus, ram MiB, disk GiB) of the default flavors used here.
FLAVOR_SIZES = {TINY_FLAVOR: (1, 512, 1), SMALL_FLAVOR: (1, 2048, 20), MEDIUM_FLAVOR: (2, 4096, 40)}


def run_cli(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env={**os.environ, "MYCLOUD_DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def hosts_by_name(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/hosts", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    return {host["name"]: host for host in response.json()["hosts"]}


def wait_for_hosts(client: httpx.Client, names: list[str], timeout: float = 20) -> None:
    """Wait until the worker has registered ``names`` (on PostgreSQL it starts on its own)."""
    deadline = time.monotonic() + timeout
    while not set(names) <= set(hosts_by_name(client)):
        assert time.monotonic() < deadline, f"hosts {names} were not registered in {timeout} s"
        time.sleep(0.05)


def wait_until_built(client: httpx.Client, instance_id: str, timeout: float = 20) -> dict[str, Any]:
    """Poll an instance until its build ends, in ACTIVE or in ERROR."""
    deadline = time.monotonic() + timeout
    while True:
        instance: dict[str, Any] = client.get(f"/v1/instances/{instance_id}").json()
        if instance["status"] in ("ACTIVE", "ERROR") and instance["task_state"] is None:
            return instance
        assert time.monotonic() < deadline, f"the build did not end in {timeout} s: {instance}"
        time.sleep(0.05)


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# --- the session server: scopes, shape, paging ----------------------------------------


@pytest.fixture(scope="module")
def org(api: ApiServer) -> Org:
    return make_org(api, "hosts")


@pytest.fixture(scope="module")
def admin(org: Org) -> Iterator[httpx.Client]:
    with org.client("admin") as client:
        wait_for_hosts(client, DEFAULT_HOST_NAMES)
        yield client


@pytest.mark.parametrize("scopes", ["read", "rw", "write"])
def test_list_requires_admin_scope(org: Org, admin: httpx.Client, scopes: str) -> None:
    host_id = hosts_by_name(admin)["sim-compute-1"]["id"]

    with org.client(scopes) as client:
        listed = client.get("/v1/hosts")
        shown = client.get(f"/v1/hosts/{host_id}")

    error = assert_error(listed, 403, "forbidden")
    assert "'admin' scope" in error["message"]
    assert_error(shown, 403, "forbidden")


def test_list_requires_token(api: ApiServer) -> None:
    with api.client() as anonymous:
        response = anonymous.get("/v1/hosts")

    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud"'


def test_list_default_inventory(admin: httpx.Client) -> None:
    response = admin.get("/v1/hosts")

    assert response.status_code == 200, response.text
    body = response.json()
    names = [host["name"] for host in body["hosts"]]
    assert names == DEFAULT_HOST_NAMES
    assert body["meta"] == {
        "total": 4, "limit": 20, "marker": body["hosts"][-1]["id"], "has_more": False
    }
    assert body["links"]["next"] is None
    assert body["links"]["previous"] is None
    for host in body["hosts"]:
        assert list(host) == HOST_FIELDS
        assert str(uuid.UUID(host["id"])) == host["id"]
        assert (host["vcpus"], host["ram"], host["disk"]) == (128, 524288, 4000)
        assert host["status"] in ("ENABLED", "DISABLED")
        assert 0 <= host["vcpus_used"] <= host["vcpus"]


def test_pagination_walk(admin: httpx.Client) -> None:
    pages = [admin.get("/v1/hosts", params={"limit": "1"}).json()]
    while pages[-1]["links"]["next"] is not None:
        assert len(pages) <= len(DEFAULT_HOST_NAMES), "the walk does not end"
        pages.append(admin.get(pages[-1]["links"]["next"]).json())
    back = admin.get(pages[2]["links"]["previous"]).json()

    assert [page["hosts"][0]["name"] for page in pages] == DEFAULT_HOST_NAMES
    for page in pages:
        assert page["meta"]["total"] == 4
        assert page["meta"]["marker"] == page["hosts"][0]["id"]
    assert [page["meta"]["has_more"] for page in pages] == [True, True, True, False]
    assert query_of(pages[0]["links"]["next"]) == {"limit": ["1"], "marker": [pages[0]["hosts"][0]["id"]]}
    assert pages[0]["links"]["previous"] is None
    assert query_of(pages[1]["links"]["previous"]) == {"limit": ["1"]}
    assert back["hosts"] == pages[1]["hosts"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("marker=abc", "marker"),
        (f"marker={uuid.UUID(int=3)}", "marker"),
        ("status=ENABLED", "status"),
        ("limit=1&limit=2", "limit"),
    ],
)
def test_list_bad_query(admin: httpx.Client, query: str, parameter: str) -> None:
    response = admin.get(f"/v1/hosts?{query}")

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == parameter


def test_show_host(admin: httpx.Client) -> None:
    listed = hosts_by_name(admin)["sim-compute-2"]

    response = admin.get(f"/v1/hosts/{listed['id']}")

    assert response.status_code == 200, response.text
    assert response.json() == listed


@pytest.mark.parametrize("host_id", [str(uuid.UUID(int=5)), "not-a-uuid", "sim-compute-1"])
def test_show_unknown(admin: httpx.Client, host_id: str) -> None:
    response = admin.get(f"/v1/hosts/{host_id}")

    error = assert_error(response, 404, "not_found")
    assert host_id in error["message"]


# --- a small cloud of two hosts: placement and usage ----------------------------------


@pytest.fixture(scope="module")
def small_cloud(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A server on a database of its own, whose inventory is two hosts of 8 vCPUs."""
    directory = tmp_path_factory.mktemp(f"hosts-{backend.kind}")
    with new_backend(backend.kind, directory) as fresh:
        server = start_api(fresh, directory, simulated_hosts=SMALL_INVENTORY)
        try:
            yield server
        finally:
            server.stop()
        assert "unhandled error request_id=" not in server.logs(), server.logs()[-5000:]


@pytest.fixture
def cloud_org(small_cloud: ApiServer) -> Iterator[Org]:
    """An organization on the small cloud; afterwards its instances are deleted and every host enabled."""
    cloud_org = make_org(small_cloud, "placement")
    with cloud_org.client("admin") as admin:
        wait_for_hosts(admin, SMALL_HOSTS)
    yield cloud_org

    with cloud_org.client() as client:
        for instance in list_instances(client):
            client.delete(f"/v1/instances/{instance['id']}")
        for instance in list_instances(client):
            wait_for(client, instance["id"], status="DELETED")

    set_status(small_cloud.backend, *SMALL_HOSTS, enabled=True)


def set_status(backend: Backend, *names: str, enabled: bool) -> None:
    """Enable or disable hosts through the service that the CLI calls."""

    async def change(db: Database) -> None:
        for name in names:
            if enabled:
                await host_service.enable_host(db, name)
            else:
                await host_service.disable_host(db, name)

    backend.run(change)


def list_instances(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/instances", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    return response.json()["instances"]  # type: ignore[no-any-return]


def placed_usage(backend: Backend) -> dict[str, tuple[int, int, int, int]]:
    """(vcpus, ram, disk, instance count) per host id, summed from the instances' own rows."""

    async def read(db: Database) -> dict[str, tuple[int, int, int, int]]:
        async with db.snapshot() as conn:
            query = select(instances.c.host_id, instances.c.flavor).where(instances.c.host_id.is_not(None))
            rows = (await conn.execute(query)).all()
        usage: dict[str, tuple[int, int, int, int]] = {}
        for host_id, flavor in rows:
            vcpus, ram, disk, count = usage.get(str(host_id), (0, 0, 0, 0))
            usage[str(host_id)] = (
                vcpus + flavor["vcpus"], ram + flavor["ram"], disk + flavor["disk"], count + 1
            )
        return usage

    return backend.run(read)  # type: ignore[no-any-return]


def assert_usage_matches(admin: httpx.Client, client: httpx.Client, backend: Backend) -> None:
    """Check host usage against the instances: in total over the API, per host in the database."""
    hosts = hosts_by_name(admin)
    placed = [item for item in list_instances(client) if item["status"] == "ACTIVE"]

    total_used = [sum(host[field] for host in hosts.values())
                  for field in ("vcpus_used", "ram_used", "disk_used", "instance_count")]
    expected = [sum(item["flavor"][field] for item in placed) for field in ("vcpus", "ram", "disk")]
    assert total_used == [*expected, len(placed)]

    per_host = placed_usage(backend)
    for host in hosts.values():
        used = (host["vcpus_used"], host["ram_used"], host["disk_used"], host["instance_count"])
        assert used == per_host.get(host["id"], (0, 0, 0, 0)), host["name"]


def test_usage_follows_creates_and_deletes(small_cloud: ApiServer, cloud_org: Org) -> None:
    flavors = [TINY_FLAVOR, SMALL_FLAVOR, MEDIUM_FLAVOR, MEDIUM_FLAVOR, SMALL_FLAVOR, TINY_FLAVOR]
    with cloud_org.client("admin") as admin, cloud_org.client() as client:
        too_big = admin.post("/v1/flavors", json={
            "name": f"too-big-{uuid.uuid4().hex[:8]}", "vcpus": 9, "ram": 1024, "disk": 10,
        })
        assert too_big.status_code == 201, too_big.text
        created = [
            create_instance(client, f"usage-{index}", flavor_id=flavor, image_id=CIRROS_IMAGE)
            for index, flavor in enumerate(flavors)
        ]
        unplaced = create_instance(client, "usage-too-big", flavor_id=too_big.json()["id"])
        for instance in created:
            wait_for(client, instance["id"], status="ACTIVE")
        wait_for(client, unplaced["id"], status="ERROR")

        assert_usage_matches(admin, client, small_cloud.backend)
        totals = [sum(host[field] for host in hosts_by_name(admin).values())
                  for field in ("vcpus_used", "ram_used", "disk_used")]
        assert totals == [sum(FLAVOR_SIZES[flavor][index] for flavor in flavors) for index in range(3)]

        for instance in created[1:4]:
            assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
        for instance in created[1:4]:
            wait_for(client, instance["id"], status="DELETED")

        assert_usage_matches(admin, client, small_cloud.backend)
        remaining = [flavors[0], *flavors[4:]]
        totals = [sum(host[field] for host in hosts_by_name(admin).values())
                  for field in ("vcpus_used", "ram_used", "disk_used", "instance_count")]
        assert totals == [
            *(sum(FLAVOR_SIZES[flavor][index] for flavor in remaining) for index in range(3)),
            len(remaining),
        ]
        admin.delete(f"/v1/flavors/{too_big.json()['id']}")


def test_disabled_host_gets_no_instances(small_cloud: ApiServer, cloud_org: Org) -> None:
    disabled = run_cli(small_cloud.backend.url, "host", "disable", "h1")

    with cloud_org.client("admin") as admin, cloud_org.client() as client:
        hosts = hosts_by_name(admin)
        for index in range(3):
            wait_for(client, create_instance(client, f"spread-{index}")["id"], status="ACTIVE")
        while_disabled = hosts_by_name(admin)

        enabled = run_cli(small_cloud.backend.url, "host", "enable", "h1")
        wait_for(client, create_instance(client, "after-enable")["id"], status="ACTIVE")
        after_enable = hosts_by_name(admin)

        set_status(small_cloud.backend, "h1", "h2", enabled=False)
        nowhere = wait_for(client, create_instance(client, "all-disabled")["id"], status="ERROR")

    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stderr == "host h1 disabled\n"
    assert hosts["h1"]["status"] == "DISABLED"
    assert hosts["h2"]["status"] == "ENABLED"
    assert while_disabled["h1"]["instance_count"] == 0
    assert while_disabled["h2"]["instance_count"] == 3
    assert enabled.returncode == 0, enabled.stderr
    assert after_enable["h1"]["status"] == "ENABLED"
    # h1 has the most free RAM, so the scheduler picks it first once it is enabled.
    assert after_enable["h1"]["instance_count"] == 1
    assert after_enable["h2"]["instance_count"] == 3
    assert nowhere["fault"]["message"] == "No valid host was found"
    # Host counts stay in the operators' log; the tenant learns only that none is available.
    assert nowhere["fault"]["details"] == "no compute host is available"


# --- the host commands ----------------------------------------------------------------


def test_cli_add_list_remove(small_cloud: ApiServer, cloud_org: Org) -> None:
    url = small_cloud.backend.url
    name = f"cli-{uuid.uuid4().hex[:8]}"

    added = run_cli(url, "host", "add", name, "--vcpus", "2", "--ram", "4096", "--disk", "50")
    listed = run_cli(url, "host", "list")
    with cloud_org.client("admin") as admin:
        shown = admin.get(f"/v1/hosts/{added.stdout.strip()}")
        removed = run_cli(url, "host", "remove", name)
        after_remove = admin.get(f"/v1/hosts/{added.stdout.strip()}")

    assert added.returncode == 0, added.stderr
    assert added.stderr == ""
    assert shown.status_code == 200, shown.text
    assert shown.json() == {
        "id": added.stdout.strip(), "name": name, "vcpus": 2, "ram": 4096, "disk": 50,
        "vcpus_used": 0, "ram_used": 0, "disk_used": 0, "instance_count": 0, "status": "ENABLED",
    }
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "VCPUS", "RAM_MIB", "DISK_GIB", "INSTANCES", "ID"]
    assert [name, "ENABLED", "0/2", "0/4096", "0/50", "0", added.stdout.strip()] in [
        line.split() for line in lines
    ]
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr == f"host {name} removed\n"
    assert_error(after_remove, 404, "not_found")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "h1", "--vcpus", "1", "--ram", "1", "--disk", "1"], "host 'h1' already exists"),
        (["remove", "missing-host"], "host 'missing-host' not found"),
    ],
)
def test_cli_rejects(small_cloud: ApiServer, args: list[str], message: str) -> None:
    result = run_cli(small_cloud.backend.url, "host", *args)

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "returncode", "message"),
    [
        (["add", " padded", "--vcpus", "1", "--ram", "1", "--disk", "1"], 1,
         "name must not start or end with whitespace"),
        (["add", "huge", "--vcpus", "2147483648", "--ram", "1", "--disk", "1"], 1,
         "vcpus must be an integer between 1 and 2147483647, got 2147483648"),
        (["add", "zero", "--vcpus", "0", "--ram", "1", "--disk", "1"], 2, "Invalid value for '--vcpus'"),
    ],
)
def test_cli_add_invalid(tmp_path: Path, args: list[str], returncode: int, message: str) -> None:
    # The values are checked before the database is opened, so none is needed.
    result = run_cli(f"sqlite:///{tmp_path}/unused.db", "host", *args)

    assert result.returncode == returncode, result.stderr
    assert result.stdout == ""
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "unused.db").exists()


def test_cli_remove_busy_host(small_cloud: ApiServer, cloud_org: Org) -> None:
    url = small_cloud.backend.url
    configured = {"MYCLOUD_SIMULATED_HOSTS": SMALL_INVENTORY}
    set_status(small_cloud.backend, "h2", enabled=False)
    with cloud_org.client("admin") as admin, cloud_org.client() as client:
        instance = create_instance(client, "pins-h1")
        wait_for(client, instance["id"], status="ACTIVE")
        busy = run_cli(url, "host", "remove", "h1")
        still_there = hosts_by_name(admin)

        client.delete(f"/v1/instances/{instance['id']}")
        wait_for(client, instance["id"], status="DELETED")
        removed = run_cli(url, "host", "remove", "h1", **configured)
        after_remove = hosts_by_name(admin)
        # h1 is in the simulated inventory, so the driver can still run VMs on it.
        added = run_cli(url, "host", "add", "h1", "--vcpus", "8", "--ram", "16384", "--disk", "200",
                        **configured)

    assert busy.returncode == 1
    assert "host 'h1' still has 1 instance(s) placed on it" in busy.stderr
    assert still_there["h1"]["instance_count"] == 1
    assert removed.returncode == 0, removed.stderr
    assert "workers add it again when they start" in removed.stderr
    assert sorted(after_remove) == ["h2"]
    assert added.returncode == 0, added.stderr
    assert "workers reset its capacity to the configured values" in added.stderr


def test_sync_keeps_operator_changes(fresh_backend: Backend) -> None:
    def run_sync(inventory: str) -> None:
        fresh_backend.run(lambda db: sync_hosts(db, SimulatedDriver(parse_host_inventory(inventory))))

    run_sync("h1:8:16384:200")
    fresh_backend.run(lambda db: host_service.add_host(db, "extra", vcpus=4, ram=8192, disk=100))
    set_status(fresh_backend, "h1", enabled=False)
    run_sync("h1:16:32768:400")
    hosts = {host.name: host for host in fresh_backend.run(host_service.list_all_hosts)}

    assert sorted(hosts) == ["extra", "h1"]
    assert (hosts["h1"].vcpus, hosts["h1"].ram, hosts["h1"].disk) == (16, 32768, 400)
    assert hosts["h1"].status == "DISABLED"
    assert (hosts["extra"].vcpus, hosts["extra"].ram, hosts["extra"].disk) == (4, 8192, 100)
    assert hosts["extra"].status == "ENABLED"


def test_instance_on_added_host(small_cloud: ApiServer, cloud_org: Org) -> None:
    name = f"added-{uuid.uuid4().hex[:8]}"
    # More free RAM than h1 and h2, so the scheduler picks it first.
    small_cloud.backend.run(
        lambda db: host_service.add_host(db, name, vcpus=8, ram=65536, disk=200)
    )
    try:
        with cloud_org.client() as client:
            instance = create_instance(client, "on-added-host")
            result = wait_until_built(client, instance["id"])
        assert result["status"] == "ACTIVE", result["fault"]
    finally:
        # The host can only be removed once no instance is placed on it.
        with cloud_org.client() as client:
            for placed in list_instances(client):
                client.delete(f"/v1/instances/{placed['id']}")
                wait_for(client, placed["id"], status="DELETED")
        small_cloud.backend.run(lambda db: host_service.remove_host(db, name))
