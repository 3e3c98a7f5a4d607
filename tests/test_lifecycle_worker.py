"""The lifecycle worker against real SQLite files and real PostgreSQL databases.

Each test gets its own database, cloned from a migrated template: a copied file
on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL. PostgreSQL comes from
``MYCLOUD_TEST_POSTGRES_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``);
the databases are named ``mc_lifecycle_*`` and dropped afterwards. When that server
cannot be reached the PostgreSQL cases are skipped with the reason, except under
``CI=true``, where they fail.

The tests insert instances and tasks the way the API does (see ``Cloud``) and run
real Worker objects, or a real worker process, with the simulated driver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.engine import Row

from mycloud_compute.drivers.base import InstanceSpec
from mycloud_compute.drivers.simulated import SimulatedDriver, parse_host_inventory
from mycloud_compute.persistence import hosts as host_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence import tasks as task_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.hosts import Host
from mycloud_compute.persistence.migrate import upgrade
from mycloud_compute.persistence.tables import hosts as host_table
from mycloud_compute.persistence.tables import (
    instance_actions,
    networks,
    organizations,
    ports,
    tasks,
)
from mycloud_compute.persistence.tasks import LeaseLost, TaskRunState
from mycloud_compute.scheduler.scheduler import ResourceRequest, explain_no_valid_host, select_host
from mycloud_compute.services import addressing
from mycloud_compute.services.lifecycle import TaskState, derive_status
from mycloud_compute.settings import Settings
from mycloud_compute.worker.runner import Worker, recover_orphans, sync_hosts

POSTGRES_ADMIN_URL = os.environ.get(
    "MYCLOUD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() == "true"

# Two hosts: 16 vCPUs, 32 GiB of RAM and 400 GiB of disk, and half of that.
HOSTS = "sim-a:16:32768:400,sim-b:8:16384:200"
SRC_DIR = Path(__file__).resolve().parents[1] / "src"


# --- databases ----------------------------------------------------------------------


def _run_coroutine(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion in a thread of its own, whatever loop is running here."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _run_blocking(function: Callable[[], Any]) -> Any:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function).result()


async def _admin_execute(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _postgres_url(name: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lifecycle-template") / "template.db"
    _run_blocking(lambda: upgrade(f"sqlite:///{path}"))
    return path


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    try:
        _run_coroutine(_admin_execute("SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"{reason}; the PostgreSQL tests must run under CI=true")
        pytest.skip(f"{reason}; set MYCLOUD_TEST_POSTGRES_URL to run the PostgreSQL tests")

    name = f"mc_lifecycle_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _run_coroutine(_admin_execute(f'CREATE DATABASE "{name}"'))
    try:
        _run_blocking(lambda: upgrade(_postgres_url(name)))
        yield name
    finally:
        _run_coroutine(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh, migrated database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "mycloud.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return

    template = request.getfixturevalue("postgres_template")
    name = f"mc_lifecycle_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _run_coroutine(_admin_execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield _postgres_url(name)
    finally:
        _run_coroutine(_admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


# --- the API's side -----------------------------------------------------------------


@dataclass
class Cloud:
    """One organization whose instances and tasks are inserted the way the API does."""

    db: Database
    organization_id: uuid.UUID
    network_id: uuid.UUID

    @classmethod
    async def create(cls, db: Database, cidr: str = "10.20.0.0/24") -> Cloud:
        organization_id = uuid.uuid4()
        async with db.transaction() as conn:
            await conn.execute(
                insert(organizations).values(
                    id=organization_id, name=f"org-{organization_id.hex[:10]}", created_at=utcnow()
                )
            )
        cloud = cls(db, organization_id, uuid.uuid4())
        cloud.network_id = await cloud.add_network("private-network", cidr)
        return cloud

    async def add_network(self, name: str, cidr: str) -> uuid.UUID:
        network_id = uuid.uuid4()
        async with self.db.transaction() as conn:
            await conn.execute(
                insert(networks).values(
                    organization_id=self.organization_id,
                    id=network_id,
                    name=name,
                    cidr=cidr,
                    ip_version=addressing.parse_cidr(cidr).version,
                    created_at=utcnow(),
                )
            )
        return network_id

    async def create_instance(
        self,
        name: str,
        *,
        vcpus: int = 1,
        ram: int = 512,
        disk: int = 1,
        network_ids: Sequence[uuid.UUID] | None = None,
    ) -> uuid.UUID:
        """Insert a BUILD instance with its create action and PENDING task."""
        instance_id = uuid.uuid4()
        flavor_id = uuid.uuid4()
        now = utcnow()
        async with self.db.transaction() as conn:
            await instance_store.insert_instance(
                conn,
                {
                    "organization_id": self.organization_id,
                    "id": instance_id,
                    "name": name,
                    "description": "",
                    "status": "BUILD",
                    "vm_state": "BUILDING",
                    "task_state": "SCHEDULING",
                    "power_state": "NOSTATE",
                    "flavor_id": flavor_id,
                    "flavor": {"id": str(flavor_id), "name": "test", "vcpus": vcpus, "ram": ram, "disk": disk},
                    "image_id": uuid.uuid4(),
                    "image": {"id": str(uuid.uuid4()), "name": "Test image"},
                    "host_id": None,
                    "network_ids": [str(item) for item in (network_ids or [self.network_id])],
                    "addresses": {},
                    "security_groups": [{"name": "default"}],
                    "volumes_attached": [],
                    "key_names": [],
                    "metadata": {},
                    "tags": [],
                    "fault": None,
                    "created_at": now,
                    "updated_at": now,
                    "launched_at": None,
                    "terminated_at": None,
                },
            )
            await self._queue(conn, instance_id, "create")
        return instance_id

    async def delete_instance(self, instance_id: uuid.UUID) -> None:
        """Set task_state DELETING and queue a delete task, as DELETE /v1/instances/{id} does."""
        async with self.db.transaction() as conn:
            instance = await instance_store.get_for_update(conn, self.organization_id, instance_id)
            assert instance is not None
            await instance_store.update_instance(
                conn,
                self.organization_id,
                instance_id,
                {
                    "task_state": "DELETING",
                    "status": derive_status(instance.vm_state, TaskState.DELETING).value,
                    "updated_at": utcnow(),
                },
            )
            await self._queue(conn, instance_id, "delete")

    async def _queue(self, conn: Any, instance_id: uuid.UUID, action: str) -> None:
        action_id = uuid.uuid4()
        now = utcnow()
        await conn.execute(
            insert(instance_actions).values(
                organization_id=self.organization_id,
                id=action_id,
                instance_id=instance_id,
                action=action,
                status="RUNNING",
                request_id=f"req-{action}-{instance_id.hex[:8]}",
                started_at=now,
            )
        )
        await conn.execute(
            insert(tasks).values(
                id=uuid.uuid4(),
                organization_id=self.organization_id,
                instance_id=instance_id,
                action=action,
                state="PENDING",
                step=None,
                attempts=0,
                request_id=f"req-{action}-{instance_id.hex[:8]}",
                action_id=action_id,
                created_at=now,
                updated_at=now,
            )
        )

    async def instance(self, instance_id: uuid.UUID) -> Row[Any]:
        async with self.db.snapshot() as conn:
            row = await instance_store.get(conn, self.organization_id, instance_id)
        assert row is not None
        return row

    async def tasks(self, instance_id: uuid.UUID) -> list[Row[Any]]:
        async with self.db.snapshot() as conn:
            query = select(tasks).where(tasks.c.instance_id == instance_id).order_by(tasks.c.created_at)
            return list((await conn.execute(query)).all())

    async def actions(self, instance_id: uuid.UUID) -> list[Row[Any]]:
        async with self.db.snapshot() as conn:
            query = (
                select(instance_actions)
                .where(instance_actions.c.instance_id == instance_id)
                .order_by(instance_actions.c.started_at)
            )
            return list((await conn.execute(query)).all())

    async def ports(self, instance_id: uuid.UUID | None = None) -> list[Row[Any]]:
        async with self.db.snapshot() as conn:
            query = select(ports).where(ports.c.organization_id == self.organization_id)
            if instance_id is not None:
                query = query.where(ports.c.instance_id == instance_id)
            return list((await conn.execute(query.order_by(ports.c.address_value))).all())

    async def hosts(self) -> dict[str, Host]:
        async with self.db.snapshot() as conn:
            return {host.name: host for host in await host_store.list_hosts(conn)}


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "driver_step_delay": 0,
        "simulated_hosts": HOSTS,
        "task_lease_seconds": 30,
        "worker_poll_interval": 0.02,
        "worker_concurrency": 4,
        **overrides,
    }
    return Settings(**values)


def make_driver(settings: Settings) -> SimulatedDriver:
    return SimulatedDriver.from_settings(settings)


@pytest.fixture
async def cloud(db: Database) -> Cloud:
    return await Cloud.create(db)


async def run_until_idle(db: Database, database_url: str, **overrides: Any) -> Worker:
    settings = make_settings(database_url, **overrides)
    worker = Worker(settings, db, make_driver(settings), name="test-worker")
    await worker.run_until_idle()
    return worker


async def wait_until(check: Callable[[], Awaitable[bool]], condition: str, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {condition}")
        await asyncio.sleep(0.02)


def assert_no_usage(host: Host) -> None:
    assert host.vcpus_used == 0, host
    assert host.ram_used == 0, host
    assert host.disk_used == 0, host
    assert host.instance_count == 0, host


# --- create and delete --------------------------------------------------------------


async def test_create_becomes_active(db: Database, database_url: str, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("web-1", vcpus=2, ram=4096, disk=40)

    await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.status == "ACTIVE"
    assert instance.vm_state == "ACTIVE"
    assert instance.power_state == "RUNNING"
    assert instance.task_state is None
    assert instance.fault is None
    assert instance.launched_at is not None
    assert instance.host_id is not None

    port_rows = await cloud.ports(instance_id)
    assert len(port_rows) == 1
    assert instance.addresses == {
        "private-network": [
            {"addr": "10.20.0.2", "version": 4, "type": "fixed", "mac_addr": port_rows[0].mac_address}
        ]
    }
    assert port_rows[0].mac_address.startswith("fa:16:3e:")

    # Spread: the host with the most free RAM takes the instance.
    hosts = await cloud.hosts()
    assert hosts["sim-a"].id == instance.host_id
    assert (hosts["sim-a"].vcpus_used, hosts["sim-a"].ram_used, hosts["sim-a"].disk_used) == (2, 4096, 40)
    assert hosts["sim-a"].instance_count == 1
    assert_no_usage(hosts["sim-b"])

    [task] = await cloud.tasks(instance_id)
    assert task.state == "SUCCEEDED"
    assert task.step == "SPAWNING"
    assert task.attempts == 1
    assert task.lease_owner is None
    [action] = await cloud.actions(instance_id)
    assert action.status == "SUCCEEDED"
    assert action.finished_at is not None


async def test_delete_releases_host_and_ports(db: Database, database_url: str, cloud: Cloud) -> None:
    first = await cloud.create_instance("web-1", vcpus=3, ram=3000, disk=30)
    second = await cloud.create_instance("web-2", vcpus=1, ram=700, disk=7)
    await run_until_idle(db, database_url)

    await cloud.delete_instance(first)
    await cloud.delete_instance(second)
    worker = await run_until_idle(db, database_url)

    for instance_id in (first, second):
        instance = await cloud.instance(instance_id)
        assert instance.status == "DELETED"
        assert instance.vm_state == "DELETED"
        assert instance.power_state == "NOSTATE"
        assert instance.task_state is None
        assert instance.terminated_at is not None
        assert instance.host_id is None
        assert instance.addresses == {}
        assert [task.state for task in await cloud.tasks(instance_id)] == ["SUCCEEDED", "SUCCEEDED"]
        assert [action.status for action in await cloud.actions(instance_id)] == ["SUCCEEDED", "SUCCEEDED"]
    assert await cloud.ports() == []
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)
    assert worker.outcomes[("delete", "SUCCEEDED")] == 2


async def test_freed_address_is_reused(db: Database, database_url: str, cloud: Cloud) -> None:
    first = await cloud.create_instance("web-1")
    second = await cloud.create_instance("web-2")
    await run_until_idle(db, database_url)
    # The two builds run concurrently, so either one may hold the lowest address.
    [lowest] = [port for port in await cloud.ports() if port.address == "10.20.0.2"]
    assert lowest.instance_id in (first, second)
    await cloud.delete_instance(lowest.instance_id)
    await run_until_idle(db, database_url)

    third = await cloud.create_instance("web-3")
    await run_until_idle(db, database_url)

    [port] = await cloud.ports(third)
    assert port.address == "10.20.0.2"


async def test_no_valid_host_sets_fault(
    db: Database, database_url: str, cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    instance_id = await cloud.create_instance("huge", vcpus=64, ram=1024, disk=10)

    with caplog.at_level(logging.INFO, logger="mycloud_compute"):
        await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.status == "ERROR"
    assert instance.vm_state == "ERROR"
    assert instance.power_state == "NOSTATE"
    assert instance.task_state is None
    assert instance.host_id is None
    fault = instance.fault
    assert fault["code"] == 500
    assert fault["message"] == "No valid host was found"
    assert fault["details"] == "no host has 64 free vCPUs"
    assert len(fault["created"]) == len("2024-01-15T10:30:00Z")
    assert fault["created"].endswith("Z")

    [task] = await cloud.tasks(instance_id)
    assert task.state == "FAILED"
    [action] = await cloud.actions(instance_id)
    assert action.status == "FAILED"
    assert action.message.startswith("No valid host was found")
    assert await cloud.ports() == []
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)

    # A customer can cause this at will, so it is a WARNING, never an ERROR.
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any(
        f"instance={instance_id}" in message
        and f"organization={cloud.organization_id}" in message
        and "request_id=req-create-" in message
        for message in warnings
    ), warnings
    assert errors == []


async def test_spawn_failure_sets_fault_and_releases(db: Database, database_url: str, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("broken-1", vcpus=2, ram=2048, disk=20)

    await run_until_idle(db, database_url, simulated_fail_spawn="broken-")

    instance = await cloud.instance(instance_id)
    assert instance.status == "ERROR"
    assert instance.power_state == "NOSTATE"
    assert instance.task_state is None
    assert instance.fault["message"] == "Failed to spawn the instance"
    assert "broken-" in instance.fault["details"]
    assert instance.host_id is None
    assert instance.addresses == {}
    assert await cloud.ports() == []
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)
    [task] = await cloud.tasks(instance_id)
    assert task.state == "FAILED"
    assert task.attempts == 1

    # An instance in ERROR can still be deleted.
    await cloud.delete_instance(instance_id)
    await run_until_idle(db, database_url)
    assert (await cloud.instance(instance_id)).status == "DELETED"


async def test_full_network_sets_fault(db: Database, database_url: str, cloud: Cloud) -> None:
    # A /30 has four addresses: network, gateway, one for an instance, broadcast.
    tiny = await cloud.add_network("tiny", "10.99.0.0/30")
    first = await cloud.create_instance("first", vcpus=2, ram=1024, disk=10, network_ids=[tiny])
    await run_until_idle(db, database_url)
    second = await cloud.create_instance("second", vcpus=2, ram=1024, disk=10, network_ids=[tiny])
    await run_until_idle(db, database_url)

    assert (await cloud.instance(first)).addresses["tiny"][0]["addr"] == "10.99.0.2"
    instance = await cloud.instance(second)
    assert instance.status == "ERROR"
    assert instance.fault["message"] == "No free IP address on the network"
    assert "10.99.0.0/30" in instance.fault["details"]
    assert instance.host_id is None
    hosts = await cloud.hosts()
    assert hosts["sim-a"].vcpus_used == 2
    assert hosts["sim-a"].instance_count == 1
    assert_no_usage(hosts["sim-b"])
    assert len(await cloud.ports()) == 1


async def test_instance_on_two_networks(db: Database, database_url: str, cloud: Cloud) -> None:
    v6 = await cloud.add_network("v6-net", "fd00:1:2:3::/64")
    instance_id = await cloud.create_instance("dual", network_ids=[cloud.network_id, v6])

    await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.status == "ACTIVE"
    assert instance.addresses["private-network"][0]["addr"] == "10.20.0.2"
    assert instance.addresses["v6-net"][0]["addr"] == "fd00:1:2:3::2"
    assert instance.addresses["v6-net"][0]["version"] == 6
    macs = {entry[0]["mac_addr"] for entry in instance.addresses.values()}
    assert len(macs) == 2


async def test_delete_queued_before_build(db: Database, database_url: str, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("short-lived")
    await cloud.delete_instance(instance_id)

    await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.status == "DELETED"
    assert instance.terminated_at is not None
    create_task, delete_task = await cloud.tasks(instance_id)
    assert create_task.state == "CANCELLED"
    assert delete_task.state == "SUCCEEDED"
    create_action, delete_action = await cloud.actions(instance_id)
    assert create_action.status == "FAILED"
    assert "deleted during the build" in create_action.message
    assert delete_action.status == "SUCCEEDED"
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)


async def test_delete_during_build(db: Database, database_url: str, cloud: Cloud) -> None:
    settings = make_settings(database_url, driver_step_delay=0.1)
    driver = make_driver(settings)
    worker = Worker(settings, db, driver, name="test-worker")
    instance_id = await cloud.create_instance("doomed", vcpus=4, ram=4096, disk=40)
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:

        async def networking() -> bool:
            return bool((await cloud.instance(instance_id)).task_state == "NETWORKING")

        await wait_until(networking, "the build reaches NETWORKING")
        await cloud.delete_instance(instance_id)

        async def deleted() -> bool:
            return bool((await cloud.instance(instance_id)).status == "DELETED")

        await wait_until(deleted, "the instance is DELETED")
    finally:
        stop.set()
        await running

    create_task, delete_task = await cloud.tasks(instance_id)
    assert create_task.state == "CANCELLED"
    assert delete_task.state == "SUCCEEDED"
    assert await cloud.ports() == []
    assert driver.vms == {}
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)


# --- failures and retries -----------------------------------------------------------


class FlakyDriver(SimulatedDriver):
    """Raises an unexpected error from prepare_block_devices for the first ``failures`` calls."""

    def __init__(self, settings: Settings, failures: int) -> None:
        super().__init__(parse_host_inventory(settings.simulated_hosts))
        self.failures = failures
        self.calls = 0

    async def prepare_block_devices(self, instance: InstanceSpec) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"simulated internal error {self.calls}")
        await super().prepare_block_devices(instance)


async def test_unexpected_error_is_retried(db: Database, database_url: str, cloud: Cloud) -> None:
    settings = make_settings(database_url)
    driver = FlakyDriver(settings, failures=2)
    instance_id = await cloud.create_instance("flaky")

    await Worker(settings, db, driver).run_until_idle()

    assert (await cloud.instance(instance_id)).status == "ACTIVE"
    [task] = await cloud.tasks(instance_id)
    assert task.state == "SUCCEEDED"
    assert task.attempts == 3
    assert "simulated internal error 2" in task.last_error
    assert (await cloud.hosts())["sim-a"].instance_count == 1


async def test_repeated_error_ends_in_error(db: Database, database_url: str, cloud: Cloud) -> None:
    settings = make_settings(database_url)
    driver = FlakyDriver(settings, failures=100)
    instance_id = await cloud.create_instance("hopeless", vcpus=2, ram=1024, disk=10)

    await Worker(settings, db, driver).run_until_idle()

    assert driver.calls == 3
    instance = await cloud.instance(instance_id)
    assert instance.status == "ERROR"
    assert instance.fault["message"] == "The build of the instance failed"
    assert "failed 3 times" in instance.fault["details"]
    # The exception text stays in the task row and the logs, not in the user-visible fault.
    assert "simulated internal error" not in instance.fault["details"]
    [task] = await cloud.tasks(instance_id)
    assert task.state == "FAILED"
    assert task.attempts == 3
    assert await cloud.ports() == []
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)


async def test_unknown_action_fails_task(db: Database, database_url: str, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("web-1")
    await run_until_idle(db, database_url)
    async with db.transaction() as conn:
        await instance_store.update_instance(
            conn, cloud.organization_id, instance_id, {"task_state": "POWERING_OFF"}
        )
        await cloud._queue(conn, instance_id, "hibernate")

    await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.task_state is None
    assert instance.status == "ACTIVE"
    assert [task.state for task in await cloud.tasks(instance_id)] == ["SUCCEEDED", "FAILED"]
    assert "hibernate" in (await cloud.actions(instance_id))[1].message


async def test_task_abandoned_three_times_ends_in_error(
    db: Database, database_url: str, cloud: Cloud
) -> None:
    instance_id = await cloud.create_instance("cursed", vcpus=2, ram=1024, disk=10)
    # Three workers claim the task in turn and die: each lease expires at once.
    for index in range(3):
        async with db.transaction() as conn:
            claimed = await task_store.claim_next(conn, f"dead-worker-{index}", 0)
        assert claimed is not None
        assert claimed.attempts == index + 1

    await run_until_idle(db, database_url)

    instance = await cloud.instance(instance_id)
    assert instance.status == "ERROR"
    assert instance.fault["message"] == "The build of the instance failed"
    assert instance.fault["details"] == "the workers running the create task stopped 3 times before it finished"
    [task] = await cloud.tasks(instance_id)
    assert task.state == "FAILED"
    assert task.attempts == 4
    for host in (await cloud.hosts()).values():
        assert_no_usage(host)


async def test_failing_cleanup_still_ends_task(db: Database, database_url: str, cloud: Cloud) -> None:
    """A build whose cleanup itself fails must end in ERROR, not be retried forever.

    Host usage is wiped behind the worker's back, so releasing the claim after the
    spawn failure raises every time.
    """
    instance_id = await cloud.create_instance("broken-accounting", vcpus=2, ram=1024, disk=10)
    settings = make_settings(database_url)

    class WipingDriver(SimulatedDriver):
        async def spawn(self, instance: InstanceSpec) -> None:
            async with db.transaction() as conn:
                await conn.execute(update(host_table).values(vcpus_used=0, instance_count=0))
            await super().spawn(instance)

    driver = WipingDriver(parse_host_inventory(HOSTS), fail_spawn_prefix="broken-")
    await Worker(settings, db, driver).run_until_idle()

    instance = await cloud.instance(instance_id)
    assert instance.status == "ERROR"
    assert instance.task_state is None
    assert instance.fault["message"] == "The create task failed"
    [task] = await cloud.tasks(instance_id)
    assert task.state == "FAILED"
    assert task.attempts == 3


# --- the task queue -----------------------------------------------------------------


async def test_tasks_of_one_instance_run_in_order(db: Database, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("ordered")
    await cloud.delete_instance(instance_id)

    async with db.transaction() as conn:
        first = await task_store.claim_next(conn, "worker-1", 30)
    async with db.transaction() as conn:
        blocked = await task_store.claim_next(conn, "worker-2", 30)
    assert first is not None
    assert first.action == "create"
    assert first.attempts == 1
    assert blocked is None

    async with db.transaction() as conn:
        await task_store.finish(conn, first, TaskRunState.SUCCEEDED)
    async with db.transaction() as conn:
        second = await task_store.claim_next(conn, "worker-2", 30)
    assert second is not None
    assert second.action == "delete"


async def test_lost_lease_rolls_back_step(db: Database, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("contested")
    async with db.transaction() as conn:
        mine = await task_store.claim_next(conn, "worker-1", 30)
    assert mine is not None

    # The lease expires (the worker stalled) and another worker claims the task.
    async with db.transaction() as conn:
        await conn.execute(
            update(tasks).where(tasks.c.id == mine.id).values(lease_expires_at=utcnow())
        )
    async with db.transaction() as conn:
        theirs = await task_store.claim_next(conn, "worker-2", 30)
    assert theirs is not None
    assert theirs.id == mine.id
    assert theirs.attempts == 2

    with pytest.raises(LeaseLost):
        async with db.transaction() as conn:
            await instance_store.update_instance(
                conn, cloud.organization_id, instance_id, {"name": "stale-write"}
            )
            await task_store.renew_lease(conn, mine, 30, step="NETWORKING")
    assert (await cloud.instance(instance_id)).name == "contested"
    async with db.snapshot() as conn:
        row = await task_store.get_task(conn, mine.id)
    assert row is not None
    assert row.lease_owner == "worker-2"
    assert row.step is None


async def test_stolen_lease_stops_running_task(
    db: Database, database_url: str, cloud: Cloud, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat notices that another worker took the task and stops the local run."""
    settings = make_settings(database_url, task_lease_seconds=0.3, driver_step_delay=1.0)
    worker = Worker(settings, db, make_driver(settings), name="slow-worker")
    instance_id = await cloud.create_instance("stolen")
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="mycloud_compute.worker"):
        running = asyncio.create_task(worker.run(stop))
        try:

            async def preparing() -> bool:
                [task] = await cloud.tasks(instance_id)
                return bool(task.step == "BLOCK_DEVICE_MAPPING")

            await wait_until(preparing, "the worker starts BLOCK_DEVICE_MAPPING")
            async with db.transaction() as conn:
                await conn.execute(
                    update(tasks)
                    .where(tasks.c.instance_id == instance_id)
                    .values(lease_owner="thief", lease_expires_at=utcnow() + timedelta(seconds=60))
                )

            async def abandoned() -> bool:
                return any("task abandoned" in record.getMessage() for record in caplog.records)

            await wait_until(abandoned, "the worker abandons the task", timeout=3)
            # Past the end of the driver's sleep: the abandoned run must not go on.
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await running

    instance = await cloud.instance(instance_id)
    assert instance.task_state == "BLOCK_DEVICE_MAPPING"
    assert await cloud.ports() == []
    [task] = await cloud.tasks(instance_id)
    assert task.state == "RUNNING"
    assert task.lease_owner == "thief"
    assert task.step == "BLOCK_DEVICE_MAPPING"


