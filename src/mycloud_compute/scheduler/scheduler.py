"""Host selection for new instances.

The filter keeps the enabled hosts with enough free vCPUs, RAM and disk. The
weigher spreads instances: the host with the most free RAM comes first. Selection
and claim happen in the caller's transaction, and the claim itself is a conditional
UPDATE (see ``persistence.hosts``), so a candidate taken by a concurrent request
in the meantime is skipped rather than overcommitted. A host that a concurrent
claim holds locked is passed over for the next best one, so that concurrent
builds spread over hosts instead of waiting for each other.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence.hosts import Host

log = logging.getLogger(__name__)

# Candidate lists read before a lost race are stale; after this many rounds with
# every claim lost, the request is reported as not fitting.
CLAIM_ROUNDS = 3


@dataclass(frozen=True)
class ResourceRequest:
    """Resources one instance needs (RAM in MiB, disk in GiB)."""

    vcpus: int
    ram: int
    disk: int

    @classmethod
    def from_flavor(cls, flavor: Mapping[str, Any]) -> ResourceRequest:
        """Read the request from an instance's stored ``flavor`` JSON."""
        return cls(vcpus=int(flavor["vcpus"]), ram=int(flavor["ram"]), disk=int(flavor["disk"]))


async def select_host(conn: AsyncConnection, request: ResourceRequest) -> Host | None:
    """Claim the request's resources on the best host that fits and return that host.

    Returns None when no host fits; nothing is claimed then.
    """
    # One statement in the common case; the loop below handles the hosts that
    # concurrent claims hold locked, waiting for them.
    host = await host_store.claim_best_unlocked(
        conn, vcpus=request.vcpus, ram=request.ram, disk=request.disk
    )
    if host is not None:
        return host
    for _ in range(CLAIM_ROUNDS):
        candidates = await host_store.find_candidates(
            conn, vcpus=request.vcpus, ram=request.ram, disk=request.disk
        )
        if not candidates:
            return None
        for host in candidates:
            claimed = await host_store.claim(
                conn, host.id, vcpus=request.vcpus, ram=request.ram, disk=request.disk
            )
            if claimed:
                return host
            log.info("host claim lost to a concurrent request host=%s", host.name)
    return None


async def explain_no_valid_host(conn: AsyncConnection, request: ResourceRequest) -> str:
    """Say why no host fits the request, for the fault details of the instance.

    The details are shown to the instance's owner, so they name only what the
    request lacked. Host counts and free capacities go to the operators' log.
    """
    all_hosts = await host_store.list_hosts(conn)
    enabled = [host for host in all_hosts if host.status == host_store.ENABLED]
    log.warning(
        "no valid host vcpus=%d ram=%d disk=%d hosts=%d enabled=%d max_free_vcpus=%s "
        "max_free_ram=%s max_free_disk=%s",
        request.vcpus, request.ram, request.disk, len(all_hosts), len(enabled),
        max((host.vcpus_free for host in enabled), default=None),
        max((host.ram_free for host in enabled), default=None),
        max((host.disk_free for host in enabled), default=None),
    )
    if not enabled:
        return "no compute host is available"

    shortfalls = []
    if not any(host.vcpus_free >= request.vcpus for host in enabled):
        shortfalls.append(f"{request.vcpus} free vCPUs")
    if not any(host.ram_free >= request.ram for host in enabled):
        shortfalls.append(f"{request.ram} MiB of free RAM")
    if not any(host.disk_free >= request.disk for host in enabled):
        shortfalls.append(f"{request.disk} GiB of free disk")
    if shortfalls:
        return "no host has " + " or ".join(shortfalls)
    return (
        f"no host has {request.vcpus} vCPUs, {request.ram} MiB of RAM and "
        f"{request.disk} GiB of disk free at the same time"
    )
