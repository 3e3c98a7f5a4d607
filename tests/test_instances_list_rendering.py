"""GET /v1/instances: the page PostgreSQL renders equals the page Python renders.

On PostgreSQL the list's JSON is built by the database; on SQLite (and for every
other instance endpoint) by msgspec from the rows. These tests fill every field of
the instance object with awkward values and compare both renderings byte for byte.
They also check the instance counters behind ``meta.total`` against the rows, after
inserts, status changes, resizes and deletes, on both databases.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from conftest import ApiServer, Org, make_org
from helpers import DEBIAN_IMAGE, MEDIUM_FLAVOR, TINY_FLAVOR
from sqlalchemy import delete, func, select, update
from test_instances_list import insert_instances, organization_id_of

from mycloud_compute.api import views
from mycloud_compute.api.schemas import InstanceList, PageLinks, PageMeta
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.instances import InstanceFilters
from mycloud_compute.persistence.tables import instance_counts, instances

REGION = "spo1"
AWKWARD_TEXT = 'quote " back \\ slash / tab \t new\nline \x01 \x1f \x7f é 😀 \u2028 <b>&amp;'
EVERY_FIELD: dict[str, Any] = {
    "description": AWKWARD_TEXT,
    "task_state": "POWERING_OFF",
    "addresses": {
        "private-network": [
            {"addr": "192.168.1.10", "version": 4, "type": "fixed", "mac_addr": "fa:16:3e:4f:5a:2b"},
            {"addr": "203.0.113.7", "version": 4, "type": "floating", "mac_addr": "fa:16:3e:4f:5a:2b"},
        ],
        "net \"two\" é": [
            {"addr": "fd00::5", "version": 6, "type": "fixed", "mac_addr": "fa:16:3e:00:00:01"},
        ],
    },
    "security_groups": [{"name": "default"}, {"name": "web \"ports\""}],
    "volumes_attached": [
        {"id": "550e8400-e29b-41d4-a716-446655440000", "device": "/dev/vdb",
         "delete_on_termination": False},
        {"id": "550e8400-e29b-41d4-a716-446655440001", "device": "/dev/vdc",
         "delete_on_termination": True},
    ],
    "key_names": ["my-keypair", "backup-key"],
    "metadata": {"environment": "production", "zeta": "last", "alpha": AWKWARD_TEXT, "ünï": ""},
    "fault": {"code": 500, "message": "No valid host was found", "details": AWKWARD_TEXT,
              "created": "2024-01-15T10:30:00Z"},
    "updated_at": datetime(2024, 2, 1, 8, 0, 59, 999999),
    "launched_at": datetime(2024, 1, 15, 10, 31, 0, 500000),
    "terminated_at": datetime(2024, 3, 1, 0, 0, 0, 1),
}
STATUS_ROWS: list[dict[str, Any]] = [
    {"name": "plain", "status": "ACTIVE"},
    {"name": "every-field-active", "status": "ACTIVE", "tags": ["web", "prod", "é"], **EVERY_FIELD},
    {"name": "every-field-error", "status": "ERROR", "tags": ["web"], **EVERY_FIELD,
     "flavor_id": MEDIUM_FLAVOR},
    {"name": "every-field-shutoff", "status": "SHUTOFF", "tags": ["prod"], **EVERY_FIELD,
     "image_id": DEBIAN_IMAGE},
    {"name": "every-field-build", "status": "BUILD", **EVERY_FIELD, "flavor_id": TINY_FLAVOR},
    {"name": "every-field-deleted", "status": "DELETED", "tags": ["web"], **EVERY_FIELD},
    {"name": 'name "quoted" \\ é', "status": "ACTIVE", "description": "",
     "created_at": datetime(2024, 1, 15, 10, 30, 0, 999999)},
    {"name": "same-second-a", "created_at": datetime(2024, 1, 16, 0, 0, 0)},
    {"name": "same-second-b", "created_at": datetime(2024, 1, 16, 0, 0, 0)},
]
QUERIES: list[dict[str, str]] = [
    {},
    {"limit": "1"},
    {"limit": "3"},
    {"status": "DELETED"},
    {"status": "error,shutoff,build"},
    {"tags": "web"},
    {"tags": "web,prod"},
    {"name": "every-field-*"},
    {"name": "plain"},
    {"flavor_id": MEDIUM_FLAVOR},
    {"image_id": DEBIAN_IMAGE, "status": "SHUTOFF"},
    {"name": "nothing-*"},
]


@pytest.fixture(scope="module")
def rendering_org(api: ApiServer) -> Org:
    org = make_org(api, "rendering")
    insert_instances(org, STATUS_ROWS)
    return org


def python_page(org: Org, params: dict[str, str]) -> bytes:
    """The page's instances rendered by msgspec from the rows, as SQLite serves them."""
    filters = InstanceFilters(
        name=params.get("name", "").rstrip("*") or None,
        name_is_prefix=params.get("name", "").endswith("*"),
        statuses=tuple(part.upper() for part in params["status"].split(",")) if "status" in params else None,
        tags=tuple(params["tags"].split(",")) if "tags" in params else None,
        flavor_id=uuid.UUID(params["flavor_id"]) if "flavor_id" in params else None,
        image_id=uuid.UUID(params["image_id"]) if "image_id" in params else None,
    )
    limit = int(params.get("limit", "20"))

    async def read(db: Database) -> list[Any]:
        async with db.snapshot() as conn:
            organization_id = await organization_id_of(conn, org)
            rows = await instance_store.list_page(conn, organization_id, filters, after=None, limit=limit)
        return rows[:limit]

    rows = org.api.backend.run(read)
    return msgspec.json.encode([views.instance(row, REGION) for row in rows])


