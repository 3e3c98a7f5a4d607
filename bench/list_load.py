"""Load-test GET /v1/instances with wrk and compare it with the in-memory ceiling.

Usage (after bench/generate_dataset.py has loaded the database):
    python bench/list_load.py --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench \
        --tokens-file bench/tokens.json --workers 2 --duration 10 --connections 1,32

For each scenario (page 1, a deep page, each filter, two filters, limit=1000) and
each connection count, it runs wrk against the real service started the way
production runs it (``mycloud-compute serve --workers N`` on PostgreSQL), then
against bench/ceiling_app.py serving the same bytes. It reports requests per second,
p50 and p99 latency, and the server's CPU time per request, read from /proc for the
server processes (parent and children) before and after each run. wrk comes from
Debian's package (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlencode

import asyncpg
import httpx

BENCH_DIR = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    scenario: str
    target: str
    connections: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    body_bytes: int
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids.extend(process_tree(int(child)))
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def rss_megabytes(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            continue
    return total / 1024


def start(args: list[str], env: dict[str, str], url: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                time.sleep(1)  # let every worker process finish starting
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{args} did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


def _milliseconds(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, token: str, connections: int, duration: int) -> dict[str, float]:
    threads = min(connections, 2)
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
         "-H", f"Authorization: Bearer {token}", url],
        check=True, capture_output=True, text=True,
    ).stdout
    latencies = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50": _milliseconds(latencies["50"]),
        "p99": _milliseconds(latencies["99"]),
        "errors": int(errors.group(1)) if errors else 0,
    }


async def scenarios(database_url: str) -> dict[str, str]:
    """Query strings of each scenario, with a marker at 90% of the big organization."""
    connection = await asyncpg.connect(database_url)
    try:
        organization_id = await connection.fetchval(
            "SELECT id FROM organizations WHERE name = 'bench-big'"
        )
        visible = await connection.fetchval(
            "SELECT count(*) FROM instances WHERE organization_id = $1 AND status <> 'DELETED'",
            organization_id,
        )
        deep_marker = await connection.fetchval(
            "SELECT id FROM instances WHERE organization_id = $1 AND status <> 'DELETED' "
            "ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
            organization_id, int(visible * 0.9),
        )
        flavor_id, image_id = await connection.fetchrow(
            "SELECT flavor_id, image_id FROM instances WHERE organization_id = $1 LIMIT 1",
            organization_id,
        )
    finally:
        await connection.close()
    return {
        "page1": "",
        "deep_page_90pct": urlencode({"marker": str(deep_marker)}),
        "name_prefix": urlencode({"name": "web-*"}),
        "name_exact": urlencode({"name": "web-server-004242"}),
        "status": urlencode({"status": "SHUTOFF"}),
        "tags": urlencode({"tags": "production"}),
        "flavor_id": urlencode({"flavor_id": str(flavor_id)}),
        "image_id": urlencode({"image_id": str(image_id)}),
        "status_and_tags": urlencode({"status": "ACTIVE", "tags": "web,production"}),
        "limit_1000": urlencode({"limit": "1000"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--tokens-file", default=str(BENCH_DIR / "tokens.json"))
    parser.add_argument("--workers", type=int, default=2, help="API processes.")
    parser.add_argument("--duration", type=int, default=10, help="Seconds per wrk run.")
    parser.add_argument("--connections", default="1,32", help="Comma-separated connection counts.")
    parser.add_argument("--only", default="", help="Comma-separated scenario names to run.")
    parser.add_argument("--no-ceiling", action="store_true", help="Skip the in-memory ceiling runs.")
    parser.add_argument("--output", default="", help="Write the results as JSON to this file.")
    args = parser.parse_args()

    token = json.loads(Path(args.tokens_file).read_text())["big"]
    queries = asyncio.run(scenarios(args.database_url))
    if args.only:
        queries = {name: queries[name] for name in args.only.split(",")}
    connection_counts = [int(count) for count in args.connections.split(",")]

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"MYCLOUD_DATABASE_URL": args.database_url, "MYCLOUD_LOG_LEVEL": "WARNING",
           "MYCLOUD_RUN_WORKER": "no"}
    serve = [sys.executable, "-m", "mycloud_compute.cli.admin", "serve", "--port", str(port),
             "--workers", str(args.workers)]
    results: list[Result] = []
    bodies: dict[str, bytes] = {}

    server = start(serve, env, f"{base}/healthz")
    try:
        for name, query in queries.items():
            url = f"{base}/v1/instances" + (f"?{query}" if query else "")
            bodies[name] = httpx.get(url, headers={"Authorization": f"Bearer {token}"}).content
            for connections in connection_counts:
                results.append(measure(name, "service", url, token, connections, args.duration,
                                       server.pid, len(bodies[name])))
                print(json.dumps(asdict(results[-1])), flush=True)
        print(f"service RSS after load: {rss_megabytes(process_tree(server.pid)):.0f} MB", flush=True)
    finally:
        stop(server)

    if not args.no_ceiling:
        for name in queries:
            body_file = BENCH_DIR / f".ceiling-{name}.json"
            body_file.write_bytes(bodies[name])
            ceiling = start(
                [sys.executable, "-m", "uvicorn", "ceiling_app:app", "--app-dir", str(BENCH_DIR),
                 "--port", str(port), "--workers", str(args.workers), "--no-access-log",
                 "--log-level", "warning"],
                {"MYCLOUD_CEILING_BODY": str(body_file)},
                f"{base}/healthz",
            )
            try:
                for connections in connection_counts:
                    results.append(measure(name, "ceiling", f"{base}/v1/instances", token,
                                           connections, args.duration, ceiling.pid,
                                           len(bodies[name])))
                    print(json.dumps(asdict(results[-1])), flush=True)
            finally:
                stop(ceiling)
                body_file.unlink()

    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(result) for result in results], indent=1))


def measure(name: str, target: str, url: str, token: str, connections: int, duration: int,
            server_pid: int, body_bytes: int) -> Result:
    pids = process_tree(server_pid)
    cpu_before = cpu_seconds(pids)
    stats = run_wrk(url, token, connections, duration)
    cpu_used = cpu_seconds(pids) - cpu_before
    return Result(
        scenario=name,
        target=target,
        connections=connections,
        requests_per_second=stats["rps"],
        p50_ms=stats["p50"],
        p99_ms=stats["p99"],
        cpu_us_per_request=cpu_used / max(stats["requests"], 1) * 1e6,
        body_bytes=body_bytes,
        errors=int(stats["errors"]),
    )


def print_table(results: list[Result]) -> None:
    ceiling = {(r.scenario, r.connections): r for r in results if r.target == "ceiling"}
    print("\n| scenario | conns | req/s | p50 ms | p99 ms | CPU µs/req | body KB | % of ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        if result.target != "service":
            continue
        top = ceiling.get((result.scenario, result.connections))
        ratio = f"{100 * result.requests_per_second / top.requests_per_second:.0f}%" if top else "-"
        print(f"| {result.scenario} | {result.connections} | {result.requests_per_second:,.0f} | "
              f"{result.p50_ms:.1f} | {result.p99_ms:.1f} | {result.cpu_us_per_request:,.0f} | "
              f"{result.body_bytes / 1024:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
