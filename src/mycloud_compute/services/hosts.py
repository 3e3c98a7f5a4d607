"""Compute hosts: the admin listing and the operators' changes to the inventory.

Capacity usage is never set here. It changes only through the scheduler's
claims and the worker's releases (see ``persistence.hosts``), so the values
listed are always the sums of the flavors of the instances placed on each host.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from mycloud_compute.persistence import hosts as store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.hosts import DISABLED, ENABLED, Host
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.instances import check_name
from mycloud_compute.services.listing import ListQuery

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 255
# vcpus is a 32-bit column. The same bound keeps RAM (MiB) and disk (GiB) far
# above any real host.
MAX_CAPACITY = 2**31 - 1
_REMOVE_HINT = "disable it to stop new placements, then delete its instances and try again"


@dataclass(frozen=True)
class HostPage:
    hosts: list[Host]
    total: int
    has_more: bool
    previous_marker: uuid.UUID | None
    previous_is_first: bool


async def list_hosts(db: Database, query: ListQuery) -> HostPage:
    """Return one page of hosts ordered by name, with the total count."""
    async with db.snapshot() as conn:
        position = None
        previous_marker, previous_is_first = None, False
        if query.marker is not None:
            # Removed hosts are deleted for good, so their ids stop being markers.
            marker_host = await store.get_host(conn, query.marker)
            if marker_host is None:
                raise InvalidParameter("marker", str(query.marker), f"marker {query.marker} not found")
            position = (marker_host.name, marker_host.id)
            previous_is_first, previous_marker = await store.position_before(
                conn, marker=position, limit=query.limit
            )
        hosts = await store.list_page(conn, after=position, limit=query.limit)
        total = await store.count(conn)
    return HostPage(
        hosts=hosts[: query.limit],
        total=total,
        has_more=len(hosts) > query.limit,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )


async def list_all_hosts(db: Database) -> list[Host]:
    async with db.snapshot() as conn:
        return await store.list_hosts(conn)


async def get_host(db: Database, host_id: uuid.UUID) -> Host:
    async with db.snapshot() as conn:
        host = await store.get_host(conn, host_id)
    if host is None:
        raise NotFound(f"host {host_id} not found")
    return host


def _check_capacity(parameter: str, value: int) -> None:
    if not 1 <= value <= MAX_CAPACITY:
        raise InvalidParameter(
            parameter, value, f"{parameter} must be an integer between 1 and {MAX_CAPACITY}, got {value}"
        )


async def add_host(db: Database, name: str, *, vcpus: int, ram: int, disk: int) -> Host:
    """Insert an enabled host with no usage (RAM in MiB, disk in GiB). Names are unique."""
    if not 1 <= len(name) <= MAX_NAME_LENGTH:
        raise InvalidParameter("name", name, f"name must be 1 to {MAX_NAME_LENGTH} characters")
    check_name(name)
    _check_capacity("vcpus", vcpus)
    _check_capacity("ram", ram)
    _check_capacity("disk", disk)
    async with db.transaction() as conn:
        if await store.find_by_name(conn, name) is not None:
            raise Conflict(f"host {name!r} already exists")
        host = await store.insert_host(conn, name=name, vcpus=vcpus, ram=ram, disk=disk)
    log.info("host added host=%s host_id=%s vcpus=%d ram=%d disk=%d", name, host.id, vcpus, ram, disk)
    return host


async def set_host_status(db: Database, name: str, status: str) -> Host:
    """Enable or disable a host for new instances. Instances already on it stay."""
    async with db.transaction() as conn:
        host = await store.find_by_name(conn, name)
        if host is None:
            raise NotFound(f"host {name!r} not found")
        await store.set_status(conn, host.id, status)
        updated = await store.get_host(conn, host.id)
    assert updated is not None
    log.info("host status changed host=%s host_id=%s status=%s", name, host.id, status)
    return updated


async def enable_host(db: Database, name: str) -> Host:
    return await set_host_status(db, name, ENABLED)


async def disable_host(db: Database, name: str) -> Host:
    return await set_host_status(db, name, DISABLED)


async def remove_host(db: Database, name: str) -> Host:
    """Delete a host that has no instances placed on it and return what it was."""
    async with db.transaction() as conn:
        host = await store.find_by_name(conn, name)
        if host is None:
            raise NotFound(f"host {name!r} not found")
        if host.instance_count > 0:
            raise Conflict(
                f"host {name!r} still has {host.instance_count} instance(s) placed on it; "
                f"{_REMOVE_HINT}"
            )
        if not await store.delete_if_unused(conn, host.id):
            # A concurrent claim or removal committed between the read and the DELETE.
            if await store.get_host(conn, host.id) is None:
                raise NotFound(f"host {name!r} not found")
            raise Conflict(f"an instance was just placed on host {name!r}; {_REMOVE_HINT}")
    log.info("host removed host=%s host_id=%s", name, host.id)
    return host
