"""GET /v1/instances: query parameters, response shape, pagination, links,
organization isolation and authentication, on SQLite and PostgreSQL.

Most tests insert instance rows straight into the database with chosen names, tags,
statuses and timestamps. Such rows have no lifecycle task, so the worker has nothing
to run for them while a test lists them over HTTP.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from conftest import (
    ApiServer,
    Backend,
    Org,
    _wait_ready,
    free_port,
    make_org,
    start_api,
    start_process,
)
from helpers import (
    DEBIAN_IMAGE,
    MEDIUM_FLAVOR,
    SMALL_FLAVOR,
    TINY_FLAVOR,
    UBUNTU_IMAGE,
    assert_error,
    create_instance,
)
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import identity as identity_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import flavors, images
from mycloud_compute.services import identity

PUBLIC_URL = "https://api.spo1.mycloud.com"

INSTANCE_KEYS = [
    "id", "crn", "name", "description", "status", "power_state", "task_state", "vm_state",
    "flavor", "image", "addresses", "security_groups", "volumes_attached", "key_names",
    "metadata", "tags", "fault", "created_at", "updated_at", "launched_at", "terminated_at",
]
META_KEYS = ["total", "limit", "marker", "has_more"]
LINK_KEYS = ["self", "next", "previous"]
STATUSES = [
    "BUILD", "ACTIVE", "SHUTOFF", "REBOOT", "HARD_REBOOT", "RESIZE", "VERIFY_RESIZE",
    "ERROR", "DELETED",
]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# The vm_state and power_state stored with each status. Inserted rows have no task_state.
STATES = {
    "BUILD": ("BUILDING", "NOSTATE"),
    "ACTIVE": ("ACTIVE", "RUNNING"),
    "SHUTOFF": ("STOPPED", "SHUTDOWN"),
    "ERROR": ("ERROR", "NOSTATE"),
    "DELETED": ("DELETED", "NOSTATE"),
}
FAULT = {
    "code": 500,
    "message": "No valid host was found",
    "details": "no host has 2 free vCPUs",
    "created": "2024-01-15T10:30:00Z",
}

# Inserted rows are created 1.5 s apart, so half of them have zero microseconds.
# SQLite stores timestamps as text, so both forms must sort in time order.
BASE_TIME = datetime(2024, 1, 15, 10, 30, 0)
_row_numbers = itertools.count()


def next_created_at() -> datetime:
    return BASE_TIME + timedelta(milliseconds=1500 * next(_row_numbers))


# --- database helpers ----------------------------------------------------------------


async def organization_id_of(conn: AsyncConnection, org: Org) -> uuid.UUID:
    row = await identity_store.find_organization(conn, org.name)
    assert row is not None
    return row.id  # type: ignore[no-any-return]


def instance_row(
    organization_id: uuid.UUID,
    flavor: Any,
    image: Any,
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Build complete instance column values, as create_instance stores them."""
    status = spec.get("status", "ACTIVE")
    vm_state, power_state = STATES[status]
    created_at = spec.get("created_at") or next_created_at()
    values: dict[str, Any] = {
        "organization_id": organization_id,
        "id": uuid.UUID(spec["id"]) if "id" in spec else uuid.uuid4(),
        "name": spec["name"],
        "description": "",
        "status": status,
        "vm_state": vm_state,
        "task_state": None,
        "power_state": power_state,
        "flavor_id": flavor.id,
        "flavor": {
            "id": str(flavor.id),
            "name": flavor.name,
            "vcpus": flavor.vcpus,
            "ram": flavor.ram,
            "disk": flavor.disk,
        },
        "image_id": image.id,
        "image": {"id": str(image.id), "name": image.name},
        "host_id": None,
        "network_ids": [],
        "addresses": {},
        "security_groups": [{"name": "default"}],
        "volumes_attached": [],
        "key_names": [],
        "metadata": {},
        "tags": list(spec.get("tags", [])),
        "fault": FAULT if status == "ERROR" else None,
        "created_at": created_at,
        "updated_at": created_at,
        "launched_at": created_at if status in ("ACTIVE", "SHUTOFF") else None,
        "terminated_at": created_at if status == "DELETED" else None,
    }
    overrides = {
        key: value
        for key, value in spec.items()
        if key not in ("id", "status", "tags", "flavor_id", "image_id", "created_at")
    }
    values.update(overrides)
    return values


def insert_instances(org: Org, specs: list[dict[str, Any]]) -> list[str]:
    """Insert instance rows into ``org`` and return their ids, in the order of ``specs``.

    A spec needs ``name`` and may set ``id``, ``status``, ``tags``, ``flavor_id``,
    ``image_id``, ``created_at`` (default: later than every row inserted before) and
    any other column.
    """

    async def insert(db: Database) -> list[str]:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            flavor_rows = {row.id: row for row in (await conn.execute(select(flavors))).all()}
            image_rows = {row.id: row for row in (await conn.execute(select(images))).all()}
            ids = []
            for spec in specs:
                flavor = flavor_rows[uuid.UUID(spec.get("flavor_id", SMALL_FLAVOR))]
                image = image_rows[uuid.UUID(spec.get("image_id", UBUNTU_IMAGE))]
                values = instance_row(organization_id, flavor, image, spec)
                await instance_store.insert_instance(conn, values)
                ids.append(str(values["id"]))
            return ids

    return org.api.backend.run(insert)  # type: ignore[no-any-return]


