"""Compute hosts: the driver's inventory, and atomic claims on their capacity.

Capacity (``vcpus``, ``ram`` in MiB, ``disk`` in GiB) comes from the driver; usage
(``*_used``, ``instance_count``) changes only through :func:`claim` and
:func:`release`. A claim is a single conditional UPDATE, so two concurrent claims
can never push a host over its capacity. On PostgreSQL the second UPDATE waits for
the first and re-checks its WHERE clause against the committed row. On SQLite,
writers are serialized.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Integer, bindparam, delete, func, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tables import hosts

ENABLED = "ENABLED"
DISABLED = "DISABLED"


class HostCapacity(Protocol):
    """A host as a driver reports it (the driver's ``HostInventory`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def ram(self) -> int: ...
    @property
    def disk(self) -> int: ...


@dataclass(frozen=True)
class Host:
    """A row of ``hosts`` (RAM in MiB, disk in GiB)."""

    id: uuid.UUID
    name: str
    vcpus: int
    ram: int
    disk: int
    vcpus_used: int
    ram_used: int
    disk_used: int
    instance_count: int
    status: str

    @property
    def vcpus_free(self) -> int:
        return self.vcpus - self.vcpus_used

    @property
    def ram_free(self) -> int:
        return self.ram - self.ram_used

    @property
    def disk_free(self) -> int:
        return self.disk - self.disk_used


class HostAccountingError(RuntimeError):
    """Releasing a claim would make a host's usage negative, so the usage is already wrong."""


def _to_host(row: Row[Any]) -> Host:
    return Host(
        id=row.id,
        name=row.name,
        vcpus=row.vcpus,
        ram=row.ram,
        disk=row.disk,
        vcpus_used=row.vcpus_used,
        ram_used=row.ram_used,
        disk_used=row.disk_used,
        instance_count=row.instance_count,
        status=row.status,
    )


async def sync_inventory(conn: AsyncConnection, inventory: Iterable[HostCapacity]) -> None:
    """Insert the hosts missing by name and update the capacity of the others.

    Usage and status are left alone. Hosts missing from the inventory are kept,
    because instances may still be placed on them.
    """
    now = utcnow()
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    for item in inventory:
        # ON CONFLICT DO NOTHING: several processes may sync the same inventory at start-up.
        await conn.execute(
            dialect_insert(hosts)
            .values(
                id=uuid.uuid4(),
                name=item.name,
                vcpus=item.vcpus,
                ram=item.ram,
                disk=item.disk,
                vcpus_used=0,
                ram_used=0,
                disk_used=0,
                instance_count=0,
                status=ENABLED,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=[hosts.c.name])
        )
        await conn.execute(
            update(hosts)
            .where(
                hosts.c.name == item.name,
                (hosts.c.vcpus != item.vcpus) | (hosts.c.ram != item.ram) | (hosts.c.disk != item.disk),
            )
            .values(vcpus=item.vcpus, ram=item.ram, disk=item.disk, updated_at=now)
        )


async def list_hosts(conn: AsyncConnection) -> list[Host]:
    """Return every host, ordered by name."""
    rows = (await conn.execute(select(hosts).order_by(hosts.c.name))).all()
    return [_to_host(row) for row in rows]


async def get_host(conn: AsyncConnection, host_id: uuid.UUID) -> Host | None:
    row = (await conn.execute(select(hosts).where(hosts.c.id == host_id))).first()
    return _to_host(row) if row is not None else None


# Host id to name, for the worker's driver calls. A host keeps its name for life
# and is deleted only when no instance is placed on it, so an entry never goes stale
# for an instance that names the host.
_host_names: dict[uuid.UUID, str] = {}


async def get_host_name(conn: AsyncConnection, host_id: uuid.UUID) -> str | None:
    """Return the host's name (read once per process), or None when the host does not exist."""
    name = _host_names.get(host_id)
    if name is None:
        name = (await conn.execute(select(hosts.c.name).where(hosts.c.id == host_id))).scalar()
        if name is not None:
            _host_names[host_id] = name
    return name


async def find_candidates(conn: AsyncConnection, *, vcpus: int, ram: int, disk: int) -> list[Host]:
    """Return the enabled hosts with room for the request, most free RAM first."""
    query = (
        select(hosts)
        .where(
            hosts.c.status == ENABLED,
            hosts.c.vcpus_used + vcpus <= hosts.c.vcpus,
            hosts.c.ram_used + ram <= hosts.c.ram,
            hosts.c.disk_used + disk <= hosts.c.disk,
        )
        .order_by((hosts.c.ram - hosts.c.ram_used).desc(), hosts.c.name)
    )
    return [_to_host(row) for row in (await conn.execute(query)).all()]


def _claim_values(*, vcpus: int, ram: int, disk: int) -> dict[str, Any]:
    """Return the column updates that add one instance of this size to a host's usage."""
    return {
        "vcpus_used": hosts.c.vcpus_used + vcpus,
        "ram_used": hosts.c.ram_used + ram,
        "disk_used": hosts.c.disk_used + disk,
        "instance_count": hosts.c.instance_count + 1,
        "updated_at": utcnow(),
    }


async def claim(conn: AsyncConnection, host_id: uuid.UUID, *, vcpus: int, ram: int, disk: int) -> bool:
    """Add one instance's resources to the host's usage if they still fit.

    Returns False, changing nothing, when the host is not enabled or lacks room.
    """
    result = await conn.execute(
        update(hosts)
        .where(
            hosts.c.id == host_id,
            hosts.c.status == ENABLED,
            hosts.c.vcpus_used + vcpus <= hosts.c.vcpus,
            hosts.c.ram_used + ram <= hosts.c.ram,
            hosts.c.disk_used + disk <= hosts.c.disk,
        )
        .values(**_claim_values(vcpus=vcpus, ram=ram, disk=disk))
    )
    return result.rowcount == 1


# The request's size as bind parameters, so that the hot statements below are built once.
_VCPUS = bindparam("request_vcpus", type_=Integer)
_RAM = bindparam("request_ram", type_=Integer)
_DISK = bindparam("request_disk", type_=Integer)
_FITS = (
    hosts.c.status == ENABLED,
    hosts.c.vcpus_used + _VCPUS <= hosts.c.vcpus,
    hosts.c.ram_used + _RAM <= hosts.c.ram,
    hosts.c.disk_used + _DISK <= hosts.c.disk,
)
_CLAIM_BEST_UNLOCKED = (
    update(hosts)
    .where(
        hosts.c.id
        == select(hosts.c.id)
        .where(*_FITS)
        .order_by((hosts.c.ram - hosts.c.ram_used).desc(), hosts.c.name)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery(),
        *_FITS,
    )
    .values(
        vcpus_used=hosts.c.vcpus_used + _VCPUS,
        ram_used=hosts.c.ram_used + _RAM,
        disk_used=hosts.c.disk_used + _DISK,
        instance_count=hosts.c.instance_count + 1,
        updated_at=bindparam("now"),
    )
    .returning(*hosts.c)
)
_RELEASE = (
    update(hosts)
    .where(
        hosts.c.id == bindparam("match_host_id"),
        hosts.c.vcpus_used >= _VCPUS,
        hosts.c.ram_used >= _RAM,
        hosts.c.disk_used >= _DISK,
        hosts.c.instance_count >= 1,
    )
    .values(
        vcpus_used=hosts.c.vcpus_used - _VCPUS,
        ram_used=hosts.c.ram_used - _RAM,
        disk_used=hosts.c.disk_used - _DISK,
        instance_count=hosts.c.instance_count - 1,
        updated_at=bindparam("now"),
    )
)


async def claim_best_unlocked(conn: AsyncConnection, *, vcpus: int, ram: int, disk: int) -> Host | None:
    """Claim the resources on the host with the most free RAM that fits, in one statement.

    On PostgreSQL hosts that a concurrent transaction holds locked (it is claiming on
    them) are skipped, so concurrent claims spread over hosts instead of queueing
    on one row. The candidate is locked before its capacity is checked again, so
    the claim can never overcommit it. Returns None when every fitting host is
    locked, or when none fits; the caller then falls back to :func:`claim`, which
    waits for locks.
    """
    parameters = {"request_vcpus": vcpus, "request_ram": ram, "request_disk": disk, "now": utcnow()}
    row = (await conn.execute(_CLAIM_BEST_UNLOCKED, parameters)).first()
    return _to_host(row) if row is not None else None


async def release(conn: AsyncConnection, host_id: uuid.UUID, *, vcpus: int, ram: int, disk: int) -> None:
    """Subtract one instance's resources from the host's usage.

    The caller passes the values it claimed (the instance's stored flavor), so usage
    returns exactly to what it was. Raises HostAccountingError instead of storing a
    negative usage, and when the host does not exist.
    """
    parameters = {
        "match_host_id": host_id, "request_vcpus": vcpus, "request_ram": ram, "request_disk": disk, "now": utcnow(),
    }
    result = await conn.execute(_RELEASE, parameters)
    if result.rowcount != 1:
        raise HostAccountingError(
            f"cannot release vcpus={vcpus} ram={ram} disk={disk} from host {host_id}: "
            "the host does not exist or its usage is smaller than the claim"
        )


async def set_status(conn: AsyncConnection, host_id: uuid.UUID, status: str) -> bool:
    """Enable or disable a host for new claims; returns False when the host does not exist."""
    if status not in (ENABLED, DISABLED):
        raise ValueError(f"host status must be {ENABLED} or {DISABLED}, got {status!r}")
    result = await conn.execute(
        update(hosts).where(hosts.c.id == host_id).values(status=status, updated_at=utcnow())
    )
    return result.rowcount == 1


# A page position: hosts are listed by (name, id).
Position = tuple[str, uuid.UUID]


async def find_by_name(conn: AsyncConnection, name: str) -> Host | None:
    row = (await conn.execute(select(hosts).where(hosts.c.name == name))).first()
    return _to_host(row) if row is not None else None


async def insert_host(conn: AsyncConnection, *, name: str, vcpus: int, ram: int, disk: int) -> Host:
    """Insert an enabled host with no usage and return it (a duplicate name raises IntegrityError)."""
    now = utcnow()
    host = Host(
        id=uuid.uuid4(),
        name=name,
        vcpus=vcpus,
        ram=ram,
        disk=disk,
        vcpus_used=0,
        ram_used=0,
        disk_used=0,
        instance_count=0,
        status=ENABLED,
    )
    values = {field: getattr(host, field) for field in Host.__dataclass_fields__}
    await conn.execute(insert(hosts).values(**values, created_at=now, updated_at=now))
    return host


async def delete_if_unused(conn: AsyncConnection, host_id: uuid.UUID) -> bool:
    """Delete the host unless an instance is placed on it; returns whether a row was deleted.

    The condition on ``instance_count`` is checked by the DELETE itself, so a claim
    that commits first makes the DELETE match nothing, and a claim that comes later
    finds no host to claim.
    """
    result = await conn.execute(
        delete(hosts).where(hosts.c.id == host_id, hosts.c.instance_count == 0)
    )
    return result.rowcount == 1


async def list_page(conn: AsyncConnection, *, after: Position | None, limit: int) -> list[Host]:
    """Return up to ``limit + 1`` hosts after ``after``, ordered by (name, id)."""
    query = select(hosts).order_by(hosts.c.name, hosts.c.id).limit(limit + 1)
    if after is not None:
        query = query.where(tuple_(hosts.c.name, hosts.c.id) > tuple_(*after))
    return [_to_host(row) for row in (await conn.execute(query)).all()]


async def position_before(
    conn: AsyncConnection, *, marker: Position, limit: int
) -> tuple[bool, uuid.UUID | None]:
    """Marker of the page before the page after ``marker``; (True, None) for the first page."""
    query = (
        select(hosts.c.id)
        .where(tuple_(hosts.c.name, hosts.c.id) < tuple_(*marker))
        .order_by(hosts.c.name.desc(), hosts.c.id.desc())
        .limit(limit)
    )
    ids = (await conn.execute(query)).scalars().all()
    if len(ids) < limit:
        return True, None
    return False, ids[-1]


async def count(conn: AsyncConnection) -> int:
    return int((await conn.execute(select(func.count()).select_from(hosts))).scalar_one())
