"""/v1/keypairs: OpenSSH public keys, their fingerprints, and key_names at instance create.

The keys are generated here with ``cryptography``. Where ``ssh-keygen`` is
installed, the fingerprints the API computes are compared with the ones it prints.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import shutil
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from conftest import ApiServer, Org, make_org
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from helpers import SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, create_instance

KEYPAIR_FIELDS = ["name", "public_key", "fingerprint", "type", "created_at"]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
SSH_KEYGEN = shutil.which("ssh-keygen")


@functools.cache
def public_key(kind: str) -> str:
    """Return a new OpenSSH public key line of ``kind``, one per kind for the module."""
    if kind == "ssh-ed25519":
        key: Any = ed25519.Ed25519PrivateKey.generate()
    elif kind == "ssh-rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "rsa-1024":
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    elif kind == "ssh-dss":
        return dss_public_key()
    else:
        curves = {
            "ecdsa-sha2-nistp256": ec.SECP256R1(),
            "ecdsa-sha2-nistp384": ec.SECP384R1(),
            "ecdsa-sha2-nistp521": ec.SECP521R1(),
        }
        key = ec.generate_private_key(curves[kind])
    return key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()  # type: ignore[no-any-return]


def dss_public_key() -> str:
    """Encode a DSA public key by hand: cryptography deprecates writing DSA keys as SSH."""

    def ssh_string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    def mpint(value: int) -> bytes:
        return ssh_string(value.to_bytes(value.bit_length() // 8 + 1, "big"))

    numbers = dsa.generate_private_key(key_size=1024).public_key().public_numbers()
    parameters = numbers.parameter_numbers
    blob = b"".join(
        [
            ssh_string(b"ssh-dss"),
            mpint(parameters.p),
            mpint(parameters.q),
            mpint(parameters.g),
            mpint(numbers.y),
        ]
    )
    return "ssh-dss " + base64.b64encode(blob).decode()


def ssh_keygen_fingerprint(line: str, tmp_path: Path) -> str:
    """Return the fingerprint ``ssh-keygen -lf`` prints for a public key line."""
    assert SSH_KEYGEN is not None
    path = tmp_path / "key.pub"
    path.write_text(line + "\n")
    output = subprocess.run(
        [SSH_KEYGEN, "-lf", str(path)], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    # "<bits> SHA256:<digest> <comment> (<TYPE>)"
    return output.split()[1]


def unique_name(prefix: str = "key") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def keypair_path(name: str) -> str:
    return f"/v1/keypairs/{quote(name, safe='')}"


def create_keypair(client: httpx.Client, name: str, kind: str = "ssh-ed25519") -> dict[str, Any]:
    response = client.post("/v1/keypairs", json={"name": name, "public_key": public_key(kind)})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def assert_rejected(response: httpx.Response, field: str) -> dict[str, Any]:
    """Check a 400 envelope that names ``field`` in details.parameter or the message."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] in ("invalid_parameter", "invalid_request")
    parameter = (error.get("details") or {}).get("parameter")
    assert parameter == field or field in error["message"], error
    return error  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def shared_org(api: ApiServer) -> Org:
    """An organization for tests that neither list nor count key pairs."""
    return make_org(api, "keypairs")


@pytest.fixture(scope="module")
def client(shared_org: Org) -> Iterator[httpx.Client]:
    with shared_org.client() as rw_client:
        yield rw_client


# --- create and show ------------------------------------------------------------------

KEY_TYPES = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
]


@pytest.mark.parametrize("kind", KEY_TYPES)
def test_create_each_key_type(client: httpx.Client, kind: str, tmp_path: Path) -> None:
    name = unique_name(kind)
    line = public_key(kind)

    created = client.post("/v1/keypairs", json={"name": name, "public_key": line})
    shown = client.get(keypair_path(name))

    assert created.status_code == 201, created.text
    keypair = created.json()
    assert list(keypair) == KEYPAIR_FIELDS
    assert keypair["name"] == name
    assert keypair["public_key"] == line
    assert keypair["type"] == kind
    assert FINGERPRINT.match(keypair["fingerprint"]), keypair["fingerprint"]
    assert TIMESTAMP.match(keypair["created_at"]), keypair["created_at"]
    assert created.headers["location"] == keypair_path(name)
    assert shown.status_code == 200, shown.text
    assert shown.json() == keypair
    if SSH_KEYGEN is not None:
        assert keypair["fingerprint"] == ssh_keygen_fingerprint(line, tmp_path)


