"""Prometheus metrics for ``GET /metrics``: requests, database pools and the task queue.

Request metrics are recorded by the request-context layer, the outermost ASGI layer,
so responses that the router or that layer produce itself (404, 405, 415) count too.
Routes are labelled by their template (``/v1/instances/{instance_id}``), never by
the raw path; a path that matches no route is labelled ``unmatched``.

Several API processes (``mycloud-compute serve --workers N``) use prometheus_client's
multiprocess mode: ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before the processes start, every process writes its values to files there, and a
scrape on any process merges the files of all of them. Without that variable, each
process keeps its values in memory and reports only its own.

docs/operations.md lists every metric with its labels.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.utils import normalize_path
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from mycloud_compute.persistence import tasks as task_store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tasks import TaskRunState

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED = "unmatched"
# Methods outside this set share one label value, so that made-up methods cannot
# create new time series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
# A scrape that waits longer than this for the task counts leaves them out.
TASK_COUNT_TIMEOUT_SECONDS = 5.0

# The *_created samples would add one more series per counter and histogram child.
# Multiprocess mode omits them, so without them both modes return the same metrics.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Bucket bounds in seconds. They start at 1 ms because most requests take a few milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "mycloud_compute_http_requests",
    "HTTP requests handled, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "mycloud_compute_http_request_duration_seconds",
    "Time from receiving a request to sending the last byte of its response.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
DB_POOL_CHECKED_OUT = Gauge(
    "mycloud_compute_db_pool_checked_out",
    "Database connections in use, summed over the live API processes.",
    ["pool"],
    multiprocess_mode="livesum",
)
DB_POOL_SIZE = Gauge(
    "mycloud_compute_db_pool_size",
    "Configured connections kept per pool, summed over the live API processes "
    "(PostgreSQL only; each pool may open as many again in overflow).",
    ["pool"],
    multiprocess_mode="livesum",
)


def is_multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROCESS_DIR_VARIABLE))


# --- requests -------------------------------------------------------------------------


class RequestMetrics:
    """Counts requests and observes their latency, labelled by route template."""

    def __init__(self, app: Any) -> None:
        # The Litestar router, used to name the route of requests that Litestar did
        # not route itself (405, and the 415 of the request-context layer).
        self._router = getattr(app, "asgi_router", None)
        # Labelled children by (method, route, status): looking them up in
        # prometheus_client takes a lock and builds a key on every call.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def record(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        method = scope["method"]
        if method not in KNOWN_METHODS:
            method = OTHER_METHOD
        route = scope.get("path_template") or self._route_of(scope["path"])
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            labels = (method, route, str(status))
            children = (HTTP_REQUESTS.labels(*labels), HTTP_REQUEST_DURATION.labels(*labels))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def _route_of(self, path: str) -> str:
        """Return the template of the route that serves ``path`` with any method, or ``unmatched``."""
        if self._router is None:
            return UNMATCHED
        try:
            # Litestar adds an OPTIONS handler to every HTTP route, so this finds
            # the route whatever method the request used.
            template: str = self._router.handle_routing(normalize_path(path), "OPTIONS")[4]
        except Exception:  # noqa: BLE001 - NotFoundException, MethodNotAllowedException and the like
            return UNMATCHED
        return template


# --- database pools -------------------------------------------------------------------


def _instrument_pool(label: str, engine: AsyncEngine) -> list[tuple[Any, str, Callable[..., None]]]:
    """Track checked-out connections of one engine; return the listeners for removal."""
    checked_out = DB_POOL_CHECKED_OUT.labels(label)
    checked_out.set(0)
    pool = engine.sync_engine.pool
    # SQLite uses NullPool, which keeps no connections, so it has no size to report.
    if isinstance(pool, QueuePool):
        DB_POOL_SIZE.labels(label).set(pool.size())

    def on_checkout(*_args: Any) -> None:
        checked_out.inc()

    def on_checkin(*_args: Any) -> None:
        checked_out.dec()

    listeners = [
        (engine.sync_engine, "checkout", on_checkout),
        (engine.sync_engine, "checkin", on_checkin),
    ]
    for target, name, listener in listeners:
        event.listen(target, name, listener)
    return listeners


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """Instrument the database pools of ``app.state.db``; on shutdown, retire this process.

    It must come after the lifespan that creates ``app.state.db``.
    """
    db: Database = app.state.db
    listeners = _instrument_pool("writer", db.writer)
    if db.reader is not db.writer:
        listeners += _instrument_pool("reader", db.reader)
    if db.list_reader is not db.reader:
        listeners += _instrument_pool("list", db.list_reader)
    try:
        yield
    finally:
        for target, name, listener in listeners:
            event.remove(target, name, listener)
        if is_multiprocess():
            # Drops this process's pool gauges from the sums; its counters stay.
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


# --- scrape ---------------------------------------------------------------------------


class _TaskStates(Collector):
    """The number of tasks in each state, as read from the database for one scrape."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "mycloud_compute_tasks",
            "Lifecycle tasks in the database by state, for every worker "
            "(PENDING and RUNNING are the queue depth).",
            labels=["state"],
        )
        for state in TaskRunState:
            family.add_metric([state.value], self.counts.get(state.value, 0))
        yield family


class _Combined(Collector):
    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


class _TaskCountReader:
    """Reads task counts, logging the first failure of a run of failures and every 100th."""

    def __init__(self) -> None:
        self.failures = 0

    async def read(self, db: Database) -> dict[str, int] | None:
        try:
            async with asyncio.timeout(TASK_COUNT_TIMEOUT_SECONDS):
                async with db.snapshot() as conn:
                    counts = await task_store.count_by_state(conn)
        except Exception as exc:  # noqa: BLE001 - the other metrics are still worth serving
            self.failures += 1
            if self.failures % 100 == 1:
                log.warning(
                    "metrics scrape without task counts consecutive_failures=%d error=%r",
                    self.failures,
                    str(exc) or type(exc).__name__,
                )
            return None
        self.failures = 0
        return counts


_task_counts = _TaskCountReader()


async def render(db: Database) -> bytes:
    """Return every metric in the Prometheus text format.

    The task counts come from the database at scrape time. When the database fails
    or times out, the scrape leaves them out and still returns the other metrics.
    """
    # NOTE: count_by_state groups the whole tasks table, and finished tasks are
    # never purged, so the cost of a scrape grows with the number of tasks ever run.
    counts = await _task_counts.read(db)
    if is_multiprocess():
        sources: list[Collector] = [MultiProcessCollector(None)]  # type: ignore[no-untyped-call]
    else:
        sources = [REGISTRY]
    if counts is not None:
        sources.append(_TaskStates(counts))
    return generate_latest(_Combined(sources))
