"""Measure lifecycle throughput: instances built to ACTIVE and deleted per second by N workers.

Usage:
    python bench/lifecycle_load.py --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench_lifecycle \
        --instances 3000 --workers 1,2,4

It drops and re-creates the database named in ``--database-url``, migrates it and
creates ``--organizations`` organizations. For each worker count N it then:

1. queues ``--instances`` creates the way the API stores them (an instance in BUILD
   with its tags and security group, a RUNNING create action and a PENDING create
   task), written with COPY so that queueing takes about a second;
2. starts N ``mycloud-compute worker`` processes with the simulated driver's step
   delay at 0 (``MYCLOUD_DRIVER_STEP_DELAY=0``) and an inventory of ``--hosts``
   simulated hosts large enough for every instance, and measures instances
   reaching ACTIVE per second;
3. queues a delete of every instance of the batch the way the API does (task_state
   DELETING, a delete action and task) and measures instances reaching DELETED per
   second with the same workers;
4. stops the workers and checks that every host's usage equals the sum over the
   instances placed on it, and that no instance keeps a task_state and no task is
   left PENDING or RUNNING.

Rates are measured between 10% and 90% of each batch (the steady state, without
process start-up and the tail), from the database every 0.1 s. CPU per transition
is the workers' CPU time (and the database's PostgreSQL backends') over the same
span, read from /proc, so the server must run on this machine.

``--profile FILE`` records the workers with py-spy (the ``bench`` extra) during
the create phase of the last worker count and writes collapsed stacks to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from create_load import (
    backend_pids,
    cpu_by_pid,
    cpu_seconds,
    create_organizations,
    process_tree,
    recreate_database,
    start_profiler,
)

from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.services.lifecycle import TaskState, VmState, derive_status

FLAVOR = ("m1.small", 1, 2048, 20)
IMAGE = "Ubuntu 22.04 LTS"
POLL_SECONDS = 0.1
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class PhaseResult:
    workers: int
    phase: str
    instances: int
    transitions_per_second: float
    wall_seconds: float
    worker_cpu_us_per_transition: float
    database_cpu_us_per_transition: float
    failed: int
    # False when the phase hit --timeout before every task of the batch finished.
    complete: bool


def asyncpg_url(database_url: str) -> str:
    return database_url.replace("postgresql://", "postgres://", 1)


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def host_inventory(count: int, instances: int) -> str:
    """Return an inventory of ``count`` simulated hosts with room for twice ``instances`` m1.small instances."""
    per_host = 2 * instances // count + 1
    _, vcpus, ram, disk = FLAVOR
    return ",".join(f"bench-host-{number:03d}:{per_host * vcpus}:{per_host * ram}:{per_host * disk}"
                    for number in range(count))


async def _json_connection(database_url: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(asyncpg_url(database_url))
    await connection.set_type_codec("json", encoder=str.encode, decoder=bytes.decode,
                                    schema="pg_catalog", format="binary")
    return connection


async def queue_creates(database_url: str, count: int, label: str) -> None:
    """Store ``count`` creates as the API's create_instance does, spread over the organizations."""
    connection = await _json_connection(database_url)
    try:
        organizations = await connection.fetch(
            "SELECT o.id, n.id AS network_id, g.id AS group_id FROM organizations o "
            "JOIN networks n ON n.organization_id = o.id AND n.name = 'private-network' "
            "JOIN security_groups g ON g.organization_id = o.id AND g.name = 'default' ORDER BY o.name"
        )
        flavor_name, vcpus, ram, disk = FLAVOR
        flavor_id, image_id = catalog_id("flavor", flavor_name), catalog_id("image", IMAGE)
        flavor = json.dumps({"id": str(flavor_id), "name": flavor_name, "vcpus": vcpus, "ram": ram,
                             "disk": disk}, separators=(",", ":"))
        image = json.dumps({"id": str(image_id), "name": IMAGE}, separators=(",", ":"))
        status = derive_status(VmState.BUILDING, TaskState.SCHEDULING).value
        instances, tags, groups, actions, tasks = [], [], [], [], []
        for number in range(count):
            organization = organizations[number % len(organizations)]
            instance_id, action_id, created = uuid.uuid4(), uuid.uuid4(), now()
            instances.append((
                organization["id"], instance_id, f"{label}-{number:06d}", "", status,
                VmState.BUILDING.value, TaskState.SCHEDULING.value, "NOSTATE", flavor_id, flavor,
                image_id, image, None, json.dumps([str(organization["network_id"])]), "{}",
                '[{"name":"default"}]', "[]", "[]", '{"role":"web"}', '["bench"]', None,
                created, created, None, None,
            ))
            tags.append((organization["id"], instance_id, "bench"))
            groups.append((organization["id"], organization["group_id"], instance_id))
            actions.append((organization["id"], action_id, instance_id, "create", "RUNNING", label,
                            "bench", created))
            tasks.append((uuid.uuid4(), organization["id"], instance_id, "create", "PENDING", 0,
                          label, action_id, created, created))
        async with connection.transaction():
            await connection.copy_records_to_table("instances", records=instances, columns=[
                "organization_id", "id", "name", "description", "status", "vm_state", "task_state",
                "power_state", "flavor_id", "flavor", "image_id", "image", "host_id", "network_ids",
                "addresses", "security_groups", "volumes_attached", "key_names", "metadata", "tags",
                "fault", "created_at", "updated_at", "launched_at", "terminated_at"])
            await connection.copy_records_to_table(
                "instance_tags", records=tags, columns=["organization_id", "instance_id", "tag"])
            await connection.copy_records_to_table(
                "instance_security_groups", records=groups,
                columns=["organization_id", "security_group_id", "instance_id"])
            await _copy_actions_and_tasks(connection, actions, tasks)
        await connection.execute("ANALYZE tasks; ANALYZE instances; ANALYZE hosts")
    finally:
        await connection.close()


