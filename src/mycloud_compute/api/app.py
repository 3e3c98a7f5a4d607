"""The ASGI application: routes, authentication, error mapping and lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from mycloud_compute import __version__
from mycloud_compute.api import metrics
from mycloud_compute.api.auth import BearerTokenMiddleware, scope_guard
from mycloud_compute.api.deps import DEPENDENCIES
from mycloud_compute.api.errors import EXCEPTION_HANDLERS
from mycloud_compute.api.gc_tuning import tune_for_serving
from mycloud_compute.api.methods import MethodsMiddleware
from mycloud_compute.api.openapi import finish_document
from mycloud_compute.api.request_context import RequestContextMiddleware
from mycloud_compute.api.routes import (
    actions,
    catalog,
    hosts,
    instances,
    keypairs,
    networks,
    operations,
    security_groups,
    volumes,
)
from mycloud_compute.persistence.database import Database
from mycloud_compute.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Paths served without a token (regular expressions, searched in the path).
UNAUTHENTICATED = ["^/healthz$", "^/readyz$", "^/metrics$", "^/openapi.json$", "^/docs"]


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="mycloud Compute API",
        version=__version__,
        description="Instances, flavors and images of the mycloud Compute service.",
        path="/openapi.json",
        render_plugins=[JsonRenderPlugin(path="/")],
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http", scheme="bearer", description="API token: Authorization: Bearer <token>"
                )
            }
        ),
        security=[{"bearer": []}],
        use_handler_docstrings=False,
        create_examples=False,
    )


def _log_worker_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("embedded lifecycle worker failed", exc_info=task.exception())


async def _stop_worker(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:  # already logged by _log_worker_exit
        pass
    log.info("embedded lifecycle worker stopped")


def create_litestar(settings: Settings, *, worker_factory: Any | None = None) -> Litestar:
    """Build the Litestar application for ``settings``.

    ``worker_factory(settings, db)`` returns a coroutine that runs a lifecycle
    worker until cancelled; it runs inside the API process when the settings ask for
    an embedded worker.
    """

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = Database(
            settings.database_url,
            read_url=settings.database_read_url,
            pool_size=settings.database_pool_size,
        )
        app.state.db = db
        app.state.settings = settings
        worker_task = None
        if worker_factory is not None and settings.worker_in_api:
            worker_task = asyncio.create_task(worker_factory(settings, db), name="embedded-worker")
            worker_task.add_done_callback(_log_worker_exit)
            log.info("embedded lifecycle worker started")
        tune_for_serving(settings.gc_gen0_threshold)
        try:
            yield
        finally:
            if worker_task is not None:
                await _stop_worker(worker_task)
            await db.dispose()

    app = Litestar(
        route_handlers=[*instances.ROUTES, *catalog.ROUTES, *hosts.ROUTES, *operations.ROUTES,
                        *volumes.ROUTES, *actions.ROUTES,
                        *keypairs.ROUTES, *security_groups.ROUTES, *networks.ROUTES],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[DefineMiddleware(BearerTokenMiddleware, exclude=UNAUTHENTICATED)],
        guards=[scope_guard],
        lifespan=[lifespan, metrics.lifespan],
        openapi_config=_openapi_config(),
        request_max_body_size=settings.max_body_bytes,
        state=State({"settings": settings}),
        debug=False,
        logging_config=None,
    )
    finish_document(app)
    return app


def create_app(settings: Settings | None = None, *, worker_factory: Any | None = None) -> Any:
    """Build the ASGI callable to serve: the Litestar app inside the request-context layer."""
    settings = settings or load_settings()
    return RequestContextMiddleware(
        MethodsMiddleware(create_litestar(settings, worker_factory=worker_factory)), settings
    )
