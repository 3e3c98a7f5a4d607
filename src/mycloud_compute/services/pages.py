"""One page of an organization's networks, security groups or key pairs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import keyset
from mycloud_compute.services.errors import InvalidParameter


@dataclass(frozen=True)
class Page:
    rows: list[Row[Any]]
    total: int
    has_more: bool
    # Marker of the previous page: None with previous_is_first=False means there is
    # no previous page (this is the first page).
    previous_marker: Any
    previous_is_first: bool


async def read_page(
    conn: AsyncConnection,
    order: keyset.ListOrder,
    organization_id: uuid.UUID,
    *,
    marker: Any,
    limit: int,
) -> Page:
    """Read the page after ``marker`` (None: the first page).

    Run it in one snapshot so that the page, the total and the previous marker
    agree. A marker that names no row of the organization is rejected, so another
    organization's ids get the same error as unknown ones.
    """
    position = None
    previous_marker, previous_is_first = None, False
    if marker is not None:
        position = await keyset.find_position(conn, order, organization_id, marker)
        if position is None:
            raise InvalidParameter("marker", str(marker), f"marker {marker} not found")
        previous_is_first, previous_marker = await keyset.position_before(
            conn, order, organization_id, marker=position, limit=limit
        )
    rows = await keyset.list_page(conn, order, organization_id, after=position, limit=limit)
    total = await keyset.count(conn, order.table, organization_id)
    return Page(
        rows=rows[:limit],
        total=total,
        has_more=len(rows) > limit,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )
