"""Engines and transactions for SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from mycloud_compute.persistence.urls import to_async_url

log = logging.getLogger(__name__)


def _json_dumps(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _make_engine(plain_url: str, *, pool_size: int, immediate: bool) -> AsyncEngine:
    url = to_async_url(plain_url)
    options: dict[str, Any] = {
        "json_serializer": _json_dumps,
        "json_deserializer": msgspec.json.decode,
    }
    if url.get_backend_name() == "postgresql":
        options.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=False)
        options["connect_args"] = {"timeout": 5, "command_timeout": 30}
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

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """Open a read-write transaction, committed when the block exits without error."""
        async with self.writer.begin() as connection:
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
            yield autocommit

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
