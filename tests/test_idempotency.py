"""The Idempotency-Key header on POST /v1/instances and POST /v1/volumes."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Org
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, wait_for
from sqlalchemy import select, update

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import idempotency_keys, instances, organizations

HEADER = "Idempotency-Key"


def instance_body(name: str = "idempotent", **fields: Any) -> dict[str, Any]:
    return {"name": name, "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}


def post_instance(
    client: httpx.Client, key: str | bytes, body: dict[str, Any], **headers: str
) -> httpx.Response:
    return client.post("/v1/instances", json=body, headers={HEADER: key, **headers})


def comparable_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name != "date"}


def instance_count(org: Org) -> int:
    """Count the organization's instance rows, DELETED ones included."""

    async def count(db: Database) -> int:
        async with db.snapshot() as conn:
            query = (
                select(instances.c.id)
                .join(organizations, organizations.c.id == instances.c.organization_id)
                .where(organizations.c.name == org.name)
            )
            return len((await conn.execute(query)).all())

    return org.api.backend.run(count)  # type: ignore[no-any-return]


def age_keys(org: Org, age: timedelta) -> None:
    """Set the creation time of the organization's stored keys to ``age`` ago."""

    async def move(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = select(organizations.c.id).where(organizations.c.name == org.name)
            await conn.execute(
                update(idempotency_keys)
                .where(idempotency_keys.c.organization_id == organization_id.scalar_subquery())
                .values(created_at=utcnow() - age)
            )

    org.api.backend.run(move)


# --- replays ----------------------------------------------------------------------------


def test_replay_returns_first_response(org: Org) -> None:
    body = instance_body(tags=["web"], volumes=[{"size_gb": 2}])
    with org.client() as client:
        first = post_instance(client, "create-web-1", body, **{"X-Request-Id": "retry-1"})
        again = post_instance(client, "create-web-1", body, **{"X-Request-Id": "retry-1"})

    assert first.status_code == 202, first.text
    assert again.status_code == 202, again.text
    assert again.content == first.content
    assert comparable_headers(again) == comparable_headers(first)
    assert again.headers["location"] == f"/v1/instances/{first.json()['id']}"
    assert instance_count(org) == 1


def test_replay_after_the_build(org: Org) -> None:
    """The replay is the stored first response (BUILD), not the instance as it is now."""
    body = instance_body()
    with org.client() as client:
        first = post_instance(client, "build-then-replay", body)
        wait_for(client, first.json()["id"], status="ACTIVE")
        again = post_instance(client, "build-then-replay", body)

    assert again.status_code == 202
    assert again.json()["status"] == "BUILD"
    assert again.content == first.content


def test_replay_ignores_key_order_and_spacing(org: Org) -> None:
    body = instance_body(metadata={"a": "1", "b": "2"})
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=4).encode()
    with org.client() as client:
        first = post_instance(client, "same-json", body)
        again = client.post(
            "/v1/instances",
            content=reordered,
            headers={HEADER: "same-json", "Content-Type": "application/json"},
        )

    assert again.status_code == 202, again.text
    assert again.content == first.content
    assert instance_count(org) == 1


def test_different_body_conflict(org: Org) -> None:
    with org.client() as client:
        first = post_instance(client, "reused-key", instance_body("first"))
        second = post_instance(client, "reused-key", instance_body("second"))
        listed = client.get("/v1/instances").json()

    assert first.status_code == 202, first.text
    error = assert_error(second, 409, "conflict")
    assert "reused-key" in error["message"]
    assert error["details"] == {"parameter": HEADER}
    assert [item["name"] for item in listed["instances"]] == ["first"]


def test_different_invalid_body_conflict(org: Org) -> None:
    with org.client() as client:
        first = post_instance(client, "reused-bad", instance_body("first"))
        # The name fails the service's check, which runs before the key is claimed.
        second = post_instance(client, "reused-bad", instance_body("second "))

    assert first.status_code == 202, first.text
    error = assert_error(second, 409, "conflict")
    assert error["details"] == {"parameter": HEADER}
    assert instance_count(org) == 1


def test_failed_request_stores_nothing(org: Org) -> None:
    with org.client() as client:
        rejected = post_instance(client, "fix-and-retry", instance_body(flavor_id=str(uuid.UUID(int=1))))
        fixed = post_instance(client, "fix-and-retry", instance_body())
        replayed = post_instance(client, "fix-and-retry", instance_body())

    assert rejected.status_code == 400, rejected.text
    assert fixed.status_code == 202, fixed.text
    assert replayed.content == fixed.content
    assert instance_count(org) == 1


def test_without_key_creates_each_time(org: Org) -> None:
    with org.client() as client:
        responses = [client.post("/v1/instances", json=instance_body()) for _ in range(2)]

    assert [response.status_code for response in responses] == [202, 202]
    assert responses[0].json()["id"] != responses[1].json()["id"]


# --- scope and lifetime -----------------------------------------------------------------


