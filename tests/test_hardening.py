"""Regression tests for hostile or careless input found by trying the service by hand."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import Backend, Org, free_port, start_process
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance

from mycloud_compute.persistence.database import Database
from mycloud_compute.services import identity


def test_deeply_nested_body_is_400(org: Org) -> None:
    """msgspec's RecursionError on ~1000 nested arrays used to surface as a 500."""
    body = b"[" * 1000 + b"]" * 1000
    with org.client() as client:
        response = client.post(
            "/v1/instances", content=body, headers={"Content-Type": "application/json"}
        )
    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == "the request body is nested too deeply"


def test_too_many_tags_in_filter(org: Org) -> None:
    """One subquery per tag let 200 tags run a query for 30 s; more than 50 cannot match."""
    tags = ",".join(f"t{number}" for number in range(51))
    with org.client("read") as client:
        response = client.get("/v1/instances", params={"tags": tags})
    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == "tags"
    assert "at most 50" in error["message"]


def test_fifty_tags_filter_allowed(org: Org) -> None:
    tags = [f"t{number}" for number in range(50)]
    with org.client() as client:
        created = create_instance(client, "tagged", tags=tags)
        create_instance(client, "fewer-tags", tags=tags[:49])
        listed = client.get("/v1/instances", params={"tags": ",".join(reversed(tags))}).json()
    assert [item["id"] for item in listed["instances"]] == [created["id"]]


def test_status_empty_element(org: Org) -> None:
    with org.client("read") as client:
        response = client.get("/v1/instances", params={"status": "ACTIVE,"})
    error = assert_error(response, 400, "invalid_parameter")
    assert error["message"].startswith("status must not contain an empty element; valid statuses:")


def test_private_flavor_hidden_from_tenants(org: Org) -> None:
    name = f"private-{uuid.uuid4().hex[:8]}"
    with org.client("admin") as admin:
        response = admin.post(
            "/v1/flavors", json={"name": name, "vcpus": 1, "ram": 1024, "disk": 20, "is_public": False}
        )
        assert response.status_code == 201, response.text
        flavor_id = response.json()["id"]
        admin_names = [item["name"] for item in admin.get("/v1/flavors", params={"limit": 1000}).json()["flavors"]]

    with org.client() as client:
        tenant_names = [item["name"] for item in client.get("/v1/flavors", params={"limit": 1000}).json()["flavors"]]
        shown = client.get(f"/v1/flavors/{flavor_id}")
        created = client.post(
            "/v1/instances", json={"name": "x", "flavor_id": flavor_id, "image_id": UBUNTU_IMAGE}
        )

    assert name in admin_names
    assert name not in tenant_names
    assert_error(shown, 404, "not_found")
    assert_error(created, 400, "invalid_parameter")


