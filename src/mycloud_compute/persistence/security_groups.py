"""Queries on security groups, their rules and the instances that use them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.keyset import ListOrder
from mycloud_compute.persistence.tables import (
    instance_security_groups,
    instances,
    security_group_rules,
    security_groups,
)

LIST_ORDER = ListOrder(security_groups, ("created_at", "id"), descending=True)


async def get(
    conn: AsyncConnection, organization_id: uuid.UUID, group_id: uuid.UUID, *, lock: bool = False
) -> Row[Any] | None:
    """Return the group; ``lock`` locks it FOR UPDATE (on PostgreSQL) until commit."""
    query = select(security_groups).where(
        security_groups.c.organization_id == organization_id, security_groups.c.id == group_id
    )
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).first()


async def find_by_names(
    conn: AsyncConnection, organization_id: uuid.UUID, names: Sequence[str], *, lock: bool = False
) -> dict[str, Row[Any]]:
    """Return the groups named ``names`` by name.

    ``lock`` takes FOR KEY SHARE on PostgreSQL, which keeps them from being deleted
    until commit but lets other readers and rule changes through.
    """
    query = select(security_groups).where(
        security_groups.c.organization_id == organization_id, security_groups.c.name.in_(names)
    )
    if lock:
        query = query.with_for_update(read=True, key_share=True)
    return {row.name: row for row in (await conn.execute(query)).all()}


async def insert_group(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(security_groups).values(**values))


async def delete_group(
    conn: AsyncConnection, organization_id: uuid.UUID, group_id: uuid.UUID
) -> None:
    """Delete the group, its rules (by cascade) and its rows of deleted instances.

    The caller has checked under the group's lock that no live instance uses it.
    """
    await conn.execute(
        delete(instance_security_groups).where(
            instance_security_groups.c.organization_id == organization_id,
            instance_security_groups.c.security_group_id == group_id,
        )
    )
    await conn.execute(
        delete(security_groups).where(
            security_groups.c.organization_id == organization_id, security_groups.c.id == group_id
        )
    )


# --- rules ----------------------------------------------------------------------------


async def rules_of(
    conn: AsyncConnection, organization_id: uuid.UUID, group_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[Row[Any]]]:
    """Return the rules of each group, in position order (groups without rules map to [])."""
    result: dict[uuid.UUID, list[Row[Any]]] = {group_id: [] for group_id in group_ids}
    if not group_ids:
        return result
    query = (
        select(security_group_rules)
        .where(
            security_group_rules.c.organization_id == organization_id,
            security_group_rules.c.security_group_id.in_(group_ids),
        )
        .order_by(security_group_rules.c.security_group_id, security_group_rules.c.position)
    )
    for row in (await conn.execute(query)).all():
        result[row.security_group_id].append(row)
    return result


async def get_rule(
    conn: AsyncConnection, organization_id: uuid.UUID, rule_id: uuid.UUID
) -> Row[Any] | None:
    query = select(security_group_rules).where(
        security_group_rules.c.organization_id == organization_id,
        security_group_rules.c.id == rule_id,
    )
    return (await conn.execute(query)).first()


async def next_rule_position(
    conn: AsyncConnection, organization_id: uuid.UUID, group_id: uuid.UUID
) -> int:
    query = select(func.max(security_group_rules.c.position)).where(
        security_group_rules.c.organization_id == organization_id,
        security_group_rules.c.security_group_id == group_id,
    )
    highest = (await conn.execute(query)).scalar_one_or_none()
    return 0 if highest is None else int(highest) + 1


async def insert_rules(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(insert(security_group_rules), rows)


async def delete_rule(
    conn: AsyncConnection, organization_id: uuid.UUID, group_id: uuid.UUID, rule_id: uuid.UUID
) -> int:
    result = await conn.execute(
        delete(security_group_rules).where(
            security_group_rules.c.organization_id == organization_id,
            security_group_rules.c.security_group_id == group_id,
            security_group_rules.c.id == rule_id,
        )
    )
    return result.rowcount


# --- instances ------------------------------------------------------------------------


async def attach_to_instance(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    group_ids: Sequence[uuid.UUID],
) -> None:
    rows = [
        {
            "organization_id": organization_id,
            "security_group_id": group_id,
            "instance_id": instance_id,
        }
        for group_id in group_ids
    ]
    if rows:
        await conn.execute(insert(instance_security_groups), rows)


async def instances_using(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    group_id: uuid.UUID,
    *,
    excluded_status: str,
    limit: int,
) -> list[uuid.UUID]:
    """Return up to ``limit`` ids of instances that use the group, skipping ``excluded_status``.

    An index range scan on the group's rows of instance_security_groups, each
    joined to its instance by primary key.
    """
    query = (
        select(instance_security_groups.c.instance_id)
        .join(
            instances,
            (instances.c.organization_id == instance_security_groups.c.organization_id)
            & (instances.c.id == instance_security_groups.c.instance_id),
        )
        .where(
            instance_security_groups.c.organization_id == organization_id,
            instance_security_groups.c.security_group_id == group_id,
            instances.c.status != excluded_status,
        )
        .order_by(instance_security_groups.c.instance_id)
        .limit(limit)
    )
    return list((await conn.execute(query)).scalars().all())
