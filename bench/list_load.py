"""Load-test GET /v1/instances with wrk and compare it with the in-memory ceiling.

Usage (after bench/generate_dataset.py has loaded the databases):
    python bench/list_load.py \
        --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_1m \
        --tokens-file bench/tokens-1m.json \
        --small-database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_small \
        --small-tokens-file bench/tokens-small.json \
        --workers 2 --duration 10 --connections 1,32

For each scenario (page 1, a deep page with its marker at 90% of the list, the last
full page, each filter alone, two filters, limit=1000) and each connection count,
it runs wrk against the real service started the way production runs it
(``mycloud-compute serve --workers N`` on PostgreSQL, or granian with
``--server granian``), then against bench/ceiling_app.py serving the same bytes.
It reports requests per second, p50 and p99 latency, the CPU time per request of
the API processes and of their PostgreSQL backends (from /proc, before and after
each run), and the ratio to the ceiling. ``--explain`` prints the query plan of each
scenario's statement instead. With ``--small-database-url`` it also runs
page 1 on a small dataset, for the 10k-versus-1M comparison. It ends with the
Markdown table for docs/benchmarks.md and a summary against the targets.
wrk comes from Debian's package (``apt-get install wrk``).
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
from urllib.parse import urlencode

import asyncpg
import httpx
from procstat import cpu_seconds, free_port, process_tree

BENCH_DIR = Path(__file__).resolve().parent


@dataclass
class Result:
    scenario: str
    target: str
    connections: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    db_cpu_us_per_request: float
    body_bytes: int
    errors: int
    dataset: str = "large"


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
    latencies = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", output, re.MULTILINE))
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "requests": requests,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "p50": _milliseconds(latencies["50"]),
        "p90": _milliseconds(latencies["90"]),
        "p99": _milliseconds(latencies["99"]),
        "errors": int(errors.group(1)) if errors else 0,
    }


async def scenarios(database_url: str) -> dict[str, str]:
    """Query strings of each scenario, with markers at 90% and at the last full page."""
    connection = await asyncpg.connect(database_url)
    try:
        organization_id = await connection.fetchval(
            "SELECT id FROM organizations WHERE name = 'bench-big'"
        )
        visible = await connection.fetchval(
            "SELECT count(*) FROM instances WHERE organization_id = $1 AND status <> 'DELETED'",
            organization_id,
        )

        async def marker_at(position: int) -> str:
            value = await connection.fetchval(
                "SELECT id FROM instances WHERE organization_id = $1 AND status <> 'DELETED' "
                "ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
                organization_id, position,
            )
            return str(value)

        # The deepest page that is still full: page 5,000 when the list is long enough.
        last_page = min(5000, visible // 20)
        flavor_id, image_id = await connection.fetchrow(
            "SELECT flavor_id, image_id FROM instances WHERE organization_id = $1 LIMIT 1",
            organization_id,
        )
        # An exact name that one listed instance has.
        exact_name = await connection.fetchval(
            "SELECT name FROM instances WHERE organization_id = $1 AND status <> 'DELETED' "
            "ORDER BY created_at DESC, id DESC OFFSET 100 LIMIT 1",
            organization_id,
        )
        deep_marker = await marker_at(int(visible * 0.9))
        last_marker = await marker_at((last_page - 1) * 20 - 1)
    finally:
        await connection.close()
    return {
        "page1": "",
        "deep_page_90pct": urlencode({"marker": deep_marker}),
        f"page_{last_page}": urlencode({"marker": last_marker}),
        "name_prefix": urlencode({"name": "web-*"}),
        "name_exact": urlencode({"name": exact_name}),
        "status": urlencode({"status": "SHUTOFF"}),
        "tags": urlencode({"tags": "production"}),
        "flavor_id": urlencode({"flavor_id": str(flavor_id)}),
        "image_id": urlencode({"image_id": str(image_id)}),
        "status_and_tags": urlencode({"status": "ACTIVE", "tags": "web,production"}),
        "limit_1000": urlencode({"limit": "1000"}),
    }


async def database_backends(database_url: str) -> list[int]:
    """Process ids of the PostgreSQL backends connected to the database, except ours."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
    finally:
        await connection.close()
    return [row["pid"] for row in rows]


def backend_cpu(database_url: str) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in asyncio.run(database_backends(database_url))}


