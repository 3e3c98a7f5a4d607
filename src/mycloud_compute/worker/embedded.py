"""The lifecycle worker that runs inside the API process (SQLite deployments)."""

from __future__ import annotations

import asyncio
import logging

from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings

log = logging.getLogger(__name__)


async def run_embedded_worker(settings: Settings, db: Database) -> None:
    """Run a worker on the API's database until the task is cancelled."""
    from mycloud_compute.drivers.simulated import SimulatedDriver
    from mycloud_compute.worker.runner import Worker, recover_orphans

    driver = SimulatedDriver(settings)
    # On SQLite this process is the only worker, so every RUNNING task is an orphan
    # of an earlier run and can be resumed at once instead of after its lease.
    await recover_orphans(db)
    stop = asyncio.Event()
    worker = Worker(settings, db, driver)
    try:
        await worker.run(stop)
    except asyncio.CancelledError:
        stop.set()
        raise
