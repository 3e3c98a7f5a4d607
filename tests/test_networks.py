"""/v1/networks, and instances built on several networks with key pairs and groups."""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance, wait_for
from sqlalchemy import delete, update

from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import instances, ports

NETWORK_FIELDS = ["id", "crn", "name", "cidr", "ip_version", "created_at"]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
MAC = re.compile(r"^fa:16:3e(:[0-9a-f]{2}){3}$")


def unique_name(prefix: str = "net") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def create_network(client: httpx.Client, cidr: str, name: str | None = None) -> dict[str, Any]:
    response = client.post("/v1/networks", json={"name": name or unique_name(), "cidr": cidr})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def list_all(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/networks", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    return response.json()["networks"]  # type: ignore[no-any-return]


def assert_rejected(response: httpx.Response, field: str) -> dict[str, Any]:
    """Check a 400 envelope that names ``field`` in details.parameter or the message."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] in ("invalid_parameter", "invalid_request")
    parameter = (error.get("details") or {}).get("parameter")
    assert parameter == field or field in error["message"], error
    return error  # type: ignore[no-any-return]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    """An organization for tests that neither list nor count networks."""
    return make_org(api, "networks")


@pytest.fixture(scope="module")
def client(shared_org: Org) -> Iterator[httpx.Client]:
    with shared_org.client() as rw_client:
        yield rw_client


# --- the default network --------------------------------------------------------------


def test_private_network_listed(org: Org) -> None:
    with org.client("read") as client:
        networks = list_all(client)

    assert len(networks) == 1
    network = networks[0]
    assert list(network) == NETWORK_FIELDS
    assert network["name"] == "private-network"
    assert network["cidr"] == "192.168.0.0/16"
    assert network["ip_version"] == 4
    assert network["crn"] == f"crn:spo1:compute:network:{network['id']}"
    assert TIMESTAMP.match(network["created_at"])


def test_private_network_recreated_on_first_use(org: Org) -> None:
    with org.client() as client:
        original = list_all(client)[0]
        deleted = client.delete(f"/v1/networks/{original['id']}")
        instance = create_instance(client, "default-network")
        networks = list_all(client)

    assert deleted.status_code == 204, deleted.text
    assert [network["name"] for network in networks] == ["private-network"]
    assert networks[0]["id"] != original["id"]
    assert networks[0]["cidr"] == "192.168.0.0/16"
    assert instance["status"] == "BUILD"


def test_private_network_recreated_by_concurrent_creates(api: ApiServer) -> None:
    """Creates racing to re-create a deleted default network all succeed with one network."""
    for round_number in range(5):
        org = make_org(api, "default-race")
        with org.client() as client:
            (network,) = list_all(client)
            assert client.delete(f"/v1/networks/{network['id']}").status_code == 204

            def create(index: int, org: Org = org) -> httpx.Response:
                with org.client() as racer:
                    body = {"name": f"race-{index}", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE}
                    return racer.post("/v1/instances", json=body)

            with ThreadPoolExecutor(max_workers=6) as pool:
                responses = list(pool.map(create, range(6)))

            statuses = [response.status_code for response in responses]
            assert statuses == [202] * 6, (round_number, [response.text for response in responses])
            assert [item["name"] for item in list_all(client)] == ["private-network"]


# --- create and show ------------------------------------------------------------------

GOOD_CIDRS = [
    ("10.0.0.0/24", "10.0.0.0/24", 4),
    ("10.0.0.0/8", "10.0.0.0/8", 4),
    ("172.16.0.0/29", "172.16.0.0/29", 4),
    ("100.64.0.0/10", "100.64.0.0/10", 4),
    ("fd00:1::/64", "fd00:1::/64", 6),
    ("2001:DB8::/48", "2001:db8::/48", 6),
    ("fd00::/124", "fd00::/124", 6),
]


@pytest.mark.parametrize(("cidr", "stored", "version"), GOOD_CIDRS)
def test_create(client: httpx.Client, cidr: str, stored: str, version: int) -> None:
    name = unique_name()

    response = client.post("/v1/networks", json={"name": name, "cidr": cidr})

    assert response.status_code == 201, response.text
    network = response.json()
    assert list(network) == NETWORK_FIELDS
    assert network["name"] == name
    assert network["cidr"] == stored
    assert network["ip_version"] == version
    assert network["crn"] == f"crn:spo1:compute:network:{network['id']}"
    assert response.headers["location"] == f"/v1/networks/{network['id']}"
    assert client.get(f"/v1/networks/{network['id']}").json() == network


BAD_CIDRS = [
    pytest.param("10.0.0.5/24", "10.0.0.0/24", id="host-bits"),
    pytest.param("fd00::1/64", "fd00::/64", id="ipv6-host-bits"),
    pytest.param("10.0.0.0", "CIDR", id="no-prefix-length"),
    pytest.param("10.0.0.0/255.255.255.0", "CIDR", id="netmask"),
    pytest.param("10.0.0.0/7", "/8", id="ipv4-too-wide"),
    pytest.param("10.0.0.0/30", "/29", id="ipv4-too-narrow"),
    pytest.param("fd00::/47", "/48", id="ipv6-too-wide"),
    pytest.param("fd00::/125", "/124", id="ipv6-too-narrow"),
    pytest.param("10.0.0.0/33", "CIDR", id="prefix-over-32"),
    pytest.param("127.0.0.0/8", "reserved", id="loopback"),
    pytest.param("169.254.0.0/16", "reserved", id="link-local"),
    pytest.param("224.0.0.0/24", "reserved", id="multicast"),
    pytest.param("240.0.0.0/8", "reserved", id="class-e"),
    pytest.param("0.0.0.0/8", "reserved", id="this-network"),
    pytest.param("fe80::/64", "reserved", id="ipv6-link-local"),
    pytest.param("ff02::/64", "reserved", id="ipv6-multicast"),
    pytest.param("::ffff:0:0/112", "reserved", id="ipv4-mapped"),
    pytest.param("fe80::%eth0/64", "CIDR", id="zone-id"),
    pytest.param("300.0.0.0/8", "CIDR", id="bad-octet"),
    pytest.param("", "cidr", id="empty"),
    pytest.param(" 10.0.0.0/24", "CIDR", id="leading-space"),
    pytest.param(10, "cidr", id="number"),
]


@pytest.mark.parametrize(("cidr", "hint"), BAD_CIDRS)
def test_create_rejects_cidr(client: httpx.Client, cidr: Any, hint: str) -> None:
    response = client.post("/v1/networks", json={"name": unique_name(), "cidr": cidr})

    error = assert_rejected(response, "cidr")
    assert hint in error["message"], error["message"]


BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param("net ", id="trailing-space"),
    pytest.param("a\tb", id="tab"),
    pytest.param("a\x00b", id="nul"),
    pytest.param(None, id="null"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_create_rejects_name(client: httpx.Client, name: Any) -> None:
    response = client.post("/v1/networks", json={"name": name, "cidr": "10.1.0.0/24"})

    assert_rejected(response, "name")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"name": "n"}, id="no-cidr"),
        pytest.param({"cidr": "10.0.0.0/24"}, id="no-name"),
        pytest.param({"name": "n", "cidr": "10.0.0.0/24", "ip_version": 4}, id="unknown-field"),
    ],
)
def test_create_rejects_body(client: httpx.Client, body: dict[str, Any]) -> None:
    assert client.post("/v1/networks", json=body).status_code == 400


def test_duplicate_name_conflicts(client: httpx.Client, other_org: Org) -> None:
    name = unique_name()
    create_network(client, "10.2.0.0/24", name)

    again = client.post("/v1/networks", json={"name": name, "cidr": "10.3.0.0/24"})
    default = client.post("/v1/networks", json={"name": "private-network", "cidr": "10.4.0.0/24"})
    with other_org.client() as other:
        elsewhere = other.post("/v1/networks", json={"name": name, "cidr": "10.2.0.0/24"})

    error = assert_error(again, 409, "conflict")
    assert name in error["message"]
    assert_error(default, 409, "conflict")
    assert elsewhere.status_code == 201, elsewhere.text


def test_overlapping_networks_allowed(client: httpx.Client) -> None:
    first = create_network(client, "10.9.0.0/16")
    second = create_network(client, "10.9.1.0/24")

    assert first["cidr"] != second["cidr"]


def test_create_needs_write_scope(shared_org: Org) -> None:
    with shared_org.client("read") as reader:
        response = reader.post("/v1/networks", json={"name": unique_name(), "cidr": "10.5.0.0/24"})

    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize("network_id", [str(uuid.UUID(int=3)), "not-a-uuid", "private-network"])
def test_unknown_network(client: httpx.Client, network_id: str) -> None:
    assert_error(client.get(f"/v1/networks/{network_id}"), 404, "not_found")
    assert_error(client.delete(f"/v1/networks/{network_id}"), 404, "not_found")


# --- delete and in-use ----------------------------------------------------------------


def test_delete_unused(client: httpx.Client) -> None:
    network = create_network(client, "10.6.0.0/24")

    deleted = client.delete(f"/v1/networks/{network['id']}")
    shown = client.get(f"/v1/networks/{network['id']}")
    again = client.delete(f"/v1/networks/{network['id']}")

    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""
    assert_error(shown, 404, "not_found")
    assert_error(again, 404, "not_found")


def test_delete_in_use(client: httpx.Client) -> None:
    network = create_network(client, "10.7.0.0/24")
    instance = create_instance(client, "on-network", networks=[network["id"]])

    while_building = client.delete(f"/v1/networks/{network['id']}")
    wait_for(client, instance["id"], status="ACTIVE")
    while_active = client.delete(f"/v1/networks/{network['id']}")
    assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
    wait_for(client, instance["id"], status="DELETED")
    after_delete = client.delete(f"/v1/networks/{network['id']}")
    late = client.post(
        "/v1/instances",
        json={
            "name": "late",
            "flavor_id": SMALL_FLAVOR,
            "image_id": UBUNTU_IMAGE,
            "networks": [network["id"]],
        },
    )

    assert_error(while_building, 409, "conflict")
    error = assert_error(while_active, 409, "conflict")
    assert error["details"]["instances"] == [instance["id"]]
    assert instance["id"] in error["message"]
    assert after_delete.status_code == 204, after_delete.text
    late_error = assert_rejected(late, "networks")
    assert late_error["message"] == f"network {network['id']} not found"


def test_delete_in_use_before_ports(shared_org: Org, client: httpx.Client) -> None:
    """An instance in BUILD that has no port yet still uses the networks it names.

    The worker is fast, so the test puts an ACTIVE instance back into that state in
    the database: status BUILD and no ports.
    """
    network = create_network(client, "10.8.0.0/24")
    instance = create_instance(client, "before-ports", networks=[network["id"]])
    wait_for(client, instance["id"], status="ACTIVE")
    set_building_without_ports(shared_org.api.backend, instance["id"])

    response = client.delete(f"/v1/networks/{network['id']}")

    error = assert_error(response, 409, "conflict")
    assert error["details"]["instances"] == [instance["id"]]


def set_building_without_ports(backend: Backend, instance_id: str) -> None:
    async def change(db: Database) -> None:
        async with db.transaction() as conn:
            key = uuid.UUID(instance_id)
            await conn.execute(delete(ports).where(ports.c.instance_id == key))
            await conn.execute(
                update(instances).where(instances.c.id == key).values(status="BUILD")
            )

    backend.run(change)


# --- isolation ------------------------------------------------------------------------


def test_other_organization_sees_nothing(client: httpx.Client, other_org: Org) -> None:
    network = create_network(client, "10.10.0.0/24")
    path = f"/v1/networks/{network['id']}"
    unknown = str(uuid.uuid4())

    with other_org.client() as other:
        shown = other.get(path)
        shown_unknown = other.get(f"/v1/networks/{unknown}")
        deleted = other.delete(path)
        names = [item["name"] for item in list_all(other)]
        marker = other.get("/v1/networks", params={"marker": network["id"]})

    error = assert_error(shown, 404, "not_found")
    unknown_error = assert_error(shown_unknown, 404, "not_found")
    assert error["message"] == unknown_error["message"].replace(unknown, network["id"])
    assert_error(deleted, 404, "not_found")
    assert names == ["private-network"]
    marker_error = assert_error(marker, 400, "invalid_parameter")
    assert marker_error["message"] == f"marker {network['id']} not found"
    assert client.get(path).json() == network


# --- list -----------------------------------------------------------------------------


def test_list_pagination(org: Org) -> None:
    with org.client() as client:
        created = [
            create_network(client, f"10.{index}.0.0/24", f"net-{index}") for index in range(4)
        ]
        everything = client.get("/v1/networks").json()
        first = client.get("/v1/networks", params={"limit": "2"}).json()
        second = client.get(first["links"]["next"]).json()
        third = client.get(second["links"]["next"]).json()
        back = client.get(third["links"]["previous"]).json()

    ids = [network["id"] for network in everything["networks"]]
    assert ids[:4] == [network["id"] for network in reversed(created)]
    assert everything["networks"][4]["name"] == "private-network"
    assert everything["meta"] == {"total": 5, "limit": 20, "marker": ids[-1], "has_more": False}
    assert [network["id"] for network in first["networks"]] == ids[:2]
    assert [network["id"] for network in second["networks"]] == ids[2:4]
    assert [network["id"] for network in third["networks"]] == ids[4:]
    assert first["meta"] == {"total": 5, "limit": 2, "marker": ids[1], "has_more": True}
    assert third["links"]["next"] is None
    assert first["links"]["previous"] is None
    assert query_of(second["links"]["previous"]) == {"limit": ["2"]}
    assert query_of(third["links"]["previous"]) == {"limit": ["2"], "marker": [ids[1]]}
    assert back["networks"] == second["networks"]


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("marker=x", "marker"),
        (f"marker={uuid.UUID(int=2)}", "marker"),
        ("cidr=10.0.0.0/8", "cidr"),
    ],
)
def test_list_rejects_query(client: httpx.Client, query: str, parameter: str) -> None:
    error = assert_error(client.get(f"/v1/networks?{query}"), 400, "invalid_parameter")
    assert error["details"]["parameter"] == parameter


# --- an instance with everything ------------------------------------------------------


def test_instance_on_two_networks_with_keys_and_groups(org: Org) -> None:
    public_key = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        .decode()
    )
    ssh = {
        "direction": "ingress",
        "protocol": "tcp",
        "port_range_min": 22,
        "port_range_max": 22,
        "remote_ip_prefix": "0.0.0.0/0",
    }
    with org.client() as client:
        v4 = create_network(client, "10.20.0.0/24", "backend-v4")
        v6 = create_network(client, "fd00:20::/64", "backend-v6")
        assert (
            client.post(
                "/v1/keypairs", json={"name": "deploy", "public_key": public_key}
            ).status_code
            == 201
        )
        for name, rules in (("web", [ssh]), ("db", [])):
            created = client.post("/v1/security-groups", json={"name": name, "rules": rules})
            assert created.status_code == 201, created.text

        fields = {
            "networks": [v4["id"], v6["id"]],
            "key_names": ["deploy"],
            "security_groups": ["web", "db"],
            "description": "everything",
            "metadata": {"role": "db"},
            "tags": ["e2e"],
        }
        accepted = create_instance(client, "full-instance", **fields)
        neighbour = create_instance(client, "neighbour", networks=[v4["id"]])
        active = wait_for(client, accepted["id"], status="ACTIVE")
        neighbour_active = wait_for(client, neighbour["id"], status="ACTIVE")
        network_delete = client.delete(f"/v1/networks/{v6['id']}")
        web_id = [
            group["id"]
            for group in client.get("/v1/security-groups").json()["security_groups"]
            if group["name"] == "web"
        ][0]
        group_delete = client.delete(f"/v1/security-groups/{web_id}")

    assert active["status"] == "ACTIVE"
    assert active["vm_state"] == "ACTIVE"
    assert active["power_state"] == "RUNNING"
    assert active["task_state"] is None
    assert active["fault"] is None
    assert TIMESTAMP.match(active["launched_at"])
    assert active["terminated_at"] is None
    assert active["key_names"] == ["deploy"]
    assert active["security_groups"] == [{"name": "web"}, {"name": "db"}]
    assert active["description"] == "everything"
    assert active["metadata"] == {"role": "db"}
    assert active["tags"] == ["e2e"]
    assert list(active["addresses"]) == ["backend-v4", "backend-v6"]

    (address_v4,) = active["addresses"]["backend-v4"]
    (address_v6,) = active["addresses"]["backend-v6"]
    assert address_v4["version"] == 4
    assert address_v6["version"] == 6
    assert ipaddress.ip_address(address_v4["addr"]) in ipaddress.ip_network(v4["cidr"])
    assert ipaddress.ip_address(address_v6["addr"]) in ipaddress.ip_network(v6["cidr"])
    for address in (address_v4, address_v6):
        assert address["type"] == "fixed"
        assert MAC.match(address["mac_addr"]), address["mac_addr"]
    assert address_v4["mac_addr"] != address_v6["mac_addr"]

    (neighbour_v4,) = neighbour_active["addresses"]["backend-v4"]
    assert neighbour_v4["addr"] != address_v4["addr"]
    assert ipaddress.ip_address(neighbour_v4["addr"]) in ipaddress.ip_network(v4["cidr"])

    assert_error(network_delete, 409, "conflict")
    assert_error(group_delete, 409, "conflict")


def test_delete_races_instance_create(org: Org) -> None:
    """A network delete and an instance create on the network never both succeed."""
    outcomes = []
    with org.client() as client, ThreadPoolExecutor(max_workers=2) as pool:
        for index in range(8):
            network = create_network(client, f"10.30.{index}.0/24")
            body = {
                "name": "racer",
                "flavor_id": SMALL_FLAVOR,
                "image_id": UBUNTU_IMAGE,
                "networks": [network["id"]],
            }
            created = pool.submit(client.post, "/v1/instances", json=body)
            deleted = pool.submit(client.delete, f"/v1/networks/{network['id']}")
            outcomes.append((created.result().status_code, deleted.result().status_code))

    for outcome in outcomes:
        assert outcome in [(202, 409), (400, 204)], outcomes
