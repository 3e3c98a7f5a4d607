"""Queries on volumes and their attachments."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import volumes

Position = tuple[datetime, uuid.UUID]

# Values of the ``attach_status`` column of an IN_USE volume.
ATTACH_RESERVED = "RESERVED"
ATTACH_ATTACHED = "ATTACHED"


def _live(organization_id: uuid.UUID) -> list[ColumnElement[bool]]:
    return [volumes.c.organization_id == organization_id, volumes.c.status != "DELETED"]


async def find_position(
    conn: AsyncConnection, organization_id: uuid.UUID, volume_id: uuid.UUID
) -> Position | None:
    """Return the sort position of a volume, deleted ones included."""
    row = (
        await conn.execute(
            select(volumes.c.created_at, volumes.c.id).where(
                volumes.c.organization_id == organization_id, volumes.c.id == volume_id
            )
        )
    ).first()
    return (row.created_at, row.id) if row else None


async def list_page(
    conn: AsyncConnection, organization_id: uuid.UUID, *, after: Position | None, limit: int
) -> list[Row[Any]]:
    """Return up to ``limit + 1`` live volumes after ``after``, newest first.

    The order (created_at DESC, id DESC) is total because ids are unique, so the
    keyset condition never skips or repeats volumes that share a created_at.
    """
    clauses = _live(organization_id)
    if after is not None:
        clauses.append(tuple_(volumes.c.created_at, volumes.c.id) < tuple_(*after))
    query = (
        select(volumes)
        .where(and_(*clauses))
        .order_by(volumes.c.created_at.desc(), volumes.c.id.desc())
        .limit(limit + 1)
    )
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection, organization_id: uuid.UUID, *, marker: Position, limit: int
) -> tuple[bool, uuid.UUID | None]:
    """Find the marker of the page before the one that starts after ``marker``.

    Returns (True, None) when the previous page is the first page.
    """
    clauses = _live(organization_id)
    clauses.append(tuple_(volumes.c.created_at, volumes.c.id) > tuple_(*marker))
    query = (
        select(volumes.c.id)
        .where(and_(*clauses))
        .order_by(volumes.c.created_at.asc(), volumes.c.id.asc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


async def count(conn: AsyncConnection, organization_id: uuid.UUID) -> int:
    query = select(func.count()).select_from(volumes).where(and_(*_live(organization_id)))
    return int((await conn.execute(query)).scalar_one())


async def get(conn: AsyncConnection, organization_id: uuid.UUID, volume_id: uuid.UUID) -> Row[Any] | None:
    """Read a volume in any status, DELETED included."""
    query = select(volumes).where(
        volumes.c.organization_id == organization_id, volumes.c.id == volume_id
    )
    return (await conn.execute(query)).first()


async def lock_volumes(
    conn: AsyncConnection, organization_id: uuid.UUID, volume_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, Row[Any]]:
    """Read volumes and lock their rows until the transaction ends (PostgreSQL).

    The rows are locked in id order, so two transactions that lock overlapping
    sets wait for each other instead of deadlocking.
    """
    if not volume_ids:
        return {}
    query = (
        select(volumes)
        .where(volumes.c.organization_id == organization_id, volumes.c.id.in_(volume_ids))
        .order_by(volumes.c.id)
        .with_for_update()
    )
    return {row.id: row for row in (await conn.execute(query)).all()}


async def insert_volume(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(volumes).values(**values))


async def reserve(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    volume_id: uuid.UUID,
    *,
    instance_id: uuid.UUID,
    device: str,
    delete_on_termination: bool,
    now: datetime,
) -> bool:
    """Attach an AVAILABLE volume to an instance as RESERVED, or return False when it is not AVAILABLE."""
    result = await conn.execute(
        update(volumes)
        .where(
            volumes.c.organization_id == organization_id,
            volumes.c.id == volume_id,
            volumes.c.status == "AVAILABLE",
        )
        .values(
            status="IN_USE",
            attach_status=ATTACH_RESERVED,
            instance_id=instance_id,
            device=device,
            delete_on_termination=delete_on_termination,
            updated_at=now,
        )
    )
    return result.rowcount == 1


async def _lock_instance_volumes(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> None:
    """Lock the volumes attached to an instance in id order, as ``lock_volumes`` does.

    An UPDATE alone would lock them in scan order, which could deadlock with a
    create request that locks the same volumes in id order.
    """
    query = (
        select(volumes.c.id)
        .where(volumes.c.organization_id == organization_id, volumes.c.instance_id == instance_id)
        .order_by(volumes.c.id)
        .with_for_update()
    )
    await conn.execute(query)


async def mark_attached(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, now: datetime
) -> int:
    """Move the instance's RESERVED volumes to ATTACHED and return how many changed."""
    await _lock_instance_volumes(conn, organization_id, instance_id)
    result = await conn.execute(
        update(volumes)
        .where(
            volumes.c.organization_id == organization_id,
            volumes.c.instance_id == instance_id,
            volumes.c.attach_status == ATTACH_RESERVED,
        )
        .values(attach_status=ATTACH_ATTACHED, updated_at=now)
    )
    return result.rowcount


async def release_instance_volumes(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID, now: datetime
) -> tuple[int, int]:
    """Detach every volume of a terminated instance.

    Volumes attached with ``delete_on_termination`` become DELETED, and the others
    become AVAILABLE. Returns the (deleted, detached) counts. Repeating it changes nothing.
    """
    detached_values = {
        "attach_status": None,
        "instance_id": None,
        "device": None,
        "delete_on_termination": None,
        "updated_at": now,
    }
    attached_to_instance = and_(
        volumes.c.organization_id == organization_id, volumes.c.instance_id == instance_id
    )
    await _lock_instance_volumes(conn, organization_id, instance_id)
    deleted = await conn.execute(
        update(volumes)
        .where(attached_to_instance, volumes.c.delete_on_termination.is_(True))
        .values(status="DELETED", deleted_at=now, **detached_values)
    )
    detached = await conn.execute(
        update(volumes).where(attached_to_instance).values(status="AVAILABLE", **detached_values)
    )
    return deleted.rowcount, detached.rowcount


async def delete_available(
    conn: AsyncConnection, organization_id: uuid.UUID, volume_id: uuid.UUID, now: datetime
) -> bool:
    """Mark an AVAILABLE volume DELETED, or return False when it is not AVAILABLE."""
    result = await conn.execute(
        update(volumes)
        .where(
            volumes.c.organization_id == organization_id,
            volumes.c.id == volume_id,
            volumes.c.status == "AVAILABLE",
        )
        .values(status="DELETED", deleted_at=now, updated_at=now)
    )
    return result.rowcount == 1
