"""Soak test: run the service as production does under mixed traffic, then check its state.

Usage (PostgreSQL reachable at 127.0.0.1:5432 as user postgres with trust auth):
    .venv/bin/python bench/soak.py --minutes 10

The script creates its own database on that server and migrates it with
``mycloud-compute db upgrade``. It creates organizations and tokens through the
identity service, then starts ``mycloud-compute serve --workers 2`` and separate
``mycloud-compute worker`` processes. It seeds instances over the API. Then, for
``--minutes`` minutes, concurrent clients at a bounded total rate list instances
(filters, page walks, deep markers), show, create (some with Idempotency-Key retries),
stop, start, reboot and resize them, confirm or revert resizes, and delete them.
Creates and deletes keep each organization at about its seeded population.

Every few seconds it samples the RSS and CPU time of each uvicorn worker process and
each lifecycle worker from /proc. After the traffic it waits for the lifecycle work to
drain, then checks the database and the API. Every create acknowledged with 202 must
exist and be listed unless it was deleted. No task, instance or action may be stuck.
Each host's usage must equal the sum of the claims recorded on its instances, and no
deleted instance may be listed or shown again.

It prints a summary, writes a JSON result file and, beside it, the tables of
docs/soak.md in Markdown. The exit status is 1 when a response was a 5xx or never
arrived, an instance was lost, stuck or came back, host usage is off, an
Idempotency-Key retry created a second instance, an action failed for a reason other
than a delete, a service process died or exited non-zero on SIGTERM, or a process's
memory grew by ``--max-memory-growth`` (10%) or more. Memory growth is
(mean RSS over the last minute - RSS at the end of the first minute) / RSS at the end
of the first minute. The database is dropped at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import identity

FLAVOR_IDS = {name: str(catalog_id("flavor", name)) for name in ("m1.tiny", "m1.small", "m1.medium")}
# The next size up for a resize; disks never shrink, so resizes only go up, and
# deletes keep the population from drifting to m1.medium.
RESIZE_TARGET = {"m1.tiny": "m1.small", "m1.small": "m1.medium"}
# (flavor, image) pairs for creates; CirrOS is the only image whose min_disk fits m1.tiny.
CREATE_SHAPES = [
    ("m1.tiny", str(catalog_id("image", "CirrOS 0.6.2"))),
    ("m1.small", str(catalog_id("image", "Ubuntu 22.04 LTS"))),
]
TAGS = ["web", "db", "prod", "staging"]

# Four simulated hosts with room for a few hundred instances of at most m1.medium,
# double resize claims included. No create or resize runs out of room, so an ERROR
# instance points at a fault rather than at capacity.
SIMULATED_HOSTS = ",".join(f"soak-compute-{n}:512:2097152:40000" for n in range(1, 5))

# Relative weights of the operations each client picks from.
OPERATIONS = {"list": 40, "walk": 8, "deep_marker": 7, "get": 10, "churn": 15, "action": 20}


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def admin_command() -> list[str]:
    """The ``mycloud-compute`` entry point of this interpreter's environment."""
    script = Path(sys.executable).with_name("mycloud-compute")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "mycloud_compute.cli.admin"]


