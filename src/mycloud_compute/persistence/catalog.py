"""Queries on flavors and images (the global catalog, ordered by name)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, func, insert, select, tuple_, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import flavors, images

Position = tuple[str, uuid.UUID]


def _visible(table: Table, include_private: bool) -> list[ColumnElement[bool]]:
    """Live rows, without private flavors unless the caller may see them."""
    clauses: list[ColumnElement[bool]] = [table.c.deleted_at.is_(None)]
    if not include_private and "is_public" in table.c:
        clauses.append(table.c.is_public.is_(True))
    return clauses


async def get(
    conn: AsyncConnection,
    table: Table,
    item_id: uuid.UUID,
    *,
    deleted: bool = False,
    include_private: bool = True,
) -> Row[Any] | None:
    query = select(table).where(table.c.id == item_id)
    if not deleted:
        query = query.where(table.c.deleted_at.is_(None))
    if not include_private and "is_public" in table.c:
        query = query.where(table.c.is_public.is_(True))
    return (await conn.execute(query)).first()


async def find_by_name(conn: AsyncConnection, table: Table, name: str) -> Row[Any] | None:
    query = select(table).where(table.c.name == name, table.c.deleted_at.is_(None))
    return (await conn.execute(query)).first()


async def list_page(
    conn: AsyncConnection,
    table: Table,
    *,
    after: Position | None,
    limit: int,
    include_private: bool,
) -> list[Row[Any]]:
    """Return up to ``limit + 1`` visible rows after ``after``, ordered by (name, id)."""
    clauses = _visible(table, include_private)
    if after is not None:
        clauses.append(tuple_(table.c.name, table.c.id) > tuple_(*after))
    query = select(table).where(and_(*clauses)).order_by(table.c.name, table.c.id).limit(limit + 1)
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection, table: Table, *, marker: Position, limit: int, include_private: bool
) -> tuple[bool, uuid.UUID | None]:
    """Marker of the page before the page after ``marker``; (True, None) for the first page."""
    clauses = _visible(table, include_private)
    clauses.append(tuple_(table.c.name, table.c.id) < tuple_(*marker))
    query = (
        select(table.c.id)
        .where(and_(*clauses))
        .order_by(table.c.name.desc(), table.c.id.desc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


async def count(conn: AsyncConnection, table: Table, *, include_private: bool) -> int:
    query = select(func.count()).select_from(table).where(and_(*_visible(table, include_private)))
    return int((await conn.execute(query)).scalar_one())


async def insert_row(conn: AsyncConnection, table: Table, values: dict[str, Any]) -> None:
    await conn.execute(insert(table).values(**values))


async def soft_delete(conn: AsyncConnection, table: Table, item_id: uuid.UUID, when: Any) -> int:
    result = await conn.execute(
        update(table).where(table.c.id == item_id, table.c.deleted_at.is_(None)).values(deleted_at=when)
    )
    return result.rowcount


__all__ = ["flavors", "images"]
