"""Protection of the public API: rate limits, request size limits, security headers,
and token secrets kept out of every log.

The rate-limited server refills one request every 100 seconds after a burst of five,
so a sixth request in a row is rejected however slowly the test runs. It trusts
127.0.0.1 as a proxy, so each test picks its own client address with X-Forwarded-For
and its own buckets.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Backend, Org, make_org, start_api
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance, wait_for

from mycloud_compute.api.rate_limit import RateLimiter
from mycloud_compute.client import Client, RateLimited, RetryPolicy

BURST = 5
LIMITED_SETTINGS = {
    "rate_limit_per_second": "0.01",
    "rate_limit_burst": str(BURST),
    "trusted_proxies": "127.0.0.1",
    "max_query_bytes": "512",
    "max_header_bytes": "2048",
}
API_POLICY = "default-src 'none'; frame-ancestors 'none'"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def limited_api(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(backend, tmp_path_factory.mktemp("limited"), **LIMITED_SETTINGS)
    yield server
    server.stop()
    assert "unhandled error request_id=" not in server.logs(), server.logs()[-5000:]


@pytest.fixture
def limited_org(limited_api: ApiServer) -> Org:
    return make_org(limited_api)


def client_at(server: ApiServer, address: str, token: str | None = None) -> httpx.Client:
    """A client that the server takes to be ``address``, behind the trusted local proxy."""
    client = server.client(token)
    client.headers["X-Forwarded-For"] = address
    return client


def unique_address() -> str:
    """A fresh address in 198.18.0.0/15, the range reserved for benchmark tests."""
    number = secrets.randbelow(2**17 - 2) + 1
    return f"198.{18 + (number >> 16)}.{(number >> 8) & 255}.{number & 255}"


def assert_rate_limited(response: httpx.Response) -> int:
    """Check a 429 in the error envelope and return its Retry-After seconds."""
    error = assert_error(response, 429, "rate_limited")
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 100
    assert error["details"] == {"retry_after": int(retry_after)}
    return int(retry_after)


# --- rate limits ----------------------------------------------------------------------


def test_token_limited_after_burst(limited_api: ApiServer, limited_org: Org) -> None:
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as client:
        statuses = [client.get("/v1/instances").status_code for _ in range(BURST)]
        rejected = client.get("/v1/instances")

    assert statuses == [200] * BURST
    assert_rate_limited(rejected)
    assert rejected.headers["x-content-type-options"] == "nosniff"
    assert rejected.headers["content-security-policy"] == API_POLICY


def test_rate_limit_rejects_writes(limited_api: ApiServer, limited_org: Org) -> None:
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as client:
        for _ in range(BURST):
            client.get("/v1/flavors")
        rejected = client.post(
            "/v1/instances", json={"name": "after-limit", "flavor_id": SMALL_FLAVOR,
                                   "image_id": UBUNTU_IMAGE},
        )
        listed = None
    assert_rate_limited(rejected)

    # The rejected request changed nothing.
    with client_at(limited_api, unique_address(), limited_org.tokens["read"]) as reader:
        listed = reader.get("/v1/instances", params={"name": "after-limit"})
    assert listed.status_code == 200
    assert listed.json()["instances"] == []


def test_tokens_limited_separately(limited_api: ApiServer, limited_org: Org) -> None:
    address = unique_address()
    with client_at(limited_api, address, limited_org.tokens["rw"]) as first:
        for _ in range(BURST):
            first.get("/v1/flavors")
        assert_rate_limited(first.get("/v1/flavors"))

    # Another token of the same organization, from the same address, has its own bucket.
    with client_at(limited_api, address, limited_org.tokens["read"]) as second:
        assert second.get("/v1/flavors").status_code == 200


def test_token_limited_across_addresses(limited_api: ApiServer, limited_org: Org) -> None:
    token = limited_org.tokens["rw"]
    for _ in range(BURST):
        with client_at(limited_api, unique_address(), token) as client:
            assert client.get("/v1/flavors").status_code == 200

    with client_at(limited_api, unique_address(), token) as client:
        assert_rate_limited(client.get("/v1/flavors"))


def test_anonymous_limited_by_address(limited_api: ApiServer) -> None:
    address = unique_address()
    with client_at(limited_api, address) as client:
        statuses = [client.get("/docs").status_code for _ in range(BURST)]
        assert_rate_limited(client.get("/docs"))
        # The address bucket counts requests to API paths without a token as well.
        assert_rate_limited(client.get("/v1/flavors"))

    assert statuses == [200] * BURST
    with client_at(limited_api, unique_address()) as elsewhere:
        assert elsewhere.get("/docs").status_code == 200


def test_invalid_tokens_limited_by_address(limited_api: ApiServer, limited_org: Org) -> None:
    """Making up a new token for each request must not escape the limit."""
    address = unique_address()
    statuses = []
    for _ in range(BURST):
        with client_at(limited_api, address, f"mcp_{secrets.token_urlsafe(32)}") as client:
            statuses.append(client.get("/v1/flavors").status_code)
    with client_at(limited_api, address, f"mcp_{secrets.token_urlsafe(32)}") as client:
        rejected = client.get("/v1/flavors")
    with client_at(limited_api, address, limited_org.tokens["rw"]) as valid_here:
        valid_from_address = valid_here.get("/v1/flavors")
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as valid_elsewhere:
        valid_from_elsewhere = valid_elsewhere.get("/v1/flavors")

    assert statuses == [401] * BURST
    assert_rate_limited(rejected)
    assert_rate_limited(valid_from_address)
    assert valid_from_elsewhere.status_code == 200


def test_valid_token_not_charged_to_address(limited_api: ApiServer) -> None:
    """Valid tokens only draw from their own buckets, never from the address's."""
    address = unique_address()
    for _ in range(BURST + 1):
        fresh = make_org(limited_api)
        with client_at(limited_api, address, fresh.tokens["rw"]) as client:
            assert client.get("/v1/flavors").status_code == 200


