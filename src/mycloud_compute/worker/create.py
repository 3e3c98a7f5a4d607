"""The create task: SCHEDULING → BLOCK_DEVICE_MAPPING → NETWORKING → SPAWNING → ACTIVE.

Each step is one transaction that records the step, followed by the step's
driver call. SCHEDULING's host claim commits in the transaction that starts
BLOCK_DEVICE_MAPPING, and a last transaction makes the instance ACTIVE and
finishes the task, so a build with no volumes takes four transactions.

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
from mycloud_compute.persistence.hosts import Host
from mycloud_compute.persistence.tasks import TaskRunState
from mycloud_compute.scheduler.scheduler import ResourceRequest, explain_no_valid_host, select_host
from mycloud_compute.services.addressing import (
    AllocatedPort,
    NetworkFull,
    addresses_document,
    allocate_port,
    port_from_row,
)
from mycloud_compute.services.lifecycle import PowerState, TaskState, VmState
from mycloud_compute.worker.context import (
    ACTION_FAILED,
    ACTION_SUCCEEDED,
    TaskContext,
    instance_spec,
    make_fault,
    release_resources,
    spec_on_host,
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
    """Run the create task from the step it last recorded (the first one when new)."""
    # SCHEDULING has no transaction of its own: the host claim commits together
    # with the start of BLOCK_DEVICE_MAPPING, which claims a host when the instance
    # has none. A task recorded at SCHEDULING therefore starts with that step.
    steps: dict[TaskState, Callable[[TaskContext], Awaitable[bool]]] = {
        TaskState.BLOCK_DEVICE_MAPPING: _prepare_block_devices,
        TaskState.NETWORKING: _allocate_network,
        TaskState.SPAWNING: _spawn,
    }
    order = list(steps)
    first = order.index(TaskState(ctx.task.step)) if ctx.task.step in steps else 0
    if first > 0:
        log.info("create task resumed step=%s attempt=%d %s", ctx.task.step, ctx.task.attempts, ctx.log_ids)

    try:
        for step in order[first:]:
            if not await steps[step](ctx):
                return
    except BuildFailed as failure:
        await fail_build(ctx, failure)
        return
    await _finish(ctx)


async def _still_building(ctx: TaskContext, conn: AsyncConnection, instance: Row[Any]) -> bool:
    """Return True when the build may go on; otherwise finish the task as CANCELLED and return False.

    The task stops when a delete request arrived, or when the instance is no
    longer BUILDING (nothing is left to build).
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
    return True


def _step_values(instance: Row[Any], step: TaskState) -> dict[str, Any]:
    """Return the instance columns that move it to ``step``; none when it is there already."""
    if instance.task_state == step:
        return {}
    return state_values(VmState.BUILDING, step)


async def _prepare_block_devices(ctx: TaskContext) -> bool:
    """Claim a host unless the instance has one, then create the root disk.

    The host claim, ``host_id`` and the step change commit together, so a resumed
    task never claims twice. The volumes the API reserved for the instance are
    marked ATTACHED once the driver has prepared the disks.
    """
    step = TaskState.BLOCK_DEVICE_MAPPING
    async with ctx.locked_instance(step) as (conn, instance):
        if not await _still_building(ctx, conn, instance):
            return False
        values = _step_values(instance, step)
        if instance.host_id is None:
            host = await _claim_host(ctx, conn, instance)
            if host is None:
                return False
            values["host_id"] = host.id
            spec = spec_on_host(instance, host.name)
        else:
            spec = await _require_spec(conn, instance)
        if values:
            await ctx.update_instance(conn, values)
        has_volumes = bool(instance.volumes_attached)
    log.info("instance build step task_state=%s host=%s %s", step, spec.host, ctx.log_ids)

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


async def _claim_host(ctx: TaskContext, conn: AsyncConnection, instance: Row[Any]) -> Host | None:
    """Claim a host for the instance, or put it in ERROR, fail the task and return None when none fits."""
    request = ResourceRequest.from_flavor(instance.flavor)
    host = await select_host(conn, request)
    if host is not None:
        log.info("instance scheduled host=%s %s", host.name, ctx.log_ids)
        return host

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
    # WARNING, not ERROR: any customer can cause this by asking for more than is free.
    log.warning("instance build failed: no valid host details=%r %s", no_valid_host, ctx.log_ids)
    return None


async def _allocate_network(ctx: TaskContext) -> bool:
    """Give the instance one port per entry of ``network_ids`` and plug them."""
    step = TaskState.NETWORKING
    async with ctx.locked_instance(step) as (conn, instance):
        if not await _still_building(ctx, conn, instance):
            return False
        spec = await _require_spec(conn, instance)
        try:
            ports = await _ensure_ports(conn, instance)
        except NetworkFull as exc:
            raise BuildFailed("No free IP address on the network", exc.message) from exc
        await ctx.update_instance(conn, {**_step_values(instance, step), "addresses": addresses_document(ports)})

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
    # Ports are inserted in the same transaction that stores ``addresses``, and
    # release_resources deletes them together with it, so an instance without
    # addresses has no ports to look up.
    if instance.addresses:
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
    step = TaskState.SPAWNING
    async with ctx.locked_instance(step) as (conn, instance):
        if not await _still_building(ctx, conn, instance):
            return False
        spec = await _require_spec(conn, instance)
        values = _step_values(instance, step)
        if values:
            await ctx.update_instance(conn, values)
    log.info("instance build step task_state=%s %s", step, ctx.log_ids)
    try:
        await ctx.driver.spawn(spec)
    except DriverError as exc:
        raise BuildFailed("Failed to spawn the instance", str(exc)) from exc
    return True


async def _require_spec(conn: AsyncConnection, instance: Row[Any]) -> InstanceSpec:
    spec = await instance_spec(conn, instance)
    if spec is None:
        # host_id commits with the start of BLOCK_DEVICE_MAPPING, before any driver call.
        raise RuntimeError(f"instance {instance.id} reached a driver step without a host")
    return spec


async def _finish(ctx: TaskContext) -> None:
    async with ctx.locked_instance() as (conn, instance):
        if not await _still_building(ctx, conn, instance):
            return
        await ctx.finish(
            conn,
            TaskRunState.SUCCEEDED,
            action_status=ACTION_SUCCEEDED,
            instance_values={**state_values(VmState.ACTIVE, None, PowerState.RUNNING), "launched_at": utcnow()},
        )
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
            await _still_building(ctx, conn, instance)
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
