"""The hypervisor driver interface.

A driver manages VMs on compute hosts. It never touches the database: the worker
reads and writes all state and passes the driver plain, frozen values. Every
method must be idempotent, because a task resumed by another worker after a crash
repeats the step that was running, and that worker's driver instance may not have
seen the earlier steps.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from mycloud_compute.services.lifecycle import PowerState


class DriverError(Exception):
    """A hypervisor operation failed; the message is shown to users in the instance fault."""


@dataclass(frozen=True)
class HostInventory:
    """Capacity of one compute host as the hypervisor reports it (RAM in MiB, disk in GiB)."""

    name: str
    vcpus: int
    ram: int
    disk: int


@dataclass(frozen=True)
class InstanceSpec:
    """The instance fields a driver needs (RAM in MiB, disk in GiB)."""

    id: uuid.UUID
    organization_id: uuid.UUID
    name: str
    host: str
    vcpus: int
    ram: int
    disk: int
    image_id: uuid.UUID
    # The power state the database last recorded. A driver whose VM records can go
    # stale (the simulated one keeps them per process) takes this as the truth.
    power_state: PowerState | None = None


@dataclass(frozen=True)
class Vif:
    """A virtual interface: one port of the instance on one network."""

    port_id: uuid.UUID
    network_id: uuid.UUID
    address: str
    mac_address: str


class ComputeDriver(ABC):
    """Operations on compute hosts and their VMs, named after their Nova counterparts."""

    @abstractmethod
    async def list_hosts(self) -> list[HostInventory]:
        """Return the inventory of every compute host this driver manages."""

    @abstractmethod
    async def prepare_block_devices(self, instance: InstanceSpec) -> None:
        """Create the root disk of the instance on its host."""

    @abstractmethod
    async def plug_vifs(self, instance: InstanceSpec, vifs: Sequence[Vif]) -> None:
        """Connect the instance's virtual interfaces to their networks."""

    @abstractmethod
    async def spawn(self, instance: InstanceSpec) -> None:
        """Create the VM and boot it; a VM that already runs is left as it is."""

    @abstractmethod
    async def destroy(self, instance: InstanceSpec) -> None:
        """Stop the VM and remove it with its disks; a missing VM is not an error."""

    @abstractmethod
    async def power_off(self, instance: InstanceSpec) -> None:
        """Stop the VM, keeping its disks."""

    @abstractmethod
    async def power_on(self, instance: InstanceSpec) -> None:
        """Boot a stopped VM."""

    @abstractmethod
    async def reboot(self, instance: InstanceSpec, *, hard: bool) -> None:
        """Restart the VM: through the guest when ``hard`` is false, by power cycle otherwise."""
