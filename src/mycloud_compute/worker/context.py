"""State and helpers shared by every task handler: the claimed task, step transactions, faults.

A handler runs its task as a series of steps. Each step opens a transaction that
first renews the task's lease (raising LeaseLost, which rolls the transaction back,
when another worker has taken the task over), then locks the instance row. Driver
calls happen between these transactions, so no database lock is held while a
hypervisor operation runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.drivers.base import ComputeDriver, InstanceSpec
from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence import networks as network_store
from mycloud_compute.persistence import tasks as task_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tasks import ClaimedTask, TaskRunState
from mycloud_compute.scheduler.scheduler import ResourceRequest
from mycloud_compute.services.lifecycle import PowerState, TaskState, VmState, derive_status

# Attempts a task gets (each claim counts one) before its instance goes to ERROR.
MAX_ATTEMPTS = 3

ACTION_SUCCEEDED = "SUCCEEDED"
ACTION_FAILED = "FAILED"


class InstanceNotFound(Exception):
    """The task's instance row does not exist."""


@dataclass
class TaskContext:
    """One claimed task with what its handler needs to run it."""

    task: ClaimedTask
    db: Database
    driver: ComputeDriver
    lease_seconds: float
    # The final state written for the task, for metrics; None until then.
    outcome: TaskRunState | None = field(default=None)
    # Set once this worker has written a change that drops the lease (finish,
    # retry, give back), so the heartbeat stops treating a missing lease as lost.
    lease_released: bool = field(default=False)

    @property
    def log_ids(self) -> str:
        """The ids that every log line about this task carries, as key=value pairs."""
        task = self.task
        return (
            f"task={task.id} action={task.action} instance={task.instance_id} "
            f"organization={task.organization_id} request_id={task.request_id}"
        )

    @asynccontextmanager
    async def locked_instance(
        self, step: TaskState | None = None
    ) -> AsyncIterator[tuple[AsyncConnection, Row[Any]]]:
        """Open a transaction that renews the lease, records ``step``, and locks the instance.

        Raises LeaseLost when the task is no longer leased to this worker, and
        InstanceNotFound when the instance row is gone; both roll the transaction back.
        """
        async with self.db.transaction() as conn:
            instance = await task_store.renew_lease_and_lock_instance(
                conn, self.task, self.lease_seconds, step=step.value if step else None
            )
            if instance is None:
                raise InstanceNotFound(f"instance {self.task.instance_id} does not exist")
            yield conn, instance

    async def finish(
        self,
        conn: AsyncConnection,
        state: TaskRunState,
        *,
        action_status: str,
        message: str | None = None,
        instance_values: dict[str, Any] | None = None,
    ) -> None:
        """Finish the task and its instance action in the caller's transaction.

        ``message`` is shown to users in the action record and stored as the task's
        ``last_error`` unless the task succeeded. ``instance_values`` are stored in
        the instance row in the same statement where the database allows it, as
        :meth:`update_instance` would store them.
        """
        self.lease_released = True
        await task_store.finish_with_action(
            conn,
            self.task,
            state,
            action_status=action_status,
            message=message,
            error=None if state == TaskRunState.SUCCEEDED else message,
            instance_values={**instance_values, "updated_at": utcnow()} if instance_values else None,
        )
        self.outcome = state

    async def update_instance(self, conn: AsyncConnection, values: dict[str, Any]) -> None:
        await instance_store.update_instance(
            conn, self.task.organization_id, self.task.instance_id, {**values, "updated_at": utcnow()}
        )


def state_values(
    vm_state: VmState, task_state: TaskState | None, power_state: PowerState | None = None
) -> dict[str, Any]:
    """Return the instance columns for a state change, with ``status`` derived from them."""
    values: dict[str, Any] = {
        "vm_state": vm_state.value,
        "task_state": task_state.value if task_state else None,
        "status": derive_status(vm_state, task_state).value,
    }
    if power_state is not None:
        values["power_state"] = power_state.value
    return values


def format_timestamp(moment: datetime) -> str:
    """Format a naive UTC datetime as RFC 3339 with second precision and a Z suffix."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_fault(message: str, details: str) -> dict[str, Any]:
    """Return the ``fault`` value of an instance that went to ERROR."""
    return {"code": 500, "message": message, "details": details, "created": format_timestamp(utcnow())}


async def instance_spec(conn: AsyncConnection, instance: Row[Any]) -> InstanceSpec | None:
    """Describe the instance for the driver; None when it is not placed on a host."""
    if instance.host_id is None:
        return None
    host_name = await host_store.get_host_name(conn, instance.host_id)
    if host_name is None:
        raise RuntimeError(f"instance {instance.id} is placed on host {instance.host_id}, which does not exist")
    return spec_on_host(instance, host_name)


def spec_on_host(instance: Row[Any], host_name: str) -> InstanceSpec:
    """Describe the instance for the driver as placed on the host named ``host_name``."""
    request = ResourceRequest.from_flavor(instance.flavor)
    return InstanceSpec(
        id=instance.id,
        organization_id=instance.organization_id,
        name=instance.name,
        host=host_name,
        vcpus=request.vcpus,
        ram=request.ram,
        disk=request.disk,
        image_id=instance.image_id,
        power_state=PowerState(instance.power_state),
    )


async def release_resources(conn: AsyncConnection, instance: Row[Any]) -> dict[str, Any]:
    """Release the instance's host claim and delete its ports.

    The claim is released with the instance's stored flavor values, which are the
    values it was claimed with, so host usage returns exactly to what it was.
    Returns the instance columns to store with the change (no host, no addresses).
    """
    if instance.host_id is not None:
        request = ResourceRequest.from_flavor(instance.flavor)
        await host_store.release(
            conn, instance.host_id, vcpus=request.vcpus, ram=request.ram, disk=request.disk
        )
    await network_store.delete_instance_ports(conn, instance.organization_id, instance.id)
    return {"host_id": None, "addresses": {}}

