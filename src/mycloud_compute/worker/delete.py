"""The delete task: destroy the VM, release its host claim and ports, mark it DELETED.

The API has already set task_state DELETING when it queued the task. Deleting an
instance that is already DELETED succeeds without changes, so a resumed task may
repeat any part of this.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

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


# Releases claims that only some instances hold (those of an unfinished resize)
# in the delete's first transaction, and returns the instance columns to store.
ReleaseExtraClaims = Callable[[TaskContext, AsyncConnection, Row[Any]], Awaitable[dict[str, Any]]]


async def run_delete(ctx: TaskContext, release_extra_claims: ReleaseExtraClaims | None = None) -> None:
    async with ctx.locked_instance(TaskState.DELETING) as (conn, instance):
        if instance.vm_state == VmState.DELETED:
            await ctx.finish(conn, TaskRunState.SUCCEEDED, action_status=ACTION_SUCCEEDED)
            log.info("instance already deleted %s", ctx.log_ids)
            return
        values = await release_extra_claims(ctx, conn, instance) if release_extra_claims else {}
        if instance.task_state != TaskState.DELETING:
            values.update(state_values(VmState(instance.vm_state), TaskState.DELETING))
        if values:
            await ctx.update_instance(conn, values)
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
        # Volumes are attached only when an instance is created, and they are
        # released in the same transaction that empties ``volumes_attached``.
        volumes_deleted = volumes_detached = 0
        if instance.volumes_attached:
            volumes_deleted, volumes_detached = await volume_store.release_instance_volumes(
                conn, instance.organization_id, instance.id, utcnow()
            )
        await ctx.finish(
            conn,
            TaskRunState.SUCCEEDED,
            action_status=ACTION_SUCCEEDED,
            instance_values={
                **state_values(VmState.DELETED, None, PowerState.NOSTATE),
                **released,
                "volumes_attached": [],
                "terminated_at": utcnow(),
            },
        )
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
