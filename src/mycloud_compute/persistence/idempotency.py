"""Queries on stored Idempotency-Key responses."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import idempotency_keys

# Expired keys of one organization deleted by one purge. The service purges at
# every PURGE_EVERY-th new key, so this must exceed PURGE_EVERY for the table to
# stay bounded without a separate purge job.
PURGE_BATCH = 200


def _key_matches(organization_id: uuid.UUID, key: str, route: str) -> Any:
    return and_(
        idempotency_keys.c.organization_id == organization_id,
        idempotency_keys.c.key == key,
        idempotency_keys.c.route == route,
    )


async def find(
    conn: AsyncConnection, organization_id: uuid.UUID, key: str, route: str, *, since: datetime
) -> Row[Any] | None:
    """Return the key's row when it was stored at or after ``since``."""
    query = select(idempotency_keys).where(
        _key_matches(organization_id, key, route), idempotency_keys.c.created_at >= since
    )
    return (await conn.execute(query)).first()


async def insert_claim(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    key: str,
    route: str,
    *,
    request_hash: str,
    now: datetime,
    expired_before: datetime,
) -> bool:
    """Insert the key's row without a response, or take over an expired row of the same key.

    Returns False, changing nothing, when a live row exists. It is one statement. On
    PostgreSQL it waits while another transaction has inserted the same key without
    committing yet, and returns False once that transaction commits.
    """
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(idempotency_keys).values(
        organization_id=organization_id,
        key=key,
        route=route,
        request_hash=request_hash,
        status_code=None,
        response_body=None,
        location=None,
        created_at=now,
    )
    upsert = statement.on_conflict_do_update(
        index_elements=[idempotency_keys.c.organization_id, idempotency_keys.c.key, idempotency_keys.c.route],
        set_={
            "request_hash": statement.excluded.request_hash,
            "status_code": None,
            "response_body": None,
            "location": None,
            "created_at": statement.excluded.created_at,
        },
        where=idempotency_keys.c.created_at < expired_before,
    ).returning(idempotency_keys.c.created_at)
    return (await conn.execute(upsert)).first() is not None


async def store_response(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    key: str,
    route: str,
    *,
    status_code: int,
    body: str,
    location: str | None,
) -> None:
    await conn.execute(
        update(idempotency_keys)
        .where(_key_matches(organization_id, key, route))
        .values(status_code=status_code, response_body=body, location=location)
    )


async def purge_expired(
    conn: AsyncConnection, organization_id: uuid.UUID, *, expired_before: datetime
) -> int:
    """Delete up to PURGE_BATCH expired keys of an organization and return how many.

    On PostgreSQL, rows that another transaction has locked are skipped, so the
    purge never waits for a lock. SQLite runs one writer at a time.
    """
    columns = (idempotency_keys.c.organization_id, idempotency_keys.c.key, idempotency_keys.c.route)
    expired = (
        select(*columns)
        .where(
            idempotency_keys.c.organization_id == organization_id,
            idempotency_keys.c.created_at < expired_before,
        )
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)
    )
    result = await conn.execute(delete(idempotency_keys).where(tuple_(*columns).in_(expired)))
    return result.rowcount
