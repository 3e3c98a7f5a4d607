"""The public catalog: /v1/flavors and /v1/images.

The catalog is global and the test database lives for the whole session, so tests
here give what they create unique names and never assume an exact list, only that
the default entries are present.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ApiServer, Org, make_org
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
FLAVOR_FIELDS = ["id", "name", "vcpus", "ram", "disk", "is_public", "created_at"]
IMAGE_FIELDS = [
    "id", "name", "os_distro", "os_version", "min_disk", "min_ram", "status", "created_at"
]
DEFAULT_FLAVORS = {
    "m1.tiny": (1, 512, 1),
    "m1.small": (1, 2048, 20),
    "m1.medium": (2, 4096, 40),
    "m1.large": (4, 8192, 80),
    "m1.xlarge": (8, 16384, 160),
}
KINDS = ["flavors", "images"]


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def flavor_body(**fields: Any) -> dict[str, Any]:
    return {"name": unique_name("test-flavor"), "vcpus": 1, "ram": 2048, "disk": 20, **fields}


def image_body(**fields: Any) -> dict[str, Any]:
    name = unique_name("test-image")
    return {"name": name, "os_distro": "ubuntu", "os_version": "22.04", **fields}


def list_all(client: httpx.Client, kind: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/{kind}", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["meta"]["has_more"] is False
    return body[kind]  # type: ignore[no-any-return]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.fixture(scope="module")
def org(api: ApiServer) -> Org:
    """One organization for the whole module, because the catalog is global."""
    return make_org(api, "catalog")


@pytest.fixture(scope="module")
def admin(org: Org) -> Iterator[httpx.Client]:
    with org.client("admin") as client:
        yield client


# --- defaults and shape ---------------------------------------------------------------


def test_default_flavors_present(org: Org) -> None:
    with org.client("read") as client:
        flavors = {item["name"]: item for item in list_all(client, "flavors")}

    for name, (vcpus, ram, disk) in DEFAULT_FLAVORS.items():
        flavor = flavors[name]
        assert (flavor["vcpus"], flavor["ram"], flavor["disk"]) == (vcpus, ram, disk), name
        assert flavor["is_public"] is True
    assert flavors["m1.small"]["id"] == SMALL_FLAVOR


def test_default_images_present(org: Org) -> None:
    with org.client("read") as client:
        images = {item["name"]: item for item in list_all(client, "images")}

    ubuntu = images["Ubuntu 22.04 LTS"]
    assert ubuntu["id"] == UBUNTU_IMAGE
    assert ubuntu["os_distro"] == "ubuntu"
    assert ubuntu["os_version"] == "22.04"
    assert ubuntu["status"] == "ACTIVE"


@pytest.mark.parametrize(("kind", "fields"), [("flavors", FLAVOR_FIELDS), ("images", IMAGE_FIELDS)])
def test_item_fields(org: Org, kind: str, fields: list[str]) -> None:
    with org.client("read") as client:
        items = list_all(client, kind)

    for item in items:
        assert list(item) == fields
        assert str(uuid.UUID(item["id"])) == item["id"]
        assert TIMESTAMP.match(item["created_at"]), item["created_at"]


@pytest.mark.parametrize("kind", KINDS)
def test_list_ordered_by_name(org: Org, admin: httpx.Client, kind: str) -> None:
    # Names that sort first and last, created after the defaults.
    body = flavor_body if kind == "flavors" else image_body
    first = admin.post(f"/v1/{kind}", json=body(name=unique_name("0-first")))
    last = admin.post(f"/v1/{kind}", json=body(name=unique_name("~last")))
    assert first.status_code == 201, first.text
    assert last.status_code == 201, last.text

    with org.client("read") as client:
        names = [item["name"] for item in list_all(client, kind)]

    assert names == sorted(names)
    assert names[0] == first.json()["name"]
    assert names[-1] == last.json()["name"]
    admin.delete(f"/v1/{kind}/{first.json()['id']}")
    admin.delete(f"/v1/{kind}/{last.json()['id']}")


# --- pagination -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pagination_walk(org: Org, kind: str) -> None:
    base = f"{org.api.base_url}/v1/{kind}"
    with org.client("read") as client:
        expected = [item["id"] for item in list_all(client, kind)]
        pages = [client.get(f"/v1/{kind}", params={"limit": "2"}).json()]
        while pages[-1]["links"]["next"] is not None:
            assert len(pages) <= len(expected), "the walk does not end"
            pages.append(client.get(pages[-1]["links"]["next"]).json())

    assert [item["id"] for page in pages for item in page[kind]] == expected
    for page in pages:
        assert page["meta"]["limit"] == 2
        assert page["meta"]["total"] == len(expected)
        assert page["meta"]["marker"] == page[kind][-1]["id"]
        assert page["links"]["self"].startswith(base + "?")
    for page in pages[:-1]:
        assert page["meta"]["has_more"] is True
        assert query_of(page["links"]["next"]) == {"limit": ["2"], "marker": [page[kind][-1]["id"]]}
    assert pages[-1]["meta"]["has_more"] is False


@pytest.mark.parametrize("kind", KINDS)
def test_pagination_previous_links(org: Org, kind: str) -> None:
    # Five defaults with limit 2 give at least three pages.
    with org.client("read") as client:
        first = client.get(f"/v1/{kind}", params={"limit": "2"}).json()
        second = client.get(first["links"]["next"]).json()
        third = client.get(second["links"]["next"]).json()
        back = client.get(third["links"]["previous"]).json()

    assert first["links"]["previous"] is None
    assert query_of(second["links"]["previous"]) == {"limit": ["2"]}
    after_first = {"limit": ["2"], "marker": [first[kind][-1]["id"]]}
    assert query_of(third["links"]["previous"]) == after_first
    assert back[kind] == second[kind]
    assert query_of(second["links"]["self"]) == after_first


@pytest.mark.parametrize("kind", KINDS)
def test_default_limit(org: Org, kind: str) -> None:
    with org.client("read") as client:
        body = client.get(f"/v1/{kind}").json()

    assert body["meta"]["limit"] == 20
    assert query_of(body["links"]["self"]) == {"limit": ["20"]}


@pytest.mark.parametrize("kind", KINDS)
def test_marker_of_deleted_item(org: Org, admin: httpx.Client, kind: str) -> None:
    body = flavor_body() if kind == "flavors" else image_body()
    created = admin.post(f"/v1/{kind}", json=body).json()
    assert admin.delete(f"/v1/{kind}/{created['id']}").status_code == 204

    with org.client("read") as client:
        response = client.get(f"/v1/{kind}", params={"marker": created["id"]})
        everything = list_all(client, kind)

    assert response.status_code == 200, response.text
    after = [item["name"] for item in response.json()[kind]]
    assert after == [item["name"] for item in everything if item["name"] > created["name"]][:20]


BAD_QUERIES = [
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=abc", "limit"),
    ("limit=", "limit"),
    ("marker=abc", "marker"),
    (f"marker={uuid.UUID(int=1)}", "marker"),
    ("name=m1.small", "name"),
    ("limit=1&limit=2", "limit"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("query", "parameter"), BAD_QUERIES)
def test_list_bad_query(org: Org, kind: str, query: str, parameter: str) -> None:
    with org.client("read") as client:
        response = client.get(f"/v1/{kind}?{query}")

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == parameter


def test_unknown_marker_message(org: Org) -> None:
    marker = str(uuid.UUID(int=1))

    with org.client("read") as client:
        response = client.get("/v1/flavors", params={"marker": marker})

    error = assert_error(response, 400, "invalid_parameter")
    assert error["message"] == f"marker {marker} not found"


# --- show -----------------------------------------------------------------------------


def test_show_flavor(org: Org) -> None:
    with org.client("read") as client:
        response = client.get(f"/v1/flavors/{SMALL_FLAVOR}")

    assert response.status_code == 200, response.text
    flavor = response.json()
    assert flavor["name"] == "m1.small"
    assert list(flavor) == FLAVOR_FIELDS


def test_show_image(org: Org) -> None:
    with org.client("read") as client:
        response = client.get(f"/v1/images/{UBUNTU_IMAGE}")

    assert response.status_code == 200, response.text
    image = response.json()
    assert image["name"] == "Ubuntu 22.04 LTS"
    assert list(image) == IMAGE_FIELDS


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("item_id", [str(uuid.UUID(int=7)), "not-a-uuid", "123", "m1.small"])
def test_show_unknown(org: Org, kind: str, item_id: str) -> None:
    with org.client("read") as client:
        response = client.get(f"/v1/{kind}/{item_id}")

    error = assert_error(response, 404, "not_found")
    assert item_id in error["message"]


# --- create ---------------------------------------------------------------------------


def test_create_flavor(org: Org, admin: httpx.Client) -> None:
    body = flavor_body(vcpus=3, ram=3072, disk=30, is_public=True)

    created = admin.post("/v1/flavors", json=body)
    with org.client("read") as client:
        shown = client.get(f"/v1/flavors/{created.json()['id']}")
        listed = list_all(client, "flavors")

    assert created.status_code == 201, created.text
    flavor = created.json()
    assert {key: flavor[key] for key in body} == body
    assert TIMESTAMP.match(flavor["created_at"])
    assert shown.json() == flavor
    assert flavor in listed
    admin.delete(f"/v1/flavors/{flavor['id']}")


def test_create_image(org: Org, admin: httpx.Client) -> None:
    body = image_body(min_disk=5, min_ram=256)

    created = admin.post("/v1/images", json=body)
    with org.client("read") as client:
        shown = client.get(f"/v1/images/{created.json()['id']}")

    assert created.status_code == 201, created.text
    image = created.json()
    assert {key: image[key] for key in body} == body
    assert image["status"] == "ACTIVE"
    assert shown.json() == image
    admin.delete(f"/v1/images/{image['id']}")


def test_create_image_defaults(admin: httpx.Client) -> None:
    created = admin.post("/v1/images", json=image_body())

    assert created.status_code == 201, created.text
    assert created.json()["min_disk"] == 0
    assert created.json()["min_ram"] == 0
    admin.delete(f"/v1/images/{created.json()['id']}")


BAD_FLAVORS = [
    ({"vcpus": 0}, "vcpus"),
    ({"ram": 32}, "ram"),
    ({"disk": -1}, "disk"),
    ({"name": ""}, "name"),
    ({"name": "x" * 256}, "name"),
    ({"name": " padded"}, "name"),
    ({"name": "tab\there"}, "name"),
    ({"name": "nul\x00"}, "name"),
    ({"is_public": "yes"}, "is_public"),
    ({"color": "blue"}, "color"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_FLAVORS)
def test_create_flavor_invalid(admin: httpx.Client, fields: dict[str, Any], field: str) -> None:
    response = admin.post("/v1/flavors", json=flavor_body(**fields))

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"]


def test_create_flavor_string_number(admin: httpx.Client) -> None:
    response = admin.post("/v1/flavors", json=flavor_body(vcpus="2"))

    assert response.status_code == 400, response.text


def test_create_flavor_missing_field(admin: httpx.Client) -> None:
    body = flavor_body()
    del body["disk"]

    response = admin.post("/v1/flavors", json=body)

    error = assert_error(response, 400, "invalid_request")
    assert "disk" in error["message"]


BAD_IMAGES = [
    ({"min_disk": -1}, "min_disk"),
    ({"min_ram": -1}, "min_ram"),
    ({"os_distro": ""}, "os_distro"),
    ({"os_distro": "x" * 65}, "os_distro"),
    ({"os_distro": "nul\x00"}, "os_distro"),
    ({"os_version": "line\nbreak"}, "os_version"),
    ({"name": "trailing "}, "name"),
    ({"size": 1}, "size"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_IMAGES)
def test_create_image_invalid(admin: httpx.Client, fields: dict[str, Any], field: str) -> None:
    response = admin.post("/v1/images", json=image_body(**fields))

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"]


@pytest.mark.parametrize("kind", KINDS)
def test_create_duplicate_name(admin: httpx.Client, kind: str) -> None:
    body = flavor_body() if kind == "flavors" else image_body()

    first = admin.post(f"/v1/{kind}", json=body)
    second = admin.post(f"/v1/{kind}", json=body)

    assert first.status_code == 201, first.text
    error = assert_error(second, 409, "conflict")
    assert body["name"] in error["message"]
    admin.delete(f"/v1/{kind}/{first.json()['id']}")


def test_create_default_name_conflicts(admin: httpx.Client) -> None:
    response = admin.post("/v1/flavors", json=flavor_body(name="m1.small"))

    assert_error(response, 409, "conflict")


# --- delete ---------------------------------------------------------------------------


def test_delete_flavor_keeps_instance_values(org: Org, admin: httpx.Client) -> None:
    flavor = admin.post("/v1/flavors", json=flavor_body(vcpus=2, ram=3072, disk=25)).json()
    with org.client() as client:
        instance = create_instance(client, "keeps-flavor", flavor_id=flavor["id"])

        deleted = admin.delete(f"/v1/flavors/{flavor['id']}")
        shown = client.get(f"/v1/instances/{instance['id']}")
        flavor_after = client.get(f"/v1/flavors/{flavor['id']}")
        listed = list_all(client, "flavors")

    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""
    assert shown.status_code == 200, shown.text
    expected = {key: flavor[key] for key in ("id", "name", "vcpus", "ram", "disk")}
    assert shown.json()["flavor"] == expected
    assert_error(flavor_after, 404, "not_found")
    assert flavor["id"] not in [item["id"] for item in listed]


def test_delete_image_keeps_instance_values(org: Org, admin: httpx.Client) -> None:
    image = admin.post("/v1/images", json=image_body()).json()
    with org.client() as client:
        instance = create_instance(client, "keeps-image", image_id=image["id"])

        deleted = admin.delete(f"/v1/images/{image['id']}")
        shown = client.get(f"/v1/instances/{instance['id']}")

    assert deleted.status_code == 204, deleted.text
    assert shown.json()["image"] == {"id": image["id"], "name": image["name"]}


@pytest.mark.parametrize("kind", KINDS)
def test_deleted_item_unusable(org: Org, admin: httpx.Client, kind: str) -> None:
    body = flavor_body() if kind == "flavors" else image_body()
    item = admin.post(f"/v1/{kind}", json=body).json()
    assert admin.delete(f"/v1/{kind}/{item['id']}").status_code == 204
    field = "flavor_id" if kind == "flavors" else "image_id"

    second_delete = admin.delete(f"/v1/{kind}/{item['id']}")
    with org.client() as client:
        created = client.post(
            "/v1/instances",
            json={"name": "uses-deleted", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE,
                  field: item["id"]},
        )
    recreated = admin.post(f"/v1/{kind}", json=body)

    assert_error(second_delete, 404, "not_found")
    error = assert_error(created, 400, "invalid_parameter")
    assert error["details"]["parameter"] == field
    # Names are unique among live entries only.
    assert recreated.status_code == 201, recreated.text
    admin.delete(f"/v1/{kind}/{recreated.json()['id']}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("item_id", [str(uuid.UUID(int=9)), "not-a-uuid"])
def test_delete_unknown(admin: httpx.Client, kind: str, item_id: str) -> None:
    response = admin.delete(f"/v1/{kind}/{item_id}")

    assert_error(response, 404, "not_found")