def test_operations_endpoints_never_limited(limited_api: ApiServer) -> None:
    address = unique_address()
    with client_at(limited_api, address) as client:
        for _ in range(BURST):
            client.get("/docs")
        assert_rate_limited(client.get("/docs"))

        for path in ("/healthz", "/readyz", "/metrics"):
            statuses = {client.get(path).status_code for _ in range(BURST + 2)}
            assert statuses == {200}, path


def test_forwarded_for_right_most_untrusted(limited_api: ApiServer) -> None:
    """Entries left of the last untrusted hop are the client's own words and change nothing."""
    address = unique_address()
    statuses = []
    for _ in range(BURST + 1):
        with limited_api.client() as client:
            forged = unique_address()
            response = client.get(
                "/docs", headers={"X-Forwarded-For": f"{forged}, {address}, 127.0.0.1"}
            )
            statuses.append(response.status_code)

    assert statuses == [200] * BURST + [429]


def test_forwarded_for_header_lines_joined(limited_api: ApiServer) -> None:
    """A proxy that adds its own X-Forwarded-For line leaves the client's line first."""
    address = unique_address()
    statuses = []
    for _ in range(BURST + 1):
        with limited_api.client() as client:
            headers = [("X-Forwarded-For", unique_address()), ("X-Forwarded-For", address)]
            statuses.append(client.get("/docs", headers=headers).status_code)

    assert statuses == [200] * BURST + [429]


def test_forwarded_for_ignored_from_untrusted_peer(backend: Backend, tmp_path: Path) -> None:
    server = start_api(backend, tmp_path, rate_limit_per_second="0.01", rate_limit_burst="3")
    try:
        with server.client() as client:
            for _ in range(3):
                assert client.get("/docs").status_code == 200
            forged = client.get("/docs", headers={"X-Forwarded-For": unique_address()})
    finally:
        server.stop()

    assert_rate_limited(forged)