async def test_recover_orphans_requeues_running(db: Database, database_url: str, cloud: Cloud) -> None:
    instance_id = await cloud.create_instance("orphan")
    async with db.transaction() as conn:
        claimed = await task_store.claim_next(conn, "dead-worker", 3600)
    assert claimed is not None

    # The lease is an hour long, so only recovery makes the task claimable now.
    await run_until_idle(db, database_url)
    assert (await cloud.instance(instance_id)).status == "BUILD"
    assert await recover_orphans(db) == 1
    await run_until_idle(db, database_url)

    assert (await cloud.instance(instance_id)).status == "ACTIVE"
    [task] = await cloud.tasks(instance_id)
    assert task.attempts == 2


# --- addresses ----------------------------------------------------------------------


async def test_allocate_port_until_full(db: Database, cloud: Cloud) -> None:
    network_id = await cloud.add_network("small", "10.7.0.0/29")
    instance_id = uuid.uuid4()
    async with db.transaction() as conn:
        network = (await conn.execute(select(networks).where(networks.c.id == network_id))).one()
        allocated = [
            await addressing.allocate_port(conn, cloud.organization_id, instance_id, network) for _ in range(5)
        ]
        with pytest.raises(addressing.NetworkFull) as raised:
            await addressing.allocate_port(conn, cloud.organization_id, instance_id, network)

    # 10.7.0.0 is the network, 10.7.0.1 the gateway and 10.7.0.7 the broadcast address.
    assert [port.address for port in allocated] == [f"10.7.0.{last}" for last in range(2, 7)]
    assert len({port.mac_address for port in allocated}) == 5
    assert raised.value.message == (
        "network 'small' (10.7.0.0/29) has no free IP address; "
        "delete instances on it or use a larger network"
    )
    assert [row.address_value for row in await cloud.ports(instance_id)] == [2, 3, 4, 5, 6]