async def _copy_actions_and_tasks(connection: asyncpg.Connection, actions: list[tuple[Any, ...]],
                                  tasks: list[tuple[Any, ...]]) -> None:
    await connection.copy_records_to_table("instance_actions", records=actions, columns=[
        "organization_id", "id", "instance_id", "action", "status", "request_id", "token_name",
        "started_at"])
    await connection.copy_records_to_table("tasks", records=tasks, columns=[
        "id", "organization_id", "instance_id", "action", "state", "attempts", "request_id",
        "action_id", "created_at", "updated_at"])


async def queue_deletes(database_url: str, create_label: str, label: str) -> int:
    """Queue a delete of every instance of a batch, as the API's delete_instance does."""
    connection = await _json_connection(database_url)
    try:
        rows = await connection.fetch(
            "SELECT i.organization_id, i.id, i.vm_state FROM instances i "
            "JOIN tasks t ON t.organization_id = i.organization_id AND t.instance_id = i.id "
            "WHERE t.request_id = $1 AND i.vm_state <> 'DELETED'", create_label)
        actions, tasks = [], []
        for row in rows:
            action_id, created = uuid.uuid4(), now()
            actions.append((row["organization_id"], action_id, row["id"], "delete", "RUNNING", label,
                            "bench", created))
            tasks.append((uuid.uuid4(), row["organization_id"], row["id"], "delete", "PENDING", 0,
                          label, action_id, created, created))
        async with connection.transaction():
            for vm_state in {row["vm_state"] for row in rows}:
                await connection.execute(
                    "UPDATE instances i SET task_state = 'DELETING', status = $1, updated_at = $2 "
                    "FROM tasks t WHERE t.organization_id = i.organization_id AND t.instance_id = i.id "
                    "AND t.request_id = $3 AND i.vm_state = $4",
                    derive_status(VmState(vm_state), TaskState.DELETING).value, now(), create_label,
                    vm_state)
            await _copy_actions_and_tasks(connection, actions, tasks)
        await connection.execute("ANALYZE tasks")
        return len(rows)
    finally:
        await connection.close()


async def finished_count(connection: asyncpg.Connection, label: str) -> tuple[int, int]:
    row = await connection.fetchrow(
        "SELECT count(*) FILTER (WHERE state = ANY($2::text[])) AS done, "
        "count(*) FILTER (WHERE state = 'FAILED') AS failed FROM tasks WHERE request_id = $1",
        label, list(FINAL_STATES))
    return int(row["done"]), int(row["failed"])