def test_key_scoped_by_organization(org: Org, other_org: Org) -> None:
    body = instance_body()
    with org.client() as client:
        mine = post_instance(client, "shared-key", body)
    with other_org.client() as client:
        theirs = post_instance(client, "shared-key", body)

    assert mine.status_code == theirs.status_code == 202
    assert mine.json()["id"] != theirs.json()["id"]
    assert instance_count(org) == instance_count(other_org) == 1


def test_key_scoped_by_route(org: Org) -> None:
    with org.client() as client:
        volume = client.post("/v1/volumes", json={"name": "v", "size_gb": 1}, headers={HEADER: "k"})
        instance = post_instance(client, "k", instance_body())

    assert volume.status_code == 201, volume.text
    assert instance.status_code == 202, instance.text


def test_expired_key_ignored(org: Org) -> None:
    body = instance_body()
    with org.client() as client:
        first = post_instance(client, "day-old", body)
        age_keys(org, timedelta(hours=24, seconds=1))
        after_expiry = post_instance(client, "day-old", body)
        replayed = post_instance(client, "day-old", body)

    assert after_expiry.status_code == 202, after_expiry.text
    assert after_expiry.json()["id"] != first.json()["id"]
    assert replayed.content == after_expiry.content
    assert instance_count(org) == 2


def test_key_within_lifetime_replays(org: Org) -> None:
    body = instance_body()
    with org.client() as client:
        first = post_instance(client, "almost-a-day", body)
        age_keys(org, timedelta(hours=23, minutes=59))
        again = post_instance(client, "almost-a-day", body)

    assert again.content == first.content
    assert instance_count(org) == 1


# --- invalid keys -----------------------------------------------------------------------


BAD_KEYS = [
    pytest.param(b"", id="empty"),
    pytest.param(b"k" * 256, id="256-characters"),
    pytest.param("caf\u00e9".encode(), id="non-ascii"),
    pytest.param(b"a\tb", id="tab"),
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_key_rejected(org: Org, key: bytes) -> None:
    with org.client() as client:
        response = post_instance(client, key, instance_body())

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == HEADER
    assert HEADER in error["message"]
    assert instance_count(org) == 0


def test_key_given_twice_rejected(org: Org) -> None:
    with org.client() as client:
        response = client.post(
            "/v1/instances",
            json=instance_body(),
            headers=[(HEADER, "one"), (HEADER, "two")],
        )

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == HEADER


@pytest.mark.parametrize(
    "key", ["k" * 255, "a b", "~!@#$%^&*()_+{}|:<>?", str(uuid.uuid4())], ids=["255", "space", "symbols", "uuid"]
)
def test_good_key_accepted(org: Org, key: str) -> None:
    with org.client() as client:
        first = post_instance(client, key, instance_body())
        again = post_instance(client, key, instance_body())

    assert first.status_code == 202, first.text
    assert again.content == first.content


# --- volumes ----------------------------------------------------------------------------


def test_volume_create_replay(org: Org) -> None:
    body = {"name": "data", "size_gb": 10}
    with org.client() as client:
        first = client.post("/v1/volumes", json=body, headers={HEADER: "volume-1"})
        again = client.post("/v1/volumes", json=body, headers={HEADER: "volume-1"})
        changed = client.post("/v1/volumes", json={**body, "size_gb": 11}, headers={HEADER: "volume-1"})
        listed = client.get("/v1/volumes").json()

    assert first.status_code == 201, first.text
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert_error(changed, 409, "conflict")
    assert listed["meta"]["total"] == 1


# --- concurrent retries -----------------------------------------------------------------


def post_concurrently(org: Org, key: str, body: dict[str, Any], count: int) -> list[httpx.Response]:
    """POST the same create ``count`` times at once, one client per thread."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        with org.client() as client:
            barrier.wait()
            response = post_instance(client, key, body)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses


def test_concurrent_retries_create_one_instance(org: Org) -> None:
    responses = post_concurrently(org, "storm", instance_body("storm"), 20)

    assert len(responses) == 20
    assert {response.status_code for response in responses} == {202}, [r.text for r in responses]
    assert len({response.content for response in responses}) == 1
    assert instance_count(org) == 1


def test_concurrent_retries_with_a_volume(org: Org) -> None:
    """Retries that name one existing volume all get the first response, none a 400."""
    with org.client() as client:
        volume = client.post("/v1/volumes", json={"name": "shared", "size_gb": 1}).json()
    body = instance_body("storm-volume", volumes=[{"volume_id": volume["id"]}])

    responses = post_concurrently(org, "storm-volume", body, 20)

    assert {response.status_code for response in responses} == {202}, [r.text for r in responses]
    assert len({response.content for response in responses}) == 1
    assert instance_count(org) == 1


# --- documentation ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/instances", "/v1/volumes"])
def test_openapi_documents_header(api: ApiServer, path: str) -> None:
    with api.client() as anonymous:
        openapi = anonymous.get("/openapi.json").json()

    parameters = openapi["paths"][path]["post"]["parameters"]
    header = next(parameter for parameter in parameters if parameter["name"] == HEADER)
    assert header["in"] == "header"
    assert header["required"] is False
    assert header["schema"]["maxLength"] == 255
    assert header["schema"]["minLength"] == 1
    assert "24 hours" in header["description"]
