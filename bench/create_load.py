"""Load-test POST /v1/instances with wrk: accepted creates per second.

Usage:
    python bench/create_load.py --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_create \
        --workers 2 --duration 10 --connections 1,32

It drops and re-creates the database named in ``--database-url`` (on the server at
that URL), migrates it, creates ``--organizations`` organizations with a write token
each, and starts the service the way production runs it: ``mycloud-compute serve
--workers N`` on PostgreSQL, with no embedded worker, so the queued create tasks
stay PENDING. For each connection count, wrk (Debian's package, ``apt-get install
wrk``) sends POST /v1/instances with a JSON body, a unique name and a unique
Idempotency-Key per request, spreading the requests over the organizations' tokens.
The per-token rate limit is turned off (``MYCLOUD_RATE_LIMIT_PER_SECOND=0``), because
otherwise most requests would get a 429.
It reports requests per second, p50 and p99 latency, the count of each status, and
the CPU time per request of the API processes and of the database's PostgreSQL
backends (the server must run on this machine), read from /proc before and after
each run.
At the end it checks that the database holds one instance and one PENDING task per
202 response.

``--profile FILE`` records the API processes with py-spy (the ``bench`` extra)
during the last run and writes its collapsed stacks (the input format of
flamegraph.pl and speedscope) to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from procstat import cpu_seconds, free_port, process_tree

from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.migrate import upgrade
from mycloud_compute.services import identity

BENCH_DIR = Path(__file__).resolve().parent
FLAVOR_ID = str(catalog_id("flavor", "m1.small"))
IMAGE_ID = str(catalog_id("image", "Ubuntu 22.04 LTS"))

# wrk script: each request is a create with a unique name and Idempotency-Key, and the
# requests rotate over the tokens. Each thread counts statuses, and done() prints a JSON summary.
WRK_SCRIPT = """
local tokens = {%(tokens)s}
local run = "%(run)s"
local threads = {}
local thread_number = 0

function setup(thread)
  thread_number = thread_number + 1
  thread:set("number", thread_number)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  statuses = {}
end