async def follow(database_url: str, label: str, total: int, worker_pids: list[int], limit: float,
                 ) -> tuple[list[tuple[float, int, float, float]], int]:
    """Poll the batch until every task has finished or ``limit`` seconds have passed.

    Returns the samples (time, tasks done, worker CPU, database CPU) and the failed count.
    """
    connection = await asyncpg.connect(asyncpg_url(database_url))
    samples: list[tuple[float, int, float, float]] = []
    database_before: dict[int, float] = {}
    database_cpu = 0.0
    started = time.monotonic()
    failed = 0
    try:
        while True:
            done, failed = await finished_count(connection, label)
            current = cpu_by_pid(await backend_pids(database_url))
            database_cpu += sum(value - database_before.get(pid, value) for pid, value in current.items())
            database_before = current
            samples.append((time.monotonic(), done, cpu_seconds(worker_pids), database_cpu))
            if done >= total or time.monotonic() - started > limit:
                return samples, failed
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await connection.close()


def steady_rate(workers: int, phase: str, total: int, samples: list[tuple[float, int, float, float]],
                failed: int) -> PhaseResult:
    """Compute the rate and CPU per transition between the samples at 10% and 90% of the batch."""
    low = next(sample for sample in samples if sample[1] >= total * 0.1)
    high = next((sample for sample in samples if sample[1] >= total * 0.9), samples[-1])
    first = next(sample for sample in samples if sample[1] > 0)
    transitions = max(high[1] - low[1], 1)
    span = max(high[0] - low[0], 1e-6)
    return PhaseResult(
        workers=workers,
        phase=phase,
        instances=samples[-1][1],
        transitions_per_second=transitions / span,
        wall_seconds=samples[-1][0] - first[0],
        worker_cpu_us_per_transition=(high[2] - low[2]) / transitions * 1e6,
        database_cpu_us_per_transition=(high[3] - low[3]) / transitions * 1e6,
        failed=failed,
        complete=samples[-1][1] >= total,
    )


async def verify(database_url: str) -> list[str]:
    """Check that host usage equals the sum over placed instances and that nothing stays in a task state.

    Returns the problems found (an empty list when there are none).
    """
    connection = await asyncpg.connect(asyncpg_url(database_url))
    problems = []
    try:
        mismatched = await connection.fetch(
            "SELECT h.name, h.vcpus_used, h.ram_used, h.disk_used, h.instance_count, "
            "coalesce(sum((i.flavor->>'vcpus')::int), 0) AS vcpus, "
            "coalesce(sum((i.flavor->>'ram')::int), 0) AS ram, "
            "coalesce(sum((i.flavor->>'disk')::int), 0) AS disk, count(i.id) AS placed "
            "FROM hosts h LEFT JOIN instances i ON i.host_id = h.id "
            "GROUP BY h.id HAVING h.vcpus_used <> coalesce(sum((i.flavor->>'vcpus')::int), 0) "
            "OR h.ram_used <> coalesce(sum((i.flavor->>'ram')::int), 0) "
            "OR h.disk_used <> coalesce(sum((i.flavor->>'disk')::int), 0) "
            "OR h.instance_count <> count(i.id)")
        problems += [f"host {row['name']} usage does not match its instances: {dict(row)}"
                     for row in mismatched]
        in_task = await connection.fetchval("SELECT count(*) FROM instances WHERE task_state IS NOT NULL")
        if in_task:
            problems.append(f"{in_task} instances still have a task_state")
        unfinished = await connection.fetchval(
            "SELECT count(*) FROM tasks WHERE state IN ('PENDING', 'RUNNING')")
        if unfinished:
            problems.append(f"{unfinished} tasks are still PENDING or RUNNING")
        errors = await connection.fetchval("SELECT count(*) FROM instances WHERE vm_state = 'ERROR'")
        if errors:
            problems.append(f"{errors} instances are in ERROR")
    finally:
        await connection.close()
    return problems


