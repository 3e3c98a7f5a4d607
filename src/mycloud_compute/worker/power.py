"""The power tasks: stop, start and reboot.

The API has already set the task_state of the operation (POWERING_OFF,
POWERING_ON, REBOOTING or REBOOTING_HARD) when it queued the task. The task runs
one driver operation and then stores the end state in the same transaction that
finishes the task. Power operations are idempotent, so a task resumed after a
crash repeats the operation. A delete request that arrives meanwhile
(task_state DELETING) cancels the task and leaves the instance to the delete task.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.drivers.base import ComputeDriver, DriverError, InstanceSpec
from mycloud_compute.persistence.tasks import TaskRunState
from mycloud_compute.services.lifecycle import PowerState, TaskState, VmState
from mycloud_compute.worker.context import (
    ACTION_FAILED,
    ACTION_SUCCEEDED,
    TaskContext,
    instance_spec,
    make_fault,
    state_values,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerOperation:
    """The driver call behind one task_state, and the states the instance ends in."""

    call: Callable[[ComputeDriver, InstanceSpec], Awaitable[None]]
    vm_state: VmState
    power_state: PowerState


POWER_OPERATIONS: dict[TaskState, PowerOperation] = {
    TaskState.POWERING_OFF: PowerOperation(
        lambda driver, spec: driver.power_off(spec), VmState.STOPPED, PowerState.SHUTDOWN
    ),
    TaskState.POWERING_ON: PowerOperation(
        lambda driver, spec: driver.power_on(spec), VmState.ACTIVE, PowerState.RUNNING
    ),
    TaskState.REBOOTING: PowerOperation(
        lambda driver, spec: driver.reboot(spec, hard=False), VmState.ACTIVE, PowerState.RUNNING
    ),
    TaskState.REBOOTING_HARD: PowerOperation(
        lambda driver, spec: driver.reboot(spec, hard=True), VmState.ACTIVE, PowerState.RUNNING
    ),
}

# The task_states the API sets for each power task action.
TASK_STATES_OF_ACTION: dict[str, tuple[TaskState, ...]] = {
    "stop": (TaskState.POWERING_OFF,),
    "start": (TaskState.POWERING_ON,),
    "reboot": (TaskState.REBOOTING, TaskState.REBOOTING_HARD),
}


async def cancel_task(ctx: TaskContext, conn: AsyncConnection, reason: str) -> None:
    """End the task as CANCELLED (its action FAILED) without touching the instance."""
    await ctx.finish(conn, TaskRunState.CANCELLED, action_status=ACTION_FAILED, message=f"Cancelled: {reason}")
    log.info("task cancelled reason=%r %s", reason, ctx.log_ids)


async def _current_operation(
    ctx: TaskContext, conn: AsyncConnection, instance: Row[Any]
) -> PowerOperation | None:
    """Return the operation the instance's task_state names, or cancel the task and return None."""
    if instance.task_state == TaskState.DELETING:
        await cancel_task(ctx, conn, "the instance is being deleted")
        return None
    expected = TASK_STATES_OF_ACTION.get(ctx.task.action, ())
    if instance.task_state not in expected:
        await cancel_task(
            ctx,
            conn,
            f"the instance's task_state is {instance.task_state or 'null'}, "
            f"not {' or '.join(expected)}",
        )
        log.warning("power task found an unexpected task_state=%s %s", instance.task_state, ctx.log_ids)
        return None
    return POWER_OPERATIONS[TaskState(instance.task_state)]


async def run_power(ctx: TaskContext) -> None:
    """Run a stop, start or reboot task."""
    async with ctx.locked_instance() as (conn, instance):
        operation = await _current_operation(ctx, conn, instance)
        if operation is None:
            return
        spec = await instance_spec(conn, instance)

    if spec is None:
        # The API accepts power actions only for instances that have a host.
        await fail_power(ctx, f"Failed to {ctx.task.action} the instance", "the instance has no compute host")
        return
    try:
        await operation.call(ctx.driver, spec)
    except DriverError as exc:
        await fail_power(ctx, f"Failed to {ctx.task.action} the instance", str(exc))
        return

    async with ctx.locked_instance() as (conn, instance):
        operation = await _current_operation(ctx, conn, instance)
        if operation is None:
            return
        # Success leaves ERROR too (stop and HARD reboot recover it), so the fault goes.
        await ctx.update_instance(
            conn, {**state_values(operation.vm_state, None, operation.power_state), "fault": None}
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info(
        "instance power action finished vm_state=%s power_state=%s host=%s %s",
        operation.vm_state, operation.power_state, spec.host, ctx.log_ids,
    )


async def fail_power(ctx: TaskContext, message: str, details: str) -> None:
    """Put the instance in ERROR with a fault, keeping its host claim because the VM still exists.

    When a delete request has arrived meanwhile, the task is cancelled instead
    and the delete task takes over.
    """
    async with ctx.locked_instance() as (conn, instance):
        if instance.task_state == TaskState.DELETING:
            await cancel_task(ctx, conn, "the instance is being deleted")
            return
        await ctx.update_instance(
            conn, {**state_values(VmState.ERROR, None), "fault": make_fault(message, details)}
        )
        await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{message}: {details}")
    log.error("instance power action failed message=%r details=%r %s", message, details, ctx.log_ids)


async def give_up_power(ctx: TaskContext, reason: str) -> None:
    """End a power task that failed too often: the instance goes to ERROR."""
    await fail_power(ctx, f"The {ctx.task.action} of the instance failed", reason)