@pytest.mark.parametrize("params", QUERIES, ids=[str(query) for query in QUERIES])
def test_http_body_is_the_python_rendering(rendering_org: Org, params: dict[str, str]) -> None:
    with rendering_org.client("read") as client:
        response = client.get("/v1/instances", params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"

    decoded = msgspec.json.decode(response.content)
    expected = msgspec.json.encode(
        InstanceList(
            instances=msgspec.json.decode(python_page(rendering_org, params)),
            meta=msgspec.convert(decoded["meta"], PageMeta),
            links=msgspec.convert(decoded["links"], PageLinks),
        )
    )
    assert response.content == expected
    assert len(decoded["instances"]) == min(int(params.get("limit", "20")), decoded["meta"]["total"])


def test_marker_pages_match(rendering_org: Org) -> None:
    """Following links.next visits every instance exactly once."""
    with rendering_org.client("read") as client:
        url: str | None = "/v1/instances?limit=2&status=ACTIVE,ERROR,SHUTOFF,BUILD,DELETED"
        seen: list[str] = []
        while url is not None:
            response = client.get(url)
            assert response.status_code == 200, response.text
            body = response.json()
            seen.extend(item["id"] for item in body["instances"])
            url = body["links"]["next"]
    assert len(seen) == len(STATUS_ROWS) == len(set(seen))


# --- instance counters ------------------------------------------------------------------


def counters_and_rows(org: Org) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], int]]:
    async def read(db: Database) -> tuple[dict[tuple[Any, ...], int], dict[tuple[Any, ...], int]]:
        async with db.snapshot() as conn:
            organization_id = await organization_id_of(conn, org)
            key = (instances.c.status, instances.c.flavor_id, instances.c.image_id)
            rows = await conn.execute(
                select(*key, func.count()).where(instances.c.organization_id == organization_id).group_by(*key)
            )
            counted = {tuple(row[:3]): row[3] for row in rows}
            counters = await conn.execute(
                select(instance_counts.c.status, instance_counts.c.flavor_id,
                       instance_counts.c.image_id, instance_counts.c.count)
                .where(instance_counts.c.organization_id == organization_id)
            )
            kept = {tuple(row[:3]): row[3] for row in counters if row[3] != 0}
        return kept, counted

    return org.api.backend.run(read)  # type: ignore[no-any-return]


