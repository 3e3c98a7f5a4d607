"""A worker killed with SIGKILL in every lifecycle step, on SQLite and on PostgreSQL.

One test per database brings an instance into each step at the same time, kills
the process that runs the worker and starts a replacement. It then checks what is
left: no instance in a task state and no unfinished task. Host usage must equal the
claims the instances record, ports must belong to live instances only, and each
instance must be in the state its action promised.

Steps with a driver call (create's BLOCK_DEVICE_MAPPING, NETWORKING and SPAWNING,
delete, stop, start, both reboots, resize's RESIZE_MIGRATING and RESIZE_FINISH,
revert-resize) are held with ``MYCLOUD_SIMULATED_PAUSE_PREFIX``: the instance is
renamed so that the simulated driver pauses in that operation. Steps without one
(create's SCHEDULING, resize's RESIZE_PREP, confirm-resize) run in one transaction
each; SCHEDULING's host claim shares its transaction with the start of
BLOCK_DEVICE_MAPPING. On PostgreSQL the test holds every host row locked, so that the worker blocks
inside that transaction on its host claim or release, and kills it there. On SQLite
a killed transaction is rolled back by SQLite itself and cannot be held open from
outside, so those three steps run on PostgreSQL only.

On PostgreSQL the killed process is the standalone worker and a second worker
takes over once the short lease expires. On SQLite the worker runs inside the API
process, so the API process is killed and started again, and its embedded worker
queues the orphaned tasks again at start-up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
from conftest import ApiServer, Backend, make_org, start_api, start_process
from helpers import MEDIUM_FLAVOR, SMALL_FLAVOR, create_instance, wait_for
from sqlalchemy import select

from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import instances, ports, tasks

PAUSE = "pause-"
LEASE_SECONDS = "3"
RECOVERY_TIMEOUT = 40.0


@dataclass
class Case:
    """One step to kill the worker in: how to reach it and what the action promises."""

    step: str
    prepare: str  # ACTIVE, SHUTOFF, VERIFY_RESIZE, or "" for a create
    operation: str  # the driver operation to pause in; "" for a step held by a lock
    act: Callable[[httpx.Client, str], httpx.Response] | None  # None: the step is a create
    status: str  # DELETED, or the status the instance ends in
    flavor: str | None = None
    instance_id: str = ""


def _action(name: str, body: dict[str, Any] | None = None) -> Callable[[httpx.Client, str], httpx.Response]:
    def act(client: httpx.Client, instance_id: str) -> httpx.Response:
        return client.post(f"/v1/instances/{instance_id}/actions/{name}", json=body or {})

    return act


def _delete(client: httpx.Client, instance_id: str) -> httpx.Response:
    return client.delete(f"/v1/instances/{instance_id}")


RESIZE = _action("resize", {"flavor_id": MEDIUM_FLAVOR})


def driver_cases() -> list[Case]:
    return [
        Case("BLOCK_DEVICE_MAPPING", "", "prepare_block_devices", None, "ACTIVE", SMALL_FLAVOR),
        Case("NETWORKING", "", "plug_vifs", None, "ACTIVE", SMALL_FLAVOR),
        Case("SPAWNING", "", "spawn", None, "ACTIVE", SMALL_FLAVOR),
        Case("DELETING", "ACTIVE", "destroy", _delete, "DELETED"),
        Case("POWERING_OFF", "ACTIVE", "power_off", _action("stop"), "SHUTOFF", SMALL_FLAVOR),
        Case("POWERING_ON", "SHUTOFF", "power_on", _action("start"), "ACTIVE", SMALL_FLAVOR),
        Case("REBOOTING", "ACTIVE", "reboot", _action("reboot", {"type": "SOFT"}), "ACTIVE", SMALL_FLAVOR),
        Case("REBOOTING_HARD", "ACTIVE", "reboot", _action("reboot", {"type": "HARD"}), "ACTIVE", SMALL_FLAVOR),
        Case("RESIZE_MIGRATING", "ACTIVE", "power_off", RESIZE, "VERIFY_RESIZE", MEDIUM_FLAVOR),
        Case("RESIZE_FINISH", "ACTIVE", "power_on", RESIZE, "VERIFY_RESIZE", MEDIUM_FLAVOR),
        Case("revert-resize", "VERIFY_RESIZE", "power_off", _action("revert-resize"), "ACTIVE", SMALL_FLAVOR),
    ]


def locked_cases() -> list[Case]:
    """Steps without a driver call; each claims or releases capacity on a host row."""
    return [
        Case("SCHEDULING", "", "", None, "ACTIVE", SMALL_FLAVOR),
        Case("RESIZE_PREP", "ACTIVE", "", RESIZE, "VERIFY_RESIZE", MEDIUM_FLAVOR),
        Case("confirm-resize", "VERIFY_RESIZE", "", _action("confirm-resize"), "ACTIVE", MEDIUM_FLAVOR),
    ]


def _accepted(response: httpx.Response) -> None:
    assert response.status_code == 202, response.text


def prepare(client: httpx.Client, cases: list[Case]) -> None:
    """Bring every case's instance to its starting status, all instances at once."""
    prepared = [case for case in cases if case.prepare]
    for case in prepared:
        case.instance_id = create_instance(client, f"fault-{case.step.lower()}")["id"]
    for case in prepared:
        wait_for(client, case.instance_id, status="ACTIVE")
    for case in prepared:
        if case.prepare == "SHUTOFF":
            _accepted(_action("stop")(client, case.instance_id))
        elif case.prepare == "VERIFY_RESIZE":
            _accepted(RESIZE(client, case.instance_id))
    for case in prepared:
        wait_for(client, case.instance_id, status=case.prepare)


