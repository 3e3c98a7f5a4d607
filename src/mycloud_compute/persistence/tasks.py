"""The durable task queue that the lifecycle worker consumes.

A task is one asynchronous action on one instance (create, delete, ...). A worker
claims a task by taking a lease: ``lease_owner`` names the claim and
``lease_expires_at`` is the time the lease ends. A RUNNING task whose lease has
expired belongs to a worker that died or stalled, so another worker may claim it
and resume it. Every later write to the task is conditional on the lease still
naming the writer's claim. When it does not, :class:`LeaseLost` is raised, and the
caller's transaction must roll back.

Tasks of one instance run in creation order: a task is not claimable while an
older PENDING or RUNNING task of the same instance exists.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select, update
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tables import instance_actions, tasks


class TaskRunState(StrEnum):
    """The ``state`` column of a task (not the instance's ``task_state``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


UNFINISHED = (TaskRunState.PENDING, TaskRunState.RUNNING)
FINAL = (TaskRunState.SUCCEEDED, TaskRunState.FAILED, TaskRunState.CANCELLED)


class LeaseLost(Exception):
    """The task's lease no longer names this claim: another worker owns the task now."""

    def __init__(self, task_id: uuid.UUID, lease_owner: str) -> None:
        super().__init__(f"task {task_id} is no longer leased to {lease_owner}")
        self.task_id = task_id
        self.lease_owner = lease_owner


@dataclass(frozen=True)
class ClaimedTask:
    """A task as its claim returned it; ``attempts`` already counts this claim."""

    id: uuid.UUID
    organization_id: uuid.UUID
    instance_id: uuid.UUID
    action: str
    step: str | None
    attempts: int
    request_id: str | None
    action_id: uuid.UUID | None
    lease_owner: str
    lease_expires_at: datetime


def _no_older_unfinished() -> ColumnElement[bool]:
    """No older PENDING or RUNNING task of the same instance exists (looked up by ix_tasks_org_instance)."""
    older = tasks.alias("older")
    return ~exists().where(
        older.c.organization_id == tasks.c.organization_id,
        older.c.instance_id == tasks.c.instance_id,
        older.c.state.in_(UNFINISHED),
        or_(
            older.c.created_at < tasks.c.created_at,
            and_(older.c.created_at == tasks.c.created_at, older.c.id < tasks.c.id),
        ),
    )


def _claimable_ids(state_clause: ColumnElement[bool], limit: int) -> Any:
    # One state per query, so the (state, created_at) index yields the candidates in
    # queue order and the scan stops after ``limit`` of them, however many finished
    # tasks the table holds.
    return (
        select(tasks.c.id)
        .where(state_clause, _no_older_unfinished())
        .order_by(tasks.c.created_at, tasks.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


async def _lease(
    conn: AsyncConnection,
    state_clause: ColumnElement[bool],
    limit: int,
    lease_owner: str,
    now: datetime,
    expires_at: datetime,
) -> list[ClaimedTask]:
    statement = (
        update(tasks)
        .where(tasks.c.id.in_(_claimable_ids(state_clause, limit)))
        .values(
            state=TaskRunState.RUNNING,
            lease_owner=lease_owner,
            lease_expires_at=expires_at,
            attempts=tasks.c.attempts + 1,
            updated_at=now,
        )
        .returning(*tasks.c)
    )
    return [
        ClaimedTask(
            id=row.id,
            organization_id=row.organization_id,
            instance_id=row.instance_id,
            action=row.action,
            step=row.step,
            attempts=row.attempts,
            request_id=row.request_id,
            action_id=row.action_id,
            lease_owner=lease_owner,
            lease_expires_at=expires_at,
        )
        for row in sorted((await conn.execute(statement)).all(), key=lambda row: (row.created_at, row.id))
    ]


async def claim_batch(
    conn: AsyncConnection,
    lease_owner: str,
    lease_seconds: float,
    limit: int,
    *,
    include_expired: bool = True,
) -> list[ClaimedTask]:
    """Lease up to ``limit`` claimable tasks to ``lease_owner``, oldest first, and return them.

    A task is claimable when it is PENDING, or RUNNING with an expired lease, and
    no older unfinished task of its instance exists. Expired leases are taken
    first: their tasks are older than any PENDING one. ``include_expired=False``
    skips them, saving a statement, for a caller that looks for them less often
    than it claims. Each kind is one UPDATE, atomic on its own, so the caller may
    run the claim in autocommit mode. Its candidates are read with FOR UPDATE SKIP LOCKED on PostgreSQL, so
    concurrent claimers skip each other's candidates instead of waiting or taking
    the same task. On SQLite the clause renders as nothing, and the caller's
    BEGIN IMMEDIATE transaction serializes claimers instead.

    The tasks of one batch share ``lease_owner``. It must be new for each batch, so
    that a lease names one claim and a later claim of the same task differs.

    NOTE: lease expiry compares with this process's clock, so workers on
    different machines need synchronized clocks (NTP) to agree on it.
    """
    now = utcnow()
    expires_at = now + timedelta(seconds=lease_seconds)
    claimed: list[ClaimedTask] = []
    if include_expired:
        expired = and_(tasks.c.state == TaskRunState.RUNNING, tasks.c.lease_expires_at < now)
        claimed = await _lease(conn, expired, limit, lease_owner, now, expires_at)
    if len(claimed) < limit:
        pending = tasks.c.state == TaskRunState.PENDING
        claimed += await _lease(conn, pending, limit - len(claimed), lease_owner, now, expires_at)
    return claimed


async def claim_next(
    conn: AsyncConnection, lease_owner: str, lease_seconds: float
) -> ClaimedTask | None:
    """Lease the oldest claimable task to ``lease_owner`` and return it, or None (see claim_batch)."""
    claimed = await claim_batch(conn, lease_owner, lease_seconds, 1)
    return claimed[0] if claimed else None


def _owned(task_id: uuid.UUID, lease_owner: str) -> ColumnElement[bool]:
    return and_(
        tasks.c.id == task_id,
        tasks.c.state == TaskRunState.RUNNING,
        tasks.c.lease_owner == lease_owner,
    )


async def _update_owned(
    conn: AsyncConnection, task_id: uuid.UUID, lease_owner: str, values: dict[str, Any]
) -> None:
    result = await conn.execute(update(tasks).where(_owned(task_id, lease_owner)).values(**values))
    if result.rowcount != 1:
        raise LeaseLost(task_id, lease_owner)


async def renew_lease(
    conn: AsyncConnection, task: ClaimedTask, lease_seconds: float, *, step: str | None = None
) -> None:
    """Extend the lease by ``lease_seconds`` from now, recording ``step`` when given.

    Raises LeaseLost when the task is no longer leased to this claim. On PostgreSQL
    the UPDATE also locks the task row until the transaction ends, so no other
    worker can claim the task while the caller's transaction is open.
    """
    now = utcnow()
    values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now}
    if step is not None:
        values["step"] = step
    await _update_owned(conn, task.id, task.lease_owner, values)


async def finish(
    conn: AsyncConnection, task: ClaimedTask, state: TaskRunState, *, error: str | None = None
) -> None:
    """Move the task to a final state and drop its lease; ``error`` goes to ``last_error``."""
    if state not in FINAL:
        raise ValueError(f"finish needs a final state, got {state}")
    values: dict[str, Any] = {
        "state": state,
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": utcnow(),
    }
    if error is not None:
        values["last_error"] = error
    await _update_owned(conn, task.id, task.lease_owner, values)


async def retry_later(conn: AsyncConnection, task: ClaimedTask, *, error: str) -> None:
    """Put the task back to PENDING after a failed attempt, keeping its attempt count."""
    await _update_owned(
        conn,
        task.id,
        task.lease_owner,
        {
            "state": TaskRunState.PENDING,
            "lease_owner": None,
            "lease_expires_at": None,
            "last_error": error,
            "updated_at": utcnow(),
        },
    )


async def give_back(conn: AsyncConnection, task: ClaimedTask) -> None:
    """Return an interrupted task to PENDING without counting the interrupted attempt.

    Used when a worker stops on purpose, so that a shutdown does not bring the task
    closer to its attempt limit.
    """
    await _update_owned(
        conn,
        task.id,
        task.lease_owner,
        {
            "state": TaskRunState.PENDING,
            "lease_owner": None,
            "lease_expires_at": None,
            "attempts": tasks.c.attempts - 1,
            "updated_at": utcnow(),
        },
    )


async def release_all_running(conn: AsyncConnection) -> int:
    """Make every RUNNING task claimable at once and return how many there were.

    Only safe when no other worker is alive, e.g. in the single embedded worker of
    a SQLite deployment at start-up: a live worker would lose its tasks.
    """
    result = await conn.execute(
        update(tasks)
        .where(tasks.c.state == TaskRunState.RUNNING)
        .values(state=TaskRunState.PENDING, lease_owner=None, lease_expires_at=None, updated_at=utcnow())
    )
    return result.rowcount


async def get_task(conn: AsyncConnection, task_id: uuid.UUID) -> Row[Any] | None:
    return (await conn.execute(select(tasks).where(tasks.c.id == task_id))).first()


async def count_by_state(conn: AsyncConnection) -> dict[str, int]:
    """Return the number of tasks in each state, e.g. for a queue-depth metric."""
    query = select(tasks.c.state, func.count()).group_by(tasks.c.state)
    return {state: int(number) for state, number in (await conn.execute(query)).all()}


async def finish_action(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    action_id: uuid.UUID | None,
    status: str,
    message: str | None = None,
) -> None:
    """Record the outcome (SUCCEEDED or FAILED) of the instance action behind a task."""
    if action_id is None:
        return
    await conn.execute(
        update(instance_actions)
        .where(instance_actions.c.organization_id == organization_id, instance_actions.c.id == action_id)
        .values(status=status, message=message, finished_at=utcnow())
    )