async def _port_network(db: Database, network_id: uuid.UUID) -> Row[Any]:
    async with db.snapshot() as conn:
        return (await conn.execute(select(networks).where(networks.c.id == network_id))).one()


async def test_allocate_port_takes_lowest_gap(db: Database, cloud: Cloud) -> None:
    network_id = await cloud.add_network("gaps", "10.8.0.0/28")
    network = await _port_network(db, network_id)
    other_instance, instance_id = uuid.uuid4(), uuid.uuid4()
    used = {3, 4, 6, 9, 10, 11}
    async with db.transaction() as conn:
        for offset in sorted(used):
            await conn.execute(
                insert(ports).values(
                    organization_id=cloud.organization_id, id=uuid.uuid4(), network_id=network_id,
                    instance_id=other_instance, address=f"10.8.0.{offset}", address_value=offset,
                    mac_address=f"fa:16:3e:00:00:{offset:02x}", created_at=utcnow(),
                )
            )
        allocated = [
            await addressing.allocate_port(conn, cloud.organization_id, instance_id, network) for _ in range(5)
        ]

    assert [port.address for port in allocated] == ["10.8.0.2", "10.8.0.5", "10.8.0.7", "10.8.0.8", "10.8.0.12"]
    expected = []
    for _ in range(5):
        offset = addressing.lowest_free_offset(addressing.parse_cidr("10.8.0.0/28"), used)
        assert offset is not None
        expected.append(offset)
        used.add(offset)
    assert [row.address_value for row in await cloud.ports(instance_id)] == expected


