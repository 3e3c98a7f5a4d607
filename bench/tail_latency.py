"""Find where the p99 of GET /v1/instances goes: garbage collection and CPU queueing.

Usage (after bench/generate_dataset.py has loaded the 1M dataset):
    python bench/tail_latency.py \
        --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_1m \
        --tokens-file bench/tokens-1m.json --gc-thresholds 0,50000 --repeat 2

For each value of MYCLOUD_GC_GEN0_THRESHOLD (0 leaves Python's collector as it is),
it starts ``mycloud-compute serve --workers N`` on PostgreSQL with bench/gc_probe on
PYTHONPATH and runs wrk on page 1 at 32 connections. It reports the latency
percentiles and, per request, the API processes' CPU time and the time they spent
runnable but waiting for a core (``/proc/PID/task/*/schedstat``). It also counts the
garbage collections of the API processes per generation, with the longest pause.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from list_load import run_wrk, start, stop
from procstat import free_port, process_tree

BENCH_DIR = Path(__file__).resolve().parent


def scheduler_nanoseconds(pids: list[int]) -> tuple[int, int]:
    """Return the on-CPU and run-queue-wait nanoseconds of every thread of ``pids``."""
    on_cpu = waiting = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "schedstat").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            on_cpu += int(fields[0])
            waiting += int(fields[1])
    return on_cpu, waiting


def collector_pauses(folder: Path, pids: list[int]) -> dict[int, list[float]]:
    """Return the pauses (ms) of the API processes per generation, from the probe files."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for pid in pids:
        path = folder / f"gc-{pid}.json"
        if path.exists():
            for generation, values in json.loads(path.read_text())["pauses_ms"].items():
                pauses[int(generation)].extend(values)
    return pauses


def measure(args: argparse.Namespace, token: str, threshold: int) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        env = {"MYCLOUD_DATABASE_URL": args.database_url, "MYCLOUD_LOG_LEVEL": "WARNING",
               "MYCLOUD_RUN_WORKER": "no", "MYCLOUD_RATE_LIMIT_PER_SECOND": "0",
               "MYCLOUD_DATABASE_POOL_SIZE": str(max(args.connections // args.workers + 2, 10)),
               "MYCLOUD_GC_GEN0_THRESHOLD": str(threshold),
               "MYCLOUD_BENCH_GC_DIR": folder,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR / "gc_probe"),
                                                          os.environ.get("PYTHONPATH", "")]))}
        command = [sys.executable, "-m", "mycloud_compute.cli.admin", "serve", "--port", str(port),
                   "--workers", str(args.workers)]
        server = start(command, env, f"{base}/healthz")
        try:
            url = f"{base}/v1/instances"
            httpx.get(url, headers={"Authorization": f"Bearer {token}"}).raise_for_status()
            run_wrk(url, token, args.connections, 2)  # warm the pools and caches
            api = process_tree(server.pid)[1:]  # the workers; the parent only supervises
            before_pauses = collector_pauses(Path(folder), api)
            cpu_before, wait_before = scheduler_nanoseconds(api)
            result = run_wrk(url, token, args.connections, args.duration)
            cpu_after, wait_after = scheduler_nanoseconds(api)
            time.sleep(1.5)  # the probe writes its file once a second
            after_pauses = collector_pauses(Path(folder), api)
        finally:
            stop(server)
    requests = result["requests"]
    result["api_cpu_us"] = (cpu_after - cpu_before) / 1000 / requests
    result["api_wait_us"] = (wait_after - wait_before) / 1000 / requests
    for generation in (0, 1, 2):
        pauses = after_pauses[generation][len(before_pauses[generation]):]
        result[f"gen{generation}_count"] = len(pauses)
        result[f"gen{generation}_max_ms"] = max(pauses, default=0.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--tokens-file", default=str(BENCH_DIR / "tokens-1m.json"))
    parser.add_argument("--workers", type=int, default=2, help="API processes.")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10, help="Seconds per wrk run.")
    parser.add_argument("--gc-thresholds", default="0,50000",
                        help="Comma-separated MYCLOUD_GC_GEN0_THRESHOLD values; 0 = Python's default.")
    parser.add_argument("--repeat", type=int, default=1, help="Runs per threshold, alternating.")
    args = parser.parse_args()
    token = json.loads(Path(args.tokens_file).read_text())["big"]

    rows = []
    for _ in range(args.repeat):
        for threshold in (int(value) for value in args.gc_thresholds.split(",")):
            result = measure(args, token, threshold)
            result["threshold"] = threshold
            print(json.dumps(result), flush=True)
            rows.append(result)

    print("\n| gen0 threshold | req/s | p50 ms | p90 ms | p99 ms | API CPU µs/req | API run-queue wait µs/req "
          "| collections gen0/gen1/gen2 | longest gen1 ms | longest gen2 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        label = "0 (Python's default, nothing frozen)" if row["threshold"] == 0 else f"{row['threshold']:,} + freeze"
        print(f"| {label} | {row['rps']:,.0f} | {row['p50']:.1f} | {row['p90']:.1f} | {row['p99']:.1f} "
              f"| {row['api_cpu_us']:.0f} | {row['api_wait_us']:.0f} "
              f"| {row['gen0_count']}/{row['gen1_count']}/{row['gen2_count']} "
              f"| {row['gen1_max_ms']:.1f} | {row['gen2_max_ms']:.1f} | {row['errors']:.0f} |")


if __name__ == "__main__":
    main()
