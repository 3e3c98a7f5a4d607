"""SIGTERM to the API process while clients send creates and lists, on SQLite and PostgreSQL.

The API runs as in production, through ``mycloud-compute serve`` (uvicorn with a
graceful-shutdown timeout of GRACEFUL_SECONDS). Each client sends every create with
its own Idempotency-Key and X-Request-Id. After the signal:

- every request that got a response got its normal one (200 or 202), never a 5xx;
- a request with no answer either was refused at connect, or was lost on the
  wire. Each lost create is sent again with the same key after a restart. It must
  get 202, and the create action of the instance it names must carry the retry's
  request id: when it carries the first request's id, the first request had been
  served and its answer cut off;
- the process finishes its shutdown and exits within the graceful timeout;
- after a restart the organization holds exactly the acknowledged instances plus
  one per retried create, each with its create task, and all of them become ACTIVE.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import ApiServer, Backend, Process, free_port, make_org, start_process
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE
from sqlalchemy import select

from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import tasks

CLIENTS = 6
GRACEFUL_SECONDS = 30  # what `mycloud-compute serve` passes to uvicorn
LOAD_BEFORE_SIGNAL = 1.0
READY_TIMEOUT = 30.0
ACTIVE_TIMEOUT = 30.0


@dataclass
class Sent:
    """One create or list and what came back: a status, or the transport error."""

    kind: str
    request_id: str
    status: int | None = None
    error: str | None = None
    refused: bool = False
    body: dict[str, Any] | None = None
    idempotency_key: str | None = None
    instance_id: str | None = None
    after_signal: bool = False


@dataclass
class Clients:
    base_url: str
    token: str
    signalled: threading.Event = field(default_factory=threading.Event)
    sent: list[Sent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, number: int) -> None:
        """Send creates and lists until the server refuses a connection."""
        with httpx.Client(base_url=self.base_url, timeout=GRACEFUL_SECONDS,
                          headers={"Authorization": f"Bearer {self.token}"}) as client:
            sequence = 0
            while True:
                sequence += 1
                key = uuid.uuid4().hex
                body = {"name": f"sigterm-{number}-{sequence}", "flavor_id": SMALL_FLAVOR,
                        "image_id": UBUNTU_IMAGE}
                create = Sent("create", f"sigterm-{key}", body=body, idempotency_key=key)
                if not self.send(client, create, "POST", "/v1/instances", json=body,
                                 headers={"Idempotency-Key": key}):
                    return
                listing = Sent("list", f"sigterm-list-{uuid.uuid4().hex}")
                if not self.send(client, listing, "GET", "/v1/instances", params={"limit": 5}):
                    return

    def send(self, client: httpx.Client, sent: Sent, method: str, path: str, **options: Any) -> bool:
        """Send one request and record it; return False once the server refuses connections."""
        sent.after_signal = self.signalled.is_set()
        headers = {**options.pop("headers", {}), "X-Request-Id": sent.request_id}
        try:
            response = client.request(method, path, headers=headers, **options)
        except httpx.ConnectError as exc:
            sent.error, sent.refused = repr(exc), True
        except httpx.TransportError as exc:
            sent.error = repr(exc)
        else:
            sent.status = response.status_code
            if sent.kind == "create" and response.status_code == 202:
                sent.instance_id = response.json()["id"]
        with self.lock:
            self.sent.append(sent)
        return not sent.refused


def serve(backend: Backend, port: int, log_path: Path) -> Process:
    env = {"MYCLOUD_DATABASE_URL": backend.url, "MYCLOUD_DRIVER_STEP_DELAY": "0",
           "MYCLOUD_WORKER_POLL_INTERVAL": "0.05", "MYCLOUD_RATE_LIMIT_PER_SECOND": "0"}
    return start_process(["-m", "mycloud_compute.cli.admin", "serve", "--host", "127.0.0.1",
                          "--port", str(port)], env, log_path)


def wait_ready(base_url: str, process: Process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        assert process.popen.poll() is None, process.log()
        try:
            if httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the API was not ready in {READY_TIMEOUT} s:\n{process.log()}")


def wait_all_active(client: httpx.Client, instance_ids: set[str]) -> None:
    deadline = time.monotonic() + ACTIVE_TIMEOUT
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        listed = client.get("/v1/instances", params={"limit": 1000}).json()["instances"]
        statuses = {item["id"]: item["status"] for item in listed if item["id"] in instance_ids}
        if set(statuses.values()) == {"ACTIVE"} and len(statuses) == len(instance_ids):
            return
        time.sleep(0.2)
    raise AssertionError(f"not every instance became ACTIVE in {ACTIVE_TIMEOUT} s: {statuses}")


def create_tasks(backend: Backend) -> set[str]:
    async def read(db: Database) -> set[str]:
        async with db.snapshot() as conn:
            rows = (await conn.execute(select(tasks.c.instance_id).where(tasks.c.action == "create"))).all()
        return {str(row.instance_id) for row in rows}

    return backend.run(read)  # type: ignore[no-any-return]


def test_sigterm_under_load(fresh_backend: Backend, tmp_path: Path) -> None:
    backend = fresh_backend
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api = serve(backend, port, tmp_path / "serve.log")
    worker = None
    if backend.kind == "postgresql":
        worker = start_process(["-m", "mycloud_compute.worker"], {"MYCLOUD_DATABASE_URL": backend.url,
                               "MYCLOUD_DRIVER_STEP_DELAY": "0"}, tmp_path / "worker.log")
    restarted = None
    try:
        wait_ready(base_url, api)
        org = make_org(ApiServer(backend, base_url, {}), "sigterm")
        clients = Clients(base_url, org.tokens["rw"])
        threads = [threading.Thread(target=clients.run, args=(number,)) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        time.sleep(LOAD_BEFORE_SIGNAL)
        clients.signalled.set()
        api.popen.send_signal(signal.SIGTERM)
        try:
            return_code = api.popen.wait(GRACEFUL_SECONDS + 5)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the API did not exit within {GRACEFUL_SECONDS} s:\n{api.log()}") from exc
        for thread in threads:
            thread.join()
        # uvicorn re-raises the signal once its shutdown is complete, so the exit
        # status says SIGTERM; the log says whether the shutdown finished.
        assert return_code in (0, -signal.SIGTERM), api.log()[-4000:]
        assert "Application shutdown complete" in api.log(), api.log()[-4000:]

        sent = clients.sent
        answered = [item for item in sent if item.status is not None]
        assert {item.status for item in answered} <= {200, 202}, [
            (item.kind, item.status) for item in answered if item.status not in (200, 202)]
        lost = [item for item in sent if item.error is not None and not item.refused]

        # The same command again; on PostgreSQL the worker has kept running.
        restarted_port = free_port()
        restarted = serve(backend, restarted_port, tmp_path / "serve-again.log")
        restarted_url = f"http://127.0.0.1:{restarted_port}"
        wait_ready(restarted_url, restarted)
        with ApiServer(backend, restarted_url, {}).client(org.tokens["rw"]) as client:
            cut_off = []
            retried = set()
            for item in lost:
                if item.kind != "create":
                    continue
                response = client.post("/v1/instances", json=item.body, headers={
                    "Idempotency-Key": item.idempotency_key or "", "X-Request-Id": f"retry-{item.request_id}"})
                assert response.status_code == 202, response.text
                instance_id = response.json()["id"]
                retried.add(instance_id)
                actions = client.get(f"/v1/instances/{instance_id}/actions").json()["actions"]
                creator = [action["request_id"] for action in actions if action["action"] == "create"]
                if creator == [item.request_id]:
                    cut_off.append(item.request_id)
            assert cut_off == [], f"served but the answer was cut off: {cut_off}"

            acknowledged = {item.instance_id for item in sent if item.instance_id is not None}
            listed = client.get("/v1/instances", params={"limit": 1000}).json()["instances"]
            assert sorted(item["id"] for item in listed) == sorted(acknowledged | retried)
            assert len(listed) == len(acknowledged) + len(retried)
            assert create_tasks(backend) >= acknowledged | retried
            wait_all_active(client, acknowledged | retried)
        assert "unhandled error request_id=" not in api.log() + restarted.log()
    finally:
        api.stop()
        if worker is not None:
            worker.stop()
        if restarted is not None:
            restarted.stop()
