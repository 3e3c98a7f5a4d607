"""Volumes: /v1/volumes, attaching volumes at instance create, and releasing them on delete."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance, wait_for
from sqlalchemy import select

from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import volumes

VOLUME_FIELDS = ["id", "crn", "name", "size_gb", "status", "attachments", "created_at"]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def create_volume(client: httpx.Client, name: str = "data", size_gb: int = 10) -> dict[str, Any]:
    response = client.post("/v1/volumes", json={"name": name, "size_gb": size_gb})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def instance_body(name: str = "with-volumes", **fields: Any) -> dict[str, Any]:
    return {"name": name, "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}


def show_volume(client: httpx.Client, volume_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/volumes/{volume_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_rejected(response: httpx.Response, field: str) -> dict[str, Any]:
    """Check a 400 envelope whose details or message name ``field``."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    parameter = str((error.get("details") or {}).get("parameter", ""))
    named = re.split(r"[\[.]", parameter, maxsplit=1)[0] == field or field in error["message"]
    assert named, f"the error does not name {field!r}: {error}"
    return error  # type: ignore[no-any-return]


def attach_statuses(backend: Backend, volume_ids: list[str]) -> dict[str, str | None]:
    """Read the internal attach_status of volumes from the database."""

    async def read(db: Database) -> dict[str, str | None]:
        async with db.snapshot() as conn:
            query = select(volumes.c.id, volumes.c.attach_status).where(
                volumes.c.id.in_([uuid.UUID(value) for value in volume_ids])
            )
            return {str(row.id): row.attach_status for row in (await conn.execute(query)).all()}

    return backend.run(read)  # type: ignore[no-any-return]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    """An organization for tests that neither list nor count volumes."""
    return make_org(api, "volumes")


@pytest.fixture(scope="module")
def client(shared_org: Org) -> Iterator[httpx.Client]:
    with shared_org.client() as rw_client:
        yield rw_client


# --- create and show ------------------------------------------------------------------


def test_create_response(client: httpx.Client) -> None:
    response = client.post("/v1/volumes", json={"name": "db-data", "size_gb": 100})

    assert response.status_code == 201, response.text
    volume = response.json()
    assert list(volume) == VOLUME_FIELDS
    assert response.headers["location"] == f"/v1/volumes/{volume['id']}"
    assert str(uuid.UUID(volume["id"])) == volume["id"]
    assert volume["crn"] == f"crn:spo1:compute:volume:{volume['id']}"
    assert volume["name"] == "db-data"
    assert volume["size_gb"] == 100
    assert volume["status"] == "AVAILABLE"
    assert volume["attachments"] == []
    assert TIMESTAMP.match(volume["created_at"]), volume["created_at"]


def test_show_returns_created_values(client: httpx.Client) -> None:
    created = create_volume(client, "shown", 3)

    shown = show_volume(client, created["id"])

    assert shown == created


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"size_gb": 1}, id="size-1"),
        pytest.param({"size_gb": 16384}, id="size-16384"),
        pytest.param({"name": "v" * 255}, id="name-255"),
        pytest.param({"name": "données 01"}, id="name-unicode-inner-space"),
    ],
)
def test_create_accepts(client: httpx.Client, fields: dict[str, Any]) -> None:
    body = {"name": "accepted", "size_gb": 5, **fields}

    response = client.post("/v1/volumes", json=body)

    assert response.status_code == 201, response.text
    assert response.json()["name"] == body["name"]
    assert response.json()["size_gb"] == body["size_gb"]


CREATE_REJECTS = [
    pytest.param({"size_gb": 0}, "size_gb", id="size-0"),
    pytest.param({"size_gb": -1}, "size_gb", id="size-negative"),
    pytest.param({"size_gb": 16385}, "size_gb", id="size-16385"),
    pytest.param({"size_gb": "10"}, "size_gb", id="size-string"),
    pytest.param({"size_gb": 1.5}, "size_gb", id="size-float"),
    pytest.param({"size_gb": None}, "size_gb", id="size-null"),
    pytest.param({"name": ""}, "name", id="name-empty"),
    pytest.param({"name": "v" * 256}, "name", id="name-256"),
    pytest.param({"name": "a\nb"}, "name", id="name-newline"),
    pytest.param({"name": "a\x00b"}, "name", id="name-nul"),
    pytest.param({"name": "a\u0085b"}, "name", id="name-c1-control"),
    pytest.param({"name": " data"}, "name", id="name-leading-space"),
    pytest.param({"name": "data "}, "name", id="name-trailing-space"),
    pytest.param({"name": 7}, "name", id="name-number"),
    pytest.param({"color": "blue"}, "color", id="unknown-field"),
]


