"""Tenant isolation as a property: another organization's ids are unknown ids.

Organization B owns one resource of every kind. For every operation of the live
OpenAPI document, hypothesis draws a place for one of B's ids or names: a path
parameter, a pagination marker, a list filter, a reference in a request body, or the
name of a new resource. Organization A sends the request twice, once with B's value
and once with a value that exists nowhere. The two answers must be the same:
status, the headers that matter and the body byte for byte once both values, request
ids, new ids and timestamps are replaced by placeholders. No answer to A may contain
any other of B's ids or names, and B's resources must be as they were.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Org, make_org
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import MEDIUM_FLAVOR, SMALL_FLAVOR, UBUNTU_IMAGE, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES_PER_OPERATION = 8
# Headers whose value must be the same for both requests; any other header must at
# least be present in both.
COMPARED_HEADERS = ("content-type", "location", "allow", "www-authenticate", "retry-after")
VARYING_HEADERS = {"date", "x-request-id", "content-length"}

UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
REQUEST_ID_PATTERN = re.compile(r"req-" + UUID_PATTERN.pattern)
TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
RULE = {"direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
        "remote_ip_prefix": "10.0.0.0/8"}


def _public_key() -> str:
    key = Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@dataclass
class World:
    """Organizations A (the caller) and B (the victim) and the values of each."""

    a: Org
    b: Org
    # A's own resources, used where an operation needs a valid id besides B's one.
    a_ids: dict[str, str]
    # B's values by kind: "id" (every id B owns), "name" (names of B's resources),
    # "tag", and "flavor" (a private flavor no tenant may see).
    b_values: dict[str, list[str]]
    b_snapshot: dict[str, Any] = field(default_factory=dict)
    # One client per organization and token for the whole module: a new client per
    # request costs more than the request.
    clients: dict[tuple[str, str], httpx.Client] = field(default_factory=dict)

    def client(self, org: Org, scopes: str) -> httpx.Client:
        key = (org.name, scopes)
        if key not in self.clients:
            self.clients[key] = org.client(scopes)
        return self.clients[key]

    @property
    def every_b_value(self) -> set[str]:
        return {value for values in self.b_values.values() for value in values}


def _create(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code in (201, 202), response.text
    return response.json()  # type: ignore[no-any-return]


def _populate_b(b: Org, suffix: str) -> tuple[dict[str, list[str]], str]:
    with b.client() as client:
        network = _create(client, "/v1/networks", {"name": f"b-net-{suffix}", "cidr": "10.20.0.0/24"})
        key = _create(client, "/v1/keypairs", {"name": f"b-key-{suffix}", "public_key": _public_key()})
        group = _create(client, "/v1/security-groups",
                        {"name": f"b-sg-{suffix}", "description": "b", "rules": [RULE]})
        spare = _create(client, "/v1/volumes", {"name": f"b-vol-{suffix}", "size_gb": 1})
        attached = _create(client, "/v1/volumes", {"name": f"b-att-{suffix}", "size_gb": 1})
        instance = _create(client, "/v1/instances", {
            "name": f"b-vm-{suffix}", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE,
            "networks": [network["id"]], "key_names": [key["name"]],
            "security_groups": [group["name"]], "volumes": [{"volume_id": attached["id"]}],
            "tags": [f"b-tag-{suffix}"], "metadata": {"owner": f"b-meta-{suffix}"},
        })
        # Deleted instances and volumes keep their rows, and stay valid markers for B.
        gone = _create(client, "/v1/instances", {
            "name": f"b-gone-{suffix}", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE})
        gone_volume = _create(client, "/v1/volumes", {"name": f"b-gone-vol-{suffix}", "size_gb": 1})
        assert client.delete(f"/v1/volumes/{gone_volume['id']}").status_code == 204
        wait_for(client, gone["id"], status="ACTIVE")
        assert client.delete(f"/v1/instances/{gone['id']}").status_code == 202
        wait_for(client, gone["id"], status="DELETED")
        wait_for(client, instance["id"], status="ACTIVE")
        actions = client.get(f"/v1/instances/{instance['id']}/actions").json()["actions"]
        groups = client.get("/v1/security-groups", params={"limit": 1000}).json()["security_groups"]
        networks = client.get("/v1/networks", params={"limit": 1000}).json()["networks"]
    ids = [network["id"], group["id"], group["rules"][0]["id"], spare["id"], attached["id"],
           instance["id"], gone["id"], gone_volume["id"], *[action["id"] for action in actions],
           *[item["id"] for item in groups], *[item["id"] for item in networks]]
    names = [network["name"], key["name"], group["name"], spare["name"], attached["name"],
             instance["name"], gone["name"]]
    values = {"id": sorted(set(ids)), "name": names, "tag": [f"b-tag-{suffix}"]}
    return values, instance["id"]


def snapshot_b(world: World) -> dict[str, Any]:
    """Read all of B's resources with B's own token."""
    state: dict[str, Any] = {}
    client = world.client(world.b, "rw")
    for path in ("/v1/instances", "/v1/volumes", "/v1/networks", "/v1/keypairs",
                 "/v1/security-groups"):
        response = client.get(path, params={"limit": 1000})
        assert response.status_code == 200, response.text
        body = response.json()
        body.pop("links")
        state[path] = body
    for instance in state["/v1/instances"]["instances"]:
        actions = client.get(f"/v1/instances/{instance['id']}/actions", params={"limit": 1000})
        state[instance["id"]] = actions.json()["actions"]
    return state


@pytest.fixture(scope="module")
def world(api: ApiServer) -> Iterator[World]:
    suffix = uuid.uuid4().hex[:8]
    a = make_org(api, "iso-a")
    b = make_org(api, "iso-b")
    b_values, _ = _populate_b(b, suffix)
    with a.client("admin") as admin:
        flavor = _create(admin, "/v1/flavors", {"name": f"private-{suffix}", "vcpus": 1,
                                                "ram": 512, "disk": 10, "is_public": False})
    b_values["flavor"] = [flavor["id"]]
    with a.client() as client:
        instance = _create(client, "/v1/instances",
                           {"name": f"a-vm-{suffix}", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE})
        group = _create(client, "/v1/security-groups", {"name": f"a-sg-{suffix}", "rules": [RULE]})
        wait_for(client, instance["id"], status="ACTIVE")
    a_ids = {"instance_id": instance["id"], "security_group_id": group["id"],
             "rule_id": group["rules"][0]["id"]}
    world = World(a, b, a_ids, b_values)
    world.b_snapshot = snapshot_b(world)
    yield world
    for client in world.clients.values():
        client.close()


# --- requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One request of organization A."""

    method: str
    path: str
    token: str
    params: dict[str, str] = field(default_factory=dict)
    body: Any = None
    # Created resources to delete after the comparison (the create-by-name slots).
    creates: bool = False


