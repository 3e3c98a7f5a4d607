"""The simulated driver when several worker processes share one set of VMs.

Each worker process has its own SimulatedDriver, so these tests use two drivers
for two processes, and pass each call the power state the database recorded.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from mycloud_compute.drivers.base import DriverError, InstanceSpec
from mycloud_compute.drivers.simulated import SimulatedDriver, parse_host_inventory
from mycloud_compute.services.lifecycle import PowerState

HOSTS = parse_host_inventory("sim-1:8:16384:100")


def make_spec(power_state: PowerState | None) -> InstanceSpec:
    return InstanceSpec(
        id=uuid.UUID(int=1),
        organization_id=uuid.UUID(int=2),
        name="web-1",
        host="sim-1",
        vcpus=1,
        ram=512,
        disk=10,
        image_id=uuid.UUID(int=3),
        power_state=power_state,
    )


async def test_soft_reboot_after_other_process_started_vm() -> None:
    first, second = SimulatedDriver(HOSTS), SimulatedDriver(HOSTS)
    spec = make_spec(PowerState.RUNNING)

    await first.spawn(spec)
    await second.power_off(spec)
    await first.power_on(dataclasses.replace(spec, power_state=PowerState.SHUTDOWN))

    # The second process last saw the VM shut down, but the record says it runs.
    await second.reboot(spec, hard=False)

    assert second.vms[spec.id].power_state == PowerState.RUNNING


async def test_soft_reboot_of_recorded_shutdown_fails() -> None:
    driver = SimulatedDriver(HOSTS)
    spec = make_spec(PowerState.RUNNING)
    await driver.spawn(spec)

    with pytest.raises(DriverError, match="not running"):
        await driver.reboot(dataclasses.replace(spec, power_state=PowerState.SHUTDOWN), hard=False)


async def test_spec_without_power_state_keeps_memory() -> None:
    driver = SimulatedDriver(HOSTS)
    spec = make_spec(None)
    await driver.spawn(spec)
    await driver.power_off(spec)

    with pytest.raises(DriverError, match="not running"):
        await driver.reboot(spec, hard=False)