def start_workers(count: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-m", "mycloud_compute.cli.admin", "worker"],
                         env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        for _ in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    """Stop the workers with SIGTERM (they give their running tasks back), or SIGKILL after 60 s."""
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def run_phase(args: argparse.Namespace, workers: list[subprocess.Popen[bytes]], count: int,
              phase: str, label: str, total: int, profile: str | None) -> PhaseResult:
    pids = [pid for worker in workers for pid in process_tree(worker.pid)]
    profilers = [start_profiler(pid, f"{profile}.{pid}", int(args.timeout)) for pid in pids] if profile else []
    samples, failed = asyncio.run(follow(args.database_url, label, total, pids, args.timeout))
    for profiler in profilers:
        profiler.send_signal(2)  # SIGINT: py-spy writes what it has recorded
        profiler.wait(30)
    if profile:
        with open(profile, "w") as merged:
            for pid in pids:
                with open(f"{profile}.{pid}") as part:
                    merged.write(part.read())
                os.unlink(f"{profile}.{pid}")
    result = steady_rate(count, phase, total, samples, failed)
    print(json.dumps(asdict(result)), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url",
                        default="postgresql://postgres@127.0.0.1:5432/mycloud_bench_lifecycle",
                        help="A dedicated database: it is dropped and re-created.")
    parser.add_argument("--instances", type=int, default=3000, help="Instances queued per worker count.")
    parser.add_argument("--workers", default="1,2,4", help="Comma-separated worker process counts.")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="MYCLOUD_WORKER_CONCURRENCY of each worker (0: the service's default).")
    parser.add_argument("--organizations", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=20, help="Simulated hosts.")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds a phase may take at most.")
    parser.add_argument("--profile", default="", help="Write py-spy collapsed stacks of the last create phase here.")
    parser.add_argument("--output", default="", help="Write the results as JSON to this file.")
    args = parser.parse_args()

    asyncio.run(recreate_database(args.database_url))
    asyncio.run(create_organizations(args.database_url, args.organizations))
    env = {"MYCLOUD_DATABASE_URL": args.database_url, "MYCLOUD_LOG_LEVEL": "WARNING",
           "MYCLOUD_DRIVER_STEP_DELAY": "0",
           "MYCLOUD_SIMULATED_HOSTS": host_inventory(args.hosts, args.instances)}
    if args.concurrency:
        env["MYCLOUD_WORKER_CONCURRENCY"] = str(args.concurrency)

    results: list[PhaseResult] = []
    problems: list[str] = []
    counts = [int(count) for count in args.workers.split(",")]
    for index, count in enumerate(counts):
        create_label, delete_label = f"bench-create-{count}-{index}", f"bench-delete-{count}-{index}"
        started = time.monotonic()
        asyncio.run(queue_creates(args.database_url, args.instances, create_label))
        print(f"queued {args.instances} creates in {time.monotonic() - started:.1f} s", flush=True)
        workers = start_workers(count, env)
        try:
            profile = args.profile if args.profile and index == len(counts) - 1 else None
            results.append(run_phase(args, workers, count, "create", create_label, args.instances, profile))
            deletes = asyncio.run(queue_deletes(args.database_url, create_label, delete_label))
            results.append(run_phase(args, workers, count, "delete", delete_label, deletes, None))
        finally:
            stop_workers(workers)
        problems += asyncio.run(verify(args.database_url))

    print("\n| workers | phase | finished | transitions/s | wall s | worker CPU µs/transition "
          "| PostgreSQL CPU µs/transition | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for result in results:
        finished = f"{result.instances}" + ("" if result.complete else " (timed out)")
        print(f"| {result.workers} | {result.phase} | {finished} | "
              f"{result.transitions_per_second:,.0f} | {result.wall_seconds:.1f} | "
              f"{result.worker_cpu_us_per_transition:,.0f} | {result.database_cpu_us_per_transition:,.0f} | "
              f"{result.failed} |")
    if not all(result.complete for result in results):
        print("some phases timed out: tasks they left PENDING are expected in the check below")
    print("check: " + ("ok" if not problems else "; ".join(problems)))
    if args.output:
        with open(args.output, "w") as output:
            json.dump([asdict(result) for result in results], output, indent=1)


if __name__ == "__main__":
    main()
