"""Queries on instances and their tags."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import instance_tags, instances

# Columns returned for the API representation of an instance, in the public order.
INSTANCE_COLUMNS = (
    instances.c.id,
    instances.c.name,
    instances.c.description,
    instances.c.status,
    instances.c.power_state,
    instances.c.task_state,
    instances.c.vm_state,
    instances.c.flavor,
    instances.c.image,
    instances.c.addresses,
    instances.c.security_groups,
    instances.c.volumes_attached,
    instances.c.key_names,
    instances.c["metadata"],
    instances.c.tags,
    instances.c.fault,
    instances.c.created_at,
    instances.c.updated_at,
    instances.c.launched_at,
    instances.c.terminated_at,
)


@dataclass(frozen=True)
class InstanceFilters:
    """Filter values of the list endpoint; None means "not filtered"."""

    name: str | None = None
    name_is_prefix: bool = False
    statuses: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    flavor_id: uuid.UUID | None = None
    image_id: uuid.UUID | None = None


Position = tuple[datetime, uuid.UUID]


def _prefix_upper_bound(prefix: str) -> str | None:
    """Return the smallest string greater than every string starting with ``prefix``.

    None means there is no upper bound (the prefix is empty or made only of the
    largest code point).
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop()) + 1
        if 0xD800 <= last <= 0xDFFF:  # surrogates cannot be stored; skip past them
            last = 0xE000
        if last <= 0x10FFFF:
            return "".join(chars) + chr(last)
    return None


def _where(organization_id: uuid.UUID, filters: InstanceFilters) -> list[ColumnElement[bool]]:
    clauses: list[ColumnElement[bool]] = [instances.c.organization_id == organization_id]

    if filters.statuses is None:
        clauses.append(instances.c.status != "DELETED")
    elif len(filters.statuses) == 1:
        clauses.append(instances.c.status == filters.statuses[0])
    else:
        clauses.append(instances.c.status.in_(filters.statuses))

    if filters.name is not None:
        if not filters.name_is_prefix:
            clauses.append(instances.c.name == filters.name)
        elif filters.name:
            # A range instead of LIKE: LIKE treats % and _ as wildcards and is
            # case-insensitive on SQLite, while the filter must be literal and exact.
            clauses.append(instances.c.name >= filters.name)
            upper = _prefix_upper_bound(filters.name)
            if upper is not None:
                clauses.append(instances.c.name < upper)

    if filters.flavor_id is not None:
        clauses.append(instances.c.flavor_id == filters.flavor_id)
    if filters.image_id is not None:
        clauses.append(instances.c.image_id == filters.image_id)

    if filters.tags:
        clauses.append(instances.c.id.in_(_having_every_tag(organization_id, filters.tags)))
    return clauses


def _having_every_tag(organization_id: uuid.UUID, tags: tuple[str, ...]) -> Select[Any]:
    """Ids of the instances that carry every tag in ``tags``.

    One grouped subquery: (organization_id, instance_id, tag) is the primary key,
    so an instance matches exactly when it has one row per requested tag.
    """
    query = select(instance_tags.c.instance_id).where(instance_tags.c.organization_id == organization_id)
    if len(tags) == 1:
        return query.where(instance_tags.c.tag == tags[0])
    return (
        query.where(instance_tags.c.tag.in_(tags))
        .group_by(instance_tags.c.instance_id)
        .having(func.count() == len(tags))
    )


async def find_position(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Position | None:
    """Return the sort position of an instance, deleted ones included."""
    row = (
        await conn.execute(
            select(instances.c.created_at, instances.c.id).where(
                instances.c.organization_id == organization_id, instances.c.id == instance_id
            )
        )
    ).first()
    return (row.created_at, row.id) if row else None


async def list_page(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    filters: InstanceFilters,
    *,
    after: Position | None,
    limit: int,
) -> list[Any]:
    """Return up to ``limit + 1`` instances after ``after`` in list order.

    The order (created_at DESC, id DESC) is total because ids are unique, so a keyset
    condition on the pair never skips or repeats rows that share a created_at.
    """
    clauses = _where(organization_id, filters)
    if after is not None:
        clauses.append(tuple_(instances.c.created_at, instances.c.id) < tuple_(*after))
    query = (
        select(*INSTANCE_COLUMNS)
        .where(and_(*clauses))
        .order_by(instances.c.created_at.desc(), instances.c.id.desc())
        .limit(limit + 1)
    )
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    filters: InstanceFilters,
    *,
    marker: Position,
    limit: int,
) -> tuple[bool, uuid.UUID | None]:
    """Find the marker of the page before the one that starts after ``marker``.

    The previous page is the ``limit`` instances ending with the marker itself. Its
    own marker is the ``limit``-th instance counted back from ``marker``. Returns
    (True, None) when the previous page is the first page.
    """
    clauses = _where(organization_id, filters)
    clauses.append(tuple_(instances.c.created_at, instances.c.id) > tuple_(*marker))
    query = (
        select(instances.c.id)
        .where(and_(*clauses))
        .order_by(instances.c.created_at.asc(), instances.c.id.asc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


async def count(conn: AsyncConnection, organization_id: uuid.UUID, filters: InstanceFilters) -> int:
    query = select(func.count()).select_from(instances).where(and_(*_where(organization_id, filters)))
    return int((await conn.execute(query)).scalar_one())


async def get(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Row[Any] | None:
    query = select(instances).where(
        instances.c.organization_id == organization_id, instances.c.id == instance_id
    )
    return (await conn.execute(query)).first()


async def get_for_update(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Row[Any] | None:
    """Read an instance and lock its row until the transaction ends (PostgreSQL)."""
    query = (
        select(instances)
        .where(instances.c.organization_id == organization_id, instances.c.id == instance_id)
        .with_for_update()
    )
    return (await conn.execute(query)).first()


async def insert_instance(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(instances).values(**values))
    await replace_tags(conn, values["organization_id"], values["id"], values["tags"])


async def update_instance(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, values: dict[str, Any]
) -> None:
    await conn.execute(
        update(instances)
        .where(instances.c.organization_id == organization_id, instances.c.id == instance_id)
        .values(**values)
    )
    if "tags" in values:
        await replace_tags(conn, organization_id, instance_id, values["tags"])


async def replace_tags(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, tags: list[str]
) -> None:
    await conn.execute(
        delete(instance_tags).where(
            instance_tags.c.organization_id == organization_id,
            instance_tags.c.instance_id == instance_id,
        )
    )
    if tags:
        await conn.execute(
            insert(instance_tags),
            [{"organization_id": organization_id, "instance_id": instance_id, "tag": tag} for tag in tags],
        )
