"""Conventions every endpoint shares: request ids, the error envelope for routing and
body errors, size limits, operations endpoints, the OpenAPI document and /docs.
"""

from __future__ import annotations

import os
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import (
    ApiServer,
    Backend,
    Org,
    Process,
    _admin_execute,
    _database_url_for,
    free_port,
    make_org,
    require_postgres,
    start_api,
    start_process,
)
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error
from litestar.routes import HTTPRoute

from mycloud_compute.api.app import create_litestar
from mycloud_compute.settings import Settings

SERVER_REQUEST_ID = re.compile(
    r"^req-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
SMALL_BODY_LIMIT = 2048
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}
# Traces of internals that an error body must never show.
INTERNAL_MARKERS = ["Traceback", "sqlalchemy", "asyncpg", "SELECT", "tokens", ".py", "Error:"]


@pytest.fixture(scope="module")
def org(api: ApiServer) -> Org:
    """One organization for the whole module, because no test here lists or counts instances."""
    return make_org(api, "conventions")


@pytest.fixture(scope="module")
def client(org: Org) -> Iterator[httpx.Client]:
    with org.client() as rw_client:
        yield rw_client


def instance_body(**fields: Any) -> dict[str, Any]:
    return {"name": "web-1", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE, **fields}


# --- request ids ----------------------------------------------------------------------


def sample_responses(api: ApiServer, client: httpx.Client) -> dict[str, httpx.Response]:
    """One response of each kind: success, auth error, routing errors, body errors, assets."""
    with api.client() as anonymous:
        return {
            "healthz": anonymous.get("/healthz"),
            "no token": anonymous.get("/v1/instances"),
            "openapi": anonymous.get("/openapi.json"),
            "docs": anonymous.get("/docs"),
            "docs asset": anonymous.get("/docs/assets/swagger-ui.css"),
            "list": client.get("/v1/instances"),
            "unknown route": client.get("/v1/unknown"),
            "wrong method": client.put("/v1/instances"),
            "wrong media type": client.post("/v1/instances", content=b"x", headers=TEXT),
            "invalid json": client.post("/v1/instances", content=b"{", headers=JSON),
            "options": client.options("/v1/instances"),
        }


def test_request_id_on_every_response(api: ApiServer, client: httpx.Client) -> None:
    responses = sample_responses(api, client)

    request_ids = []
    for name, response in responses.items():
        request_id = response.headers.get("x-request-id", "")
        assert SERVER_REQUEST_ID.match(request_id), f"{name}: {request_id!r}"
        assert response.headers["x-content-type-options"] == "nosniff", name
        request_ids.append(request_id)
    assert len(set(request_ids)) == len(request_ids)


@pytest.mark.parametrize("request_id", ["abc", "Trace.ID_42-x", "7" * 64])
def test_request_id_reused(client: httpx.Client, request_id: str) -> None:
    ok = client.get("/healthz", headers={"X-Request-Id": request_id})
    failed = client.get("/v1/instances/unknown", headers={"X-Request-Id": request_id})

    assert ok.headers["x-request-id"] == request_id
    assert failed.headers["x-request-id"] == request_id
    assert failed.json()["error"]["request_id"] == request_id


@pytest.mark.parametrize("request_id", ["7" * 65, "has space", "slash/id", "semi;colon", "", "é"])
def test_request_id_replaced(client: httpx.Client, request_id: str) -> None:
    headers = {"X-Request-Id": request_id.encode("latin-1")}

    response = client.get("/v1/instances/unknown", headers=headers)

    assert SERVER_REQUEST_ID.match(response.headers["x-request-id"])
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


