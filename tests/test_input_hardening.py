"""Hostile and malformed input, one table row per case, against the real server.

Every row sends one bad request. Each must get a 4xx in the error envelope, must
leave the organization's resources as they were (the lists before and after are
compared whole), and must not put an ERROR line or a traceback in the server's log.
Requests that httpx would normalize (raw non-ASCII bytes in the request line or in
headers) go over a raw socket.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import ApiServer, Backend, Org, free_port, make_org, start_process
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import MEDIUM_FLAVOR, SMALL_FLAVOR, UBUNTU_IMAGE, assert_error, wait_for

MAX_BODY_BYTES = 1024 * 1024
UNKNOWN_ID = "0b5c1a4e-8a6f-4d7e-9c1b-2f3a4b5c6d7e"
JSON = {"Content-Type": "application/json"}
# Stands for the bad text in a template body; replaced after JSON encoding.
SLOT = "\ue000"

PUBLIC_KEY = (
    Ed25519PrivateKey.generate()
    .public_key()
    .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    .decode()
)

# Bad text, as the bytes that stand inside a JSON string: JSON escapes, raw control
# bytes (which JSON forbids unescaped) and byte sequences that are not UTF-8.
BAD_TEXT: dict[str, bytes] = {
    "nul-escaped": b"a\\u0000b",
    "c0-escaped": b"a\\u001bb",
    "c0-raw": b"a\x01b",
    "tab-raw": b"a\tb",
    "del-raw": b"a\x7fb",
    "del-escaped": b"a\\u007fb",
    "c1-raw": b"a\xc2\x85b",
    "c1-escaped": b"a\\u009fb",
    "lone-surrogate": b"a\\ud800b",
    "invalid-utf8": b"a\xff\xfeb",
    "overlong-utf8": b"a\xc0\xafb",
    "encoded-surrogate": b"a\xed\xa0\x80b",
    "truncated-utf8": b"a\xe2\x82",
}
# Descriptions may contain line breaks and tabs, so only the other kinds apply.
LINE_BREAK_KINDS = {"tab-raw"}
# Fields that take an id, an enumerated value or a CIDR fail on any odd character,
# so a few kinds of bad text are enough there.
TYPED_FIELD_KINDS = {"nul-escaped", "c1-raw", "lone-surrogate", "invalid-utf8"}
TYPED_FIELDS = {"flavor_id", "image_id", "networks", "volume_id", "direction", "protocol",
                "remote_ip_prefix", "cidr", "type", "security_groups", "key_names"}

RULE = {
    "direction": "ingress", "protocol": "tcp", "port_range_min": 22, "port_range_max": 22,
    "remote_ip_prefix": "10.0.0.0/8",
}


@dataclass(frozen=True)
class Target:
    """A write endpoint with a valid body, and the collections it could change."""

    method: str
    path: str
    body: dict[str, Any]
    collections: tuple[str, ...]
    token: str = "rw"


TARGETS: dict[str, Target] = {
    "create-instance": Target(
        "POST", "/v1/instances",
        {"name": "hard-1", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE},
        ("instances", "volumes"),
    ),
    "update-instance": Target("PATCH", "/v1/instances/{instance}", {"name": "renamed"}, ("instances",)),
    "create-keypair": Target(
        "POST", "/v1/keypairs", {"name": "kp-hard", "public_key": PUBLIC_KEY}, ("keypairs",)
    ),
    "create-security-group": Target(
        "POST", "/v1/security-groups",
        {"name": "sg-hard", "description": "web", "rules": [RULE]},
        ("security-groups",),
    ),
    "create-rule": Target(
        "POST", "/v1/security-groups/{group}/rules", dict(RULE), ("security-groups",)
    ),
    "create-network": Target(
        "POST", "/v1/networks", {"name": "net-hard", "cidr": "10.9.0.0/24"}, ("networks",)
    ),
    "create-volume": Target("POST", "/v1/volumes", {"name": "vol-hard", "size_gb": 1}, ("volumes",)),
    "reboot": Target(
        "POST", "/v1/instances/{instance}/actions/reboot", {"type": "HARD"}, ("instances", "actions")
    ),
    "resize": Target(
        "POST", "/v1/instances/{instance}/actions/resize", {"flavor_id": MEDIUM_FLAVOR},
        ("instances", "actions"),
    ),
    "stop": Target("POST", "/v1/instances/{instance}/actions/stop", {}, ("instances", "actions")),
    "create-flavor": Target(
        "POST", "/v1/flavors", {"name": "fl-hard", "vcpus": 1, "ram": 1024, "disk": 1},
        ("flavors",), token="admin",
    ),
    "create-image": Target(
        "POST", "/v1/images", {"name": "im-hard", "os_distro": "x", "os_version": "1"},
        ("images",), token="admin",
    ),
}

# Every string field of every body, as (target, path into the body); a path step
# "<key>" names a dictionary key instead of a value.
STRING_FIELDS: list[tuple[str, tuple[Any, ...]]] = [
    ("create-instance", ("name",)),
    ("create-instance", ("description",)),
    ("create-instance", ("flavor_id",)),
    ("create-instance", ("image_id",)),
    ("create-instance", ("metadata", "<key>")),
    ("create-instance", ("metadata", "key")),
    ("create-instance", ("tags", 0)),
    ("create-instance", ("key_names", 0)),
    ("create-instance", ("security_groups", 0)),
    ("create-instance", ("networks", 0)),
    ("create-instance", ("volumes", 0, "volume_id")),
    ("update-instance", ("name",)),
    ("update-instance", ("description",)),
    ("update-instance", ("metadata", "<key>")),
    ("update-instance", ("metadata", "key")),
    ("update-instance", ("tags", 0)),
    ("create-keypair", ("name",)),
    ("create-keypair", ("public_key",)),
    ("create-security-group", ("name",)),
    ("create-security-group", ("description",)),
    ("create-security-group", ("rules", 0, "direction")),
    ("create-security-group", ("rules", 0, "protocol")),
    ("create-security-group", ("rules", 0, "remote_ip_prefix")),
    ("create-rule", ("direction",)),
    ("create-rule", ("protocol",)),
    ("create-rule", ("remote_ip_prefix",)),
    ("create-network", ("name",)),
    ("create-network", ("cidr",)),
    ("create-volume", ("name",)),
    ("reboot", ("type",)),
    ("resize", ("flavor_id",)),
    ("create-flavor", ("name",)),
    ("create-image", ("name",)),
    ("create-image", ("os_distro",)),
    ("create-image", ("os_version",)),
]


@dataclass(frozen=True)
class Case:
    """One bad request and the response the server must send."""

    id: str
    method: str
    path: str
    collections: tuple[str, ...]
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    token: str = "rw"
    status: int = 400
    types: tuple[str, ...] = ("invalid_request", "invalid_parameter")
    # Sent over a raw socket as is: the request line and the extra header lines.
    raw_line: bytes | None = None
    raw_headers: bytes = b""


def _with_slot(body: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    """Return a copy of ``body`` with SLOT at ``path``, creating containers on the way."""
    result = json.loads(json.dumps(body))
    node: Any = result
    for position, step in enumerate(path):
        following = path[position + 1] if position + 1 < len(path) else None
        if following == "<key>":
            node[step] = {SLOT: "value"}
            break
        if following is None:
            value: Any = SLOT
        elif isinstance(following, str):
            value = {}
        else:
            value = []
        if isinstance(node, list) and step == len(node):
            node.append(value)
        elif isinstance(node, dict) and step not in node or following is None:
            node[step] = value
        node = node[step]
    return result


def _encode_with(body: dict[str, Any], bad: bytes) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode().replace(SLOT.encode(), bad)


def _string_field_cases() -> Iterator[Case]:
    for target_name, path in STRING_FIELDS:
        target = TARGETS[target_name]
        template = _with_slot(target.body, path)
        for kind, bad in BAD_TEXT.items():
            if path[-1] == "description" and kind in LINE_BREAK_KINDS:
                continue
            typed = {step for step in path if isinstance(step, str)} & TYPED_FIELDS
            if typed and kind not in TYPED_FIELD_KINDS:
                continue
            label = ".".join(str(step) for step in path)
            yield Case(
                f"{target_name}-{label}-{kind}", target.method, target.path, target.collections,
                body=_encode_with(template, bad), headers=JSON, token=target.token,
            )


# Bodies that are not a JSON object, or not JSON at all.
BAD_BODIES: dict[str, bytes] = {
    "array": b"[]",
    "array-of-object": b'[{"name": "x"}]',
    "string": b'"name"',
    "number": b"1",
    "null": b"null",
    "true": b"true",
    "truncated": b'{"name": "x", ',
    "open-brace": b"{",
    "trailing-garbage": b'{"name": "x"} x',
    "single-quotes": b"{'name': 'x'}",
    "nan": b'{"name": NaN}',
    "nested-arrays": b"[" * 5000 + b"]" * 5000,
    "nested-objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "nested-in-field": b'{"name": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "bom": b'\xef\xbb\xbf{"name": "x"}',
    "utf16": '{"name": "x"}'.encode("utf-16"),
}
# The actions without options accept an empty body, so an empty body is no error there.
EMPTY_BODY_ALLOWED = {"stop", "reboot"}


def _target_case(target_name: str, kind: str, body: bytes, headers: dict[str, str],
                 status: int = 400, types: tuple[str, ...] = ("invalid_request",)) -> Case:
    target = TARGETS[target_name]
    return Case(f"{target_name}-{kind}", target.method, target.path, target.collections,
                body=body, headers=headers, token=target.token, status=status, types=types)


def _body_shape_cases() -> Iterator[Case]:
    for name, target in TARGETS.items():
        for kind, body in BAD_BODIES.items():
            yield _target_case(name, f"body-{kind}", body, JSON)
        if name not in EMPTY_BODY_ALLOWED:
            yield _target_case(name, "body-empty", b"", JSON)
        huge = json.dumps({**target.body, "name": "x" * (MAX_BODY_BYTES + 10)}).encode()
        yield _target_case(name, "body-over-limit", huge, JSON, 413, ("payload_too_large",))
        valid = json.dumps(target.body).encode()
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
            yield _target_case(name, f"content-type-{content_type}", valid,
                               {"Content-Type": content_type}, 415, ("unsupported_media_type",))
        yield _target_case(name, "no-content-type", valid, {}, 415, ("unsupported_media_type",))


# (target, path into the body, bad value as JSON text)
BAD_NUMBERS: list[tuple[str, tuple[Any, ...], str]] = [
    *[("create-volume", ("size_gb",), value) for value in (
        "0", "-1", "16385", "1.5", "1e5", "true", "false", '"1"', "null",
        "99999999999999999999999999", "-99999999999999999999999999", "1" + "0" * 5000, "1e400",
        "[1]", "{}",
    )],
    *[("create-instance", ("volumes", 0, "size_gb"), value) for value in (
        "0", "-5", "16385", "2.5", "true", "18446744073709551616",
    )],
    *[("create-flavor", (name,), value) for name in ("vcpus", "ram", "disk") for value in (
        "-1", "0.5", "true", "9223372036854775808", "-9223372036854775809", '"2"',
    )],
    ("create-flavor", ("vcpus",), "0"),
    ("create-flavor", ("vcpus",), "1025"),
    ("create-flavor", ("ram",), "63"),
    ("create-flavor", ("is_public",), "1"),
    ("create-flavor", ("is_public",), '"true"'),
    ("create-image", ("min_disk",), "-1"),
    ("create-image", ("min_ram",), "1e10"),
    *[(target, (*prefix, port), value)
      for target, prefix in (("create-rule", ()), ("create-security-group", ("rules", 0)))
      for port in ("port_range_min", "port_range_max")
      for value in ("0", "65536", "-1", "22.5", "true", "18446744073709551617", '"22"')],
    ("create-instance", ("metadata", "key"), "1"),
    ("create-instance", ("metadata", "key"), "null"),
    ("create-instance", ("tags", 0), "1"),
    ("create-instance", ("name",), "1"),
    ("create-instance", ("volumes", 0, "delete_on_termination"), "1"),
    ("create-instance", ("volumes", 0, "delete_on_termination"), '"yes"'),
    ("create-network", ("cidr",), "167772160"),
    ("create-network", ("cidr",), '"10.9.0.0/24\\n"'),
    ("create-network", ("cidr",), '"10.9.0.0/255.255.255.0"'),
    ("update-instance", ("tags",), '"web"'),
    ("update-instance", ("metadata",), "[]"),
]


def _number_cases() -> Iterator[Case]:
    for target_name, path, value in BAD_NUMBERS:
        target = TARGETS[target_name]
        template = _with_slot(target.body, path)
        if path[:2] == ("volumes", 0):
            template["volumes"][0].setdefault("delete_on_termination", False)
            if path[-1] != "size_gb":
                template["volumes"][0]["size_gb"] = 1
        text = json.dumps(template, ensure_ascii=False).encode()
        label = ".".join(str(step) for step in path)
        yield Case(
            f"{target_name}-{label}-{value[:24]}", target.method, target.path, target.collections,
            body=text.replace(b'"' + SLOT.encode() + b'"', value.encode()), headers=JSON,
            token=target.token,
        )


# Lists and the collection each one reads; the hosts list needs the admin scope.
LISTS = {
    "/v1/instances": ("instances", "rw"),
    "/v1/volumes": ("volumes", "rw"),
    "/v1/networks": ("networks", "rw"),
    "/v1/keypairs": ("keypairs", "rw"),
    "/v1/security-groups": ("security-groups", "rw"),
    "/v1/flavors": ("flavors", "rw"),
    "/v1/images": ("images", "rw"),
    "/v1/hosts": ("hosts", "admin"),
    "/v1/instances/{instance}/actions": ("actions", "rw"),
}

BAD_QUERIES: dict[str, str] = {
    "limit-zero": "limit=0",
    "limit-negative": "limit=-1",
    "limit-over": "limit=1001",
    "limit-huge": "limit=" + "9" * 40,
    "limit-float": "limit=1.5",
    "limit-exponent": "limit=1e2",
    "limit-hex": "limit=0x10",
    "limit-plus": "limit=%2B5",
    "limit-space": "limit=%205",
    "limit-empty": "limit=",
    "limit-bool": "limit=true",
    "limit-arabic-digit": "limit=%D9%A1",
    "limit-fullwidth-digit": "limit=%EF%BC%91",
    "limit-nul": "limit=1%00",
    "limit-broken-escape": "limit=%",
    "limit-half-escape": "limit=%2",
    "limit-bad-escape": "limit=%zz",
    "limit-repeated": "limit=1&limit=2",
    "limit-repeated-same": "limit=5&limit=5",
    "marker-junk": "marker=abc",
    "marker-uuid-braces": "marker=%7B" + UNKNOWN_ID + "%7D",
    "marker-uuid-no-hyphens": "marker=" + UNKNOWN_ID.replace("-", ""),
    "marker-uuid-urn": "marker=urn:uuid:" + UNKNOWN_ID,
    "marker-unknown": "marker=" + UNKNOWN_ID,
    "marker-trailing-newline": "marker=" + UNKNOWN_ID + "%0A",
    "marker-unknown-upper": "marker=" + UNKNOWN_ID.upper(),
    "marker-long": "marker=" + "a" * 5000,
    "marker-invalid-utf8": "marker=%C3%28",
    "marker-control": "marker=%01",
    "marker-c1": "marker=%C2%85",
    "marker-empty": "marker=",
    "marker-repeated": f"marker={UNKNOWN_ID}&marker={UNKNOWN_ID}",
    "unknown-parameter": "colour=red",
    "unknown-empty-name": "=1",
    "unknown-long-name": "x" * 2000 + "=1",
    "parameter-name-invalid-utf8": "%FF%FE=1",
    "value-invalid-utf8": "limit=%FF",
    "value-encoded-surrogate": "limit=%ED%A0%80",
    "value-overlong-utf8": "limit=%C0%AF",
    "value-huge": "limit=" + "1" * 30000,
    "many-parameters": "&".join(f"p{number}=1" for number in range(40)),
    "thousands-of-parameters": "&".join(f"p{number}=1" for number in range(5000)),
    "thousands-of-separators": "&" * 5000 + "colour=red",
}
# Filters of the instance list only.
BAD_INSTANCE_FILTERS: dict[str, str] = {
    "name-empty": "name=",
    "name-long": "name=" + "a" * 256,
    "name-very-long": "name=" + "a" * 30000,
    "name-nul": "name=a%00b",
    "name-control": "name=a%1Bb",
    "name-del": "name=a%7Fb",
    "name-c1": "name=a%C2%85b",
    "name-invalid-utf8": "name=a%FFb",
    "name-star-inside": "name=a*b",
    "name-repeated": "name=a&name=b",
    "status-unknown": "status=RUNNING",
    "status-empty": "status=",
    "status-control": "status=ACTIVE%00",
    "tags-empty-element": "tags=a,,b",
    "tags-control": "tags=a%01",
    "tags-c1": "tags=a%C2%9F",
    "tags-too-many": "tags=" + ",".join(f"t{number}" for number in range(51)),
    "flavor-not-uuid": "flavor_id=m1.small",
    "flavor-trailing-newline": "flavor_id=" + SMALL_FLAVOR + "%0A",
    "flavor-braces": "flavor_id=%7B" + SMALL_FLAVOR + "%7D",
    "image-not-uuid": "image_id=" + "f" * 36,
    "image-invalid-utf8": "image_id=%FF",
}


# The instance list gets every bad query; the other lists share its parser, so they
# get these.
QUERY_KINDS_OF_EVERY_LIST = {
    "limit-zero", "limit-float", "limit-huge", "limit-broken-escape", "limit-repeated",
    "marker-junk", "marker-unknown", "marker-trailing-newline", "marker-invalid-utf8",
    "marker-control", "unknown-parameter", "parameter-name-invalid-utf8", "value-huge",
    "thousands-of-parameters",
}


def _query_cases() -> Iterator[Case]:
    for path, (collection, token) in LISTS.items():
        name = path.strip("/").replace("/", "-").replace("{instance}", "id")
        for kind, query in BAD_QUERIES.items():
            if path != "/v1/instances" and kind not in QUERY_KINDS_OF_EVERY_LIST:
                continue
            if path == "/v1/keypairs" and kind.startswith("marker-") and kind not in (
                "marker-invalid-utf8", "marker-control", "marker-c1", "marker-long",
                "marker-empty", "marker-repeated", "marker-unknown",
            ):
                continue  # a key pair marker is a name, so UUID-like junk is merely unknown
            yield Case(f"{name}-{kind}", "GET", f"{path}?{query}", (collection,), token=token,
                       status=_query_status(query))
    for kind, query in BAD_INSTANCE_FILTERS.items():
        yield Case(f"v1-instances-{kind}", "GET", f"/v1/instances?{query}", ("instances",),
                   status=_query_status(query))


def _query_status(query: str) -> int:
    # A query string over the server's size limit may get a 414 before it is parsed.
    return 0 if len(query) > 2000 else 400


# Path ids that name nothing: not UUIDs, UUID-like junk, and UUIDs that exist nowhere.
BAD_IDS: dict[str, str] = {
    "word": "abc",
    "zero": "0",
    "unknown": UNKNOWN_ID,
    "unknown-upper": UNKNOWN_ID.upper(),
    "braces": "%7B" + UNKNOWN_ID + "%7D",
    "urn": "urn:uuid:" + UNKNOWN_ID,
    "no-hyphens": UNKNOWN_ID.replace("-", ""),
    "one-short": UNKNOWN_ID[:-1],
    "one-long": UNKNOWN_ID + "0",
    "not-hex": "g" + UNKNOWN_ID[1:],
    "very-long": "a" * 5000,
    "nul": "a%00b",
    "control": "a%1Bb",
    "c1": "a%C2%85b",
    "invalid-utf8": "a%FFb",
    "dot-dot": "..%2F..%2Fetc",
    "sql": "1'%20OR%20'1'%3D'1",
    "newline-after-id": UNKNOWN_ID + "%0A",
}
ITEM_PATHS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("GET", "/v1/instances/{id}", ("instances",), "rw"),
    ("PATCH", "/v1/instances/{id}", ("instances",), "rw"),
    ("DELETE", "/v1/instances/{id}", ("instances",), "rw"),
    ("GET", "/v1/instances/{id}/actions", ("actions",), "rw"),
    ("POST", "/v1/instances/{id}/actions/stop", ("instances",), "rw"),
    ("GET", "/v1/volumes/{id}", ("volumes",), "rw"),
    ("DELETE", "/v1/volumes/{id}", ("volumes",), "rw"),
    ("GET", "/v1/networks/{id}", ("networks",), "rw"),
    ("DELETE", "/v1/networks/{id}", ("networks",), "rw"),
    ("GET", "/v1/security-groups/{id}", ("security-groups",), "rw"),
    ("DELETE", "/v1/security-groups/{id}", ("security-groups",), "rw"),
    ("POST", "/v1/security-groups/{id}/rules", ("security-groups",), "rw"),
    ("DELETE", "/v1/security-groups/{id}/rules/" + UNKNOWN_ID, ("security-groups",), "rw"),
    ("DELETE", "/v1/security-groups/{group}/rules/{id}", ("security-groups",), "rw"),
    ("GET", "/v1/flavors/{id}", ("flavors",), "admin"),
    ("DELETE", "/v1/flavors/{id}", ("flavors",), "admin"),
    ("GET", "/v1/images/{id}", ("images",), "admin"),
    ("DELETE", "/v1/images/{id}", ("images",), "admin"),
    ("GET", "/v1/hosts/{id}", ("hosts",), "admin"),
]
BODY_OF_ITEM = {"PATCH": {"name": "renamed"}, "POST": dict(RULE)}
# Key pair names: what is not a valid name is a 404 like an unknown one.
BAD_KEYPAIR_NAMES = {
    "unknown": "no-such-key",
    "very-long": "k" * 5000,
    "nul": "a%00b",
    "control": "a%1Bb",
    "c1": "a%C2%85b",
    "invalid-utf8": "a%FFb",
    "dot": "%2E",
    "space-around": "%20key%20",
}


# Every path id goes through one parser; the first path gets every bad id, the
# others these.
ID_KINDS_OF_EVERY_PATH = {"word", "unknown", "braces", "very-long", "nul", "c1", "invalid-utf8",
                          "newline-after-id"}


def _path_id_cases() -> Iterator[Case]:
    for method, template, collections, token in ITEM_PATHS:
        for kind, bad in BAD_IDS.items():
            if template != ITEM_PATHS[0][1] and kind not in ID_KINDS_OF_EVERY_PATH:
                continue
            if template.endswith("/actions/stop") and kind == "sql":
                continue
            body = BODY_OF_ITEM.get(method) if not template.endswith("/stop") else None
            yield Case(
                f"{method}-{template}-{kind}", method, template.replace("{id}", bad), collections,
                body=None if body is None else json.dumps(body).encode(),
                headers=JSON if body is not None else {}, token=token, status=404,
                types=("not_found",),
            )
    for method in ("GET", "DELETE"):
        for kind, bad in BAD_KEYPAIR_NAMES.items():
            yield Case(f"{method}-keypair-{kind}", method, f"/v1/keypairs/{bad}", ("keypairs",),
                       status=404, types=("not_found",))


def _header_cases() -> Iterator[Case]:
    volume = json.dumps({"name": "vol-hard", "size_gb": 1}).encode()
    idempotency = {"empty": "", "long": "k" * 256}
    for kind, key in idempotency.items():
        yield Case(f"idempotency-key-{kind}", "POST", "/v1/volumes", ("volumes",), body=volume,
                   headers={**JSON, "Idempotency-Key": key}, types=("invalid_parameter",))
    # Sent raw: bytes that are not valid in a header value, or not UTF-8.
    raw_keys = {"invalid-utf8": b"\xff\xfe", "nul": b"a\x00b", "c0": b"a\x01b", "del": b"a\x7fb",
                "c1": b"a\x85b", "latin1": b"caf\xe9", "encoded-surrogate": b"\xed\xa0\x80",
                "tab-only": b"\t"}
    for kind, key in raw_keys.items():
        yield Case(
            f"idempotency-key-raw-{kind}", "POST", "/v1/volumes", ("volumes",), body=volume,
            raw_line=b"POST /v1/volumes HTTP/1.1",
            raw_headers=b"Content-Type: application/json\r\nIdempotency-Key: " + key + b"\r\n",
        )
    yield Case(
        "idempotency-key-twice", "POST", "/v1/volumes", ("volumes",), body=volume,
        raw_line=b"POST /v1/volumes HTTP/1.1",
        raw_headers=b"Content-Type: application/json\r\nIdempotency-Key: a\r\nIdempotency-Key: b\r\n",
    )

    unauthorized = ("unauthorized",)
    authorization = {
        "invalid-utf8": b"Bearer \xff\xfe", "c1": b"Bearer a\x85b",
        "long": b"Bearer " + b"a" * 4000, "basic": b"Basic dXNlcjpwYXNz",
        "scheme-only": b"Bearer", "two-tokens": b"Bearer a b", "empty": b"",
        "encoded-surrogate": b"Bearer \xed\xa0\x80",
    }
    for kind, value in authorization.items():
        yield Case(
            f"authorization-{kind}", "POST", "/v1/volumes", ("volumes",), body=volume, token="",
            status=401 if kind != "long" else 0, types=unauthorized, raw_line=b"POST /v1/volumes HTTP/1.1",
            raw_headers=b"Content-Type: application/json\r\nAuthorization: " + value + b"\r\n",
        )
    parser_rejects = {"nul": b"Bearer a\x00b", "c0": b"Bearer a\x01b", "del": b"Bearer a\x7fb"}
    for kind, value in parser_rejects.items():
        # The HTTP parser rejects these bytes before the application sees the request.
        yield Case(
            f"authorization-{kind}", "POST", "/v1/volumes", ("volumes",), body=volume, token="",
            raw_line=b"POST /v1/volumes HTTP/1.1", types=("invalid_request",),
            raw_headers=b"Content-Type: application/json\r\nAuthorization: " + value + b"\r\n",
        )

    content_types = {"invalid-utf8": b"application/json\xff", "latin1": b"application/j\xe9son",
                     "c1": b"application/json\x85", "empty": b""}
    for kind, value in content_types.items():
        yield Case(
            f"content-type-{kind}", "POST", "/v1/volumes", ("volumes",), body=volume,
            status=415, types=("unsupported_media_type",), raw_line=b"POST /v1/volumes HTTP/1.1",
            raw_headers=b"Content-Type: " + value + b"\r\n",
        )

    # A request id that is not reused must not save a bad request either.
    bad_volume = json.dumps({"name": "vol-hard", "size_gb": 0}).encode()
    request_ids = {"invalid-utf8": b"\xff\xfe", "c1": b"a\x85b", "long": b"r" * 65,
                   "space": b"a b", "slash": b"../x", "unicode": b"\xc3\xa9"}
    for kind, value in request_ids.items():
        yield Case(
            f"request-id-{kind}", "POST", "/v1/volumes", ("volumes",), body=bad_volume,
            raw_line=b"POST /v1/volumes HTTP/1.1",
            raw_headers=b"Content-Type: application/json\r\nX-Request-Id: " + value + b"\r\n",
        )


def _request_line_cases() -> Iterator[Case]:
    """Request lines that the HTTP parser rejects, or that reach the application broken."""
    lines = {
        "raw-non-ascii-query": b"GET /v1/instances?name=caf\xc3\xa9 HTTP/1.1",
        "raw-invalid-utf8-query": b"GET /v1/instances?name=\xff\xfe HTTP/1.1",
        "raw-invalid-utf8-path": b"GET /v1/instances/\xff HTTP/1.1",
        "raw-control-in-path": b"GET /v1/instances/\x01 HTTP/1.1",
        "raw-del-in-query": b"GET /v1/instances?name=a\x7fb HTTP/1.1",
        "raw-space-in-path": b"GET /v1/inst ances HTTP/1.1",
        "raw-tab-in-query": b"GET /v1/instances?name=a\tb HTTP/1.1",
        "overlong-request-line": b"GET /v1/instances?name=" + b"a" * 100_000 + b" HTTP/1.1",
        "overlong-path": b"GET /v1/instances/" + b"a" * 100_000 + b" HTTP/1.1",
        "bad-version": b"GET /v1/instances HTTP/9.9",
        "lowercase-method": b"get /v1/instances HTTP/1.1",
    }
    for kind, line in lines.items():
        yield Case(kind, "GET", "", ("instances",), raw_line=line, status=0,
                   types=("invalid_request", "not_found", "invalid_parameter", "uri_too_long",
                          "method_not_allowed"))
    yield Case(
        "content-length-not-a-number", "POST", "/v1/volumes", ("volumes",), body=b"{}",
        raw_line=b"POST /v1/volumes HTTP/1.1",
        raw_headers=b"Content-Type: application/json\r\nContent-Length: abc\r\n",
        types=("invalid_request",),
    )


CASES = [
    *_string_field_cases(),
    *_body_shape_cases(),
    *_number_cases(),
    *_query_cases(),
    *_path_id_cases(),
    *_header_cases(),
    *_request_line_cases(),
]


# --- fixtures and helpers -----------------------------------------------------------


@dataclass
class Tenant:
    """An organization with one resource of each kind, shared by the cases of a module."""

    org: Org
    ids: dict[str, str]
    # The last snapshot of each collection, so each case reads it once, after its request.
    known: dict[str, Any] = field(default_factory=dict)
    # One client per token for the whole module: a new client per request costs more
    # than the request.
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, scopes: str) -> httpx.Client:
        if scopes not in self.clients:
            self.clients[scopes] = self.org.client(scopes)
        return self.clients[scopes]

    def fill(self, template: str) -> str:
        return template.format_map(self.ids) if "{" in template else template


@pytest.fixture(scope="module")
def tenant(api: ApiServer) -> Iterator[Tenant]:
    org = make_org(api, "hardening")
    with org.client() as client:
        instance = client.post(
            "/v1/instances", json={"name": "target", "flavor_id": SMALL_FLAVOR, "image_id": UBUNTU_IMAGE}
        ).json()
        group = client.post("/v1/security-groups", json={"name": "target-group", "rules": [RULE]}).json()
        client.post("/v1/volumes", json={"name": "target-volume", "size_gb": 1}).raise_for_status()
        client.post("/v1/networks", json={"name": "target-net", "cidr": "10.1.0.0/24"}).raise_for_status()
        client.post("/v1/keypairs", json={"name": "target-key", "public_key": PUBLIC_KEY}).raise_for_status()
        wait_for(client, instance["id"], status="ACTIVE")
    tenant = Tenant(org, {"instance": instance["id"], "group": group["id"]})
    yield tenant
    for client in tenant.clients.values():
        client.close()


def snapshot(tenant: Tenant, collections: tuple[str, ...]) -> dict[str, Any]:
    """Read every listed collection whole, with the admin token so nothing is hidden."""
    paths = {name: path for path, (name, _) in LISTS.items()}
    state: dict[str, Any] = {}
    for name in collections:
        response = tenant.client("admin").get(tenant.fill(paths[name]), params={"limit": 1000})
        assert response.status_code == 200, response.text
        body = response.json()
        body.pop("links")
        state[name] = body
    return state


class LogWatch:
    """Remember where each process log ends, and return what was written after that."""

    def __init__(self, api: ApiServer) -> None:
        # The API process only: on PostgreSQL the worker's log belongs to whatever
        # tasks earlier tests left behind.
        self.paths = [api.processes[0].log_path]
        self.offsets = [path.stat().st_size for path in self.paths]

    def new_text(self) -> str:
        parts = []
        for path, offset in zip(self.paths, self.offsets, strict=True):
            with path.open("rb") as file:
                file.seek(offset)
                parts.append(file.read().decode("utf-8", errors="replace"))
        return "\n".join(parts)


def send_raw(base_url: str, head: bytes, body: bytes | None) -> httpx.Response:
    """Send ``head`` (request line and headers, without the blank line) over a socket."""
    address = urlsplit(base_url)
    request = head + b"Host: 127.0.0.1\r\nConnection: close\r\n"
    if body is not None and b"content-length:" not in head.lower():
        request += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    request += b"\r\n" + (body or b"")
    received = b""
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionError:
            # The server may reject the head and close while the rest is still being
            # sent; the response it wrote first is still in the buffer.
            while chunk := _recv_after_reset(sock):
                received += chunk
    head_bytes, _, content = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in header_lines]
    return httpx.Response(int(status_line.split(" ")[1]), headers=headers, content=content)


def _recv_after_reset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def send(tenant: Tenant, case: Case) -> httpx.Response:
    if case.raw_line is None:
        return tenant.client(case.token).request(
            case.method, tenant.fill(case.path), content=case.body, headers=case.headers
        )
    head = case.raw_line + b"\r\n" + case.raw_headers
    if case.token and b"authorization:" not in head.lower():
        head += b"Authorization: Bearer " + tenant.org.tokens[case.token].encode() + b"\r\n"
    return send_raw(tenant.org.api.base_url, head, case.body)


# --- the table ----------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_rejected(tenant: Tenant, case: Case) -> None:
    missing = tuple(name for name in case.collections if name not in tenant.known)
    tenant.known.update(snapshot(tenant, missing))
    before = {name: tenant.known[name] for name in case.collections}
    logs = LogWatch(tenant.org.api)

    response = send(tenant, case)
    after = snapshot(tenant, case.collections)
    tenant.known.update(after)

    if case.status:
        error = assert_error(response, case.status, response.json()["error"]["type"])
    else:
        assert 400 <= response.status_code < 500, response.text
        error = assert_error(response, response.status_code, response.json()["error"]["type"])
    assert error["type"] in case.types, response.text
    assert "Traceback" not in response.text
    assert after == before
    written = logs.new_text()
    assert " ERROR " not in written, written
    assert "Traceback" not in written, written


def test_table_covers_every_kind() -> None:
    """Each group of the table contributes cases, and case ids are unique."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) > 900


