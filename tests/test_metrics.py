"""GET /metrics: the Prometheus text format, scraped from the real server.

Counters only grow, and other modules share the session server, so each test
compares two scrapes taken around its own requests, on routes and labels that
only it uses in between.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import ApiServer, Backend, free_port, make_org
from helpers import create_instance, wait_for
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]

TASK_STATES = ["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
SERVE_START_TIMEOUT = 30.0


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests_counted(before: Samples, after: Samples, method: str, route: str, status: str) -> float:
    name = "mycloud_compute_http_requests_total"
    labels = {"method": method, "route": route, "status": status}
    return value(after, name, **labels) - value(before, name, **labels)


def label_values(samples: Samples, label: str) -> set[str]:
    return {value for _, labels in samples for name, value in labels if name == label}


def test_metrics_format(api: ApiServer) -> None:
    with api.client() as anonymous:
        response = anonymous.get("/metrics")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert response.headers["content-type"].count("charset") == 1
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert families["mycloud_compute_http_requests"].type == "counter"
    assert families["mycloud_compute_http_request_duration_seconds"].type == "histogram"
    assert families["mycloud_compute_db_pool_checked_out"].type == "gauge"
    assert families["mycloud_compute_tasks"].type == "gauge"
    task_states = [sample.labels["state"] for sample in families["mycloud_compute_tasks"].samples]
    assert task_states == TASK_STATES
    assert "_created" not in response.text


def test_requests_counted_by_route_template(api: ApiServer) -> None:
    org = make_org(api)
    missing = str(uuid.uuid4())
    with org.client() as client:
        before = scrape(client)
        for _ in range(3):
            assert client.get(f"/v1/instances/{missing}").status_code == 404
        assert client.get("/v1/instances").status_code == 200
        after = scrape(client)

    assert requests_counted(before, after, "GET", "/v1/instances/{instance_id}", "404") == 3
    assert requests_counted(before, after, "GET", "/v1/instances", "200") == 1
    assert not [labels for labels in label_values(after, "route") if missing in labels]


def test_unknown_paths_share_one_label(api: ApiServer) -> None:
    paths = [f"/no-such-{uuid.uuid4().hex}", f"/v1/{uuid.uuid4().hex}/deeper"]
    with api.client() as anonymous:
        before = scrape(anonymous)
        for path in paths:
            assert anonymous.get(path).status_code == 404
        assert anonymous.request("BREW", paths[0]).status_code in (400, 404, 405)
        after = scrape(anonymous)

    assert requests_counted(before, after, "GET", "unmatched", "404") == 2
    routes = label_values(after, "route")
    assert not [route for route in routes if "no-such" in route or "deeper" in route]
    assert "BREW" not in label_values(after, "method")


def test_router_and_layer_errors_counted(api: ApiServer) -> None:
    org = make_org(api)
    with org.client() as client:
        before = scrape(client)
        wrong_method = client.put("/v1/instances", json={})
        wrong_type = client.post(
            "/v1/instances", content=b"name=x", headers={"Content-Type": "text/plain"}
        )
        unauthorized = httpx.get(f"{api.base_url}/v1/flavors")
        after = scrape(client)

    assert wrong_method.status_code == 405
    assert wrong_type.status_code == 415
    assert unauthorized.status_code == 401
    assert requests_counted(before, after, "PUT", "/v1/instances", "405") == 1
    assert requests_counted(before, after, "POST", "/v1/instances", "415") == 1
    assert requests_counted(before, after, "GET", "/v1/flavors", "401") == 1


def test_latency_histogram(api: ApiServer) -> None:
    name = "mycloud_compute_http_request_duration_seconds"
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    with api.client() as anonymous:
        before = scrape(anonymous)
        for _ in range(5):
            assert anonymous.get("/healthz").status_code == 200
        after = scrape(anonymous)

    counted = value(after, f"{name}_count", **labels) - value(before, f"{name}_count", **labels)
    assert counted == 5
    buckets = sorted(
        (float(dict(key[1])["le"]), sample)
        for key, sample in after.items()
        if key[0] == f"{name}_bucket" and {**dict(key[1]), "le": ""} == {**labels, "le": ""}
    )
    assert buckets[-1][0] == float("inf")
    assert buckets[-1][1] == value(after, f"{name}_count", **labels)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)
    assert 0 < value(after, f"{name}_sum", **labels) < 5 * 10


def test_task_states_and_outcomes(api: ApiServer) -> None:
    org = make_org(api)
    outcome = {"action": "create", "outcome": "SUCCEEDED"}
    with org.client() as client:
        before = scrape(client)
        instance = create_instance(client, "counted")
        wait_for(client, instance["id"], status="ACTIVE")
        after = scrape(client)

    succeeded = value(after, "mycloud_compute_tasks", state="SUCCEEDED")
    assert succeeded - value(before, "mycloud_compute_tasks", state="SUCCEEDED") == 1
    finished = "mycloud_compute_worker_tasks_finished_total"
    if api.backend.kind == "sqlite":
        # The embedded worker runs in the API process and counts there.
        assert value(after, finished, **outcome) - value(before, finished, **outcome) == 1
    else:
        # Standalone workers run the tasks; their counters are not in this process.
        assert value(after, finished, **outcome) == 0


def test_pool_gauges(api: ApiServer) -> None:
    with api.client() as anonymous:
        samples = scrape(anonymous)

    checked_out = value(samples, "mycloud_compute_db_pool_checked_out", pool="writer")
    assert 0 <= checked_out <= 20
    assert ("mycloud_compute_db_pool_checked_out", frozenset({("pool", "writer")})) in samples
    size_key = ("mycloud_compute_db_pool_size", frozenset({("pool", "writer")}))
    if api.backend.kind == "postgresql":
        assert samples[size_key] == 10
    else:
        assert size_key not in samples


def test_metrics_in_openapi(api: ApiServer) -> None:
    with api.client() as anonymous:
        document = anonymous.get("/openapi.json").json()

    operation = document["paths"]["/metrics"]["get"]
    assert operation["security"] == [{}]
    [media_type] = operation["responses"]["200"]["content"]
    assert media_type.startswith("text/plain")
    assert operation["responses"]["200"]["content"][media_type]["schema"] == {"type": "string"}


# --- several API processes ------------------------------------------------------------


# Only PostgreSQL: `serve` rejects --workers > 1 on SQLite.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_serve_workers_merge_metrics(backend: Backend, tmp_path: Path) -> None:
    """Every process of `serve --workers 2` returns the sums of both in a scrape."""
    port = free_port()
    env = {
        **os.environ,
        "MYCLOUD_DATABASE_URL": backend.url,
        "MYCLOUD_RUN_WORKER": "no",
        "TMPDIR": str(tmp_path),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "mycloud_compute.cli.admin", "serve", "--port", str(port),
             "--workers", "2"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_both_serve(server, base_url, log_path)
        metrics_dirs = list(tmp_path.glob("mycloud-metrics-*"))
        for _ in range(20):
            # A new connection for each request lets the kernel spread them over both processes.
            assert httpx.get(f"{base_url}/healthz").status_code == 200
        scrapes = []
        for _ in range(6):
            with httpx.Client(base_url=base_url) as fresh_connection:
                scrapes.append(scrape(fresh_connection))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    for samples in scrapes:
        assert value(samples, "mycloud_compute_http_requests_total", **labels) == 20
        # Both processes' pools in every scrape: 2 x MYCLOUD_DATABASE_POOL_SIZE.
        assert value(samples, "mycloud_compute_db_pool_size", pool="writer") == 20
    assert len(metrics_dirs) == 1
    assert not list(tmp_path.glob("mycloud-metrics-*")), "serve left its metrics directory"


def wait_until_both_serve(server: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()
        try:
            with httpx.Client(base_url=base_url, timeout=1) as client:
                # Each process adds its pool to the size once its start-up is complete.
                if value(scrape(client), "mycloud_compute_db_pool_size", pool="writer") == 20:
                    return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"serve did not start both processes:\n{log_path.read_text()}")