def mark_deleted(org: Org, instance_id: str) -> None:
    """Set an instance to DELETED in the database, as a finished delete leaves it."""

    async def update(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = await organization_id_of(conn, org)
            await instance_store.update_instance(
                conn,
                organization_id,
                uuid.UUID(instance_id),
                {
                    "status": "DELETED",
                    "vm_state": "DELETED",
                    "power_state": "NOSTATE",
                    "task_state": None,
                    "terminated_at": utcnow(),
                },
            )

    org.api.backend.run(update)


def newest_first(ids: list[str], created: list[datetime]) -> list[str]:
    """Sort ids into the list order: created_at descending, then id descending."""
    pairs = sorted(zip(created, (uuid.UUID(value) for value in ids), strict=True), reverse=True)
    return [str(instance_id) for _, instance_id in pairs]


# --- HTTP helpers ---------------------------------------------------------------------


def get_list(client: httpx.Client, params: Any = None) -> dict[str, Any]:
    response = client.get("/v1/instances", params=params)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def get_list_with_headers(client: httpx.Client, headers: dict[str, str]) -> dict[str, Any]:
    response = client.get("/v1/instances", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def get_url(client: httpx.Client, url: str) -> dict[str, Any]:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def ids_of(body: dict[str, Any]) -> list[str]:
    return [item["id"] for item in body["instances"]]


def names_of(body: dict[str, Any]) -> list[str]:
    return sorted(item["name"] for item in body["instances"])


def walk_next(client: httpx.Client, first_url: str) -> list[dict[str, Any]]:
    """Fetch ``first_url``, then every ``links.next`` URL verbatim, and return the bodies."""
    pages = [get_url(client, first_url)]
    while pages[-1]["links"]["next"] is not None:
        assert len(pages) < 2000, "links.next never became null"
        pages.append(get_url(client, pages[-1]["links"]["next"]))
    return pages


def walk_previous(client: httpx.Client, last_url: str) -> list[dict[str, Any]]:
    """Fetch ``last_url``, then every ``links.previous`` URL verbatim, and return the bodies."""
    pages = [get_url(client, last_url)]
    while pages[-1]["links"]["previous"] is not None:
        assert len(pages) < 2000, "links.previous never became null"
        pages.append(get_url(client, pages[-1]["links"]["previous"]))
    return pages


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def assert_bad_parameter(response: httpx.Response, parameter: str, value: str) -> dict[str, Any]:
    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"] == {"parameter": parameter, "value": value}
    return error


# --- shared organizations ---------------------------------------------------------------

# One organization per database, for the read-only filter tests. Rows without a
# status are ACTIVE. "web-old" is DELETED, so it is hidden unless status=DELETED.
LONG_NAME = "n" * 255
LONG_WIDE_NAME = "é" * 255
FILTER_ROWS: list[dict[str, Any]] = [
    {"name": "web-1", "tags": ["web", "prod"]},
    {"name": "web-2", "status": "SHUTOFF", "tags": ["web"], "flavor_id": MEDIUM_FLAVOR},
    {"name": "Web-3", "tags": ["Web", "prod"], "image_id": DEBIAN_IMAGE},
    {"name": "web", "status": "ERROR", "tags": ["prod", "db"], "flavor_id": TINY_FLAVOR},
    {"name": "webserver", "status": "BUILD"},
    {"name": "web-old", "status": "DELETED", "tags": ["web", "prod"]},
    {"name": "100%"},
    {"name": "a_b"},
    {"name": "axb"},
    {"name": "back\\slash"},
    {"name": "x.y"},
    {"name": "xzy"},
    {"name": "[abc]"},
    {"name": "(a|b)+"},
    {"name": "^start$"},
    {"name": "a+b&c=d#e"},
    {"name": "web server 1", "tags": ["blue team"]},
    {"name": "web server 2", "tags": ["blue team", "prod"]},
    {"name": "ünï-1"},
    {"name": "ünï-2"},
    {"name": "uni-3"},
    {"name": LONG_NAME},
    {"name": LONG_WIDE_NAME},
]
VISIBLE_NAMES = sorted(row["name"] for row in FILTER_ROWS if row.get("status") != "DELETED")


@pytest.fixture(scope="module")
def filter_org(api: ApiServer) -> Org:
    org = make_org(api, "filters")
    insert_instances(org, FILTER_ROWS)
    return org


def list_filtered(org: Org, params: Any) -> dict[str, Any]:
    with org.client("read") as client:
        return get_list(client, params)


# --- limit ------------------------------------------------------------------------------


def test_limit_bounds_on_1001_instances(org: Org) -> None:
    insert_instances(org, [{"name": f"bulk-{index:04d}"} for index in range(1001)])

    with org.client("read") as client:
        default = get_list(client)
        assert len(default["instances"]) == 20
        assert default["meta"]["limit"] == 20
        assert default["meta"]["total"] == 1001
        assert default["meta"]["has_more"] is True

        single = get_list(client, {"limit": "1"})
        assert len(single["instances"]) == 1
        assert single["meta"]["limit"] == 1
        assert single["instances"][0]["name"] == "bulk-1000"

        largest = get_list(client, {"limit": "1000"})
        assert len(largest["instances"]) == 1000
        assert largest["meta"]["limit"] == 1000
        assert largest["meta"]["has_more"] is True

        rest = get_url(client, largest["links"]["next"])
    assert [item["name"] for item in rest["instances"]] == ["bulk-0000"]
    assert rest["meta"]["has_more"] is False


@pytest.mark.parametrize(
    "value", ["0", "1001", "-1", "abc", "1.5", "", " 5", "1e3", "+5", "５", "0x10"]
)
def test_limit_invalid_rejected(filter_org: Org, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"limit": value})
    error = assert_bad_parameter(response, "limit", value)
    assert "limit" in error["message"]


def test_limit_message_as_documented(filter_org: Org) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"limit": "abc"})
    error = assert_bad_parameter(response, "limit", "abc")
    assert error["message"] == "limit must be an integer between 1 and 1000, got 'abc'"


# --- marker -----------------------------------------------------------------------------


def test_marker_starts_after_instance(org: Org) -> None:
    ids = insert_instances(org, [{"name": f"m-{index}"} for index in range(5)])
    order = list(reversed(ids))

    with org.client("read") as client:
        body = get_list(client, {"marker": order[1], "limit": "2"})
    assert ids_of(body) == order[2:4]
    assert body["meta"]["marker"] == order[3]


def test_marker_uppercase_accepted(org: Org) -> None:
    ids = insert_instances(org, [{"name": f"m-{index}"} for index in range(3)])
    order = list(reversed(ids))

    with org.client("read") as client:
        body = get_list(client, {"marker": order[0].upper()})
    assert ids_of(body) == order[1:]