# --- routing errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/unknown", "/v1/instances/x/y", "/v2/instances", "/v1/flavors/x/extra"]
)
def test_unknown_route(client: httpx.Client, path: str) -> None:
    error = assert_error(client.get(path), 404, "not_found")

    assert error["details"] is None


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_top_level_route(client: httpx.Client, method: str) -> None:
    response = client.request(method, "/unknown")

    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v1/instances", {"GET", "POST"}),
        ("POST", f"/v1/instances/{uuid.UUID(int=1)}", {"GET", "PATCH", "DELETE"}),
        ("PATCH", "/v1/flavors", {"GET", "POST"}),
        ("PUT", f"/v1/images/{uuid.UUID(int=1)}", {"GET", "DELETE"}),
        ("DELETE", "/healthz", {"GET"}),
    ],
)
def test_wrong_method(client: httpx.Client, method: str, path: str, allowed: set[str]) -> None:
    response = client.request(method, path)

    assert_error(response, 405, "method_not_allowed")
    listed = {item.strip() for item in response.headers["allow"].split(",")}
    assert listed - {"OPTIONS", "HEAD"} == allowed


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/flavors", {"GET", "HEAD", "POST", "OPTIONS"}),
        (f"/v1/instances/{uuid.UUID(int=1)}", {"GET", "HEAD", "PATCH", "DELETE", "OPTIONS"}),
        (f"/v1/instances/{uuid.UUID(int=1)}/actions/stop", {"POST", "OPTIONS"}),
    ],
)
def test_options_allow_every_method(client: httpx.Client, path: str, allowed: set[str]) -> None:
    """OPTIONS listed only the methods of the path's first handler.

    Litestar builds its OPTIONS handler with the first route handler of a path, so
    ``OPTIONS /v1/flavors`` sent ``Allow: GET, OPTIONS`` while POST was served too.
    """
    options = client.options(path)
    wrong_method = client.put(path)

    assert options.status_code == 204
    assert {item.strip() for item in options.headers["allow"].split(",")} == allowed
    assert wrong_method.headers["allow"] == options.headers["allow"]


def test_head_like_get_without_body(client: httpx.Client) -> None:
    """HEAD was a 405 on every route, because Litestar serves HEAD only where declared."""
    get = client.get("/v1/flavors")
    head = client.head("/v1/flavors")
    missing = client.head(f"/v1/instances/{uuid.UUID(int=1)}")

    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["content-type"] == get.headers["content-type"]
    assert missing.status_code == 404
    assert missing.content == b""