def unknown_like(value: str) -> str:
    """Return a value of the same shape as ``value`` that names nothing anywhere."""
    if UUID_PATTERN.fullmatch(value):
        return str(uuid.uuid4())
    fresh = uuid.uuid4().hex
    prefix = value.rsplit("-", 1)[0]
    return f"{prefix}-{fresh[: len(value) - len(prefix) - 1]}"


Build = Callable[[World, str], Attempt]


@dataclass(frozen=True)
class Slot:
    """A place for one of B's values in a request of one operation."""

    label: str
    kinds: tuple[str, ...]
    build: Build


def _fill(template: str, world: World, param: str | None, value: str) -> str:
    names = re.findall(r"\{(\w+)\}", template)
    filled = template
    for name in names:
        filled = filled.replace("{" + name + "}", value if name == param else world.a_ids[name])
    return filled


def _token(method: str, path: str) -> str:
    if path.startswith(("/v1/hosts", "/v1/flavors", "/v1/images")) and method != "GET":
        return "admin"
    return "admin" if path.startswith("/v1/hosts") else "rw"


# Valid bodies for operations that need one, so that only the slot can go wrong.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/v1/instances/{instance_id}"): {"name": "renamed"},
    ("POST", "/v1/security-groups/{security_group_id}/rules"): dict(RULE),
    ("POST", "/v1/instances/{instance_id}/actions/reboot"): {"type": "HARD"},
    ("POST", "/v1/instances/{instance_id}/actions/resize"): {"flavor_id": MEDIUM_FLAVOR},
}


