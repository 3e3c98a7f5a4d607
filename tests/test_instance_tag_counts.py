"""The tag counters behind ``meta.total`` of a tags filter, on SQLite and PostgreSQL.

Migration 0007 keeps ``instance_tag_counts``, the number of instances per
(organization, tag, status), with database triggers on ``instance_tags``. These
tests change tag rows in every way the service and the database allow (creates
with tags, tag replacements, renamed tags, status changes, deletes, rolled-back
transactions and savepoints, the API and the worker), then check that:

- the counters equal a direct count over instances joined with their tags;
- the list's ``meta.total`` for a tags filter, with and without a status filter,
  equals the number of instances a walk through all pages returns.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlencode

import asyncpg
import pytest
from alembic import command
from conftest import ApiServer, Backend, Org, make_org
from helpers import create_instance, wait_for
from sqlalchemy import and_, delete, func, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncConnection
from test_instances_list import (
    get_list,
    insert_instances,
    instance_row,
    organization_id_of,
    walk_next,
)

from mycloud_compute.persistence import identity as identity_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.migrate import alembic_config, upgrade
from mycloud_compute.persistence.tables import (
    flavors,
    images,
    instance_tag_counts,
    instance_tags,
    instances,
)
from mycloud_compute.services import identity

# Filters whose totals the tests compare with a walk through the pages. Each one
# names one tag, so its total comes from the counters, except the last two.
TAG_FILTERS: list[dict[str, str]] = [
    {"tags": "web"},
    {"tags": "prod"},
    {"tags": "db"},
    {"tags": "web", "status": "SHUTOFF"},
    {"tags": "web", "status": "active,error"},
    {"tags": "prod", "status": "DELETED"},
    {"tags": "db", "status": "ACTIVE,SHUTOFF,ERROR,BUILD,DELETED"},
    {"tags": "absent"},
    {"tags": "web,prod"},
    {"tags": "web,db", "status": "SHUTOFF"},
]

# Instance counts per (tag, status).
Counts = dict[tuple[str, str], int]


class Rollback(Exception):
    """Raised inside a transaction to roll it back."""


# --- counters and direct counts -------------------------------------------------------


async def read_counts(conn: AsyncConnection, organization_id: uuid.UUID) -> tuple[Counts, Counts]:
    """Return the organization's non-zero counters and the direct count, per (tag, status)."""
    counter_rows = await conn.execute(
        select(instance_tag_counts.c.tag, instance_tag_counts.c.status, instance_tag_counts.c.count)
        .where(instance_tag_counts.c.organization_id == organization_id)
    )
    stored = {(row.tag, row.status): row.count for row in counter_rows}
    assert all(value >= 0 for value in stored.values()), stored

    # The instance's own status, not the copy on the tag row, so that this also
    # checks the copy.
    key = (instance_tags.c.tag, instances.c.status)
    rows = await conn.execute(
        select(*key, func.count())
        .select_from(
            instance_tags.join(
                instances,
                and_(
                    instances.c.organization_id == instance_tags.c.organization_id,
                    instances.c.id == instance_tags.c.instance_id,
                ),
            )
        )
        .where(instance_tags.c.organization_id == organization_id)
        .group_by(*key)
    )
    counted = {(row[0], row[1]): row[2] for row in rows}
    return {key: value for key, value in stored.items() if value != 0}, counted


def assert_counters_exact(org: Org) -> Counts:
    async def read(db: Database) -> tuple[Counts, Counts]:
        async with db.snapshot() as conn:
            return await read_counts(conn, await organization_id_of(conn, org))

    counters, counted = org.api.backend.run(read)
    assert counters == counted
    return counters  # type: ignore[no-any-return]


def direct_total(org: Org, params: dict[str, str]) -> int:
    """Count the instances that match ``params`` with one query over the instances."""
    tags = params["tags"].split(",")
    statuses = params["status"].upper().split(",") if "status" in params else None

    async def read(db: Database) -> int:
        async with db.snapshot() as conn:
            organization_id = await organization_id_of(conn, org)
            clauses = [instances.c.organization_id == organization_id]
            if statuses is None:
                clauses.append(instances.c.status != "DELETED")
            else:
                clauses.append(instances.c.status.in_(statuses))
            for tag in tags:
                clauses.append(
                    instances.c.id.in_(
                        select(instance_tags.c.instance_id).where(
                            instance_tags.c.organization_id == organization_id, instance_tags.c.tag == tag
                        )
                    )
                )
            query = select(func.count()).select_from(instances).where(*clauses)
            return int((await conn.execute(query)).scalar_one())

    return org.api.backend.run(read)  # type: ignore[no-any-return]


