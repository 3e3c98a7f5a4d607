"""Count the statements, transactions and worker CPU of one create and one delete task.

Usage:
    python bench/lifecycle_statements.py \
        --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_statements --instances 300

It drops and re-creates the database named in ``--database-url``, creates
``--organizations`` organizations, and queues ``--instances`` creates with COPY as
``lifecycle_load.py`` does. A real ``Worker`` then runs in this process, with the
simulated driver's step delay at 0, until no task is left. The same is done for a
delete of every instance. For each phase it prints per task:

- statements: every statement SQLAlchemy sends (``before_cursor_execute``), so
  BEGIN and COMMIT are not among them;
- transactions: BEGIN/COMMIT pairs outside autocommit mode;
- savepoints;
- worker CPU: ``time.process_time`` of this process while the worker runs (the
  database's CPU is not included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from create_load import create_organizations, recreate_database
from lifecycle_load import host_inventory, queue_creates, queue_deletes
from sqlalchemy import event

from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings
from mycloud_compute.worker.runner import Worker, build_driver


@dataclass
class Counts:
    statements: int = 0
    transactions: int = 0
    savepoints: int = 0


@dataclass
class PhaseCost:
    phase: str
    tasks: int
    statements_per_task: float
    transactions_per_task: float
    savepoints_per_task: float
    worker_cpu_ms_per_task: float
    outcomes: dict[str, int]


def count_statements(db: Database) -> Counts:
    """Count what the writer engine sends from now on; the returned object keeps growing."""
    counts = Counts()
    engine = db.writer.sync_engine

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(*_args: Any) -> None:
        counts.statements += 1

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        # SQLAlchemy begins a transaction object on autocommit connections too, but
        # the driver sends no BEGIN for them.
        if connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            counts.transactions += 1

    @event.listens_for(engine, "savepoint")
    def _savepoint(*_args: Any) -> None:
        counts.savepoints += 1

    return counts


async def run_phase(worker: Worker, counts: Counts, phase: str, tasks: int) -> PhaseCost:
    before = Counts(**asdict(counts))
    outcomes_before = dict(worker.outcomes)
    cpu_started = time.process_time()
    await worker.run_until_idle()
    cpu = time.process_time() - cpu_started
    outcomes = {f"{action} {state}": number - outcomes_before.get((action, state), 0)
                for (action, state), number in worker.outcomes.items()
                if number != outcomes_before.get((action, state), 0)}
    return PhaseCost(
        phase=phase,
        tasks=tasks,
        statements_per_task=(counts.statements - before.statements) / tasks,
        transactions_per_task=(counts.transactions - before.transactions) / tasks,
        savepoints_per_task=(counts.savepoints - before.savepoints) / tasks,
        worker_cpu_ms_per_task=cpu / tasks * 1000,
        outcomes=outcomes,
    )


async def measure(args: argparse.Namespace) -> list[PhaseCost]:
    settings = Settings(
        database_url=args.database_url,
        driver_step_delay=0,
        simulated_hosts=host_inventory(args.hosts, args.instances),
        worker_concurrency=args.concurrency,
        log_level="WARNING",
    )
    db = Database(args.database_url, pool_size=settings.database_pool_size)
    try:
        worker = Worker(settings, db, build_driver(settings), name="statements-bench")
        counts = count_statements(db)
        # The first run only registers the hosts, so that neither phase pays for it.
        await worker.run_until_idle()
        await queue_creates(args.database_url, args.instances, "statements-create")
        results = [await run_phase(worker, counts, "create", args.instances)]
        deletes = await queue_deletes(args.database_url, "statements-create", "statements-delete")
        results.append(await run_phase(worker, counts, "delete", deletes))
        return results
    finally:
        await db.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True,
                        help="A dedicated PostgreSQL database: it is dropped and re-created.")
    parser.add_argument("--instances", type=int, default=300, help="Creates to queue, then delete.")
    parser.add_argument("--organizations", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=20, help="Simulated hosts.")
    parser.add_argument("--concurrency", type=int, default=8, help="Tasks the worker runs at once.")
    args = parser.parse_args()

    asyncio.run(recreate_database(args.database_url))
    asyncio.run(create_organizations(args.database_url, args.organizations))
    for result in asyncio.run(measure(args)):
        print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
