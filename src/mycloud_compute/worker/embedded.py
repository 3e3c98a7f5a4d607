"""The lifecycle worker that runs inside the API process (SQLite deployments)."""

from __future__ import annotations

import asyncio

from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings
from mycloud_compute.worker.runner import Worker, build_driver, recover_orphans


async def run_embedded_worker(settings: Settings, db: Database) -> None:
    """Run a worker on the API's database until the task is cancelled."""
    # On SQLite this process is the only worker, so every RUNNING task is an orphan
    # of an earlier run and can be resumed at once instead of after its lease.
    await recover_orphans(db)
    stop = asyncio.Event()
    try:
        await Worker(settings, db, build_driver(settings)).run(stop)
    finally:
        stop.set()
