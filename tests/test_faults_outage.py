"""PostgreSQL stopped for 10 s under a steady stream of creates and lists.

The test runs its own PostgreSQL server (see private_postgres.py), because it stops
and starts it; the machine's server is never touched. The API and a standalone
worker run against it as in production. While the server is down, every request
must fail fast with a 503 in the error envelope and a Retry-After header, never a
500 and never a hang. The client's timeout is the functional bound: a request that
waits longer than REQUEST_TIMEOUT fails the test. Once the server is back, the
service must serve again by itself, and every create it acknowledged must exist and
reach a final state.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import IN_CI, ApiServer, Backend, free_port, make_org, start_api
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error
from private_postgres import PrivatePostgres, find_bin_dir, private_postgres

from mycloud_compute.persistence.migrate import upgrade

OUTAGE_SECONDS = 10.0
CLIENTS = 3
# Each client sends a create and a list about four times a second: a steady stream,
# and few enough refused creates to retry them all afterwards.
PACING_SECONDS = 0.25
# A request that takes longer than this fails the test. The service must respond
# within its own database timeouts (connect and pool wait, 5 s each) plus slack.
REQUEST_TIMEOUT = httpx.Timeout(8.0)
RECOVERY_TIMEOUT = 20.0
FINAL_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def private_server() -> Iterator[PrivatePostgres]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl); set MYCLOUD_TEST_POSTGRES_BIN"
        if IN_CI:
            pytest.fail(f"{reason}; the PostgreSQL fault tests must run under CI=true")
        pytest.skip(reason)
    with private_postgres(bin_dir, free_port()) as server:
        yield server


@dataclass
class Outcome:
    """What one request got: a status and a Retry-After value, or a transport error."""

    kind: str  # "create" or "list"
    phase: str  # "before", "stopping", "outage" or "after"
    status: int | None
    retry_after: str | None
    error: str | None
    idempotency_key: str | None = None
    instance_id: str | None = None
    body: dict[str, str] | None = None


@dataclass
class Load:
    """Client threads that each alternate a create and a list until stopped."""

    server: ApiServer
    token: str
    phase: str = "before"
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def run_client(self, number: int) -> None:
        with httpx.Client(base_url=self.server.base_url, timeout=REQUEST_TIMEOUT,
                          headers={"Authorization": f"Bearer {self.token}"}) as client:
            sequence = 0
            while not self.stop.is_set():
                sequence += 1
                key = f"outage-{number}-{sequence}-{uuid.uuid4().hex[:8]}"
                body = {"name": f"outage-{number}-{sequence}", "flavor_id": SMALL_FLAVOR,
                        "image_id": UBUNTU_IMAGE}
                self.send("create", lambda body=body, key=key: client.post(
                    "/v1/instances", json=body, headers={"Idempotency-Key": key}), key, body)
                self.send("list", lambda: client.get("/v1/instances", params={"limit": 5}), None, None)
                time.sleep(PACING_SECONDS)

    def send(self, kind: str, call: Callable[[], httpx.Response], key: str | None,
             body: dict[str, str] | None) -> None:
        started_in = self.phase
        try:
            response = call()
        except httpx.HTTPError as exc:
            phase = started_in if started_in == self.phase else "stopping"
            self.record(Outcome(kind, phase, None, None, repr(exc), key, None, body))
            return
        # A request that overlaps a change of phase belongs to neither phase.
        phase = started_in if started_in == self.phase else "stopping"
        instance_id = None
        if kind == "create" and response.status_code == 202:
            instance_id = response.json()["id"]
        if response.status_code >= 500:
            # A failed check here would end only this thread; record it for the test.
            try:
                assert_error(response, 503, "service_unavailable")
            except AssertionError:
                self.record(Outcome(kind, phase, response.status_code, None, response.text, key))
                return
        self.record(Outcome(kind, phase, response.status_code, response.headers.get("retry-after"),
                            None, key, instance_id, body))


def wait_until_listing_works(server: ApiServer, token: str) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        while time.monotonic() < deadline:
            if client.get("/v1/instances", params={"limit": 1}).status_code == 200:
                return
            time.sleep(0.2)
    raise AssertionError(f"the API did not serve a list within {RECOVERY_TIMEOUT} s of the restart:\n"
                         f"{server.logs()[-6000:]}")


def wait_final(client: httpx.Client, instance_ids: set[str], server: ApiServer) -> dict[str, dict[str, object]]:
    """Poll until every instance is ACTIVE or ERROR with no task state; return them."""
    deadline = time.monotonic() + FINAL_TIMEOUT
    pending: set[str] = set(instance_ids)
    while time.monotonic() < deadline:
        response = client.get("/v1/instances", params={"limit": 1000})
        assert response.status_code == 200, response.text
        listed = {item["id"]: item for item in response.json()["instances"] if item["id"] in instance_ids}
        assert set(listed) == instance_ids
        pending = {instance_id for instance_id, item in listed.items()
                   if item["status"] not in ("ACTIVE", "ERROR") or item["task_state"] is not None}
        if not pending:
            return listed
        time.sleep(0.2)
    raise AssertionError(f"{len(pending)} instances never reached a final state:\n{server.logs()[-6000:]}")


def test_postgres_outage_under_load(private_server: PrivatePostgres, tmp_path: Path) -> None:
    name = f"mycloud_outage_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(private_server.execute(f'CREATE DATABASE "{name}"'))
    backend = Backend("postgresql", private_server.url(name))
    upgrade(backend.url)
    server = start_api(backend, tmp_path, driver_step_delay="0.05", task_lease_seconds="3",
                       worker_concurrency="32")
    try:
        org = make_org(server)
        load = Load(server, org.tokens["rw"])
        threads = [threading.Thread(target=load.run_client, args=(number,)) for number in range(CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(2)
            load.phase = "stopping"
            private_server.stop("fast")
            load.phase = "outage"
            time.sleep(OUTAGE_SECONDS)
            load.phase = "after"
            private_server.start()
            wait_until_listing_works(server, org.tokens["rw"])
            time.sleep(0.5)  # a few more rounds of requests after the recovery
        finally:
            load.stop.set()
            for thread in threads:
                thread.join()

        outcomes = load.outcomes
        assert [o for o in outcomes if o.error is not None] == []
        assert [o for o in outcomes if o.status is not None and o.status >= 500 and o.status != 503] == []
        unavailable = [o for o in outcomes if o.status == 503]
        assert all(o.retry_after is not None and o.retry_after.isdigit() for o in unavailable)
        during = [o for o in outcomes if o.phase == "outage"]
        assert during and {o.status for o in during} == {503}, {o.status for o in during}
        assert {o.status for o in outcomes if o.phase == "before"} == {200, 202}

        with org.client() as client:
            acknowledged = {o.instance_id for o in outcomes if o.instance_id is not None}
            listed = {item["id"]: item for item in
                      client.get("/v1/instances", params={"limit": 1000}).json()["instances"]}
            assert set(listed) >= acknowledged
            # A refused create may still have committed when the connection broke during
            # COMMIT. Such an instance must be the one its Idempotency-Key names: a retry
            # with the key returns it instead of creating another.
            unacknowledged = {item["name"]: instance_id for instance_id, item in listed.items()
                              if instance_id not in acknowledged}
            for outcome in outcomes:
                if outcome.kind == "create" and outcome.body and outcome.body["name"] in unacknowledged:
                    response = client.post("/v1/instances", json=outcome.body,
                                           headers={"Idempotency-Key": outcome.idempotency_key or ""})
                    assert response.status_code == 202, response.text
                    assert response.json()["id"] == unacknowledged.pop(outcome.body["name"])
            assert unacknowledged == {}, "instances that no request created"

            final = wait_final(client, acknowledged, server)
        for instance in final.values():
            if instance["status"] == "ERROR":
                assert instance["fault"], instance
        assert "unhandled error request_id=" not in server.logs(), server.logs()[-6000:]
    finally:
        server.stop()
        if private_server.is_running():
            asyncio.run(private_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_no_free_connection_slot_is_503(private_server: PrivatePostgres, tmp_path: Path) -> None:
    """A database that accepts no more connections: requests get a 503, then work again.

    The server answers "too many connections" (SQLSTATE 53300) when its slots or the
    database's CONNECTION LIMIT are used up. The limit does not apply to superusers,
    so the service connects as a role of its own here.
    """
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    role, name = f"mycloud_role_{suffix}", f"mycloud_slots_{suffix}"
    asyncio.run(private_server.execute(f'CREATE ROLE "{role}" LOGIN'))
    asyncio.run(private_server.execute(f'CREATE DATABASE "{name}" OWNER "{role}"'))
    backend = Backend("postgresql", private_server.url(name).replace("postgres@", f"{role}@", 1))
    upgrade(backend.url)
    server = start_api(backend, tmp_path)
    try:
        org = make_org(server)
        # Drop the service's open connections, then allow no new ones.
        asyncio.run(private_server.execute(f'ALTER DATABASE "{name}" CONNECTION LIMIT 0'))
        asyncio.run(private_server.execute(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        with httpx.Client(base_url=server.base_url, timeout=REQUEST_TIMEOUT,
                          headers={"Authorization": f"Bearer {org.tokens['rw']}"}) as client:
            for _ in range(3):
                response = client.get("/v1/instances")
                assert_error(response, 503, "service_unavailable")
                assert response.headers["retry-after"].isdigit()
            asyncio.run(private_server.execute(f'ALTER DATABASE "{name}" CONNECTION LIMIT -1'))
            assert client.get("/v1/instances").status_code == 200
        assert "unhandled error request_id=" not in server.logs(), server.logs()[-6000:]
    finally:
        server.stop()
        asyncio.run(private_server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        asyncio.run(private_server.execute(f'DROP ROLE IF EXISTS "{role}"'))
