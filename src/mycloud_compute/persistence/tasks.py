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

import functools
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.tables import instance_actions, instances, tasks


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


def _claimable_ids(state_clause: ColumnElement[bool], limit: ColumnElement[int]) -> Any:
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


@functools.cache
def _lease_statement(expired: bool) -> Update:
    """Return the claim UPDATE for expired RUNNING tasks, or for PENDING ones, with bind parameters."""
    if expired:
        state_clause = and_(tasks.c.state == TaskRunState.RUNNING, tasks.c.lease_expires_at < bindparam("claim_now"))
    else:
        state_clause = tasks.c.state == TaskRunState.PENDING
    return (
        update(tasks)
        .where(tasks.c.id.in_(_claimable_ids(state_clause, bindparam("claim_limit", type_=Integer))))
        .values(
            state=TaskRunState.RUNNING,
            lease_owner=bindparam("new_lease_owner"),
            lease_expires_at=bindparam("new_lease_expires_at"),
            attempts=tasks.c.attempts + 1,
            updated_at=bindparam("claim_now"),
        )
        .returning(*tasks.c)
    )


async def _lease(
    conn: AsyncConnection,
    expired: bool,
    limit: int,
    lease_owner: str,
    now: datetime,
    expires_at: datetime,
) -> list[ClaimedTask]:
    parameters = {
        "claim_now": now,
        "claim_limit": limit,
        "new_lease_owner": lease_owner,
        "new_lease_expires_at": expires_at,
    }
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
        for row in sorted(
            (await conn.execute(_lease_statement(expired), parameters)).all(), key=lambda row: (row.created_at, row.id)
        )
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
        claimed = await _lease(conn, True, limit, lease_owner, now, expires_at)
    if len(claimed) < limit:
        claimed += await _lease(conn, False, limit - len(claimed), lease_owner, now, expires_at)
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


# Statements that the worker runs several times per task are built once, with
# bind parameters, because building a SQLAlchemy statement costs more CPU than
# executing it. Parameter names must differ from the column names they update.
_OWNED_BY_PARAMETERS = and_(
    tasks.c.id == bindparam("match_task_id"),
    tasks.c.state == TaskRunState.RUNNING,
    tasks.c.lease_owner == bindparam("match_lease_owner"),
)


def _owner_parameters(task: ClaimedTask) -> dict[str, Any]:
    return {"match_task_id": task.id, "match_lease_owner": task.lease_owner}


@functools.cache
def _renew_and_lock_statement(with_step: bool) -> Select[Any]:
    """Return the PostgreSQL statement of :func:`renew_lease_and_lock_instance`."""
    values: dict[str, Any] = {
        "lease_expires_at": bindparam("new_lease_expires_at"),
        "updated_at": bindparam("new_updated_at"),
    }
    if with_step:
        values["step"] = bindparam("new_step")
    renewed = update(tasks).where(_OWNED_BY_PARAMETERS).values(values).returning(tasks.c.id).cte("renewed_lease")
    return (
        select(instances)
        .where(
            instances.c.organization_id == bindparam("match_organization_id"),
            instances.c.id == bindparam("match_instance_id"),
            exists(select(renewed.c.id)),
        )
        .with_for_update(of=instances)
    )


async def renew_lease_and_lock_instance(
    conn: AsyncConnection, task: ClaimedTask, lease_seconds: float, *, step: str | None = None
) -> Row[Any] | None:
    """Renew the lease as :func:`renew_lease` does, then read and lock the task's instance row.

    Returns None when the instance row does not exist. Raises LeaseLost when the task
    is no longer leased to this claim, and the caller's transaction must roll back.
    The task row is locked before the instance row, as in two separate statements.
    On PostgreSQL both happen in one statement, in which the renewal is a
    data-modifying CTE that the instance query checks with EXISTS. Only when that
    query returns no row does a second statement find out whether the lease or the
    instance is missing.
    """
    if conn.dialect.name != "postgresql":
        await renew_lease(conn, task, lease_seconds, step=step)
        query = select(instances).where(
            instances.c.organization_id == task.organization_id, instances.c.id == task.instance_id
        )
        return (await conn.execute(query.with_for_update())).first()

    now = utcnow()
    parameters = {
        **_owner_parameters(task),
        "new_lease_expires_at": now + timedelta(seconds=lease_seconds),
        "new_updated_at": now,
        "match_organization_id": task.organization_id,
        "match_instance_id": task.instance_id,
    }
    if step is not None:
        parameters["new_step"] = step
    row: Row[Any] | None = (await conn.execute(_renew_and_lock_statement(step is not None), parameters)).first()
    if row is None:
        owned = await conn.execute(select(tasks.c.id).where(_owned(task.id, task.lease_owner)))
        if owned.first() is None:
            raise LeaseLost(task.id, task.lease_owner)
    return row


