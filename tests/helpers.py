"""Small helpers for tests that drive the API over HTTP."""

from __future__ import annotations

import time
from typing import Any

import httpx

from mycloud_compute.persistence.catalog_ids import catalog_id

SMALL_FLAVOR = str(catalog_id("flavor", "m1.small"))
MEDIUM_FLAVOR = str(catalog_id("flavor", "m1.medium"))
TINY_FLAVOR = str(catalog_id("flavor", "m1.tiny"))
UBUNTU_IMAGE = str(catalog_id("image", "Ubuntu 22.04 LTS"))
DEBIAN_IMAGE = str(catalog_id("image", "Debian 12"))
CIRROS_IMAGE = str(catalog_id("image", "CirrOS 0.6.2"))


def create_instance(client: httpx.Client, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}
    response = client.post("/v1/instances", json=body)
    assert response.status_code == 202, response.text
    return response.json()  # type: ignore[no-any-return]


def wait_for(
    client: httpx.Client, instance_id: str, *, status: str, timeout: float = 20
) -> dict[str, Any]:
    """Poll an instance until it reaches ``status`` (404 counts as DELETED)."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/instances/{instance_id}")
        if response.status_code == 404 and status == "DELETED":
            return {"status": "DELETED"}
        assert response.status_code == 200, response.text
        last = response.json()
        if last["status"] == status and last["task_state"] is None:
            return last
        time.sleep(0.05)
    raise AssertionError(f"instance {instance_id} did not reach {status} in {timeout} s: {last}")


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    """Check the contract's error envelope and return its ``error`` object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert error["code"] == status
    assert error["type"] == error_type
    assert error["request_id"] == response.headers["x-request-id"]
    assert isinstance(error["message"], str) and error["message"]
    return error  # type: ignore[no-any-return]