@pytest.mark.parametrize(
    ("cidr", "address"),
    [
        ("fd00::/120", "fd00::2"),
        # PostgreSQL prints addresses whose first 96 bits are zero as ::0.1.0.2.
        ("::1:0/120", "::1:2"),
    ],
)
async def test_allocate_port_ipv6_text(db: Database, cloud: Cloud, cidr: str, address: str) -> None:
    network = await _port_network(db, await cloud.add_network("v6", cidr))
    instance_id = uuid.uuid4()
    async with db.transaction() as conn:
        port = await addressing.allocate_port(conn, cloud.organization_id, instance_id, network)

    assert (port.address, port.version) == (address, 6)
    assert [row.address for row in await cloud.ports(instance_id)] == [address]


async def test_concurrent_allocations_get_different_addresses(db: Database, cloud: Cloud) -> None:
    """A second transaction that picks the address of an uncommitted port waits for it, then takes the next."""
    if db.is_sqlite:
        pytest.skip("SQLite runs one write transaction at a time")
    network = await _port_network(db, await cloud.add_network("shared", "10.9.0.0/29"))
    first_instance, second_instance = uuid.uuid4(), uuid.uuid4()
    async with db.transaction() as conn:
        first = await addressing.allocate_port(conn, cloud.organization_id, first_instance, network)

        async def allocate_second() -> addressing.AllocatedPort:
            async with db.transaction() as other:
                return await addressing.allocate_port(other, cloud.organization_id, second_instance, network)

        second_task = asyncio.create_task(allocate_second())

        async def second_waits_for_lock() -> bool:
            async with db.snapshot() as probe:
                waiting = await probe.execute(
                    text("SELECT count(*) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND wait_event_type = 'Lock'")
                )
                return bool(waiting.scalar_one() == 1)

        # The second INSERT waits on the unique key until this transaction ends.
        await wait_until(second_waits_for_lock, "the second allocation waits for the first")
    second = await second_task

    assert (first.address, second.address) == ("10.9.0.2", "10.9.0.3")


