"""Run a standalone lifecycle worker: ``python -m mycloud_compute.worker``.

Settings come from the environment (``MYCLOUD_*``). The worker syncs the driver's
host inventory, then runs tasks until SIGTERM or SIGINT. On either signal it
stops claiming, returns the tasks it was running to the queue and exits 0.
The database must already be migrated.
"""

from __future__ import annotations

import asyncio
import signal

from mycloud_compute.logging_setup import configure_logging
from mycloud_compute.settings import Settings, load_settings
from mycloud_compute.worker.runner import serve


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await serve(settings, stop)


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
