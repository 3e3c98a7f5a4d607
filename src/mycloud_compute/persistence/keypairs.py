"""Queries on key pairs."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.keyset import ListOrder
from mycloud_compute.persistence.tables import keypairs

# Names are unique within an organization, so the name alone makes the order total.
LIST_ORDER = ListOrder(keypairs, ("name",), descending=False, marker_column="name")


async def get(conn: AsyncConnection, organization_id: uuid.UUID, name: str) -> Row[Any] | None:
    query = select(keypairs).where(
        keypairs.c.organization_id == organization_id, keypairs.c.name == name
    )
    return (await conn.execute(query)).first()


async def find_names(
    conn: AsyncConnection, organization_id: uuid.UUID, names: list[str], *, lock: bool = False
) -> set[str]:
    """Return which of ``names`` exist; ``lock`` keeps them from being deleted until commit."""
    query = select(keypairs.c.name).where(
        keypairs.c.organization_id == organization_id, keypairs.c.name.in_(names)
    )
    if lock:
        query = query.with_for_update(read=True, key_share=True)
    return set((await conn.execute(query)).scalars().all())


async def insert_keypair(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(keypairs).values(**values))


async def delete_keypair(conn: AsyncConnection, organization_id: uuid.UUID, name: str) -> int:
    result = await conn.execute(
        delete(keypairs).where(
            keypairs.c.organization_id == organization_id, keypairs.c.name == name
        )
    )
    return result.rowcount