async def explain(database_url: str, token: str, queries: dict[str, str]) -> None:
    """Print EXPLAIN (ANALYZE, BUFFERS) of each scenario's page statement."""
    from mycloud_compute.persistence.instances import _shape_and_arguments, page_statement
    from mycloud_compute.services.identity import hash_secret
    from mycloud_compute.services.instance_pages import crn_prefix
    from mycloud_compute.services.instances import INSTANCE_FILTERS, _filters_from
    from mycloud_compute.services.listing import parse_list_query

    connection = await asyncpg.connect(database_url)
    try:
        organization_id = await connection.fetchval(
            "SELECT id FROM organizations WHERE name = 'bench-big'"
        )
        for name, query_string in queries.items():
            query = parse_list_query(query_string.encode(), INSTANCE_FILTERS)
            shape, arguments = _shape_and_arguments(
                _filters_from(query), query.marker, hash_secret(token)
            )
            plan = await connection.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + page_statement(shape),
                organization_id, query.limit, crn_prefix("spo1"), *arguments,
            )
            print(f"\n===== {name}: {query_string or '(no parameters)'}")
            print("\n".join(row[0] for row in plan), flush=True)
    finally:
        await connection.close()


def server_command(server: str, port: int, workers: int) -> list[str]:
    if server == "granian":
        return [str(Path(sys.executable).with_name("granian")), "--interface", "asgi",
                "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--loop", "uvloop", "--http", "1", "--no-ws", "--log-level", "warning",
                "mycloud_compute.api.asgi:app"]
    return [sys.executable, "-m", "mycloud_compute.cli.admin", "serve", "--port", str(port),
            "--workers", str(workers)]