@pytest.mark.parametrize(("fields", "field"), CREATE_REJECTS)
def test_create_rejects(client: httpx.Client, fields: dict[str, Any], field: str) -> None:
    body = {"name": "rejected", "size_gb": 5, **fields}

    assert_rejected(client.post("/v1/volumes", json=body), field)


@pytest.mark.parametrize("field", ["name", "size_gb"])
def test_create_missing_field(client: httpx.Client, field: str) -> None:
    body = {"name": "missing", "size_gb": 5}
    del body[field]

    assert_rejected(client.post("/v1/volumes", json=body), field)


def test_create_needs_write_scope(shared_org: Org) -> None:
    with shared_org.client("read") as reader:
        response = reader.post("/v1/volumes", json={"name": "read-only", "size_gb": 1})

    assert_error(response, 403, "forbidden")


@pytest.mark.parametrize("volume_id", [str(uuid.UUID(int=21)), "not-a-uuid"])
def test_show_unknown(client: httpx.Client, volume_id: str) -> None:
    error = assert_error(client.get(f"/v1/volumes/{volume_id}"), 404, "not_found")

    assert error["message"] == f"volume {volume_id} not found"


# --- delete ---------------------------------------------------------------------------


def test_delete_volume(client: httpx.Client) -> None:
    created = create_volume(client, "to-delete")

    response = client.delete(f"/v1/volumes/{created['id']}")

    assert response.status_code == 204, response.text
    assert response.content == b""
    assert_error(client.get(f"/v1/volumes/{created['id']}"), 404, "not_found")
    error = assert_error(client.delete(f"/v1/volumes/{created['id']}"), 404, "not_found")
    assert error["message"] == f"volume {created['id']} not found"


@pytest.mark.parametrize("volume_id", [str(uuid.UUID(int=22)), "not-a-uuid"])
def test_delete_unknown(client: httpx.Client, volume_id: str) -> None:
    error = assert_error(client.delete(f"/v1/volumes/{volume_id}"), 404, "not_found")

    assert error["message"] == f"volume {volume_id} not found"


def test_delete_attached_volume_conflict(client: httpx.Client) -> None:
    volume = create_volume(client, "attached")
    instance = create_instance(
        client, "holder", volumes=[{"volume_id": volume["id"], "delete_on_termination": False}]
    )

    response = client.delete(f"/v1/volumes/{volume['id']}")

    error = assert_error(response, 409, "conflict")
    assert instance["id"] in error["message"]
    assert show_volume(client, volume["id"])["status"] == "IN_USE"


# --- list -----------------------------------------------------------------------------


def test_list_newest_first_and_paginated(org: Org) -> None:
    with org.client() as client:
        created = [create_volume(client, f"vol-{number}", number + 1) for number in range(5)]
        first = client.get("/v1/volumes", params={"limit": "2"}).json()
        second = client.get(first["links"]["next"]).json()
        third = client.get(second["links"]["next"]).json()
        back = client.get(third["links"]["previous"]).json()

    newest_first = [volume["id"] for volume in reversed(created)]
    walked = [volume["id"] for page in (first, second, third) for volume in page["volumes"]]
    assert walked == newest_first
    assert first["volumes"][0] == created[-1]
    assert first["meta"] == {"total": 5, "limit": 2, "marker": newest_first[1], "has_more": True}
    assert third["meta"] == {"total": 5, "limit": 2, "marker": newest_first[4], "has_more": False}
    assert third["links"]["next"] is None
    assert first["links"]["previous"] is None
    assert query_of(first["links"]["self"]) == {"limit": ["2"]}
    assert query_of(second["links"]["previous"]) == {"limit": ["2"]}
    assert query_of(third["links"]["previous"]) == {"limit": ["2"], "marker": [newest_first[1]]}
    assert back == second


def test_list_leaves_out_deleted(org: Org) -> None:
    with org.client() as client:
        kept = create_volume(client, "kept")
        gone = create_volume(client, "gone")
        assert client.delete(f"/v1/volumes/{gone['id']}").status_code == 204
        listed = client.get("/v1/volumes").json()
        # A deleted volume stays a valid marker: the page after it starts with the older one.
        after_deleted = client.get("/v1/volumes", params={"marker": gone["id"]}).json()

    assert [volume["id"] for volume in listed["volumes"]] == [kept["id"]]
    assert listed["meta"]["total"] == 1
    assert [volume["id"] for volume in after_deleted["volumes"]] == [kept["id"]]


