"""The delete task: destroy the VM, release its host claim and ports, mark it DELETED.

The API has already set task_state DELETING when it queued the task. Deleting an
instance that is already DELETED succeeds without changes, so a resumed task may
repeat any part of this.
"""

from __future__ import annotations

import logging

from mycloud_compute.drivers.base import DriverError
from mycloud_compute.persistence import volumes as volume_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tasks import TaskRunState
from mycloud_compute.services.lifecycle import PowerState, Status, TaskState, VmState
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


async def run_delete(ctx: TaskContext) -> None:
    async with ctx.locked_instance(TaskState.DELETING) as (conn, instance):
        if instance.vm_state == VmState.DELETED:
            await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
            log.info("instance already deleted %s", ctx.log_ids)
            return
        if instance.task_state != TaskState.DELETING:
            await ctx.update_instance(conn, state_values(VmState(instance.vm_state), TaskState.DELETING))
        spec = await instance_spec(conn, instance)

    if spec is not None:
        try:
            await ctx.driver.destroy(spec)
        except DriverError as exc:
            await _fail_delete(ctx, "Failed to delete the instance", str(exc))
            return

    async with ctx.locked_instance() as (conn, instance):
        released = await release_resources(conn, instance)
        # delete_on_termination volumes are deleted, the others become AVAILABLE.
        volumes_deleted, volumes_detached = await volume_store.release_instance_volumes(
            conn, instance.organization_id, instance.id, utcnow()
        )
        await ctx.update_instance(
            conn,
            {
                **state_values(VmState.DELETED, None, PowerState.NOSTATE),
                **released,
                "volumes_attached": [],
                "terminated_at": utcnow(),
            },
        )
        await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
    log.info(
        "instance deleted status=%s host=%s volumes_deleted=%d volumes_detached=%d %s",
        Status.DELETED, spec.host if spec else None, volumes_deleted, volumes_detached, ctx.log_ids,
    )


async def _fail_delete(ctx: TaskContext, message: str, details: str) -> None:
    """Put the instance in ERROR with a fault, keeping its host claim and ports.

    The VM may still exist, so its resources stay accounted for; deleting the
    instance again releases them.
    """
    async with ctx.locked_instance() as (conn, instance):
        await ctx.update_instance(
            conn,
            {**state_values(VmState.ERROR, None), "fault": make_fault(message, details)},
        )
        await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=f"{message}: {details}")
    log.error("instance delete failed message=%r details=%r %s", message, details, ctx.log_ids)


async def give_up_delete(ctx: TaskContext, reason: str) -> None:
    """End a delete task that failed too often: the instance goes to ERROR."""
    await _fail_delete(ctx, "The deletion of the instance failed", reason)
