"""The one-statement instance create on PostgreSQL (services/instance_create.py).

The statement must store exactly what the create transaction stores, byte for
byte in the JSON columns, and must change nothing whenever the transaction would
reject the request or replay a stored response, so that the transaction then
decides. The HTTP tests (test_instances_api.py, test_idempotency.py, ...) run the
whole route on both databases. These tests call the two paths directly and
compare the rows they leave.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from conftest import Backend, new_backend
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE
from test_keypairs import public_key

from mycloud_compute.api import views
from mycloud_compute.api.idempotency import json_response
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import catalog, identity, instance_create, keypairs, networks
from mycloud_compute.services import instances as service
from mycloud_compute.services import security_groups as security_group_service
from mycloud_compute.services.errors import InvalidParameter
from mycloud_compute.services.idempotency import (
    KEY_LIFETIME,
    Idempotency,
    IdempotencyKey,
    StoredResponse,
)
from mycloud_compute.services.identity import Principal

REGION = "test1"
ROUTE = "POST /v1/instances"
AWKWARD_TEXT = 'quote " back \\ slash / tab \t new\nline é 😀 \u2028 <b>&amp;'

# Per table: how to find an instance's rows, and the columns that differ between
# two creates by design (generated ids, clock readings, the key itself).
ROW_QUERIES = {
    "instances": "SELECT * FROM instances WHERE organization_id = $1 AND id = $2",
    "instance_tags": "SELECT * FROM instance_tags WHERE organization_id = $1 AND instance_id = $2 ORDER BY tag",
    "instance_security_groups": (
        "SELECT * FROM instance_security_groups WHERE organization_id = $1 AND instance_id = $2 "
        "ORDER BY security_group_id"
    ),
    "instance_actions": "SELECT * FROM instance_actions WHERE organization_id = $1 AND instance_id = $2",
    "tasks": "SELECT * FROM tasks WHERE organization_id = $1 AND instance_id = $2",
}
JSON_COLUMNS = {
    "flavor", "image", "network_ids", "addresses", "security_groups", "volumes_attached",
    "key_names", "metadata", "tags", "fault", "new_flavor", "old_flavor",
}
VARYING_COLUMNS = {"id", "instance_id", "action_id", "created_at", "updated_at", "started_at", "key"}


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    with new_backend("postgresql", tmp_path_factory.mktemp("db")) as backend:
        yield backend


def render(row: Any) -> StoredResponse:
    return json_response(views.instance(row, REGION), 202, f"/v1/instances/{row.id}")


def idempotency(principal: Principal, key: str, body_hash: str = "0" * 64) -> Idempotency:
    return Idempotency(IdempotencyKey(principal.organization_id, key, ROUTE, body_hash), render)


def create_request(name: str = "web-1", **fields: Any) -> service.CreateRequest:
    values: dict[str, Any] = {
        "name": name,
        "flavor_id": uuid.UUID(SMALL_FLAVOR),
        "image_id": uuid.UUID(UBUNTU_IMAGE),
        "description": "",
        "networks": None,
        "key_names": [],
        "security_groups": None,
        "metadata": {"role": "web"},
        "tags": ["web", "prod"],
    }
    values.update(fields)
    return service.CreateRequest(**values)


async def new_principal(db: Database, *, admin: bool = False) -> Principal:
    name = f"org-{uuid.uuid4().hex[:10]}"
    organization_id = await identity.create_organization(db, name)
    scopes = {"read", "write", "admin"} if admin else {"read", "write"}
    return Principal(organization_id, name, "token-1", frozenset(scopes))


async def rows_of(db: Database, organization_id: uuid.UUID, instance_id: uuid.UUID) -> dict[str, Any]:
    """Read an instance's rows in every table, with the JSON columns as stored text.

    A plain asyncpg connection returns JSON as text; SQLAlchemy's connections decode it.
    """
    found: dict[str, Any] = {}
    connection = await asyncpg.connect(db.url)
    try:
        for table, query in ROW_QUERIES.items():
            found[table] = [dict(row) for row in await connection.fetch(query, organization_id, instance_id)]
    finally:
        await connection.close()
    return found


async def key_row(db: Database, organization_id: uuid.UUID, key: str) -> dict[str, Any] | None:
    async with db.autocommit_driver_connection() as connection:
        row = await connection.fetchrow(
            "SELECT * FROM idempotency_keys WHERE organization_id = $1 AND key = $2 AND route = $3",
            organization_id, key, ROUTE,
        )
    return None if row is None else dict(row)


async def table_counts(db: Database, organization_id: uuid.UUID) -> dict[str, int]:
    counts = {}
    async with db.autocommit_driver_connection() as connection:
        for table in ("instances", "instance_tags", "instance_security_groups", "instance_actions",
                      "tasks", "idempotency_keys"):
            counts[table] = await connection.fetchval(
                f"SELECT count(*) FROM {table} WHERE organization_id = $1", organization_id
            )
        counts["instance_counts"] = await connection.fetchval(
            "SELECT coalesce(sum(count), 0) FROM instance_counts WHERE organization_id = $1",
            organization_id,
        )
    return counts


def comparable(rows: dict[str, Any]) -> dict[str, Any]:
    """Drop the columns that differ between two creates by design."""
    return {
        table: [
            {column: value for column, value in row.items() if column not in VARYING_COLUMNS}
            for row in table_rows
        ]
        for table, table_rows in rows.items()
    }


def neutral(body: bytes, row: Any) -> bytes:
    """Replace the instance's id and creation time in a response body with placeholders."""
    return body.replace(str(row.id).encode(), b"<id>").replace(
        row.created_at.strftime("%Y-%m-%dT%H:%M:%SZ").encode(), b"<time>"
    )


