"""POST, GET, PATCH and DELETE on /v1/instances (the list endpoint has its own module).

The lifecycle worker may move an instance on while a test runs, so after the create
response the tests look only at fields that no worker step changes.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org
from helpers import (
    CIRROS_IMAGE,
    SMALL_FLAVOR,
    TINY_FLAVOR,
    UBUNTU_IMAGE,
    assert_error,
    create_instance,
)
from sqlalchemy import select

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import instances, networks, organizations

INSTANCE_FIELDS = [
    "id", "crn", "name", "description", "status", "power_state", "task_state", "vm_state",
    "flavor", "image", "addresses", "security_groups", "volumes_attached", "key_names",
    "metadata", "tags", "fault", "created_at", "updated_at", "launched_at", "terminated_at",
]
# Fields that no lifecycle step changes, so GET must return them as POST did.
STABLE_FIELDS = [
    "id", "crn", "name", "description", "flavor", "image", "security_groups", "key_names",
    "metadata", "tags", "created_at",
]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
SMALL_FLAVOR_VALUES = {"id": SMALL_FLAVOR, "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20}


def body(**fields: Any) -> dict[str, Any]:
    return {"name": "web-1", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}


def parameter_root(error: dict[str, Any]) -> str | None:
    """Return the top-level field named in ``details.parameter`` (``tags[0]`` -> ``tags``)."""
    parameter = (error.get("details") or {}).get("parameter")
    return re.split(r"[\[.]", parameter, maxsplit=1)[0] if parameter else None


def assert_rejected(response: httpx.Response, field: str) -> dict[str, Any]:
    """Check a 400 envelope whose details or message name ``field``."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["type"] in ("invalid_parameter", "invalid_request")
    named = parameter_root(error) == field or field in error["message"]
    assert named, f"the error does not name {field!r}: {error}"
    return error  # type: ignore[no-any-return]


def organization_network(backend: Backend, organization_name: str) -> str:
    """Return the id of an organization's default network, read from the database."""

    async def read(db: Database) -> str:
        async with db.snapshot() as conn:
            query = (
                select(networks.c.id)
                .join(organizations, organizations.c.id == networks.c.organization_id)
                .where(organizations.c.name == organization_name)
            )
            return str((await conn.execute(query)).scalar_one())

    return backend.run(read)  # type: ignore[no-any-return]


def insert_deleted_copy(backend: Backend, instance_id: str) -> str:
    """Insert a DELETED copy of an instance, with no task a worker could pick up."""

    async def copy(db: Database) -> str:
        async with db.transaction() as conn:
            query = select(instances).where(instances.c.id == uuid.UUID(instance_id))
            values = dict((await conn.execute(query)).one()._mapping)
            new_id = uuid.uuid4()
            now = utcnow()
            values.update(
                id=new_id, status="DELETED", vm_state="DELETED", task_state=None,
                power_state="NOSTATE", host_id=None, addresses={}, terminated_at=now,
                updated_at=now,
            )
            await conn.execute(instances.insert().values(**values))
            return str(new_id)

    return backend.run(copy)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    """An organization for tests that neither list nor count instances."""
    return make_org(api, "instances")


@pytest.fixture(scope="module")
def client(shared_org: Org) -> Iterator[httpx.Client]:
    with shared_org.client() as rw_client:
        yield rw_client


# --- create ---------------------------------------------------------------------------