def test_list_empty(org: Org) -> None:
    with org.client() as client:
        body = client.get("/v1/volumes").json()

    assert body["volumes"] == []
    assert body["meta"] == {"total": 0, "limit": 20, "marker": None, "has_more": False}
    assert body["links"]["next"] is None


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"marker": "not-a-uuid"}, "marker"),
        ({"marker": str(uuid.UUID(int=23))}, "marker"),
        ({"status": "AVAILABLE"}, "status"),
    ],
)
def test_list_rejects(client: httpx.Client, params: dict[str, str], parameter: str) -> None:
    error = assert_error(client.get("/v1/volumes", params=params), 400, "invalid_parameter")

    assert error["details"]["parameter"] == parameter


# --- isolation between organizations --------------------------------------------------


def comparable(response: httpx.Response, volume_id: str) -> tuple[int, bytes, dict[str, str]]:
    headers = {key: value for key, value in response.headers.items() if key != "date"}
    return response.status_code, response.content.replace(volume_id.encode(), b"ID"), headers


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_other_org_sees_not_found(org: Org, other_org: Org, method: str) -> None:
    with org.client() as owner:
        theirs = create_volume(owner, "private")["id"]
    missing = str(uuid.uuid4())
    headers = {"X-Request-Id": "volume-isolation"}

    with other_org.client() as stranger:
        foreign = stranger.request(method, f"/v1/volumes/{theirs}", headers=headers)
        absent = stranger.request(method, f"/v1/volumes/{missing}", headers=headers)

    assert_error(foreign, 404, "not_found")
    assert comparable(foreign, theirs) == comparable(absent, missing)


def test_other_org_cannot_attach_or_list(org: Org, other_org: Org) -> None:
    with org.client() as owner:
        theirs = create_volume(owner, "private")["id"]
    missing = str(uuid.uuid4())

    with other_org.client() as stranger:
        foreign = stranger.post(
            "/v1/instances", json=instance_body(volumes=[{"volume_id": theirs}])
        )
        absent = stranger.post(
            "/v1/instances", json=instance_body(volumes=[{"volume_id": missing}])
        )
        as_marker = stranger.get("/v1/volumes", params={"marker": theirs})
        listed = stranger.get("/v1/volumes").json()

    foreign_error = assert_rejected(foreign, "volumes")
    absent_error = assert_rejected(absent, "volumes")
    assert foreign_error["message"] == f"volume {theirs} not found"
    assert absent_error["message"] == f"volume {missing} not found"
    assert assert_error(as_marker, 400, "invalid_parameter")["message"] == f"marker {theirs} not found"
    assert listed["volumes"] == []
    with org.client() as owner:
        assert show_volume(owner, theirs)["status"] == "AVAILABLE"


# --- attaching at instance create -----------------------------------------------------


def test_create_instance_with_volumes(client: httpx.Client) -> None:
    existing = create_volume(client, "existing", 7)
    requested = [
        {"size_gb": 5, "delete_on_termination": True},
        {"volume_id": existing["id"], "delete_on_termination": False},
        {"size_gb": 1},
    ]

    instance = create_instance(client, "web-volumes", volumes=requested)

    attached = instance["volumes_attached"]
    assert [list(item) for item in attached] == [["id", "device", "delete_on_termination"]] * 3
    assert [item["device"] for item in attached] == ["/dev/vdb", "/dev/vdc", "/dev/vdd"]
    assert [item["delete_on_termination"] for item in attached] == [True, False, False]
    assert attached[1]["id"] == existing["id"]
    assert client.get(f"/v1/instances/{instance['id']}").json()["volumes_attached"] == attached

    new_volume = show_volume(client, attached[0]["id"])
    assert new_volume["name"] == "web-volumes-vdb"
    assert new_volume["size_gb"] == 5
    for item in attached:
        volume = show_volume(client, item["id"])
        assert volume["status"] == "IN_USE"
        assert volume["attachments"] == [{"instance_id": instance["id"], "device": item["device"]}]


def test_create_instance_long_name_volume_name(client: httpx.Client) -> None:
    instance = create_instance(client, "n" * 255, volumes=[{"size_gb": 1}])

    volume = show_volume(client, instance["volumes_attached"][0]["id"])

    assert volume["name"] == "n" * 251 + "-vdb"