# --- hosts and the scheduler --------------------------------------------------------


async def test_sync_hosts_keeps_usage(db: Database, database_url: str, cloud: Cloud) -> None:
    await cloud.create_instance("web-1", vcpus=2, ram=2048, disk=20)
    await run_until_idle(db, database_url)

    bigger = SimulatedDriver(parse_host_inventory("sim-a:32:65536:800,sim-c:4:4096:50"))
    assert await sync_hosts(db, bigger) == 2

    hosts = await cloud.hosts()
    assert sorted(hosts) == ["sim-a", "sim-b", "sim-c"]
    assert (hosts["sim-a"].vcpus, hosts["sim-a"].ram, hosts["sim-a"].disk) == (32, 65536, 800)
    assert (hosts["sim-a"].vcpus_used, hosts["sim-a"].instance_count) == (2, 1)
    assert_no_usage(hosts["sim-c"])


async def test_disabled_host_is_skipped(db: Database, database_url: str, cloud: Cloud) -> None:
    await sync_hosts(db, make_driver(make_settings(database_url)))
    async with db.transaction() as conn:
        assert await host_store.set_status(conn, (await cloud.hosts())["sim-a"].id, host_store.DISABLED)
    fits_b = await cloud.create_instance("fits", vcpus=8)
    too_big = await cloud.create_instance("too-big", vcpus=9)

    await run_until_idle(db, database_url)

    hosts = await cloud.hosts()
    assert (await cloud.instance(fits_b)).host_id == hosts["sim-b"].id
    fault = (await cloud.instance(too_big)).fault
    assert fault["details"] == "no host has 9 free vCPUs"


