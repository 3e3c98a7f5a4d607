"""The resize tasks: resize, confirm-resize and revert-resize, and the resize cleanup of a delete.

A resize runs RESIZE_PREP → RESIZE_MIGRATING → RESIZE_FINISH and ends in vm_state
RESIZED (status VERIFY_RESIZE) on the new flavor. The API has stored the target
flavor in ``new_flavor`` and set RESIZE_PREP. vm_state stays ACTIVE or STOPPED
until the end, and it decides whether the VM must run again on the new host.

Host claims of an instance, each recorded in the columns named here:

- ``(flavor, host_id)``: always, as for every instance;
- ``(new_flavor, new_host_id)``: from the claim in RESIZE_PREP until VERIFY_RESIZE;
- ``(old_flavor, old_host_id)``: from VERIFY_RESIZE until confirm-resize releases
  it, or revert-resize makes it the current claim again and releases the new one.

A claim or release commits in the same transaction as the columns that record
it, so after every commit each host's usage is the sum of the claims recorded on it.

NOTE: the driver interface has no migration operations yet (Nova's
migrate_disk_and_power_off, finish_migration, confirm_migration and
finish_revert_migration). A resize is modelled as power_off on the old host and
power_on on the new one, which only works as a move for the simulated driver,
whose VMs are keyed by instance id. A driver for real hypervisors needs those
operations first.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.drivers.base import DriverError, InstanceSpec
from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence.tasks import TaskRunState
from mycloud_compute.scheduler.scheduler import ResourceRequest, explain_no_valid_host, select_host
from mycloud_compute.services.lifecycle import RESIZE_STEPS, PowerState, TaskState, VmState
from mycloud_compute.worker.context import (
    ACTION_FAILED,
    ACTION_SUCCEEDED,
    TaskContext,
    make_fault,
    state_values,
)
from mycloud_compute.worker.create import NO_VALID_HOST
from mycloud_compute.worker.delete import run_delete
from mycloud_compute.worker.power import cancel_task

log = logging.getLogger(__name__)


class ResizeFailed(Exception):
    """A driver step of the resize failed; the instance goes to ERROR with this fault."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(f"{message}: {details}")
        self.message = message
        self.details = details


# --- claims and driver specs --------------------------------------------------------


async def _release(conn: AsyncConnection, host_id: uuid.UUID | None, flavor: dict[str, Any] | None) -> None:
    """Release the claim of ``flavor`` on ``host_id``; nothing when no claim is recorded."""
    if host_id is None or flavor is None:
        return
    request = ResourceRequest.from_flavor(flavor)
    await host_store.release(conn, host_id, vcpus=request.vcpus, ram=request.ram, disk=request.disk)


async def release_resize_claims(conn: AsyncConnection, instance: Row[Any]) -> dict[str, Any]:
    """Release the new and old claims of a resize, keeping the current one.

    Returns the instance columns to store with the change.
    """
    await _release(conn, instance.new_host_id, instance.new_flavor)
    await _release(conn, instance.old_host_id, instance.old_flavor)
    return {"new_flavor": None, "new_host_id": None, "old_flavor": None, "old_host_id": None}


async def _spec_on(
    conn: AsyncConnection, instance: Row[Any], host_id: uuid.UUID | None, flavor: dict[str, Any] | None
) -> InstanceSpec:
    """Describe the instance for the driver as it is (or will be) on ``host_id`` with ``flavor``."""
    if host_id is None or flavor is None:
        raise RuntimeError(f"instance {instance.id} has no recorded host and flavor for this resize step")
    host = await host_store.get_host(conn, host_id)
    if host is None:
        raise RuntimeError(f"instance {instance.id} refers to host {host_id}, which does not exist")
    request = ResourceRequest.from_flavor(flavor)
    return InstanceSpec(
        id=instance.id,
        organization_id=instance.organization_id,
        name=instance.name,
        host=host.name,
        vcpus=request.vcpus,
        ram=request.ram,
        disk=request.disk,
        image_id=instance.image_id,
        power_state=PowerState(instance.power_state),
    )