def start_driver_cases(client: httpx.Client, cases: list[Case]) -> None:
    """Rename each instance after the operation to pause in, then start its step."""
    for case in cases:
        name = f"{PAUSE}{case.operation}-{case.step.lower()}"
        if case.act is None:
            case.instance_id = create_instance(client, name)["id"]
            continue
        renamed = client.patch(f"/v1/instances/{case.instance_id}", json={"name": name})
        assert renamed.status_code == 200, renamed.text
        _accepted(case.act(client, case.instance_id))


def wait_until(check: Callable[[], bool], what: str, server: ApiServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}:\n{server.logs()[-6000:]}")
        time.sleep(0.05)


def paused_in_driver(server: ApiServer, cases: list[Case]) -> bool:
    logs = server.logs()
    return all(f"simulated driver paused operation={case.operation} instance={case.instance_id}" in logs
               for case in cases)


def read_state(backend: Backend) -> tuple[list[host_store.Host], list[Any], list[Any], list[Any]]:
    """Hosts, instances, tasks and ports, read in one snapshot."""

    async def read(db: Database) -> tuple[list[host_store.Host], list[Any], list[Any], list[Any]]:
        async with db.reader.connect() as conn:
            if not db.is_sqlite:
                conn = await conn.execution_options(isolation_level="REPEATABLE READ")
            async with conn.begin():
                hosts = await host_store.list_hosts(conn)
                instance_rows = list((await conn.execute(select(instances))).all())
                task_rows = list((await conn.execute(select(tasks))).all())
                port_rows = list((await conn.execute(select(ports))).all())
        return hosts, instance_rows, task_rows, port_rows

    return backend.run(read)  # type: ignore[no-any-return]


def all_settled(backend: Backend) -> bool:
    _, instance_rows, task_rows, _ = read_state(backend)
    return all(row.task_state is None for row in instance_rows) and all(
        row.state in ("SUCCEEDED", "FAILED", "CANCELLED") for row in task_rows
    )


def assert_consistent(backend: Backend) -> None:
    """No task state, no unfinished task, usage equal to the recorded claims, no stray port."""
    hosts, instance_rows, task_rows, port_rows = read_state(backend)
    assert [(row.name, row.task_state) for row in instance_rows if row.task_state] == []
    assert [(row.action, row.state) for row in task_rows if row.state in ("PENDING", "RUNNING")] == []

    expected = {host.id: [0, 0, 0, 0] for host in hosts}
    for row in instance_rows:
        claims = ((row.flavor, row.host_id), (row.new_flavor, row.new_host_id), (row.old_flavor, row.old_host_id))
        for flavor, host_id in claims:
            if host_id is not None:
                usage = expected[host_id]
                for index, amount in enumerate((flavor["vcpus"], flavor["ram"], flavor["disk"], 1)):
                    usage[index] += amount
    for host in hosts:
        actual = [host.vcpus_used, host.ram_used, host.disk_used, host.instance_count]
        assert actual == expected[host.id], f"host {host.name}: usage {actual}, claims {expected[host.id]}"

    live = {row.id: row for row in instance_rows if row.vm_state != "DELETED"}
    ports_of: dict[uuid.UUID, int] = {}
    for port in port_rows:
        assert port.instance_id in live, f"port {port.address} of a deleted instance {port.instance_id}"
        ports_of[port.instance_id] = ports_of.get(port.instance_id, 0) + 1
    for row in live.values():
        assert ports_of.get(row.id, 0) == len(row.network_ids), (row.name, ports_of.get(row.id))


