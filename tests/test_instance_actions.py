"""Instance actions and the action history over HTTP, with the real worker.

Two servers run per database. The session's ``api``, whose driver steps take no
time, serves the tests of state rules, bodies, history and isolation.
``small_cloud`` has one compute host and driver steps of STEP_DELAY seconds, so
the tests there can see the intermediate states and check host usage against
the recorded claims after each step.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org, new_backend, start_api
from helpers import (
    MEDIUM_FLAVOR,
    SMALL_FLAVOR,
    TINY_FLAVOR,
    UBUNTU_IMAGE,
    assert_error,
    create_instance,
    wait_for,
)
from sqlalchemy import select, update

from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import instances

LARGE_FLAVOR = str(catalog_id("flavor", "m1.large"))
XLARGE_FLAVOR = str(catalog_id("flavor", "m1.xlarge"))
ACTION_FIELDS = [
    "id", "instance_id", "action", "status", "request_id", "started_at", "finished_at",
    "message", "token_name",
]
# One host: 8 vCPUs, 16 GiB of RAM, 200 GiB of disk. m1.xlarge alone fills its
# vCPUs and RAM, so it cannot join any other instance there.
SMALL_CLOUD_HOSTS = "h1:8:16384:200"
STEP_DELAY = 0.3


def post_action(client: httpx.Client, instance_id: str, action: str, **kwargs: Any) -> httpx.Response:
    return client.post(f"/v1/instances/{instance_id}/actions/{action}", **kwargs)


def accept_action(client: httpx.Client, instance_id: str, action: str, **kwargs: Any) -> dict[str, Any]:
    response = post_action(client, instance_id, action, **kwargs)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def history(client: httpx.Client, instance_id: str, **params: Any) -> dict[str, Any]:
    response = client.get(f"/v1/instances/{instance_id}/actions", params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_for_action(client: httpx.Client, instance_id: str, action_id: str, timeout: float = 20) -> dict[str, Any]:
    """Poll the history until the action record ``action_id`` has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = {record["id"]: record for record in history(client, instance_id, limit=50)["actions"]}
        record: dict[str, Any] = records[action_id]
        if record["status"] != "RUNNING":
            return record
        time.sleep(0.05)
    raise AssertionError(f"action {action_id} did not finish in {timeout} s")


def state_of(instance: dict[str, Any]) -> tuple[Any, ...]:
    return (
        instance["status"],
        instance["vm_state"],
        instance["task_state"],
        instance["power_state"],
        instance["flavor"]["name"],
    )


def active_instance(client: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    created = create_instance(client, name, **fields)
    return wait_for(client, created["id"], status="ACTIVE")


def delete_and_wait(client: httpx.Client, instance_id: str) -> None:
    assert client.delete(f"/v1/instances/{instance_id}").status_code == 202
    wait_for(client, instance_id, status="DELETED")


def set_state(backend: Backend, instance_id: str, **values: Any) -> None:
    """Write instance columns directly, to reach states the API cannot produce on demand."""

    async def write(db: Database) -> None:
        async with db.transaction() as conn:
            await conn.execute(update(instances).where(instances.c.id == uuid.UUID(instance_id)).values(**values))

    backend.run(write)


def assert_usage_matches_claims(backend: Backend) -> None:
    """Check that each host's usage is the sum of the claims the instances record.

    An instance claims its flavor on host_id, and during a resize also new_flavor
    on new_host_id and old_flavor on old_host_id. Hosts and instances are read in
    one snapshot (REPEATABLE READ on PostgreSQL), so a task that commits between
    the two reads cannot make the check fail.
    """

    async def read(db: Database) -> tuple[list[host_store.Host], list[Any]]:
        async with db.reader.connect() as conn:
            if not db.is_sqlite:
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                hosts = await host_store.list_hosts(conn)
                query = select(
                    instances.c.flavor,
                    instances.c.host_id,
                    instances.c.new_flavor,
                    instances.c.new_host_id,
                    instances.c.old_flavor,
                    instances.c.old_host_id,
                )
                rows = list((await conn.execute(query)).all())
        return hosts, rows

    hosts, rows = backend.run(read)
    expected = {host.id: [0, 0, 0, 0] for host in hosts}
    for row in rows:
        claims = ((row.flavor, row.host_id), (row.new_flavor, row.new_host_id), (row.old_flavor, row.old_host_id))
        for flavor, host_id in claims:
            if host_id is None:
                continue
            usage = expected[host_id]
            usage[0] += flavor["vcpus"]
            usage[1] += flavor["ram"]
            usage[2] += flavor["disk"]
            usage[3] += 1
    for host in hosts:
        actual = [host.vcpus_used, host.ram_used, host.disk_used, host.instance_count]
        assert actual == expected[host.id], f"host {host.name}: usage {actual}, claims {expected[host.id]}"


def host_usage(backend: Backend) -> dict[str, tuple[int, int, int, int]]:
    async def read(db: Database) -> list[host_store.Host]:
        async with db.snapshot() as conn:
            return await host_store.list_hosts(conn)

    return {
        host.name: (host.vcpus_used, host.ram_used, host.disk_used, host.instance_count)
        for host in backend.run(read)
    }


def watch(
    client: httpx.Client, backend: Backend, instance_id: str, *, until: str, timeout: float = 20
) -> list[tuple[Any, ...]]:
    """Poll the instance until it reaches ``until`` with no task; return each state seen.

    Host usage is checked against the recorded claims at every state change.
    """
    seen: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance = client.get(f"/v1/instances/{instance_id}").json()
        state = state_of(instance)
        if not seen or seen[-1] != state:
            seen.append(state)
            assert_usage_matches_claims(backend)
        if instance["status"] == until and instance["task_state"] is None:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"instance {instance_id} did not reach {until} in {timeout} s: {seen}")