async def test_no_valid_host_explains_shortfall(db: Database) -> None:
    inventory = "cpu-heavy:32:8192:100,ram-heavy:4:65536:100"
    await sync_hosts(db, SimulatedDriver(parse_host_inventory(inventory)))

    async with db.snapshot() as conn:
        too_much = await explain_no_valid_host(conn, ResourceRequest(vcpus=1, ram=70000, disk=500))
        not_together = await explain_no_valid_host(conn, ResourceRequest(vcpus=16, ram=16384, disk=10))

    # The owner of the instance learns what the request lacked, never the hosts' capacity.
    assert too_much == "no host has 70000 MiB of free RAM or 500 GiB of free disk"
    assert not_together == (
        "no host has 16 vCPUs, 16384 MiB of RAM and 10 GiB of disk free at the same time"
    )


async def test_no_host_registered_explained(db: Database) -> None:
    async with db.snapshot() as conn:
        details = await explain_no_valid_host(conn, ResourceRequest(vcpus=1, ram=1, disk=1))
    assert details == "no compute host is available"


async def test_concurrent_claims_never_overcommit(db: Database, database_url: str) -> None:
    await sync_hosts(db, SimulatedDriver(parse_host_inventory("only:10:10240:100")))
    request = ResourceRequest(vcpus=1, ram=1024, disk=10)

    async def place() -> bool:
        async with db.transaction() as conn:
            return await select_host(conn, request) is not None

    results = await asyncio.gather(*(place() for _ in range(30)))

    assert results.count(True) == 10
    async with db.snapshot() as conn:
        [host] = await host_store.list_hosts(conn)
    assert (host.vcpus_used, host.ram_used, host.disk_used, host.instance_count) == (10, 10240, 100, 10)


