"""/v1/security-groups with their rules, and security_groups at instance create."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import ApiServer, Org, make_org
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance, wait_for

GROUP_FIELDS = ["id", "name", "description", "rules", "created_at"]
RULE_FIELDS = [
    "id",
    "direction",
    "protocol",
    "port_range_min",
    "port_range_max",
    "remote_ip_prefix",
]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
DEFAULT_RULES = [
    {
        "direction": "egress",
        "protocol": None,
        "port_range_min": None,
        "port_range_max": None,
        "remote_ip_prefix": "0.0.0.0/0",
    },
    {
        "direction": "egress",
        "protocol": None,
        "port_range_min": None,
        "port_range_max": None,
        "remote_ip_prefix": "::/0",
    },
]
SSH_RULE = {
    "direction": "ingress",
    "protocol": "tcp",
    "port_range_min": 22,
    "port_range_max": 22,
    "remote_ip_prefix": "0.0.0.0/0",
}


def unique_name(prefix: str = "sg") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def without_ids(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in rule.items() if key != "id"} for rule in rules]


def create_group(client: httpx.Client, name: str | None = None, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/security-groups", json={"name": name or unique_name(), **fields})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def list_all(client: httpx.Client) -> list[dict[str, Any]]:
    response = client.get("/v1/security-groups", params={"limit": "1000"})
    assert response.status_code == 200, response.text
    return response.json()["security_groups"]  # type: ignore[no-any-return]


def assert_rejected(response: httpx.Response, field: str) -> dict[str, Any]:
    """Check a 400 envelope that names ``field`` in details.parameter or the message.

    Fields of a rule in the create body are named with their path (``rules[0].protocol``).
    """
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] in ("invalid_parameter", "invalid_request")
    parameter = (error.get("details") or {}).get("parameter") or ""
    named = parameter == field or parameter.endswith(f".{field}") or field in error["message"]
    assert named, error
    return error  # type: ignore[no-any-return]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    """An organization for tests that neither list nor count security groups."""
    return make_org(api, "security-groups")


@pytest.fixture(scope="module")
def client(shared_org: Org) -> Iterator[httpx.Client]:
    with shared_org.client() as rw_client:
        yield rw_client


# --- the default group ----------------------------------------------------------------


def test_default_group_in_new_organization(org: Org) -> None:
    with org.client("read") as client:
        groups = list_all(client)

    assert [group["name"] for group in groups] == ["default"]
    default = groups[0]
    assert list(default) == GROUP_FIELDS
    assert without_ids(default["rules"]) == DEFAULT_RULES
    assert TIMESTAMP.match(default["created_at"])


def test_default_group_cannot_be_deleted(org: Org) -> None:
    with org.client() as client:
        default = list_all(client)[0]
        response = client.delete(f"/v1/security-groups/{default['id']}")
        shown = client.get(f"/v1/security-groups/{default['id']}")

    error = assert_error(response, 409, "conflict")
    assert "default" in error["message"]
    assert shown.status_code == 200


def test_default_name_conflicts(client: httpx.Client) -> None:
    response = client.post("/v1/security-groups", json={"name": "default"})

    assert_error(response, 409, "conflict")


# --- create and show ------------------------------------------------------------------

GOOD_RULES = [
    pytest.param(SSH_RULE, SSH_RULE, id="tcp-22"),
    pytest.param(
        {"direction": "ingress", "protocol": "udp", "port_range_min": 1, "port_range_max": 65535},
        {
            "direction": "ingress",
            "protocol": "udp",
            "port_range_min": 1,
            "port_range_max": 65535,
            "remote_ip_prefix": None,
        },
        id="udp-every-port",
    ),
    pytest.param(
        {"direction": "ingress", "protocol": "tcp"},
        {
            "direction": "ingress",
            "protocol": "tcp",
            "port_range_min": None,
            "port_range_max": None,
            "remote_ip_prefix": None,
        },
        id="tcp-any-port",
    ),
    pytest.param(
        {"direction": "ingress", "protocol": "icmp", "remote_ip_prefix": "10.0.0.0/8"},
        {
            "direction": "ingress",
            "protocol": "icmp",
            "port_range_min": None,
            "port_range_max": None,
            "remote_ip_prefix": "10.0.0.0/8",
        },
        id="icmp",
    ),
    pytest.param(
        {"direction": "egress", "protocol": None, "remote_ip_prefix": "2001:DB8::/32"},
        {
            "direction": "egress",
            "protocol": None,
            "port_range_min": None,
            "port_range_max": None,
            "remote_ip_prefix": "2001:db8::/32",
        },
        id="ipv6-normalised",
    ),
    pytest.param(
        {
            "direction": "ingress",
            "protocol": "tcp",
            "port_range_min": 8000,
            "port_range_max": 8080,
            "remote_ip_prefix": "192.0.2.7/32",
        },
        {
            "direction": "ingress",
            "protocol": "tcp",
            "port_range_min": 8000,
            "port_range_max": 8080,
            "remote_ip_prefix": "192.0.2.7/32",
        },
        id="tcp-range-one-host",
    ),
]


@pytest.mark.parametrize(("rule", "expected"), GOOD_RULES)
def test_create_with_rule(
    client: httpx.Client, rule: dict[str, Any], expected: dict[str, Any]
) -> None:
    name = unique_name()

    response = client.post(
        "/v1/security-groups", json={"name": name, "description": "web\nservers", "rules": [rule]}
    )

    assert response.status_code == 201, response.text
    group = response.json()
    assert list(group) == GROUP_FIELDS
    assert response.headers["location"] == f"/v1/security-groups/{group['id']}"
    assert group["name"] == name
    assert group["description"] == "web\nservers"
    assert list(group["rules"][0]) == RULE_FIELDS
    assert without_ids(group["rules"]) == [expected]
    assert str(uuid.UUID(group["rules"][0]["id"])) == group["rules"][0]["id"]
    assert client.get(f"/v1/security-groups/{group['id']}").json() == group


def test_create_keeps_rule_order(client: httpx.Client) -> None:
    rules = [
        {
            "direction": "ingress",
            "protocol": "tcp",
            "port_range_min": port,
            "port_range_max": port,
            "remote_ip_prefix": None,
        }
        for port in (443, 22, 80)
    ]

    group = create_group(client, rules=rules)

    assert without_ids(group["rules"]) == rules


def test_create_without_rules(client: httpx.Client) -> None:
    group = create_group(client)

    assert group["rules"] == []
    assert group["description"] == ""


def _rule(**fields: Any) -> dict[str, Any]:
    return {
        "direction": "ingress",
        "protocol": "tcp",
        "port_range_min": 80,
        "port_range_max": 80,
        **fields,
    }


BAD_RULES = [
    pytest.param({"protocol": "tcp"}, "direction", id="no-direction"),
    pytest.param(_rule(direction="inbound"), "direction", id="bad-direction"),
    pytest.param(_rule(protocol="sctp"), "protocol", id="bad-protocol"),
    pytest.param(_rule(protocol="TCP"), "protocol", id="protocol-uppercase"),
    pytest.param(_rule(protocol="icmp"), "port_range_min", id="ports-for-icmp"),
    pytest.param(_rule(protocol=None), "port_range_min", id="ports-for-any-protocol"),
    pytest.param(_rule(port_range_max=None), "port_range_max", id="min-only"),
    pytest.param(_rule(port_range_min=None), "port_range_min", id="max-only"),
    pytest.param(_rule(port_range_min=81), "port_range_min", id="min-above-max"),
    pytest.param(_rule(port_range_min=0), "port_range_min", id="port-0"),
    pytest.param(_rule(port_range_max=65536), "port_range_max", id="port-65536"),
    pytest.param(_rule(port_range_min="80"), "port_range_min", id="port-string"),
    pytest.param(_rule(remote_ip_prefix="10.0.0.1/8"), "remote_ip_prefix", id="host-bits"),
    pytest.param(_rule(remote_ip_prefix="10.0.0.0"), "remote_ip_prefix", id="no-prefix-length"),
    pytest.param(_rule(remote_ip_prefix="10.0.0.0/33"), "remote_ip_prefix", id="prefix-too-long"),
    pytest.param(_rule(remote_ip_prefix="example.com/8"), "remote_ip_prefix", id="hostname"),
    pytest.param(_rule(remote_ip_prefix=""), "remote_ip_prefix", id="empty-prefix"),
    pytest.param(_rule(ethertype="IPv4"), "ethertype", id="unknown-field"),
]


@pytest.mark.parametrize(("rule", "field"), BAD_RULES)
def test_create_rejects_rule(client: httpx.Client, rule: dict[str, Any], field: str) -> None:
    name = unique_name()

    response = client.post("/v1/security-groups", json={"name": name, "rules": [rule]})

    assert_rejected(response, field)
    assert name not in [group["name"] for group in list_all(client)]


def test_create_rejects_repeated_rule(client: httpx.Client) -> None:
    response = client.post(
        "/v1/security-groups", json={"name": unique_name(), "rules": [SSH_RULE, SSH_RULE]}
    )

    error = assert_rejected(response, "rules[1]")
    assert "repeats" in error["message"]


def test_create_rejects_too_many_rules(client: httpx.Client) -> None:
    rules = [_rule(port_range_min=port, port_range_max=port) for port in range(1, 102)]

    response = client.post("/v1/security-groups", json={"name": unique_name(), "rules": rules})

    assert_rejected(response, "rules")


def test_create_accepts_hundred_rules(client: httpx.Client) -> None:
    rules = [_rule(port_range_min=port, port_range_max=port) for port in range(1, 101)]

    group = create_group(client, rules=rules)

    assert len(group["rules"]) == 100


BAD_GROUPS = [
    pytest.param({"name": ""}, "name", id="empty-name"),
    pytest.param({"name": "x" * 256}, "name", id="long-name"),
    pytest.param({"name": " web"}, "name", id="leading-space"),
    pytest.param({"name": "web\x00"}, "name", id="nul-name"),
    pytest.param({"name": 5}, "name", id="number-name"),
    pytest.param({"description": "d" * 1025}, "description", id="long-description"),
    pytest.param({"description": "a\x00b"}, "description", id="nul-description"),
    pytest.param({"rules": {"direction": "ingress"}}, "rules", id="rules-not-a-list"),
    pytest.param({"colour": "red"}, "colour", id="unknown-field"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_GROUPS)
def test_create_rejects_group(client: httpx.Client, fields: dict[str, Any], field: str) -> None:
    response = client.post("/v1/security-groups", json={"name": unique_name(), **fields})

    assert_rejected(response, field)


def test_duplicate_name_conflicts(client: httpx.Client, other_org: Org) -> None:
    name = unique_name()
    create_group(client, name)

    again = client.post("/v1/security-groups", json={"name": name})
    with other_org.client() as other:
        elsewhere = other.post("/v1/security-groups", json={"name": name})

    error = assert_error(again, 409, "conflict")
    assert name in error["message"]
    assert elsewhere.status_code == 201, elsewhere.text


@pytest.mark.parametrize("group_id", [str(uuid.UUID(int=5)), "not-a-uuid", "default"])
def test_show_unknown(client: httpx.Client, group_id: str) -> None:
    assert_error(client.get(f"/v1/security-groups/{group_id}"), 404, "not_found")
    assert_error(client.delete(f"/v1/security-groups/{group_id}"), 404, "not_found")


# --- rules ----------------------------------------------------------------------------


def test_add_and_delete_rule(client: httpx.Client) -> None:
    group = create_group(client, rules=[SSH_RULE])
    path = f"/v1/security-groups/{group['id']}"
    https = {
        "direction": "ingress",
        "protocol": "tcp",
        "port_range_min": 443,
        "port_range_max": 443,
        "remote_ip_prefix": "::/0",
    }

    added = client.post(f"{path}/rules", json=https)
    after_add = client.get(path).json()
    duplicate = client.post(f"{path}/rules", json=https)
    deleted = client.delete(f"{path}/rules/{group['rules'][0]['id']}")
    after_delete = client.get(path).json()
    deleted_again = client.delete(f"{path}/rules/{group['rules'][0]['id']}")

    assert added.status_code == 201, added.text
    assert list(added.json()) == RULE_FIELDS
    assert without_ids([added.json()]) == [https]
    assert without_ids(after_add["rules"]) == [SSH_RULE, https]
    assert_error(duplicate, 409, "conflict")
    assert deleted.status_code == 204, deleted.text
    assert after_delete["rules"] == [added.json()]
    assert_error(deleted_again, 404, "not_found")


@pytest.mark.parametrize(("rule", "field"), BAD_RULES[:8])
def test_add_rule_rejects(client: httpx.Client, rule: dict[str, Any], field: str) -> None:
    group = create_group(client)

    response = client.post(f"/v1/security-groups/{group['id']}/rules", json=rule)

    assert_rejected(response, field)


def test_add_rule_limit(client: httpx.Client) -> None:
    rules = [_rule(port_range_min=port, port_range_max=port) for port in range(1, 101)]
    group = create_group(client, rules=rules)

    response = client.post(
        f"/v1/security-groups/{group['id']}/rules",
        json=_rule(port_range_min=1000, port_range_max=1000),
    )

    error = assert_error(response, 409, "conflict")
    assert "100" in error["message"]


def test_rules_of_default_group_can_change(org: Org) -> None:
    with org.client() as client:
        default = list_all(client)[0]
        added = client.post(f"/v1/security-groups/{default['id']}/rules", json=SSH_RULE)
        shown = client.get(f"/v1/security-groups/{default['id']}").json()

    assert added.status_code == 201, added.text
    assert without_ids(shown["rules"]) == [*DEFAULT_RULES, SSH_RULE]


def test_rule_of_other_group_not_found(client: httpx.Client) -> None:
    first = create_group(client, rules=[SSH_RULE])
    second = create_group(client)

    response = client.delete(f"/v1/security-groups/{second['id']}/rules/{first['rules'][0]['id']}")

    assert_error(response, 404, "not_found")
    assert len(client.get(f"/v1/security-groups/{first['id']}").json()["rules"]) == 1


# --- instances and in-use -------------------------------------------------------------


def test_instance_with_groups_and_in_use(org: Org) -> None:
    with org.client() as client:
        web = create_group(client, "web", rules=[SSH_RULE])
        other = create_group(client, "other")
        instance = create_instance(client, "uses-web", security_groups=["web", "default"])

        in_use = client.delete(f"/v1/security-groups/{web['id']}")
        unused = client.delete(f"/v1/security-groups/{other['id']}")
        active = wait_for(client, instance["id"], status="ACTIVE")
        still_in_use = client.delete(f"/v1/security-groups/{web['id']}")

        assert client.delete(f"/v1/instances/{instance['id']}").status_code == 202
        wait_for(client, instance["id"], status="DELETED")
        after_delete = client.delete(f"/v1/security-groups/{web['id']}")
        reuse = client.post(
            "/v1/instances",
            json={
                "name": "late",
                "flavor_id": SMALL_FLAVOR,
                "image_id": UBUNTU_IMAGE,
                "security_groups": ["web"],
            },
        )
        recreated = client.post("/v1/security-groups", json={"name": "web"})

    assert instance["security_groups"] == [{"name": "web"}, {"name": "default"}]
    assert active["security_groups"] == [{"name": "web"}, {"name": "default"}]
    error = assert_error(in_use, 409, "conflict")
    assert instance["id"] in error["message"]
    assert error["details"]["instances"] == [instance["id"]]
    assert unused.status_code == 204, unused.text
    assert_error(still_in_use, 409, "conflict")
    assert after_delete.status_code == 204, after_delete.text
    reuse_error = assert_rejected(reuse, "security_groups")
    assert reuse_error["message"] == "security group 'web' not found"
    assert recreated.status_code == 201, recreated.text


def test_group_in_use_by_error_instance(org: Org) -> None:
    """An instance in ERROR still exists, so its groups stay in use."""
    with org.client("admin") as admin:
        huge = admin.post(
            "/v1/flavors",
            json={"name": unique_name("huge"), "vcpus": 1024, "ram": 2048, "disk": 20},
        ).json()
        group = create_group(admin)
        instance = create_instance(
            admin, "no-host", flavor_id=huge["id"], security_groups=[group["name"]]
        )
        wait_for(admin, instance["id"], status="ERROR")

        response = admin.delete(f"/v1/security-groups/{group['id']}")
        admin.delete(f"/v1/flavors/{huge['id']}")

    assert_error(response, 409, "conflict")


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        pytest.param(["no-such-group"], "security group 'no-such-group' not found", id="unknown"),
        pytest.param(
            ["default", "default"], "security_groups must not repeat a group", id="repeated"
        ),
    ],
)
def test_instance_rejects_groups(client: httpx.Client, groups: list[str], message: str) -> None:
    response = client.post(
        "/v1/instances",
        json={
            "name": "bad-groups",
            "flavor_id": SMALL_FLAVOR,
            "image_id": UBUNTU_IMAGE,
            "security_groups": groups,
        },
    )

    error = assert_rejected(response, "security_groups")
    assert error["message"] == message


# --- isolation ------------------------------------------------------------------------


def test_other_organization_sees_nothing(client: httpx.Client, other_org: Org) -> None:
    group = create_group(client, rules=[SSH_RULE])
    path = f"/v1/security-groups/{group['id']}"
    unknown = str(uuid.uuid4())

    with other_org.client() as other:
        shown = other.get(path)
        shown_unknown = other.get(f"/v1/security-groups/{unknown}")
        deleted = other.delete(path)
        rule_added = other.post(f"{path}/rules", json=_rule())
        rule_deleted = other.delete(f"{path}/rules/{group['rules'][0]['id']}")
        names = [item["name"] for item in list_all(other)]
        marker = other.get("/v1/security-groups", params={"marker": group["id"]})
        instance = other.post(
            "/v1/instances",
            json={
                "name": "foreign-group",
                "flavor_id": SMALL_FLAVOR,
                "image_id": UBUNTU_IMAGE,
                "security_groups": [group["name"]],
            },
        )

    error = assert_error(shown, 404, "not_found")
    unknown_error = assert_error(shown_unknown, 404, "not_found")
    assert error["message"] == unknown_error["message"].replace(unknown, group["id"])
    assert_error(deleted, 404, "not_found")
    assert_error(rule_added, 404, "not_found")
    assert_error(rule_deleted, 404, "not_found")
    assert names == ["default"]
    marker_error = assert_error(marker, 400, "invalid_parameter")
    assert marker_error["message"] == f"marker {group['id']} not found"
    assert_rejected(instance, "security_groups")
    assert client.get(path).json() == group


# --- list -----------------------------------------------------------------------------


def test_list_pagination(org: Org) -> None:
    with org.client() as client:
        created = [create_group(client, f"group-{index}") for index in range(4)]
        everything = client.get("/v1/security-groups").json()
        first = client.get("/v1/security-groups", params={"limit": "2"}).json()
        second = client.get(first["links"]["next"]).json()
        third = client.get(second["links"]["next"]).json()
        back = client.get(third["links"]["previous"]).json()

    # Newest first; the default group was created with the organization.
    expected = [group["id"] for group in reversed(created)]
    ids = [group["id"] for group in everything["security_groups"]]
    assert ids[:4] == expected
    assert everything["security_groups"][4]["name"] == "default"
    assert everything["meta"] == {"total": 5, "limit": 20, "marker": ids[-1], "has_more": False}
    assert [group["id"] for group in first["security_groups"]] == ids[:2]
    assert [group["id"] for group in second["security_groups"]] == ids[2:4]
    assert [group["id"] for group in third["security_groups"]] == ids[4:]
    assert first["meta"] == {"total": 5, "limit": 2, "marker": ids[1], "has_more": True}
    assert third["links"]["next"] is None
    assert first["links"]["previous"] is None
    assert query_of(second["links"]["previous"]) == {"limit": ["2"]}
    assert query_of(third["links"]["previous"]) == {"limit": ["2"], "marker": [ids[1]]}
    assert back["security_groups"] == second["security_groups"]
    assert first["links"]["self"].startswith(f"{org.api.base_url}/v1/security-groups?")


BAD_QUERIES = [
    ("limit=0", "limit"),
    ("limit=abc", "limit"),
    ("marker=abc", "marker"),
    (f"marker={uuid.UUID(int=1)}", "marker"),
    ("name=web", "name"),
    ("marker=a&marker=b", "marker"),
]


@pytest.mark.parametrize(("query", "parameter"), BAD_QUERIES)
def test_list_rejects_query(client: httpx.Client, query: str, parameter: str) -> None:
    response = client.get(f"/v1/security-groups?{query}")

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == parameter


def test_delete_races_instance_create(org: Org) -> None:
    """A group delete and an instance create that names the group never both succeed."""
    outcomes = []
    with org.client() as client, ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(8):
            group = create_group(client)
            body = {
                "name": "racer",
                "flavor_id": SMALL_FLAVOR,
                "image_id": UBUNTU_IMAGE,
                "security_groups": [group["name"]],
            }
            created = pool.submit(client.post, "/v1/instances", json=body)
            deleted = pool.submit(client.delete, f"/v1/security-groups/{group['id']}")
            outcomes.append((created.result().status_code, deleted.result().status_code))

    for outcome in outcomes:
        assert outcome in [(202, 409), (400, 204)], outcomes