@pytest.mark.parametrize(
    "value",
    ["abc", "", "550e8400-e29b-41d4-a716-44665544000", "550e8400-e29b-41d4-a716-4466554400000"],
)
def test_marker_not_uuid_rejected(filter_org: Org, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"marker": value})
    assert_bad_parameter(response, "marker", value)


def test_marker_unknown_rejected(filter_org: Org) -> None:
    unknown = str(uuid.uuid4())
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"marker": unknown})
    error = assert_bad_parameter(response, "marker", unknown)
    assert error["message"] == f"marker {unknown} not found"


def test_marker_deleted_instance_valid(org: Org) -> None:
    ids = insert_instances(
        org,
        [{"name": "m-0"}, {"name": "m-1", "status": "DELETED"}, {"name": "m-2"}],
    )

    with org.client("read") as client:
        body = get_list(client, {"marker": ids[1]})
    assert ids_of(body) == [ids[0]]
    assert body["meta"]["total"] == 2


def test_marker_outside_filter_positions_page(org: Org) -> None:
    ids = insert_instances(org, [{"name": "web-a"}, {"name": "db-b"}, {"name": "web-c"}])

    with org.client("read") as client:
        body = get_list(client, {"name": "web-*", "marker": ids[1]})
    assert ids_of(body) == [ids[0]]


def test_marker_last_instance_gives_empty_page(org: Org) -> None:
    ids = insert_instances(org, [{"name": "m-0"}, {"name": "m-1"}])

    with org.client("read") as client:
        body = get_list(client, {"marker": ids[0]})
    assert body["instances"] == []
    assert body["meta"] == {"total": 2, "limit": 20, "marker": None, "has_more": False}
    assert body["links"]["next"] is None
    assert body["links"]["previous"] is not None


# --- name -------------------------------------------------------------------------------

NAME_CASES = [
    ("web-1", ["web-1"]),
    ("WEB-1", []),
    ("web", ["web"]),
    ("web-*", ["web-1", "web-2"]),
    ("Web-*", ["Web-3"]),
    ("web*", ["web", "web server 1", "web server 2", "web-1", "web-2", "webserver"]),
    ("*", VISIBLE_NAMES),
    ("100%", ["100%"]),
    ("%", []),
    ("%*", []),
    ("100*", ["100%"]),
    ("a_b", ["a_b"]),
    ("a_*", ["a_b"]),
    ("_*", []),
    ("back\\slash", ["back\\slash"]),
    ("back\\*", ["back\\slash"]),
    ("x.y", ["x.y"]),
    ("x.*", ["x.y"]),
    (".*", []),
    ("[abc]", ["[abc]"]),
    ("[*", ["[abc]"]),
    ("(a|b)+", ["(a|b)+"]),
    ("^start$", ["^start$"]),
    ("^*", ["^start$"]),
    ("a+b&c=d#e", ["a+b&c=d#e"]),
    ("a+b*", ["a+b&c=d#e"]),
    ("web server 1", ["web server 1"]),
    ("web server*", ["web server 1", "web server 2"]),
    ("ünï-*", ["ünï-1", "ünï-2"]),
    ("ünï-1", ["ünï-1"]),
    (LONG_NAME, [LONG_NAME]),
    ("n" * 254 + "*", [LONG_NAME]),
    (LONG_WIDE_NAME, [LONG_WIDE_NAME]),
    ("zzz", []),
]


@pytest.mark.parametrize(("value", "expected"), NAME_CASES)
def test_name_filter_matches(filter_org: Org, value: str, expected: list[str]) -> None:
    body = list_filtered(filter_org, {"name": value, "limit": "1000"})
    assert names_of(body) == expected
    assert body["meta"]["total"] == len(expected)


@pytest.mark.parametrize(
    ("raw_query", "expected"),
    [
        ("name=web%20server%201", ["web server 1"]),
        ("name=web+server+1", ["web server 1"]),
        ("name=web%20server*", ["web server 1", "web server 2"]),
        ("name=web%20server%2A", ["web server 1", "web server 2"]),
        ("name=100%25", ["100%"]),
        ("name=a%2Bb%26c%3Dd%23e", ["a+b&c=d#e"]),
        ("name=%C3%BCn%C3%AF-1", ["ünï-1"]),
    ],
)
def test_name_filter_url_encoded(filter_org: Org, raw_query: str, expected: list[str]) -> None:
    with filter_org.client("read") as client:
        body = get_url(client, f"/v1/instances?{raw_query}")
    assert names_of(body) == expected


def test_name_filter_deleted_with_status(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"name": "web-*", "status": "DELETED"})
    assert names_of(body) == ["web-old"]


@pytest.mark.parametrize(
    "value", ["", "*web", "w*b", "**", "web-**", "n" * 256, "n" * 255 + "*", "é" * 256, "a\x00b"]
)
def test_name_invalid_rejected(filter_org: Org, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"name": value})
    error = assert_bad_parameter(response, "name", value)
    assert "name" in error["message"]


def test_query_not_utf8_rejected(filter_org: Org) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances?name=%FF")
    assert_error(response, 400, "invalid_request")


# --- status -----------------------------------------------------------------------------

STATUS_CASES = [
    ("ACTIVE", "ACTIVE"),
    ("active", "ACTIVE"),
    ("Active", "ACTIVE"),
    ("SHUTOFF", "SHUTOFF"),
    ("error", "ERROR"),
    ("BUILD", "BUILD"),
    ("DELETED", "DELETED"),
    ("deleted", "DELETED"),
]


@pytest.mark.parametrize(("value", "expected_status"), STATUS_CASES)
def test_status_filter_single(filter_org: Org, value: str, expected_status: str) -> None:
    body = list_filtered(filter_org, {"status": value, "limit": "1000"})
    expected = sorted(
        row["name"] for row in FILTER_ROWS if row.get("status", "ACTIVE") == expected_status
    )
    assert names_of(body) == expected
    assert {item["status"] for item in body["instances"]} == {expected_status}


def test_status_filter_list(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"status": "shutoff,Error,BUILD"})
    assert names_of(body) == ["web", "web-2", "webserver"]


def test_status_filter_list_with_deleted(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"status": "deleted,error"})
    assert names_of(body) == ["web", "web-old"]


