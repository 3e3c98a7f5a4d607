"""Shared fixtures: real databases, a real HTTP server process, organizations and tokens.

Every test that takes ``api`` runs twice, once on a SQLite file and once on a fresh
PostgreSQL database. PostgreSQL comes from ``MYCLOUD_TEST_POSTGRES_URL`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``); each test session creates its
own database there, named with the prefix ``MYCLOUD_TEST_DATABASE_PREFIX`` (default
``mycloud_test_``), and drops it at the end. When that server cannot be reached the
PostgreSQL tests are skipped with the reason, except under ``CI=true``, where they
fail.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.migrate import upgrade
from mycloud_compute.services import identity

POSTGRES_ADMIN_URL = os.environ.get(
    "MYCLOUD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Prefix of the databases the tests create, so that runs sharing one server can keep apart.
DATABASE_PREFIX = os.environ.get("MYCLOUD_TEST_DATABASE_PREFIX", "mycloud_test_")
IN_CI = os.environ.get("CI", "").lower() == "true"
SERVER_START_TIMEOUT = 30.0


# --- databases ------------------------------------------------------------------------


def _postgres_unavailable_reason() -> str | None:
    async def probe() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        await connection.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc!r}"
    return None


def _admin_execute(statement: str) -> None:
    async def run() -> None:
        connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run())


def _database_url_for(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@dataclass
class Backend:
    """A migrated database of one kind, for one test session."""

    kind: str
    url: str

    def run(self, make: Any) -> Any:
        """Run ``make(db)`` on a short-lived Database in its own event loop."""

        async def main() -> Any:
            db = Database(self.url, pool_size=2)
            try:
                return await make(db)
            finally:
                await db.dispose()

        return asyncio.run(main())


def require_postgres() -> None:
    reason = _postgres_unavailable_reason()
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"{reason}; PostgreSQL tests must run under CI=true")
    pytest.skip(reason)


@contextmanager
def new_backend(kind: str, directory: Path) -> Iterator[Backend]:
    """Create and migrate an empty database of ``kind``; drop it afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{directory / f'mycloud-{uuid.uuid4().hex[:8]}.db'}"
        upgrade(url)
        yield Backend("sqlite", url)
        return

    require_postgres()
    name = f"{DATABASE_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    url = _database_url_for(name)
    try:
        upgrade(url)
        yield Backend("postgresql", url)
    finally:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """The database shared by the tests of one session (one per kind)."""
    with new_backend(request.param, tmp_path_factory.mktemp("db")) as shared:
        yield shared


@pytest.fixture
def fresh_backend(backend: Backend, tmp_path: Path) -> Iterator[Backend]:
    """An empty database of the same kind, for tests whose workers must run alone."""
    with new_backend(backend.kind, tmp_path) as fresh:
        yield fresh


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A child process of the service with its log file."""

    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> Process:
    log_file = log_path.open("wb")
    popen = subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **env}, stdout=log_file, stderr=subprocess.STDOUT
    )
    log_file.close()
    return Process(popen, log_path)


@dataclass
class ApiServer:
    """The API served by a real uvicorn process (plus a worker process on PostgreSQL)."""

    backend: Backend
    base_url: str
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30, **kwargs)

    def logs(self) -> str:
        return "\n".join(process.log() for process in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def start_api(backend: Backend, log_dir: Path, **settings: str) -> ApiServer:
    """Start the API (and, on PostgreSQL, one standalone worker) with extra settings."""
    port = free_port()
    env = {
        "MYCLOUD_DATABASE_URL": backend.url,
        "MYCLOUD_DRIVER_STEP_DELAY": "0",
        "MYCLOUD_WORKER_POLL_INTERVAL": "0.05",
        "MYCLOUD_LOG_LEVEL": "INFO",
        # Tests send requests far faster than a customer would; test_protection.py
        # starts its servers with a low limit instead.
        "MYCLOUD_RATE_LIMIT_PER_SECOND": "0",
        **{f"MYCLOUD_{key.upper()}": value for key, value in settings.items()},
    }
    server = ApiServer(backend, f"http://127.0.0.1:{port}", env)
    tag = uuid.uuid4().hex[:6]
    server.processes.append(
        start_process(
            ["-m", "uvicorn", "mycloud_compute.api.asgi:app", "--host", "127.0.0.1",
             "--port", str(port), "--no-access-log", "--no-proxy-headers",
             "--http", "mycloud_compute.api.http_protocol:EnvelopeHttpToolsProtocol"],
            env,
            log_dir / f"api-{tag}.log",
        )
    )
    if backend.kind == "postgresql":
        server.processes.append(
            start_process(["-m", "mycloud_compute.worker"], env, log_dir / f"worker-{tag}.log")
        )
    _wait_ready(server)
    return server


def _wait_ready(server: ApiServer) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.processes[0].popen.poll() is not None:
            raise RuntimeError(f"the API process exited at start-up:\n{server.logs()}")
        try:
            if httpx.get(f"{server.base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"the API did not become ready in {SERVER_START_TIMEOUT} s:\n{server.logs()}")


@pytest.fixture(scope="session")
def api(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(backend, tmp_path_factory.mktemp(f"logs-{backend.kind}"))
    yield server
    server.stop()
    # A 500 is always a bug: no test may leave an unhandled error in the logs.
    assert "unhandled error request_id=" not in server.logs(), server.logs()[-5000:]


# --- organizations and tokens ---------------------------------------------------------


@dataclass
class Org:
    """A fresh organization with one token per scope set."""

    api: ApiServer
    name: str
    tokens: dict[str, str]

    def client(self, scopes: str = "rw") -> httpx.Client:
        return self.api.client(self.tokens[scopes])


def make_org(api: ApiServer, prefix: str = "org") -> Org:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    scope_sets = {"rw": {"read", "write"}, "read": {"read"}, "write": {"write"},
                  "admin": {"read", "write", "admin"}}

    async def setup(db: Database) -> dict[str, str]:
        await identity.create_organization(db, name)
        return {
            key: await identity.create_token(db, name, name=key, scopes=frozenset(scopes))
            for key, scopes in scope_sets.items()
        }

    return Org(api, name, api.backend.run(setup))


@pytest.fixture
def org(api: ApiServer) -> Org:
    return make_org(api)


@pytest.fixture
def other_org(api: ApiServer) -> Org:
    return make_org(api, "other")