def _final_values(state: TaskRunState, error: str | None) -> dict[str, Any]:
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
    return values


async def finish(
    conn: AsyncConnection, task: ClaimedTask, state: TaskRunState, *, error: str | None = None
) -> None:
    """Move the task to a final state and drop its lease; ``error`` goes to ``last_error``."""
    await _update_owned(conn, task.id, task.lease_owner, _final_values(state, error))


@functools.cache
def _finish_statement(has_error: bool, has_action: bool, instance_columns: tuple[str, ...]) -> Update:
    """Return the PostgreSQL statement of :func:`finish_with_action` for one shape of its arguments."""
    values: dict[str, Any] = {
        "state": bindparam("new_state"),
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": bindparam("new_updated_at"),
    }
    if has_error:
        values["last_error"] = bindparam("new_last_error")
    statement = update(tasks).where(_OWNED_BY_PARAMETERS).values(values)
    if has_action:
        statement = statement.add_cte(
            update(instance_actions)
            .where(
                instance_actions.c.organization_id == bindparam("match_organization_id"),
                instance_actions.c.id == bindparam("match_action_id"),
            )
            .values(
                status=bindparam("action_status"),
                message=bindparam("action_message", type_=instance_actions.c.message.type),
                finished_at=bindparam("new_updated_at"),
            )
            .cte("finished_action")
        )
    if instance_columns:
        statement = statement.add_cte(
            update(instances)
            .where(
                instances.c.organization_id == bindparam("match_organization_id"),
                instances.c.id == bindparam("match_instance_id"),
            )
            .values({name: bindparam(f"new_instance_{name}", type_=instances.c[name].type) for name in instance_columns})
            .cte("updated_instance")
        )
    return statement


async def finish_with_action(
    conn: AsyncConnection,
    task: ClaimedTask,
    state: TaskRunState,
    *,
    action_status: str,
    message: str | None = None,
    error: str | None = None,
    instance_values: dict[str, Any] | None = None,
) -> None:
    """Finish the task as :func:`finish` does, record its action's outcome and update its instance.

    ``instance_values`` are written to the task's instance row (no ``tags``: their
    rows live in another table). On PostgreSQL all of it is one statement, with the
    action's and the instance's UPDATEs as CTEs. Those run even when the lease turns
    out to be lost, so the caller's transaction must roll back on LeaseLost, as
    after every lease check.
    """
    if instance_values and "tags" in instance_values:
        raise ValueError("finish_with_action cannot change tags; update the instance first")
    if conn.dialect.name != "postgresql":
        if instance_values:
            await conn.execute(
                update(instances)
                .where(instances.c.organization_id == task.organization_id, instances.c.id == task.instance_id)
                .values(**instance_values)
            )
        await finish(conn, task, state, error=error)
        await finish_action(conn, task.organization_id, task.action_id, action_status, message)
        return

    if state not in FINAL:
        raise ValueError(f"finish needs a final state, got {state}")
    instance_values = instance_values or {}
    statement = _finish_statement(error is not None, task.action_id is not None, tuple(sorted(instance_values)))
    parameters: dict[str, Any] = {
        **_owner_parameters(task),
        "new_state": state.value,
        "new_updated_at": utcnow(),
        "new_last_error": error,
        "match_organization_id": task.organization_id,
        "match_instance_id": task.instance_id,
        "match_action_id": task.action_id,
        "action_status": action_status,
        "action_message": message,
    }
    parameters.update({f"new_instance_{name}": value for name, value in instance_values.items()})
    result = await conn.execute(statement, parameters)
    if result.rowcount != 1:
        raise LeaseLost(task.id, task.lease_owner)


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
