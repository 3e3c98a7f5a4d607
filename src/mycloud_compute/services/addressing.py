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
is never given out twice: a concurrent allocation of the same address fails on it
and is retried with the next free one.
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
from sqlalchemy.exc import IntegrityError
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


def lowest_free_offset(network: IPNetwork, used: set[int]) -> int | None:
    """Return the smallest allocatable offset not in ``used``, or None when the network is full."""
    # Offsets 0 (network address) and 1 (gateway) and the last one are reserved.
    last_allocatable = network.num_addresses - 2
    offset = 2
    while offset <= last_allocatable:
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

    Runs in the caller's transaction. Each insert runs in a savepoint, so a unique
    violation (the address or the MAC taken by a concurrent allocation) rolls back
    only that insert before the next try. Raises NetworkFull when no address is left.
    """
    ip_network = parse_cidr(network.cidr)
    for _ in range(MAX_INSERT_ATTEMPTS):
        used = await store.used_address_values(conn, organization_id, network.id)
        offset = lowest_free_offset(ip_network, used)
        if offset is None:
            raise NetworkFull(network.name, network.cidr)

        port = AllocatedPort(
            id=uuid.uuid4(),
            network_id=network.id,
            network_name=network.name,
            address=str(ip_network.network_address + offset),
            version=ip_network.version,
            mac_address=random_mac(),
        )
        try:
            async with conn.begin_nested():
                await store.insert_port(
                    conn,
                    {
                        "organization_id": organization_id,
                        "id": port.id,
                        "network_id": network.id,
                        "instance_id": instance_id,
                        "address": port.address,
                        "address_value": offset,
                        "mac_address": port.mac_address,
                        "created_at": utcnow(),
                    },
                )
        except IntegrityError:
            log.info(
                "port insert conflicted, retrying network=%s address=%s instance=%s",
                network.id,
                port.address,
                instance_id,
            )
            continue
        return port
    raise RuntimeError(
        f"could not allocate a port on network {network.id} after {MAX_INSERT_ATTEMPTS} "
        "conflicting inserts"
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