def test_status_filter_valid_but_unused(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"status": "VERIFY_RESIZE"})
    assert body["instances"] == []
    assert body["meta"]["total"] == 0


def test_status_default_hides_deleted(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"limit": "1000"})
    assert names_of(body) == VISIBLE_NAMES
    assert body["meta"]["total"] == len(VISIBLE_NAMES)


@pytest.mark.parametrize("value", ["BOGUS", "active,bogus", "", "ACTIVE,", "ACTIVE;SHUTOFF", "*"])
def test_status_invalid_rejected(filter_org: Org, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"status": value})
    error = assert_bad_parameter(response, "status", value)
    for status in STATUSES:
        assert status in error["message"]


# --- tags -------------------------------------------------------------------------------

TAG_CASES = [
    ("web", ["web-1", "web-2"]),
    ("web,prod", ["web-1"]),
    ("prod,web", ["web-1"]),
    (" web , prod ", ["web-1"]),
    ("prod", ["Web-3", "web", "web server 2", "web-1"]),
    ("Web", ["Web-3"]),
    ("WEB", []),
    ("blue team", ["web server 1", "web server 2"]),
    (" blue team ,prod", ["web server 2"]),
    ("blue", []),
    ("web,web", ["web-1", "web-2"]),
    ("web,db", []),
    ("nosuch", []),
    ("x" * 61, []),
]


@pytest.mark.parametrize(("value", "expected"), TAG_CASES)
def test_tags_filter_matches(filter_org: Org, value: str, expected: list[str]) -> None:
    body = list_filtered(filter_org, {"tags": value})
    assert names_of(body) == sorted(expected)
    assert body["meta"]["total"] == len(expected)


def test_tags_filter_deleted_with_status(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"tags": "web,prod", "status": "DELETED"})
    assert names_of(body) == ["web-old"]


@pytest.mark.parametrize("value", ["a,,b", "", ",", "web,", ",web", " , ", "web, ,prod"])
def test_tags_invalid_rejected(filter_org: Org, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={"tags": value})
    error = assert_bad_parameter(response, "tags", value)
    assert "tag" in error["message"]


# --- flavor_id and image_id -------------------------------------------------------------

CATALOG_ID_CASES = [
    ("flavor_id", MEDIUM_FLAVOR, ["web-2"]),
    ("flavor_id", TINY_FLAVOR, ["web"]),
    ("flavor_id", MEDIUM_FLAVOR.upper(), ["web-2"]),
    ("image_id", DEBIAN_IMAGE, ["Web-3"]),
    ("flavor_id", str(uuid.uuid4()), []),
    ("image_id", str(uuid.uuid4()), []),
]


@pytest.mark.parametrize(("parameter", "value", "expected"), CATALOG_ID_CASES)
def test_catalog_id_filter_matches(
    filter_org: Org, parameter: str, value: str, expected: list[str]
) -> None:
    body = list_filtered(filter_org, {parameter: value})
    assert names_of(body) == expected
    assert body["meta"]["total"] == len(expected)


def test_flavor_filter_small(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"flavor_id": SMALL_FLAVOR, "limit": "1000"})
    others = {"web-2", "web", "web-old"}
    assert names_of(body) == [name for name in VISIBLE_NAMES if name not in others]
    assert {item["flavor"]["id"] for item in body["instances"]} == {SMALL_FLAVOR}


def test_image_filter_ubuntu(filter_org: Org) -> None:
    body = list_filtered(filter_org, {"image_id": UBUNTU_IMAGE, "limit": "1000"})
    others = {"Web-3", "web-old"}
    assert names_of(body) == [name for name in VISIBLE_NAMES if name not in others]
    assert {item["image"]["id"] for item in body["instances"]} == {UBUNTU_IMAGE}


@pytest.mark.parametrize("parameter", ["flavor_id", "image_id"])
@pytest.mark.parametrize("value", ["abc", "", SMALL_FLAVOR + "0", SMALL_FLAVOR[:-1], "m1.small"])
def test_catalog_id_invalid_rejected(filter_org: Org, parameter: str, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={parameter: value})
    error = assert_bad_parameter(response, parameter, value)
    assert parameter in error["message"]


# --- unknown and repeated parameters, combined filters ----------------------------------


@pytest.mark.parametrize("parameter", ["foo", "Limit", "offset", "sort", "page", "name[]"])
def test_unknown_parameter_rejected(filter_org: Org, parameter: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params={parameter: "1"})
    error = assert_bad_parameter(response, parameter, "1")
    assert repr(parameter) in error["message"]


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("limit", "5"),
        ("marker", str(uuid.uuid4())),
        ("name", "web"),
        ("status", "ACTIVE"),
        ("tags", "web"),
        ("flavor_id", SMALL_FLAVOR),
        ("image_id", UBUNTU_IMAGE),
    ],
)
def test_repeated_parameter_rejected(filter_org: Org, parameter: str, value: str) -> None:
    with filter_org.client("read") as client:
        response = client.get("/v1/instances", params=[(parameter, value), (parameter, value)])
    error = assert_bad_parameter(response, parameter, value)
    assert repr(parameter) in error["message"]


def test_repeated_parameter_different_values(filter_org: Org) -> None:
    with filter_org.client("read") as client:
        params = httpx.QueryParams([("name", "a"), ("status", "ACTIVE"), ("name", "b")])
        response = client.get("/v1/instances", params=params)
    assert_bad_parameter(response, "name", "b")


COMBINED_CASES = [
    (
        {"name": "web*", "status": "active", "tags": "prod", "flavor_id": SMALL_FLAVOR,
         "image_id": UBUNTU_IMAGE},
        ["web server 2", "web-1"],
    ),
    ({"name": "web-*", "tags": "prod"}, ["web-1"]),
    (
        {"name": "web*", "status": "active,shutoff"},
        ["web server 1", "web server 2", "web-1", "web-2"],
    ),
    ({"tags": "prod", "image_id": DEBIAN_IMAGE}, ["Web-3"]),
    ({"tags": "prod", "flavor_id": TINY_FLAVOR, "status": "ERROR"}, ["web"]),
    ({"tags": "prod", "flavor_id": TINY_FLAVOR, "status": "ACTIVE"}, []),
    ({"name": "web-*", "status": "active,deleted", "tags": "web"}, ["web-1", "web-old"]),
    ({"name": "Web-3", "image_id": UBUNTU_IMAGE}, []),
]


