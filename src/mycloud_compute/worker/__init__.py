"""The lifecycle worker that runs instance tasks (create, delete, actions) from the task queue."""

from mycloud_compute.worker.runner import (
    Worker,
    build_driver,
    recover_orphans,
    serve,
    sync_hosts,
)

__all__ = ["Worker", "build_driver", "recover_orphans", "serve", "sync_hosts"]