def _settled_vm_state(instance: Row[Any]) -> VmState:
    """The vm_state a RESIZED instance returns to: STOPPED when its VM is powered off."""
    return VmState.ACTIVE if instance.power_state == PowerState.RUNNING else VmState.STOPPED


# --- resize -------------------------------------------------------------------------


async def run_resize(ctx: TaskContext) -> None:
    """Run the resize task from the step it last started (the first one when new)."""
    steps: dict[TaskState, Callable[[TaskContext], Awaitable[bool]]] = {
        TaskState.RESIZE_PREP: _prepare,
        TaskState.RESIZE_MIGRATING: _migrate,
        TaskState.RESIZE_FINISH: _finish_migration,
    }
    first = RESIZE_STEPS.index(TaskState(ctx.task.step)) if ctx.task.step in steps else 0
    if first > 0:
        log.info("resize task resumed step=%s attempt=%d %s", ctx.task.step, ctx.task.attempts, ctx.log_ids)

    try:
        for step in RESIZE_STEPS[first:]:
            if not await steps[step](ctx):
                return
    except ResizeFailed as failure:
        await fail_resize(ctx, failure.message, failure.details)
        return
    await _verify(ctx)


async def _enter_step(
    ctx: TaskContext, conn: AsyncConnection, instance: Row[Any], step: TaskState | None
) -> bool:
    """Move the instance to ``step`` (None: no change), or cancel the task and return False."""
    if instance.task_state == TaskState.DELETING:
        await cancel_task(ctx, conn, "the instance is being deleted")
        return False
    if instance.vm_state not in (VmState.ACTIVE, VmState.STOPPED) or instance.task_state not in RESIZE_STEPS:
        await cancel_task(
            ctx,
            conn,
            f"the instance is {instance.vm_state} with task_state {instance.task_state or 'null'}, "
            "which is not a resize in progress",
        )
        log.warning(
            "resize task found vm_state=%s task_state=%s %s", instance.vm_state, instance.task_state, ctx.log_ids
        )
        return False
    if step is not None and instance.task_state != step:
        values = state_values(VmState(instance.vm_state), step)
        if step == TaskState.RESIZE_FINISH:
            # RESIZE_MIGRATING has powered the VM off on the old host.
            values["power_state"] = PowerState.SHUTDOWN.value
        await ctx.update_instance(conn, values)
        log.info("instance resize step task_state=%s %s", step, ctx.log_ids)
    return True


async def _prepare(ctx: TaskContext) -> bool:
    """Claim the new flavor on a host; a claim made by an earlier attempt is kept."""
    no_valid_host = None
    async with ctx.locked_instance(TaskState.RESIZE_PREP) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, TaskState.RESIZE_PREP):
            return False
        if instance.new_host_id is not None:
            return True
        if instance.new_flavor is None:
            raise RuntimeError(f"instance {instance.id} has no new_flavor to resize to")

        # The old claim stays until confirm or revert, so the new host may be the same one.
        request = ResourceRequest.from_flavor(instance.new_flavor)
        host = await select_host(conn, request)
        if host is None:
            no_valid_host = await explain_no_valid_host(conn, request)
            await ctx.update_instance(
                conn,
                {
                    **state_values(VmState(instance.vm_state), None),
                    "new_flavor": None,
                    "fault": make_fault(NO_VALID_HOST, no_valid_host),
                },
            )
            await ctx.finish(
                conn,
                TaskRunState.FAILED,
                action_status=ACTION_FAILED,
                message=f"{NO_VALID_HOST}: {no_valid_host}",
            )
        else:
            await ctx.update_instance(conn, {"new_host_id": host.id})

    if no_valid_host is not None:
        # WARNING, not ERROR: any customer can cause this by asking for more than is free.
        log.warning("instance resize failed: no valid host details=%r %s", no_valid_host, ctx.log_ids)
        return False
    log.info("instance resize scheduled host=%s %s", host.name if host else None, ctx.log_ids)
    return True