def path_slots(method: str, template: str) -> list[Slot]:
    """One slot per path parameter; the other parameters get A's own ids."""
    slots = []
    for param in re.findall(r"\{(\w+)\}", template):
        kinds = ("name",) if param == "keypair_name" else ("id",)
        if param == "flavor_id" and method == "GET":
            kinds = ("id", "flavor")

        def build(world: World, value: str, param: str = param) -> Attempt:
            return Attempt(method, _fill(template, world, param, value), _token(method, template),
                           body=BODIES.get((method, template)))

        slots.append(Slot(f"path {param}", kinds, build))
    return slots


def query_slot(method: str, template: str, name: str, kinds: tuple[str, ...]) -> Slot:
    def build(world: World, value: str) -> Attempt:
        return Attempt(method, _fill(template, world, None, ""), _token(method, template),
                       params={name: value})

    return Slot(f"query {name}", kinds, build)


def body_slot(method: str, template: str, label: str, kinds: tuple[str, ...],
              make: Callable[[str], dict[str, Any]], *, creates: bool = False) -> Slot:
    def build(world: World, value: str) -> Attempt:
        return Attempt(method, _fill(template, world, None, ""), _token(method, template),
                       body=make(value), creates=creates)

    return Slot(f"body {label}", kinds, build)


def _instance(**fields: Any) -> dict[str, Any]:
    return {"name": "a-probe", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}


# Slots beyond the path parameters and the marker, by operation.
EXTRA_SLOTS: dict[tuple[str, str], list[Slot]] = {
    ("GET", "/v1/instances"): [
        query_slot("GET", "/v1/instances", "flavor_id", ("id", "flavor")),
        query_slot("GET", "/v1/instances", "image_id", ("id",)),
        query_slot("GET", "/v1/instances", "name", ("name",)),
        query_slot("GET", "/v1/instances", "tags", ("tag",)),
    ],
    ("POST", "/v1/instances"): [
        body_slot("POST", "/v1/instances", "networks", ("id",), lambda v: _instance(networks=[v])),
        body_slot("POST", "/v1/instances", "key_names", ("name",), lambda v: _instance(key_names=[v])),
        body_slot("POST", "/v1/instances", "security_groups", ("name",),
                  lambda v: _instance(security_groups=[v])),
        body_slot("POST", "/v1/instances", "volumes", ("id",),
                  lambda v: _instance(volumes=[{"volume_id": v}])),
        body_slot("POST", "/v1/instances", "flavor_id", ("id", "flavor"),
                  lambda v: _instance(flavor_id=v)),
        body_slot("POST", "/v1/instances", "image_id", ("id",), lambda v: _instance(image_id=v)),
    ],
    ("POST", "/v1/instances/{instance_id}/actions/resize"): [
        body_slot("POST", "/v1/instances/{instance_id}/actions/resize", "flavor_id",
                  ("id", "flavor"), lambda v: {"flavor_id": v}),
    ],
    ("POST", "/v1/networks"): [
        body_slot("POST", "/v1/networks", "name", ("name",),
                  lambda v: {"name": v, "cidr": "10.20.0.0/24"}, creates=True),
    ],
    ("POST", "/v1/keypairs"): [
        body_slot("POST", "/v1/keypairs", "name", ("name",),
                  lambda v: {"name": v, "public_key": SHARED_KEY}, creates=True),
    ],
    ("POST", "/v1/security-groups"): [
        body_slot("POST", "/v1/security-groups", "name", ("name",),
                  lambda v: {"name": v, "rules": [RULE]}, creates=True),
    ],
    ("POST", "/v1/volumes"): [
        body_slot("POST", "/v1/volumes", "name", ("name",),
                  lambda v: {"name": v, "size_gb": 1}, creates=True),
    ],
    # The catalog is global, so no organization's id has a place in these bodies. A
    # body that is rejected must still not depend on whose id it carries.
    ("POST", "/v1/flavors"): [
        body_slot("POST", "/v1/flavors", "name", ("id", "name"), lambda v: {"name": v, "vcpus": 0}),
    ],
    ("POST", "/v1/images"): [
        body_slot("POST", "/v1/images", "name", ("id", "name"), lambda v: {"name": v, "min_disk": -1}),
    ],
}
SHARED_KEY = _public_key()

