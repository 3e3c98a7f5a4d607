"""Key pairs: OpenSSH public keys that instances are created with, named per organization."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_public_key,
)
from cryptography.hazmat.primitives.serialization.ssh import SSHPublicKeyTypes
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import keypairs as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import DEFAULT_LIMIT, parse_limit, split_query_string
from mycloud_compute.services.pages import Page, read_page
from mycloud_compute.services.text import reject_control_characters

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
MIN_RSA_BITS = 2048
# The largest RSA key ssh-keygen creates (OpenSSH 9.2: "maximum is 16384 bits").
MAX_RSA_BITS = 16384

# The OpenSSH key types accepted, with the curve each ECDSA type must use. DSA keys
# (ssh-dss), security-key types (sk-*) and certificates (*-cert-v01@openssh.com)
# are rejected by their type name before the key is parsed.
ECDSA_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ecdsa-sha2-nistp256": ec.SECP256R1,
    "ecdsa-sha2-nistp384": ec.SECP384R1,
    "ecdsa-sha2-nistp521": ec.SECP521R1,
}
KEY_TYPES = ("ssh-ed25519", "ssh-rsa", *ECDSA_CURVES)


@dataclass(frozen=True)
class PublicKey:
    """A validated OpenSSH public key."""

    type: str
    # "<type> <base64 blob>" re-encoded by cryptography, then " <comment>" if any.
    canonical: str
    fingerprint: str


def check_keypair_name(name: str) -> None:
    """Reject names that could not be written as one path segment of /v1/keypairs/{name}."""
    reject_control_characters("name", name)
    if name != name.strip():
        raise InvalidParameter("name", name, "name must not start or end with whitespace")
    if "/" in name:
        raise InvalidParameter("name", name, "name must not contain '/'")
    if name in (".", ".."):
        raise InvalidParameter("name", name, f"name must not be {name!r}")


def _invalid_key(value: str, reason: str) -> InvalidParameter:
    return InvalidParameter(
        "public_key", value, f"public_key is not a valid OpenSSH public key: {reason}"
    )


def _check_key_object(key_type: str, key: SSHPublicKeyTypes, text: str) -> None:
    """Check that the parsed key is of ``key_type`` and strong enough."""
    if key_type == "ssh-ed25519":
        matches = isinstance(key, ed25519.Ed25519PublicKey)
    elif key_type == "ssh-rsa":
        matches = isinstance(key, rsa.RSAPublicKey)
    else:
        matches = isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
            key.curve, ECDSA_CURVES[key_type]
        )
    if not matches:
        raise _invalid_key(text, f"the key data is not a {key_type} key")
    if isinstance(key, rsa.RSAPublicKey) and not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise _invalid_key(
            text,
            f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, this one has {key.key_size}",
        )


def parse_public_key(text: str) -> PublicKey:
    """Validate an OpenSSH public key line ("<type> <base64> [comment]").

    The fingerprint is the one ``ssh-keygen -l`` prints with its default hash:
    "SHA256:" and the unpadded base64 SHA-256 digest of the key blob.
    """
    stripped = text.strip()
    if "PRIVATE KEY" in stripped:
        # Never echo a private key back: error bodies end up in client logs.
        raise InvalidParameter(
            "public_key",
            None,
            "public_key looks like a private key; send the public key (the .pub file) "
            "and keep the private key secret",
        )
    reject_control_characters("public_key", stripped)
    fields = stripped.split(None, 2)
    if len(fields) < 2:
        raise _invalid_key(text, "expected '<type> <base64 key data> [comment]'")
    key_type = fields[0]
    if key_type not in KEY_TYPES:
        raise _invalid_key(
            text, f"key type {key_type!r} is not supported; use one of {', '.join(KEY_TYPES)}"
        )
    try:
        key = load_ssh_public_key(stripped.encode())
    except (ValueError, UnicodeEncodeError) as exc:
        raise _invalid_key(text, str(exc) or "the key data cannot be decoded") from exc
    except NotImplementedError as exc:
        raise _invalid_key(text, f"key type {key_type!r} is not supported") from exc
    _check_key_object(key_type, key, text)

    encoded = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")
    blob = base64.b64decode(encoded.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    canonical = f"{encoded} {fields[2]}" if len(fields) == 3 else encoded
    return PublicKey(type=key_type, canonical=canonical, fingerprint=f"SHA256:{digest}")


# --- list -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPairQuery:
    """A parsed key pair list request. The marker is a key pair name, not an id."""

    limit: int
    marker: str | None


def parse_list_query(query_string: bytes) -> KeyPairQuery:
    """Parse ``limit`` and ``marker``; reject every other parameter and any repeat."""
    raw: dict[str, str] = {}
    for name, value in split_query_string(query_string):
        if name not in ("limit", "marker"):
            raise InvalidParameter(
                name, value, f"unknown query parameter {name!r}; valid parameters: limit, marker"
            )
        if name in raw:
            raise InvalidParameter(name, value, f"query parameter {name!r} is given more than once")
        raw[name] = value

    limit = parse_limit(raw["limit"]) if "limit" in raw else DEFAULT_LIMIT
    marker = raw.get("marker")
    if marker is not None:
        if not 1 <= len(marker) <= MAX_NAME_LENGTH:
            raise InvalidParameter(
                "marker",
                marker,
                f"marker must be a key pair name of 1 to {MAX_NAME_LENGTH} characters",
            )
        reject_control_characters("marker", marker)
    return KeyPairQuery(limit=limit, marker=marker)


async def list_keypairs(db: Database, principal: Principal, query: KeyPairQuery) -> Page:
    async with db.snapshot() as conn:
        return await read_page(
            conn,
            store.LIST_ORDER,
            principal.organization_id,
            marker=query.marker,
            limit=query.limit,
        )


# --- single key pairs -----------------------------------------------------------------


def _not_found(name: str) -> NotFound:
    return NotFound(f"key pair {name!r} not found")


def _check_path_name(name: str) -> None:
    """Raise NotFound for a name no key pair can have, before it reaches the database.

    PostgreSQL rejects a NUL in a query parameter, which would otherwise be a 500.
    Such a name is not echoed back.
    """
    can_exist = 1 <= len(name) <= MAX_NAME_LENGTH
    try:
        reject_control_characters("name", name)
    except InvalidParameter:
        can_exist = False
    if not can_exist:
        raise NotFound(
            f"key pair not found; names are 1 to {MAX_NAME_LENGTH} characters "
            "without control characters"
        )


async def get_keypair(db: Database, principal: Principal, name: str) -> Row[Any]:
    _check_path_name(name)
    async with db.snapshot() as conn:
        row = await store.get(conn, principal.organization_id, name)
    if row is None:
        raise _not_found(name)
    return row


async def create_keypair(
    db: Database, principal: Principal, name: str, public_key: str
) -> Row[Any]:
    """Validate and store a public key under ``name``; 409 when the name is taken."""
    check_keypair_name(name)
    key = parse_public_key(public_key)
    organization_id = principal.organization_id
    conflict = Conflict(f"a key pair named {name!r} already exists", {"name": name})

    async with db.transaction() as conn:
        if await store.get(conn, organization_id, name) is not None:
            raise conflict
        try:
            await store.insert_keypair(
                conn,
                {
                    "organization_id": organization_id,
                    "name": name,
                    "type": key.type,
                    "public_key": key.canonical,
                    "fingerprint": key.fingerprint,
                    "created_at": utcnow(),
                },
            )
        except IntegrityError as exc:
            # A concurrent create of the same name committed first (PostgreSQL).
            raise conflict from exc
        row = await store.get(conn, organization_id, name)

    log.info(
        "key pair created organization=%s name=%s type=%s fingerprint=%s",
        organization_id,
        name,
        key.type,
        key.fingerprint,
    )
    assert row is not None
    return row


async def delete_keypair(db: Database, principal: Principal, name: str) -> None:
    """Delete a key pair. Instances created with it keep its name in ``key_names``."""
    _check_path_name(name)
    async with db.transaction() as conn:
        if await store.delete_keypair(conn, principal.organization_id, name) == 0:
            raise _not_found(name)
    log.info("key pair deleted organization=%s name=%s", principal.organization_id, name)


async def resolve_key_names(
    conn: AsyncConnection, organization_id: uuid.UUID, names: list[str]
) -> list[str]:
    """Check the ``key_names`` of an instance create inside its transaction.

    The found key pairs stay locked (FOR KEY SHARE on PostgreSQL) until the create
    commits, so a concurrent delete cannot remove one in between.
    """
    for name in names:
        reject_control_characters("key_names", name)
    if len(set(names)) != len(names):
        raise InvalidParameter("key_names", names, "key_names must not repeat a key pair")
    if not names:
        return []
    found = await store.find_names(conn, organization_id, names, lock=True)
    for name in names:
        if name not in found:
            raise InvalidParameter("key_names", name, f"key pair {name!r} not found")
    return names
