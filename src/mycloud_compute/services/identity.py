"""Organizations and API tokens: creation, authentication and scopes."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from mycloud_compute.persistence import identity as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import networks
from mycloud_compute.services.errors import Conflict, InvalidRequest, NotFound, Unauthorized

log = logging.getLogger(__name__)

SCOPES = ("read", "write", "admin")
# Prefix that makes leaked tokens easy to recognise for secret scanners.
TOKEN_PREFIX = "mcp_"


@dataclass(frozen=True)
class Principal:
    """The caller: the token's organization, name and scopes."""

    organization_id: uuid.UUID
    organization_name: str
    token_name: str
    scopes: frozenset[str]
    # Set when the principal came from the token cache: the hash of the token's
    # secret, so that the request can confirm the token is still valid.
    unconfirmed_hash: str | None = field(default=None, repr=False, compare=False)

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise InvalidRequest(
            f"invalid scopes {text!r}; use a comma-separated subset of {', '.join(SCOPES)}"
        )
    return scopes


async def create_organization(db: Database, name: str) -> uuid.UUID:
    if not name or len(name) > 255 or name != name.strip() or not name.isprintable():
        raise InvalidRequest(
            f"invalid organization name {name!r}: use 1 to 255 printable characters "
            "without leading or trailing spaces"
        )
    async with db.transaction() as conn:
        if await store.find_organization(conn, name) is not None:
            raise Conflict(f"organization {name!r} already exists")
        organization_id = uuid.uuid4()
        await store.insert_organization(
            conn, {"id": organization_id, "name": name, "created_at": utcnow()}
        )
        await networks.ensure_default_network(conn, organization_id)
        await networks.ensure_default_security_group(conn, organization_id)
    log.info("organization created organization=%s name=%s", organization_id, name)
    return organization_id


async def list_organizations(db: Database) -> list[Any]:
    async with db.snapshot() as conn:
        return await store.list_organizations(conn)


async def list_tokens(db: Database, organization_name: str) -> list[Any]:
    async with db.snapshot() as conn:
        organization = await store.find_organization(conn, organization_name)
        if organization is None:
            raise NotFound(f"organization {organization_name!r} not found")
        return await store.list_tokens(conn, organization.id)


async def ensure_organization(db: Database, name: str) -> uuid.UUID:
    async with db.snapshot() as conn:
        row = await store.find_organization(conn, name)
    if row is not None:
        return uuid.UUID(str(row.id))
    return await create_organization(db, name)


async def create_token(
    db: Database,
    organization_name: str,
    *,
    name: str,
    scopes: frozenset[str],
    expires_in_days: float | None = None,
) -> str:
    """Create a token and return its secret, which is stored only as a hash."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    expires_at = now + timedelta(days=expires_in_days) if expires_in_days is not None else None
    async with db.transaction() as conn:
        organization = await store.find_organization(conn, organization_name)
        if organization is None:
            raise NotFound(f"organization {organization_name!r} not found")
        if await store.find_token(conn, organization.id, name) is not None:
            raise Conflict(f"token {name!r} already exists in organization {organization_name!r}")
        await store.insert_token(
            conn,
            {
                "organization_id": organization.id,
                "id": uuid.uuid4(),
                "name": name,
                "secret_hash": hash_secret(secret),
                "scopes": ",".join(sorted(scopes)),
                "expires_at": expires_at,
                "created_at": now,
            },
        )
    log.info(
        "token created organization=%s token_name=%s scopes=%s",
        organization.id, name, ",".join(sorted(scopes)),
    )
    return secret


async def revoke_token(db: Database, organization_name: str, name: str) -> None:
    async with db.transaction() as conn:
        organization = await store.find_organization(conn, organization_name)
        if organization is None:
            raise NotFound(f"organization {organization_name!r} not found")
        if await store.revoke_token(conn, organization.id, name, utcnow()) == 0:
            raise NotFound(f"no active token {name!r} in organization {organization_name!r}")
    log.info("token revoked organization=%s token_name=%s", organization.id, name)


# --- token cache ----------------------------------------------------------------------
#
# A route that confirms the token itself, in the same statement as its own work
# (the instance list does), may take the principal from this cache and skip the
# token lookup. The cache never decides alone: a revoked or expired token is
# rejected by that statement on the very next request. Entries are dropped after
# CACHE_SECONDS so that a long-lived process does not keep stale organization names.

CACHE_SECONDS = 60.0
CACHE_ENTRIES = 10_000


@dataclass(frozen=True)
class _CachedToken:
    principal: Principal
    expires_at: datetime | None
    stored_at: float


_token_cache: dict[str, _CachedToken] = {}


def _cached_principal(secret_hash: str) -> Principal | None:
    entry = _token_cache.get(secret_hash)
    if entry is None:
        return None
    if time.monotonic() - entry.stored_at > CACHE_SECONDS or (
        entry.expires_at is not None and entry.expires_at <= utcnow()
    ):
        _token_cache.pop(secret_hash, None)
        return None
    return entry.principal


def forget_token(secret_hash: str) -> None:
    """Drop a token from the cache, e.g. when a request found it no longer valid."""
    _token_cache.pop(secret_hash, None)


async def authenticate(db: Database, secret: str, *, use_cache: bool = False) -> Principal:
    """Return the principal of a token secret, or raise Unauthorized.

    With ``use_cache`` the principal may come from the token cache; it then carries
    ``unconfirmed_hash`` and the caller must confirm the token (see
    :func:`confirm_token`) before it responds.
    """
    secret_hash = hash_secret(secret)
    if use_cache:
        cached = _cached_principal(secret_hash)
        if cached is not None:
            return cached
    principal, expires_at = await _look_up(db, secret_hash)
    if use_cache:
        if len(_token_cache) >= CACHE_ENTRIES:
            _token_cache.clear()
        unconfirmed = dataclasses.replace(principal, unconfirmed_hash=secret_hash)
        _token_cache[secret_hash] = _CachedToken(unconfirmed, expires_at, time.monotonic())
    return principal


async def confirm_token(db: Database, principal: Principal) -> None:
    """Raise Unauthorized unless the token of a cached principal is still valid."""
    if principal.unconfirmed_hash is None:
        return
    forget_token(principal.unconfirmed_hash)
    await _look_up(db, principal.unconfirmed_hash)


async def _look_up(db: Database, secret_hash: str) -> tuple[Principal, datetime | None]:
    async with db.snapshot() as conn:
        row = await store.find_token_by_hash(conn, secret_hash)
    # The lookup is by hash, so timing reveals nothing about the secret; the
    # constant-time comparison guards against a hash index returning a near match.
    if row is None or not hmac.compare_digest(row.secret_hash, secret_hash):
        raise Unauthorized("the token is not valid", token_given=True)
    now = utcnow()
    if row.revoked_at is not None:
        raise Unauthorized("the token has been revoked", token_given=True)
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized("the token has expired", token_given=True)
    principal = Principal(
        organization_id=row.organization_id,
        organization_name=row.organization_name,
        token_name=row.name,
        scopes=frozenset(row.scopes.split(",")),
    )
    return principal, row.expires_at
