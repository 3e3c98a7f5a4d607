"""Instance lifecycle seen through the API, with the real worker processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
from conftest import ApiServer, Backend, make_org, start_api, start_process
from helpers import create_instance, wait_for


def test_create_reaches_active(api: ApiServer) -> None:
    org = make_org(api)
    with org.client() as client:
        created = create_instance(client, "web-active")
        active = wait_for(client, created["id"], status="ACTIVE")

    assert active["vm_state"] == "ACTIVE"
    assert active["power_state"] == "RUNNING"
    assert active["launched_at"] is not None
    assert active["fault"] is None
    ports = active["addresses"]["private-network"]
    assert len(ports) == 1
    assert ports[0]["addr"].startswith("192.168.")
    assert ports[0]["version"] == 4
    assert ports[0]["type"] == "fixed"
    assert ports[0]["mac_addr"].startswith("fa:16:3e:")


def test_addresses_unique_across_instances(api: ApiServer) -> None:
    org = make_org(api)
    with org.client() as client:
        ids = [create_instance(client, f"web-{number}")["id"] for number in range(5)]
        instances = [wait_for(client, instance_id, status="ACTIVE") for instance_id in ids]

    addresses = [item["addresses"]["private-network"][0]["addr"] for item in instances]
    macs = [item["addresses"]["private-network"][0]["mac_addr"] for item in instances]
    assert len(set(addresses)) == 5
    assert len(set(macs)) == 5
    assert "192.168.0.0" not in addresses  # network address
    assert "192.168.0.1" not in addresses  # gateway


def test_delete_reaches_deleted(api: ApiServer) -> None:
    org = make_org(api)
    with org.client() as client:
        created = create_instance(client, "web-deleted")
        wait_for(client, created["id"], status="ACTIVE")
        assert client.delete(f"/v1/instances/{created['id']}").status_code == 202
        wait_for(client, created["id"], status="DELETED")
        listed = client.get("/v1/instances", params={"status": "DELETED"}).json()["instances"]

    assert [item["id"] for item in listed] == [created["id"]]
    deleted = listed[0]
    assert deleted["vm_state"] == "DELETED"
    assert deleted["power_state"] == "NOSTATE"
    assert deleted["task_state"] is None
    assert deleted["terminated_at"] is not None
    assert deleted["addresses"] == {}


def test_no_valid_host_sets_fault(api: ApiServer) -> None:
    org = make_org(api)
    with org.client("admin") as admin:
        response = admin.post(
            "/v1/flavors",
            json={"name": f"huge-{org.name}", "vcpus": 1024, "ram": 4096, "disk": 40},
        )
        assert response.status_code == 201, response.text
        huge_flavor = response.json()["id"]
    with org.client() as client:
        created = create_instance(client, "too-big", flavor_id=huge_flavor)
        failed = wait_for(client, created["id"], status="ERROR")

    assert failed["vm_state"] == "ERROR"
    assert failed["power_state"] == "NOSTATE"
    assert failed["fault"]["code"] == 500
    assert failed["fault"]["message"] == "No valid host was found"
    assert "vCPU" in failed["fault"]["details"]
    assert failed["fault"]["created"].endswith("Z")


def test_delete_during_build(fresh_backend: Backend, tmp_path: Path) -> None:
    """A delete that arrives while the build steps are still sleeping wins."""
    server = start_api(fresh_backend, tmp_path, driver_step_delay="0.3")
    try:
        org = make_org(server)
        with org.client() as client:
            created = create_instance(client, "short-lived")
            time.sleep(0.4)
            assert client.delete(f"/v1/instances/{created['id']}").status_code == 202
            wait_for(client, created["id"], status="DELETED")
            listed = client.get("/v1/instances", params={"status": "DELETED"}).json()
        assert listed["instances"][0]["addresses"] == {}
    finally:
        server.stop()


def _kill_worker_mid_build(server: ApiServer, backend: Backend, tmp_path: Path) -> None:
    """SIGKILL whatever runs the worker, then start a replacement the way an operator would."""
    if backend.kind == "postgresql":
        worker = server.processes.pop()
        os.kill(worker.popen.pid, signal.SIGKILL)
        worker.popen.wait()
        server.processes.append(
            start_process(["-m", "mycloud_compute.worker"], server.env, tmp_path / "worker-2.log")
        )
        return
    # On SQLite the worker lives in the API process: kill it and serve again on the
    # same port, so the embedded worker recovers the orphaned task at start-up.
    api_process = server.processes.pop(0)
    os.kill(api_process.popen.pid, signal.SIGKILL)
    api_process.popen.wait()
    port = server.base_url.rsplit(":", 1)[1]
    server.processes.insert(
        0,
        start_process(
            ["-m", "uvicorn", "mycloud_compute.api.asgi:app", "--host", "127.0.0.1",
             "--port", port, "--no-access-log", "--no-proxy-headers"],
            server.env,
            tmp_path / "api-2.log",
        ),
    )


def test_killed_worker_recovers(fresh_backend: Backend, tmp_path: Path) -> None:
    backend = fresh_backend
    server = start_api(backend, tmp_path, driver_step_delay="1", task_lease_seconds="2")
    try:
        org = make_org(server)
        with org.client() as client:
            created = create_instance(client, "survivor")
            time.sleep(1.5)  # the build is now inside a sleeping driver step
            building = client.get(f"/v1/instances/{created['id']}").json()
            assert building["status"] == "BUILD"

            _kill_worker_mid_build(server, backend, tmp_path)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            active = wait_for(client, created["id"], status="ACTIVE", timeout=30)
        assert active["power_state"] == "RUNNING"
        assert len(active["addresses"]["private-network"]) == 1
    finally:
        server.stop()