# --- several workers ----------------------------------------------------------------


class CountingDriver(SimulatedDriver):
    """Records every spawn, shared by several workers to catch a task that runs twice."""

    def __init__(self, settings: Settings, spawned: list[uuid.UUID]) -> None:
        super().__init__(parse_host_inventory(settings.simulated_hosts))
        self.spawned = spawned

    async def spawn(self, instance: InstanceSpec) -> None:
        self.spawned.append(instance.id)
        await asyncio.sleep(0)
        await super().spawn(instance)


async def test_two_workers_race_over_50_creates(db: Database, database_url: str, cloud: Cloud) -> None:
    # 24 vCPUs in total for 50 two-vCPU instances: 12 fit, 38 find no valid host.
    cloud_network = await cloud.add_network("big", "10.128.0.0/16")
    instance_ids = [
        await cloud.create_instance(f"race-{index}", vcpus=2, ram=1024, disk=10, network_ids=[cloud_network])
        for index in range(50)
    ]
    spawned: list[uuid.UUID] = []
    settings = make_settings(database_url, worker_concurrency=8)
    databases = [Database(database_url), Database(database_url)]
    workers = [
        Worker(settings, database, CountingDriver(settings, spawned), name=f"racer-{index}")
        for index, database in enumerate(databases)
    ]
    stop = asyncio.Event()
    runs = [asyncio.create_task(worker.run(stop)) for worker in workers]

    async def all_finished() -> bool:
        async with db.snapshot() as conn:
            states = (await conn.execute(select(tasks.c.state))).scalars().all()
        return all(state in task_store.FINAL for state in states)

    try:
        await wait_until(all_finished, "all 50 create tasks finish", timeout=20)
    finally:
        stop.set()
        await asyncio.gather(*runs)
        for database in databases:
            await database.dispose()

    assert len(spawned) == len(set(spawned)), "an instance was spawned twice"
    statuses = [(await cloud.instance(instance_id)).status for instance_id in instance_ids]
    assert statuses.count("ACTIVE") == 12
    assert statuses.count("ERROR") == 38
    async with db.snapshot() as conn:
        rows = (await conn.execute(select(tasks.c.state, tasks.c.attempts))).all()
    assert {row.state for row in rows} == {"SUCCEEDED", "FAILED"}
    assert {row.attempts for row in rows} == {1}
    assert sum(sum(worker.outcomes.values()) for worker in workers) == 50

    hosts = await cloud.hosts()
    assert (hosts["sim-a"].vcpus_used, hosts["sim-a"].instance_count) == (16, 8)
    assert (hosts["sim-b"].vcpus_used, hosts["sim-b"].instance_count) == (8, 4)
    assert hosts["sim-a"].ram_used + hosts["sim-b"].ram_used == 12 * 1024
    assert hosts["sim-a"].disk_used + hosts["sim-b"].disk_used == 12 * 10
    addresses = [port.address for port in await cloud.ports()]
    assert len(addresses) == 12
    assert len(set(addresses)) == 12


