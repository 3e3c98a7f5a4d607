"""The create task: SCHEDULING → BLOCK_DEVICE_MAPPING → NETWORKING → SPAWNING → ACTIVE.

Every step is idempotent, and the task records the step it starts. A task
resumed by another worker after a crash therefore repeats only the step that was
running. A host already claimed is kept, ports already allocated are reused, and
the driver operations tolerate being repeated.

At each step boundary a task_state of DELETING means a delete request arrived
during the build. The create task then stops as CANCELLED and leaves the cleanup
to the delete task, which runs only after this one has finished.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.drivers.base import DriverError, InstanceSpec, Vif
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence import networks as network_store
from mycloud_compute.persistence import volumes as volume_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tasks import TaskRunState
from mycloud_compute.scheduler.scheduler import ResourceRequest, explain_no_valid_host, select_host
from mycloud_compute.services.addressing import (
    AllocatedPort,
    NetworkFull,
    addresses_document,
    allocate_port,
    port_from_row,
)
from mycloud_compute.services.lifecycle import CREATE_STEPS, PowerState, TaskState, VmState
from mycloud_compute.worker.context import (
    ACTION_FAILED,
    ACTION_SUCCEEDED,
    TaskContext,
    instance_spec,
    make_fault,
    release_resources,
    state_values,
)

log = logging.getLogger(__name__)

NO_VALID_HOST = "No valid host was found"


class BuildFailed(Exception):
    """The build cannot succeed; the instance goes to ERROR with this fault."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(f"{message}: {details}")
        self.message = message
        self.details = details


async def run_create(ctx: TaskContext) -> None:
    """Run the create task from the step it last started (the first one when new)."""
    steps: dict[TaskState, Callable[[TaskContext], Awaitable[bool]]] = {
        TaskState.SCHEDULING: _schedule,
        TaskState.BLOCK_DEVICE_MAPPING: _prepare_block_devices,
        TaskState.NETWORKING: _allocate_network,
        TaskState.SPAWNING: _spawn,
    }
    first = CREATE_STEPS.index(TaskState(ctx.task.step)) if ctx.task.step in steps else 0
    if first > 0:
        log.info("create task resumed step=%s attempt=%d %s", ctx.task.step, ctx.task.attempts, ctx.log_ids)

    try:
        for step in CREATE_STEPS[first:]:
            if not await steps[step](ctx):
                return
    except BuildFailed as failure:
        await fail_build(ctx, failure)
        return
    await _finish(ctx)


async def _enter_step(
    ctx: TaskContext, conn: AsyncConnection, instance: Row[Any], step: TaskState | None
) -> bool:
    """Move the instance to ``step`` (None: no step change), or stop the task and return False.

    The task stops as CANCELLED when a delete request arrived, or when the
    instance is no longer BUILDING (nothing is left to build).
    """
    if instance.task_state == TaskState.DELETING:
        await ctx.finish(
            conn,
            TaskRunState.CANCELLED,
            action_status=ACTION_FAILED,
            message="Cancelled: the instance was deleted during the build",
        )
        log.info("create task cancelled by a delete request %s", ctx.log_ids)
        return False
    if instance.vm_state != VmState.BUILDING:
        await ctx.finish(
            conn,
            TaskRunState.CANCELLED,
            action_status=ACTION_FAILED,
            message=f"Cancelled: the instance is {instance.vm_state}, not BUILDING",
        )
        log.warning("create task cancelled vm_state=%s %s", instance.vm_state, ctx.log_ids)
        return False
    if step is not None and instance.task_state != step:
        await ctx.update_instance(conn, state_values(VmState.BUILDING, step))
        log.info("instance build step task_state=%s %s", step, ctx.log_ids)
    return True


async def _schedule(ctx: TaskContext) -> bool:
    """Claim a host; an instance that already has one (an earlier attempt) keeps it."""
    no_valid_host = None
    async with ctx.locked_instance(TaskState.SCHEDULING) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, TaskState.SCHEDULING):
            return False
        if instance.host_id is not None:
            return True

        request = ResourceRequest.from_flavor(instance.flavor)
        host = await select_host(conn, request)
        if host is None:
            no_valid_host = await explain_no_valid_host(conn, request)
            await ctx.update_instance(
                conn,
                {
                    **state_values(VmState.ERROR, None, PowerState.NOSTATE),
                    "fault": make_fault(NO_VALID_HOST, no_valid_host),
                },
            )
            await ctx.finish(
                conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{NO_VALID_HOST}: {no_valid_host}"
            )
        else:
            # The claim and host_id commit together, so a resumed task never claims twice.
            await ctx.update_instance(conn, {"host_id": host.id})

    if no_valid_host is not None:
        # WARNING, not ERROR: any customer can cause this by asking for more than is free.
        log.warning("instance build failed: no valid host details=%r %s", no_valid_host, ctx.log_ids)
        return False
    log.info("instance scheduled host=%s %s", host.name if host else None, ctx.log_ids)
    return True


