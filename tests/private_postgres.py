"""A PostgreSQL server of the tests' own, for tests that stop and start the server.

The server runs from the installed binaries (``initdb`` and ``pg_ctl``, found in
``MYCLOUD_TEST_POSTGRES_BIN`` or the newest ``/usr/lib/postgresql/*/bin``), with its
data directory and socket in a fresh temporary directory and its TCP port on
127.0.0.1 picked free. It trusts local connections, so the URL needs no password.
PostgreSQL refuses to run as root; as root the binaries run as the ``postgres``
system user, which owns the temporary directory.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

SYSTEM_USER = "postgres"
START_TIMEOUT = 30


def find_bin_dir() -> Path | None:
    """Return the directory of initdb and pg_ctl, or None when none is installed."""
    configured = os.environ.get("MYCLOUD_TEST_POSTGRES_BIN")
    if configured:
        return Path(configured)
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda path: int(path.parent.name)
        if path.parent.name.isdigit() else 0,
    )
    for candidate in reversed(candidates):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, stopped and started at will."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.port = port
        self.data_dir = root / "data"
        self.log_path = root / "server.log"

    @property
    def admin_url(self) -> str:
        return f"postgresql://{SYSTEM_USER}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://{SYSTEM_USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = START_TIMEOUT) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        as_user: dict[str, Any] = {"user": SYSTEM_USER} if os.geteuid() == 0 else {}
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.root, **as_user
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}\n"
                f"{self.server_log()}"
            )

    def server_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data_dir), "-U", SYSTEM_USER, "--auth=trust",
                  "--no-sync", "--no-instructions", "-E", "UTF8")

    def start(self) -> None:
        # Unix sockets go to the temporary directory; TCP on the chosen port only.
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root} -c fsync=off -c max_connections=100"
        )
        self._run("pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path),
                  "-o", options, "-w", "-t", str(START_TIMEOUT))

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode, "-w",
                  "-t", str(START_TIMEOUT))

    def is_running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    async def execute(self, statement: str) -> None:
        connection = await asyncpg.connect(self.admin_url, timeout=5)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()


@contextmanager
def private_postgres(bin_dir: Path, port: int) -> Iterator[PrivatePostgres]:
    """Initialize and start a cluster; stop it and delete its files afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mycloud-pg-"))
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SYSTEM_USER)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PrivatePostgres(bin_dir, root, port)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.is_running():
            try:
                server.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)