@pytest.mark.parametrize(("params", "expected"), COMBINED_CASES)
def test_filters_combine_with_and(
    filter_org: Org, params: dict[str, str], expected: list[str]
) -> None:
    body = list_filtered(filter_org, params)
    assert names_of(body) == expected
    assert body["meta"]["total"] == len(expected)


# --- response shape ---------------------------------------------------------------------


def test_shape_of_created_instance(org: Org) -> None:
    with org.client() as client:
        created = create_instance(client, "shape-1", description="Primary web server", tags=["web"])
        response = client.get("/v1/instances")

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"]
    body = response.json()

    assert list(body) == ["instances", "meta", "links"]
    assert list(body["meta"]) == META_KEYS
    assert list(body["links"]) == LINK_KEYS
    [item] = body["instances"]
    assert list(item) == INSTANCE_KEYS
    assert item["id"] == created["id"]
    assert UUID_TEXT.match(item["id"])
    assert item["crn"] == f"crn:spo1:compute:instance:{item['id']}"
    assert item["name"] == "shape-1"
    assert item["description"] == "Primary web server"
    assert item["status"] in STATUSES
    assert list(item["flavor"]) == ["id", "name", "vcpus", "ram", "disk"]
    assert item["flavor"] == {
        "id": SMALL_FLAVOR, "name": "m1.small", "vcpus": 1, "ram": 2048, "disk": 20
    }
    assert list(item["image"]) == ["id", "name"]
    assert item["image"] == {"id": UBUNTU_IMAGE, "name": "Ubuntu 22.04 LTS"}
    assert item["security_groups"] == [{"name": "default"}]
    assert item["tags"] == ["web"]
    assert TIMESTAMP.match(item["created_at"])
    assert TIMESTAMP.match(item["updated_at"])


def test_shape_matches_reference_example(org: Org) -> None:
    instance_id = "550e8400-e29b-41d4-a716-446655440000"
    volume_id = str(uuid.uuid4())
    addresses = {
        "private-network": [
            {"addr": "192.168.1.10", "version": 4, "type": "fixed", "mac_addr": "fa:16:3e:4f:5a:2b"}
        ]
    }
    volumes = [{"id": volume_id, "device": "/dev/vdb", "delete_on_termination": False}]
    # Microseconds in the database; the API shows whole seconds.
    stored_time = datetime(2024, 1, 15, 10, 30, 0, 987654)
    insert_instances(
        org,
        [
            {
                "id": instance_id,
                "name": "web-server-01",
                "description": "Primary web server",
                "status": "ERROR",
                "flavor_id": MEDIUM_FLAVOR,
                "addresses": addresses,
                "volumes_attached": volumes,
                "key_names": ["my-keypair", "backup-key"],
                "metadata": {"environment": "production", "team": "backend"},
                "tags": ["web", "frontend"],
                "created_at": stored_time,
                "launched_at": stored_time,
                "terminated_at": stored_time,
            }
        ],
    )
    expected = {
        "id": instance_id,
        "crn": f"crn:spo1:compute:instance:{instance_id}",
        "name": "web-server-01",
        "description": "Primary web server",
        "status": "ERROR",
        "power_state": "NOSTATE",
        "task_state": None,
        "vm_state": "ERROR",
        "flavor": {"id": MEDIUM_FLAVOR, "name": "m1.medium", "vcpus": 2, "ram": 4096, "disk": 40},
        "image": {"id": UBUNTU_IMAGE, "name": "Ubuntu 22.04 LTS"},
        "addresses": addresses,
        "security_groups": [{"name": "default"}],
        "volumes_attached": volumes,
        "key_names": ["my-keypair", "backup-key"],
        "metadata": {"environment": "production", "team": "backend"},
        "tags": ["web", "frontend"],
        "fault": FAULT,
        "created_at": "2024-01-15T10:30:00Z",
        "updated_at": "2024-01-15T10:30:00Z",
        "launched_at": "2024-01-15T10:30:00Z",
        "terminated_at": "2024-01-15T10:30:00Z",
    }

    with org.client("read") as client:
        body = get_list(client)
        show_body = client.get(f"/v1/instances/{instance_id}").json()

    [item] = body["instances"]
    assert item == expected
    assert list(item) == INSTANCE_KEYS
    assert list(item["fault"]) == ["code", "message", "details", "created"]
    assert list(item["addresses"]["private-network"][0]) == ["addr", "version", "type", "mac_addr"]
    assert list(item["volumes_attached"][0]) == ["id", "device", "delete_on_termination"]
    assert item == show_body
    assert body["meta"] == {"total": 1, "limit": 20, "marker": instance_id, "has_more": False}


def test_shape_of_empty_list(org: Org) -> None:
    with org.client("read") as client:
        body = get_list(client)
    assert body == {
        "instances": [],
        "meta": {"total": 0, "limit": 20, "marker": None, "has_more": False},
        "links": {
            "self": f"{org.api.base_url}/v1/instances?limit=20", "next": None, "previous": None
        },
    }