def run_admin(arguments: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run(
        admin_command() + arguments, env=env, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"mycloud-compute {' '.join(arguments)} failed: {completed.stderr.strip()}")
    return completed.stdout.strip()


def start_process(arguments: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    with log_file.open("ab") as log:
        return subprocess.Popen(
            admin_command() + arguments, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """Send SIGTERM to the process group, wait up to 40 s, then SIGKILL; return the exit code."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            return process.wait(10)
    return process.returncode


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def uvicorn_workers(supervisor_pid: int) -> list[int]:
    """Find the uvicorn worker processes under ``serve`` (multiprocessing children, not its resource tracker)."""
    pids = []
    for pid in children(supervisor_pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"spawn_main" in command:
            pids.append(pid)
    return sorted(pids)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine since boot, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


async def wait_until_ready(base_url: str, process: subprocess.Popen[bytes], workers: int) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base_url, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with status {process.returncode}")
            try:
                ready = (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                ready = False
            if ready and len(uvicorn_workers(process.pid)) == workers:
                return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"serve did not become ready at {base_url} within 60 s")


async def watch_api_workers(supervisor_pid: int, recorder: Recorder, changes: list[dict[str, Any]]) -> None:
    """Record every change of the uvicorn worker processes, with the phase it happened in.

    uvicorn's supervisor replaces a worker that exits, or that does not respond to its
    health ping within ``timeout_worker_healthcheck`` (5 s in uvicorn 0.55), and logs that only
    at INFO. Requests in flight on a replaced worker fail.
    """
    previous = uvicorn_workers(supervisor_pid)
    while True:
        await asyncio.sleep(1)
        current = uvicorn_workers(supervisor_pid)
        if current != previous:
            changes.append({"phase": recorder.phase, "gone": sorted(set(previous) - set(current)),
                            "new": sorted(set(current) - set(previous)),
                            "at": time.strftime("%H:%M:%S", time.gmtime())})
            previous = current


# --- recording ------------------------------------------------------------------------


class RateLimiter:
    """Space requests evenly so that all clients together send at most ``rate`` per second."""

    def __init__(self, rate: float) -> None:
        self.interval = 1 / rate
        self.next_slot = time.monotonic()

    async def wait(self) -> None:
        now = time.monotonic()
        slot = max(self.next_slot, now)
        self.next_slot = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


@dataclass
class Recorder:
    """Response counts, latencies per minute and kind, and every anomaly seen."""

    phase: str = "setup"
    traffic_start: float = 0.0
    last_minute: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    statuses_by_kind: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[tuple[int, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    anomalies: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def record(self, kind: str, started: float, elapsed: float, response: httpx.Response) -> None:
        status = str(response.status_code)
        self.statuses[status] += 1
        self.statuses_by_kind[kind][status] += 1
        if self.phase == "traffic":
            # A request that a client began just before the end counts in the last minute.
            minute = min(int((started - self.traffic_start) // 60), self.last_minute)
            self.latencies[(minute, kind)].append(elapsed * 1000)
        if response.status_code >= 500:
            self.server_errors.append({
                "kind": kind,
                "phase": self.phase,
                "method": response.request.method,
                "url": str(response.request.url),
                "status": response.status_code,
                "request_id": response.headers.get("x-request-id"),
                "body": response.text[:2000],
            })

    def record_unexpected(self, kind: str, response: httpx.Response, expected: str) -> None:
        # Kept short: a 4xx that the traffic did not expect is either a script or a service bug.
        if len(self.unexpected) < 200:
            self.unexpected.append({
                "kind": kind,
                "expected": expected,
                "status": response.status_code,
                "url": str(response.request.url),
                "request_id": response.headers.get("x-request-id"),
                "body": response.text[:1000],
            })


@dataclass
class Organization:
    name: str
    tokens: list[str]  # one per client
    live: dict[str, str] = field(default_factory=dict)  # instance id -> flavor name
    sequence: itertools.count[int] = field(default_factory=itertools.count)


@dataclass
class Fleet:
    """The clients' shared record: acknowledged creates and deletes, and instances in use by a client."""

    organizations: list[Organization]
    target_population: int
    created: dict[str, str] = field(default_factory=dict)  # instance id -> organization name
    deleted: dict[str, str] = field(default_factory=dict)
    seen_deleted: set[str] = field(default_factory=set)  # deleted, then shown as 404
    busy: set[str] = field(default_factory=set)

    def pick(self, organization: Organization) -> str | None:
        candidates = [key for key in organization.live if key not in self.busy]
        return random.choice(candidates) if candidates else None


# --- traffic --------------------------------------------------------------------------


class Client:
    """One concurrent client: an HTTP connection pool that runs random operations."""

    def __init__(
        self, number: int, base_url: str, fleet: Fleet, recorder: Recorder, limiter: RateLimiter
    ) -> None:
        self.number = number
        self.http = httpx.AsyncClient(base_url=base_url, timeout=30)
        self.fleet = fleet
        self.recorder = recorder
        self.limiter = limiter

    async def request(
        self, kind: str, organization: Organization, method: str, url: str,
        *, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
    ) -> httpx.Response | None:
        await self.limiter.wait()
        token = organization.tokens[self.number % len(organization.tokens)]
        all_headers = {"Authorization": f"Bearer {token}", **(headers or {})}
        started = time.monotonic()
        try:
            response = await self.http.request(method, url, json=body, headers=all_headers)
        except httpx.HTTPError as exc:
            self.recorder.transport_errors.append({
                "kind": kind, "phase": self.recorder.phase, "method": method, "url": url,
                "error": f"{type(exc).__name__}: {exc}",
            })
            return None
        self.recorder.record(kind, started, time.monotonic() - started, response)
        return response

    async def run(self, stop_at: float) -> None:
        names = list(OPERATIONS)
        weights = list(OPERATIONS.values())
        while time.monotonic() < stop_at:
            organization = random.choice(self.fleet.organizations)
            operation = random.choices(names, weights)[0]
            await getattr(self, f"op_{operation}")(organization)

    # Lists -----------------------------------------------------------------------------

    def check_listed(self, kind: str, listed: list[dict[str, Any]]) -> None:
        for item in listed:
            if item["id"] in self.fleet.seen_deleted and item["status"] != "DELETED":
                self.recorder.anomalies["reappeared"].append(
                    {"id": item["id"], "status": item["status"], "seen_by": kind}
                )

    def random_filters(self, organization: Organization) -> dict[str, str]:
        choices: list[dict[str, str]] = [
            {},
            {"status": "ACTIVE"},
            {"status": "SHUTOFF,VERIFY_RESIZE"},
            {"status": "DELETED"},
            {"name": f"soak-{organization.name}-1*"},
            {"tags": random.choice(TAGS)},
            {"tags": "web,prod"},
            {"flavor_id": FLAVOR_IDS["m1.small"]},
            {"image_id": CREATE_SHAPES[0][1]},
            {"status": "ACTIVE", "tags": "prod"},
        ]
        return random.choice(choices)

    async def op_list(self, organization: Organization) -> None:
        params = {"limit": str(random.choice([5, 20, 50, 100])), **self.random_filters(organization)}
        response = await self.request("list", organization, "GET", "/v1/instances?" + str(httpx.QueryParams(params)))
        if response is not None and response.status_code == 200:
            self.check_listed("list", response.json()["instances"])
        elif response is not None and response.status_code < 500:
            self.recorder.record_unexpected("list", response, "200")

    async def op_walk(self, organization: Organization) -> None:
        """Follow ``links.next`` through up to 40 pages of 10."""
        params = {"limit": "10", **random.choice([{}, {"status": "ACTIVE"}, {"tags": "web"}])}
        url: str | None = "/v1/instances?" + str(httpx.QueryParams(params))
        for _ in range(40):
            if url is None:
                return
            response = await self.request("list_walk_page", organization, "GET", url)
            if response is None or response.status_code != 200:
                if response is not None and response.status_code < 500:
                    self.recorder.record_unexpected("list_walk_page", response, "200")
                return
            page = response.json()
            self.check_listed("list_walk_page", page["instances"])
            url = page["links"]["next"]

    async def op_deep_marker(self, organization: Organization) -> None:
        """List from a marker anywhere in the organization, deleted instances included."""
        known = [key for key, owner in self.fleet.created.items() if owner == organization.name]
        if not known:
            return
        params = {"limit": "20", "marker": random.choice(known)}
        response = await self.request("list_deep_marker", organization, "GET", "/v1/instances?" + str(httpx.QueryParams(params)))
        if response is not None and response.status_code == 200:
            self.check_listed("list_deep_marker", response.json()["instances"])
        elif response is not None and response.status_code < 500:
            self.recorder.record_unexpected("list_deep_marker", response, "200")

    # Single instances ------------------------------------------------------------------

    async def op_get(self, organization: Organization) -> None:
        """Show a live instance, or (one time in five) a deleted one, which must stay gone."""
        deleted = [key for key, owner in self.fleet.deleted.items() if owner == organization.name]
        if deleted and random.random() < 0.2:
            await self.show_deleted(organization, random.choice(deleted))
            return
        instance_id = self.fleet.pick(organization)
        if instance_id is not None:
            await self.show(organization, instance_id)

    async def show(self, organization: Organization, instance_id: str) -> dict[str, Any] | None:
        response = await self.request("get", organization, "GET", f"/v1/instances/{instance_id}")
        if response is None:
            return None
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        if response.status_code == 404:
            # Another client's delete may have finished in the worker before its 202
            # reached that client, so give the 202 a moment before calling the instance lost.
            await asyncio.sleep(5)
            if instance_id not in self.fleet.deleted:
                self.recorder.anomalies["lost"].append(
                    {"id": instance_id, "request_id": response.headers.get("x-request-id")}
                )
        elif response.status_code < 500:
            self.recorder.record_unexpected("get", response, "200")
        return None

    async def show_deleted(self, organization: Organization, instance_id: str) -> None:
        response = await self.request("get_deleted", organization, "GET", f"/v1/instances/{instance_id}")
        if response is None:
            return
        if response.status_code == 404:
            self.fleet.seen_deleted.add(instance_id)
        elif response.status_code == 200:
            status = response.json()["status"]
            if instance_id in self.fleet.seen_deleted:
                self.recorder.anomalies["reappeared"].append(
                    {"id": instance_id, "status": status, "seen_by": "get_deleted"}
                )

    # Creates and deletes ---------------------------------------------------------------

    async def op_churn(self, organization: Organization) -> None:
        """Create below the target population and delete above it, so the population stays steady."""
        if len(organization.live) < self.fleet.target_population:
            await self.create(organization)
        else:
            await self.delete(organization)

    def create_body(self, organization: Organization) -> tuple[dict[str, Any], str]:
        flavor, image_id = random.choice(CREATE_SHAPES)
        name = f"soak-{organization.name}-{next(organization.sequence)}"
        body = {
            "name": name,
            "flavor_id": FLAVOR_IDS[flavor],
            "image_id": image_id,
            "tags": random.sample(TAGS, random.randint(0, 3)),
            "metadata": {"soak": "yes", "client": str(self.number)},
        }
        return body, flavor

    async def create(self, organization: Organization) -> None:
        body, flavor = self.create_body(organization)

        # One create in three carries an Idempotency-Key and is retried; one retry in
        # four is sent concurrently with the first request.
        if random.random() >= 1 / 3:
            response = await self.request("create", organization, "POST", "/v1/instances", body=body)
            self.accept_create(organization, response, flavor, "create")
            return
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        if random.random() < 0.25:
            responses = list(await asyncio.gather(
                self.request("create_keyed", organization, "POST", "/v1/instances", body=body, headers=headers),
                self.request("create_retry", organization, "POST", "/v1/instances", body=body, headers=headers),
            ))
        else:
            first = await self.request("create_keyed", organization, "POST", "/v1/instances", body=body, headers=headers)
            retry = await self.request("create_retry", organization, "POST", "/v1/instances", body=body, headers=headers)
            responses = [first, retry]
        ids = {
            response.json()["id"] for response in responses
            if response is not None and response.status_code == 202
        }
        if len(ids) > 1:
            self.recorder.anomalies["idempotency_mismatch"].append({"key": headers["Idempotency-Key"], "ids": sorted(ids)})
        for kind, response in zip(("create_keyed", "create_retry"), responses, strict=True):
            self.accept_create(organization, response, flavor, kind)

    def accept_create(self, organization: Organization, response: httpx.Response | None, flavor: str, kind: str) -> None:
        if response is None:
            return
        if response.status_code != 202:
            if response.status_code < 500:
                self.recorder.record_unexpected(kind, response, "202")
            return
        instance_id = response.json()["id"]
        self.fleet.created[instance_id] = organization.name
        organization.live[instance_id] = flavor

    async def delete(self, organization: Organization) -> None:
        instance_id = self.fleet.pick(organization)
        if instance_id is None:
            return
        self.fleet.busy.add(instance_id)
        try:
            response = await self.request("delete", organization, "DELETE", f"/v1/instances/{instance_id}")
            if response is None:
                return
            if response.status_code == 202:
                organization.live.pop(instance_id, None)
                self.fleet.deleted[instance_id] = organization.name
            elif response.status_code == 404:
                self.recorder.anomalies["lost"].append(
                    {"id": instance_id, "request_id": response.headers.get("x-request-id")}
                )
            elif response.status_code < 500:
                self.recorder.record_unexpected("delete", response, "202")
        finally:
            self.fleet.busy.discard(instance_id)

    # Actions ---------------------------------------------------------------------------

    def choose_action(self, instance: dict[str, Any]) -> tuple[str, dict[str, Any] | None] | None:
        """Pick an action that the instance's current state allows."""
        if instance["task_state"] is not None:
            return None
        status = instance["status"]
        resize_to = RESIZE_TARGET.get(instance["flavor"]["name"])
        resize = [("resize", {"flavor_id": FLAVOR_IDS[resize_to]})] if resize_to else []
        options: list[tuple[str, dict[str, Any] | None]]
        no_body: dict[str, Any] | None = None
        if status == "ACTIVE":
            options = [("stop", None), ("reboot", None), ("reboot", {"type": "HARD"}), *resize]
        elif status == "SHUTOFF":
            options = [("start", None), ("start", None), *resize]
        elif status == "VERIFY_RESIZE":
            options = [("confirm-resize", no_body)] * 4 + [("revert-resize", no_body)]
        elif status == "ERROR":
            options = [("stop", None)]
        else:
            return None
        return random.choice(options)

    async def op_action(self, organization: Organization) -> None:
        instance_id = self.fleet.pick(organization)
        if instance_id is None:
            return
        self.fleet.busy.add(instance_id)
        try:
            instance = await self.show(organization, instance_id)
            if instance is None:
                return
            organization.live[instance_id] = instance["flavor"]["name"]
            choice = self.choose_action(instance)
            if choice is None:
                return
            action, body = choice
            kind = f"action_{action}" + ("_hard" if body and body.get("type") == "HARD" else "")
            response = await self.request(
                kind, organization, "POST", f"/v1/instances/{instance_id}/actions/{action}", body=body
            )
            # A 409 is expected now and then: confirm and revert keep task_state null
            # while their task runs, so a second action can race them.
            if response is not None and response.status_code not in (202, 409) and response.status_code < 500:
                self.recorder.record_unexpected(kind, response, "202 or 409")
        finally:
            self.fleet.busy.discard(instance_id)

    async def close(self) -> None:
        await self.http.aclose()


# --- memory sampling ------------------------------------------------------------------


@dataclass
class MemorySampler:
    """RSS of the uvicorn workers and lifecycle workers, sampled from /proc."""

    serve: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    interval: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)

    def processes(self) -> dict[int, str]:
        for pid in uvicorn_workers(self.serve.pid):
            self.labels.setdefault(pid, f"api-{len([v for v in self.labels.values() if v.startswith('api-')]) + 1}")
        for number, process in enumerate(self.workers, 1):
            self.labels.setdefault(process.pid, f"worker-{number}")
        return self.labels

    def sample(self, elapsed: float) -> None:
        rss = {}
        cpu = {}
        for pid, label in self.processes().items():
            value = rss_kib(pid)
            seconds = cpu_seconds(pid)
            if value is not None and seconds is not None:
                rss[f"{label} (pid {pid})"] = value
                cpu[f"{label} (pid {pid})"] = seconds
        busy, total = machine_cpu_ticks()
        self.samples.append({"t": round(elapsed, 1), "rss_kib": rss, "cpu_seconds": cpu,
                             "machine_ticks": [busy, total]})

    def cpu_usage(self) -> dict[str, float]:
        """Mean CPU use of each process and of the whole machine over the samples, in percent of one core."""
        first, last = self.samples[0], self.samples[-1]
        elapsed = last["t"] - first["t"]
        if elapsed <= 0:
            return {}
        usage = {
            name: round(100 * (last["cpu_seconds"][name] - first["cpu_seconds"][name]) / elapsed, 1)
            for name in last["cpu_seconds"] if name in first["cpu_seconds"]
        }
        busy = last["machine_ticks"][0] - first["machine_ticks"][0]
        total = last["machine_ticks"][1] - first["machine_ticks"][1]
        usage["machine (all cores, % of one core)"] = round(100 * busy / total * (os.cpu_count() or 1), 1)
        return usage

    async def run(self, start: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample(time.monotonic() - start)
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                pass
        self.sample(time.monotonic() - start)

    def growth(self, duration: float, minutes: float) -> dict[str, dict[str, Any]]:
        """Per process: RSS at the end of minute one, mean RSS over the last minute, growth."""
        result: dict[str, dict[str, Any]] = {}
        names = sorted({name for sample in self.samples for name in sample["rss_kib"]})
        for name in names:
            first = [s["rss_kib"][name] for s in self.samples if s["t"] <= 60 and name in s["rss_kib"]]
            last = [s["rss_kib"][name] for s in self.samples if s["t"] >= duration - 60 and name in s["rss_kib"]]
            if not first or not last:
                continue
            baseline = first[-1]
            mean = sum(last) / len(last)
            per_minute: dict[int, list[int]] = defaultdict(list)
            for sample in self.samples:
                if name in sample["rss_kib"]:
                    # The sample taken as the traffic stops belongs to the last minute.
                    minute = min(int(sample["t"] // 60), max(0, math.ceil(minutes) - 1))
                    per_minute[minute].append(sample["rss_kib"][name])
            result[name] = {
                "minute_mean_kib": [round(sum(v) / len(v)) for _, v in sorted(per_minute.items())],
                "first_minute_end_kib": baseline,
                "last_minute_mean_kib": round(mean),
                "max_kib": max(s["rss_kib"][name] for s in self.samples if name in s["rss_kib"]),
                "growth": round((mean - baseline) / baseline, 4),
            }
        return result


# --- database checks ------------------------------------------------------------------


STUCK_QUERIES = {
    "tasks_unfinished": "SELECT id::text, instance_id::text, action, state, step FROM tasks "
    "WHERE state IN ('PENDING', 'RUNNING')",
    "instances_in_task": "SELECT id::text, status, vm_state, task_state FROM instances "
    "WHERE status <> 'DELETED' AND (task_state IS NOT NULL OR status = 'BUILD')",
    "actions_running": "SELECT id::text, instance_id::text, action FROM instance_actions "
    "WHERE status = 'RUNNING'",
}


async def stuck_work(connection: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {
        name: [dict(row) for row in await connection.fetch(query)]
        for name, query in STUCK_QUERIES.items()
    }


async def drain(database_url: str, limit_seconds: float) -> tuple[float, dict[str, list[dict[str, Any]]]]:
    """Wait until no task, instance or action is in progress; return the wait and what is left."""
    started = time.monotonic()
    connection = await asyncpg.connect(database_url)
    try:
        while True:
            left = await stuck_work(connection)
            if not any(left.values()) or time.monotonic() - started > limit_seconds:
                return time.monotonic() - started, left
            await asyncio.sleep(1)
    finally:
        await connection.close()


async def host_usage_mismatches(connection: asyncpg.Connection) -> list[dict[str, Any]]:
    """Compare each host's usage with the claims recorded on instances (current, new and old)."""
    expected: dict[str, Counter[str]] = defaultdict(Counter)
    rows = await connection.fetch(
        "SELECT host_id::text, flavor::text, new_host_id::text, new_flavor::text, "
        "old_host_id::text, old_flavor::text FROM instances"
    )
    for row in rows:
        for host_column, flavor_column in (("host_id", "flavor"), ("new_host_id", "new_flavor"),
                                           ("old_host_id", "old_flavor")):
            if row[host_column] is None or row[flavor_column] is None:
                continue
            flavor = json.loads(row[flavor_column])
            usage = expected[row[host_column]]
            usage["vcpus_used"] += int(flavor["vcpus"])
            usage["ram_used"] += int(flavor["ram"])
            usage["disk_used"] += int(flavor["disk"])
            usage["instance_count"] += 1
    mismatches = []
    for host in await connection.fetch(
        "SELECT id::text, name, vcpus_used, ram_used, disk_used, instance_count FROM hosts"
    ):
        for column in ("vcpus_used", "ram_used", "disk_used", "instance_count"):
            if host[column] != expected[host["id"]][column]:
                mismatches.append({"host": host["name"], "column": column, "stored": host[column],
                                   "sum_of_claims": expected[host["id"]][column]})
    return mismatches


async def failed_actions(connection: asyncpg.Connection) -> list[dict[str, Any]]:
    """Actions that failed for a reason other than a delete.

    The simulated driver fails only instances named with MYCLOUD_SIMULATED_FAIL_SPAWN's
    prefix, which the soak sets empty, and the soak's hosts have room for every claim,
    so each of these is a fault of the service.
    """
    rows = await connection.fetch(
        "SELECT id::text, instance_id::text, action, message, started_at::text FROM instance_actions "
        "WHERE status = 'FAILED' AND message NOT LIKE 'Cancelled%' ORDER BY started_at"
    )
    return [dict(row) for row in rows]


def worker_log_lines(log_dir: Path, instance_id: str) -> dict[str, list[str]]:
    """Collect the lifecycle workers' log lines about one instance, which show the process that ran each task."""
    lines = {}
    for path in sorted(log_dir.glob("worker-*.log")):
        found = [line for line in path.read_text(errors="replace").splitlines() if instance_id in line]
        lines[path.name] = found[:40]
    return lines


async def consistency(database_url: str, fleet: Fleet) -> dict[str, Any]:
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT i.id::text AS id, o.name AS organization, i.status, i.host_id IS NOT NULL AS placed "
            "FROM instances i JOIN organizations o ON o.id = i.organization_id"
        )
        stored = {row["id"]: row for row in rows}
        lost = [key for key, owner in fleet.created.items()
                if key not in stored or stored[key]["organization"] != owner]
        not_deleted = [{"id": key, "status": stored[key]["status"]} for key in fleet.deleted
                       if key in stored and stored[key]["status"] != "DELETED"]
        deleted_but_placed = [key for key, row in stored.items() if row["status"] == "DELETED" and row["placed"]]
        return {
            "acknowledged_creates": len(fleet.created),
            "acknowledged_deletes": len(fleet.deleted),
            "instances_by_status": dict(Counter(row["status"] for row in rows)),
            "lost": lost,
            "deleted_not_deleted": not_deleted,
            "deleted_still_placed": deleted_but_placed,
            "stuck": await stuck_work(connection),
            "host_usage_mismatches": await host_usage_mismatches(connection),
            "failed_actions": await failed_actions(connection),
        }
    finally:
        await connection.close()


async def create_organizations(database_url: str, count: int, clients: int) -> list[Organization]:
    """Create ``count`` organizations with a read/write token for each client in each.

    One token per client keeps every token far below the service's per-token rate
    limit (``MYCLOUD_RATE_LIMIT_PER_SECOND``), as many separate customers would be.
    """
    database = Database(database_url, pool_size=2)
    organizations = []
    try:
        for number in range(1, count + 1):
            name = f"soak{number}"
            await identity.create_organization(database, name)
            tokens = [
                await identity.create_token(database, name, name=f"soak-client-{client}",
                                            scopes=frozenset({"read", "write"}))
                for client in range(clients)
            ]
            organizations.append(Organization(name=name, tokens=tokens))
    finally:
        await database.dispose()
    return organizations


async def create_database(admin_url: str, name: str) -> dict[str, int]:
    """Create the database and return the server's connection limit and use at that moment."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
        return {
            "max_connections": int(await connection.fetchval("SHOW max_connections")),
            "reserved_connections": int(await connection.fetchval("SHOW superuser_reserved_connections")),
            "in_use_at_start": int(await connection.fetchval("SELECT count(*) FROM pg_stat_activity")),
        }
    finally:
        await connection.close()


def check_connection_room(server: dict[str, int], processes: int) -> int:
    """Return how many connections the service may open, and warn when the server lacks room.

    Each process holds up to MYCLOUD_DATABASE_POOL_SIZE connections and as many again
    in overflow. A request that finds the server full fails, which the soak counts.
    """
    pool_size = int(os.environ.get("MYCLOUD_DATABASE_POOL_SIZE", "10"))
    service_maximum = processes * 2 * pool_size
    room = server["max_connections"] - server["reserved_connections"] - server["in_use_at_start"]
    if room < service_maximum + 5:
        print(f"warning: the PostgreSQL server has room for {room} more connections, and the "
              f"service may open {service_maximum}; other clients of the server can make "
              "requests fail with 'too many clients'", flush=True)
    return service_maximum


async def drop_database(admin_url: str, name: str) -> None:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


def database_url_for(admin_url: str, name: str) -> str:
    base, _, _ = admin_url.rpartition("/")
    return f"{base}/{name}"


# --- the run --------------------------------------------------------------------------


async def seed(base_url: str, fleet: Fleet, recorder: Recorder, limiter: RateLimiter, per_organization: int) -> None:
    """Create the starting population over the API and wait until no instance is in BUILD."""
    client = Client(0, base_url, fleet, recorder, limiter)
    try:
        jobs = [organization for organization in fleet.organizations for _ in range(per_organization)]
        semaphore = asyncio.Semaphore(8)

        async def one(organization: Organization) -> None:
            async with semaphore:
                body, flavor = client.create_body(organization)
                response = await client.request("seed_create", organization, "POST", "/v1/instances", body=body)
                client.accept_create(organization, response, flavor, "seed_create")

        await asyncio.gather(*(one(organization) for organization in jobs))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            building = 0
            for organization in fleet.organizations:
                response = await client.request("seed_wait", organization, "GET", "/v1/instances?limit=1&status=BUILD")
                if response is not None and response.status_code == 200:
                    building += response.json()["meta"]["total"]
            if building == 0:
                return
            await asyncio.sleep(1)
        raise RuntimeError("seeded instances still in BUILD after 300 s")
    finally:
        await client.close()


async def listed_by_api(base_url: str, fleet: Fleet, recorder: Recorder, limiter: RateLimiter) -> dict[str, Any]:
    """Walk every organization's full list over the API and compare it with the acknowledged work.

    Returns the acknowledged, undeleted instances the list lacks and the deleted ones it shows.
    """
    client = Client(0, base_url, fleet, recorder, limiter)
    missing: list[str] = []
    reappeared: list[str] = []
    try:
        for organization in fleet.organizations:
            listed: set[str] = set()
            url: str | None = "/v1/instances?limit=1000"
            while url is not None:
                response = await client.request("final_list", organization, "GET", url)
                if response is None or response.status_code != 200:
                    raise RuntimeError(f"final list of {organization.name} failed: "
                                       f"{response.status_code if response else 'no response'}")
                page = response.json()
                listed.update(item["id"] for item in page["instances"])
                url = page["links"]["next"]
            mine = {key for key, owner in fleet.created.items() if owner == organization.name}
            deleted = {key for key, owner in fleet.deleted.items() if owner == organization.name}
            missing.extend(sorted(mine - deleted - listed))
            reappeared.extend(sorted(listed & deleted))
    finally:
        await client.close()
    return {"missing_from_list": missing, "deleted_but_listed": reappeared}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


def latency_table(recorder: Recorder) -> dict[str, dict[str, dict[str, float]]]:
    """{kind: {minute (1-based): {count, p50_ms, p99_ms}}}."""
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (minute, kind), values in sorted(recorder.latencies.items()):
        table[kind][str(minute + 1)] = {
            "count": len(values),
            "p50_ms": round(percentile(values, 0.50), 1),
            "p99_ms": round(percentile(values, 0.99), 1),
        }
    return dict(sorted(table.items()))


def failures_of(result: dict[str, Any], max_growth: float) -> list[str]:
    failures = []
    if result["server_errors"]:
        failures.append(f"responses with status 5xx: {len(result['server_errors'])}")
    if result["transport_errors"]:
        failures.append(f"requests without a response: {len(result['transport_errors'])}")
    checks = result["consistency"]
    for name in ("lost", "deleted_not_deleted", "deleted_still_placed", "host_usage_mismatches",
                 "failed_actions", "missing_from_list", "deleted_but_listed"):
        if checks[name]:
            failures.append(f"{name.replace('_', ' ')}: {len(checks[name])}")
    for name, rows in checks["stuck"].items():
        if rows:
            failures.append(f"stuck after the drain, {name.replace('_', ' ')}: {len(rows)}")
    for name, items in result["anomalies"].items():
        if items:
            failures.append(f"{name.replace('_', ' ')} during the traffic: {len(items)}")
    for name, figures in result["memory"]["growth"].items():
        if figures["growth"] >= max_growth:
            failures.append(f"memory of {name} grew {figures['growth']:.1%}")
    for name, code in result["processes"]["exited_during_run"].items():
        failures.append(f"{name} exited during the run with status {code}")
    for name, code in result["processes"]["exit_codes_after_sigterm"].items():
        if code != 0 and name not in result["processes"]["exited_during_run"]:
            failures.append(f"{name} exited with status {code} after SIGTERM")
    for change in result["processes"]["api_worker_replacements"]:
        failures.append(f"uvicorn replaced API worker {change['gone']} with {change['new']} "
                        f"during the {change['phase']} phase at {change['at']} UTC")
    return failures


def print_summary(result: dict[str, Any]) -> None:
    print("\n== soak summary ==")
    print(f"traffic: {result['config']['minutes']} min, {result['config']['clients']} clients, "
          f"target {result['config']['rate']} req/s; requests sent: {result['requests']['total']}, "
          f"achieved {result['requests']['per_second']} req/s")
    print("status codes:", json.dumps(result["requests"]["by_status"], sort_keys=True))
    for kind, counts in sorted(result["requests"]["by_kind"].items()):
        print(f"  {kind:<22} {json.dumps(counts, sort_keys=True)}")
    for item in result["server_errors"][:20]:
        print(f"  5xx {item['status']} {item['method']} {item['url']} request_id={item['request_id']}: {item['body'][:300]}")
    for item in result["transport_errors"][:20]:
        print(f"  no response: {item['method']} {item['url']}: {item['error']}")
    if result["unexpected_4xx"]:
        print(f"unexpected 4xx (first 5 of {len(result['unexpected_4xx'])}):")
        for item in result["unexpected_4xx"][:5]:
            print(f"  {item['kind']} {item['status']} {item['url']}: {item['body'][:200]}")

    print("\nlatency per minute (count / p50 ms / p99 ms):")
    minutes = sorted({int(m) for kinds in result["latency"].values() for m in kinds})
    print(f"  {'kind':<22}" + "".join(f"{'min ' + str(m):>22}" for m in minutes))
    for kind, by_minute in result["latency"].items():
        cells = []
        for minute in minutes:
            cell = by_minute.get(str(minute))
            cells.append(f"{cell['count']:>6} {cell['p50_ms']:>6.1f} {cell['p99_ms']:>7.1f}" if cell else f"{'-':>22}")
        print(f"  {kind:<22}" + "".join(f"{c:>22}" for c in cells))

    print("\nmemory (RSS MiB: end of minute 1 -> mean of last minute, growth):")
    for name, figures in result["memory"]["growth"].items():
        minutes_text = " ".join(f"{value / 1024:.1f}" for value in figures["minute_mean_kib"])
        print(f"  {name:<24} {figures['first_minute_end_kib'] / 1024:7.1f} -> "
              f"{figures['last_minute_mean_kib'] / 1024:7.1f}  {figures['growth']:+.1%}"
              f"   (mean per minute: {minutes_text})")

    print("CPU over the traffic (% of one core):", json.dumps(result["cpu_percent"]))

    checks = result["consistency"]
    print(f"\nconsistency after a {result['drain_seconds']:.0f} s drain:")
    print(f"  acknowledged creates {checks['acknowledged_creates']}, deletes {checks['acknowledged_deletes']}; "
          f"instances by status {json.dumps(checks['instances_by_status'], sort_keys=True)}")
    print(f"  lost {len(checks['lost'])}, deleted but not DELETED {len(checks['deleted_not_deleted'])}, "
          f"DELETED but placed {len(checks['deleted_still_placed'])}, "
          f"missing from the API list {len(checks['missing_from_list'])}, "
          f"deleted but listed {len(checks['deleted_but_listed'])}, "
          f"stuck {sum(len(rows) for rows in checks['stuck'].values())}, "
          f"host usage mismatches {len(checks['host_usage_mismatches'])}, "
          f"failed actions {len(checks['failed_actions'])}")
    for item in checks["failed_actions"][:5]:
        print(f"  failed {item['action']} of {item['instance_id']}: {item['message']}")
    print("  anomalies during traffic:", json.dumps({k: len(v) for k, v in result["anomalies"].items()}))
    print(f"  log lines at ERROR or with a traceback: {json.dumps(result['log_errors'])}")
    print("\nresult:", "FAIL" if result["failures"] else "PASS")
    for failure in result["failures"]:
        print("  -", failure)
    print(f"JSON: {result['json_path']}")


def markdown_report(result: dict[str, Any]) -> str:
    """Render the result as the tables of docs/soak.md, to paste there after a run."""
    config, requests, checks = result["config"], result["requests"], result["consistency"]
    lines = [
        f"Run of {config['started_at']}: {config['minutes']:g} min, {config['clients']} clients, "
        f"target {config['rate']:g} req/s, {config['organizations']} organizations of "
        f"{config['instances_per_organization']} instances, {config['api_workers']} API processes, "
        f"{config['lifecycle_workers']} lifecycle workers, driver step {config['step_delay']:g} s.",
        "",
        "| requests | achieved req/s | status codes | 5xx | no response |",
        "|---|---|---|---|---|",
        f"| {requests['total']:,} | {requests['per_second']:g} | "
        + ", ".join(f"{code}: {count:,}" for code, count in sorted(requests["by_status"].items()))
        + f" | {len(result['server_errors'])} | {len(result['transport_errors'])} |",
        "",
    ]
    minutes = sorted({int(m) for kinds in result["latency"].values() for m in kinds})
    first, last = minutes[0], minutes[-1]
    lines += [
        f"| request kind | requests | p50 / p99 ms, minute {first} | p50 / p99 ms, minute {last} "
        "| worst p99 ms (minute) |",
        "|---|---|---|---|---|",
    ]
    for kind, by_minute in result["latency"].items():
        count = sum(cell["count"] for cell in by_minute.values())
        worst_minute, worst = max(by_minute.items(), key=lambda item: item[1]["p99_ms"])

        def cell(minute: int, by_minute: dict[str, dict[str, float]] = by_minute) -> str:
            figures = by_minute.get(str(minute))
            return f"{figures['p50_ms']:.1f} / {figures['p99_ms']:.1f}" if figures else "-"

        lines.append(f"| {kind} | {count:,} | {cell(first)} | {cell(last)} | {worst['p99_ms']:.1f} ({worst_minute}) |")
    lines += [
        "",
        "| process | RSS MiB, end of minute 1 | mean RSS MiB, last minute | growth | max RSS MiB | CPU % of one core |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in result["memory"]["growth"].items():
        lines.append(
            f"| {name} | {figures['first_minute_end_kib'] / 1024:.1f} | {figures['last_minute_mean_kib'] / 1024:.1f} "
            f"| {figures['growth']:+.1%} | {figures['max_kib'] / 1024:.1f} | {result['cpu_percent'].get(name, '-')} |"
        )
    cpu = result["cpu_percent"]
    lines += [
        "",
        f"Whole machine over the traffic: {cpu.get('machine (all cores, % of one core)', '-')}% of one core "
        f"({config['machine']['cpus']} cores); the soak clients themselves: "
        f"{cpu.get('soak clients (this script)', '-')}%.",
    ]
    stuck = sum(len(rows) for rows in checks["stuck"].values())
    lines += [
        "",
        "| check | result |",
        "|---|---|",
        f"| creates acknowledged with 202 / lost | {checks['acknowledged_creates']:,} / {len(checks['lost'])} |",
        f"| deletes acknowledged / not DELETED / still placed / still listed | {checks['acknowledged_deletes']:,} / "
        f"{len(checks['deleted_not_deleted'])} / {len(checks['deleted_still_placed'])} / {len(checks['deleted_but_listed'])} |",
        f"| live instances missing from the API list | {len(checks['missing_from_list'])} |",
        f"| stuck after a {result['drain_seconds']:g} s drain (tasks, instances, actions) | {stuck} |",
        f"| host usage mismatches | {len(checks['host_usage_mismatches'])} |",
        f"| failed actions (other than cancellations) | {len(checks['failed_actions'])} |",
        f"| Idempotency-Key retries that created a second instance | {len(result['anomalies']['idempotency_mismatch'])} |",
        f"| deleted instances seen again during the traffic | {len(result['anomalies']['reappeared'])} |",
        f"| result | {'FAIL: ' + '; '.join(result['failures']) if result['failures'] else 'PASS'} |",
    ]
    return "\n".join(lines) + "\n"


def log_error_counts(log_dir: Path) -> dict[str, int]:
    counts = {}
    for path in sorted(log_dir.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        counts[path.name] = sum(1 for line in lines if " ERROR " in line or line.startswith("Traceback"))
    return counts


async def soak(args: argparse.Namespace) -> int:
    log_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="mycloud-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.output) if args.output else log_dir / "result.json"
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    database_name = f"mycloud_soak_{time.strftime('%Y%m%d%H%M%S')}_{os.getpid()}"
    database_url = database_url_for(args.postgres_url, database_name)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MYCLOUD_DATABASE_URL": database_url,
        "MYCLOUD_LOG_LEVEL": args.log_level,
        "MYCLOUD_SIMULATED_HOSTS": SIMULATED_HOSTS,
        "MYCLOUD_DRIVER_STEP_DELAY": str(args.step_delay),
        # No instance is failed on purpose, so every failed action is the service's fault.
        "MYCLOUD_SIMULATED_FAIL_SPAWN": "",
        "MYCLOUD_SIMULATED_PAUSE_PREFIX": "",
    }
    print(f"database {database_name}, service at {base_url}, logs in {log_dir}", flush=True)

    server_connections = await create_database(args.postgres_url, database_name)
    server_connections["service_maximum"] = check_connection_room(
        server_connections, args.api_workers + args.lifecycle_workers
    )
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        run_admin(["db", "upgrade"], env)
        organizations = await create_organizations(database_url, args.organizations, args.clients)

        processes["serve"] = start_process(
            ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.api_workers)],
            env, log_dir / "serve.log",
        )
        # Workers log each lifecycle transition at INFO, a few lines per second in all.
        # Those lines show which process ran each task of an instance that went wrong.
        worker_env = {**env, "MYCLOUD_LOG_LEVEL": args.worker_log_level}
        for number in range(1, args.lifecycle_workers + 1):
            processes[f"worker-{number}"] = start_process(["worker"], worker_env, log_dir / f"worker-{number}.log")
        await wait_until_ready(base_url, processes["serve"], args.api_workers)

        fleet = Fleet(organizations=organizations, target_population=args.instances)
        recorder = Recorder()
        limiter = RateLimiter(args.rate)
        api_worker_changes: list[dict[str, Any]] = []
        watcher = asyncio.create_task(watch_api_workers(processes["serve"].pid, recorder, api_worker_changes))
        recorder.phase = "seed"
        seed_started = time.monotonic()
        await seed(base_url, fleet, recorder, limiter, args.instances)
        print(f"seeded {len(fleet.created)} instances in {time.monotonic() - seed_started:.0f} s", flush=True)

        # Traffic, with the memory sampler beside it.
        duration = args.minutes * 60
        sampler = MemorySampler(processes["serve"], [p for n, p in processes.items() if n != "serve"],
                                args.sample_seconds)
        recorder.phase = "traffic"
        recorder.traffic_start = time.monotonic()
        recorder.last_minute = max(0, math.ceil(args.minutes) - 1)
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(recorder.traffic_start, stop_sampling))
        clients = [Client(number, base_url, fleet, recorder, limiter) for number in range(args.clients)]
        print(f"traffic for {args.minutes} min from {args.clients} clients at up to {args.rate} req/s", flush=True)
        own_cpu_before = time.process_time()
        try:
            await asyncio.gather(*(client.run(recorder.traffic_start + duration) for client in clients))
        finally:
            traffic_seconds = time.monotonic() - recorder.traffic_start
            own_cpu_percent = round(100 * (time.process_time() - own_cpu_before) / traffic_seconds, 1)
            stop_sampling.set()
            await sampling
            for client in clients:
                await client.close()

        recorder.phase = "drain"
        drain_seconds, _ = await drain(database_url, args.drain_seconds)
        checks = await consistency(database_url, fleet)
        checks.update(await listed_by_api(base_url, fleet, recorder, limiter))
        watcher.cancel()
        exited = {name: code for name, process in processes.items() if (code := process.poll()) is not None}
        traffic_requests = sum(len(values) for values in recorder.latencies.values())
        result: dict[str, Any] = {
            "config": {
                "minutes": args.minutes, "clients": args.clients, "rate": args.rate,
                "api_workers": args.api_workers, "lifecycle_workers": args.lifecycle_workers,
                "organizations": args.organizations, "instances_per_organization": args.instances,
                "step_delay": args.step_delay, "simulated_hosts": SIMULATED_HOSTS,
                "started_at": started_at,
                "machine": {"cpus": os.cpu_count(), "memory_kib": _memory_total_kib()},
                "postgres_connections": server_connections,
            },
            "requests": {
                "total": traffic_requests,
                "per_second": round(traffic_requests / traffic_seconds, 1),
                "by_status": dict(recorder.statuses),
                "by_kind": {kind: dict(counts) for kind, counts in recorder.statuses_by_kind.items()},
            },
            "latency": latency_table(recorder),
            "server_errors": recorder.server_errors,
            "transport_errors": recorder.transport_errors,
            "unexpected_4xx": recorder.unexpected,
            "anomalies": {name: recorder.anomalies.get(name, []) for name in ("lost", "reappeared", "idempotency_mismatch")},
            "memory": {
                "interval_seconds": args.sample_seconds,
                "growth": sampler.growth(traffic_seconds, args.minutes),
                "samples": sampler.samples,
            },
            "cpu_percent": {**sampler.cpu_usage(), "soak clients (this script)": own_cpu_percent},
            "drain_seconds": round(drain_seconds, 1),
            "consistency": checks,
            "processes": {
                "exited_during_run": exited,
                "api_worker_replacements": api_worker_changes,
            },
        }
    finally:
        exit_codes = {name: stop_process(process) for name, process in processes.items()}
        if args.keep:
            print(f"kept database {database_url}", flush=True)
        else:
            await drop_database(args.postgres_url, database_name)

    result["processes"]["exit_codes_after_sigterm"] = exit_codes
    result["log_errors"] = log_error_counts(log_dir)
    for item in result["consistency"]["failed_actions"][:10]:
        item["worker_log_lines"] = worker_log_lines(log_dir, item["instance_id"])
    result["failures"] = failures_of(result, args.max_memory_growth)
    result["json_path"] = str(json_path)
    json_path.write_text(json.dumps(result, indent=1))
    markdown_path = json_path.with_suffix(".md")
    markdown_path.write_text(markdown_report(result))
    print_summary(result)
    print(f"tables for docs/soak.md: {markdown_path}")
    return 1 if result["failures"] else 0


def _memory_total_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    # Traffic.
    parser.add_argument("--minutes", type=float, default=10, help="Minutes of mixed traffic. [default: 10]")
    parser.add_argument("--rate", type=float, default=200,
                        help="Maximum requests per second of all clients together. [default: 200]")
    parser.add_argument("--clients", type=int, default=32,
                        help="Concurrent clients, each with its own token in each organization. [default: 32]")
    parser.add_argument("--organizations", type=int, default=3, help="Organizations. [default: 3]")
    parser.add_argument("--instances", type=int, default=100,
                        help="Instances seeded per organization; creates and deletes keep about this many. [default: 100]")

    # The service.
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes (serve --workers). [default: 2]")
    parser.add_argument("--lifecycle-workers", type=int, default=2,
                        help="Separate `mycloud-compute worker` processes. [default: 2]")
    parser.add_argument("--step-delay", type=float, default=0.5,
                        help="MYCLOUD_DRIVER_STEP_DELAY: seconds per simulated driver step. [default: 0.5]")

    # Measurements and checks.
    parser.add_argument("--sample-seconds", type=float, default=5, help="Seconds between RSS samples. [default: 5]")
    parser.add_argument("--drain-seconds", type=float, default=120,
                        help="Maximum wait for lifecycle work to finish after the traffic. [default: 120]")
    parser.add_argument("--max-memory-growth", type=float, default=0.10,
                        help="Fail when a process's memory grows by this fraction or more. [default: 0.10]")

    # Where things go.
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="A database on the server where the soak creates and drops its own database.")
    parser.add_argument("--log-level", default="WARNING",
                        help="MYCLOUD_LOG_LEVEL of the API processes. [default: WARNING]")
    parser.add_argument("--worker-log-level", default="INFO",
                        help="MYCLOUD_LOG_LEVEL of the lifecycle workers. [default: INFO]")
    parser.add_argument("--output-dir", default="",
                        help="Directory for the service logs and result.json. [default: a new temporary directory]")
    parser.add_argument("--output", default="", help="Path of the JSON result. [default: OUTPUT_DIR/result.json]")
    parser.add_argument("--keep", action="store_true", help="Keep the database at the end.")
    args = parser.parse_args()
    if args.minutes < 1:
        parser.error("--minutes must be at least 1: memory growth compares the first and the last minute")
    return args


def main() -> None:
    sys.exit(asyncio.run(soak(parse_arguments())))


if __name__ == "__main__":
    main()
