"""Idempotency keys: a create request repeated with the same key creates nothing new.

A client sends ``Idempotency-Key`` with a creating POST. The first request that
succeeds stores its response (status, body, Location) under the key, scoped by
organization and route, in the same transaction that creates the resource. A
repeat within KEY_LIFETIME with the same body gets that response back; the same
key with a different body is a 409. Failed requests store nothing, so they can be
retried with the same key.

Concurrent requests with one key are serialized by the key's primary key. The
creating transaction inserts the key row first (``claim``), before it touches
anything else, with an INSERT that takes over only an expired row of the key. On
PostgreSQL a second transaction's INSERT of the same key waits until the first
commits and then inserts nothing. On SQLite the writers run one at a time, so the
second finds the committed row. Either way the loser's transaction rolls back, and
``create_once`` reads the stored response and returns it. Exactly one resource is
created, and every request gets the same response. A repeat of a finished request
takes the same path: no read comes before the claim, so a first request pays for
one statement only. A request that fails with a 4xx reads the key afterwards, so
that a repeat still gets the stored response, or the 409 for a different body.

To make a creating route idempotent, the service function takes an
``Idempotency | None`` argument, calls ``claim`` at the start and ``record`` at the
end of its transaction, and the route wraps the call in ``create_once`` (the HTTP
layer has a helper for that).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import msgspec
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import idempotency as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services.errors import Conflict, InvalidParameter, InvalidRequest, ServiceError

log = logging.getLogger(__name__)

HEADER = "Idempotency-Key"
KEY_LIFETIME = timedelta(hours=24)
MAX_KEY_LENGTH = 255
# Printable ASCII, space included. HTTP servers strip spaces at either end of a header value.
_KEY = re.compile(r"^[\x20-\x7e]+$")
# Times create_once runs the create when, after a KeyTaken, it cannot read the stored
# row. That happens only when the winner's row expires or is purged in between.
CLAIM_ATTEMPTS = 3
# A claim purges expired keys of its organization once in this many claims of the
# process (store.PURGE_BATCH keys at a time), not at every claim.
PURGE_EVERY = 16


@dataclass(frozen=True)
class StoredResponse:
    """A response as sent: status, JSON body bytes and the Location header (or None)."""

    status_code: int
    body: bytes
    location: str | None


@dataclass(frozen=True)
class IdempotencyKey:
    """A validated key with its scope and the hash of the request body it came with."""

    organization_id: uuid.UUID
    key: str
    route: str
    request_hash: str


# The created resource's row that a create function returns and ``render`` reads:
# a SQLAlchemy Row, or a record with the same attributes.
Created = Any


@dataclass
class Idempotency:
    """The key of an idempotent create, with the function that renders its response.

    ``record`` keeps the rendered response in ``response``, so the first response
    sent is the stored bytes.
    """

    key: IdempotencyKey
    render: Callable[[Created], StoredResponse]
    response: StoredResponse | None = field(default=None)


_claims = itertools.count(1)


class KeyTaken(Exception):
    """Raised when another transaction stored the same key first. The caller's transaction rolls back."""