def assert_seen_in_order(
    seen: list[tuple[Any, ...]], expected: list[tuple[Any, ...]], required: list[tuple[Any, ...]]
) -> None:
    """Check that ``seen`` is ``expected`` in order, with gaps, and contains every ``required`` state.

    A step without a driver call may pass between two polls, so only the states
    that last a whole driver step are required.
    """
    assert all(state in expected for state in seen), seen
    assert seen == sorted(seen, key=expected.index), seen
    for state in required:
        assert state in seen, (state, seen)


# --- the session server: actions and their states ------------------------------------


def test_stop_then_start(org: Org) -> None:
    with org.client() as client:
        instance = active_instance(client, "power-1")
        response = post_action(client, instance["id"], "stop")
        assert response.status_code == 202, response.text
        record = response.json()
        stopped = wait_for(client, instance["id"], status="SHUTOFF")
        started_record = accept_action(client, instance["id"], "start", json={})
        started = wait_for(client, instance["id"], status="ACTIVE")

    assert list(record) == ACTION_FIELDS
    assert record["instance_id"] == instance["id"]
    assert record["action"] == "stop"
    assert record["status"] == "RUNNING"
    assert record["request_id"] == response.headers["x-request-id"]
    assert record["started_at"].endswith("Z")
    assert record["finished_at"] is None
    assert record["message"] is None
    assert record["token_name"] == "rw"
    assert (stopped["vm_state"], stopped["power_state"], stopped["task_state"]) == ("STOPPED", "SHUTDOWN", None)
    assert started_record["action"] == "start"
    assert (started["vm_state"], started["power_state"], started["task_state"]) == ("ACTIVE", "RUNNING", None)
    assert started["fault"] is None


def test_reboot_soft_and_hard(org: Org) -> None:
    with org.client() as client:
        instance = active_instance(client, "reboot-1")
        soft = accept_action(client, instance["id"], "reboot")
        wait_for(client, instance["id"], status="ACTIVE")
        hard = accept_action(client, instance["id"], "reboot", json={"type": "HARD"})
        wait_for(client, instance["id"], status="ACTIVE")
        accept_action(client, instance["id"], "stop")
        wait_for(client, instance["id"], status="SHUTOFF")
        accept_action(client, instance["id"], "reboot", json={"type": "HARD"})
        after_stop = wait_for(client, instance["id"], status="ACTIVE")
        records = history(client, instance["id"])["actions"]

    assert [record["action"] for record in records] == ["reboot", "stop", "reboot", "reboot", "create"]
    assert {record["status"] for record in records} == {"SUCCEEDED"}
    assert [records[3]["id"], records[2]["id"]] == [soft["id"], hard["id"]]
    assert (after_stop["vm_state"], after_stop["power_state"]) == ("ACTIVE", "RUNNING")


def test_resize_confirm_on_session_api(org: Org) -> None:
    with org.client() as client:
        instance = active_instance(client, "resize-1")
        accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
        resized = wait_for(client, instance["id"], status="VERIFY_RESIZE")
        listed = client.get("/v1/instances", params={"flavor_id": MEDIUM_FLAVOR, "name": "resize-1"}).json()
        accept_action(client, instance["id"], "confirm-resize")
        confirmed = wait_for(client, instance["id"], status="ACTIVE")

    assert resized["vm_state"] == "RESIZED"
    assert resized["flavor"] == {"id": MEDIUM_FLAVOR, "name": "m1.medium", "vcpus": 2, "ram": 4096, "disk": 40}
    assert [item["id"] for item in listed["instances"]] == [instance["id"]]
    assert confirmed["flavor"]["id"] == MEDIUM_FLAVOR
    assert confirmed["addresses"] == instance["addresses"]