function request()
  counter = counter + 1
  local name = string.format("bench-%%s-%%d-%%d", run, number, counter)
  local body = string.format(
    '{"name": "%%s", "flavor_id": "%(flavor)s", "image_id": "%(image)s", ' ..
    '"tags": ["bench", "web"], "metadata": {"role": "web"}}', name)
  local headers = {
    ["Authorization"] = "Bearer " .. tokens[(counter + number) %% #tokens + 1],
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = name,
  }
  return wrk.format("POST", "/v1/instances", headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local thread_statuses = thread:get("statuses")
    for status, count in pairs(thread_statuses) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(counts) do
    table.insert(parts, string.format('"%%s": %%d', status, count))
  end
  io.write(string.format(
    'WRK_RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, ' ..
    '"socket_errors": %%d, "statuses": {%%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    table.concat(parts, ", ")))
end
"""


@dataclass
class Result:
    connections: int
    requests: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    socket_errors: int
    cpu_us_per_request: float
    database_cpu_us_per_request: float


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


async def backend_pids(database_url: str) -> list[int]:
    """Return the process ids of the PostgreSQL backends connected to the URL's database."""
    name = urlsplit(database_url).path.lstrip("/")
    connection = await asyncpg.connect(server_url(database_url, "postgres"))
    try:
        rows = await connection.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    finally:
        await connection.close()
    return [int(row["pid"]) for row in rows]


def database_cpu_seconds(database_url: str, before: dict[int, float]) -> tuple[float, dict[int, float]]:
    """Return the CPU seconds the database's backends used since ``before``, and the new readings.

    Backends started since ``before`` count from 0. The server must run on this machine.
    """
    now = cpu_by_pid(asyncio.run(backend_pids(database_url)))
    return sum(value - before.get(pid, 0.0) for pid, value in now.items()), now


def server_url(database_url: str, database: str) -> str:
    """Return the URL with another database name (same server and user)."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def recreate_database(database_url: str) -> None:
    """Drop and create the database named in the URL, then migrate it."""
    name = urlsplit(database_url).path.lstrip("/")
    if not re.fullmatch(r"[a-z0-9_]+", name) or name in ("postgres", "template0", "template1"):
        raise SystemExit(
            f"database {name!r} is not a benchmark database; pass a dedicated one with --database-url "
            "(it is dropped and re-created)"
        )
    connection = await asyncpg.connect(server_url(database_url, "postgres"))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    await asyncio.to_thread(upgrade, database_url)


async def create_organizations(database_url: str, count: int) -> list[str]:
    """Create ``count`` organizations with a read-write token each; return the tokens."""
    db = Database(database_url, pool_size=2)
    tokens = []
    try:
        for number in range(count):
            name = f"bench-org-{number:04d}"
            await identity.create_organization(db, name)
            tokens.append(
                await identity.create_token(db, name, name="bench", scopes=frozenset({"read", "write"}))
            )
    finally:
        await db.dispose()
    return tokens


def start_service(args: list[str], env: dict[str, str], health_url: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(health_url, timeout=1).status_code < 500:
                time.sleep(1)  # let every API process finish starting
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    stop_service(process)
    raise RuntimeError(f"{args} did not start")


def stop_service(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def service_environment(database_url: str, pool_size: int) -> dict[str, str]:
    """Return the settings of the benchmarked processes: no embedded worker, no per-token rate limit."""
    return {"MYCLOUD_DATABASE_URL": database_url, "MYCLOUD_LOG_LEVEL": "WARNING",
            "MYCLOUD_RUN_WORKER": "no", "MYCLOUD_RATE_LIMIT_PER_SECOND": "0",
            "MYCLOUD_DATABASE_POOL_SIZE": str(pool_size)}


def serve_command(port: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "mycloud_compute.cli.admin", "serve", "--port", str(port),
            "--workers", str(workers)]


def run_wrk(base_url: str, script: Path, connections: int, duration: int) -> dict[str, object]:
    threads = min(connections, 2)
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "-s", str(script), base_url],
        check=True, capture_output=True, text=True,
    ).stdout
    match = re.search(r"^WRK_RESULT (.*)$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{output}")
    return dict(json.loads(match.group(1)))


def start_profiler(pid: int, output: str, duration: int) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "--subprocesses", "--duration", str(duration),
         "--rate", "200", "--format", "raw", "--output", output, "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def measure(base_url: str, script: Path, connections: int, duration: int, server_pid: int,
            profile: str | None, database_url: str) -> Result:
    pids = process_tree(server_pid)
    _, database_before = database_cpu_seconds(database_url, {})
    profiler = start_profiler(server_pid, profile, duration) if profile else None
    cpu_before = cpu_seconds(pids)
    stats = run_wrk(base_url, script, connections, duration)
    cpu_used = cpu_seconds(pids) - cpu_before
    database_used, _ = database_cpu_seconds(database_url, database_before)
    if profiler is not None:
        profiler.wait(60)
    requests = int(stats["requests"])  # type: ignore[call-overload]
    return Result(
        connections=connections,
        requests=requests,
        requests_per_second=requests / (int(stats["duration_us"]) / 1e6),  # type: ignore[call-overload]
        p50_ms=int(stats["p50_us"]) / 1000,  # type: ignore[call-overload]
        p99_ms=int(stats["p99_us"]) / 1000,  # type: ignore[call-overload]
        statuses=dict(stats["statuses"]),  # type: ignore[call-overload]
        socket_errors=int(stats["socket_errors"]),  # type: ignore[call-overload]
        cpu_us_per_request=cpu_used / max(requests, 1) * 1e6,
        database_cpu_us_per_request=database_used / max(requests, 1) * 1e6,
    )


async def check_database(database_url: str, accepted: int, in_flight: int) -> str:
    """Compare the stored instances and PENDING create tasks with the 202 responses.

    Up to ``in_flight`` more may be stored: requests that wrk abandoned when a run ended.
    """
    connection = await asyncpg.connect(database_url)
    try:
        instances = await connection.fetchval("SELECT count(*) FROM instances")
        pending = await connection.fetchval(
            "SELECT count(*) FROM tasks WHERE action = 'create' AND state = 'PENDING'"
        )
        keys = await connection.fetchval("SELECT count(*) FROM idempotency_keys")
    finally:
        await connection.close()
    consistent = instances == pending == keys and 0 <= instances - accepted <= in_flight
    verdict = "ok" if consistent else "MISMATCH"
    return (f"database check {verdict}: 202 responses={accepted} instances={instances} "
            f"pending create tasks={pending} idempotency keys={keys}")


def print_table(results: list[Result]) -> None:
    print("\n| connections | creates/s (202) | p50 ms | p99 ms | statuses | API CPU µs/request "
          "| PostgreSQL CPU µs/request |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        accepted = result.statuses.get("202", 0) / max(result.requests, 1) * result.requests_per_second
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(result.statuses.items()))
        print(f"| {result.connections} | {accepted:,.0f} | {result.p50_ms:.1f} | {result.p99_ms:.1f} | "
              f"{statuses} | {result.cpu_us_per_request:,.0f} | {result.database_cpu_us_per_request:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/mycloud_bench_create",
                        help="A dedicated database: it is dropped and re-created.")
    parser.add_argument("--workers", type=int, default=2, help="API processes.")
    parser.add_argument("--duration", type=int, default=10, help="Seconds per wrk run.")
    parser.add_argument("--connections", default="1,32", help="Comma-separated connection counts.")
    parser.add_argument("--organizations", type=int, default=20,
                        help="Organizations whose tokens the requests rotate over.")
    parser.add_argument("--profile", default="", help="Write py-spy collapsed stacks of the last run here.")
    parser.add_argument("--output", default="", help="Write the results as JSON to this file.")
    args = parser.parse_args()

    asyncio.run(recreate_database(args.database_url))
    tokens = asyncio.run(create_organizations(args.database_url, args.organizations))
    connection_counts = [int(count) for count in args.connections.split(",")]

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    # As in list_load.py: a pool as large as the requests one process serves at once,
    # so that no request opens an overflow connection to PostgreSQL.
    env = service_environment(args.database_url, max(max(connection_counts) // args.workers + 2, 10))
    results: list[Result] = []
    server = start_service(serve_command(port, args.workers), env, f"{base_url}/healthz")
    try:
        for index, connections in enumerate(connection_counts):
            script = BENCH_DIR / f".create-load-{os.getpid()}.lua"
            script.write_text(WRK_SCRIPT % {
                "tokens": ", ".join(f'"{token}"' for token in tokens),
                "run": f"{os.getpid()}-{connections}-{index}",
                "flavor": FLAVOR_ID,
                "image": IMAGE_ID,
            })
            try:
                last = index == len(connection_counts) - 1
                results.append(measure(base_url, script, connections, args.duration, server.pid,
                                       args.profile if last and args.profile else None,
                                       args.database_url))
            finally:
                script.unlink()
            print(json.dumps(asdict(results[-1])), flush=True)
    finally:
        stop_service(server)

    print_table(results)
    accepted = sum(result.statuses.get("202", 0) for result in results)
    print(asyncio.run(check_database(args.database_url, accepted, sum(connection_counts))))
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(result) for result in results], indent=1))


if __name__ == "__main__":
    main()
