"""Organizations and tokens: the admin CLI run as operators run it, then the tokens over HTTP.

The CLI runs as a subprocess against the test backend's database, so each test here
covers the command line, the identity service and the API's authentication together.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ApiServer, Backend, Org, free_port, make_org
from helpers import assert_error, create_instance
from sqlalchemy import func, select, update

from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import flavors, organizations, tokens

CLI = [sys.executable, "-m", "mycloud_compute.cli.admin"]
CLI_TIMEOUT = 60
INVALID_TOKEN_CHALLENGE = 'Bearer realm="mycloud", error="invalid_token"'
DEFAULT_FLAVOR_NAMES = ["m1.tiny", "m1.small", "m1.medium", "m1.large", "m1.xlarge"]


def run_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYCLOUD_DATABASE_URL": database_url}
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def token_rows(backend: Backend, organization_name: str) -> list[dict[str, Any]]:
    async def read(db: Database) -> list[dict[str, Any]]:
        async with db.snapshot() as conn:
            query = (
                select(tokens)
                .join(organizations, organizations.c.id == tokens.c.organization_id)
                .where(organizations.c.name == organization_name)
            )
            return [dict(row._mapping) for row in (await conn.execute(query)).all()]

    return backend.run(read)  # type: ignore[no-any-return]


def set_token_expiry(
    backend: Backend, organization_name: str, token_name: str, when: datetime
) -> None:
    async def write(db: Database) -> None:
        async with db.transaction() as conn:
            organization_id = (
                await conn.execute(
                    select(organizations.c.id).where(organizations.c.name == organization_name)
                )
            ).scalar_one()
            await conn.execute(
                update(tokens)
                .where(tokens.c.organization_id == organization_id, tokens.c.name == token_name)
                .values(expires_at=when)
            )

    backend.run(write)


def assert_invalid_token(response: httpx.Response) -> None:
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE


# --- organizations --------------------------------------------------------------------


def test_org_create_prints_id(api: ApiServer) -> None:
    name = unique_name("cli-org")

    created = run_cli(api.backend.url, "org", "create", name)
    listed = run_cli(api.backend.url, "org", "list")

    assert created.returncode == 0, created.stderr
    organization_id = created.stdout.strip()
    assert str(uuid.UUID(organization_id)) == organization_id
    assert listed.returncode == 0, listed.stderr
    assert f"{organization_id}  {name}" in listed.stdout.splitlines()


def test_org_create_duplicate(org: Org) -> None:
    result = run_cli(org.api.backend.url, "org", "create", org.name)

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"organization {org.name!r} already exists" in result.stderr
    assert "Traceback" not in result.stderr


def test_org_create_database_unreachable() -> None:
    # Nothing listens on a port that was free a moment ago.
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/mycloud_test_unreachable"

    result = run_cli(url, "org", "create", "unreachable")

    assert result.returncode == 1
    assert result.stderr.startswith("Error: database request failed:"), result.stderr
    assert "Traceback" not in result.stderr


# --- token create ---------------------------------------------------------------------


def test_token_create_prints_only_token(org: Org) -> None:
    before = utcnow()

    result = run_cli(
        org.api.backend.url, "token", "create", "--org", org.name, "--scopes", "read,write",
        "--name", "cli-rw", "--expires-in", "1.5",
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    with org.api.client(lines[0]) as client:
        created = create_instance(client, "cli-token")
        listed = client.get("/v1/instances")
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["instances"]] == [created["id"]]
    row = next(row for row in token_rows(org.api.backend, org.name) if row["name"] == "cli-rw")
    assert row["scopes"] == "read,write"
    assert before + timedelta(hours=35) < row["expires_at"] < utcnow() + timedelta(hours=37)


def test_token_create_without_name_twice(org: Org) -> None:
    # Two unnamed tokens created in the same second must still get distinct names.
    env = {**os.environ, "MYCLOUD_DATABASE_URL": org.api.backend.url}
    command = [*CLI, "token", "create", "--org", org.name, "--scopes", "read"]
    processes = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=CLI_TIMEOUT) for process in processes]

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    secrets = [stdout.strip() for stdout, _ in outputs]
    assert secrets[0] != secrets[1]
    for secret in secrets:
        with org.api.client(secret) as client:
            assert client.get("/v1/flavors").status_code == 200


@pytest.mark.parametrize("scopes", ["read,delete", ""])
def test_token_create_bad_scopes(scopes: str, tmp_path: Path) -> None:
    # Scopes are checked before the database is opened, so none is needed.
    result = run_cli(f"sqlite:///{tmp_path}/unused.db", "token", "create", "--org", "any",
                     "--scopes", scopes)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Invalid value for '--scopes'" in result.stderr
    assert "read, write, admin" in result.stderr


def test_token_create_zero_expiry(tmp_path: Path) -> None:
    result = run_cli(f"sqlite:///{tmp_path}/unused.db", "token", "create", "--org", "any",
                     "--scopes", "read", "--expires-in", "0")

    assert result.returncode == 2
    assert "Invalid value for '--expires-in'" in result.stderr


def test_token_create_unknown_org(api: ApiServer) -> None:
    name = unique_name("missing")

    result = run_cli(api.backend.url, "token", "create", "--org", name, "--scopes", "read")

    assert result.returncode == 1
    assert result.stdout == ""
    assert f"organization {name!r} not found" in result.stderr


def test_token_create_duplicate_name(org: Org) -> None:
    # make_org already created a token named "read".
    result = run_cli(
        org.api.backend.url, "token", "create", "--org", org.name, "--scopes", "read",
        "--name", "read",
    )

    assert result.returncode == 1
    assert "token 'read' already exists" in result.stderr


def test_token_stored_only_as_hash(org: Org) -> None:
    listed = run_cli(org.api.backend.url, "token", "list", "--org", org.name)

    rows = token_rows(org.api.backend, org.name)
    assert len(rows) == len(org.tokens)
    for secret in org.tokens.values():
        for row in rows:
            for value in row.values():
                assert secret not in str(value)
    hashes = {row["name"]: row["secret_hash"] for row in rows}
    for name, secret in org.tokens.items():
        assert hashes[name] == hashlib.sha256(secret.encode()).hexdigest()
    assert listed.returncode == 0, listed.stderr
    for secret in org.tokens.values():
        assert secret not in listed.stdout
    assert "read  scopes=read  expires=never  active" in listed.stdout.splitlines()


def test_token_secret_length(org: Org) -> None:
    # 43 URL-safe base64 characters carry 258 random bits.
    for secret in org.tokens.values():
        body = secret.removeprefix("mcp_")
        assert len(body) >= 43
        assert re.fullmatch(r"[A-Za-z0-9_-]+", body)
    assert len(set(org.tokens.values())) == len(org.tokens)


# --- token revoke and expiry ----------------------------------------------------------


def test_token_revoke(org: Org) -> None:
    with org.client("read") as client:
        assert client.get("/v1/instances").status_code == 200

        revoke = ["token", "revoke", "--org", org.name, "--name", "read"]
        revoked = run_cli(org.api.backend.url, *revoke)
        response = client.get("/v1/instances")
    again = run_cli(org.api.backend.url, *revoke)

    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout == ""
    assert_invalid_token(response)
    with org.client("rw") as client:
        assert client.get("/v1/instances").status_code == 200
    assert again.returncode == 1
    assert "no active token 'read'" in again.stderr


def test_token_expired_in_database(org: Org) -> None:
    set_token_expiry(org.api.backend, org.name, "read", utcnow() - timedelta(seconds=1))

    with org.client("read") as client:
        response = client.get("/v1/instances")

    assert_invalid_token(response)


def test_token_expires_after_expires_in(org: Org) -> None:
    # 0.000002 days is about 0.17 seconds.
    created = run_cli(
        org.api.backend.url, "token", "create", "--org", org.name, "--scopes", "read",
        "--name", "short-lived", "--expires-in", "0.000002",
    )
    assert created.returncode == 0, created.stderr
    row = next(row for row in token_rows(org.api.backend, org.name) if row["name"] == "short-lived")
    remaining = (row["expires_at"] - utcnow()).total_seconds()
    time.sleep(max(0.0, remaining) + 0.05)

    with org.api.client(created.stdout.strip()) as client:
        response = client.get("/v1/instances")

    assert_invalid_token(response)


# --- authentication headers -----------------------------------------------------------


def test_no_authorization_header(api: ApiServer) -> None:
    with api.client() as client:
        response = client.get("/v1/instances")

    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == 'Bearer realm="mycloud"'


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer two words", "Token abc"]
)
def test_malformed_authorization_header(api: ApiServer, header: str) -> None:
    with api.client() as client:
        response = client.get("/v1/instances", headers={"Authorization": header})

    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith('Bearer realm="mycloud"')


def test_unknown_token(api: ApiServer) -> None:
    with api.client("mcp_" + "A" * 43) as client:
        response = client.get("/v1/instances")

    assert_invalid_token(response)


def test_bearer_scheme_case_insensitive(org: Org) -> None:
    with org.api.client() as client:
        headers = {"Authorization": f"bearer {org.tokens['read']}"}
        response = client.get("/v1/instances", headers=headers)

    assert response.status_code == 200, response.text


# --- scopes ---------------------------------------------------------------------------


def test_read_scope_cannot_write(org: Org) -> None:
    with org.client("rw") as client:
        instance_id = create_instance(client, "scope-target")["id"]

    with org.client("read") as client:
        responses = {
            "POST": client.post("/v1/instances", json={"name": "x"}),
            "PATCH": client.patch(f"/v1/instances/{instance_id}", json={"name": "renamed"}),
            "DELETE": client.delete(f"/v1/instances/{instance_id}"),
        }
        after = client.get(f"/v1/instances/{instance_id}").json()

    for method, response in responses.items():
        error = assert_error(response, 403, "forbidden")
        assert "'write' scope" in error["message"], method
    assert after["name"] == "scope-target"
    assert after["task_state"] != "DELETING"


def test_write_scope_cannot_read(org: Org) -> None:
    with org.client("write") as client:
        instance_id = create_instance(client, "write-only")["id"]
        responses = {
            "list": client.get("/v1/instances"),
            "show": client.get(f"/v1/instances/{instance_id}"),
            "flavors": client.get("/v1/flavors"),
            "images": client.get("/v1/images"),
        }

    for name, response in responses.items():
        error = assert_error(response, 403, "forbidden")
        assert "'read' scope" in error["message"], name


@pytest.mark.parametrize("scopes", ["read", "write", "rw"])
def test_catalog_changes_need_admin(org: Org, scopes: str) -> None:
    flavor = {"name": unique_name("scope-flavor"), "vcpus": 1, "ram": 512, "disk": 1}
    image = {"name": unique_name("scope-image"), "os_distro": "ubuntu", "os_version": "22.04"}
    existing_flavor = str(uuid.uuid4())

    with org.client(scopes) as client:
        responses = [
            client.post("/v1/flavors", json=flavor),
            client.delete(f"/v1/flavors/{existing_flavor}"),
            client.post("/v1/images", json=image),
            client.delete(f"/v1/images/{existing_flavor}"),
        ]

    for response in responses:
        error = assert_error(response, 403, "forbidden")
        assert "'admin' scope" in error["message"]


def test_admin_scope_manages_catalog(org: Org) -> None:
    flavor = {"name": unique_name("admin-flavor"), "vcpus": 1, "ram": 512, "disk": 1}
    image = {"name": unique_name("admin-image"), "os_distro": "ubuntu", "os_version": "22.04"}

    with org.client("admin") as client:
        flavor_created = client.post("/v1/flavors", json=flavor)
        image_created = client.post("/v1/images", json=image)
        flavor_deleted = client.delete(f"/v1/flavors/{flavor_created.json()['id']}")
        image_deleted = client.delete(f"/v1/images/{image_created.json()['id']}")

    assert flavor_created.status_code == 201, flavor_created.text
    assert image_created.status_code == 201, image_created.text
    assert flavor_deleted.status_code == 204, flavor_deleted.text
    assert image_deleted.status_code == 204, image_deleted.text


# --- database and demo commands -------------------------------------------------------


def count_flavors_by_name(backend: Backend) -> dict[str, int]:
    async def read(db: Database) -> dict[str, int]:
        async with db.snapshot() as conn:
            query = (
                select(flavors.c.name, func.count())
                .where(flavors.c.name.in_(DEFAULT_FLAVOR_NAMES))
                .group_by(flavors.c.name)
            )
            return {name: count for name, count in (await conn.execute(query)).all()}

    return backend.run(read)  # type: ignore[no-any-return]


def test_db_upgrade_idempotent(api: ApiServer) -> None:
    # The fixture already migrated this database, so this is the second upgrade.
    result = run_cli(api.backend.url, "db", "upgrade")

    assert result.returncode == 0, result.stderr
    assert "database at revision head" in result.stderr
    assert count_flavors_by_name(api.backend) == {name: 1 for name in DEFAULT_FLAVOR_NAMES}


def test_db_upgrade_fresh_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"

    first = run_cli(url, "db", "upgrade")
    second = run_cli(url, "db", "upgrade")

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    expected = {name: 1 for name in DEFAULT_FLAVOR_NAMES}
    assert count_flavors_by_name(Backend("sqlite", url)) == expected


def parse_demo_output(output: str) -> tuple[str, list[str]]:
    """Return the token and the curl lines that the demo command prints."""
    token_line = next(line for line in output.splitlines() if line.startswith("Token (read, write"))
    curl_lines = [line.strip() for line in output.splitlines() if line.strip().startswith("curl ")]
    return token_line.rsplit(" ", 1)[1], curl_lines


def test_demo_prints_working_token(api: ApiServer) -> None:
    name = unique_name("demo")

    first = run_cli(api.backend.url, "demo", "--org", name, "--url", api.base_url)
    second = run_cli(api.backend.url, "demo", "--org", name, "--url", api.base_url)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    secret, curl_lines = parse_demo_output(first.stdout)
    second_secret, _ = parse_demo_output(second.stdout)
    assert secret != second_secret
    assert f'curl -X GET "{api.base_url}/v1/instances" \\' in curl_lines
    assert f'curl -X POST "{api.base_url}/v1/instances" \\' in curl_lines
    assert f'-H "Authorization: Bearer {secret}" \\' in first.stdout
    # The create line's body, sent as printed, must create an instance.
    body_line = next(
        line.strip() for line in first.stdout.splitlines() if line.strip().startswith("-d '")
    )
    body = body_line.removeprefix("-d '").removesuffix("'")
    with api.client(secret) as client:
        created = client.post(
            "/v1/instances", content=body, headers={"Content-Type": "application/json"}
        )
    with api.client(second_secret) as client:
        listed = client.get("/v1/instances")
    assert created.status_code == 202, created.text
    assert created.json()["name"] == "web-server-01"
    assert listed.status_code == 200, listed.text
    assert [item["id"] for item in listed.json()["instances"]] == [created.json()["id"]]


def test_new_org_starts_empty(api: ApiServer) -> None:
    fresh = make_org(api, "empty")

    with fresh.client("read") as client:
        listed = client.get("/v1/instances").json()

    assert listed["instances"] == []
    assert listed["meta"]["total"] == 0