@pytest.fixture(scope="module")
def instance_in_state(shared_org: Org) -> Callable[[str], dict[str, Any]]:
    """Return an instance of ``shared_org`` in a status, made on first use and shared after.

    The tests that use it only send requests that are rejected, so the instance stays as it is.
    """
    prepared: dict[str, dict[str, Any]] = {}

    def get(status: str) -> dict[str, Any]:
        if status not in prepared:
            with shared_org.client() as client:
                instance = active_instance(client, f"conflict-{status.lower()}")
                if status == "SHUTOFF":
                    accept_action(client, instance["id"], "stop")
                elif status == "VERIFY_RESIZE":
                    accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
                prepared[status] = wait_for(client, instance["id"], status=status)
        return prepared[status]

    return get


@pytest.mark.parametrize(
    ("setup", "action", "body", "label"),
    [
        ("ACTIVE", "start", None, "start"),
        ("ACTIVE", "confirm-resize", None, "confirm-resize"),
        ("ACTIVE", "revert-resize", None, "revert-resize"),
        ("SHUTOFF", "stop", None, "stop"),
        ("SHUTOFF", "reboot", None, "SOFT reboot"),
        ("SHUTOFF", "confirm-resize", None, "confirm-resize"),
        ("VERIFY_RESIZE", "stop", None, "stop"),
        ("VERIFY_RESIZE", "reboot", {"type": "HARD"}, "HARD reboot"),
        ("VERIFY_RESIZE", "resize", {"flavor_id": LARGE_FLAVOR}, "resize"),
        ("VERIFY_RESIZE", "start", None, "start"),
    ],
)
def test_action_conflicts_with_state(
    shared_org: Org,
    instance_in_state: Callable[[str], dict[str, Any]],
    setup: str,
    action: str,
    body: dict[str, Any] | None,
    label: str,
) -> None:
    current = instance_in_state(setup)
    instance_id = current["id"]
    with shared_org.client() as client:
        records_before = history(client, instance_id)["actions"]
        response = post_action(client, instance_id, action, **({"json": body} if body else {}))
        records_after = history(client, instance_id)["actions"]
        unchanged = client.get(f"/v1/instances/{instance_id}").json()

    error = assert_error(response, 409, "conflict")
    assert error["message"].startswith(
        f"instance {instance_id} is {setup} (vm_state {current['vm_state']}, task_state null), "
        f"but the {label} action needs vm_state "
    )
    assert error["details"] == {
        "action": label,
        "status": setup,
        "vm_state": current["vm_state"],
        "task_state": None,
    }
    assert records_after == records_before
    assert unchanged == current


def test_concurrent_stops_one_wins(org: Org) -> None:
    with org.client() as client:
        instance = active_instance(client, "race-stop")

        def stop() -> int:
            with org.client() as own_client:
                return post_action(own_client, instance["id"], "stop").status_code

        with ThreadPoolExecutor(max_workers=6) as pool:
            codes = sorted(pool.map(lambda _: stop(), range(6)))
        wait_for(client, instance["id"], status="SHUTOFF")
        records = history(client, instance["id"])["actions"]

    assert codes == [202, 409, 409, 409, 409, 409]
    assert [record["action"] for record in records] == ["stop", "create"]


def test_error_without_host_takes_no_action(org: Org) -> None:
    """An instance whose build found no host can only be deleted."""
    with org.client("admin") as admin:
        response = admin.post(
            "/v1/flavors", json={"name": f"huge-{org.name}", "vcpus": 1024, "ram": 4096, "disk": 40}
        )
        assert response.status_code == 201, response.text
        huge_flavor = response.json()["id"]
    with org.client() as client:
        created = create_instance(client, "no-host", flavor_id=huge_flavor)
        wait_for(client, created["id"], status="ERROR")
        responses = {
            "stop": post_action(client, created["id"], "stop"),
            "HARD reboot": post_action(client, created["id"], "reboot", json={"type": "HARD"}),
            "SOFT reboot": post_action(client, created["id"], "reboot"),
            "start": post_action(client, created["id"], "start"),
            "resize": post_action(client, created["id"], "resize", json={"flavor_id": LARGE_FLAVOR}),
        }
        [create_record] = history(client, created["id"])["actions"]
        delete_and_wait(client, created["id"])

    for label, response in responses.items():
        error = assert_error(response, 409, "conflict")
        assert error["details"]["action"] == label
        assert error["details"]["status"] == "ERROR"
    assert "has none because its build did not finish" in responses["stop"].json()["error"]["message"]
    assert "has none because its build did not finish" in responses["HARD reboot"].json()["error"]["message"]
    assert "needs vm_state ACTIVE and no task" in responses["SOFT reboot"].json()["error"]["message"]
    assert create_record["action"] == "create"
    assert create_record["status"] == "FAILED"
    assert create_record["message"].startswith("No valid host was found")
    assert create_record["finished_at"] is not None


