"""The lifecycle worker: claims tasks from the queue and runs them.

Several workers, in one process or many, may share one database. Each claimed
task holds a lease that a heartbeat renews every third of ``task_lease_seconds``,
so a task whose worker died becomes claimable once the lease expires, and the
next worker resumes it. A task that fails with an unexpected error goes back to
the queue. After MAX_ATTEMPTS attempts it is ended instead, and its instance goes
to ERROR with a fault.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import prometheus_client
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.drivers.base import ComputeDriver
from mycloud_compute.drivers.simulated import SimulatedDriver
from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence import tasks as task_store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tasks import ClaimedTask, LeaseLost, TaskRunState
from mycloud_compute.services.lifecycle import VmState
from mycloud_compute.settings import Settings
from mycloud_compute.worker.context import (
    ACTION_FAILED,
    MAX_ATTEMPTS,
    InstanceNotFound,
    TaskContext,
    make_fault,
    state_values,
)
from mycloud_compute.worker.create import give_up_create, run_create
from mycloud_compute.worker.delete import give_up_delete
from mycloud_compute.worker.power import give_up_power, run_power
from mycloud_compute.worker.resize import (
    give_up_resize,
    give_up_resize_end,
    run_confirm_resize,
    run_delete_after_resize_cleanup,
    run_resize,
    run_revert_resize,
)
from mycloud_compute.worker.stoppable import StoppableDriver, StopSignal

log = logging.getLogger(__name__)

# Exported by GET /metrics in the API processes that run an embedded worker. A
# standalone worker serves no HTTP, so its counts are not scraped.
TASKS_FINISHED = prometheus_client.Counter(
    "mycloud_compute_worker_tasks_finished",
    "Tasks this process's worker ran to an end, by action and final state.",
    ["action", "outcome"],
)

# How long a stopping worker waits for its tasks to reach a driver call or their end.
STOP_GRACE_SECONDS = 10.0

# Errors that a database or network outage raises; a claim that fails with one is
# retried at the next poll.
TRANSIENT_ERRORS = (SQLAlchemyError, OSError)


@dataclass(frozen=True)
class TaskKind:
    """How to run one task action, and how to end it when it has failed too often."""

    run: Callable[[TaskContext], Awaitable[None]]
    give_up: Callable[[TaskContext, str], Awaitable[None]]


TASK_KINDS: dict[str, TaskKind] = {
    "create": TaskKind(run=run_create, give_up=give_up_create),
    "delete": TaskKind(run=run_delete_after_resize_cleanup, give_up=give_up_delete),
    "start": TaskKind(run=run_power, give_up=give_up_power),
    "stop": TaskKind(run=run_power, give_up=give_up_power),
    "reboot": TaskKind(run=run_power, give_up=give_up_power),
    "resize": TaskKind(run=run_resize, give_up=give_up_resize),
    "confirm-resize": TaskKind(run=run_confirm_resize, give_up=give_up_resize_end),
    "revert-resize": TaskKind(run=run_revert_resize, give_up=give_up_resize_end),
}


def build_driver(settings: Settings) -> ComputeDriver:
    """Return the compute driver the settings select (only the simulated one exists)."""
    return SimulatedDriver.from_settings(settings)


async def sync_hosts(db: Database, driver: ComputeDriver) -> int:
    """Store the driver's host inventory in ``hosts`` and return the number of hosts reported."""
    inventory = await driver.list_hosts()
    async with db.transaction() as conn:
        await host_store.sync_inventory(conn, inventory)
    log.info("compute hosts synced count=%d names=%s", len(inventory), [host.name for host in inventory])
    return len(inventory)


async def recover_orphans(db: Database) -> int:
    """Make every RUNNING task claimable at once and return how many there were.

    For the single embedded worker of a SQLite deployment at start-up: its tasks
    were left RUNNING by the previous process, and no other worker can be alive.
    Never call it while another worker may be running.
    """
    async with db.transaction() as conn:
        count = await task_store.release_all_running(conn)
    if count:
        log.warning("orphaned tasks returned to the queue count=%d", count)
    return count