# --- request bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/jsonx",
        "application/json; charset=latin-1",
        'application/json; charset="utf-16"',
        None,
    ],
)
def test_wrong_media_type(client: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    content = b'{"name": "web-1"}'

    created = client.post("/v1/instances", content=content, headers=headers)
    updated = client.patch(f"/v1/instances/{uuid.UUID(int=1)}", content=content, headers=headers)

    assert_error(created, 415, "unsupported_media_type")
    assert_error(updated, 415, "unsupported_media_type")


def test_media_type_case_insensitive(client: httpx.Client) -> None:
    response = client.post(
        "/v1/instances",
        content=httpx.Request("POST", "/", json=instance_body()).content,
        headers={"Content-Type": "Application/JSON; Charset=UTF-8"},
    )

    assert response.status_code == 202, response.text


@pytest.mark.parametrize("content", [b"{", b'{"name": }', b"\xff\xfe", b"{'name': 'x'}", b"NaN"])
def test_invalid_json(client: httpx.Client, content: bytes) -> None:
    response = client.post("/v1/instances", content=content, headers=JSON)

    error = assert_error(response, 400, "invalid_request")
    assert "JSON" in error["message"]


@pytest.mark.parametrize("content", [b"[]", b'"web-1"', b"null", b"42", b"true"])
def test_json_not_object(client: httpx.Client, content: bytes) -> None:
    created = client.post("/v1/instances", content=content, headers=JSON)
    updated = client.patch(f"/v1/instances/{uuid.UUID(int=1)}", content=content, headers=JSON)

    error = assert_error(created, 400, "invalid_request")
    assert "object" in error["message"]
    # PATCH checks the body before it looks the instance up.
    assert_error(updated, 400, "invalid_request")


def test_missing_body(client: httpx.Client) -> None:
    response = client.post("/v1/instances", headers=JSON)

    error = assert_error(response, 400, "invalid_request")
    assert error["message"] == "the request body is missing; send a JSON object"


@pytest.fixture(scope="module")
def small_body_api(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    server = start_api(
        backend, tmp_path_factory.mktemp("small-body"), max_body_bytes=str(SMALL_BODY_LIMIT)
    )
    yield server
    server.stop()


def test_body_over_limit(small_body_api: ApiServer) -> None:
    owner = make_org(small_body_api, "limits")
    # Both bodies are valid, and only their size differs (about 1.1 KB and 2.4 KB).
    within_limit = instance_body(description="d" * 1000)
    large_metadata = {f"key-{n}": "v" * 255 for n in range(5)}
    over_limit = instance_body(description="d" * 1000, metadata=large_metadata)

    with owner.client() as client:
        within = client.post("/v1/instances", json=within_limit)
        over = client.post("/v1/instances", json=over_limit)
        patched = client.patch(
            f"/v1/instances/{within.json()['id']}", json={"description": "d" * SMALL_BODY_LIMIT}
        )

    assert within.status_code == 202, within.text
    error = assert_error(over, 413, "payload_too_large")
    assert error["details"] is None
    assert_error(patched, 413, "payload_too_large")


def test_chunked_body_over_limit(small_body_api: ApiServer) -> None:
    owner = make_org(small_body_api, "chunked")

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "web-1", "description": "'
        for _ in range(4):
            yield b"d" * 1000
        yield b'"}'

    with owner.client() as client:
        response = client.post(
            "/v1/instances", content=chunks(), headers={"Content-Type": "application/json"}
        )

    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


# --- operations endpoints -------------------------------------------------------------


def test_healthz(api: ApiServer) -> None:
    with api.client() as anonymous:
        response = anonymous.get("/healthz")

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok"}


def test_readyz(api: ApiServer) -> None:
    with api.client() as anonymous:
        response = anonymous.get("/readyz")

    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok"}


def start_api_only(database_url: str, log_dir: Path) -> tuple[Process, str]:
    """Start one API process without waiting for /readyz (the database may be unusable)."""
    port = free_port()
    env = {
        "MYCLOUD_DATABASE_URL": database_url,
        "MYCLOUD_LOG_LEVEL": "INFO",
        "MYCLOUD_RUN_WORKER": "no",
    }
    process = start_process(
        ["-m", "uvicorn", "mycloud_compute.api.asgi:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log"],
        env,
        log_dir / "api.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"the API process exited at start-up:\n{process.log()}")
        try:
            httpx.get(f"{base_url}/healthz", timeout=1)
            return process, base_url
        except httpx.TransportError:
            time.sleep(0.1)
    process.stop()
    raise RuntimeError(f"the API did not answer /healthz in 30 s:\n{process.log()}")


def test_database_unreachable(tmp_path: Path) -> None:
    # Nothing listens on a port that was free a moment ago.
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/mycloud_test_unreachable"
    process, base_url = start_api_only(url, tmp_path)
    try:
        with httpx.Client(base_url=base_url, timeout=30) as anonymous:
            health = anonymous.get("/healthz")
            ready = anonymous.get("/readyz")
            listed = anonymous.get("/v1/instances", headers={"Authorization": "Bearer mcp_x"})
    finally:
        process.stop()

    assert health.status_code == 200, health.text
    for response in (ready, listed):
        assert_error(response, 503, "service_unavailable")
        assert int(response.headers["retry-after"]) >= 1
        for marker in INTERNAL_MARKERS:
            assert marker not in response.text, marker


@pytest.fixture
def unmigrated_postgres() -> Iterator[str]:
    """A fresh PostgreSQL database without the schema."""
    require_postgres()
    name = f"mycloud_test_{os.getpid()}_{uuid.uuid4().hex[:8]}_bare"
    _admin_execute(f'CREATE DATABASE "{name}"')
    try:
        yield _database_url_for(name)
    finally:
        _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_internal_error_hides_details(unmigrated_postgres: str, tmp_path: Path) -> None:
    # The tokens table is missing, so authentication fails with an unexpected SQL error.
    process, base_url = start_api_only(unmigrated_postgres, tmp_path)
    try:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            response = client.get(
                "/v1/instances",
                headers={"Authorization": "Bearer mcp_x", "X-Request-Id": "trace-500"},
            )
    finally:
        process.stop()

    error = assert_error(response, 500, "internal_error")
    assert error["message"] == "internal server error"
    assert error["details"] is None
    for marker in INTERNAL_MARKERS:
        assert marker not in response.text, marker
    log = process.log()
    assert "unhandled error request_id=trace-500" in log
    assert "Traceback" in log


# --- OpenAPI --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(api: ApiServer) -> dict[str, Any]:
    with api.client() as anonymous:
        response = anonymous.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def served_routes() -> set[tuple[str, str]]:
    """(path, method) of every route the application serves and documents."""
    with warnings.catch_warnings():
        # Litestar 2 warns about inferred parameters while it builds the routes, and
        # those warnings concern the route modules, not what this test checks.
        warnings.simplefilter("ignore", DeprecationWarning)
        app = create_litestar(Settings(database_url="sqlite:///unused.db"))
    routes = set()
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if not handler.fn.__module__.startswith("mycloud_compute."):
                continue
            if not handler.resolve_include_in_schema():
                continue
            for method in handler.http_methods:
                routes.add((route.path_format, method.lower()))
    return routes


def operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_openapi_version(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.1.")
    assert openapi["info"]["title"]
    assert openapi["info"]["version"]


def test_openapi_lists_every_route(openapi: dict[str, Any]) -> None:
    documented = {(path, method) for path, method, _ in operations(openapi)}

    served = served_routes()

    assert ("/v1/instances", "get") in served
    assert ("/v1/instances/{instance_id}", "patch") in served
    assert ("/readyz", "get") in served
    assert documented == served


def test_openapi_list_parameters(openapi: dict[str, Any]) -> None:
    parameters = openapi["paths"]["/v1/instances"]["get"]["parameters"]
    by_name = {parameter["name"]: parameter for parameter in parameters}

    assert list(by_name) == ["limit", "marker", "name", "status", "tags", "flavor_id", "image_id"]
    for parameter in parameters:
        assert parameter["in"] == "query", parameter["name"]
        assert parameter["required"] is False, parameter["name"]
        assert parameter["description"], parameter["name"]
    limit_schema = {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20}
    assert by_name["limit"]["schema"] == limit_schema
    for name in ("marker", "flavor_id", "image_id"):
        assert by_name[name]["schema"] == {"type": "string", "format": "uuid"}, name
    assert by_name["name"]["schema"]["maxLength"] == 255


@pytest.mark.parametrize("path", ["/v1/flavors", "/v1/images"])
def test_openapi_catalog_list_parameters(openapi: dict[str, Any], path: str) -> None:
    parameters = openapi["paths"][path]["get"]["parameters"]

    assert [parameter["name"] for parameter in parameters] == ["limit", "marker"]


def test_openapi_path_parameters(openapi: dict[str, Any]) -> None:
    for path, method, operation in operations(openapi):
        declared = {
            parameter["name"]
            for parameter in operation.get("parameters", [])
            if parameter["in"] == "path"
        }
        assert declared == set(re.findall(r"\{(\w+)\}", path)), f"{method} {path}"
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["required"] is True, f"{method} {path}"


def error_statuses(operation: dict[str, Any]) -> set[str]:
    """Statuses whose response body is the error envelope."""
    statuses = set()
    for status, response in operation["responses"].items():
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("$ref") == "#/components/schemas/ErrorBody":
            statuses.add(status)
    return statuses


def test_openapi_error_responses(openapi: dict[str, Any]) -> None:
    for path, method, operation in operations(openapi):
        if not path.startswith("/v1/"):
            continue
        declared = error_statuses(operation)
        expected = {"400", "401", "403", "500", "503"}
        if "{" in path:
            expected.add("404")
        if method in ("post", "patch"):
            expected |= {"413", "415"}
        assert expected <= declared, f"{method} {path} lacks {sorted(expected - declared)}"


def test_openapi_error_schema(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]

    assert schemas["ErrorBody"]["required"] == ["error"]
    detail = schemas["ErrorDetail"]
    assert set(detail["required"]) == {"code", "type", "message", "details", "request_id"}


def test_openapi_operations_need_no_token(openapi: dict[str, Any]) -> None:
    for path in ("/healthz", "/readyz"):
        operation = openapi["paths"][path]["get"]
        # An empty list, or a list with an empty requirement, overrides the global bearer.
        assert operation.get("security") in ([], [{}]), path
    assert "503" in error_statuses(openapi["paths"]["/readyz"]["get"])


def test_openapi_bearer_security(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]

    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert openapi["security"] == [{"bearer": []}]


def test_openapi_instance_fields(openapi: dict[str, Any]) -> None:
    instance = openapi["components"]["schemas"]["Instance"]

    assert list(instance["properties"]) == [
        "id", "crn", "name", "description", "status", "power_state", "task_state", "vm_state",
        "flavor", "image", "addresses", "security_groups", "volumes_attached", "key_names",
        "metadata", "tags", "fault", "created_at", "updated_at", "launched_at", "terminated_at",
    ]
    assert set(instance["required"]) == set(instance["properties"])


def test_openapi_timestamp_format(openapi: dict[str, Any]) -> None:
    created_at = openapi["components"]["schemas"]["Instance"]["properties"]["created_at"]

    assert created_at.get("format") == "date-time"


def collect_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from collect_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from collect_refs(value)


def test_openapi_structure_valid(openapi: dict[str, Any]) -> None:
    # A structural check in place of a full OpenAPI validator, which is not installed.
    schemas = openapi["components"]["schemas"]
    for ref in collect_refs(openapi):
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref

    operation_ids = [operation["operationId"] for _, _, operation in operations(openapi)]
    assert len(operation_ids) == len(set(operation_ids))

    for path, method, operation in operations(openapi):
        name = f"{method} {path}"
        assert path.startswith("/"), name
        assert method in {"get", "post", "put", "patch", "delete"}, name
        assert any(status.startswith("2") for status in operation["responses"]), name
        for status, response in operation["responses"].items():
            assert re.fullmatch(r"[1-5]\d\d", status), f"{name} {status}"
            assert response["description"], f"{name} {status}"
        for requirement in operation.get("security", []):
            assert set(requirement) <= set(openapi["components"]["securitySchemes"]), name
        if method in ("post", "patch"):
            content = operation["requestBody"]["content"]
            assert list(content) == ["application/json"], name


# --- interactive documentation --------------------------------------------------------


class AssetCollector(HTMLParser):
    """Collect script and stylesheet URLs from a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "script" and attributes.get("src"):
            self.urls.append(str(attributes["src"]))
        if tag == "link" and attributes.get("rel") == "stylesheet" and attributes.get("href"):
            self.urls.append(str(attributes["href"]))


def test_docs_page(api: ApiServer) -> None:
    with api.client() as anonymous:
        page = anonymous.get("/docs")
        collector = AssetCollector()
        collector.feed(page.text)
        assets = {url: anonymous.get(url) for url in collector.urls}
        spec = anonymous.get("/openapi.json")

    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert len(assets) == 2
    for url, response in assets.items():
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        assert response.status_code == 200, url
    assert '"/openapi.json"' in page.text
    assert spec.status_code == 200
    # No external URL, and no online validator badge that would fetch one.
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "validatorUrl: null" in page.text


def test_docs_asset_types(api: ApiServer) -> None:
    with api.client() as anonymous:
        script = anonymous.get("/docs/assets/swagger-ui-bundle.js")
        stylesheet = anonymous.get("/docs/assets/swagger-ui.css")
        missing = anonymous.get("/docs/assets/missing.js")

    assert "javascript" in script.headers["content-type"]
    assert stylesheet.headers["content-type"].startswith("text/css")
    assert_error(missing, 404, "not_found")

