"""The public catalog: flavors and images, readable by every token, managed by admins."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Row

from mycloud_compute.persistence import catalog as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import flavors, images
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.instances import check_name
from mycloud_compute.services.listing import ListQuery
from mycloud_compute.services.text import reject_control_characters

log = logging.getLogger(__name__)

KINDS: dict[str, Table] = {"flavor": flavors, "image": images}
_ARTICLE = {"flavor": "a", "image": "an"}


@dataclass(frozen=True)
class CatalogPage:
    rows: list[Row[Any]]
    total: int
    has_more: bool
    previous_marker: uuid.UUID | None
    previous_is_first: bool


async def list_items(
    db: Database, kind: str, query: ListQuery, *, include_private: bool
) -> CatalogPage:
    """List a page; private flavors (is_public false) only for admin-scoped callers."""
    table = KINDS[kind]
    async with db.snapshot() as conn:
        position = None
        previous_marker, previous_is_first = None, False
        if query.marker is not None:
            # Deleted entries stay valid markers, like deleted instances.
            marker_row = await store.get(
                conn, table, query.marker, deleted=True, include_private=include_private
            )
            if marker_row is None:
                raise InvalidParameter("marker", str(query.marker), f"marker {query.marker} not found")
            position = (marker_row.name, marker_row.id)
            previous_is_first, previous_marker = await store.position_before(
                conn, table, marker=position, limit=query.limit, include_private=include_private
            )
        rows = await store.list_page(
            conn, table, after=position, limit=query.limit, include_private=include_private
        )
        total = await store.count(conn, table, include_private=include_private)
    return CatalogPage(
        rows=rows[: query.limit],
        total=total,
        has_more=len(rows) > query.limit,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )


async def get_item(
    db: Database, kind: str, item_id: uuid.UUID, *, include_private: bool
) -> Row[Any]:
    async with db.snapshot() as conn:
        row = await store.get(conn, KINDS[kind], item_id, include_private=include_private)
    if row is None:
        raise NotFound(f"{kind} {item_id} not found")
    return row


async def create_item(db: Database, kind: str, values: dict[str, Any]) -> Row[Any]:
    """Insert a flavor or an image; names are unique among live entries."""
    check_name(values["name"])
    if kind == "image":
        # Checked like names; a NUL would also make the INSERT fail on PostgreSQL.
        reject_control_characters("os_distro", values["os_distro"])
        reject_control_characters("os_version", values["os_version"])
    table = KINDS[kind]
    item_id = uuid.uuid4()
    row_values = {"id": item_id, "created_at": utcnow(), **values}
    if kind == "image":
        row_values["status"] = "ACTIVE"
    async with db.transaction() as conn:
        if await store.find_by_name(conn, table, values["name"]) is not None:
            raise Conflict(f"{_ARTICLE[kind]} {kind} named {values['name']!r} already exists")
        await store.insert_row(conn, table, row_values)
        row = await store.get(conn, table, item_id)
    log.info("%s created %s_id=%s name=%s", kind, kind, item_id, values["name"])
    assert row is not None
    return row


async def delete_item(db: Database, kind: str, item_id: uuid.UUID) -> None:
    """Soft-delete: instances keep the flavor and image values they were built with."""
    async with db.transaction() as conn:
        if await store.soft_delete(conn, KINDS[kind], item_id, utcnow()) == 0:
            raise NotFound(f"{kind} {item_id} not found")
    log.info("%s deleted %s_id=%s", kind, kind, item_id)