class ForwardingTransport(httpx.HTTPTransport):
    """A real HTTP transport that sends every request as if through the local proxy."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers["X-Forwarded-For"] = self.address
        return super().handle_request(request)


def test_sdk_raises_rate_limited(limited_api: ApiServer, limited_org: Org) -> None:
    transport = ForwardingTransport(unique_address())
    with Client(
        limited_api.base_url, token=limited_org.tokens["rw"], retry=RetryPolicy(max_retries=0),
        transport=transport,
    ) as sdk:
        for _ in range(BURST):
            sdk.flavors.list_page()
        with pytest.raises(RateLimited) as raised:
            sdk.flavors.list_page()

    assert raised.value.status == 429
    assert raised.value.type == "rate_limited"


def test_rate_limit_off(api: ApiServer, org: Org) -> None:
    """The shared test servers run with MYCLOUD_RATE_LIMIT_PER_SECOND=0."""
    with org.client() as client:
        statuses = {client.get("/v1/flavors").status_code for _ in range(150)}
    assert statuses == {200}


# --- token bucket arithmetic, on a clock the test moves -------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request_scope(token: str | None = None, address: str = "192.0.2.1",
                  path: str = "/v1/instances") -> dict[str, Any]:
    headers = [(b"host", b"api.example.test")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return {"type": "http", "path": path, "headers": headers, "client": (address, 40000)}


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(2, 4, clock=clock)
    scope = request_scope("mcp_a")

    assert [limiter.admit(scope) for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.admit(scope) == 1
    clock.now += 0.5  # one request back at 2 per second
    assert limiter.admit(scope) == 0
    assert limiter.admit(scope) == 1
    clock.now += 10  # refilled, but never beyond the burst
    assert [limiter.admit(scope) for _ in range(4)] == [0, 0, 0, 0]
    assert limiter.admit(scope) == 1


def test_retry_after_rounds_up() -> None:
    clock = FakeClock()
    limiter = RateLimiter(0.3, 1, clock=clock)
    scope = request_scope("mcp_a")

    assert limiter.admit(scope) == 0
    # One request every 3.33 s: wait 4 whole seconds, never fewer.
    assert limiter.admit(scope) == 4
    clock.now += 3
    assert limiter.admit(scope) == 1


def test_bucket_keys_separate() -> None:
    limiter = RateLimiter(1, 1, clock=FakeClock())

    assert limiter.admit(request_scope("mcp_a")) == 0
    assert limiter.admit(request_scope("mcp_a", address="192.0.2.2")) == 1
    assert limiter.admit(request_scope("mcp_b")) == 0
    assert limiter.admit(request_scope(None)) == 0
    assert limiter.admit(request_scope(None)) == 1
    assert limiter.admit(request_scope(None, address="192.0.2.2")) == 0
    assert limiter.admit(request_scope(None, path="/healthz")) == 0


def test_unauthorized_blocks_address() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 2, clock=clock)

    for token in ("mcp_x1", "mcp_x2"):
        assert limiter.admit(request_scope(token)) == 0
        limiter.record_unauthorized(request_scope(token))
    assert limiter.admit(request_scope("mcp_valid")) == 1
    assert limiter.admit(request_scope("mcp_valid", address="192.0.2.9")) == 0
    # Anonymous requests have their own bucket at the same address.
    assert limiter.admit(request_scope(None)) == 0
    clock.now += 1
    assert limiter.admit(request_scope("mcp_valid")) == 0


def test_idle_buckets_dropped() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 20, clock=clock)
    for number in range(50):
        limiter.admit(request_scope(f"mcp_{number}"))
    assert len(limiter) == 50

    clock.now += 1  # before the first sweep (every burst / rate = 2 s): all kept
    limiter.admit(request_scope("mcp_0"))
    assert len(limiter) == 50
    clock.now += 2  # every bucket has refilled, so the sweep drops them all
    limiter.admit(request_scope("mcp_new"))
    assert len(limiter) == 1


def test_token_not_kept_in_memory() -> None:
    limiter = RateLimiter(1, 1, clock=FakeClock())
    token = f"mcp_{secrets.token_urlsafe(32)}"
    limiter.admit(request_scope(token))

    keys = list(limiter._buckets)
    assert len(keys) == 1
    assert isinstance(keys[0], bytes)
    assert token.encode() not in keys[0]
    assert keys[0] != hashlib.sha256(token.encode()).digest()[:16]


# --- size limits ----------------------------------------------------------------------


def test_query_over_limit_rejected(limited_api: ApiServer, limited_org: Org) -> None:
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as client:
        at_limit = client.get("/v1/instances?name=" + "a" * (512 - len("name=")))
        over = client.get("/v1/instances?name=" + "a" * (513 - len("name=")))

    # At the limit the request reaches the list handler, which rejects the long name.
    assert_error(at_limit, 400, "invalid_parameter")
    error = assert_error(over, 414, "invalid_request")
    assert "513" in error["message"]
    assert "512" in error["message"]


@pytest.mark.parametrize("path", ["/healthz", "/v1/flavors", "/v1/unknown"])
def test_long_query_rejected_everywhere(limited_api: ApiServer, path: str) -> None:
    with client_at(limited_api, unique_address()) as client:
        response = client.get(f"{path}?q=" + "x" * 600)
    assert_error(response, 414, "invalid_request")


def test_headers_over_limit_rejected(limited_api: ApiServer, limited_org: Org) -> None:
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as client:
        fits = client.get("/v1/flavors", headers={"X-Padding": "p" * 1000})
        over = client.get("/v1/flavors", headers={"X-Padding": "p" * 2100})
        many = client.get(
            "/v1/flavors", headers={f"X-Padding-{i}": "p" * 30 for i in range(60)}
        )

    assert fits.status_code == 200
    error = assert_error(over, 431, "invalid_request")
    assert "2048" in error["message"]
    assert_error(many, 431, "invalid_request")


def test_oversized_request_changes_nothing(limited_api: ApiServer, limited_org: Org) -> None:
    name = f"big-{uuid.uuid4().hex[:8]}"
    with client_at(limited_api, unique_address(), limited_org.tokens["rw"]) as client:
        response = client.post(
            "/v1/instances",
            json={"name": name, "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE},
            headers={"X-Padding": "p" * 2100},
        )
        listed = client.get("/v1/instances", params={"name": name})

    assert_error(response, 431, "invalid_request")
    assert listed.json()["instances"] == []


# --- security headers -----------------------------------------------------------------


def header_cases(api: ApiServer, org: Org) -> dict[str, httpx.Response]:
    """Send one request of each kind, successes and errors, to every layer that responds."""
    with org.client() as client, org.client("read") as reader, api.client() as anonymous:
        instance = create_instance(client, "headers-1")
        return {
            "healthz": anonymous.get("/healthz"),
            "readyz": anonymous.get("/readyz"),
            "metrics": anonymous.get("/metrics"),
            "openapi": anonymous.get("/openapi.json"),
            "docs asset": anonymous.get("/docs/assets/swagger-ui.css"),
            "list": client.get("/v1/instances"),
            "show": client.get(f"/v1/instances/{instance['id']}"),
            "create": client.post(
                "/v1/instances",
                json={"name": "headers-2", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE},
            ),
            "no token": anonymous.get("/v1/instances"),
            "bad token": api.client("mcp_not-a-token").get("/v1/instances"),
            "wrong scope": reader.delete(f"/v1/instances/{instance['id']}"),
            "not found": client.get(f"/v1/instances/{uuid.uuid4()}"),
            "unknown route": client.get("/v1/unknown"),
            "wrong method": client.put("/v1/instances"),
            "invalid json": client.post("/v1/instances", content=b"{", headers=JSON),
            "wrong media type": client.post(
                "/v1/instances", content=b"x", headers={"Content-Type": "text/plain"}
            ),
            "bad parameter": client.get("/v1/instances", params={"limit": "abc"}),
            "body too large": client.post(
                "/v1/instances", content=b"{" + b" " * (1024 * 1024 + 10) + b"}", headers=JSON
            ),
            "options": client.options("/v1/instances"),
        }


def test_security_headers_everywhere(api: ApiServer, org: Org) -> None:
    responses = header_cases(api, org)

    expected_statuses = {
        "healthz": 200, "readyz": 200, "metrics": 200, "openapi": 200, "docs asset": 200,
        "list": 200, "show": 200, "create": 202, "no token": 401, "bad token": 401,
        "wrong scope": 403, "not found": 404, "unknown route": 404, "wrong method": 405,
        "invalid json": 400, "wrong media type": 415, "bad parameter": 400,
        "body too large": 413, "options": 204,
    }
    for name, response in responses.items():
        assert response.status_code == expected_statuses[name], name
        headers = response.headers
        assert headers["x-content-type-options"] == "nosniff", name
        assert headers["cache-control"] == "no-store", name
        assert headers["referrer-policy"] == "no-referrer", name
        assert headers["x-frame-options"] == "DENY", name
        assert headers.get_list("content-security-policy") == [API_POLICY], name
        assert "strict-transport-security" not in headers, name


def test_docs_policy_allows_its_script(api: ApiServer) -> None:
    with api.client() as anonymous:
        response = anonymous.get("/docs")

    policy = response.headers.get_list("content-security-policy")
    assert len(policy) == 1
    inline = response.text.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}'" in policy[0]
    assert "frame-ancestors 'none'" in policy[0]
    assert "unsafe-eval" not in policy[0]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_limit_responses_have_security_headers(limited_api: ApiServer) -> None:
    address = unique_address()
    with client_at(limited_api, address) as client:
        for _ in range(BURST):
            client.get("/docs")
        responses = {
            "429": client.get("/v1/flavors"),
            "414": client.get("/healthz?q=" + "x" * 600),
            "431": client.get("/healthz", headers={"X-Padding": "p" * 2100}),
        }

    for name, response in responses.items():
        assert response.status_code == int(name)
        assert response.headers["x-content-type-options"] == "nosniff", name
        assert response.headers["cache-control"] == "no-store", name
        assert response.headers["content-security-policy"] == API_POLICY, name


def test_hsts_only_over_https(limited_api: ApiServer) -> None:
    with client_at(limited_api, unique_address()) as client:
        proxied_https = client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
        proxied_http = client.get("/healthz", headers={"X-Forwarded-Proto": "http"})
        direct = client.get("/healthz")

    assert proxied_https.headers["strict-transport-security"] == "max-age=31536000"
    assert "strict-transport-security" not in proxied_http.headers
    assert "strict-transport-security" not in direct.headers


def test_hsts_ignores_untrusted_forwarded_proto(api: ApiServer) -> None:
    with api.client() as client:
        response = client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert "strict-transport-security" not in response.headers


# --- token secrets in logs ------------------------------------------------------------


def run_admin(backend: Backend, log_dir: Path, *args: str) -> str:
    """Run the admin CLI at DEBUG; return its output, keeping its log output in a file."""
    env = {**os.environ, "MYCLOUD_DATABASE_URL": backend.url, "MYCLOUD_LOG_LEVEL": "DEBUG"}
    with (log_dir / "admin-cli.log").open("ab") as log_file:
        completed = subprocess.run(
            [sys.executable, "-m", "mycloud_compute.cli.admin", *args],
            env=env, stdout=subprocess.PIPE, stderr=log_file, check=True,
        )
    return completed.stdout.decode()


def send_tokens_everywhere(server: ApiServer, tokens: dict[str, str]) -> dict[str, int]:
    """Send each token in headers, query strings and bodies; return some statuses."""
    statuses: dict[str, int] = {}
    for label, token in tokens.items():
        headers_variants = {
            "bearer": f"Bearer {token}",
            "lowercase": f"bearer {token}",
            "extra word": f"Bearer {token} {token}",
            "basic": f"Basic {token}",
            "bare": token,
        }
        for variant, value in headers_variants.items():
            with server.client() as client:
                response = client.get("/v1/instances", headers={"Authorization": value})
                statuses[f"{label} {variant}"] = response.status_code
                client.post(
                    "/v1/instances", headers={"Authorization": value, **JSON},
                    json={"name": "leak", "flavor_id": "not-a-uuid", "image_id": token},
                )
        with server.client(tokens["good"]) as client:
            client.get("/v1/instances", params={"token": token})
            client.get("/v1/instances", params={"name": token})
            client.get(f"/v1/instances?access_token={token}&marker={token}")
            if token.startswith("mcp_"):
                # Only the token prefix distinguishes a pasted token from a mistyped id or name.
                client.get(f"/v1/instances/{token}")
            client.post("/v1/instances", json={"token": token})
            client.post("/v1/instances", content=f'{{"name": "{token}"', headers=JSON)
            client.post("/v1/keypairs", json={"name": "k", "public_key": token})
        with server.client() as anonymous:
            anonymous.get("/healthz", params={"token": token})
            if token.startswith("mcp_"):
                anonymous.get("/openapi.json", headers={"X-Request-Id": token})
    return statuses


def test_tokens_never_logged(fresh_backend: Backend, tmp_path: Path) -> None:
    # A database of its own: the session's API server shares `backend`, and its worker
    # would otherwise build this test's instance and log the spawn in its own log.
    backend = fresh_backend
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    organization = f"leak-{uuid.uuid4().hex[:8]}"
    run_admin(backend, log_dir, "org", "create", organization)
    tokens = {
        name: run_admin(
            backend, log_dir, "token", "create", "--org", organization, "--scopes", "read,write",
            "--name", name, *extra,
        ).strip()
        for name, extra in {
            "good": [], "revoked": [], "expired": ["--expires-in", "0.000001"],
        }.items()
    }
    run_admin(backend, log_dir, "token", "revoke", "--org", organization, "--name", "revoked")
    tokens["unknown"] = f"mcp_{secrets.token_urlsafe(32)}"
    tokens["no prefix"] = secrets.token_urlsafe(32)

    server = start_api(
        backend, log_dir, log_level="DEBUG", rate_limit_per_second="1000",
        public_url="https://api.example.test",
    )
    try:
        statuses = send_tokens_everywhere(server, tokens)
        with server.client(tokens["good"]) as client:
            # The worker's spawn step is the one source of DEBUG lines checked below.
            created = create_instance(client, "leak-check")
            wait_for(client, created["id"], status="ACTIVE")
            https_headers = client.get("/healthz").headers
    finally:
        server.stop()

    # The requests were authenticated as expected, so the test saw every path.
    assert statuses["good bearer"] == 200
    assert statuses["good lowercase"] == 200
    for label in ("revoked", "expired", "unknown", "no prefix"):
        assert statuses[f"{label} bearer"] == 401, label
    assert https_headers["strict-transport-security"] == "max-age=31536000"

    logs = {path.name: path.read_text(errors="replace") for path in log_dir.iterdir()}
    assert any(" DEBUG " in text for text in logs.values()), "the server did not log at DEBUG"
    for label, token in tokens.items():
        secret_part = token.removeprefix("mcp_")
        for name, text in logs.items():
            assert token not in text, f"{label} token in {name}"
            assert secret_part not in text, f"{label} token secret in {name}"
            # A prefix long enough to identify the token is as bad as the whole.
            assert secret_part[:16] not in text, f"{label} token prefix in {name}"


def test_admin_cli_prints_token_once(backend: Backend, tmp_path: Path) -> None:
    organization = f"print-{uuid.uuid4().hex[:8]}"
    run_admin(backend, tmp_path, "org", "create", organization)
    output = run_admin(
        backend, tmp_path, "token", "create", "--org", organization, "--scopes", "read",
        "--name", "ci",
    )
    listed = run_admin(backend, tmp_path, "token", "list", "--org", organization)

    token = output.strip()
    assert re.fullmatch(r"mcp_[A-Za-z0-9_-]{43}", token)
    assert token not in listed
    assert token.removeprefix("mcp_")[:16] not in (tmp_path / "admin-cli.log").read_text()