def test_error_with_host_recovers(org: Org, api: ApiServer) -> None:
    """Stop and HARD reboot recover an instance in ERROR that has a host; nothing else may start."""
    fault = {"code": 500, "message": "Simulated failure", "details": "set by the test", "created": "2024-01-15T10:30:00Z"}
    error_state = {"vm_state": "ERROR", "status": "ERROR", "fault": fault}
    with org.client() as client:
        instance = active_instance(client, "recover-1")
        set_state(api.backend, instance["id"], **error_state)
        rejected = {
            "SOFT reboot": post_action(client, instance["id"], "reboot"),
            "start": post_action(client, instance["id"], "start"),
            "resize": post_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR}),
            "confirm-resize": post_action(client, instance["id"], "confirm-resize"),
        }
        accept_action(client, instance["id"], "stop")
        stopped = wait_for(client, instance["id"], status="SHUTOFF")
        set_state(api.backend, instance["id"], **error_state)
        accept_action(client, instance["id"], "reboot", json={"type": "HARD"})
        rebooted = wait_for(client, instance["id"], status="ACTIVE")

    for label, response in rejected.items():
        error = assert_error(response, 409, "conflict")
        assert error["details"]["action"] == label
        assert "is ERROR (vm_state ERROR, task_state null)" in error["message"]
    assert (stopped["power_state"], stopped["fault"]) == ("SHUTDOWN", None)
    assert (rebooted["vm_state"], rebooted["power_state"], rebooted["fault"]) == ("ACTIVE", "RUNNING", None)


# --- requests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    return make_org(api, "actions")


@pytest.fixture(scope="module")
def idle_instance(shared_org: Org) -> str:
    """An ACTIVE instance shared by the tests of rejected requests, none of which may change it."""
    with shared_org.client() as client:
        return str(active_instance(client, "idle")["id"])


JSON = "application/json"


