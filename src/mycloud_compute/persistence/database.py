"""Engines and transactions for SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import msgspec
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from mycloud_compute.persistence.urls import to_async_url

log = logging.getLogger(__name__)

# Upper bounds on how long a request waits for a new connection, and for a free
# pooled connection when all are in use. Past them it fails with a 503, so requests
# fail fast during an outage instead of piling up.
CONNECT_TIMEOUT_SECONDS = 5.0
POOL_TIMEOUT_SECONDS = 5.0

# SQLite reports a broken schema as OperationalError, like a locked database; these
# are deployment errors (a missing `db upgrade`), not an outage to retry.
_SCHEMA_ERRORS = ("no such table", "no such column")

# Errors that asyncpg raises, unwrapped, to code that uses the driver connection directly.
_DRIVER_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, cannot connect now
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.TooManyConnectionsError,  # the server has no free connection slot
)


def _driver_connection_lost(exc: BaseException) -> bool:
    """Return True when a raw asyncpg error means that the connection is unusable."""
    if isinstance(exc, _DRIVER_CONNECTION_ERRORS):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc)


def is_database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the database cannot be reached now (an outage to retry).

    Covers SQLAlchemy's wrapped errors, asyncpg's own errors from code that uses the
    driver connection directly, and socket errors and timeouts from connecting.
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        return not any(text in str(exc.orig) for text in _SCHEMA_ERRORS)
    # SQLAlchemy wraps some asyncpg errors, such as "the database system is starting
    # up" while the server restarts, in a plain DBAPIError, so check the cause chain.
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            break
        if _driver_connection_lost(cause):
            return True
        cause = cause.__cause__
    # PoolTimeout: every connection of the pool stayed busy for POOL_TIMEOUT_SECONDS.
    return isinstance(exc, (InterfaceError, PoolTimeout, ConnectionError, TimeoutError, OSError))


def _json_dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _make_engine(
    plain_url: str, *, pool_size: int, immediate: bool, server_settings: dict[str, str] | None = None
) -> AsyncEngine:
    url = to_async_url(plain_url)
    options: dict[str, Any] = {
        "json_serializer": _json_dumps,
        "json_deserializer": msgspec.json.decode,
        # Statement parameters carry request data (a secret pasted into a name, say);
        # keep them out of logged exceptions and SQL echo.
        "hide_parameters": True,
    }
    if url.get_backend_name() == "postgresql":
        options.update(
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=False,
            pool_timeout=POOL_TIMEOUT_SECONDS,
        )
        options["connect_args"] = {"timeout": CONNECT_TIMEOUT_SECONDS, "command_timeout": 30}
        if server_settings:
            options["connect_args"]["server_settings"] = server_settings
        return create_async_engine(url, **options)

    # SQLite: one connection per checkout is cheap; a pool of file connections
    # would share WAL readers across tasks with no gain.
    engine = create_async_engine(url, poolclass=NullPool, **options)
    _configure_sqlite(engine, immediate=immediate)
    return engine


def _configure_sqlite(engine: AsyncEngine, *, immediate: bool) -> None:
    """Take control of SQLite transactions.

    pysqlite begins transactions lazily and in DEFERRED mode. A deferred
    transaction that reads and then writes fails at once with "database is locked"
    when another connection is writing, without waiting for busy_timeout. Writers
    therefore start with BEGIN IMMEDIATE, which waits for the write lock up front.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    begin_statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin_statement)


@asynccontextmanager
async def _invalidated_on_driver_error(connection: AsyncConnection) -> AsyncIterator[None]:
    """Drop the connection from the pool when the block fails because it is broken.

    SQLAlchemy does this itself for statements it runs. Statements sent on the
    asyncpg connection directly bypass it, and a broken connection would go back
    to the pool and fail every request that gets it after the database is back.
    """
    try:
        yield
    except Exception as exc:
        if _driver_connection_lost(exc) and not connection.invalidated:
            log.warning("database connection lost; dropped from the pool error=%r", str(exc))
            await connection.invalidate(exc)
        raise


class Database:
    """The writer engine and the reader engine (the same server unless a replica is set)."""

    def __init__(self, url: str, *, read_url: str | None = None, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = to_async_url(url).get_backend_name() == "sqlite"
        self.writer = _make_engine(url, pool_size=pool_size, immediate=True)
        if self.is_sqlite:
            self.reader = _make_engine(url, pool_size=pool_size, immediate=False)
        elif read_url:
            self.reader = _make_engine(read_url, pool_size=pool_size, immediate=False)
        else:
            self.reader = self.writer
        # The list statements whose best plan does not depend on the values run on
        # connections that always use the generic plan. PostgreSQL 15 otherwise
        # planned them at every execution: without the value of `LIMIT $2 + 1` the
        # generic plan's estimated cost was far higher (4,098 against 71 for page 1
        # of the 1M benchmark dataset), so it never chose it. tests/test_list_plans.py
        # checks these generic plans.
        self.list_reader = self.reader
        if not self.is_sqlite:
            self.list_reader = _make_engine(
                read_url or url,
                pool_size=pool_size,
                immediate=False,
                server_settings={"plan_cache_mode": "force_generic_plan"},
            )

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """Open a read-write transaction, committed when the block exits without error."""
        async with self.writer.begin() as connection:
            async with _invalidated_on_driver_error(connection):
                yield connection

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """Open a connection for reads, on the replica when one is configured.

        On PostgreSQL the reads run in autocommit mode. Under READ COMMITTED every
        statement takes its own snapshot anyway, so BEGIN and COMMIT would only add
        two round trips to each request. SQLite reads share one transaction.
        """
        if self.is_sqlite:
            async with self.reader.begin() as connection:
                yield connection
            return
        async with self.reader.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            async with _invalidated_on_driver_error(connection):
                yield autocommit

    @asynccontextmanager
    async def list_connection(self, *, generic_plans: bool) -> AsyncIterator[AsyncConnection]:
        """Open a reader connection for one list page statement sent through asyncpg.

        ``generic_plans`` picks ``list_reader``, whose connections always run the
        generic plan of a cached statement; otherwise the statement is planned with
        its values. A connection that breaks during the block leaves the pool.
        """
        engine = self.list_reader if generic_plans else self.reader
        async with engine.connect() as connection:
            async with _invalidated_on_driver_error(connection):
                yield connection

    @asynccontextmanager
    async def autocommit_driver_connection(self) -> AsyncIterator[Any]:
        """Yield a writer connection's asyncpg connection, outside any transaction.

        Each statement sent on it commits on its own, and SQLAlchemy sends nothing:
        no BEGIN, no COMMIT, no per-statement processing. PostgreSQL only.
        """
        if self.is_sqlite:
            raise RuntimeError("autocommit_driver_connection requires PostgreSQL, not SQLite")
        async with self.writer.connect() as connection:
            raw = (await connection.get_raw_connection()).driver_connection
            async with _invalidated_on_driver_error(connection):
                yield raw

    async def ping(self) -> None:
        """Check that the database is reachable and has been migrated (``db upgrade``)."""
        async with self.reader.connect() as connection:
            await connection.execute(text("SELECT version_num FROM alembic_version"))

    def pool_status(self) -> str:
        return self.writer.pool.status()

    async def dispose(self) -> None:
        await self.writer.dispose()
        if self.reader is not self.writer:
            await self.reader.dispose()
        if self.list_reader is not self.reader:
            await self.list_reader.dispose()
