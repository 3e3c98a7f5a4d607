"""Stopping a running task only where no database transaction is open: at a driver call.

A task cancelled in the middle of a transaction may leave its connection to be
closed without a rollback. On SQLite that connection keeps the write lock until the
process exits, so every later write (the give-back of the other interrupted tasks
included) waits for the busy timeout and fails. Handlers call the driver only
between transactions, so a worker that stops cancels the tasks that are waiting
for the driver at once, and the others when they reach their next driver call or
when they end by themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from mycloud_compute.drivers.base import ComputeDriver, HostInventory, InstanceSpec, Vif

log = logging.getLogger(__name__)


class StopSignal:
    """Whether the worker is stopping, and whether the task is inside a driver call now."""

    def __init__(self) -> None:
        self.stopping = False
        self.in_driver_call = False

    def request_stop(self, task: asyncio.Task[None]) -> None:
        """Mark the task to stop, cancelling it at once when it waits for the driver."""
        self.stopping = True
        if self.in_driver_call:
            task.cancel()

    @asynccontextmanager
    async def driver_call(self) -> AsyncIterator[None]:
        if self.stopping:
            raise asyncio.CancelledError("the worker is stopping")
        self.in_driver_call = True
        try:
            yield
        finally:
            self.in_driver_call = False


class StoppableDriver(ComputeDriver):
    """Delegates to a driver, marking each call so that a stopping worker may interrupt it."""

    def __init__(self, inner: ComputeDriver, signal: StopSignal) -> None:
        self.inner = inner
        self.signal = signal

    async def list_hosts(self) -> list[HostInventory]:
        return await self.inner.list_hosts()

    async def prepare_block_devices(self, instance: InstanceSpec) -> None:
        async with self.signal.driver_call():
            await self.inner.prepare_block_devices(instance)

    async def plug_vifs(self, instance: InstanceSpec, vifs: Sequence[Vif]) -> None:
        async with self.signal.driver_call():
            await self.inner.plug_vifs(instance, vifs)

    async def spawn(self, instance: InstanceSpec) -> None:
        async with self.signal.driver_call():
            await self.inner.spawn(instance)

    async def destroy(self, instance: InstanceSpec) -> None:
        async with self.signal.driver_call():
            await self.inner.destroy(instance)

    async def power_off(self, instance: InstanceSpec) -> None:
        async with self.signal.driver_call():
            await self.inner.power_off(instance)

    async def power_on(self, instance: InstanceSpec) -> None:
        async with self.signal.driver_call():
            await self.inner.power_on(instance)

    async def reboot(self, instance: InstanceSpec, *, hard: bool) -> None:
        async with self.signal.driver_call():
            await self.inner.reboot(instance, hard=hard)