def test_create_response(client: httpx.Client) -> None:
    before = datetime.now(UTC).replace(tzinfo=None)

    response = client.post("/v1/instances", json=body(name="web-server-01"))

    assert response.status_code == 202, response.text
    instance = response.json()
    assert list(instance) == INSTANCE_FIELDS
    assert response.headers["location"] == f"/v1/instances/{instance['id']}"
    assert str(uuid.UUID(instance["id"])) == instance["id"]
    assert instance["crn"] == f"crn:spo1:compute:instance:{instance['id']}"
    assert instance["name"] == "web-server-01"
    assert instance["description"] == ""
    assert instance["status"] == "BUILD"
    assert instance["vm_state"] == "BUILDING"
    assert instance["task_state"] == "SCHEDULING"
    assert instance["power_state"] == "NOSTATE"
    assert instance["flavor"] == SMALL_FLAVOR_VALUES
    assert instance["image"] == {"id": UBUNTU_IMAGE, "name": "Ubuntu 22.04 LTS"}
    assert instance["addresses"] == {}
    assert instance["security_groups"] == [{"name": "default"}]
    assert instance["volumes_attached"] == []
    assert instance["key_names"] == []
    assert instance["metadata"] == {}
    assert instance["tags"] == []
    assert instance["fault"] is None
    assert instance["launched_at"] is None
    assert instance["terminated_at"] is None
    created_at = datetime.strptime(instance["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert before - timedelta(seconds=2) <= created_at <= before + timedelta(minutes=1)


def test_create_timestamps_format(client: httpx.Client) -> None:
    instance = create_instance(client, "timestamps")

    assert TIMESTAMP.match(instance["created_at"]), instance["created_at"]
    assert TIMESTAMP.match(instance["updated_at"]), instance["updated_at"]
    assert instance["updated_at"] >= instance["created_at"]


def test_create_with_every_field(shared_org: Org, client: httpx.Client) -> None:
    network_id = organization_network(shared_org.api.backend, shared_org.name)
    fields = {
        "name": "db-primary",
        "description": "Primary database\nsecond line",
        "networks": [network_id],
        "security_groups": ["default"],
        "metadata": {"environment": "production", "team": "backend"},
        "tags": ["db", "production"],
    }

    instance = create_instance(client, **fields)

    assert instance["description"] == fields["description"]
    assert instance["security_groups"] == [{"name": "default"}]
    assert instance["metadata"] == fields["metadata"]
    assert instance["tags"] == fields["tags"]


def test_create_charset_parameter(client: httpx.Client) -> None:
    response = client.post(
        "/v1/instances",
        content=b'{"name": "charset", "flavor_id": "%s", "image_id": "%s"}'
        % (SMALL_FLAVOR.encode(), UBUNTU_IMAGE.encode()),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )

    assert response.status_code == 202, response.text


ACCEPTED = [
    pytest.param({"name": "x" * 255}, id="name-255"),
    pytest.param({"name": "wéb server ü 01"}, id="name-unicode-inner-space"),
    pytest.param({"description": "d" * 1024}, id="description-1024"),
    pytest.param({"metadata": {f"key-{n}": "v" for n in range(128)}}, id="metadata-128"),
    pytest.param({"metadata": {"k" * 255: "v" * 255}}, id="metadata-255"),
    pytest.param({"metadata": {"empty": ""}}, id="metadata-empty-value"),
    pytest.param({"tags": [f"{n:02d}" + "t" * 58 for n in range(50)]}, id="tags-50-of-60"),
    pytest.param({"tags": ["web", "Web"]}, id="tags-case-sensitive"),
    pytest.param({"image_id": CIRROS_IMAGE, "flavor_id": TINY_FLAVOR}, id="tiny-cirros"),
]


@pytest.mark.parametrize("fields", ACCEPTED)
def test_create_accepts(client: httpx.Client, fields: dict[str, Any]) -> None:
    response = client.post("/v1/instances", json=body(**fields))

    assert response.status_code == 202, response.text
    instance = response.json()
    for key in ("name", "description", "metadata", "tags"):
        if key in fields:
            assert instance[key] == fields[key]


NAME_CASES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\x7fb", id="delete"),
    pytest.param(" web", id="leading-space"),
    pytest.param("web ", id="trailing-space"),
    pytest.param("\tweb", id="leading-tab"),
    pytest.param(12, id="number"),
    pytest.param(None, id="null"),
]
DESCRIPTION_CASES = [
    pytest.param("d" * 1025, id="too-long"),
    pytest.param("a\x00b", id="nul"),
    pytest.param(["a"], id="list"),
]
METADATA_CASES = [
    pytest.param({f"key-{n}": "v" for n in range(129)}, id="129-pairs"),
    pytest.param({"": "v"}, id="empty-key"),
    pytest.param({"k" * 256: "v"}, id="key-too-long"),
    pytest.param({"k": "v" * 256}, id="value-too-long"),
    pytest.param({"k": 1}, id="number-value"),
    pytest.param({"k\x00": "v"}, id="nul-key"),
    pytest.param(["k"], id="list"),
]
TAG_CASES = [
    pytest.param([f"tag-{n}" for n in range(51)], id="51-tags"),
    pytest.param([""], id="empty"),
    pytest.param(["t" * 61], id="too-long"),
    pytest.param(["a,b"], id="comma"),
    pytest.param(["a/b"], id="slash"),
    pytest.param([" web"], id="leading-space"),
    pytest.param(["web "], id="trailing-space"),
    pytest.param(["web", "web"], id="duplicate"),
    pytest.param(["a\x00"], id="nul"),
    pytest.param([1], id="number"),
    pytest.param("web", id="string"),
]


@pytest.mark.parametrize("value", NAME_CASES)
def test_create_rejects_name(client: httpx.Client, value: Any) -> None:
    assert_rejected(client.post("/v1/instances", json=body(name=value)), "name")


@pytest.mark.parametrize("value", DESCRIPTION_CASES)
def test_create_rejects_description(client: httpx.Client, value: Any) -> None:
    assert_rejected(client.post("/v1/instances", json=body(description=value)), "description")


@pytest.mark.parametrize("value", METADATA_CASES)
def test_create_rejects_metadata(client: httpx.Client, value: Any) -> None:
    assert_rejected(client.post("/v1/instances", json=body(metadata=value)), "metadata")


@pytest.mark.parametrize("value", TAG_CASES)
def test_create_rejects_tags(client: httpx.Client, value: Any) -> None:
    assert_rejected(client.post("/v1/instances", json=body(tags=value)), "tags")


REFERENCE_CASES = [
    pytest.param({"flavor_id": str(uuid.UUID(int=1))}, "flavor_id", id="unknown-flavor"),
    pytest.param({"flavor_id": "m1.small"}, "flavor_id", id="flavor-not-uuid"),
    pytest.param({"image_id": str(uuid.UUID(int=2))}, "image_id", id="unknown-image"),
    pytest.param({"image_id": 5}, "image_id", id="image-number"),
    pytest.param({"networks": [str(uuid.UUID(int=3))]}, "networks", id="unknown-network"),
    pytest.param({"networks": ["private-network"]}, "networks", id="network-not-uuid"),
    pytest.param({"networks": []}, "networks", id="no-network"),
    pytest.param({"security_groups": ["web"]}, "security_groups", id="unknown-group"),
    pytest.param({"security_groups": ["default", "default"]}, "security_groups", id="group-twice"),
    pytest.param({"key_names": ["my-keypair"]}, "key_names", id="unknown-key-pair"),
    pytest.param({"color": "blue"}, "color", id="unknown-field"),
    pytest.param({"flavor_id": TINY_FLAVOR}, "flavor_id", id="disk-below-min-disk"),
]


@pytest.mark.parametrize(("fields", "field"), REFERENCE_CASES)
def test_create_rejects_reference(client: httpx.Client, fields: dict[str, Any], field: str) -> None:
    assert_rejected(client.post("/v1/instances", json=body(**fields)), field)


def test_create_unknown_flavor_message(client: httpx.Client) -> None:
    flavor_id = str(uuid.UUID(int=1))

    response = client.post("/v1/instances", json=body(flavor_id=flavor_id))

    error = assert_rejected(response, "flavor_id")

    assert error["type"] == "invalid_parameter"
    assert error["details"] == {"parameter": "flavor_id", "value": flavor_id}
    assert error["message"] == f"flavor {flavor_id} not found"


@pytest.mark.parametrize(
    ("fields", "parameter"),
    [({"name": ""}, "name"), ({"tags": ["t" * 61]}, "tags[0]"), ({"image_id": "x"}, "image_id")],
)
def test_create_body_error_details(
    client: httpx.Client, fields: dict[str, Any], parameter: str
) -> None:
    # Errors found while decoding the body name the field like the later checks do.
    response = client.post("/v1/instances", json=body(**fields))

    error = assert_error(response, 400, "invalid_request")
    assert error["details"] == {"parameter": parameter}


@pytest.mark.parametrize("field", ["name", "flavor_id", "image_id"])
def test_create_missing_field(client: httpx.Client, field: str) -> None:
    fields = body()
    del fields[field]

    assert_rejected(client.post("/v1/instances", json=fields), field)


@pytest.fixture(scope="module")
def low_ram_flavor(shared_org: Org) -> Iterator[str]:
    """A flavor with enough disk for Ubuntu 22.04 (10 GiB) but less than its 512 MiB RAM."""
    with shared_org.client("admin") as admin:
        response = admin.post(
            "/v1/flavors",
            json={"name": f"low-ram-{uuid.uuid4().hex[:8]}", "vcpus": 1, "ram": 256, "disk": 20},
        )
        assert response.status_code == 201, response.text
        yield response.json()["id"]
        admin.delete(f"/v1/flavors/{response.json()['id']}")


def test_create_rejects_ram_below_min_ram(client: httpx.Client, low_ram_flavor: str) -> None:
    response = client.post("/v1/instances", json=body(flavor_id=low_ram_flavor))

    error = assert_rejected(response, "flavor_id")
    assert "RAM" in error["message"]


def test_create_rejects_disk_below_min_disk(client: httpx.Client) -> None:
    response = client.post("/v1/instances", json=body(flavor_id=TINY_FLAVOR))

    error = assert_rejected(response, "flavor_id")
    assert "disk" in error["message"]


def test_create_rejects_other_org_network(shared_org: Org, client: httpx.Client) -> None:
    stranger = make_org(shared_org.api, "stranger")
    foreign_network = organization_network(shared_org.api.backend, stranger.name)

    response = client.post("/v1/instances", json=body(networks=[foreign_network]))

    error = assert_rejected(response, "networks")
    assert error["message"] == f"network {foreign_network} not found"


def test_create_rejects_c1_control_in_name(client: httpx.Client) -> None:
    assert_rejected(client.post("/v1/instances", json=body(name="web\u0085one")), "name")


def test_create_nul_in_security_group(client: httpx.Client) -> None:
    """A NUL reached PostgreSQL in the group lookup and failed the query with a 500."""
    response = client.post("/v1/instances", json=body(security_groups=["de\x00fault"]))
    assert_rejected(response, "security_groups")


def test_create_nul_in_key_name(client: httpx.Client) -> None:
    response = client.post("/v1/instances", json=body(key_names=["my\x00key"]))
    assert_rejected(response, "key_names")


# --- show -----------------------------------------------------------------------------


def test_show_returns_created_values(client: httpx.Client) -> None:
    created = create_instance(
        client, "show-me", description="about", metadata={"a": "1"}, tags=["x", "y"]
    )

    response = client.get(f"/v1/instances/{created['id']}")

    assert response.status_code == 200, response.text
    shown = response.json()
    assert list(shown) == INSTANCE_FIELDS
    for field in STABLE_FIELDS:
        assert shown[field] == created[field], field


@pytest.mark.parametrize(
    "instance_id", [str(uuid.UUID(int=11)), "not-a-uuid", "1234", str(uuid.UUID(int=11)) + "0"]
)
def test_show_unknown(client: httpx.Client, instance_id: str) -> None:
    error = assert_error(client.get(f"/v1/instances/{instance_id}"), 404, "not_found")

    assert error["message"] == f"instance {instance_id} not found"
    assert error["details"] is None


@pytest.mark.parametrize("instance_id", ["x" * 5000, "a%00b", "a%0Ab"])
def test_show_garbage_id(client: httpx.Client, instance_id: str) -> None:
    """Long or unprintable path text is not echoed back in the 404 message."""
    error = assert_error(client.get(f"/v1/instances/{instance_id}"), 404, "not_found")

    assert error["message"] == "instance not found; ids are UUIDs"
    assert error["details"] is None


def test_show_deleted(shared_org: Org, client: httpx.Client) -> None:
    deleted_id = insert_deleted_copy(shared_org.api.backend, create_instance(client, "gone")["id"])

    error = assert_error(client.get(f"/v1/instances/{deleted_id}"), 404, "not_found")

    assert error["message"] == f"instance {deleted_id} not found"


# --- update ---------------------------------------------------------------------------


def test_update_replaces_fields(client: httpx.Client) -> None:
    created = create_instance(
        client, "before", description="old", metadata={"a": "1", "b": "2"}, tags=["x", "y"]
    )
    changes = {"name": "after", "description": "new", "metadata": {"c": "3"}, "tags": ["z"]}

    response = client.patch(f"/v1/instances/{created['id']}", json=changes)
    shown = client.get(f"/v1/instances/{created['id']}").json()

    assert response.status_code == 200, response.text
    updated = response.json()
    assert list(updated) == INSTANCE_FIELDS
    for key, value in changes.items():
        assert updated[key] == value, key
        assert shown[key] == value, key
    assert updated["flavor"] == created["flavor"]
    assert updated["created_at"] == created["created_at"]
    assert updated["updated_at"] >= created["updated_at"]


def test_update_keeps_fields_not_sent(client: httpx.Client) -> None:
    created = create_instance(client, "partial", metadata={"a": "1"}, tags=["x"])

    updated = client.patch(f"/v1/instances/{created['id']}", json={"tags": []}).json()

    assert updated["tags"] == []
    assert updated["name"] == "partial"
    assert updated["metadata"] == {"a": "1"}


def test_update_empty_body(client: httpx.Client) -> None:
    created = create_instance(client, "unchanged", tags=["keep"])

    response = client.patch(f"/v1/instances/{created['id']}", json={})

    assert response.status_code == 200, response.text
    for field in STABLE_FIELDS:
        assert response.json()[field] == created[field], field


INVALID_UPDATES = [
    *[pytest.param({"name": case.values[0]}, "name", id=f"name-{case.id}") for case in NAME_CASES],
    *[
        pytest.param({"description": case.values[0]}, "description", id=f"description-{case.id}")
        for case in DESCRIPTION_CASES
    ],
    *[
        pytest.param({"metadata": case.values[0]}, "metadata", id=f"metadata-{case.id}")
        for case in METADATA_CASES
    ],
    *[pytest.param({"tags": case.values[0]}, "tags", id=f"tags-{case.id}") for case in TAG_CASES],
    pytest.param({"flavor_id": SMALL_FLAVOR}, "flavor_id", id="flavor-not-changeable"),
    pytest.param({"status": "ACTIVE"}, "status", id="status-not-changeable"),
]


@pytest.fixture(scope="module")
def update_target(client: httpx.Client) -> dict[str, Any]:
    return create_instance(client, "update-target", metadata={"k": "v"}, tags=["t"])


@pytest.mark.parametrize(("changes", "field"), INVALID_UPDATES)
def test_update_rejects(
    client: httpx.Client, update_target: dict[str, Any], changes: dict[str, Any], field: str
) -> None:
    response = client.patch(f"/v1/instances/{update_target['id']}", json=changes)
    shown = client.get(f"/v1/instances/{update_target['id']}").json()

    assert_rejected(response, field)
    for key in STABLE_FIELDS:
        assert shown[key] == update_target[key], key


@pytest.mark.parametrize("instance_id", [str(uuid.UUID(int=12)), "not-a-uuid"])
def test_update_unknown(client: httpx.Client, instance_id: str) -> None:
    response = client.patch(f"/v1/instances/{instance_id}", json={"name": "x"})

    error = assert_error(response, 404, "not_found")
    assert error["message"] == f"instance {instance_id} not found"


def test_update_deleted(shared_org: Org, client: httpx.Client) -> None:
    deleted_id = insert_deleted_copy(shared_org.api.backend, create_instance(client, "gone")["id"])

    response = client.patch(f"/v1/instances/{deleted_id}", json={"name": "back"})

    assert_error(response, 404, "not_found")


# --- delete ---------------------------------------------------------------------------


def test_delete_accepted(client: httpx.Client) -> None:
    created = create_instance(client, "to-delete")

    response = client.delete(f"/v1/instances/{created['id']}")
    shown = client.get(f"/v1/instances/{created['id']}")

    assert response.status_code == 202, response.text
    # Either the worker has not finished (task DELETING) or it has (DELETED shows as 404).
    if shown.status_code == 200:
        assert shown.json()["task_state"] == "DELETING"
    else:
        assert_error(shown, 404, "not_found")


def test_delete_deleted(shared_org: Org, client: httpx.Client) -> None:
    deleted_id = insert_deleted_copy(shared_org.api.backend, create_instance(client, "gone")["id"])

    response = client.delete(f"/v1/instances/{deleted_id}")

    error = assert_error(response, 404, "not_found")
    assert error["message"] == f"instance {deleted_id} not found"


@pytest.mark.parametrize("instance_id", [str(uuid.UUID(int=13)), "not-a-uuid"])
def test_delete_unknown(client: httpx.Client, instance_id: str) -> None:
    response = client.delete(f"/v1/instances/{instance_id}")

    error = assert_error(response, 404, "not_found")
    assert error["message"] == f"instance {instance_id} not found"


def test_delete_has_no_body(client: httpx.Client) -> None:
    created = create_instance(client, "empty-body")

    response = client.delete(f"/v1/instances/{created['id']}")

    assert response.status_code == 202, response.text
    assert response.content == b""


# --- isolation between organizations --------------------------------------------------


def send(client: httpx.Client, method: str, instance_id: str) -> httpx.Response:
    # The same request id on both sides, so only the instance id may differ.
    headers = {"X-Request-Id": "isolation-check"}
    if method == "PATCH":
        return client.patch(f"/v1/instances/{instance_id}", json={"name": "taken"}, headers=headers)
    return client.request(method, f"/v1/instances/{instance_id}", headers=headers)


def comparable_headers(response: httpx.Response) -> dict[str, str]:
    return {key: value for key, value in response.headers.items() if key != "date"}


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_other_org_sees_not_found(org: Org, other_org: Org, method: str) -> None:
    with org.client() as owner:
        theirs = create_instance(owner, "private")["id"]
    missing = str(uuid.uuid4())

    with other_org.client() as stranger:
        foreign = send(stranger, method, theirs)
        absent = send(stranger, method, missing)

    assert_error(foreign, 404, "not_found")
    assert foreign.content.replace(theirs.encode(), b"ID") == absent.content.replace(
        missing.encode(), b"ID"
    )
    assert comparable_headers(foreign) == comparable_headers(absent)


def test_other_org_cannot_change(org: Org, other_org: Org) -> None:
    with org.client() as owner:
        created = create_instance(owner, "private", tags=["mine"])

        with other_org.client() as stranger:
            send(stranger, "PATCH", created["id"])
            send(stranger, "DELETE", created["id"])
        shown = owner.get(f"/v1/instances/{created['id']}").json()

    assert shown["name"] == "private"
    assert shown["tags"] == ["mine"]
    assert shown["task_state"] != "DELETING"


def test_other_org_list_excludes(org: Org, other_org: Org) -> None:
    with org.client() as owner:
        create_instance(owner, "private")

    with other_org.client() as stranger:
        listed = stranger.get("/v1/instances").json()

    assert listed["instances"] == []
    assert listed["meta"]["total"] == 0