async def create_both(
    db: Database, principal: Principal, request: service.CreateRequest, *, with_key: bool
) -> tuple[Any, Any]:
    """Create the same instance by the transaction and by the one statement; return both rows."""
    old_key = idempotency(principal, f"old-{uuid.uuid4()}") if with_key else None
    old = await service._create_in_transaction(
        db, principal, request, request_id="req-1", idempotency=old_key
    )
    new_key = idempotency(principal, f"new-{uuid.uuid4()}") if with_key else None
    new = await instance_create.create_in_one_statement(
        db, principal, request, request_id="req-1", idempotency=new_key, purge_expired_keys=False
    )
    assert new is not None, "the one-statement create changed nothing"
    if with_key:
        assert old_key is not None and new_key is not None
        assert old_key.response is not None and new_key.response is not None
        assert neutral(new_key.response.body, new) == neutral(old_key.response.body, old)
        old_row = await key_row(db, principal.organization_id, old_key.key.key)
        new_row = await key_row(db, principal.organization_id, new_key.key.key)
        assert old_row is not None and new_row is not None
        assert new_row["response_body"] == new_key.response.body.decode()
        assert new_row["status_code"] == old_row["status_code"] == 202
        assert new_row["location"] == f"/v1/instances/{new.id}"
        assert new_row["request_hash"] == old_row["request_hash"]
    return old, new


async def assert_same_rows(db: Database, principal: Principal, old: Any, new: Any) -> None:
    organization_id = principal.organization_id
    old_rows = await rows_of(db, organization_id, old.id)
    new_rows = await rows_of(db, organization_id, new.id)
    assert len(new_rows["instances"]) == 1
    assert comparable(new_rows) == comparable(old_rows)
    assert neutral(render(new).body, new) == neutral(render(old).body, old)
    # The returned record contains what was stored, as the Row from the transaction does.
    stored = new_rows["instances"][0]
    for column, value in stored.items():
        if column in JSON_COLUMNS and value is not None:
            assert msgspec.json.encode(getattr(new, column)).decode() == value, column
        else:
            assert getattr(new, column) == value, column
    for tag_row in new_rows["instance_tags"]:
        assert tag_row["status"] == "BUILD"


