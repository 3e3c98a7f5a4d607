"""Organization defaults: the private network and the default security group."""

from __future__ import annotations

import ipaddress
import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import networks as store
from mycloud_compute.persistence.clock import utcnow

DEFAULT_NETWORK_NAME = "private-network"
DEFAULT_NETWORK_CIDR = "192.168.0.0/16"
DEFAULT_SECURITY_GROUP = "default"


async def ensure_default_network(conn: AsyncConnection, organization_id: uuid.UUID) -> uuid.UUID:
    """Return the organization's default network, creating it on first use.

    Runs inside the caller's write transaction, which holds the write lock on
    SQLite and relies on the (organization_id, name) unique key on PostgreSQL.
    """
    row = await store.find_network_by_name(conn, organization_id, DEFAULT_NETWORK_NAME)
    if row is not None:
        return uuid.UUID(str(row.id))
    network_id = uuid.uuid4()
    await store.insert_network(
        conn,
        {
            "organization_id": organization_id,
            "id": network_id,
            "name": DEFAULT_NETWORK_NAME,
            "cidr": DEFAULT_NETWORK_CIDR,
            "ip_version": ipaddress.ip_network(DEFAULT_NETWORK_CIDR).version,
            "created_at": utcnow(),
        },
    )
    return network_id


async def ensure_default_security_group(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
    found = await store.find_security_groups(conn, organization_id, [DEFAULT_SECURITY_GROUP])
    if found:
        return
    await store.insert_security_group(
        conn,
        {
            "organization_id": organization_id,
            "id": uuid.uuid4(),
            "name": DEFAULT_SECURITY_GROUP,
            "description": "Default security group",
            "created_at": utcnow(),
        },
    )