def check_key(values: list[str]) -> str | None:
    """Return the Idempotency-Key header value, or None when it is absent.

    Raises InvalidParameter (400) when the value is invalid or given twice.
    """
    if not values:
        return None
    if len(values) > 1:
        raise InvalidParameter(HEADER, values[0][:MAX_KEY_LENGTH], f"{HEADER} is given more than once")
    value = values[0]
    if not 1 <= len(value) <= MAX_KEY_LENGTH or not _KEY.fullmatch(value):
        raise InvalidParameter(
            HEADER,
            value[: MAX_KEY_LENGTH + 1],
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return value


def hash_body(body: bytes) -> str:
    """Return the SHA-256 (hex) of the body as canonical JSON: sorted keys, no whitespace.

    Two bodies hash alike when they hold the same JSON value, whatever their key
    order and spacing.
    """
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest("the request body is not valid JSON") from exc
    return hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()


def _stored(row: Row[Any], key: IdempotencyKey) -> StoredResponse:
    if row.request_hash != key.request_hash:
        raise Conflict(
            f"{HEADER} {key.key!r} was already used with a different request body. "
            "Send a new key for a different request.",
            {"parameter": HEADER},
        )
    return StoredResponse(row.status_code, row.response_body.encode(), row.location)


async def find_response(db: Database, key: IdempotencyKey, *, on_writer: bool = False) -> StoredResponse | None:
    """Return the stored response of a live key, or None when there is none.

    Raises Conflict when the key was stored with a different body. ``on_writer``
    reads from the primary, for a read that must see a commit that just happened.
    """
    since = utcnow() - KEY_LIFETIME
    session = db.transaction() if on_writer else db.snapshot()
    async with session as conn:
        row = await store.find(conn, key.organization_id, key.key, key.route, since=since)
    return None if row is None else _stored(row, key)


async def claim(conn: AsyncConnection, idempotency: Idempotency | None) -> None:
    """Insert the key's row at the start of a creating transaction (nothing without a key).

    Raises KeyTaken when another transaction has stored the key. The caller must
    let it propagate, so that its transaction rolls back.
    """
    if idempotency is None:
        return
    key = idempotency.key
    now = utcnow()
    claimed = await store.insert_claim(
        conn,
        key.organization_id,
        key.key,
        key.route,
        request_hash=key.request_hash,
        now=now,
        expired_before=now - KEY_LIFETIME,
    )
    if not claimed:
        raise KeyTaken(f"{HEADER} {key.key!r} is stored already")
    if purge_due():
        await store.purge_expired(conn, key.organization_id, expired_before=now - KEY_LIFETIME)


def purge_due() -> bool:
    """Count a claim of this process and return True at every PURGE_EVERY-th one.

    The create that made that claim purges expired keys.
    """
    return next(_claims) % PURGE_EVERY == 0


async def record(conn: AsyncConnection, idempotency: Idempotency | None, row: Created) -> None:
    """Store the response for the created ``row`` in the creating transaction (nothing without a key)."""
    if idempotency is None:
        return
    key = idempotency.key
    response = idempotency.render(row)
    await store.store_response(
        conn,
        key.organization_id,
        key.key,
        key.route,
        status_code=response.status_code,
        body=response.body.decode(),
        location=response.location,
    )
    idempotency.response = response


async def create_once(
    db: Database,
    key: IdempotencyKey | None,
    create: Callable[[Idempotency | None], Awaitable[Created]],
    render: Callable[[Created], StoredResponse],
) -> StoredResponse:
    """Run ``create`` unless ``key`` already has a stored response, and return the response."""
    if key is None:
        return render(await create(None))

    for _ in range(CLAIM_ATTEMPTS):
        idempotency = Idempotency(key, render)
        try:
            await create(idempotency)
        except ServiceError:
            # A repeat whose body fails a check made before the claim still gets the
            # stored response, or the 409 for a different body, as if the key were read first.
            stored = await find_response(db, key, on_writer=True)
            if stored is None:
                raise
            log.info("idempotent replay organization=%s route=%r key=%r", key.organization_id, key.route, key.key)
            return stored
        except KeyTaken:
            stored = await find_response(db, key, on_writer=True)
            if stored is not None:
                log.info(
                    "idempotent replay organization=%s route=%r key=%r",
                    key.organization_id, key.route, key.key,
                )
                return stored
            log.warning(
                "idempotency key not found after a conflict, retrying the create "
                "organization=%s route=%r key=%r",
                key.organization_id, key.route, key.key,
            )
            continue
        if idempotency.response is None:
            raise RuntimeError(f"the create function for {key.route} did not record its response")
        return idempotency.response

    raise Conflict(
        f"a request with {HEADER} {key.key!r} is still in progress. Retry it later.",
        {"parameter": HEADER},
    )