# Operations without input: their responses must never contain B's values.
NO_INPUT = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}


def slots_of(method: str, template: str, is_list: bool) -> list[Slot]:
    slots = [*path_slots(method, template), *EXTRA_SLOTS.get((method, template), [])]
    if is_list:
        kinds = ("name", "id") if template == "/v1/keypairs" else ("id", "name")
        slots.append(query_slot(method, template, "marker", kinds))
    return slots


_documents: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}


def document_operations(api: ApiServer) -> dict[tuple[str, str], dict[str, Any]]:
    """Return the operations of the server's OpenAPI document by (method, path)."""
    if api.base_url not in _documents:
        _documents[api.base_url] = _read_operations(api)
    return _documents[api.base_url]


def _read_operations(api: ApiServer) -> dict[tuple[str, str], dict[str, Any]]:
    document = httpx.get(f"{api.base_url}/openapi.json", timeout=30).json()
    return {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _is_list(operation: dict[str, Any]) -> bool:
    return any(param["name"] == "marker" for param in operation.get("parameters", []))


# Every operation this file has slots for, so a new endpoint in the document fails
# the coverage test until it gets its slots here.
KNOWN_OPERATIONS = {
    ("GET", "/v1/instances"), ("POST", "/v1/instances"),
    ("GET", "/v1/instances/{instance_id}"), ("PATCH", "/v1/instances/{instance_id}"),
    ("DELETE", "/v1/instances/{instance_id}"),
    ("GET", "/v1/instances/{instance_id}/actions"),
    *{("POST", f"/v1/instances/{{instance_id}}/actions/{action}") for action in (
        "start", "stop", "reboot", "resize", "confirm-resize", "revert-resize")},
    ("GET", "/v1/flavors"), ("POST", "/v1/flavors"),
    ("GET", "/v1/flavors/{flavor_id}"), ("DELETE", "/v1/flavors/{flavor_id}"),
    ("GET", "/v1/images"), ("POST", "/v1/images"),
    ("GET", "/v1/images/{image_id}"), ("DELETE", "/v1/images/{image_id}"),
    ("GET", "/v1/hosts"), ("GET", "/v1/hosts/{host_id}"),
    ("GET", "/v1/volumes"), ("POST", "/v1/volumes"),
    ("GET", "/v1/volumes/{volume_id}"), ("DELETE", "/v1/volumes/{volume_id}"),
    ("GET", "/v1/keypairs"), ("POST", "/v1/keypairs"),
    ("GET", "/v1/keypairs/{keypair_name}"), ("DELETE", "/v1/keypairs/{keypair_name}"),
    ("GET", "/v1/security-groups"), ("POST", "/v1/security-groups"),
    ("GET", "/v1/security-groups/{security_group_id}"),
    ("DELETE", "/v1/security-groups/{security_group_id}"),
    ("POST", "/v1/security-groups/{security_group_id}/rules"),
    ("DELETE", "/v1/security-groups/{security_group_id}/rules/{rule_id}"),
    ("GET", "/v1/networks"), ("POST", "/v1/networks"),
    ("GET", "/v1/networks/{network_id}"), ("DELETE", "/v1/networks/{network_id}"),
    *NO_INPUT,
}


# --- comparison ---------------------------------------------------------------------


def normalize(text: str, value: str, stable_ids: set[str]) -> str:
    """Replace the value sent, request ids, new ids and timestamps with placeholders."""
    text = REQUEST_ID_PATTERN.sub("<request-id>", text)
    text = text.replace(value, "<value>")
    text = UUID_PATTERN.sub(
        lambda match: match.group(0) if match.group(0) in stable_ids else "<new-id>", text
    )
    return TIMESTAMP_PATTERN.sub("<time>", text)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    header_names: frozenset[str]
    body: str


def send(world: World, attempt: Attempt, value: str, stable_ids: set[str]) -> Answer:
    client = world.client(world.a, attempt.token)
    response = client.request(
        attempt.method, attempt.path, params=attempt.params or None, json=attempt.body
    )
    raw_body = response.text
    if attempt.creates and response.status_code == 201:
        deleted = client.delete(response.headers["location"])
        assert deleted.status_code == 204, deleted.text

    leaked = {other for other in world.every_b_value if other != value and other in raw_body}
    assert not leaked, f"{attempt} shows B's values {leaked}: {raw_body[:500]}"
    headers = {
        name: normalize(response.headers[name], value, stable_ids)
        for name in COMPARED_HEADERS if name in response.headers
    }
    names = frozenset(response.headers.keys()) - VARYING_HEADERS
    return Answer(response.status_code, headers, names, normalize(raw_body, value, stable_ids))


def _stable_ids(world: World) -> set[str]:
    catalog = {SMALL_FLAVOR, MEDIUM_FLAVOR, UBUNTU_IMAGE}
    return {*world.a_ids.values(), *catalog}


def operations_under_test() -> Iterator[tuple[str, str]]:
    yield from sorted(KNOWN_OPERATIONS - NO_INPUT)


# --- the properties -----------------------------------------------------------------


def test_every_operation_covered(api: ApiServer) -> None:
    """A new operation in the OpenAPI document fails here until it gets its slots."""
    assert set(document_operations(api)) == KNOWN_OPERATIONS


@pytest.mark.parametrize("operation", list(operations_under_test()), ids=" ".join)
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_foreign_id_same_as_unknown(
    world: World, api: ApiServer, operation: tuple[str, str], data: st.DataObject
) -> None:
    method, template = operation
    described = document_operations(api)[operation]
    slots = slots_of(method, template, _is_list(described))
    assert slots, f"{method} {template} has no place for another organization's value"

    slot = data.draw(st.sampled_from(slots), label="slot")
    kind = data.draw(st.sampled_from(slot.kinds), label="kind")
    foreign = data.draw(st.sampled_from(world.b_values[kind]), label="B's value")
    unknown = unknown_like(foreign)
    stable = _stable_ids(world)

    with_foreign = send(world, slot.build(world, foreign), foreign, stable)
    with_unknown = send(world, slot.build(world, unknown), unknown, stable)

    assert with_foreign.status == with_unknown.status, (with_foreign, with_unknown)
    assert with_foreign.headers == with_unknown.headers
    assert with_foreign.header_names == with_unknown.header_names
    assert with_foreign.body == with_unknown.body
    if method != "GET":
        assert snapshot_b(world) == world.b_snapshot


@pytest.mark.parametrize("operation", sorted(NO_INPUT), ids=" ".join)
def test_no_input_operation_hides_b(world: World, operation: tuple[str, str]) -> None:
    method, path = operation
    with world.a.client() as client:
        response = client.request(method, path)
    assert response.status_code == 200, response.text
    leaked = {value for value in world.every_b_value if value in response.text}
    assert not leaked


def test_b_unchanged_at_end(world: World) -> None:
    """Every attempt of A above left B's resources exactly as they were."""
    assert snapshot_b(world) == world.b_snapshot


def test_resize_to_private_flavor_hidden(world: World) -> None:
    """A resize to a private flavor named the flavor and its disk size to any tenant."""
    private = world.b_values["flavor"][0]
    path = f"/v1/instances/{world.a_ids['instance_id']}/actions/resize"
    with world.a.client() as client:
        hidden = client.post(path, json={"flavor_id": private})
        unknown_id = str(uuid.uuid4())
        unknown = client.post(path, json={"flavor_id": unknown_id})
    assert hidden.status_code == 400, hidden.text
    assert hidden.json()["error"]["message"] == f"flavor {private} not found"
    assert unknown.json()["error"]["message"] == f"flavor {unknown_id} not found"
