"""The default driver: simulated compute hosts whose VMs live in this process's memory.

It lets the whole service run on one machine with no hypervisor. Every operation
sleeps ``driver_step_delay`` seconds to make the lifecycle observable, and spawn
fails for instances whose name starts with ``simulated_fail_spawn``, so that the
error path can be exercised on purpose. For fault tests, an operation pauses for
an hour on instances named ``<simulated_pause_prefix><operation>-...``, so that a
test can kill the worker while it runs that operation.

The VMs are not shared between processes, and a restarted process starts with an
empty VM table. Operations on a VM this process has not seen therefore adopt it as
running on the host the caller names, and every operation takes the power state the
caller recorded, because the caller's database is the record of which VMs exist and
what state they are in.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from mycloud_compute.drivers.base import (
    ComputeDriver,
    DriverError,
    HostInventory,
    InstanceSpec,
    Vif,
)
from mycloud_compute.services.lifecycle import PowerState
from mycloud_compute.settings import Settings

log = logging.getLogger(__name__)

# How long an operation pauses on an instance named for it: longer than any test.
PAUSE_SECONDS = 3600.0


def parse_host_inventory(text: str) -> list[HostInventory]:
    """Parse ``NAME:VCPUS:RAM_MIB:DISK_GIB,...`` into host inventories.

    Raises ValueError naming the entry that is malformed, not positive, or repeated.
    """
    hosts: list[HostInventory] = []
    seen: set[str] = set()
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 4 or not parts[0]:
            raise ValueError(
                f"invalid simulated host {entry!r}: expected NAME:VCPUS:RAM_MIB:DISK_GIB"
            )
        name = parts[0]
        try:
            vcpus, ram, disk = (int(part) for part in parts[1:])
        except ValueError:
            raise ValueError(
                f"invalid simulated host {entry!r}: VCPUS, RAM_MIB and DISK_GIB must be integers"
            ) from None
        if min(vcpus, ram, disk) <= 0:
            raise ValueError(f"invalid simulated host {entry!r}: capacities must be positive")
        if name in seen:
            raise ValueError(f"invalid simulated hosts: {name!r} is listed twice")
        seen.add(name)
        hosts.append(HostInventory(name=name, vcpus=vcpus, ram=ram, disk=disk))
    return hosts


@dataclass
class SimulatedVm:
    """A VM as the simulated hypervisor keeps it."""

    host: str
    power_state: PowerState
    vifs: list[Vif] = field(default_factory=list)
    boot_count: int = 1


class SimulatedDriver(ComputeDriver):
    """Hosts from a fixed inventory and VMs in a dictionary keyed by instance id."""

    def __init__(
        self,
        hosts: Sequence[HostInventory],
        *,
        step_delay: float = 0.0,
        fail_spawn_prefix: str = "",
        pause_prefix: str = "",
    ) -> None:
        self.hosts = {host.name: host for host in hosts}
        self.step_delay = step_delay
        self.fail_spawn_prefix = fail_spawn_prefix
        self.pause_prefix = pause_prefix
        self.vms: dict[uuid.UUID, SimulatedVm] = {}
        self.prepared_disks: set[uuid.UUID] = set()
        self.plugged_vifs: dict[uuid.UUID, list[Vif]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> SimulatedDriver:
        """Build the driver from ``simulated_hosts``, ``driver_step_delay`` and the test prefixes."""
        return cls(
            parse_host_inventory(settings.simulated_hosts),
            step_delay=settings.driver_step_delay,
            fail_spawn_prefix=settings.simulated_fail_spawn,
            pause_prefix=settings.simulated_pause_prefix,
        )

    async def _wait(self, instance: InstanceSpec, operation: str) -> None:
        """Spend the step delay, or pause when the instance is named for this operation."""
        if self.pause_prefix and instance.name.startswith(f"{self.pause_prefix}{operation}-"):
            log.warning(
                "simulated driver paused operation=%s instance=%s organization=%s seconds=%.0f",
                operation, instance.id, instance.organization_id, PAUSE_SECONDS,
            )
            await asyncio.sleep(PAUSE_SECONDS)
        if self.step_delay > 0:
            await asyncio.sleep(self.step_delay)

    def _check_host(self, instance: InstanceSpec) -> None:
        # Any named host is accepted: the hosts table is the record of which hosts
        # exist, and operators add hosts there with `mycloud-compute host add`.
        if not instance.host:
            raise DriverError("the instance has no compute host")

    def _get_vm(self, instance: InstanceSpec) -> SimulatedVm:
        self._check_host(instance)
        vm = self.vms.get(instance.id)
        if vm is None:
            vm = SimulatedVm(host=instance.host, power_state=PowerState.RUNNING)
            self.vms[instance.id] = vm
        if instance.power_state is not None:
            # Another worker process may have powered this VM on or off since this
            # process last saw it, so the database's record wins over the memory copy.
            vm.power_state = instance.power_state
        return vm

    async def list_hosts(self) -> list[HostInventory]:
        return list(self.hosts.values())

    async def prepare_block_devices(self, instance: InstanceSpec) -> None:
        await self._wait(instance, "prepare_block_devices")
        self._check_host(instance)
        self.prepared_disks.add(instance.id)

    async def plug_vifs(self, instance: InstanceSpec, vifs: Sequence[Vif]) -> None:
        await self._wait(instance, "plug_vifs")
        self._check_host(instance)
        self.plugged_vifs[instance.id] = list(vifs)

    async def spawn(self, instance: InstanceSpec) -> None:
        await self._wait(instance, "spawn")
        self._check_host(instance)
        if self.fail_spawn_prefix and instance.name.startswith(self.fail_spawn_prefix):
            raise DriverError(
                f"simulated spawn failure: instance name {instance.name!r} starts with "
                f"{self.fail_spawn_prefix!r} (MYCLOUD_SIMULATED_FAIL_SPAWN)"
            )
        if instance.id in self.vms:
            return
        self.vms[instance.id] = SimulatedVm(
            host=instance.host,
            power_state=PowerState.RUNNING,
            vifs=self.plugged_vifs.get(instance.id, []),
        )
        log.debug("simulated VM spawned instance=%s host=%s", instance.id, instance.host)

    async def destroy(self, instance: InstanceSpec) -> None:
        await self._wait(instance, "destroy")
        self.vms.pop(instance.id, None)
        self.prepared_disks.discard(instance.id)
        self.plugged_vifs.pop(instance.id, None)

    async def power_off(self, instance: InstanceSpec) -> None:
        await self._wait(instance, "power_off")
        self._get_vm(instance).power_state = PowerState.SHUTDOWN

    async def power_on(self, instance: InstanceSpec) -> None:
        await self._wait(instance, "power_on")
        vm = self._get_vm(instance)
        if vm.power_state != PowerState.RUNNING:
            vm.power_state = PowerState.RUNNING
            vm.boot_count += 1

    async def reboot(self, instance: InstanceSpec, *, hard: bool) -> None:
        await self._wait(instance, "reboot")
        vm = self._get_vm(instance)
        if not hard and vm.power_state != PowerState.RUNNING:
            raise DriverError(f"cannot soft-reboot instance {instance.id}: the VM is not running")
        vm.power_state = PowerState.RUNNING
        vm.boot_count += 1