def test_fingerprint_is_sha256_of_blob(client: httpx.Client) -> None:
    line = public_key("ssh-ed25519")
    blob = base64.b64decode(line.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")

    keypair = create_keypair(client, unique_name())

    assert keypair["fingerprint"] == expected


def test_fingerprint_matches_ssh_keygen_file(client: httpx.Client, tmp_path: Path) -> None:
    """A key written by ssh-keygen itself, with its comment, keeps its fingerprint."""
    if SSH_KEYGEN is None:
        pytest.skip("ssh-keygen is not installed")
    key_path = tmp_path / "id_ed25519"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "alice@laptop", "-f", str(key_path)],
        check=True,
        timeout=10,
    )
    line = (tmp_path / "id_ed25519.pub").read_text()

    response = client.post("/v1/keypairs", json={"name": unique_name(), "public_key": line})

    assert response.status_code == 201, response.text
    assert response.json()["public_key"] == line.strip()
    assert response.json()["fingerprint"] == ssh_keygen_fingerprint(line.strip(), tmp_path)


def test_create_keeps_comment_and_strips_newline(client: httpx.Client) -> None:
    line = public_key("ssh-ed25519")

    response = client.post(
        "/v1/keypairs", json={"name": unique_name(), "public_key": f"  {line} bob@host two words\n"}
    )

    assert response.status_code == 201, response.text
    assert response.json()["public_key"] == f"{line} bob@host two words"


ACCEPTED_NAMES = [
    pytest.param("my key", id="inner-space"),
    pytest.param("ключ-ü", id="unicode"),
    pytest.param("x" * 255, id="255-characters"),
    pytest.param("dots.and_underscores-1", id="punctuation"),
    pytest.param("50%off?#", id="url-characters"),
]


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_create_accepts_name(client: httpx.Client, name: str) -> None:
    created = client.post(
        "/v1/keypairs", json={"name": name, "public_key": public_key("ssh-ed25519")}
    )
    shown = client.get(keypair_path(name))
    deleted = client.delete(keypair_path(name))

    assert created.status_code == 201, created.text
    assert shown.status_code == 200, shown.text
    assert shown.json()["name"] == name
    assert deleted.status_code == 204, deleted.text