class Worker:
    """Claims and runs up to ``worker_concurrency`` tasks at once.

    ``outcomes`` counts finished tasks by (action, final state), for metrics.
    """

    def __init__(
        self, settings: Settings, db: Database, driver: ComputeDriver, *, name: str | None = None
    ) -> None:
        self.db = db
        self.driver = driver
        self.lease_seconds = settings.task_lease_seconds
        self.poll_interval = settings.worker_poll_interval
        self.concurrency = settings.worker_concurrency
        self.name = name or f"{socket.gethostname()[:64]}:{os.getpid()}"
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._running: set[asyncio.Task[None]] = set()
        self._claim_failures = 0
        self._stopping = False
        self._stop_signals: dict[asyncio.Task[None], StopSignal] = {}
        self._next_expired_check = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Sync the driver's hosts, then run tasks until ``stop`` is set or the call is cancelled.

        On stop, the running tasks are interrupted and go back to the queue at once,
        without using up an attempt.
        """
        log.info(
            "worker started worker=%s concurrency=%d lease_seconds=%s",
            self.name,
            self.concurrency,
            self.lease_seconds,
        )
        stop_waiter = asyncio.create_task(stop.wait())
        try:
            await self._sync_hosts(stop_waiter)
            while not stop.is_set():
                await self._fill_slots()
                # Wake up when stopping, when a slot frees up, or at the next poll.
                timeout = None if len(self._running) >= self.concurrency else self.poll_interval
                await asyncio.wait(
                    {stop_waiter, *self._running}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            stop_waiter.cancel()
            await self._interrupt_running()
            log.info("worker stopped worker=%s", self.name)

    async def _sync_hosts(self, stop_waiter: asyncio.Task[bool]) -> None:
        """Register the driver's hosts, retrying at each poll while the database is unreachable."""
        failures = 0
        while not stop_waiter.done():
            try:
                await sync_hosts(self.db, self.driver)
                return
            except TRANSIENT_ERRORS as exc:
                failures += 1
                if failures % 100 == 1:
                    log.error(
                        "host sync failed worker=%s consecutive_failures=%d error=%r",
                        self.name,
                        failures,
                        str(exc),
                    )
            await asyncio.wait({stop_waiter}, timeout=self.poll_interval)

    async def run_until_idle(self) -> None:
        """Sync the driver's hosts, run tasks until none is claimable and none is running, return.

        A RUNNING task whose lease has not expired yet is not claimable, so it is
        left alone.
        """
        await sync_hosts(self.db, self.driver)
        while True:
            claimed = await self._fill_slots()
            if not self._running:
                if claimed == 0:
                    return
                continue
            await asyncio.wait(self._running, return_when=asyncio.FIRST_COMPLETED)

    async def _fill_slots(self) -> int:
        """Claim tasks until every slot is busy or none is claimable; return how many."""
        claimed = 0
        while len(self._running) < self.concurrency:
            limit = self.concurrency - len(self._running)
            batch = await self._claim(limit)
            for task in batch:
                running = asyncio.create_task(self._execute(task), name=f"task-{task.id}")
                self._running.add(running)
                running.add_done_callback(self._running.discard)
            claimed += len(batch)
            if len(batch) < limit:
                break
        return claimed

    @asynccontextmanager
    async def _claim_connection(self) -> AsyncIterator[AsyncConnection]:
        """Open a connection for claims: autocommit on PostgreSQL, a write transaction on SQLite.

        Each claim statement is atomic on its own, so PostgreSQL needs no BEGIN and COMMIT.
        """
        if self.db.is_sqlite:
            async with self.db.transaction() as conn:
                yield conn
            return
        async with self.db.writer.connect() as conn:
            yield await conn.execution_options(isolation_level="AUTOCOMMIT")

    async def _claim(self, limit: int) -> list[ClaimedTask]:
        """Claim up to ``limit`` tasks; an empty list when none is claimable.

        Tasks with an expired lease are looked for at most once per poll interval:
        a worker claims far more often than leases expire.
        """
        # Each claim gets its own lease owner, so a lease names one claim and a
        # worker cannot mistake a later claim of the same task for its own.
        lease_owner = f"{self.name}:{uuid.uuid4().hex[:12]}"
        now = time.monotonic()
        include_expired = now >= self._next_expired_check
        try:
            async with self._claim_connection() as conn:
                batch = await task_store.claim_batch(
                    conn, lease_owner, self.lease_seconds, limit, include_expired=include_expired
                )
        except TRANSIENT_ERRORS as exc:
            self._claim_failures += 1
            # Log the first failure of an outage and every 100th after it, not every poll.
            if self._claim_failures % 100 == 1:
                log.error(
                    "task claim failed worker=%s consecutive_failures=%d error=%r",
                    self.name,
                    self._claim_failures,
                    str(exc),
                )
            return []
        if include_expired:
            self._next_expired_check = now + self.poll_interval
        if self._claim_failures:
            log.info("task claim succeeded again worker=%s after_failures=%d", self.name, self._claim_failures)
            self._claim_failures = 0
        return batch

    async def _interrupt_running(self) -> None:
        """Stop the running tasks at their next driver call, or cancel them after a grace period.

        A task cancelled inside a transaction may leave a connection that holds
        SQLite's write lock (see stoppable.py), so tasks busy with the database get
        STOP_GRACE_SECONDS to reach a driver call or their end.
        """
        self._stopping = True
        running = list(self._running)
        for task in running:
            signal = self._stop_signals.get(task)
            if signal is not None:
                signal.request_stop(task)
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=STOP_GRACE_SECONDS)
        for task in pending:
            log.warning("task still running at stop, cancelling it worker=%s task_name=%s",
                        self.name, task.get_name())
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def _execute(self, task: ClaimedTask) -> None:
        """Run one claimed task with a heartbeat that keeps its lease alive."""
        signal = StopSignal()
        signal.stopping = self._stopping
        ctx = TaskContext(
            task=task, db=self.db, driver=StoppableDriver(self.driver, signal), lease_seconds=self.lease_seconds
        )
        current = asyncio.current_task()
        assert current is not None
        self._stop_signals[current] = signal
        lease_lost = asyncio.Event()
        heartbeat_stop = asyncio.Event()
        heartbeat = asyncio.create_task(self._keep_lease(ctx, current, lease_lost, heartbeat_stop))
        log.info("task started attempt=%d worker=%s %s", task.attempts, self.name, ctx.log_ids)
        try:
            await self._run_task(ctx)
        except asyncio.CancelledError:
            if not lease_lost.is_set():
                await self._give_back(ctx)
                raise
            # The heartbeat cancelled the task: another worker owns it now.
            current.uncancel()
            log.warning("task abandoned: its lease was lost worker=%s %s", self.name, ctx.log_ids)
        finally:
            self._stop_signals.pop(current, None)
            # Stop the heartbeat between renewals rather than in the middle of one.
            heartbeat_stop.set()
            await asyncio.gather(heartbeat, return_exceptions=True)
        if ctx.outcome is not None:
            self.outcomes[(task.action, ctx.outcome.value)] += 1
            TASKS_FINISHED.labels(task.action, ctx.outcome.value).inc()

    async def _run_task(self, ctx: TaskContext) -> None:
        kind = TASK_KINDS.get(ctx.task.action)
        if kind is None:
            await self._reject_unknown_action(ctx)
            return
        try:
            if ctx.task.attempts > MAX_ATTEMPTS:
                # Every earlier attempt ended without recording a result: its worker died.
                await self._give_up(
                    ctx,
                    kind,
                    f"the workers running the {ctx.task.action} task stopped "
                    f"{ctx.task.attempts - 1} times before it finished",
                )
            else:
                await kind.run(ctx)
        except LeaseLost:
            log.warning("task step aborted: its lease was lost worker=%s %s", self.name, ctx.log_ids)
        except InstanceNotFound:
            await self._finish_without_instance(ctx)
        except Exception as exc:  # noqa: BLE001 - any failure of a task must be recorded
            await self._handle_failure(ctx, kind, exc)

    async def _handle_failure(self, ctx: TaskContext, kind: TaskKind, error: Exception) -> None:
        """Queue the task for another attempt, or end it when it has used them all."""
        if ctx.task.attempts < MAX_ATTEMPTS:
            log.warning(
                "task failed, will retry attempt=%d max_attempts=%d error=%r %s",
                ctx.task.attempts,
                MAX_ATTEMPTS,
                str(error),
                ctx.log_ids,
                exc_info=error,
            )
            ctx.lease_released = True
            try:
                async with self.db.transaction() as conn:
                    await task_store.retry_later(conn, ctx.task, error=repr(error))
            except LeaseLost:
                log.warning("task retry not queued: its lease was lost %s", ctx.log_ids)
            except TRANSIENT_ERRORS:
                log.exception("task retry not queued; it is retried when its lease expires %s", ctx.log_ids)
            return

        log.error(
            "task failed, no attempts left attempt=%d error=%r %s",
            ctx.task.attempts,
            str(error),
            ctx.log_ids,
            exc_info=error,
        )
        reason = f"the {ctx.task.action} task failed {ctx.task.attempts} times with an internal error"
        await self._give_up(ctx, kind, reason)

    async def _give_up(self, ctx: TaskContext, kind: TaskKind, reason: str) -> None:
        try:
            await kind.give_up(ctx, reason)
        except LeaseLost:
            log.warning("task not ended: its lease was lost %s", ctx.log_ids)
        except InstanceNotFound:
            await self._finish_without_instance(ctx)
        except Exception:  # noqa: BLE001 - a failing give-up must not make the task loop forever
            log.exception("task give-up failed, ending it without cleanup %s", ctx.log_ids)
            await self._end_without_cleanup(ctx, reason)

    async def _end_without_cleanup(self, ctx: TaskContext, reason: str) -> None:
        """Put the instance in ERROR and fail the task, releasing nothing.

        The last resort when the normal give-up fails: without it the task would be
        claimed and fail again each time its lease expires.
        """
        try:
            async with ctx.locked_instance() as (conn, instance):
                await ctx.update_instance(
                    conn,
                    {
                        **state_values(VmState.ERROR, None),
                        "fault": make_fault(f"The {ctx.task.action} task failed", reason),
                    },
                )
                await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=reason)
        except Exception:  # noqa: BLE001 - the lease expires and the next claim tries again
            log.exception("task could not be ended; it is retried when its lease expires %s", ctx.log_ids)
            return
        log.error("task ended without cleanup; host usage and ports may need repair %s", ctx.log_ids)

    async def _reject_unknown_action(self, ctx: TaskContext) -> None:
        """Fail a task this worker has no handler for, clearing the instance's task_state."""
        # For example, a task queued by a newer API version than this worker.
        message = f"This worker cannot run the {ctx.task.action!r} action"
        try:
            async with ctx.locked_instance() as (conn, instance):
                if instance.task_state is not None and instance.vm_state != VmState.DELETED:
                    await ctx.update_instance(conn, state_values(VmState(instance.vm_state), None))
                await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=message)
        except InstanceNotFound:
            await self._finish_without_instance(ctx)
            return
        except Exception:  # noqa: BLE001 - the lease expires and the next claim tries again
            log.exception("task with an unknown action could not be ended %s", ctx.log_ids)
            return
        log.error("task failed: unknown action %s", ctx.log_ids)

    async def _finish_without_instance(self, ctx: TaskContext) -> None:
        message = f"instance {ctx.task.instance_id} does not exist"
        try:
            async with self.db.transaction() as conn:
                if await instance_store.get(conn, ctx.task.organization_id, ctx.task.instance_id) is None:
                    await ctx.finish(conn, TaskRunState.FAILED, action_status=ACTION_FAILED, message=message)
        except (LeaseLost, *TRANSIENT_ERRORS):
            log.exception("task for a missing instance could not be ended %s", ctx.log_ids)
            return
        log.error("task failed: its instance does not exist %s", ctx.log_ids)

    async def _give_back(self, ctx: TaskContext) -> None:
        """Return an interrupted task to the queue so that another worker takes it at once."""
        if ctx.lease_released:
            return
        ctx.lease_released = True
        try:
            async with self.db.transaction() as conn:
                await task_store.give_back(conn, ctx.task)
        except (LeaseLost, *TRANSIENT_ERRORS):
            log.warning("interrupted task not returned; it is retried when its lease expires %s", ctx.log_ids)
            return
        log.info("task interrupted and returned to the queue worker=%s %s", self.name, ctx.log_ids)

    async def _keep_lease(
        self,
        ctx: TaskContext,
        runner: asyncio.Task[None],
        lease_lost: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        """Renew the lease every third of its length until ``stop``; cancel ``runner`` if it is lost."""
        interval = self.lease_seconds / 3
        while True:
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval)
                return
            except TimeoutError:
                pass
            try:
                async with self.db.transaction() as conn:
                    await task_store.renew_lease(conn, ctx.task, self.lease_seconds)
            except LeaseLost:
                if not ctx.lease_released:
                    lease_lost.set()
                    runner.cancel()
                return
            except TRANSIENT_ERRORS as exc:
                log.warning("lease renewal failed error=%r %s", str(exc), ctx.log_ids)


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run a standalone worker on its own database connections until ``stop`` is set.

    Does not call recover_orphans, because other workers may share the database.
    """
    db = Database(settings.database_url, pool_size=settings.database_pool_size)
    try:
        await Worker(settings, db, build_driver(settings)).run(stop)
    finally:
        await db.dispose()
