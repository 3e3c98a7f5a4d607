"""Fixed IP and MAC address allocation for instance ports.

Each port takes the lowest free address of its network's CIDR. The first address
(the network address), the second (the gateway) and the last (the IPv4 broadcast
address) are never given out. IPv6 has no broadcast address, but its last address
is kept free too so that both families follow one rule.

A port stores its address twice: as text, and as ``address_value``, the offset of
the address from the network address. The offset, not the full address, is stored
because an IPv6 address does not fit the 64-bit column, while offsets stay small
when the lowest address is always taken first. The unique key on
(organization_id, network_id, address_value) is what guarantees that an address
is never given out twice: a concurrent allocation of the same address does
nothing on it and is retried with the next free one.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import networks as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.services.errors import Conflict

log = logging.getLogger(__name__)

# The OpenStack OUI that Neutron and Nova use for instance MAC addresses.
MAC_PREFIX = "fa:16:3e"

# Inserts retried after a unique violation (address or MAC taken concurrently)
# before the allocation gives up.
MAX_INSERT_ATTEMPTS = 16

# Offsets 0 (the network address) and 1 (the gateway) are never given out.
FIRST_ALLOCATABLE = 2

# The largest offset that the BIGINT ``address_value`` column holds. IPv6
# networks can be larger, but an allocation never gets that far.
MAX_ADDRESS_VALUE = 2**63 - 1

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetworkFull(Conflict):
    """Every allocatable address of the network is in use."""

    def __init__(self, network_name: str, cidr: str) -> None:
        super().__init__(
            f"network {network_name!r} ({cidr}) has no free IP address; "
            "delete instances on it or use a larger network",
            {"network": network_name, "cidr": cidr},
        )
        self.network_name = network_name
        self.cidr = cidr


@dataclass(frozen=True)
class AllocatedPort:
    """A port of an instance with its fixed address."""

    id: uuid.UUID
    network_id: uuid.UUID
    network_name: str
    address: str
    version: int
    mac_address: str


def parse_cidr(cidr: str) -> IPNetwork:
    return ipaddress.ip_network(cidr, strict=False)


def last_allocatable_offset(network: IPNetwork) -> int:
    """Return the highest offset given out on ``network`` (below its last address, within BIGINT)."""
    return min(network.num_addresses - 2, MAX_ADDRESS_VALUE)


def lowest_free_offset(network: IPNetwork, used: set[int]) -> int | None:
    """Return the smallest allocatable offset not in ``used``, or None when the network is full.

    The rule that the allocation's SQL query applies to the stored ports; the tests
    use this as the expected result.
    """
    offset = FIRST_ALLOCATABLE
    while offset <= last_allocatable_offset(network):
        if offset not in used:
            return offset
        offset += 1
    return None


def random_mac() -> str:
    suffix = secrets.token_bytes(3)
    return MAC_PREFIX + "".join(f":{byte:02x}" for byte in suffix)


async def allocate_port(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    network: Row[Any],
) -> AllocatedPort:
    """Insert a port for the instance on ``network`` with the lowest free address.

    Runs in the caller's transaction. On PostgreSQL the INSERT chooses the address
    itself. On SQLite a query chooses it just before the INSERT, which is safe
    because SQLite runs one write transaction at a time. An INSERT that hits a
    unique key (the address taken by a concurrent allocation, or the random MAC
    address in use) does nothing, so no savepoint is needed, and the allocation
    tries the next free address. Raises NetworkFull when no address is left.
    """
    ip_network = parse_cidr(network.cidr)
    last = last_allocatable_offset(ip_network)
    for _ in range(MAX_INSERT_ATTEMPTS):
        values: dict[str, Any] = {
            "organization_id": organization_id,
            "id": uuid.uuid4(),
            "network_id": network.id,
            "instance_id": instance_id,
            "mac_address": random_mac(),
            "created_at": utcnow(),
        }
        if conn.dialect.name == "postgresql":
            row = await store.insert_port_at_lowest_free(
                conn,
                values,
                network_address=str(ip_network.network_address),
                first_allocatable=FIRST_ALLOCATABLE,
                last_allocatable=last,
            )
            if row is not None:
                address = str(ip_network.network_address + row.address_value)
                if row.address != address:
                    # PostgreSQL prints a few IPv6 forms differently from Python, such
                    # as ::a.b.c.d, so the stored text is made to match Python's form.
                    await store.set_port_address(conn, organization_id, values["id"], address)
                return _allocated(values, network, ip_network, address)
            offset = await store.find_lowest_free_address_value(
                conn, organization_id, network.id, FIRST_ALLOCATABLE
            )
            if offset > last:
                raise NetworkFull(network.name, network.cidr)
        else:
            offset = await store.find_lowest_free_address_value(
                conn, organization_id, network.id, FIRST_ALLOCATABLE
            )
            if offset > last:
                raise NetworkFull(network.name, network.cidr)
            address = str(ip_network.network_address + offset)
            if await store.insert_port_if_free(conn, {**values, "address": address, "address_value": offset}):
                return _allocated(values, network, ip_network, address)
        log.info(
            "port insert conflicted, retrying network=%s offset=%d instance=%s", network.id, offset, instance_id
        )
    raise RuntimeError(
        f"could not allocate a port on network {network.id} after {MAX_INSERT_ATTEMPTS} "
        "conflicting inserts"
    )


def _allocated(values: dict[str, Any], network: Row[Any], ip_network: IPNetwork, address: str) -> AllocatedPort:
    return AllocatedPort(
        id=values["id"],
        network_id=network.id,
        network_name=network.name,
        address=address,
        version=ip_network.version,
        mac_address=values["mac_address"],
    )


def port_from_row(row: Row[Any], network: Row[Any]) -> AllocatedPort:
    """Build an AllocatedPort from a ``ports`` row and the row of its network."""
    return AllocatedPort(
        id=row.id,
        network_id=row.network_id,
        network_name=network.name,
        address=row.address,
        version=parse_cidr(network.cidr).version,
        mac_address=row.mac_address,
    )


def addresses_document(ports: Iterable[AllocatedPort]) -> dict[str, list[dict[str, Any]]]:
    """Return the instance's ``addresses`` value: fixed addresses grouped by network name."""
    document: dict[str, list[dict[str, Any]]] = {}
    for port in ports:
        document.setdefault(port.network_name, []).append(
            {"addr": port.address, "version": port.version, "type": "fixed", "mac_addr": port.mac_address}
        )
    return document