def run_service(args: argparse.Namespace, database_url: str, token: str,
                queries: dict[str, str], connection_counts: list[int], dataset: str,
                bodies: dict[str, bytes]) -> tuple[list[Result], float]:
    """Load every scenario on one service; return the results and the largest process RSS."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # A pool as large as the requests one process serves at once: past the pool size
    # SQLAlchemy opens overflow connections and closes them again on return, so a
    # smaller pool would reconnect to PostgreSQL during the whole run.
    pool_size = max(connection_counts) // args.workers + 2
    env = {"MYCLOUD_DATABASE_URL": database_url, "MYCLOUD_LOG_LEVEL": "WARNING",
           "MYCLOUD_RUN_WORKER": "no", "MYCLOUD_RATE_LIMIT_PER_SECOND": "0",
           "MYCLOUD_DATABASE_POOL_SIZE": str(max(pool_size, 10))}
    results: list[Result] = []
    peak_rss = 0.0
    server = start(server_command(args.server, port, args.workers), env, f"{base}/healthz")
    try:
        for name, query in queries.items():
            url = f"{base}/v1/instances" + (f"?{query}" if query else "")
            response = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
            response.raise_for_status()
            bodies[name] = response.content
            for connections in connection_counts:
                result = measure(name, "service", url, token, connections, args.duration,
                                 server.pid, len(bodies[name]), database_url)
                result.dataset = dataset
                results.append(result)
                peak_rss = max(peak_rss, largest_rss(process_tree(server.pid)))
                print(json.dumps(asdict(result)), flush=True)
    finally:
        stop(server)
    return results, peak_rss


def largest_rss(pids: list[int]) -> float:
    return max((rss_megabytes([pid]) for pid in pids), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--tokens-file", default=str(BENCH_DIR / "tokens.json"))
    parser.add_argument("--small-database-url", default="",
                        help="A small dataset for the 10k-versus-1M comparison of page 1.")
    parser.add_argument("--small-tokens-file", default="")
    parser.add_argument("--workers", type=int, default=2, help="API processes.")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                        help="uvicorn: mycloud-compute serve; granian: the same app under granian.")
    parser.add_argument("--duration", type=int, default=10, help="Seconds per wrk run.")
    parser.add_argument("--connections", default="1,32", help="Comma-separated connection counts.")
    parser.add_argument("--only", default="",
                        help="Comma-separated scenario names to run; page_N names the deepest page.")
    parser.add_argument("--no-ceiling", action="store_true", help="Skip the in-memory ceiling runs.")
    parser.add_argument("--output", default="", help="Write the results as JSON to this file.")
    parser.add_argument("--explain", action="store_true",
                        help="Only print the query plan of each scenario's statement, with no load.")
    args = parser.parse_args()

    token = json.loads(Path(args.tokens_file).read_text())["big"]
    queries = asyncio.run(scenarios(args.database_url))
    if args.only:
        queries = {name: query for name, query in queries.items()
                   if name in args.only.split(",") or (name.startswith("page_") and "page_N" in args.only)}
    connection_counts = [int(count) for count in args.connections.split(",")]
    if args.explain:
        asyncio.run(explain(args.database_url, token, queries))
        return

    bodies: dict[str, bytes] = {}
    results, peak_rss = run_service(args, args.database_url, token, queries, connection_counts,
                                    "large", bodies)
    print(f"largest API process RSS under load: {peak_rss:.0f} MB", flush=True)

    if args.small_database_url:
        small_token = json.loads(Path(args.small_tokens_file).read_text())["big"]
        small, small_rss = run_service(args, args.small_database_url, small_token, {"page1": ""},
                                       connection_counts, "small", {})
        results += small
        peak_rss = max(peak_rss, small_rss)

    if not args.no_ceiling:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
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
                                           len(bodies[name]), ""))
                    print(json.dumps(asdict(results[-1])), flush=True)
            finally:
                stop(ceiling)
                body_file.unlink()

    print_table(results)
    print_summary(results, peak_rss)
    if args.output:
        Path(args.output).write_text(json.dumps([asdict(result) for result in results], indent=1))


def measure(name: str, target: str, url: str, token: str, connections: int, duration: int,
            server_pid: int, body_bytes: int, database_url: str) -> Result:
    pids = process_tree(server_pid)
    database_before = backend_cpu(database_url) if database_url else {}
    cpu_before = cpu_seconds(pids)
    stats = run_wrk(url, token, connections, duration)
    cpu_used = cpu_seconds(pids) - cpu_before
    database_used = 0.0
    if database_url:
        database_used = sum(cpu - database_before.get(pid, 0.0)
                            for pid, cpu in backend_cpu(database_url).items())
    requests = max(stats["requests"], 1)
    return Result(
        scenario=name,
        target=target,
        connections=connections,
        requests_per_second=stats["rps"],
        p50_ms=stats["p50"],
        p99_ms=stats["p99"],
        cpu_us_per_request=cpu_used / requests * 1e6,
        db_cpu_us_per_request=database_used / requests * 1e6,
        body_bytes=body_bytes,
        errors=int(stats["errors"]),
    )


def print_table(results: list[Result]) -> None:
    ceiling = {(r.scenario, r.connections): r for r in results if r.target == "ceiling"}
    print("\n| data | scenario | conns | req/s | p50 ms | p99 ms | API CPU µs/req | "
          "PostgreSQL CPU µs/req | body KB | % of ceiling | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        if result.target != "service":
            continue
        top = ceiling.get((result.scenario, result.connections))
        ratio = f"{100 * result.requests_per_second / top.requests_per_second:.0f}%" if top else "-"
        print(f"| {result.dataset} | {result.scenario} | {result.connections} | "
              f"{result.requests_per_second:,.0f} | {result.p50_ms:.1f} | {result.p99_ms:.1f} | "
              f"{result.cpu_us_per_request:,.0f} | {result.db_cpu_us_per_request:,.0f} | "
              f"{result.body_bytes / 1024:.1f} | {ratio} | {result.errors} |")
    print("\n| ceiling scenario | conns | req/s | p50 ms | p99 ms | CPU µs/req |")
    print("|---|---|---|---|---|---|")
    for result in ceiling.values():
        print(f"| {result.scenario} | {result.connections} | {result.requests_per_second:,.0f} | "
              f"{result.p50_ms:.1f} | {result.p99_ms:.1f} | {result.cpu_us_per_request:,.0f} |")


FILTERS = ("name_prefix", "name_exact", "status", "tags", "flavor_id", "image_id")


def print_summary(results: list[Result], peak_rss: float) -> None:
    """Print each target with the measured value."""
    service = {(r.dataset, r.scenario, r.connections): r for r in results if r.target == "service"}
    ceiling = {(r.scenario, r.connections): r for r in results if r.target == "ceiling"}
    busiest = max((c for _, _, c in service), default=0)
    print(f"\nTargets (service at {busiest} connections unless stated):")
    for name in FILTERS:
        result = service.get(("large", name, busiest))
        if result:
            print(f"- {name}: {result.requests_per_second:,.0f} req/s (target >= 3,000), "
                  f"p99 {result.p99_ms:.1f} ms (target <= 20)")
    page1 = service.get(("large", "page1", busiest))
    top = ceiling.get(("page1", busiest))
    if page1 and top:
        print(f"- page 1 / ceiling: {100 * page1.requests_per_second / top.requests_per_second:.0f}% "
              "(target >= 40%)")
    for connections in sorted({c for _, _, c in service}):
        large = service.get(("large", "page1", connections))
        small = service.get(("small", "page1", connections))
        if large and small:
            print(f"- p50 1M / 10k at {connections} connection(s): "
                  f"{large.p50_ms:.2f} / {small.p50_ms:.2f} ms = {large.p50_ms / small.p50_ms:.2f}x "
                  "(target <= 1.2x)")
        deep = next((r for (d, s, c), r in service.items()
                     if d == "large" and s.startswith("page_") and c == connections), None)
        if large and deep:
            print(f"- p50 {deep.scenario} / page 1 at {connections} connection(s): "
                  f"{deep.p50_ms:.2f} / {large.p50_ms:.2f} ms = {deep.p50_ms / large.p50_ms:.2f}x "
                  "(target <= 1.2x)")
    print(f"- largest API process RSS under load: {peak_rss:.0f} MB (target <= 200 MB)")


if __name__ == "__main__":
    main()
