"""Queries on organizations and tokens."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import organizations, tokens


async def insert_organization(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(organizations).values(**values))


async def find_organization(conn: AsyncConnection, name: str) -> Row[Any] | None:
    return (await conn.execute(select(organizations).where(organizations.c.name == name))).first()


async def list_organizations(conn: AsyncConnection) -> list[Row[Any]]:
    query = select(organizations).order_by(organizations.c.name)
    return list((await conn.execute(query)).all())


async def insert_token(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(tokens).values(**values))


async def find_token_by_hash(conn: AsyncConnection, secret_hash: str) -> Row[Any] | None:
    query = (
        select(tokens, organizations.c.name.label("organization_name"))
        .join(organizations, organizations.c.id == tokens.c.organization_id)
        .where(tokens.c.secret_hash == secret_hash)
    )
    return (await conn.execute(query)).first()


async def find_token(conn: AsyncConnection, organization_id: uuid.UUID, name: str) -> Row[Any] | None:
    query = select(tokens).where(tokens.c.organization_id == organization_id, tokens.c.name == name)
    return (await conn.execute(query)).first()


async def list_tokens(conn: AsyncConnection, organization_id: uuid.UUID) -> list[Row[Any]]:
    query = select(tokens).where(tokens.c.organization_id == organization_id).order_by(tokens.c.name)
    return list((await conn.execute(query)).all())


async def revoke_token(
    conn: AsyncConnection, organization_id: uuid.UUID, name: str, when: datetime
) -> int:
    result = await conn.execute(
        update(tokens)
        .where(
            tokens.c.organization_id == organization_id,
            tokens.c.name == name,
            tokens.c.revoked_at.is_(None),
        )
        .values(revoked_at=when)
    )
    return result.rowcount
