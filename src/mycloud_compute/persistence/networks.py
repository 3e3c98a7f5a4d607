"""Queries on networks, ports (address allocations) and security groups."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.tables import networks, ports, security_groups


async def find_network_by_name(conn: AsyncConnection, organization_id: uuid.UUID, name: str) -> Row[Any] | None:
    query = select(networks).where(networks.c.organization_id == organization_id, networks.c.name == name)
    return (await conn.execute(query)).first()


async def get_networks(
    conn: AsyncConnection, organization_id: uuid.UUID, network_ids: list[uuid.UUID]
) -> dict[uuid.UUID, Row[Any]]:
    query = select(networks).where(
        networks.c.organization_id == organization_id, networks.c.id.in_(network_ids)
    )
    return {row.id: row for row in (await conn.execute(query)).all()}


async def insert_network(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(networks).values(**values))


async def find_security_groups(
    conn: AsyncConnection, organization_id: uuid.UUID, names: list[str]
) -> dict[str, Row[Any]]:
    query = select(security_groups).where(
        security_groups.c.organization_id == organization_id, security_groups.c.name.in_(names)
    )
    return {row.name: row for row in (await conn.execute(query)).all()}


async def insert_security_group(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(insert(security_groups).values(**values))


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