def assert_outcomes(client: httpx.Client, backend: Backend, cases: list[Case]) -> None:
    _, _, task_rows, _ = read_state(backend)
    for case in cases:
        response = client.get(f"/v1/instances/{case.instance_id}")
        if case.status == "DELETED":
            assert response.status_code == 404, (case.step, response.text)
        else:
            assert response.status_code == 200, (case.step, response.text)
            instance = response.json()
            assert (instance["status"], instance["task_state"]) == (case.status, None), (case.step, instance)
            assert instance["flavor"]["id"] == case.flavor, (case.step, instance["flavor"])
        mine = [row for row in task_rows if str(row.instance_id) == case.instance_id]
        # The task the kill interrupted ran again and finished; nothing failed or was cancelled.
        assert {row.state for row in mine} == {"SUCCEEDED"}, (case.step, [(r.action, r.state) for r in mine])
        assert max(row.attempts for row in mine) >= 2, (case.step, [(r.action, r.attempts) for r in mine])


class HostLocks:
    """A PostgreSQL transaction of the test that holds every host row locked."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.connection: Any = None
        self.url = url

    def take(self) -> None:
        async def take() -> Any:
            connection = await asyncpg.connect(self.url, timeout=5)
            await connection.execute("BEGIN")
            await connection.execute("SELECT id FROM hosts FOR UPDATE")
            return connection

        self.connection = self.loop.run_until_complete(take())

    def steps_open(self, instance_ids: list[str]) -> bool:
        """True when a worker has claimed the task of each instance and holds its row.

        A step's transaction locks the task row when it renews the lease. A probe on
        another connection skips locked rows, so it finds none of them while every
        step is open and waits for the host rows that this transaction holds.
        """
        ids = [uuid.UUID(value) for value in instance_ids]

        async def probe() -> bool:
            connection = await asyncpg.connect(self.url, timeout=5)
            try:
                running = await connection.fetchval(
                    "SELECT count(*) FROM tasks WHERE instance_id = ANY($1) AND state = 'RUNNING'", ids)
                unlocked = await connection.fetchval(
                    "SELECT count(*) FROM (SELECT id FROM tasks WHERE instance_id = ANY($1) "
                    "AND state = 'RUNNING' FOR SHARE SKIP LOCKED) AS free", ids)
            finally:
                await connection.close()
            return bool(running == len(ids) and unlocked == 0)

        return self.loop.run_until_complete(probe())

    def release(self) -> None:
        if self.connection is not None:
            self.loop.run_until_complete(self.connection.close())
            self.connection = None
        self.loop.close()


def kill_and_replace_worker(server: ApiServer, tmp_path: Path, env: dict[str, str]) -> None:
    """SIGKILL the process that runs the worker and start a replacement without the pause."""
    if server.backend.kind == "postgresql":
        worker = server.processes.pop()
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait()
        server.processes.append(start_process(["-m", "mycloud_compute.worker"], env, tmp_path / "worker-2.log"))
        return
    api_process = server.processes.pop(0)
    os.kill(api_process.popen.pid, signal.SIGKILL)
    api_process.popen.wait()
    # The same command line, so the API serves again on the same port.
    arguments = [str(argument) for argument in api_process.popen.args][1:]  # type: ignore[union-attr]
    server.processes.insert(0, start_process(arguments, env, tmp_path / "api-2.log"))
    wait_until(lambda: _healthy(server), "the API serves again", server)


def _healthy(server: ApiServer) -> bool:
    try:
        return httpx.get(f"{server.base_url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_worker_killed_in_every_step(fresh_backend: Backend, tmp_path: Path) -> None:
    backend = fresh_backend
    server = start_api(
        backend, tmp_path, simulated_pause_prefix=PAUSE, task_lease_seconds=LEASE_SECONDS,
        worker_concurrency="32",
    )
    locks: HostLocks | None = None
    try:
        org = make_org(server)
        cases = driver_cases()
        held = locked_cases() if backend.kind == "postgresql" else []
        with org.client() as client:
            prepare(client, cases + held)
            start_driver_cases(client, cases)
            wait_until(lambda: paused_in_driver(server, cases), "every step pauses in the driver", server)

            if held:
                locks = HostLocks(backend.url)
                locks.take()
                for case in held:
                    if case.act is not None:
                        _accepted(case.act(client, case.instance_id))
                    else:
                        case.instance_id = create_instance(client, f"fault-{case.step.lower()}")["id"]
                held_ids = [case.instance_id for case in held]
                wait_until(lambda: locks is not None and locks.steps_open(held_ids),
                           "the worker blocks on the host rows in each held step", server)

            recovery_env = {key: value for key, value in server.env.items()
                            if key != "MYCLOUD_SIMULATED_PAUSE_PREFIX"}
            kill_and_replace_worker(server, tmp_path, recovery_env)
            if locks is not None:
                locks.release()
                locks = None

            wait_until(lambda: all_settled(backend), "every task has finished", server,
                       timeout=RECOVERY_TIMEOUT)
            assert_consistent(backend)
            assert_outcomes(client, backend, cases + held)
        assert "unhandled error request_id=" not in server.logs()
    finally:
        if locks is not None:
            locks.release()
        server.stop()
