"""Queries on networks and ports (address allocations)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    String,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import INET
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


async def insert_network_unless_named(conn: AsyncConnection, values: dict[str, Any]) -> bool:
    """Insert the network unless its organization has one of that name; return whether it did.

    On PostgreSQL a concurrent transaction inserting the same name makes this one
    wait, and then insert nothing if that transaction commits.
    """
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(networks)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[networks.c.organization_id, networks.c.name])
        .returning(networks.c.id)
    )
    return (await conn.execute(statement)).first() is not None


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


def lowest_free_address_value(
    organization_id: uuid.UUID | ColumnElement[Any],
    network_id: uuid.UUID | ColumnElement[Any],
    first_allocatable: int | ColumnElement[int],
) -> ColumnElement[int]:
    """Return an SQL expression for the lowest address offset from ``first_allocatable`` up that no port uses.

    When the table contains the ports of many networks, PostgreSQL 15 plans it as
    an ordered scan of the (organization_id, network_id, address_value) index that
    stops at the first gap. It then reads only the ports below that gap, as EXPLAIN
    ANALYZE of a generic plan shows. The result may lie past the network's last
    address, and the caller checks that.
    """
    first = (
        first_allocatable
        if isinstance(first_allocatable, ColumnElement)
        else literal(first_allocatable, BigInteger)
    )
    in_network = (
        ports.c.organization_id == organization_id,
        ports.c.network_id == network_id,
        ports.c.address_value >= first,
    )
    # lag() defaults to the offset just below the first allocatable one, so that a
    # free first offset shows up as a gap before the lowest used one.
    below_first = first - 1
    used = (
        select(
            ports.c.address_value.label("value"),
            func.lag(ports.c.address_value, 1, below_first).over(order_by=ports.c.address_value).label("previous"),
        )
        .where(*in_network)
        .subquery("used")
    )
    first_gap = (
        select(used.c.previous + 1)
        .where(used.c.value > used.c.previous + 1)
        .order_by(used.c.value)
        .limit(1)
        .scalar_subquery()
    )
    after_highest = (
        select(func.coalesce(func.max(ports.c.address_value), below_first) + 1).where(*in_network).scalar_subquery()
    )
    return func.coalesce(first_gap, after_highest)


async def find_lowest_free_address_value(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID, first_allocatable: int
) -> int:
    query = select(lowest_free_address_value(organization_id, network_id, first_allocatable))
    return int((await conn.execute(query)).scalar_one())


_PORT_VALUE_COLUMNS = ("organization_id", "id", "network_id", "instance_id", "mac_address", "created_at")


def _build_insert_at_lowest_free() -> Any:
    lowest = lowest_free_address_value(
        bindparam("port_organization_id", type_=ports.c.organization_id.type),
        bindparam("port_network_id", type_=ports.c.network_id.type),
        bindparam("first_allocatable", type_=BigInteger),
    )
    free = select(lowest.label("value")).subquery("free")
    network_address = cast(bindparam("network_address", type_=String), INET)
    rows = select(
        *(bindparam(f"port_{name}", type_=ports.c[name].type) for name in _PORT_VALUE_COLUMNS),
        func.host(network_address.op("+", return_type=INET)(free.c.value)),
        free.c.value,
    ).where(free.c.value <= bindparam("last_allocatable", type_=BigInteger))
    return (
        postgresql.insert(ports)
        .from_select([*_PORT_VALUE_COLUMNS, "address", "address_value"], rows)
        .on_conflict_do_nothing()
        .returning(ports.c.address_value, ports.c.address)
    )


# Built once, because building it costs more CPU than running it.
_INSERT_AT_LOWEST_FREE = _build_insert_at_lowest_free()


async def insert_port_at_lowest_free(
    conn: AsyncConnection,
    values: dict[str, Any],
    *,
    network_address: str,
    first_allocatable: int,
    last_allocatable: int,
) -> Row[Any] | None:
    """Insert a port at the lowest free address offset of its network in one statement (PostgreSQL).

    ``values`` contains every column but ``address`` and ``address_value``. The address
    text is ``host(network_address + offset)``, which the caller must compare with
    its own formatting. Returns the (address_value, address) row, or None when the
    insert did nothing: either the lowest free offset lies past ``last_allocatable``
    (the network is full), or a concurrent allocation took the address, or the MAC
    address is taken.
    """
    parameters = {f"port_{name}": values[name] for name in _PORT_VALUE_COLUMNS}
    parameters.update(
        network_address=network_address, first_allocatable=first_allocatable, last_allocatable=last_allocatable
    )
    return (await conn.execute(_INSERT_AT_LOWEST_FREE, parameters)).first()


async def insert_port_if_free(conn: AsyncConnection, values: dict[str, Any]) -> bool:
    """Insert a port unless its address or MAC address is taken; return whether it was inserted."""
    statement = _insert_ignoring_conflicts(conn).values(**values)
    return bool((await conn.execute(statement)).rowcount == 1)


def _insert_ignoring_conflicts(conn: AsyncConnection) -> Any:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(ports).on_conflict_do_nothing()
    return sqlite.insert(ports).on_conflict_do_nothing()


async def set_port_address(
    conn: AsyncConnection, organization_id: uuid.UUID, port_id: uuid.UUID, address: str
) -> None:
    await conn.execute(
        update(ports).where(ports.c.organization_id == organization_id, ports.c.id == port_id).values(address=address)
    )


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


_DELETE_INSTANCE_PORTS = delete(ports).where(
    ports.c.organization_id == bindparam("match_organization_id"),
    ports.c.instance_id == bindparam("match_instance_id"),
)


async def delete_instance_ports(
    conn: AsyncConnection, organization_id: uuid.UUID, instance_id: uuid.UUID
) -> None:
    await conn.execute(
        _DELETE_INSTANCE_PORTS, {"match_organization_id": organization_id, "match_instance_id": instance_id}
    )