def test_unmigrated_database_not_ready(tmp_path: Path) -> None:
    """Serving an empty database returned 503 on every call while /readyz returned ok."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    port = free_port()
    env = {"MYCLOUD_DATABASE_URL": url, "MYCLOUD_DRIVER_STEP_DELAY": "0"}
    process = start_process(
        ["-m", "uvicorn", "mycloud_compute.api.asgi:app", "--port", str(port), "--no-proxy-headers"],
        env,
        tmp_path / "api.log",
    )
    try:
        response = _get_when_up(f"http://127.0.0.1:{port}/readyz")
        assert_error(response, 503, "service_unavailable")
        assert response.headers["retry-after"] == "5"
    finally:
        process.stop()


def test_organization_name_rejects_line_break(backend: Backend) -> None:
    """A name with a newline broke the lines of `org list`."""

    async def create(db: Database) -> None:
        await identity.create_organization(db, "evil\nline")

    with pytest.raises(Exception, match="printable"):
        backend.run(create)


def test_token_list_marks_expired(backend: Backend) -> None:
    org_name = f"expiry-{uuid.uuid4().hex[:8]}"

    async def setup(db: Database) -> None:
        await identity.create_organization(db, org_name)
        await identity.create_token(
            db, org_name, name="short", scopes=frozenset({"read"}), expires_in_days=1e-6
        )

    backend.run(setup)
    time.sleep(0.2)
    output = subprocess.run(
        [sys.executable, "-m", "mycloud_compute.cli.admin", "token", "list", "--org", org_name],
        env={**os.environ, "MYCLOUD_DATABASE_URL": backend.url},
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert output.strip().endswith("expired")


@pytest.mark.parametrize("days", ["1e12", "nan", "inf"])
def test_token_create_rejects_absurd_expiry(backend: Backend, days: str) -> None:
    """Huge or non-numeric lifetimes printed a Python traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "mycloud_compute.cli.admin", "token", "create", "--org", "nobody",
         "--scopes", "read", "--expires-in", days],
        env={**os.environ, "MYCLOUD_DATABASE_URL": backend.url},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_setting_names_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mycloud_compute.cli.admin", "org", "list"],
        env={**os.environ, "MYCLOUD_DATABASE_URL": "mysql://x@localhost/y"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "MYCLOUD_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def _get_when_up(url: str) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_empty_security_groups_rejected(org: Org) -> None:
    """An empty list used to create an instance with no group and so no rules at all."""
    with org.client() as client:
        response = client.post(
            "/v1/instances",
            json={"name": "bare", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE,
                  "security_groups": []},
        )
    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == "security_groups"


def test_private_key_not_echoed(org: Org) -> None:
    private_key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    with org.client() as client:
        response = client.post("/v1/keypairs", json={"name": "oops", "public_key": private_key})
    error = assert_error(response, 400, "invalid_parameter")
    assert "private key" in error["message"]
    assert "b3BlbnNzaC1rZXktdjEAAAAABG5vbmU" not in response.text


def test_failed_request_logged_with_id(org: Org) -> None:
    """Only successful writes were logged, so ids quoted from error messages led nowhere."""
    with org.client("read") as client:
        response = client.get("/v1/instances", params={"limit": "0"})
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while request_id not in org.api.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in org.api.logs().splitlines() if request_id in line)
    assert "status=400" in line
    assert "path=/v1/instances" in line


def test_path_cannot_forge_log_lines(org: Org) -> None:
    """A percent-encoded line break in the path started a new, forged log line."""
    forged = "FORGED ERROR mycloud_compute.api.app request_id=req-forged"
    with org.client("read") as client:
        response = client.get(f"/v1/x%0A{forged.replace(' ', '%20')}%00%E2%80%AE")
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while request_id not in org.api.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    logs = org.api.logs()
    line = next(line for line in logs.splitlines() if request_id in line)

    assert response.status_code == 404
    assert not any(logged.startswith("FORGED") for logged in logs.splitlines())
    assert "\x00" not in logs
    assert "\u202e" not in logs
    assert "path=/v1/x\\nFORGED" in line
    assert "\\x00\\u202e" in line


@pytest.mark.parametrize("valid_first", [True, False])
def test_two_authorization_headers_rejected(org: Org, valid_first: bool) -> None:
    """The first of two Authorization headers won, which a proxy may read differently."""
    valid = f"Bearer {org.tokens['read']}"
    bogus = "Bearer mcp_" + "x" * 43
    values = [valid, bogus] if valid_first else [bogus, valid]
    headers = [("Authorization", value) for value in values]

    with org.api.client() as client:
        response = client.get("/v1/instances", headers=headers)

    error = assert_error(response, 401, "unauthorized")
    assert "exactly one Authorization header" in error["message"]


def test_body_too_large_names_limit(org: Org) -> None:
    """The 413 message did not say what the limit was, unlike the 414 and 431 messages."""
    body = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
    with org.client() as client:
        response = client.post("/v1/instances", content=body, headers={"Content-Type": "application/json"})

    error = assert_error(response, 413, "payload_too_large")
    assert "the limit is 1048576 bytes" in error["message"]