async def _migrate(ctx: TaskContext) -> bool:
    """Power the VM off on its current host (the driver's stand-in for migrating its disk)."""
    async with ctx.locked_instance(TaskState.RESIZE_MIGRATING) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, TaskState.RESIZE_MIGRATING):
            return False
        source = await _spec_on(conn, instance, instance.host_id, instance.flavor)
    try:
        await ctx.driver.power_off(source)
    except DriverError as exc:
        raise ResizeFailed("Failed to migrate the instance for the resize", str(exc)) from exc
    return True


async def _finish_migration(ctx: TaskContext) -> bool:
    """Power the VM on at the new host with the new flavor, when it was running before."""
    async with ctx.locked_instance(TaskState.RESIZE_FINISH) as (conn, instance):
        if not await _enter_step(ctx, conn, instance, TaskState.RESIZE_FINISH):
            return False
        target = await _spec_on(conn, instance, instance.new_host_id, instance.new_flavor)
        was_running = instance.vm_state == VmState.ACTIVE
    if was_running:
        try:
            await ctx.driver.power_on(target)
        except DriverError as exc:
            raise ResizeFailed("Failed to finish the resize", str(exc)) from exc
    return True


async def _verify(ctx: TaskContext) -> None:
    """Switch the instance to the new flavor and host, keeping the old claim for a revert."""
    async with ctx.locked_instance() as (conn, instance):
        if not await _enter_step(ctx, conn, instance, None):
            return
        new_flavor = instance.new_flavor
        was_running = instance.vm_state == VmState.ACTIVE
        power_state = PowerState.RUNNING if was_running else PowerState.SHUTDOWN
        await ctx.update_instance(
            conn,
            {
                **state_values(VmState.RESIZED, None, power_state),
                "flavor": new_flavor,
                "flavor_id": uuid.UUID(new_flavor["id"]),
                "host_id": instance.new_host_id,
                "old_flavor": instance.flavor,
                "old_host_id": instance.host_id,
                "new_flavor": None,
                "new_host_id": None,
                "fault": None,
            },
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info(
        "instance resized, waiting for confirm or revert flavor=%s %s", new_flavor["name"], ctx.log_ids
    )


async def fail_resize(ctx: TaskContext, message: str, details: str) -> None:
    """Put the instance in ERROR on its old flavor and host, releasing the new claim.

    When a delete request has arrived meanwhile, the task is cancelled instead
    and the delete task releases the claims.
    """
    async with ctx.locked_instance() as (conn, instance):
        if instance.task_state == TaskState.DELETING:
            await cancel_task(ctx, conn, "the instance is being deleted")
            return
        await _release(conn, instance.new_host_id, instance.new_flavor)
        await ctx.update_instance(
            conn,
            {
                **state_values(VmState.ERROR, None),
                "new_flavor": None,
                "new_host_id": None,
                "fault": make_fault(message, details),
            },
        )
        await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{message}: {details}")
    log.error("instance resize failed message=%r details=%r %s", message, details, ctx.log_ids)


async def give_up_resize(ctx: TaskContext, reason: str) -> None:
    """End a resize task that failed too often: the instance goes to ERROR on its old flavor."""
    await fail_resize(ctx, "The resize of the instance failed", reason)


# --- confirm and revert -------------------------------------------------------------


async def _check_resized(ctx: TaskContext, conn: AsyncConnection, instance: Row[Any]) -> bool:
    """Return True when the instance waits for confirm or revert; otherwise cancel the task."""
    if instance.task_state == TaskState.DELETING:
        await cancel_task(ctx, conn, "the instance is being deleted")
        return False
    if instance.vm_state != VmState.RESIZED or instance.task_state is not None:
        await cancel_task(
            ctx,
            conn,
            f"the instance is {instance.vm_state} with task_state {instance.task_state or 'null'}, "
            "not RESIZED",
        )
        return False
    return True


async def run_confirm_resize(ctx: TaskContext) -> None:
    """Keep the new flavor: release the old claim and settle in ACTIVE or STOPPED."""
    async with ctx.locked_instance() as (conn, instance):
        if not await _check_resized(ctx, conn, instance):
            return
        # NOTE: no driver call, because the driver has no confirm_migration yet
        # (see the module docstring); the simulated VM already runs on the new host.
        await _release(conn, instance.old_host_id, instance.old_flavor)
        vm_state = _settled_vm_state(instance)
        await ctx.update_instance(
            conn,
            {**state_values(vm_state, None), "old_flavor": None, "old_host_id": None, "fault": None},
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info("instance resize confirmed vm_state=%s %s", vm_state, ctx.log_ids)


async def run_revert_resize(ctx: TaskContext) -> None:
    """Return to the old flavor and host: move the VM back, then release the new claim."""
    async with ctx.locked_instance() as (conn, instance):
        if not await _check_resized(ctx, conn, instance):
            return
        current = await _spec_on(conn, instance, instance.host_id, instance.flavor)
        previous = await _spec_on(conn, instance, instance.old_host_id, instance.old_flavor)
        was_running = instance.power_state == PowerState.RUNNING

    try:
        await ctx.driver.power_off(current)
        if was_running:
            await ctx.driver.power_on(previous)
    except DriverError as exc:
        await fail_resize_end(ctx, "Failed to revert the resize", str(exc))
        return

    async with ctx.locked_instance() as (conn, instance):
        if not await _check_resized(ctx, conn, instance):
            return
        await _release(conn, instance.host_id, instance.flavor)
        vm_state = _settled_vm_state(instance)
        old_flavor = instance.old_flavor
        await ctx.update_instance(
            conn,
            {
                **state_values(vm_state, None),
                "flavor": old_flavor,
                "flavor_id": uuid.UUID(old_flavor["id"]),
                "host_id": instance.old_host_id,
                "old_flavor": None,
                "old_host_id": None,
                "fault": None,
            },
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info("instance resize reverted vm_state=%s flavor=%s %s", vm_state, old_flavor["name"], ctx.log_ids)


async def fail_resize_end(ctx: TaskContext, message: str, details: str) -> None:
    """Put a RESIZED instance in ERROR on its new flavor and host, releasing the old claim.

    The instance record already names the new host, so a HARD reboot recovers
    the instance there. The old claim is released as a confirm releases it.
    """
    async with ctx.locked_instance() as (conn, instance):
        if instance.task_state == TaskState.DELETING:
            await cancel_task(ctx, conn, "the instance is being deleted")
            return
        await _release(conn, instance.old_host_id, instance.old_flavor)
        await ctx.update_instance(
            conn,
            {
                **state_values(VmState.ERROR, None),
                "old_flavor": None,
                "old_host_id": None,
                "fault": make_fault(message, details),
            },
        )
        await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{message}: {details}")
    log.error("instance resize end failed message=%r details=%r %s", message, details, ctx.log_ids)


async def give_up_resize_end(ctx: TaskContext, reason: str) -> None:
    """End a confirm-resize or revert-resize task that failed too often: the instance goes to ERROR."""
    await fail_resize_end(ctx, f"The {ctx.task.action} of the instance failed", reason)


# --- delete -------------------------------------------------------------------------


async def run_delete_after_resize_cleanup(ctx: TaskContext) -> None:
    """Run the delete task, releasing the claims of an unfinished resize in its first transaction.

    Deleting a VERIFY_RESIZE instance confirms the resize first, as in Nova. The
    new claim of a resize that a delete request cancelled is released here too.
    The delete task releases the current claim itself.
    """
    await run_delete(ctx, _release_unfinished_resize)


async def _release_unfinished_resize(ctx: TaskContext, conn: AsyncConnection, instance: Row[Any]) -> dict[str, Any]:
    resize_columns = (instance.new_flavor, instance.new_host_id, instance.old_flavor, instance.old_host_id)
    if all(value is None for value in resize_columns):
        return {}
    log.info("resize claims released before the delete %s", ctx.log_ids)
    return await release_resize_claims(conn, instance)