def test_counters_follow_every_write(api: ApiServer) -> None:
    org = make_org(api, "counters")
    ids = insert_instances(org, [{"name": f"c-{index}", "status": status, "tags": ["t", f"only-{index}"]}
                                 for index, status in enumerate(["ACTIVE", "ACTIVE", "BUILD", "ERROR"])])
    kept, counted = counters_and_rows(org)
    assert kept == counted
    assert sum(kept.values()) == 4

    async def change(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            where = (instances.c.organization_id == organization_id)
            # A status change, a resize, one that changes nothing counted, a delete.
            await conn.execute(update(instances).where(where, instances.c.id == uuid.UUID(ids[0]))
                               .values(status="SHUTOFF"))
            await conn.execute(update(instances).where(where, instances.c.id == uuid.UUID(ids[1]))
                               .values(flavor_id=uuid.UUID(MEDIUM_FLAVOR)))
            await conn.execute(update(instances).where(where, instances.c.id == uuid.UUID(ids[2]))
                               .values(name="renamed", updated_at=datetime(2024, 1, 1) + timedelta(1)))
            await conn.execute(delete(instances).where(where, instances.c.id == uuid.UUID(ids[3])))

    org.api.backend.run(change)
    kept, counted = counters_and_rows(org)
    assert kept == counted
    assert sum(kept.values()) == 3

    with org.client("read") as client:
        assert client.get("/v1/instances").json()["meta"]["total"] == 3
        assert client.get("/v1/instances", params={"status": "shutoff"}).json()["meta"]["total"] == 1
        by_flavor = client.get("/v1/instances", params={"flavor_id": MEDIUM_FLAVOR}).json()
        assert by_flavor["meta"]["total"] == 1
        # The tag rows follow their instance's status.
        assert client.get("/v1/instances", params={"tags": "t"}).json()["meta"]["total"] == 3
        shutoff_tagged = client.get("/v1/instances", params={"tags": "t,only-0", "status": "SHUTOFF"})
        assert shutoff_tagged.json()["meta"]["total"] == 1
        assert client.get("/v1/instances", params={"tags": "only-0"}).json()["meta"]["total"] == 1

    async def delete_one(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            await conn.execute(
                update(instances)
                .where(instances.c.organization_id == organization_id, instances.c.id == uuid.UUID(ids[0]))
                .values(status="DELETED")
            )

    org.api.backend.run(delete_one)
    with org.client("read") as client:
        assert client.get("/v1/instances", params={"tags": "t"}).json()["meta"]["total"] == 2
        assert client.get("/v1/instances", params={"tags": "only-0"}).json()["meta"]["total"] == 0
        deleted = client.get("/v1/instances", params={"tags": "t,only-0", "status": "deleted"}).json()
        assert deleted["meta"]["total"] == 1
        assert [item["id"] for item in deleted["instances"]] == [ids[0]]


def test_revoked_cached_token_gets_401_before_other_errors(api: ApiServer) -> None:
    """A token revoked while cached is rejected at once, even with a bad query."""
    org = make_org(api, "cache")
    with org.client("read") as client:
        assert client.get("/v1/instances").status_code == 200

        async def revoke(db: Database) -> None:
            from mycloud_compute.services import identity

            await identity.revoke_token(db, org.name, "read")

        org.api.backend.run(revoke)
        for params in ({"limit": "0"}, {"marker": str(uuid.uuid4())}, {}):
            response = client.get("/v1/instances", params=params)
            assert response.status_code == 401, (params, response.text)
            assert response.json()["error"]["message"] == "the token has been revoked"
