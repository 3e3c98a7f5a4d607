"""Keyset pages over one organization's rows of a table, in one fixed total order.

Used by the lists of networks, security groups and key pairs. Each list names the
columns of its order, and they must make the order total (end in a unique
column), so that a page that starts right after the marker's position never
skips or repeats a row. A page is an index range scan on (organization_id,
*columns), never an OFFSET.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, func, select, tuple_
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

Position = tuple[Any, ...]


@dataclass(frozen=True)
class ListOrder:
    """The order of a list: ``columns`` compared as a tuple, ascending or descending."""

    table: Table
    columns: tuple[str, ...]
    descending: bool
    # The column a marker names: ``id``, or ``name`` for key pairs.
    marker_column: str = "id"

    def key(self) -> ColumnElement[Any]:
        return tuple_(*(self.table.c[name] for name in self.columns))

    def order_by(self, *, reverse: bool = False) -> list[ColumnElement[Any]]:
        descending = self.descending != reverse
        columns = [self.table.c[name] for name in self.columns]
        return [column.desc() if descending else column.asc() for column in columns]

    def after(self, position: Position) -> ColumnElement[bool]:
        """Rows that follow ``position`` in the list order."""
        key, bound = self.key(), tuple_(*position)
        return key < bound if self.descending else key > bound

    def before(self, position: Position) -> ColumnElement[bool]:
        key, bound = self.key(), tuple_(*position)
        return key > bound if self.descending else key < bound


async def find_position(
    conn: AsyncConnection, order: ListOrder, organization_id: uuid.UUID, marker: Any
) -> Position | None:
    """Return the order columns of the row the marker names, or None when there is none."""
    table = order.table
    query = select(*(table.c[name] for name in order.columns)).where(
        table.c.organization_id == organization_id, table.c[order.marker_column] == marker
    )
    row = (await conn.execute(query)).first()
    return None if row is None else tuple(row)


async def list_page(
    conn: AsyncConnection,
    order: ListOrder,
    organization_id: uuid.UUID,
    *,
    after: Position | None,
    limit: int,
) -> list[Row[Any]]:
    """Return up to ``limit + 1`` rows after ``after``; the extra row means a page follows."""
    table = order.table
    query = select(table).where(table.c.organization_id == organization_id)
    if after is not None:
        query = query.where(order.after(after))
    query = query.order_by(*order.order_by()).limit(limit + 1)
    return list((await conn.execute(query)).all())


async def position_before(
    conn: AsyncConnection,
    order: ListOrder,
    organization_id: uuid.UUID,
    *,
    marker: Position,
    limit: int,
) -> tuple[bool, Any]:
    """Return the marker of the page that ends at ``marker``.

    The result is (True, None) when that page is the first page, which has no
    marker, and (False, marker value) otherwise.
    """
    table = order.table
    query = (
        select(table.c[order.marker_column])
        .where(table.c.organization_id == organization_id, order.before(marker))
        .order_by(*order.order_by(reverse=True))
        .limit(limit)
    )
    markers = (await conn.execute(query)).scalars().all()
    if len(markers) < limit:
        return True, None
    return False, markers[-1]


async def count(conn: AsyncConnection, table: Table, organization_id: uuid.UUID) -> int:
    query = (
        select(func.count()).select_from(table).where(table.c.organization_id == organization_id)
    )
    return int((await conn.execute(query)).scalar_one())