# --- worker processes ---------------------------------------------------------------


def start_worker_process(database_url: str, log_path: Path, **settings: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC_DIR),
        "MYCLOUD_DATABASE_URL": database_url,
        "MYCLOUD_SIMULATED_HOSTS": HOSTS,
        "MYCLOUD_WORKER_POLL_INTERVAL": "0.05",
        "MYCLOUD_LOG_LEVEL": "INFO",
        **{f"MYCLOUD_{key.upper()}": value for key, value in settings.items()},
    }
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "mycloud_compute.worker"],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def wait_for_step(
    cloud: Cloud, instance_id: uuid.UUID, step: str, process: subprocess.Popen[bytes], log_path: Path
) -> None:
    async def reached() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the worker process exited early:\n{log_path.read_text()}")
        [task] = await cloud.tasks(instance_id)
        return bool(task.step == step and task.state == "RUNNING")

    await wait_until(reached, f"the worker process starts {step}", timeout=10)


async def test_killed_worker_is_recovered(
    db: Database, database_url: str, cloud: Cloud, tmp_path: Path
) -> None:
    """A worker killed during NETWORKING: another worker resumes the task after the lease expires.

    The kill lands while the driver sleeps in plug_vifs, after the port was
    committed. The resumed task repeats NETWORKING and must reuse that port and
    keep the dead worker's host claim, so usage and addresses end exactly as if
    nothing had happened.
    """
    instance_id = await cloud.create_instance("survivor", vcpus=2, ram=2048, disk=20)
    log_path = tmp_path / "killed-worker.log"
    process = start_worker_process(
        database_url, log_path, driver_step_delay="1.0", task_lease_seconds="1"
    )
    try:
        await wait_for_step(cloud, instance_id, "NETWORKING", process, log_path)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    ports_before = await cloud.ports(instance_id)
    assert len(ports_before) == 1

    settings = make_settings(database_url, task_lease_seconds=1)
    stop = asyncio.Event()
    running = asyncio.create_task(Worker(settings, db, make_driver(settings)).run(stop))
    try:

        async def active() -> bool:
            return bool((await cloud.instance(instance_id)).status == "ACTIVE")

        await wait_until(active, "another worker finishes the build")
    finally:
        stop.set()
        await running

    [task] = await cloud.tasks(instance_id)
    assert task.state == "SUCCEEDED"
    assert task.attempts == 2
    assert [(port.id, port.address, port.mac_address) for port in await cloud.ports(instance_id)] == [
        (port.id, port.address, port.mac_address) for port in ports_before
    ]
    hosts = await cloud.hosts()
    assert (hosts["sim-a"].vcpus_used, hosts["sim-a"].ram_used, hosts["sim-a"].disk_used) == (2, 2048, 20)
    assert hosts["sim-a"].instance_count == 1
    assert_no_usage(hosts["sim-b"])


async def test_sigterm_returns_task_to_queue(
    db: Database, database_url: str, cloud: Cloud, tmp_path: Path
) -> None:
    instance_id = await cloud.create_instance("interrupted")
    log_path = tmp_path / "stopped-worker.log"
    process = start_worker_process(database_url, log_path, driver_step_delay="5")
    try:
        await wait_for_step(cloud, instance_id, "BLOCK_DEVICE_MAPPING", process, log_path)
        process.send_signal(signal.SIGTERM)
        return_code = await asyncio.to_thread(process.wait, 10)
    finally:
        process.kill()
        process.wait()

    assert return_code == 0, log_path.read_text()
    [task] = await cloud.tasks(instance_id)
    assert task.state == "PENDING"
    assert task.attempts == 0
    assert task.lease_owner is None
    assert "worker stopped" in log_path.read_text()

    await run_until_idle(db, database_url)
    assert (await cloud.instance(instance_id)).status == "ACTIVE"
    [task] = await cloud.tasks(instance_id)
    assert task.attempts == 1