def test_defaults_store_same_rows(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        # The organization's first create makes its default network and group.
        await service.create_instance(db, principal, create_request("first"), request_id="req-0")
        before = await table_counts(db, principal.organization_id)

        old, new = await create_both(db, principal, create_request(), with_key=True)

        await assert_same_rows(db, principal, old, new)
        after = await table_counts(db, principal.organization_id)
        assert after["instances"] == before["instances"] + 2
        assert after["instance_counts"] == after["instances"]
        assert after["idempotency_keys"] == before["idempotency_keys"] + 2

    postgres.run(check)


def test_every_field_stores_same_rows(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        organization_id = principal.organization_id
        first = await networks.create_network(db, organization_id, "net-a", "10.1.0.0/24")
        second = await networks.create_network(db, organization_id, "net-b", "10.2.0.0/24")
        await security_group_service.create_group(db, organization_id, "web \"ports\"", "", [])
        for name, kind in (("my-key", "ssh-ed25519"), ("backup-key", "ecdsa-sha2-nistp256")):
            await keypairs.create_keypair(db, principal, name, public_key(kind))
        request = create_request(
            "every field é",
            description=AWKWARD_TEXT,
            networks=[second.id, first.id],
            security_groups=["web \"ports\"", "default"],
            key_names=["backup-key", "my-key"],
            metadata={"zeta": "last", "alpha": AWKWARD_TEXT, "ünï": ""},
            tags=["é", "web", "a b"],
        )
        await service._create_in_transaction(db, principal, request, request_id="warm", idempotency=None)

        old, new = await create_both(db, principal, request, with_key=False)

        await assert_same_rows(db, principal, old, new)
        assert new.network_ids == [str(second.id), str(first.id)]

    postgres.run(check)


def test_private_flavor_for_admin(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        flavor = await catalog.create_item(
            db, "flavor",
            {"name": f"private-{uuid.uuid4().hex[:6]}", "vcpus": 1, "ram": 512, "disk": 10, "is_public": False},
        )
        admin = await new_principal(db, admin=True)
        request = create_request(flavor_id=flavor.id)
        await service.create_instance(db, admin, request, request_id="warm")

        old, new = await create_both(db, admin, request, with_key=True)
        await assert_same_rows(db, admin, old, new)

        customer = await new_principal(db)
        await service.create_instance(db, customer, create_request("first"), request_id="warm")
        before = await table_counts(db, customer.organization_id)
        created = await instance_create.create_in_one_statement(
            db, customer, request, request_id="req-2", idempotency=idempotency(customer, "private")
        )
        assert created is None
        assert await table_counts(db, customer.organization_id) == before
        with pytest.raises(InvalidParameter, match="flavor .* not found"):
            await service.create_instance(db, customer, request, request_id="req-3")

    postgres.run(check)


FOREIGN_CASES = [
    ("networks", "network"),
    ("security_groups", "security group"),
    ("key_names", "key pair"),
]


@pytest.mark.parametrize("field,noun", FOREIGN_CASES)
def test_foreign_reference_changes_nothing(postgres: Backend, field: str, noun: str) -> None:
    async def check(db: Database) -> None:
        owner = await new_principal(db)
        network = await networks.create_network(db, owner.organization_id, "owned", "10.9.0.0/24")
        await security_group_service.create_group(db, owner.organization_id, "owned-group", "", [])
        await keypairs.create_keypair(db, owner, "owned-key", public_key("ssh-ed25519"))
        foreign = {"networks": [network.id], "security_groups": ["owned-group"], "key_names": ["owned-key"]}

        principal = await new_principal(db)
        await service.create_instance(db, principal, create_request("first"), request_id="warm")
        before = await table_counts(db, principal.organization_id)
        request = create_request(**{field: foreign[field]})

        created = await instance_create.create_in_one_statement(
            db, principal, request, request_id="req-1", idempotency=idempotency(principal, "foreign")
        )

        assert created is None
        assert await table_counts(db, principal.organization_id) == before
        with pytest.raises(InvalidParameter, match=f"{noun} .*not found"):
            await service.create_instance(
                db, principal, request, request_id="req-2", idempotency=idempotency(principal, "foreign")
            )
        assert await table_counts(db, principal.organization_id) == before

    postgres.run(check)


def test_stale_catalog_entry_falls_back(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        await service.create_instance(db, principal, create_request("first"), request_id="warm")
        flavor_id = uuid.UUID(SMALL_FLAVOR)
        cached = instance_create._flavors[flavor_id]
        instance_create._flavors[flavor_id] = replace(cached, name="renamed")
        before = await table_counts(db, principal.organization_id)

        created = await instance_create.create_in_one_statement(
            db, principal, create_request(), request_id="req-1", idempotency=None
        )
        assert created is None
        assert flavor_id not in instance_create._flavors
        assert await table_counts(db, principal.organization_id) == before

        row = await service.create_instance(db, principal, create_request(), request_id="req-2")
        assert row.flavor["name"] == cached.name
        assert instance_create._flavors[flavor_id] == cached

    postgres.run(check)


def test_live_key_changes_nothing(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        await service.create_instance(db, principal, create_request("first"), request_id="warm")
        first = await instance_create.create_in_one_statement(
            db, principal, create_request(), request_id="req-1", idempotency=idempotency(principal, "k")
        )
        assert first is not None
        before = await table_counts(db, principal.organization_id)
        stored = await key_row(db, principal.organization_id, "k")

        again = await instance_create.create_in_one_statement(
            db, principal, create_request(), request_id="req-2", idempotency=idempotency(principal, "k")
        )

        assert again is None
        assert await table_counts(db, principal.organization_id) == before
        assert await key_row(db, principal.organization_id, "k") == stored

    postgres.run(check)


def test_expired_keys_taken_over_and_purged(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        organization_id = principal.organization_id
        await service.create_instance(db, principal, create_request("first"), request_id="warm")
        for key in ("reused", "old-1", "old-2", "live"):
            created = await instance_create.create_in_one_statement(
                db, principal, create_request(key), request_id=key,
                idempotency=idempotency(principal, key), purge_expired_keys=False,
            )
            assert created is not None
        async with db.autocommit_driver_connection() as connection:
            await connection.execute(
                "UPDATE idempotency_keys SET created_at = $2 WHERE organization_id = $1 AND key <> 'live'",
                organization_id, utcnow() - KEY_LIFETIME - timedelta(seconds=1),
            )

        created = await instance_create.create_in_one_statement(
            db, principal, create_request("again"), request_id="again",
            idempotency=idempotency(principal, "reused", "1" * 64), purge_expired_keys=True,
        )

        assert created is not None
        reused = await key_row(db, organization_id, "reused")
        assert reused is not None
        assert reused["request_hash"] == "1" * 64
        assert reused["location"] == f"/v1/instances/{created.id}"
        assert await key_row(db, organization_id, "old-1") is None
        assert await key_row(db, organization_id, "old-2") is None
        assert await key_row(db, organization_id, "live") is not None

    postgres.run(check)


def test_missing_default_group_uses_transaction(postgres: Backend) -> None:
    async def check(db: Database) -> None:
        principal = await new_principal(db)
        await service.create_instance(db, principal, create_request("first"), request_id="warm")
        async with db.autocommit_driver_connection() as connection:
            await connection.execute(
                "DELETE FROM instance_security_groups WHERE organization_id = $1", principal.organization_id
            )
            await connection.execute(
                "DELETE FROM security_groups WHERE organization_id = $1 AND name = 'default'",
                principal.organization_id,
            )
        before = await table_counts(db, principal.organization_id)

        created = await instance_create.create_in_one_statement(
            db, principal, create_request(), request_id="req-1", idempotency=None
        )

        assert created is None
        assert await table_counts(db, principal.organization_id) == before
        row = await service.create_instance(db, principal, create_request(), request_id="req-2")
        assert row.security_groups == [{"name": "default"}]
        after = await table_counts(db, principal.organization_id)
        assert after["instance_security_groups"] == before["instance_security_groups"] + 1

    postgres.run(check)


def test_sqlite_uses_transaction(tmp_path: Path) -> None:
    with new_backend("sqlite", tmp_path) as backend:
        async def check(db: Database) -> None:
            principal = await new_principal(db)
            row = await service.create_instance(db, principal, create_request(), request_id="req-1")
            assert not isinstance(row, instance_create.CreatedInstance)

        backend.run(check)