def assert_totals_match_walks(org: Org) -> None:
    with org.client("read") as client:
        for params in TAG_FILTERS:
            total = get_list(client, params)["meta"]["total"]
            pages = walk_next(client, "/v1/instances?" + urlencode({**params, "limit": "2"}))
            walked = [item["id"] for page in pages for item in page["instances"]]
            assert len(walked) == len(set(walked)), params
            assert total == len(walked), params
            assert total == direct_total(org, params), params
            assert all(page["meta"]["total"] == total for page in pages), params


def write(org: Org, change: Any) -> None:
    """Run ``change(conn, organization_id)`` in one committed transaction."""

    async def run(db: Database) -> None:
        async with db.transaction() as conn:
            await change(conn, await organization_id_of(conn, org))

    org.api.backend.run(run)


def set_status(instance_id: str, status: str) -> Any:
    async def change(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await conn.execute(
            update(instances)
            .where(instances.c.organization_id == organization_id, instances.c.id == uuid.UUID(instance_id))
            .values(status=status)
        )

    return change


def replace_tags(instance_id: str, tags: list[str]) -> Any:
    async def change(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await instance_store.replace_tags(conn, organization_id, uuid.UUID(instance_id), tags)

    return change


# --- writes through the database --------------------------------------------------------


def test_counters_follow_database_writes(api: ApiServer) -> None:
    org = make_org(api, "tag-counts")
    ids = insert_instances(
        org,
        [
            {"name": "t-0", "tags": ["web", "prod"]},
            {"name": "t-1", "status": "SHUTOFF", "tags": ["web"]},
            {"name": "t-2", "status": "ERROR", "tags": ["db", "prod", "web"]},
            {"name": "t-3", "status": "BUILD", "tags": ["db"]},
            {"name": "t-4"},
            {"name": "t-5", "status": "DELETED", "tags": ["web", "prod"]},
            {"name": "t-6", "tags": ["prod", "db"]},
        ],
    )
    counters = assert_counters_exact(org)
    assert counters[("web", "ACTIVE")] == 1
    assert counters[("prod", "DELETED")] == 1
    assert_totals_match_walks(org)

    # A replacement that keeps one tag, drops one and adds one, then a first tag.
    write(org, replace_tags(ids[0], ["prod", "db"]))
    assert_counters_exact(org)
    write(org, replace_tags(ids[4], ["web"]))
    assert_counters_exact(org)

    # Status changes, alone and together with new tags in one update.
    write(org, set_status(ids[1], "ACTIVE"))
    assert_counters_exact(org)

    async def status_and_tags(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await instance_store.update_instance(
            conn, organization_id, uuid.UUID(ids[2]), {"status": "SHUTOFF", "tags": ["web", "db"]}
        )

    write(org, status_and_tags)
    assert_counters_exact(org)
    write(org, set_status(ids[3], "DELETED"))
    assert_counters_exact(org)

    # A deleted instance row takes its tag rows with it (ON DELETE CASCADE).
    async def delete_row(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await conn.execute(
            delete(instances).where(
                instances.c.organization_id == organization_id, instances.c.id == uuid.UUID(ids[6])
            )
        )

    write(org, delete_row)
    assert_counters_exact(org)

    # A tag renamed in place, which the service never does but the table allows.
    async def rename_tag(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await conn.execute(
            update(instance_tags)
            .where(instance_tags.c.organization_id == organization_id,
                   instance_tags.c.instance_id == uuid.UUID(ids[4]), instance_tags.c.tag == "web")
            .values(tag="prod")
        )

    write(org, rename_tag)
    assert_counters_exact(org)

    # Several instances in one transaction, their tags in opposite orders.
    async def two_instances(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
        await instance_store.replace_tags(conn, organization_id, uuid.UUID(ids[0]), ["web", "db"])
        await instance_store.replace_tags(conn, organization_id, uuid.UUID(ids[1]), ["db", "web", "prod"])
        await set_status(ids[0], "ERROR")(conn, organization_id)

    write(org, two_instances)
    counters = assert_counters_exact(org)
    assert_totals_match_walks(org)
    assert counters[("web", "ERROR")] == 1


def test_counters_ignore_rolled_back_changes(api: ApiServer) -> None:
    org = make_org(api, "tag-rollback")
    ids = insert_instances(org, [{"name": "r-0", "tags": ["web"]}, {"name": "r-1", "tags": ["prod"]}])
    before = assert_counters_exact(org)

    async def rolled_back(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            await replace_tags(ids[0], ["web", "prod", "db"])(conn, organization_id)
            await set_status(ids[1], "SHUTOFF")(conn, organization_id)
            raise Rollback

    with pytest.raises(Rollback):
        org.api.backend.run(rolled_back)
    assert assert_counters_exact(org) == before

    # A savepoint rolled back inside a transaction that commits. It comes first, so
    # on PostgreSQL the rollback also removes the session's temporary table of changes.
    async def savepoint(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            with pytest.raises(Rollback):
                async with conn.begin_nested():
                    await replace_tags(ids[0], ["gone"])(conn, organization_id)
                    await set_status(ids[1], "ERROR")(conn, organization_id)
                    raise Rollback
            await replace_tags(ids[1], ["prod", "db"])(conn, organization_id)
            await set_status(ids[0], "SHUTOFF")(conn, organization_id)

    org.api.backend.run(savepoint)
    counters = assert_counters_exact(org)
    assert counters == {("web", "SHUTOFF"): 1, ("prod", "ACTIVE"): 1, ("db", "ACTIVE"): 1}


# --- writes through the API and the worker -------------------------------------------------


def test_counters_follow_api_and_worker(api: ApiServer) -> None:
    org = make_org(api, "tag-api")
    with org.client() as client:
        first = create_instance(client, "api-0", tags=["web", "prod"])
        second = create_instance(client, "api-1", tags=["prod", "web", "db"])
        third = create_instance(client, "api-2", tags=["db"])
        for created in (first, second, third):
            wait_for(client, created["id"], status="ACTIVE")
        counters = assert_counters_exact(org)
        assert counters == {("web", "ACTIVE"): 2, ("prod", "ACTIVE"): 2, ("db", "ACTIVE"): 2}
        assert_totals_match_walks(org)

        response = client.patch(f"/v1/instances/{first['id']}", json={"tags": ["db", "web"]})
        assert response.status_code == 200, response.text
        response = client.post(f"/v1/instances/{second['id']}/actions/stop")
        assert response.status_code == 202, response.text
        wait_for(client, second["id"], status="SHUTOFF")
        assert client.delete(f"/v1/instances/{third['id']}").status_code == 202
        wait_for(client, third["id"], status="DELETED")

    counters = assert_counters_exact(org)
    assert counters == {
        ("web", "ACTIVE"): 1,
        ("db", "ACTIVE"): 1,
        ("prod", "SHUTOFF"): 1,
        ("web", "SHUTOFF"): 1,
        ("db", "SHUTOFF"): 1,
        ("db", "DELETED"): 1,
    }
    assert_totals_match_walks(org)


# --- the migration ---------------------------------------------------------------------


def fill(backend: Backend, name: str, specs: list[dict[str, Any]]) -> None:
    """Insert instances with tags into the organization ``name`` (created if missing)."""

    async def run(db: Database) -> None:
        async with db.snapshot() as conn:
            exists = await identity_store.find_organization(conn, name) is not None
        if not exists:
            await identity.create_organization(db, name)
        async with db.transaction() as conn:
            organization = await identity_store.find_organization(conn, name)
            flavor = (await conn.execute(select(flavors).limit(1))).one()
            image = (await conn.execute(select(images).limit(1))).one()
            for spec in specs:
                values = instance_row(organization.id, flavor, image, spec)
                await instance_store.insert_instance(conn, values)

    backend.run(run)


def has_counts_table(backend: Backend) -> bool:
    async def read(db: Database) -> bool:
        async with db.snapshot() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).has_table("instance_tag_counts"))

    return backend.run(read)  # type: ignore[no-any-return]


def counts_of(backend: Backend, name: str) -> tuple[Counts, Counts]:
    async def read(db: Database) -> tuple[Counts, Counts]:
        async with db.snapshot() as conn:
            organization = await identity_store.find_organization(conn, name)
            return await read_counts(conn, organization.id)

    return backend.run(read)  # type: ignore[no-any-return]


def test_migration_backfills_and_downgrades(fresh_backend: Backend) -> None:
    name = f"migrated-{uuid.uuid4().hex[:8]}"
    command.downgrade(alembic_config(fresh_backend.url), "0006")
    assert not has_counts_table(fresh_backend)
    fill(fresh_backend, name, [
        {"name": "m-0", "tags": ["web", "prod"]},
        {"name": "m-1", "status": "SHUTOFF", "tags": ["web"]},
        {"name": "m-2", "status": "DELETED", "tags": ["prod"]},
    ])

    upgrade(fresh_backend.url)
    counters, counted = counts_of(fresh_backend, name)
    assert counters == counted
    assert counters == {
        ("web", "ACTIVE"): 1, ("prod", "ACTIVE"): 1, ("web", "SHUTOFF"): 1, ("prod", "DELETED"): 1
    }
    fill(fresh_backend, name, [{"name": "m-3", "tags": ["web"]}])
    counters, counted = counts_of(fresh_backend, name)
    assert counters == counted

    # Without the table, no trigger may be left behind to write to it.
    command.downgrade(alembic_config(fresh_backend.url), "0006")
    assert not has_counts_table(fresh_backend)
    fill(fresh_backend, name, [{"name": "m-4", "tags": ["db"]}])

    upgrade(fresh_backend.url)
    counters, counted = counts_of(fresh_backend, name)
    assert counters == counted
    assert counters[("web", "ACTIVE")] == 2
    assert counters[("db", "ACTIVE")] == 1


# --- concurrent commits on PostgreSQL ---------------------------------------------------------


async def wait_until_blocked(observer: asyncpg.Connection, pid: int) -> None:
    """Return once the backend ``pid`` waits for a lock; fail after 20 s."""
    for _ in range(400):
        waiting = await observer.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND NOT granted)", pid
        )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"backend {pid} never waited for a lock")


def test_commits_lock_counters_in_key_order(api: ApiServer) -> None:
    """Two commits that add the same tags in opposite orders do not deadlock.

    A third transaction locks the counter row of "b". The first commit adds b then
    a, the second a then b. Applied in the order of the changes, the first would
    take "b" after that transaction commits while the second holds "a" and waits for
    "b": a deadlock. Applied in key order, both take "a" first and commit in turn.
    """
    if api.backend.kind != "postgresql":
        pytest.skip("SQLite runs one writer at a time")
    org = make_org(api, "tag-locks")
    seed, first, second = insert_instances(
        org, [{"name": "seed", "tags": ["a", "b"]}, {"name": "first"}, {"name": "second"}]
    )

    async def run() -> None:
        holder, first_writer, second_writer, observer = [await asyncpg.connect(api.backend.url) for _ in range(4)]
        try:
            organization_id = await observer.fetchval(
                "SELECT organization_id FROM instances WHERE id = $1", uuid.UUID(seed)
            )
            holding = holder.transaction()
            await holding.start()
            await holder.execute(
                "SELECT 1 FROM instance_tag_counts WHERE organization_id = $1 AND tag = 'b' "
                "AND status = 'ACTIVE' FOR UPDATE",
                organization_id,
            )
            commits = []
            for connection, instance_id, order in (
                (first_writer, first, ("b", "a")), (second_writer, second, ("a", "b"))
            ):
                transaction = connection.transaction()
                await transaction.start()
                await connection.executemany(
                    "INSERT INTO instance_tags (organization_id, instance_id, tag) VALUES ($1, $2, $3)",
                    [(organization_id, uuid.UUID(instance_id), tag) for tag in order],
                )
                commits.append(asyncio.create_task(transaction.commit()))
                await wait_until_blocked(observer, connection.get_server_pid())
            await holding.commit()
            await asyncio.gather(*commits)
        finally:
            for connection in (holder, first_writer, second_writer, observer):
                await connection.close()

    asyncio.run(run())
    counters = assert_counters_exact(org)
    assert counters == {("a", "ACTIVE"): 3, ("b", "ACTIVE"): 3}
