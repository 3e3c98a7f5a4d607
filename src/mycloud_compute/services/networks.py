"""Networks of an organization, and the defaults every organization has.

The defaults are the network ``private-network`` (192.168.0.0/16), created with
the organization and again on first use after a delete, and the security group
``default``, which cannot be deleted.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import networks as store
from mycloud_compute.persistence import security_groups as group_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.lifecycle import Status
from mycloud_compute.services.listing import ListQuery
from mycloud_compute.services.pages import Page, read_page
from mycloud_compute.services.text import reject_control_characters

log = logging.getLogger(__name__)

DEFAULT_NETWORK_NAME = "private-network"
DEFAULT_NETWORK_CIDR = "192.168.0.0/16"
DEFAULT_SECURITY_GROUP = "default"
# The default group allows all egress, as Neutron's default group does. Neutron's
# group also allows ingress from its own members, but rules here cannot name a
# group, so this one has no ingress rule and nothing reaches an instance until a
# rule allows it.
DEFAULT_SECURITY_GROUP_EGRESS = ("0.0.0.0/0", "::/0")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Prefix lengths a network may have. The smallest IPv4 network, a /29, keeps 5
# addresses for instances once the network, gateway and broadcast addresses are
# taken out. The widest IPv6 network is a /48, and IPv6 stops at /124 (13 addresses).
PREFIX_BOUNDS = {4: (8, 29), 6: (48, 124)}

# Ranges an instance network must not overlap: "this network", loopback,
# link-local (which contains the metadata address 169.254.169.254), multicast, the
# reserved 240.0.0.0/4 with the limited broadcast address, the IPv6 unspecified
# and loopback addresses, IPv4-mapped IPv6 addresses, IPv6 link-local and multicast.
RESERVED_RANGES: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/127",
        "::ffff:0:0/96",
        "fe80::/10",
        "ff00::/8",
    )
)

# How many instance ids an in-use error lists at most.
MAX_LISTED_INSTANCES = 10

_CIDR_SYNTAX = re.compile(r"^[0-9A-Fa-f:.]+/[0-9]{1,3}$")


def check_resource_name(name: str) -> None:
    """Apply the instance name rules to a network or security group name.

    The length (1 to 255) is checked by the request schema.
    """
    reject_control_characters("name", name)
    if name != name.strip():
        raise InvalidParameter("name", name, "name must not start or end with whitespace")


def parse_cidr(parameter: str, value: str) -> IPNetwork:
    """Parse ``<address>/<prefix length>`` with the host bits zero.

    A CIDR with host bits set (10.0.0.5/24) is rejected, and the message names the
    network it probably meant, because the request could also have meant a longer
    prefix. Netmask forms (10.0.0.0/255.255.255.0) and IPv6 zone ids are rejected too.
    """
    example = "a CIDR such as 10.0.0.0/24 or fd00::/64"
    if not _CIDR_SYNTAX.fullmatch(value):
        raise InvalidParameter(parameter, value, f"{parameter} must be {example}, got {value!r}")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        pass
    try:
        normalised = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidParameter(
            parameter, value, f"{parameter} must be {example}, got {value!r}"
        ) from None
    raise InvalidParameter(
        parameter,
        value,
        f"{parameter} {value} has host bits set; use {normalised}, or a longer prefix",
    )


def check_network_cidr(value: str) -> IPNetwork:
    network = parse_cidr("cidr", value)
    shortest, longest = PREFIX_BOUNDS[network.version]
    if not shortest <= network.prefixlen <= longest:
        raise InvalidParameter(
            "cidr",
            value,
            f"an IPv{network.version} network must have a prefix length from /{shortest} "
            f"to /{longest}, got /{network.prefixlen}",
        )
    for reserved in RESERVED_RANGES:
        if reserved.version == network.version and network.overlaps(reserved):
            raise InvalidParameter(
                "cidr", value, f"cidr {network} overlaps the reserved range {reserved}"
            )
    return network


# --- defaults -------------------------------------------------------------------------

# Reads and inserts of the default network before giving up, when concurrent requests
# keep creating and deleting it.
DEFAULT_NETWORK_ATTEMPTS = 3


async def ensure_default_network(
    conn: AsyncConnection, organization_id: uuid.UUID, *, lock: bool = False
) -> uuid.UUID:
    """Return the organization's default network, creating it on first use.

    Runs inside the caller's write transaction, which holds the write lock on
    SQLite and relies on the (organization_id, name) unique key on PostgreSQL.
    ``lock`` keeps an existing network from being deleted until the caller commits.
    """
    for _ in range(DEFAULT_NETWORK_ATTEMPTS):
        row = await store.find_network_by_name(conn, organization_id, DEFAULT_NETWORK_NAME, lock=lock)
        if row is not None:
            return uuid.UUID(str(row.id))
        network_id = uuid.uuid4()
        inserted = await store.insert_network_unless_named(
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
        if inserted:
            log.info("default network created organization=%s network_id=%s", organization_id, network_id)
            return network_id
        # A concurrent request created it and committed first: read that one.
        log.info("default network created concurrently; reading it organization=%s", organization_id)
    log.warning("default network deleted during every attempt to use it organization=%s", organization_id)
    raise Conflict(
        f"the default network {DEFAULT_NETWORK_NAME} was deleted while this request used it; retry the request"
    )


async def ensure_default_security_group(conn: AsyncConnection, organization_id: uuid.UUID) -> None:
    """Create the ``default`` group with its egress rules unless the organization has it."""
    found = await group_store.find_by_names(conn, organization_id, [DEFAULT_SECURITY_GROUP])
    if found:
        return
    group_id = uuid.uuid4()
    now = utcnow()
    await group_store.insert_group(
        conn,
        {
            "organization_id": organization_id,
            "id": group_id,
            "name": DEFAULT_SECURITY_GROUP,
            "description": "Default security group",
            "created_at": now,
        },
    )
    await group_store.insert_rules(
        conn,
        [
            {
                "organization_id": organization_id,
                "id": uuid.uuid4(),
                "security_group_id": group_id,
                "position": position,
                "direction": "egress",
                "protocol": None,
                "port_range_min": None,
                "port_range_max": None,
                "remote_ip_prefix": prefix,
                "created_at": now,
            }
            for position, prefix in enumerate(DEFAULT_SECURITY_GROUP_EGRESS)
        ],
    )


# --- the networks API -----------------------------------------------------------------


async def list_networks(db: Database, organization_id: uuid.UUID, query: ListQuery) -> Page:
    async with db.snapshot() as conn:
        return await read_page(
            conn, store.LIST_ORDER, organization_id, marker=query.marker, limit=query.limit
        )


async def get_network(db: Database, organization_id: uuid.UUID, network_id: uuid.UUID) -> Row[Any]:
    async with db.snapshot() as conn:
        row = await store.get_network(conn, organization_id, network_id)
    if row is None:
        raise NotFound(f"network {network_id} not found")
    return row


async def create_network(
    db: Database, organization_id: uuid.UUID, name: str, cidr: str
) -> Row[Any]:
    """Store a network; names are unique within the organization (409)."""
    check_resource_name(name)
    network = check_network_cidr(cidr)
    network_id = uuid.uuid4()
    conflict = Conflict(f"a network named {name!r} already exists", {"name": name})

    async with db.transaction() as conn:
        if await store.find_network_by_name(conn, organization_id, name) is not None:
            raise conflict
        try:
            await store.insert_network(
                conn,
                {
                    "organization_id": organization_id,
                    "id": network_id,
                    "name": name,
                    "cidr": str(network),
                    "ip_version": network.version,
                    "created_at": utcnow(),
                },
            )
        except IntegrityError as exc:
            # A concurrent create of the same name committed first (PostgreSQL).
            raise conflict from exc
        row = await store.get_network(conn, organization_id, network_id)

    log.info(
        "network created organization=%s network_id=%s name=%s cidr=%s",
        organization_id,
        network_id,
        name,
        network,
    )
    assert row is not None
    return row


async def _instances_on(
    conn: AsyncConnection, organization_id: uuid.UUID, network_id: uuid.UUID
) -> list[str]:
    """Return the ids of instances that have a port on the network or will get one.

    Instances that are built have ports. An instance in BUILD may not have reached
    the NETWORKING step yet, so its ``network_ids`` are checked too. Only BUILD
    instances are read for that, through the (organization_id, status) index.
    """
    port_instances = await store.instances_with_ports(
        conn, organization_id, network_id, limit=MAX_LISTED_INSTANCES
    )
    users = [str(instance_id) for instance_id in port_instances]
    building = await store.network_ids_of_instances(conn, organization_id, Status.BUILD)
    for instance_id, network_ids in building:
        if str(network_id) in network_ids and str(instance_id) not in users:
            users.append(str(instance_id))
    return users[:MAX_LISTED_INSTANCES]


async def delete_network(db: Database, organization_id: uuid.UUID, network_id: uuid.UUID) -> None:
    """Delete a network that no instance uses (409 otherwise).

    The network row is locked first (FOR UPDATE on PostgreSQL), and instance
    creates lock the networks they name (FOR KEY SHARE), so a create either
    commits before the in-use check, which then finds its instance, or finds the
    network gone. On SQLite every write transaction holds the database lock.
    """
    async with db.transaction() as conn:
        row = await store.get_network(conn, organization_id, network_id, lock=True)
        if row is None:
            raise NotFound(f"network {network_id} not found")
        users = await _instances_on(conn, organization_id, network_id)
        if users:
            raise Conflict(
                f"network {row.name!r} is in use by instances ({', '.join(users)}); "
                "delete them first",
                {"network": str(network_id), "instances": users},
            )
        try:
            async with conn.begin_nested():
                await store.delete_network(conn, organization_id, network_id)
        except IntegrityError as exc:
            # A port that the checks above did not see still refers to the network.
            raise Conflict(
                f"network {row.name!r} is in use; delete its instances first",
                {"network": str(network_id)},
            ) from exc
    log.info(
        "network deleted organization=%s network_id=%s name=%s",
        organization_id,
        network_id,
        row.name,
    )