BAD_NAMES = [
    pytest.param("", id="empty"),
    pytest.param("x" * 256, id="too-long"),
    pytest.param(" key", id="leading-space"),
    pytest.param("key ", id="trailing-space"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a\x00b", id="nul"),
    pytest.param("a\u0085b", id="c1-control"),
    pytest.param("a/b", id="slash"),
    pytest.param(".", id="dot"),
    pytest.param("..", id="dot-dot"),
    pytest.param(12, id="number"),
    pytest.param(None, id="null"),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_create_rejects_name(client: httpx.Client, name: Any) -> None:
    response = client.post(
        "/v1/keypairs", json={"name": name, "public_key": public_key("ssh-ed25519")}
    )

    assert_rejected(response, "name")


def _swap_type(kind: str, other: str) -> str:
    return other + " " + public_key(kind).split()[1]


BAD_KEYS = [
    pytest.param(lambda: "", id="empty"),
    pytest.param(lambda: "not a key", id="garbage"),
    pytest.param(lambda: "ssh-ed25519", id="type-only"),
    pytest.param(lambda: "ssh-ed25519 AAAA%%%notbase64", id="bad-base64"),
    pytest.param(lambda: "ssh-ed25519 " + base64.b64encode(b"short").decode(), id="truncated-blob"),
    pytest.param(lambda: public_key("rsa-1024"), id="rsa-1024-bits"),
    pytest.param(lambda: public_key("ssh-dss"), id="dsa"),
    pytest.param(lambda: _swap_type("ssh-ed25519", "ssh-rsa"), id="type-mismatch"),
    pytest.param(
        lambda: _swap_type("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384"), id="curve-mismatch"
    ),
    pytest.param(
        lambda: _swap_type("ssh-ed25519", "sk-ssh-ed25519@openssh.com"), id="security-key"
    ),
    pytest.param(
        lambda: _swap_type("ssh-ed25519", "ssh-ed25519-cert-v01@openssh.com"), id="certificate"
    ),
    pytest.param(lambda: public_key("ssh-ed25519") + "\n" + public_key("ssh-rsa"), id="two-lines"),
    pytest.param(lambda: public_key("ssh-ed25519") + " comment\x00", id="nul-in-comment"),
    pytest.param(
        lambda: (
            ed25519.Ed25519PrivateKey.generate()
            .private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
            .decode()
        ),
        id="private-key",
    ),
    pytest.param(lambda: 42, id="number"),
]


@pytest.mark.parametrize("make_key", BAD_KEYS)
def test_create_rejects_public_key(client: httpx.Client, make_key: Any) -> None:
    name = unique_name()

    response = client.post("/v1/keypairs", json={"name": name, "public_key": make_key()})
    shown = client.get(keypair_path(name))

    assert_rejected(response, "public_key")
    assert_error(shown, 404, "not_found")


def test_rejects_small_rsa_with_bits(client: httpx.Client) -> None:
    response = client.post(
        "/v1/keypairs", json={"name": unique_name(), "public_key": public_key("rsa-1024")}
    )

    error = assert_rejected(response, "public_key")
    assert "2048" in error["message"]
    assert "1024" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"name": "only-name"}, id="no-public-key"),
        pytest.param({"public_key": "ssh-ed25519 AAAA"}, id="no-name"),
        pytest.param({"name": "k", "public_key": "x", "type": "ssh"}, id="unknown-field"),
    ],
)
def test_create_rejects_body(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/v1/keypairs", json=body)

    assert response.status_code == 400, response.text


def test_create_needs_write_scope(shared_org: Org) -> None:
    with shared_org.client("read") as reader:
        response = reader.post(
            "/v1/keypairs", json={"name": unique_name(), "public_key": public_key("ssh-ed25519")}
        )

    assert_error(response, 403, "forbidden")


# --- uniqueness and delete ------------------------------------------------------------


def test_duplicate_name_conflicts(client: httpx.Client) -> None:
    name = unique_name()
    create_keypair(client, name, "ssh-ed25519")

    response = client.post("/v1/keypairs", json={"name": name, "public_key": public_key("ssh-rsa")})

    error = assert_error(response, 409, "conflict")
    assert name in error["message"]
    assert client.get(keypair_path(name)).json()["type"] == "ssh-ed25519"


def test_same_name_in_two_organizations(client: httpx.Client, other_org: Org) -> None:
    name = unique_name()
    create_keypair(client, name)

    with other_org.client() as other:
        response = other.post(
            "/v1/keypairs", json={"name": name, "public_key": public_key("ssh-rsa")}
        )

    assert response.status_code == 201, response.text


def test_delete(client: httpx.Client) -> None:
    name = unique_name()
    create_keypair(client, name)

    deleted = client.delete(keypair_path(name))
    shown = client.get(keypair_path(name))
    again = client.delete(keypair_path(name))
    recreated = client.post(
        "/v1/keypairs", json={"name": name, "public_key": public_key("ssh-rsa")}
    )

    assert deleted.status_code == 204, deleted.text
    assert deleted.content == b""
    assert_error(shown, 404, "not_found")
    assert_error(again, 404, "not_found")
    assert recreated.status_code == 201, recreated.text


@pytest.mark.parametrize("name", ["no-such-key", "a%00b", "x" * 300, "%C2%85"])
def test_show_unknown(client: httpx.Client, name: str) -> None:
    response = client.get(f"/v1/keypairs/{name}")

    assert_error(response, 404, "not_found")


# --- isolation ------------------------------------------------------------------------


def test_other_organization_sees_nothing(client: httpx.Client, other_org: Org) -> None:
    name = unique_name()
    create_keypair(client, name)
    unknown = unique_name()

    with other_org.client() as other:
        shown = other.get(keypair_path(name))
        shown_unknown = other.get(keypair_path(unknown))
        deleted = other.delete(keypair_path(name))
        listed = other.get("/v1/keypairs").json()
        marker = other.get("/v1/keypairs", params={"marker": name})
        instance = other.post(
            "/v1/instances",
            json={
                "name": "foreign-key",
                "flavor_id": SMALL_FLAVOR,
                "image_id": UBUNTU_IMAGE,
                "key_names": [name],
            },
        )

    error = assert_error(shown, 404, "not_found")
    unknown_error = assert_error(shown_unknown, 404, "not_found")
    assert error["message"] == unknown_error["message"].replace(unknown, name)
    assert_error(deleted, 404, "not_found")
    assert listed["keypairs"] == []
    assert listed["meta"]["total"] == 0
    marker_error = assert_error(marker, 400, "invalid_parameter")
    assert marker_error["message"] == f"marker {name} not found"
    instance_error = assert_error(instance, 400, "invalid_parameter")
    assert instance_error["message"] == f"key pair {name!r} not found"
    assert client.get(keypair_path(name)).status_code == 200


# --- list -----------------------------------------------------------------------------


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_list_pagination(org: Org) -> None:
    names = ["delta", "alpha", "k 3", "charlie", "bravo"]
    with org.client() as client:
        for name in names:
            create_keypair(client, name)
        first = client.get("/v1/keypairs", params={"limit": "2"}).json()
        second = client.get(first["links"]["next"]).json()
        third = client.get(second["links"]["next"]).json()
        back = client.get(third["links"]["previous"]).json()
        everything = client.get("/v1/keypairs").json()

    ordered = sorted(names)
    assert [item["name"] for item in everything["keypairs"]] == ordered
    assert everything["meta"] == {"total": 5, "limit": 20, "marker": "k 3", "has_more": False}
    assert everything["links"]["next"] is None
    assert everything["links"]["previous"] is None
    assert [item["name"] for item in first["keypairs"]] == ordered[:2]
    assert [item["name"] for item in second["keypairs"]] == ordered[2:4]
    assert [item["name"] for item in third["keypairs"]] == ordered[4:]
    assert first["meta"] == {"total": 5, "limit": 2, "marker": "bravo", "has_more": True}
    assert third["meta"]["has_more"] is False
    assert third["links"]["next"] is None
    assert first["links"]["previous"] is None
    assert query_of(second["links"]["previous"]) == {"limit": ["2"]}
    assert query_of(third["links"]["previous"]) == {"limit": ["2"], "marker": ["bravo"]}
    assert query_of(second["links"]["next"]) == {"limit": ["2"], "marker": ["delta"]}
    assert back["keypairs"] == second["keypairs"]
    assert first["links"]["self"].startswith(f"{org.api.base_url}/v1/keypairs?")


def test_list_marker_with_space(org: Org) -> None:
    with org.client() as client:
        for name in ("a b", "a c", "b"):
            create_keypair(client, name)
        page = client.get("/v1/keypairs", params={"limit": "1", "marker": "a b"}).json()

    assert [item["name"] for item in page["keypairs"]] == ["a c"]
    assert "marker=a%20b" in page["links"]["self"]
    assert query_of(page["links"]["next"]) == {"limit": ["1"], "marker": ["a c"]}


BAD_QUERIES = [
    ("limit=0", "limit"),
    ("limit=1001", "limit"),
    ("limit=x", "limit"),
    ("marker=", "marker"),
    ("marker=a%00b", "marker"),
    ("marker=no-such-key", "marker"),
    ("name=x", "name"),
    ("limit=1&limit=2", "limit"),
]


@pytest.mark.parametrize(("query", "parameter"), BAD_QUERIES)
def test_list_rejects_query(client: httpx.Client, query: str, parameter: str) -> None:
    response = client.get(f"/v1/keypairs?{query}")

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == parameter


# --- instance create ------------------------------------------------------------------


def test_instance_with_key_names(client: httpx.Client) -> None:
    first, second = unique_name(), unique_name()
    create_keypair(client, first)
    create_keypair(client, second, "ssh-rsa")

    instance = create_instance(client, "with-keys", key_names=[first, second])
    client.delete(keypair_path(first))
    shown = client.get(f"/v1/instances/{instance['id']}")

    assert instance["key_names"] == [first, second]
    # Deleting a key pair does not change the instances created with it.
    assert shown.json()["key_names"] == [first, second]


@pytest.mark.parametrize(
    "key_names",
    [
        pytest.param(["no-such-key"], id="unknown"),
        pytest.param(["KNOWN", "KNOWN"], id="repeated"),
        pytest.param(["KNOWN", "no-such-key"], id="one-unknown"),
        pytest.param(["bad\x00name"], id="nul"),
        pytest.param("KNOWN", id="not-a-list"),
    ],
)
def test_instance_rejects_key_names(client: httpx.Client, key_names: Any) -> None:
    known = unique_name()
    create_keypair(client, known)
    if isinstance(key_names, list):
        key_names = [known if name == "KNOWN" else name for name in key_names]
    else:
        key_names = known

    response = client.post(
        "/v1/instances",
        json={
            "name": "bad-keys",
            "flavor_id": SMALL_FLAVOR,
            "image_id": UBUNTU_IMAGE,
            "key_names": key_names,
        },
    )

    assert_rejected(response, "key_names")


def test_instance_unknown_key_message(client: httpx.Client) -> None:
    response = client.post(
        "/v1/instances",
        json={
            "name": "bad-key",
            "flavor_id": SMALL_FLAVOR,
            "image_id": UBUNTU_IMAGE,
            "key_names": ["no-such-key"],
        },
    )

    error = assert_error(response, 400, "invalid_parameter")
    assert error["details"]["parameter"] == "key_names"
    assert error["message"] == "key pair 'no-such-key' not found"