# --- pagination -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 5, 8, 24, 25])
def test_walk_visits_each_once(org: Org, limit: int) -> None:
    ids = insert_instances(org, [{"name": f"walk-{index:02d}"} for index in range(24)])
    expected = list(reversed(ids))

    with org.client("read") as client:
        pages = walk_next(client, f"/v1/instances?limit={limit}")

    visited = [instance_id for page in pages for instance_id in ids_of(page)]
    assert visited == expected
    assert len(pages) == -(-24 // limit)
    for page in pages:
        assert page["meta"]["total"] == 24
        assert page["meta"]["limit"] == limit
        assert page["meta"]["marker"] == ids_of(page)[-1]
    for page in pages[:-1]:
        assert page["meta"]["has_more"] is True
        assert len(page["instances"]) == limit
    assert pages[-1]["meta"]["has_more"] is False
    assert pages[-1]["links"]["next"] is None


def test_walk_same_created_at(org: Org) -> None:
    shared_time = datetime(2024, 3, 1, 12, 0, 0)
    # Ids that agree on long prefixes, and the extreme ids, next to random ones.
    crafted = [
        "12345678-0000-4000-8000-000000000001",
        "12345678-0000-4000-8000-000000000002",
        "12345678-0000-4000-8000-000000000010",
        "12345678-ffff-4fff-bfff-ffffffffffff",
        "00000000-0000-4000-8000-000000000000",
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
    ]
    specs: list[dict[str, Any]] = [
        {"name": f"tie-{index:02d}", "created_at": shared_time} for index in range(40)
    ]
    for index, instance_id in enumerate(crafted):
        specs.append({"name": f"tie-crafted-{index}", "id": instance_id, "created_at": shared_time})
    specs.append({"name": "tie-older", "created_at": shared_time - timedelta(microseconds=1)})
    specs.append({"name": "tie-newer", "created_at": shared_time + timedelta(microseconds=1)})
    ids = insert_instances(org, specs)
    expected = newest_first(ids, [spec["created_at"] for spec in specs])

    for limit in (1, 7, 46):
        with org.client("read") as client:
            pages = walk_next(client, f"/v1/instances?limit={limit}")
        visited = [instance_id for page in pages for instance_id in ids_of(page)]
        assert visited == expected, f"limit={limit}"


def test_walk_microseconds_order(org: Org) -> None:
    # Rows one microsecond apart, including a zero microsecond part, must keep the
    # time order, not the order of their text form or of their ids.
    base = datetime(2024, 5, 1, 8, 0, 0)
    offsets = [0, 1, 999_999, 500_000, 10, 100_000]
    specs: list[dict[str, Any]] = [
        {"name": f"us-{index}", "created_at": base + timedelta(microseconds=offset)}
        for index, offset in enumerate(offsets)
    ]
    ids = insert_instances(org, specs)
    expected = newest_first(ids, [spec["created_at"] for spec in specs])

    with org.client("read") as client:
        pages = walk_next(client, "/v1/instances?limit=1")
    assert [instance_id for page in pages for instance_id in ids_of(page)] == expected


def test_marker_deleted_by_status_between_pages(org: Org) -> None:
    ids = insert_instances(org, [{"name": f"del-{index}"} for index in range(6)])
    expected = list(reversed(ids))

    with org.client("read") as client:
        first = get_list(client, {"limit": "3"})
        mark_deleted(org, first["meta"]["marker"])
        second = get_url(client, first["links"]["next"])

    assert ids_of(first) == expected[:3]
    assert ids_of(second) == expected[3:]
    assert second["meta"]["total"] == 5


def test_marker_deleted_by_api_between_pages(org: Org) -> None:
    with org.client() as client:
        created = [create_instance(client, f"apidel-{index}")["id"] for index in range(4)]
        expected = list(reversed(created))
        first = get_list(client, {"name": "apidel-*", "limit": "2"})
        response = client.delete(f"/v1/instances/{first['meta']['marker']}")
        assert response.status_code == 202, response.text
        second = get_url(client, first["links"]["next"])

    assert ids_of(first) == expected[:2]
    assert ids_of(second) == expected[2:]


def test_total_ignores_marker_and_limit(org: Org) -> None:
    specs = [
        {"name": f"tot-{index}", "tags": ["even"] if index % 2 == 0 else []} for index in range(9)
    ]
    insert_instances(org, specs)

    with org.client("read") as client:
        pages = walk_next(client, "/v1/instances?limit=2&tags=even")
    assert [page["meta"]["total"] for page in pages] == [5, 5, 5]


# --- links ------------------------------------------------------------------------------


def test_links_first_page(org: Org) -> None:
    insert_instances(org, [{"name": f"l-{index}"} for index in range(3)])
    base = f"{org.api.base_url}/v1/instances"

    with org.client("read") as client:
        body = get_list(client, {"limit": "2"})

    marker = body["meta"]["marker"]
    assert body["links"]["self"] == f"{base}?limit=2"
    assert body["links"]["next"] == f"{base}?limit=2&marker={marker}"
    assert body["links"]["previous"] is None


def test_links_default_limit_in_self(org: Org) -> None:
    with org.client("read") as client:
        body = get_list(client)
    assert body["links"]["self"] == f"{org.api.base_url}/v1/instances?limit=20"


def test_links_keep_filters(org: Org) -> None:
    insert_instances(
        org,
        [{"name": f"web server {index}", "tags": ["blue team", "prod"]} for index in range(5)],
    )
    params = {"limit": "2", "name": "web server*", "status": "active", "tags": " blue team ,prod"}

    with org.client("read") as client:
        first = get_list(client, params)
        second = get_url(client, first["links"]["next"])

    next_query = query_of(first["links"]["next"])
    assert dict(next_query) == {**params, "marker": first["meta"]["marker"]}
    assert len(next_query) == 5
    assert " " not in first["links"]["next"]
    assert len(second["instances"]) == 2
    assert second["meta"]["total"] == 5
    assert dict(query_of(second["links"]["self"])) == {**params, "marker": first["meta"]["marker"]}


@pytest.mark.parametrize("name", ["a+b&c=d#e %f?g", "ünï/🙂 x", "100%_\\"])
def test_links_round_trip_special_names(org: Org, name: str) -> None:
    ids = insert_instances(org, [{"name": f"{name}{index}"} for index in range(3)])
    query = httpx.QueryParams({"limit": "1", "name": name + "*"})
    with org.client("read") as client:
        pages = walk_next(client, f"/v1/instances?{query}")
    assert [instance_id for page in pages for instance_id in ids_of(page)] == list(reversed(ids))


def test_links_previous(org: Org) -> None:
    insert_instances(org, [{"name": f"web-{index}"} for index in range(7)])
    base = f"{org.api.base_url}/v1/instances"

    with org.client("read") as client:
        pages = walk_next(client, "/v1/instances?limit=2&name=web-*")

    assert len(pages) == 4
    assert pages[0]["links"]["previous"] is None
    assert pages[1]["links"]["previous"] == f"{base}?limit=2&name=web-*"
    first_marker = pages[0]["meta"]["marker"]
    assert pages[2]["links"]["previous"] == f"{base}?limit=2&marker={first_marker}&name=web-*"


@pytest.mark.parametrize(("count", "limit"), [(7, 2), (8, 2), (5, 1), (3, 3)])
def test_links_previous_walk_reverses(org: Org, count: int, limit: int) -> None:
    insert_instances(org, [{"name": f"back-{index}"} for index in range(count)])

    with org.client("read") as client:
        forward = walk_next(client, f"/v1/instances?limit={limit}")
        backward = walk_previous(client, forward[-1]["links"]["self"])

    assert [ids_of(page) for page in backward] == [ids_of(page) for page in reversed(forward)]
    assert [page["links"]["self"] for page in backward] == [
        page["links"]["self"] for page in reversed(forward)
    ]


def test_links_absolute(org: Org) -> None:
    insert_instances(org, [{"name": f"abs-{index}"} for index in range(3)])

    with org.client("read") as client:
        pages = walk_next(client, "/v1/instances?limit=1")

    links = [page["links"][key] for page in pages for key in LINK_KEYS if page["links"][key]]
    assert len(links) == 7
    for link in links:
        assert link.startswith(f"{org.api.base_url}/v1/instances?")


def test_links_use_host_header(org: Org) -> None:
    with org.client("read") as client:
        body = get_list_with_headers(client, {"Host": "compute.internal:8080"})
    assert body["links"]["self"] == "http://compute.internal:8080/v1/instances?limit=20"


def test_links_ignore_untrusted_forwarded_host(org: Org) -> None:
    with org.client("read") as client:
        body = get_list_with_headers(client, {"X-Forwarded-Host": "evil.example"})
    assert body["links"]["self"] == f"{org.api.base_url}/v1/instances?limit=20"


def test_forwarded_proto_ignored_fixture_server(org: Org) -> None:
    with org.client("read") as client:
        body = get_list_with_headers(client, {"X-Forwarded-Proto": "https"})
    assert body["links"]["self"].startswith("http://")


# --- links behind a public URL or a proxy -----------------------------------------------


def start_served(backend: Backend, log_dir: Path, **settings: str) -> ApiServer:
    """Start the API with ``mycloud-compute serve``, the production command.

    ``serve`` turns uvicorn's own proxy-header handling off, so only the service's
    ``trusted_proxies`` setting decides whether X-Forwarded-* headers count.
    """
    port = free_port()
    env = {
        "MYCLOUD_DATABASE_URL": backend.url,
        "MYCLOUD_RUN_WORKER": "no",
        **{f"MYCLOUD_{key.upper()}": value for key, value in settings.items()},
    }
    server = ApiServer(backend, f"http://127.0.0.1:{port}", env)
    server.processes.append(
        start_process(
            ["-m", "mycloud_compute.cli.admin", "serve", "--port", str(port)],
            env,
            log_dir / f"serve-{port}.log",
        )
    )
    _wait_ready(server)
    return server


def stop_checked(server: ApiServer) -> None:
    server.stop()
    assert "unhandled error request_id=" not in server.logs(), server.logs()[-5000:]


@pytest.fixture(scope="module")
def public_api(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(backend, tmp_path_factory.mktemp("public-url"), public_url=PUBLIC_URL)
    yield server
    stop_checked(server)


@pytest.fixture(scope="module")
def untrusted_api(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    server = start_served(backend, tmp_path_factory.mktemp("untrusted"))
    yield server
    stop_checked(server)


@pytest.fixture(scope="module")
def proxied_api(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_served(backend, tmp_path_factory.mktemp("proxied"), trusted_proxies="127.0.0.1")
    yield server
    stop_checked(server)


def list_via(
    server: ApiServer, org: Org, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    with server.client(org.tokens["read"]) as client:
        response = client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_public_url_starts_links(public_api: ApiServer, org: Org) -> None:
    insert_instances(org, [{"name": f"pub-{index}"} for index in range(3)])

    first = list_via(public_api, org, "/v1/instances?limit=1")
    second = list_via(public_api, org, first["links"]["next"].removeprefix(PUBLIC_URL))

    assert first["links"]["self"] == f"{PUBLIC_URL}/v1/instances?limit=1"
    marker = first["meta"]["marker"]
    assert first["links"]["next"] == f"{PUBLIC_URL}/v1/instances?limit=1&marker={marker}"
    assert second["links"]["previous"] == f"{PUBLIC_URL}/v1/instances?limit=1"
    assert second["links"]["next"].startswith(f"{PUBLIC_URL}/v1/instances?")


def test_public_url_wins_over_headers(public_api: ApiServer, org: Org) -> None:
    headers = {
        "Host": "other.example",
        "X-Forwarded-Host": "proxy.example",
        "X-Forwarded-Proto": "http",
    }
    body = list_via(public_api, org, "/v1/instances", headers)
    assert body["links"]["self"] == f"{PUBLIC_URL}/v1/instances?limit=20"


def test_forwarded_ignored_untrusted(untrusted_api: ApiServer, org: Org) -> None:
    headers = {"X-Forwarded-Host": "proxy.example", "X-Forwarded-Proto": "https"}
    body = list_via(untrusted_api, org, "/v1/instances", headers)
    assert body["links"]["self"] == f"{untrusted_api.base_url}/v1/instances?limit=20"


def test_forwarded_honoured_trusted(proxied_api: ApiServer, org: Org) -> None:
    insert_instances(org, [{"name": f"fwd-{index}"} for index in range(2)])
    headers = {"X-Forwarded-Host": "api.example.test", "X-Forwarded-Proto": "https"}

    body = list_via(proxied_api, org, "/v1/instances?limit=1", headers)

    assert body["links"]["self"] == "https://api.example.test/v1/instances?limit=1"
    assert body["links"]["next"].startswith("https://api.example.test/v1/instances?limit=1&marker=")


def test_forwarded_first_value_used(proxied_api: ApiServer, org: Org) -> None:
    headers = {
        "X-Forwarded-Host": "edge.example.test:8443, inner.example.test",
        "X-Forwarded-Proto": "https, http",
    }
    body = list_via(proxied_api, org, "/v1/instances", headers)
    assert body["links"]["self"] == "https://edge.example.test:8443/v1/instances?limit=20"


@pytest.mark.parametrize(
    "forwarded_host", ["evil.example/path?x=", "evil.example#x", "user@evil.example", "a b"]
)
def test_forwarded_host_invalid_ignored(
    proxied_api: ApiServer, org: Org, forwarded_host: str
) -> None:
    body = list_via(proxied_api, org, "/v1/instances", {"X-Forwarded-Host": forwarded_host})
    assert body["links"]["self"] == f"{proxied_api.base_url}/v1/instances?limit=20"


def test_forwarded_proto_invalid_ignored(proxied_api: ApiServer, org: Org) -> None:
    body = list_via(proxied_api, org, "/v1/instances", {"X-Forwarded-Proto": "javascript"})
    assert body["links"]["self"] == f"{proxied_api.base_url}/v1/instances?limit=20"


# --- organization isolation -------------------------------------------------------------

ISOLATION_QUERIES = [
    {},
    {"name": "shared-1"},
    {"name": "shared-*"},
    {"name": "*"},
    {"status": "ACTIVE"},
    {"status": "DELETED"},
    {"status": "active,deleted,error,shutoff,build"},
    {"tags": "team"},
    {"flavor_id": SMALL_FLAVOR},
    {"image_id": UBUNTU_IMAGE},
    {"name": "shared-*", "status": "active", "tags": "team", "flavor_id": SMALL_FLAVOR},
]
SHARED_ROWS: list[dict[str, Any]] = [
    {"name": "shared-1", "tags": ["team"]},
    {"name": "shared-2", "tags": ["team"], "status": "DELETED"},
    {"name": "shared-3", "tags": ["team"], "status": "ERROR"},
]


def test_isolation_filters(org: Org, other_org: Org) -> None:
    own_ids = insert_instances(org, SHARED_ROWS)
    other_ids = insert_instances(other_org, SHARED_ROWS * 2)

    for params in ISOLATION_QUERIES:
        query = httpx.QueryParams({"limit": "1", **params})
        with org.client("read") as client:
            pages = walk_next(client, f"/v1/instances?{query}")

        visited = [instance_id for page in pages for instance_id in ids_of(page)]
        assert visited, query
        assert set(visited) <= set(own_ids), query
        assert not set(visited) & set(other_ids), query
        assert pages[0]["meta"]["total"] == len(visited), query


def test_isolation_marker_like_unknown(org: Org, other_org: Org) -> None:
    insert_instances(org, [{"name": "mine"}])
    [other_live, other_deleted] = insert_instances(
        other_org, [{"name": "theirs"}, {"name": "theirs-old", "status": "DELETED"}]
    )
    unknown = str(uuid.uuid4())

    def marker_error(marker: str) -> tuple[int, dict[str, Any]]:
        with org.client("read") as client:
            response = client.get("/v1/instances", params={"marker": marker, "name": "mine"})
        error = assert_bad_parameter(response, "marker", marker)
        normalized = {
            **error,
            "message": error["message"].replace(marker, "<id>"),
            "details": {**error["details"], "value": "<id>"},
            "request_id": "<request id>",
        }
        return response.status_code, normalized

    assert marker_error(other_live) == marker_error(unknown)
    assert marker_error(other_deleted) == marker_error(unknown)


def test_isolation_same_name_markers(org: Org, other_org: Org) -> None:
    # Both organizations hold instances with the same names and timestamps.
    shared_time = datetime(2024, 6, 1, 0, 0, 0)
    specs = [{"name": f"twin-{index}", "created_at": shared_time} for index in range(6)]
    own_ids = insert_instances(org, specs)
    insert_instances(other_org, specs)
    expected = newest_first(own_ids, [shared_time] * 6)

    with org.client("read") as client:
        pages = walk_next(client, "/v1/instances?limit=4&name=twin-*")
    assert [instance_id for page in pages for instance_id in ids_of(page)] == expected


# --- authentication ---------------------------------------------------------------------


def test_auth_missing_header(api: ApiServer) -> None:
    with api.client() as client:
        response = client.get("/v1/instances")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud"'


def test_auth_checked_before_parameters(api: ApiServer) -> None:
    with api.client() as client:
        response = client.get("/v1/instances", params={"limit": "abc", "foo": "1"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud"'


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Token abcdef", "Bearer a b", "mcp_abc"]
)
def test_auth_malformed_header(api: ApiServer, header: str) -> None:
    with api.client() as client:
        response = client.get("/v1/instances", headers={"Authorization": header})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith('Bearer realm="mycloud"')


def test_auth_unknown_token(api: ApiServer) -> None:
    with api.client("mcp_" + "x" * 43) as client:
        response = client.get("/v1/instances")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud", error="invalid_token"'


def test_auth_revoked_token(org: Org) -> None:
    async def revoke(db: Database) -> None:
        await identity.revoke_token(db, org.name, "read")

    org.api.backend.run(revoke)
    with org.client("read") as client:
        response = client.get("/v1/instances")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud", error="invalid_token"'


def test_auth_expired_token(org: Org) -> None:
    async def create_expired(db: Database) -> str:
        return await identity.create_token(
            db, org.name, name="expired", scopes=frozenset({"read"}), expires_in_days=-1
        )

    token = org.api.backend.run(create_expired)
    with org.api.client(token) as client:
        response = client.get("/v1/instances")
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud", error="invalid_token"'


def test_auth_write_only_forbidden(org: Org) -> None:
    with org.client("write") as client:
        response = client.get("/v1/instances")
    assert_error(response, 403, "forbidden")
    assert "www-authenticate" not in response.headers


@pytest.mark.parametrize("scopes", ["read", "rw", "admin"])
def test_auth_read_scope_allowed(org: Org, scopes: str) -> None:
    with org.client(scopes) as client:
        response = client.get("/v1/instances")
    assert response.status_code == 200, response.text
