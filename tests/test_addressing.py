"""Address selection and the simulated driver's inventory parsing, without a database."""

from __future__ import annotations

import re
import uuid

import pytest

from mycloud_compute.drivers.simulated import parse_host_inventory
from mycloud_compute.services.addressing import (
    AllocatedPort,
    addresses_document,
    lowest_free_offset,
    parse_cidr,
    random_mac,
)


@pytest.mark.parametrize(
    ("cidr", "used", "expected"),
    [
        ("10.0.0.0/24", set(), 2),
        ("10.0.0.0/24", {2, 3}, 4),
        ("10.0.0.0/24", {3}, 2),
        ("10.0.0.0/30", set(), 2),
        ("10.0.0.0/29", {2, 3, 4, 5}, 6),
        ("fd00::/64", set(), 2),
        ("fd00::/126", {2}, None),
    ],
)
def test_lowest_free_offset(cidr: str, used: set[int], expected: int | None) -> None:
    assert lowest_free_offset(parse_cidr(cidr), used) == expected


@pytest.mark.parametrize("cidr", ["10.0.0.0/29", "fd00::/125"])
def test_allocation_skips_reserved_addresses(cidr: str) -> None:
    network = parse_cidr(cidr)
    used: set[int] = set()
    while (offset := lowest_free_offset(network, used)) is not None:
        used.add(offset)

    addresses = {network.network_address + offset for offset in used}
    assert len(addresses) == network.num_addresses - 3
    assert network.network_address not in addresses
    assert network.network_address + 1 not in addresses  # the gateway
    assert network.broadcast_address not in addresses


@pytest.mark.parametrize("cidr", ["10.0.0.0/31", "10.0.0.0/32", "fd00::/127"])
def test_tiny_networks_have_no_addresses(cidr: str) -> None:
    assert lowest_free_offset(parse_cidr(cidr), set()) is None


def test_random_mac_uses_openstack_prefix() -> None:
    macs = {random_mac() for _ in range(200)}
    assert all(re.fullmatch(r"fa:16:3e(:[0-9a-f]{2}){3}", mac) for mac in macs)
    assert len(macs) > 190


def test_addresses_document_groups_by_network() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    ports = [
        AllocatedPort(uuid.uuid4(), first, "private", "10.0.0.2", 4, "fa:16:3e:00:00:01"),
        AllocatedPort(uuid.uuid4(), second, "v6", "fd00::2", 6, "fa:16:3e:00:00:02"),
        AllocatedPort(uuid.uuid4(), first, "private", "10.0.0.3", 4, "fa:16:3e:00:00:03"),
    ]

    assert addresses_document(ports) == {
        "private": [
            {"addr": "10.0.0.2", "version": 4, "type": "fixed", "mac_addr": "fa:16:3e:00:00:01"},
            {"addr": "10.0.0.3", "version": 4, "type": "fixed", "mac_addr": "fa:16:3e:00:00:03"},
        ],
        "v6": [{"addr": "fd00::2", "version": 6, "type": "fixed", "mac_addr": "fa:16:3e:00:00:02"}],
    }


def test_parse_host_inventory() -> None:
    hosts = parse_host_inventory(" a:4:8192:100 , b:2:1024:10,")
    assert [(host.name, host.vcpus, host.ram, host.disk) for host in hosts] == [
        ("a", 4, 8192, 100),
        ("b", 2, 1024, 10),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:4:8192", "expected NAME:VCPUS:RAM_MIB:DISK_GIB"),
        ("a:four:8192:100", "must be integers"),
        ("a:0:8192:100", "must be positive"),
        ("a:1:1:1,a:2:2:2", "listed twice"),
    ],
)
def test_parse_host_inventory_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host_inventory(text)
