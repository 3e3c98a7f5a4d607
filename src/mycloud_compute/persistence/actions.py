"""Queries on the action history of instances (``instance_actions``).

One instance's history is listed newest first by (started_at, id). Ids are
unique, so the order is total and a keyset page never skips or repeats a record.
Every query is a range scan on ``ix_instance_actions_org_instance_started``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select, tuple_
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import instance_actions, tasks
from mycloud_compute.persistence.tasks import UNFINISHED

Position = tuple[datetime, uuid.UUID]

_ORDER_KEY = tuple_(instance_actions.c.started_at, instance_actions.c.id)


def _of_instance(organization_id: uuid.UUID, instance_id: uuid.UUID) -> ColumnElement[bool]:
    return and_(
        instance_actions.c.organization_id == organization_id,
        instance_actions.c.instance_id == instance_id,
    )


async def get(conn: AsyncConnection, organization_id: uuid.UUID, action_id: uuid.UUID) -> Row[Any] | None:
    query = select(instance_actions).where(
        instance_actions.c.organization_id == organization_id, instance_actions.c.id == action_id
    )
    return (await conn.execute(query)).first()


async def find_position(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, action_id: uuid.UUID
) -> Position | None:
    """Return the sort position of one of the instance's action records, or None."""
    query = select(instance_actions.c.started_at, instance_actions.c.id).where(
        _of_instance(organization_id, instance_id), instance_actions.c.id == action_id
    )
    row = (await conn.execute(query)).first()
    return (row.started_at, row.id) if row else None


async def list_page(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    *,
    after: Position | None,
    limit: int,
) -> list[Row[Any]]:
    """Return up to ``limit + 1`` records after ``after``, newest first; the extra one means a page follows."""
    query = select(instance_actions).where(_of_instance(organization_id, instance_id))
    if after is not None:
        query = query.where(_ORDER_KEY < tuple_(*after))
    query = query.order_by(
        instance_actions.c.started_at.desc(), instance_actions.c.id.desc()
    ).limit(limit + 1)
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    *,
    marker: Position,
    limit: int,
) -> tuple[bool, uuid.UUID | None]:
    """Find the marker of the page that ends at ``marker``.

    Returns (True, None) when that page is the first page, which has no marker.
    """
    query = (
        select(instance_actions.c.id)
        .where(_of_instance(organization_id, instance_id), _ORDER_KEY > tuple_(*marker))
        .order_by(instance_actions.c.started_at.asc(), instance_actions.c.id.asc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


async def count(conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID) -> int:
    query = (
        select(func.count())
        .select_from(instance_actions)
        .where(_of_instance(organization_id, instance_id))
    )
    return int((await conn.execute(query)).scalar_one())


async def find_unfinished_task(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> Row[Any] | None:
    """Return the oldest PENDING or RUNNING task of the instance, or None."""
    query = (
        select(tasks)
        .where(
            tasks.c.organization_id == organization_id,
            tasks.c.instance_id == instance_id,
            tasks.c.state.in_(UNFINISHED),
        )
        .order_by(tasks.c.created_at, tasks.c.id)
        .limit(1)
    )
    return (await conn.execute(query)).first()
