"""Organizations and API tokens: creation, authentication and scopes."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import timedelta
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


async def authenticate(db: Database, secret: str) -> Principal:
    """Return the principal of a token secret, or raise Unauthorized."""
    secret_hash = hash_secret(secret)
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
    return Principal(
        organization_id=row.organization_id,
        organization_name=row.organization_name,
        token_name=row.name,
        scopes=frozenset(row.scopes.split(",")),
    )
