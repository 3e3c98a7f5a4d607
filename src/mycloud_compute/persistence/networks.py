"""Queries on networks and ports (address allocations)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.keyset import ListOrder
from mycloud_compute.persistence.tables import instances, networks, ports

LIST_ORDER = ListOrder(networks, ("created_at", "id"), descending=True)


async def find_network_by_name(
    conn: AsyncConnection, organization_id: uuid.UUID, name: str, *, lock: bool = False
) -> Row[Any] | None:
    """Return the network named ``name``; ``lock`` keeps it from being deleted until commit."""
    query = select(networks).where(
        networks.c.organization_id == organization_id, networks.c.name == name
    )
    if lock:
        query = query.with_for_update(read=True, key_share=True)
    return (await conn.execute(query)).first()


async def get_networks(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    network_ids: list[uuid.UUID],
    *,
    lock: bool = False,
) -> dict[uuid.UUID, Row[Any]]:
    """Return the networks by id.

    ``lock`` takes FOR KEY SHARE on PostgreSQL, which keeps them from being deleted
    until commit and lets other readers through.
    """
    query = select(networks).where(
        networks.c.organization_id == organization_id, networks.c.id.in_(network_ids)
    )
    if lock:
        query = query.with_for_update(read=True, key_share=True)
    return {row.id: row for row in (await conn.execute(query)).all()}


async def get_network(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID, *, lock: bool = False
) -> Row[Any] | None:
    """Return the network; ``lock`` locks it FOR UPDATE (on PostgreSQL) until commit."""
    query = select(networks).where(
        networks.c.organization_id == organization_id, networks.c.id == network_id
    )
    if lock:
        query = query.with_for_update()
    return (await conn.execute(query)).first()


async def insert_network(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(networks).values(**values))


async def delete_network(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID
) -> None:
    await conn.execute(
        delete(networks).where(
            networks.c.organization_id == organization_id, networks.c.id == network_id
        )
    )


async def instances_with_ports(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID, *, limit: int
) -> list[uuid.UUID]:
    """Return up to ``limit`` ids of the instances that have a port on the network.

    An instance has at most one port per network, so the ids do not repeat, and the
    scan stops after ``limit`` ports of the (organization_id, network_id, ...) index.
    """
    query = (
        select(ports.c.instance_id)
        .where(ports.c.organization_id == organization_id, ports.c.network_id == network_id)
        .limit(limit)
    )
    return list((await conn.execute(query)).scalars().all())


async def network_ids_of_instances(
    conn: AsyncConnection, organization_id: uuid.UUID, status: str
) -> list[tuple[uuid.UUID, list[str]]]:
    """Return (id, network_ids) of the organization's instances in ``status``.

    An index range scan on (organization_id, status, ...).
    """
    query = select(instances.c.id, instances.c.network_ids).where(
        instances.c.organization_id == organization_id, instances.c.status == status
    )
    return [(row.id, row.network_ids) for row in (await conn.execute(query)).all()]


async def used_address_values(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID
) -> set[int]:
    query = select(ports.c.address_value).where(
        ports.c.organization_id == organization_id, ports.c.network_id == network_id
    )
    return set((await conn.execute(query)).scalars().all())


async def instance_ports(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> list[Row[Any]]:
    query = (
        select(ports)
        .where(ports.c.organization_id == organization_id, ports.c.instance_id == instance_id)
        .order_by(ports.c.created_at, ports.c.id)
    )
    return list((await conn.execute(query)).all())


async def insert_port(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(ports).values(**values))


async def delete_instance_ports(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> None:
    await conn.execute(
        delete(ports).where(ports.c.organization_id == organization_id, ports.c.instance_id == instance_id)
    )