def test_create_instance_sixteen_volumes(client: httpx.Client) -> None:
    instance = create_instance(client, "many-volumes", volumes=[{"size_gb": 1}] * 16)

    devices = [item["device"] for item in instance["volumes_attached"]]
    assert devices == [f"/dev/vd{letter}" for letter in "bcdefghijklmnopq"]


ATTACH_REJECTS = [
    pytest.param([{"size_gb": 0}], id="size-0"),
    pytest.param([{"size_gb": 16385}], id="size-too-big"),
    pytest.param([{"size_gb": "5"}], id="size-string"),
    pytest.param([{"size_gb": 5, "volume_id": str(uuid.UUID(int=24))}], id="both"),
    pytest.param([{"delete_on_termination": True}], id="neither"),
    pytest.param([{}], id="empty-object"),
    pytest.param([{"volume_id": "vol-1"}], id="volume-id-not-uuid"),
    pytest.param([{"volume_id": str(uuid.UUID(int=25))}], id="unknown-volume"),
    pytest.param([{"size_gb": 5, "delete_on_termination": "yes"}], id="flag-string"),
    pytest.param([{"size_gb": 5, "device": "/dev/vdz"}], id="unknown-field"),
    pytest.param([{"size_gb": 1}] * 17, id="17-volumes"),
    pytest.param({"size_gb": 5}, id="object-not-list"),
    pytest.param([5], id="number-item"),
]


@pytest.mark.parametrize("requested", ATTACH_REJECTS)
def test_create_instance_rejects_volumes(client: httpx.Client, requested: Any) -> None:
    assert_rejected(client.post("/v1/instances", json=instance_body(volumes=requested)), "volumes")


def test_create_instance_rejects_volume_twice(client: httpx.Client) -> None:
    volume = create_volume(client, "twice")

    response = client.post(
        "/v1/instances",
        json=instance_body(volumes=[{"volume_id": volume["id"]}, {"volume_id": volume["id"]}]),
    )

    assert_rejected(response, "volumes")
    assert show_volume(client, volume["id"])["status"] == "AVAILABLE"


def test_create_instance_rejects_volume_in_use(client: httpx.Client) -> None:
    volume = create_volume(client, "taken")
    create_instance(client, "first-owner", volumes=[{"volume_id": volume["id"]}])

    response = client.post(
        "/v1/instances", json=instance_body("second-owner", volumes=[{"volume_id": volume["id"]}])
    )

    error = assert_rejected(response, "volumes")
    assert "IN_USE" in error["message"]


def test_rejected_create_reserves_nothing(client: httpx.Client) -> None:
    """A create that fails after the volumes were checked leaves them AVAILABLE."""
    volume = create_volume(client, "unreserved")

    response = client.post(
        "/v1/instances",
        json=instance_body(
            volumes=[{"volume_id": volume["id"]}], security_groups=["no-such-group"]
        ),
    )

    assert_rejected(response, "security_groups")
    assert show_volume(client, volume["id"]) == volume


def test_deleted_volume_cannot_be_attached(client: httpx.Client) -> None:
    volume = create_volume(client, "deleted-first")
    assert client.delete(f"/v1/volumes/{volume['id']}").status_code == 204

    response = client.post("/v1/instances", json=instance_body(volumes=[{"volume_id": volume["id"]}]))

    error = assert_rejected(response, "volumes")
    assert error["message"] == f"volume {volume['id']} not found"