# --- rules that a table row cannot express ------------------------------------------


def test_unreused_request_id_replaced(tenant: Tenant) -> None:
    for value in (b"\xff\xfe", b"a\x85b", b"r" * 65, b"a b"):
        head = b"GET /v1/volumes HTTP/1.1\r\nX-Request-Id: " + value + b"\r\n"
        head += b"Authorization: Bearer " + tenant.org.tokens["read"].encode() + b"\r\n"
        response = send_raw(tenant.org.api.base_url, head, None)
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"].startswith("req-")
        uuid.UUID(response.headers["x-request-id"].removeprefix("req-"))


def test_uppercase_path_id_same_resource(tenant: Tenant) -> None:
    """Ids are compared case-insensitively, like markers and filters (RFC 9562 section 4)."""
    with tenant.org.client("read") as client:
        lower = client.get(f"/v1/instances/{tenant.ids['instance']}")
        upper = client.get(f"/v1/instances/{tenant.ids['instance'].upper()}")
    assert upper.status_code == 200, upper.text
    assert upper.json() == lower.json()


def test_disconnect_mid_body_not_an_error(tenant: Tenant) -> None:
    """A client that left before the end of its body was logged as an unhandled 500."""
    before = snapshot(tenant, ("volumes",))
    logs = LogWatch(tenant.org.api)
    address = urlsplit(tenant.org.api.base_url)
    head = (
        b"POST /v1/volumes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nAuthorization: Bearer "
        + tenant.org.tokens["rw"].encode() + b"\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(head + b'{"name": "vol')
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass

    # The server logs one summary line per request once it has handled it.
    deadline = time.monotonic() + 10
    written = logs.new_text()
    while "method=POST path=/v1/volumes" not in written and time.monotonic() < deadline:
        time.sleep(0.05)
        written = logs.new_text()
    assert "method=POST path=/v1/volumes status=400" in written, written
    assert " ERROR " not in written, written
    assert "Traceback" not in written, written
    assert snapshot(tenant, ("volumes",)) == before


def test_h11_protocol_sends_envelope(backend: Backend, tmp_path: Path) -> None:
    """The h11 variant of the protocol class also wraps parser errors in the envelope."""
    port = free_port()
    process = start_process(
        ["-m", "uvicorn", "mycloud_compute.api.asgi:app", "--host", "127.0.0.1",
         "--port", str(port), "--no-access-log", "--no-proxy-headers",
         "--http", "mycloud_compute.api.http_protocol:EnvelopeH11Protocol"],
        {"MYCLOUD_DATABASE_URL": backend.url, "MYCLOUD_RUN_WORKER": "no"},
        tmp_path / "api.log",
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        cases = {
            "non-ascii": b"GET /v1/instances?name=caf\xc3\xa9 HTTP/1.1\r\n",
            "nul-in-header": b"GET /healthz HTTP/1.1\r\nX-Junk: a\x00b\r\n",
        }
        for kind, head in cases.items():
            response = send_raw(base_url, head, None)
            error = assert_error(response, 400, "invalid_request")
            assert error["message"].startswith("the HTTP request could not be parsed"), kind
    finally:
        process.stop()
    assert "Traceback" not in process.log()
    assert " ERROR " not in process.log()
