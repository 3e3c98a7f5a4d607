"""The lifecycle worker that runs inside the API process (SQLite deployments)."""

from __future__ import annotations

import asyncio
import logging

from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings
from mycloud_compute.worker.runner import Worker, build_driver, recover_orphans

log = logging.getLogger(__name__)

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0


async def run_embedded_worker(settings: Settings, db: Database) -> None:
    """Run a worker on the API's database until cancelled, restarting it after failures.

    The API keeps accepting creates while the worker is down, so a worker that
    stopped for good (say, on a database that is not migrated yet) would leave
    every new instance in BUILD. It is restarted with a growing delay instead.
    """
    delay = FIRST_RESTART_DELAY
    while True:
        try:
            await _run_once(settings, db)
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("embedded lifecycle worker failed; restarting in %.0f s", delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RESTART_DELAY)


async def _run_once(settings: Settings, db: Database) -> None:
    # On SQLite this process is the only worker, so every RUNNING task is an orphan
    # of an earlier run and can be resumed at once instead of after its lease.
    await recover_orphans(db)
    stop = asyncio.Event()
    try:
        await Worker(settings, db, build_driver(settings)).run(stop)
    finally:
        stop.set()