def test_concurrent_attach_of_one_volume(org: Org) -> None:
    """Creates racing for one volume: exactly one instance gets it, the others a 400."""
    with org.client() as client:
        volume = create_volume(client, "contested")
    racers = 8
    barrier = threading.Barrier(racers)
    responses: list[httpx.Response] = []

    def race(number: int) -> None:
        with org.client() as racer:
            barrier.wait()
            body = instance_body(f"racer-{number}", volumes=[{"volume_id": volume["id"]}])
            responses.append(racer.post("/v1/instances", json=body))

    threads = [threading.Thread(target=race, args=(number,)) for number in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    accepted = [response for response in responses if response.status_code == 202]
    assert len(responses) == racers
    assert len(accepted) == 1, [response.text for response in responses]
    for response in responses:
        if response.status_code != 202:
            assert_rejected(response, "volumes")
    with org.client() as client:
        shown = show_volume(client, volume["id"])
        listed = client.get("/v1/instances").json()
    assert shown["attachments"][0]["instance_id"] == accepted[0].json()["id"]
    assert listed["meta"]["total"] == 1


# --- the lifecycle: building and deleting ---------------------------------------------


def test_delete_instance_releases_volumes(org: Org) -> None:
    with org.client() as client:
        kept_existing = create_volume(client, "kept-existing")
        doomed_existing = create_volume(client, "doomed-existing")
        instance = create_instance(
            client,
            "short-lived",
            volumes=[
                {"size_gb": 2, "delete_on_termination": True},
                {"size_gb": 3, "delete_on_termination": False},
                {"volume_id": kept_existing["id"], "delete_on_termination": False},
                {"volume_id": doomed_existing["id"], "delete_on_termination": True},
            ],
        )
        ids = [item["id"] for item in instance["volumes_attached"]]
        wait_for(client, instance["id"], status="ACTIVE")
        statuses_when_active = attach_statuses(org.api.backend, ids)

        assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
        wait_for(client, instance["id"], status="DELETED")
        deleted = client.get("/v1/instances", params={"status": "DELETED"}).json()["instances"]
        new_gone = client.get(f"/v1/volumes/{ids[0]}")
        existing_gone = client.get(f"/v1/volumes/{ids[3]}")
        new_kept = show_volume(client, ids[1])
        existing_kept = show_volume(client, ids[2])
        listed = client.get("/v1/volumes").json()

    assert statuses_when_active == dict.fromkeys(ids, "ATTACHED")
    assert deleted[0]["volumes_attached"] == []
    assert_error(new_gone, 404, "not_found")
    assert_error(existing_gone, 404, "not_found")
    for volume in (new_kept, existing_kept):
        assert volume["status"] == "AVAILABLE"
        assert volume["attachments"] == []
    assert new_kept["size_gb"] == 3
    assert sorted(volume["id"] for volume in listed["volumes"]) == sorted([ids[1], ids[2]])


def test_detached_volume_can_be_reused(org: Org) -> None:
    with org.client() as client:
        volume = create_volume(client, "reused")
        first = create_instance(client, "first", volumes=[{"volume_id": volume["id"]}])
        wait_for(client, first["id"], status="ACTIVE")
        assert client.delete(f"/v1/instances/{first['id']}").status_code == 202
        wait_for(client, first["id"], status="DELETED")

        second = create_instance(client, "second", volumes=[{"volume_id": volume["id"]}])
        shown = show_volume(client, volume["id"])

    assert shown["attachments"] == [{"instance_id": second["id"], "device": "/dev/vdb"}]


def test_error_instance_releases_volumes_on_delete(org: Org) -> None:
    """A build that ends in ERROR keeps its volumes until the instance is deleted."""
    with org.client("admin") as admin:
        response = admin.post(
            "/v1/flavors",
            json={"name": f"huge-{org.name}", "vcpus": 1024, "ram": 4096, "disk": 40},
        )
        assert response.status_code == 201, response.text
        huge_flavor = response.json()["id"]
    with org.client() as client:
        existing = create_volume(client, "survivor")
        instance = create_instance(
            client,
            "never-built",
            flavor_id=huge_flavor,
            volumes=[
                {"volume_id": existing["id"], "delete_on_termination": False},
                {"size_gb": 4, "delete_on_termination": True},
            ],
        )
        created_id = instance["volumes_attached"][1]["id"]
        failed = wait_for(client, instance["id"], status="ERROR")
        while_failed = [show_volume(client, existing["id"]), show_volume(client, created_id)]
        statuses_while_failed = attach_statuses(org.api.backend, [existing["id"], created_id])

        assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
        wait_for(client, instance["id"], status="DELETED")
        released = show_volume(client, existing["id"])
        created_gone = client.get(f"/v1/volumes/{created_id}")

    assert failed["fault"]["message"] == "No valid host was found"
    assert failed["volumes_attached"] == instance["volumes_attached"]
    for volume in while_failed:
        assert volume["status"] == "IN_USE"
        assert volume["attachments"][0]["instance_id"] == instance["id"]
    # The build stopped at SCHEDULING, before the volumes were attached.
    assert statuses_while_failed == dict.fromkeys([existing["id"], created_id], "RESERVED")
    assert released["status"] == "AVAILABLE"
    assert released["attachments"] == []
    assert_error(created_gone, 404, "not_found")