async def _prepare_block_devices(ctx: TaskContext) -> bool:
    """Create the root disk, then mark the volumes the API reserved for the instance ATTACHED."""
    step = TaskState.BLOCK_DEVICE_MAPPING
    async with ctx.locked_instance(step) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, step):
            return False
        spec = await _require_spec(conn, instance)
        has_volumes = bool(instance.volumes_attached)
    try:
        await ctx.driver.prepare_block_devices(spec)
    except DriverError as exc:
        raise BuildFailed("Failed to prepare the block devices", str(exc)) from exc
    if not has_volumes:
        return True

    # NOTE: the driver interface has no call to attach a volume, so the attachment
    # is recorded in the database only. A real hypervisor driver needs one here.
    async with ctx.locked_instance() as (conn, instance):
        attached = await volume_store.mark_attached(
            conn, instance.organization_id, instance.id, utcnow()
        )
    log.info("instance volumes attached count=%d %s", attached, ctx.log_ids)
    return True


async def _allocate_network(ctx: TaskContext) -> bool:
    """Give the instance one port per entry of ``network_ids`` and plug them."""
    async with ctx.locked_instance(TaskState.NETWORKING) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, TaskState.NETWORKING):
            return False
        spec = await _require_spec(conn, instance)
        try:
            ports = await _ensure_ports(conn, instance)
        except NetworkFull as exc:
            raise BuildFailed("No free IP address on the network", exc.message) from exc
        await ctx.update_instance(conn, {"addresses": addresses_document(ports)})

    log.info("instance ports allocated addresses=%s %s", [port.address for port in ports], ctx.log_ids)
    vifs = [Vif(port.id, port.network_id, port.address, port.mac_address) for port in ports]
    try:
        await ctx.driver.plug_vifs(spec, vifs)
    except DriverError as exc:
        raise BuildFailed("Failed to plug the network interfaces", str(exc)) from exc
    return True


async def _ensure_ports(conn: AsyncConnection, instance: Row[Any]) -> list[AllocatedPort]:
    """Return the instance's ports in ``network_ids`` order, allocating the missing ones.

    Ports left by an earlier attempt are reused, one per entry of ``network_ids``.
    """
    network_ids = [uuid.UUID(str(value)) for value in instance.network_ids]
    networks = await network_store.get_networks(conn, instance.organization_id, network_ids)
    existing: dict[uuid.UUID, list[Row[Any]]] = {}
    for row in await network_store.instance_ports(conn, instance.organization_id, instance.id):
        existing.setdefault(row.network_id, []).append(row)

    ports = []
    for network_id in network_ids:
        network = networks.get(network_id)
        if network is None:
            raise BuildFailed("Network not found", f"network {network_id} no longer exists")
        reusable = existing.get(network_id)
        if reusable:
            ports.append(port_from_row(reusable.pop(0), network))
        else:
            ports.append(await allocate_port(conn, instance.organization_id, instance.id, network))
    return ports


async def _spawn(ctx: TaskContext) -> bool:
    spec = await _start_driver_step(ctx, TaskState.SPAWNING)
    if spec is None:
        return False
    try:
        await ctx.driver.spawn(spec)
    except DriverError as exc:
        raise BuildFailed("Failed to spawn the instance", str(exc)) from exc
    return True


async def _start_driver_step(ctx: TaskContext, step: TaskState) -> InstanceSpec | None:
    """Record ``step`` and return the instance's spec, or None when the task stopped."""
    async with ctx.locked_instance(step) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, step):
            return None
        return await _require_spec(conn, instance)


async def _require_spec(conn: AsyncConnection, instance: Row[Any]) -> InstanceSpec:
    spec = await instance_spec(conn, instance)
    if spec is None:
        # SCHEDULING commits host_id before any later step starts.
        raise RuntimeError(f"instance {instance.id} reached a driver step without a host")
    return spec


async def _finish(ctx: TaskContext) -> None:
    async with ctx.locked_instance() as (conn, instance):
        if not await _enter_step(ctx, conn, instance, None):
            return
        await ctx.update_instance(
            conn, {**state_values(VmState.ACTIVE, None, PowerState.RUNNING), "launched_at": utcnow()}
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info("instance active %s", ctx.log_ids)


async def fail_build(ctx: TaskContext, failure: BuildFailed) -> None:
    """Put the instance in ERROR with a fault and release what the build had claimed.

    The VM is destroyed first (a driver error there is logged and ignored) so
    that the host's capacity is given back only once the VM is gone. When a
    delete request has arrived meanwhile, the task is cancelled instead and the
    delete task does the cleanup.
    """
    async with ctx.db.snapshot() as conn:
        instance = await instance_store.get(conn, ctx.task.organization_id, ctx.task.instance_id)
        spec = await instance_spec(conn, instance) if instance is not None else None
    if spec is not None:
        try:
            await ctx.driver.destroy(spec)
        except DriverError as exc:
            log.error("destroy after a failed build failed error=%r host=%s %s", str(exc), spec.host, ctx.log_ids)

    async with ctx.locked_instance() as (conn, instance):
        if instance.task_state == TaskState.DELETING:
            await _enter_step(ctx, conn, instance, None)
            return
        released = await release_resources(conn, instance)
        await ctx.update_instance(
            conn,
            {
                **state_values(VmState.ERROR, None, PowerState.NOSTATE),
                **released,
                "fault": make_fault(failure.message, failure.details),
            },
        )
        await ctx.finish(
            conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{failure.message}: {failure.details}"
        )
    log.error("instance build failed message=%r details=%r %s", failure.message, failure.details, ctx.log_ids)


async def give_up_create(ctx: TaskContext, reason: str) -> None:
    """End a create task that failed too often: the instance goes to ERROR."""
    await fail_build(ctx, BuildFailed("The build of the instance failed", reason))