@pytest.mark.parametrize(
    ("action", "content", "content_type", "status", "error_type"),
    [
        ("reboot", b'{"type": "soft"}', JSON, 400, "invalid_request"),
        ("reboot", b'{"type": "HARD", "force": true}', JSON, 400, "invalid_request"),
        ("reboot", b'{"type": 1}', JSON, 400, "invalid_request"),
        ("stop", b'{"force": true}', JSON, 400, "invalid_request"),
        ("stop", b"null", JSON, 400, "invalid_request"),
        ("start", b"[]", JSON, 400, "invalid_request"),
        ("confirm-resize", b"{not json", JSON, 400, "invalid_request"),
        ("resize", None, None, 400, "invalid_request"),
        ("resize", b"{}", JSON, 400, "invalid_request"),
        ("resize", b'{"flavor_id": "m1.large"}', JSON, 400, "invalid_request"),
        ("resize", f'{{"flavor_id": "{uuid.uuid4()}"}}'.encode(), JSON, 400, "invalid_parameter"),
        ("resize", f'{{"flavor_id": "{SMALL_FLAVOR}"}}'.encode(), JSON, 400, "invalid_parameter"),
        ("resize", f'{{"flavor_id": "{TINY_FLAVOR}"}}'.encode(), JSON, 400, "invalid_parameter"),
        ("stop", b"{}", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_bad_request_rejected(
    shared_org: Org,
    idle_instance: str,
    action: str,
    content: bytes | None,
    content_type: str | None,
    status: int,
    error_type: str,
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with shared_org.client() as client:
        response = post_action(client, idle_instance, action, content=content, headers=headers)
        after = client.get(f"/v1/instances/{idle_instance}").json()
        records = history(client, idle_instance)["actions"]

    error = assert_error(response, status, error_type)
    if error_type == "invalid_parameter":
        assert error["details"]["parameter"] == "flavor_id"
    assert (after["status"], after["task_state"]) == ("ACTIVE", None)
    assert [record["action"] for record in records] == ["create"]


def test_resize_rejections_explained(shared_org: Org, idle_instance: str) -> None:
    with shared_org.client() as client:
        same = post_action(client, idle_instance, "resize", json={"flavor_id": SMALL_FLAVOR})
        smaller = post_action(client, idle_instance, "resize", json={"flavor_id": TINY_FLAVOR})

    assert "already has flavor m1.small" in same.json()["error"]["message"]
    assert smaller.json()["error"]["message"] == (
        f"flavor m1.tiny has a 1 GiB disk, smaller than the 20 GiB disk of instance {idle_instance}, "
        "and a resize cannot shrink a disk"
    )


def test_unknown_action_not_found(shared_org: Org, idle_instance: str) -> None:
    with shared_org.client() as client:
        unknown = post_action(client, idle_instance, "shutdown")
        unknown_instance = post_action(client, str(uuid.uuid4()), "stop")
        not_uuid = post_action(client, "web-1", "stop")
        get_action = client.get(f"/v1/instances/{idle_instance}/actions/stop")

    error = assert_error(unknown, 404, "not_found")
    assert error["message"] == (
        "unknown action 'shutdown'; valid actions: start, stop, reboot, resize, confirm-resize, revert-resize"
    )
    assert_error(unknown_instance, 404, "not_found")
    assert assert_error(not_uuid, 404, "not_found")["message"].startswith("instance ")
    assert_error(get_action, 405, "method_not_allowed")


def test_scopes_and_tokens(shared_org: Org, idle_instance: str) -> None:
    with shared_org.client("read") as reader:
        read_only_post = post_action(reader, idle_instance, "stop")
        read_only_get = reader.get(f"/v1/instances/{idle_instance}/actions")
    with shared_org.client("write") as writer:
        write_only_get = writer.get(f"/v1/instances/{idle_instance}/actions")
    with shared_org.api.client() as anonymous:
        no_token = post_action(anonymous, idle_instance, "stop")

    assert_error(read_only_post, 403, "forbidden")
    assert read_only_get.status_code == 200
    assert_error(write_only_get, 403, "forbidden")
    assert_error(no_token, 401, "unauthorized")
    assert no_token.headers["www-authenticate"] == 'Bearer realm="mycloud"'


def test_other_org_sees_not_found(shared_org: Org, other_org: Org, idle_instance: str) -> None:
    unknown_id = str(uuid.uuid4())
    with shared_org.client() as client:
        [create_record] = history(client, idle_instance)["actions"]
    with other_org.client() as stranger:
        stranger_instance = active_instance(stranger, "strangers")
        responses = {
            "action": (post_action(stranger, idle_instance, "stop"), post_action(stranger, unknown_id, "stop")),
            "history": (
                stranger.get(f"/v1/instances/{idle_instance}/actions"),
                stranger.get(f"/v1/instances/{unknown_id}/actions"),
            ),
        }
        foreign_marker = stranger.get(
            f"/v1/instances/{stranger_instance['id']}/actions", params={"marker": create_record["id"]}
        )
    with shared_org.client() as client:
        unchanged = client.get(f"/v1/instances/{idle_instance}").json()

    for theirs, unknown in responses.values():
        their_error = assert_error(theirs, 404, "not_found")
        unknown_error = assert_error(unknown, 404, "not_found")
        assert their_error["message"] == unknown_error["message"].replace(unknown_id, idle_instance)
    assert_error(foreign_marker, 400, "invalid_parameter")
    assert (unchanged["status"], unchanged["task_state"]) == ("ACTIVE", None)


# --- history ------------------------------------------------------------------------


def test_history_pages(org: Org) -> None:
    with org.client() as client:
        created = create_instance(client, "history-1")
        wait_for(client, created["id"], status="ACTIVE")
        accepted = []
        for action in ("stop", "start", "reboot", "stop", "start", "reboot"):
            accepted.append(accept_action(client, created["id"], action))
            wait_for_action(client, created["id"], accepted[-1]["id"])

        everything = history(client, created["id"], limit=100)
        pages = [history(client, created["id"], limit=3)]
        while pages[-1]["links"]["next"]:
            pages.append(client.get(pages[-1]["links"]["next"]).json())
        back = client.get(pages[2]["links"]["previous"]).json()
        unknown_marker = client.get(
            f"/v1/instances/{created['id']}/actions", params={"marker": str(uuid.uuid4())}
        )
        bad_limit = client.get(f"/v1/instances/{created['id']}/actions", params={"limit": "0"})
        unknown_parameter = client.get(f"/v1/instances/{created['id']}/actions", params={"action": "stop"})

    records = everything["actions"]
    assert [record["action"] for record in records] == [
        "reboot", "start", "stop", "reboot", "start", "stop", "create"
    ]
    assert [record["id"] for record in records[:6]] == [record["id"] for record in reversed(accepted)]
    for record in records:
        assert list(record) == ACTION_FIELDS
        assert record["status"] == "SUCCEEDED"
        assert record["finished_at"] is not None
        assert record["finished_at"] >= record["started_at"]
        assert record["token_name"] == "rw"
        assert record["request_id"].startswith("req-")
    assert everything["meta"] == {"total": 7, "limit": 100, "marker": records[-1]["id"], "has_more": False}

    assert [len(page["actions"]) for page in pages] == [3, 3, 1]
    assert [record["id"] for page in pages for record in page["actions"]] == [record["id"] for record in records]
    assert pages[0]["meta"] == {"total": 7, "limit": 3, "marker": records[2]["id"], "has_more": True}
    assert pages[0]["links"]["previous"] is None
    assert pages[1]["links"]["previous"].endswith(f"/v1/instances/{created['id']}/actions?limit=3")
    assert pages[2]["links"]["next"] is None
    assert back["actions"] == pages[1]["actions"]
    assert_error(unknown_marker, 400, "invalid_parameter")
    assert_error(bad_limit, 400, "invalid_parameter")
    assert_error(unknown_parameter, 400, "invalid_parameter")


def test_history_of_create_and_delete(org: Org) -> None:
    """Create and delete are recorded like actions, and a DELETED instance keeps its history."""
    with org.client() as client:
        response = client.post(
            "/v1/instances",
            json={"name": "history-2", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE},
            headers={"X-Request-Id": "test-create-history-2"},
        )
        assert response.status_code == 202, response.text
        instance_id = response.json()["id"]
        wait_for(client, instance_id, status="ACTIVE")
        deleted = client.delete(f"/v1/instances/{instance_id}", headers={"X-Request-Id": "test-delete-history-2"})
        assert deleted.status_code == 202
        wait_for(client, instance_id, status="DELETED")
        show = client.get(f"/v1/instances/{instance_id}")
        after_delete = history(client, instance_id)
        action_on_deleted = post_action(client, instance_id, "start")

    assert_error(show, 404, "not_found")
    delete_record, create_record = after_delete["actions"]
    assert (create_record["action"], create_record["status"]) == ("create", "SUCCEEDED")
    assert create_record["request_id"] == "test-create-history-2"
    assert (delete_record["action"], delete_record["status"]) == ("delete", "SUCCEEDED")
    assert delete_record["request_id"] == "test-delete-history-2"
    for record in (create_record, delete_record):
        assert record["finished_at"] is not None
        assert record["message"] is None
        assert record["token_name"] == "rw"
    assert_error(action_on_deleted, 404, "not_found")


# --- one small host, slow driver steps: intermediate states and host usage ----------


@pytest.fixture(scope="module")
def small_cloud(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A server of its own on a fresh database with one host and slow driver steps."""
    directory = tmp_path_factory.mktemp(f"small-cloud-{backend.kind}")
    with new_backend(backend.kind, directory) as fresh:
        server = start_api(
            fresh, directory, simulated_hosts=SMALL_CLOUD_HOSTS, driver_step_delay=str(STEP_DELAY)
        )
        try:
            yield server
        finally:
            server.stop()
        assert "unhandled error request_id=" not in server.logs(), server.logs()[-5000:]


@pytest.fixture
def small_org(small_cloud: ApiServer) -> Org:
    return make_org(small_cloud)


def test_stop_start_steps(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        created = create_instance(client, "steps-power")
        during_build = post_action(client, created["id"], "stop")
        instance = wait_for(client, created["id"], status="ACTIVE")
        assert_usage_matches_claims(backend)
        accept_action(client, instance["id"], "stop")
        stopping = client.get(f"/v1/instances/{instance['id']}").json()
        during_stop = {
            "start": post_action(client, instance["id"], "start"),
            "stop": post_action(client, instance["id"], "stop"),
            "HARD reboot": post_action(client, instance["id"], "reboot", json={"type": "HARD"}),
        }
        stop_seen = watch(client, backend, instance["id"], until="SHUTOFF")
        accept_action(client, instance["id"], "start")
        start_seen = watch(client, backend, instance["id"], until="ACTIVE")
        accept_action(client, instance["id"], "reboot")
        reboot_seen = watch(client, backend, instance["id"], until="ACTIVE")
        delete_and_wait(client, instance["id"])

    build_error = assert_error(during_build, 409, "conflict")
    assert build_error["details"]["status"] == "BUILD"
    assert build_error["details"]["task_state"] in ("SCHEDULING", "BLOCK_DEVICE_MAPPING")
    assert "(vm_state BUILDING, task_state " in build_error["message"]
    assert state_of(stopping) == ("ACTIVE", "ACTIVE", "POWERING_OFF", "RUNNING", "m1.small")
    for label, response in during_stop.items():
        error = assert_error(response, 409, "conflict")
        assert "task_state POWERING_OFF" in error["message"]
        assert error["details"]["action"] == label
    # The conflicting requests above may have used up the POWERING_OFF step.
    stop_expected = [
        ("ACTIVE", "ACTIVE", "POWERING_OFF", "RUNNING", "m1.small"),
        ("SHUTOFF", "STOPPED", None, "SHUTDOWN", "m1.small"),
    ]
    assert_seen_in_order(stop_seen, stop_expected, required=stop_expected[1:])
    assert start_seen == [
        ("SHUTOFF", "STOPPED", "POWERING_ON", "SHUTDOWN", "m1.small"),
        ("ACTIVE", "ACTIVE", None, "RUNNING", "m1.small"),
    ]
    assert reboot_seen == [
        ("REBOOT", "ACTIVE", "REBOOTING", "RUNNING", "m1.small"),
        ("ACTIVE", "ACTIVE", None, "RUNNING", "m1.small"),
    ]
    assert host_usage(backend) == {"h1": (0, 0, 0, 0)}


RESIZE_OF_ACTIVE = [
    ("RESIZE", "ACTIVE", "RESIZE_PREP", "RUNNING", "m1.small"),
    ("RESIZE", "ACTIVE", "RESIZE_MIGRATING", "RUNNING", "m1.small"),
    ("RESIZE", "ACTIVE", "RESIZE_FINISH", "SHUTDOWN", "m1.small"),
    ("VERIFY_RESIZE", "RESIZED", None, "RUNNING", "m1.medium"),
]


def test_resize_then_confirm(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-confirm")
        usage_before = host_usage(backend)
        record = accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
        during_resize = post_action(client, instance["id"], "stop")
        resize_seen = watch(client, backend, instance["id"], until="VERIFY_RESIZE")
        usage_resized = host_usage(backend)
        [resize_record, _] = history(client, instance["id"])["actions"]
        accept_action(client, instance["id"], "confirm-resize", json={})
        confirm_seen = watch(client, backend, instance["id"], until="ACTIVE")
        usage_confirmed = host_usage(backend)
        delete_and_wait(client, instance["id"])

    assert_error(during_resize, 409, "conflict")
    assert_seen_in_order(resize_seen, RESIZE_OF_ACTIVE, required=RESIZE_OF_ACTIVE[1:])
    assert resize_record["id"] == record["id"]
    assert resize_record["status"] == "SUCCEEDED"
    assert usage_before == {"h1": (1, 2048, 20, 1)}
    # Both flavors stay claimed until the resize is confirmed or reverted.
    assert usage_resized == {"h1": (3, 6144, 60, 2)}
    assert confirm_seen[-1] == ("ACTIVE", "ACTIVE", None, "RUNNING", "m1.medium")
    assert usage_confirmed == {"h1": (2, 4096, 40, 1)}
    assert host_usage(backend) == {"h1": (0, 0, 0, 0)}


def test_resize_then_revert(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-revert")
        accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
        wait_for(client, instance["id"], status="VERIFY_RESIZE")
        revert = accept_action(client, instance["id"], "revert-resize")
        # The revert task runs with task_state null, and still no other action may start.
        during_revert = post_action(client, instance["id"], "confirm-resize")
        revert_seen = watch(client, backend, instance["id"], until="ACTIVE")
        reverted = client.get(f"/v1/instances/{instance['id']}").json()
        listed = client.get("/v1/instances", params={"flavor_id": SMALL_FLAVOR}).json()["instances"]
        records = history(client, instance["id"])["actions"]
        delete_and_wait(client, instance["id"])

    error = assert_error(during_revert, 409, "conflict")
    if "task in progress" in error["message"]:
        assert "revert-resize task in progress" in error["message"]
    assert revert_seen[-1] == ("ACTIVE", "ACTIVE", None, "RUNNING", "m1.small")
    assert reverted["flavor"]["id"] == SMALL_FLAVOR
    assert reverted["fault"] is None
    assert [item["id"] for item in listed] == [instance["id"]]
    assert [(record["action"], record["status"]) for record in records] == [
        ("revert-resize", "SUCCEEDED"), ("resize", "SUCCEEDED"), ("create", "SUCCEEDED")
    ]
    assert records[0]["id"] == revert["id"]
    assert host_usage(backend) == {"h1": (0, 0, 0, 0)}


def test_resize_stopped_instance(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-stopped")
        accept_action(client, instance["id"], "stop")
        wait_for(client, instance["id"], status="SHUTOFF")
        accept_action(client, instance["id"], "resize", json={"flavor_id": LARGE_FLAVOR})
        resize_seen = watch(client, backend, instance["id"], until="VERIFY_RESIZE")
        usage_resized = host_usage(backend)
        accept_action(client, instance["id"], "confirm-resize")
        confirmed = wait_for(client, instance["id"], status="SHUTOFF")
        usage_confirmed = host_usage(backend)
        delete_and_wait(client, instance["id"])

    expected = [
        ("RESIZE", "STOPPED", "RESIZE_PREP", "SHUTDOWN", "m1.small"),
        ("RESIZE", "STOPPED", "RESIZE_MIGRATING", "SHUTDOWN", "m1.small"),
        ("RESIZE", "STOPPED", "RESIZE_FINISH", "SHUTDOWN", "m1.small"),
        ("VERIFY_RESIZE", "RESIZED", None, "SHUTDOWN", "m1.large"),
    ]
    # A stopped VM is not powered on at the new host, so RESIZE_FINISH takes no time.
    assert_seen_in_order(resize_seen, expected, required=[expected[1], expected[3]])
    assert usage_resized == {"h1": (5, 10240, 100, 2)}
    assert (confirmed["vm_state"], confirmed["power_state"]) == ("STOPPED", "SHUTDOWN")
    assert confirmed["flavor"]["name"] == "m1.large"
    assert usage_confirmed == {"h1": (4, 8192, 80, 1)}


def test_resize_no_valid_host(small_cloud: ApiServer, small_org: Org) -> None:
    """No host has room for m1.xlarge next to the instance: the resize fails, the instance stays usable."""
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-no-host")
        record = accept_action(client, instance["id"], "resize", json={"flavor_id": XLARGE_FLAVOR})
        failed_record = wait_for_action(client, instance["id"], record["id"])
        after = wait_for(client, instance["id"], status="ACTIVE")
        assert_usage_matches_claims(backend)
        usage_after = host_usage(backend)
        accept_action(client, instance["id"], "stop")
        stopped = wait_for(client, instance["id"], status="SHUTOFF")
        delete_and_wait(client, instance["id"])

    assert failed_record["status"] == "FAILED"
    assert failed_record["finished_at"] is not None
    assert failed_record["message"].startswith("No valid host was found: no host has 8 free vCPUs")
    assert state_of(after) == ("ACTIVE", "ACTIVE", None, "RUNNING", "m1.small")
    assert after["fault"]["code"] == 500
    assert after["fault"]["message"] == "No valid host was found"
    assert after["fault"]["details"].startswith("no host has 8 free vCPUs")
    assert usage_after == {"h1": (1, 2048, 20, 1)}
    # The next action that succeeds clears the fault.
    assert stopped["fault"] is None


def test_delete_resized_releases_claims(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-delete")
        accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
        wait_for(client, instance["id"], status="VERIFY_RESIZE")
        usage_resized = host_usage(backend)
        delete_and_wait(client, instance["id"])
        records = history(client, instance["id"])["actions"]

    assert usage_resized == {"h1": (3, 6144, 60, 2)}
    assert_usage_matches_claims(backend)
    assert host_usage(backend) == {"h1": (0, 0, 0, 0)}
    assert [(record["action"], record["status"]) for record in records] == [
        ("delete", "SUCCEEDED"), ("resize", "SUCCEEDED"), ("create", "SUCCEEDED")
    ]


def test_delete_cancels_running_resize(small_cloud: ApiServer, small_org: Org) -> None:
    backend = small_cloud.backend
    with small_org.client() as client:
        instance = active_instance(client, "steps-cancel")
        record = accept_action(client, instance["id"], "resize", json={"flavor_id": MEDIUM_FLAVOR})
        # Usually lands in RESIZE_MIGRATING, after the new claim; every step must cancel alike.
        time.sleep(STEP_DELAY / 2)
        assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
        wait_for(client, instance["id"], status="DELETED")
        resize_record = wait_for_action(client, instance["id"], record["id"])

    assert resize_record["status"] == "FAILED"
    assert resize_record["message"] == "Cancelled: the instance is being deleted"
    assert_usage_matches_claims(backend)
    assert host_usage(backend) == {"h1": (0, 0, 0, 0)}

