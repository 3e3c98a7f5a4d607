"""The `mycloud` command against the real API on SQLite and PostgreSQL, through CliRunner."""

from __future__ import annotations

import csv
import io
import re
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from click.testing import CliRunner, Result
from conftest import Org, free_port
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import CIRROS_IMAGE, SMALL_FLAVOR, TINY_FLAVOR, UBUNTU_IMAGE
from test_instances_list import insert_instances

from mycloud_compute.cli.customer import cli
from mycloud_compute.client import Action, Client, Instance, KeyPair, Network, Volume

README = Path(__file__).resolve().parents[1] / "README.md"
REQUEST_ID = re.compile(r"request id req-[0-9a-f-]+")


def run(org: Org | None, *args: str, token: str | None = None, url: str | None = None,
        config: Path | None = None) -> Result:
    """Run `mycloud ARGS` with the organization's read-write token in the environment."""
    env = {"MYCLOUD_CONFIG": str(config or Path("/nonexistent/mycloud.toml")),
           "MYCLOUD_URL": None, "MYCLOUD_TOKEN": None, "MYCLOUD_PROFILE": None}
    if org is not None:
        env["MYCLOUD_URL"] = url or org.api.base_url
        env["MYCLOUD_TOKEN"] = token or org.tokens["rw"]
    return CliRunner().invoke(cli, list(args), env=env, prog_name="mycloud")


def decode_instances(result: Result) -> list[Instance]:
    assert result.exit_code == 0, result.output + result.stderr
    return msgspec.json.decode(result.stdout, type=list[Instance])


def create_active(org: Org, name: str, **fields: Any) -> Instance:
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        instance = client.instances.create(name, fields.pop("flavor_id", SMALL_FLAVOR),
                                           fields.pop("image_id", UBUNTU_IMAGE), **fields)
        active = client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
    assert active is not None
    return active


# --- instances list -------------------------------------------------------------------------


def test_list_filters_json(org: Org) -> None:
    prefix = f"cli-{uuid.uuid4().hex[:6]}"
    web = create_active(org, f"{prefix}-web", tags=["web", "prod"])
    db = create_active(org, f"{prefix}-db", tags=["db"], flavor_id=TINY_FLAVOR, image_id=CIRROS_IMAGE)
    assert run(org, "instances", "stop", db.id, "-o", "json").exit_code == 0
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        client.instances.wait_for_status(db.id, "SHUTOFF", timeout=30, interval=0.05)

    def ids(*args: str) -> list[str]:
        return [item.id for item in decode_instances(run(org, "instances", "list", "-o", "json", *args))]

    assert ids("--name", f"{prefix}-*") == [db.id, web.id]
    assert ids("--name", f"{prefix}-web") == [web.id]
    assert ids("--name", f"{prefix}-*", "--status", "shutoff") == [db.id]
    assert ids("--name", f"{prefix}-*", "--status", "ACTIVE", "--status", "SHUTOFF") == [db.id, web.id]
    assert ids("--name", f"{prefix}-*", "--tag", "web", "--tag", "prod") == [web.id]
    assert ids("--name", f"{prefix}-*", "--flavor", TINY_FLAVOR) == [db.id]
    assert ids("--name", f"{prefix}-*", "--image", UBUNTU_IMAGE) == [web.id]
    assert ids("--name", f"{prefix}-*", "--limit", "1") == [db.id]
    assert ids("--name", f"{prefix}-*", "--limit", "1", "--marker", db.id) == [web.id]


def test_list_formats_and_columns(org: Org) -> None:
    instance = create_active(org, f"fmt-{uuid.uuid4().hex[:6]}")
    name = instance.name

    table = run(org, "instances", "list", "--name", name, "-o", "table")
    assert table.exit_code == 0, table.stderr
    for header in ("ID", "Name", "Status", "Power State", "Networks", "Image", "Flavor"):
        assert header in table.stdout
    assert instance.id in table.stdout
    assert "private-network=192.168." in table.stdout

    rows = list(csv.reader(io.StringIO(run(org, "instances", "list", "--name", name, "-o", "csv",
                                           "-c", "ID", "-c", "status").stdout)))
    assert rows == [["ID", "Status"], [instance.id, "ACTIVE"]]

    value = run(org, "instances", "list", "--name", name, "-o", "value", "-c", "id")
    assert value.stdout == f"{instance.id}\n"

    loaded = yaml.safe_load(run(org, "instances", "list", "--name", name, "-o", "yaml").stdout)
    assert loaded[0]["id"] == instance.id
    assert loaded[0]["power_state"] == "RUNNING"

    selected = run(org, "instances", "list", "--name", name, "-o", "json", "-c", "Name", "-c", "Flavor")
    assert msgspec.json.decode(selected.stdout) == [{"name": name, "flavor": "m1.small"}]


def test_list_all_pages_over_1000(org: Org) -> None:
    prefix = f"bulk-{uuid.uuid4().hex[:6]}"
    ids = insert_instances(org, [{"name": f"{prefix}-{index:04d}"} for index in range(1050)])
    started = time.monotonic()
    result = run(org, "instances", "list", "--name", f"{prefix}-*", "--all", "-o", "value", "-c", "id")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == list(reversed(ids))
    assert time.monotonic() - started < 20

    first_page = run(org, "instances", "list", "--name", f"{prefix}-*", "-o", "value", "-c", "id")
    assert len(first_page.stdout.split()) == 20


# --- instances show, act, update, delete ------------------------------------------------------


def test_create_show_act_delete(org: Org, tmp_path: Path) -> None:
    created = run(org, "instances", "create", "cli-life", "--flavor", "m1.small", "--image",
                  "Ubuntu 22.04 LTS", "--tag", "web", "--property", "role=web", "--wait", "-o", "json")
    assert created.exit_code == 0, created.stderr
    instance = msgspec.json.decode(created.stdout, type=Instance)
    assert instance.status == "ACTIVE"
    assert instance.metadata == {"role": "web"}
    assert "task_state=" in created.stderr

    shown = run(org, "instances", "show", instance.id, "-o", "json")
    assert msgspec.json.decode(shown.stdout, type=Instance).id == instance.id
    field_table = run(org, "instances", "show", instance.id, "-o", "table")
    assert "power_state" in field_table.stdout
    assert "RUNNING" in field_table.stdout

    stop = run(org, "instances", "stop", instance.id, "-o", "json")
    assert stop.exit_code == 0, stop.stderr
    action = msgspec.json.decode(stop.stdout, type=Action)
    assert action.action == "stop"
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        client.instances.wait_for_status(instance.id, "SHUTOFF", timeout=30, interval=0.05)
    assert run(org, "instances", "start", instance.id).exit_code == 0
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
    assert run(org, "instances", "reboot", "--hard", instance.id).exit_code == 0

    history = run(org, "instances", "actions", instance.id, "-o", "json")
    records = msgspec.json.decode(history.stdout, type=list[Action])
    assert [record.action for record in records] == ["reboot", "start", "stop", "create"]

    with Client(org.api.base_url, org.tokens["rw"]) as client:
        client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
    updated = run(org, "instances", "update", instance.id, "--name", "cli-life-2", "--no-tags", "-o", "json")
    assert msgspec.json.decode(updated.stdout, type=Instance).tags == []

    deleted = run(org, "instances", "delete", instance.id, "--wait")
    assert deleted.exit_code == 0, deleted.stderr
    gone = run(org, "instances", "show", instance.id)
    assert gone.exit_code == 3
    assert "not found" in gone.stderr


def test_resize_confirm(org: Org) -> None:
    instance = create_active(org, "cli-resize")
    assert run(org, "instances", "resize", instance.id, "m1.medium").exit_code == 0
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        client.instances.wait_for_status(instance.id, "VERIFY_RESIZE", timeout=30, interval=0.05)
        assert run(org, "instances", "confirm-resize", instance.id).exit_code == 0
        resized = client.instances.wait_for_status(instance.id, "ACTIVE", timeout=30, interval=0.05)
    assert resized is not None
    assert resized.flavor.name == "m1.medium"


# --- other resources --------------------------------------------------------------------------


def test_resource_commands(org: Org, tmp_path: Path) -> None:
    flavors = run(org, "flavors", "list", "-o", "value", "-c", "name")
    assert "m1.small" in flavors.stdout.split()
    assert "Ubuntu 22.04 LTS" in run(org, "images", "show", UBUNTU_IMAGE, "-o", "json").stdout

    network = msgspec.json.decode(
        run(org, "networks", "create", "cli-net", "--cidr", "10.30.0.0/24", "-o", "json").stdout, type=Network)
    assert network.id in run(org, "networks", "list", "-o", "value", "-c", "id").stdout
    assert run(org, "networks", "delete", network.id).exit_code == 0

    key_file = tmp_path / "id_ed25519.pub"
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    key_file.write_text(key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode() + " me@host\n")
    created_key = run(org, "keypairs", "create", "cli-key", "--public-key-file", str(key_file), "-o", "json")
    assert created_key.exit_code == 0, created_key.stderr
    assert msgspec.json.decode(created_key.stdout, type=KeyPair).fingerprint.startswith("SHA256:")
    assert run(org, "keypairs", "show", "cli-key", "-o", "value", "-c", "type").stdout == "ssh-ed25519\n"
    assert run(org, "keypairs", "delete", "cli-key").exit_code == 0

    group = run(org, "security-groups", "create", "cli-web", "--rule",
                "direction=ingress,protocol=tcp,port=80-81,remote=10.0.0.0/8", "-o", "json")
    assert group.exit_code == 0, group.stderr
    group_body = msgspec.json.decode(group.stdout)
    assert group_body["rules"][0]["port_range_max"] == 81
    assert run(org, "security-groups", "delete", group_body["id"]).exit_code == 0

    volume = msgspec.json.decode(
        run(org, "volumes", "create", "cli-vol", "--size", "2", "-o", "json").stdout, type=Volume)
    assert volume.size_gb == 2
    assert run(org, "volumes", "delete", volume.id).exit_code == 0


# --- configuration, errors and exit codes -----------------------------------------------------


def test_profile_from_config_file(org: Org, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[staging]\nurl = "{org.api.base_url}"\ntoken = "{org.tokens["read"]}"\n')
    result = run(None, "--profile", "staging", "flavors", "list", "-o", "value", "-c", "name", config=config)
    assert result.exit_code == 0, result.stderr
    assert "m1.tiny" in result.stdout

    missing = run(None, "--profile", "prod", "flavors", "list", config=config)
    assert missing.exit_code == 2
    assert "profile 'prod' not found" in missing.stderr


def test_bad_token_exit_3(org: Org) -> None:
    result = run(org, "instances", "list", token="mcp_not-a-token")
    assert result.exit_code == 3
    assert "unauthorized" in result.stderr
    assert REQUEST_ID.search(result.stderr), result.stderr


def test_bad_filter_exit_3(org: Org) -> None:
    result = run(org, "instances", "list", "--status", "SLEEPING")
    assert result.exit_code == 3
    assert "status" in result.stderr
    assert REQUEST_ID.search(result.stderr), result.stderr


def test_server_down_exit_4(org: Org) -> None:
    result = run(org, "instances", "list", url=f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == 4
    assert "cannot reach the API" in result.stderr


@pytest.mark.parametrize("args", [
    ["instances", "list", "--bogus"],
    ["instances", "list", "-o", "xml"],
    ["instances", "show"],
    ["instances", "list", "-c", "Nope"],
])
def test_usage_error_exit_2(org: Org, args: list[str]) -> None:
    result = run(org, *args)
    assert result.exit_code == 2, result.stdout + result.stderr


def test_missing_url_exit_2() -> None:
    result = run(None, "instances", "list")
    assert result.exit_code == 2
    assert "MYCLOUD_URL" in result.stderr


# --- README example ---------------------------------------------------------------------------


def test_readme_client_example(org: Org, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The Python example of the README's Client section runs as written."""
    section = README.read_text().split("## Client", 1)[1].split("\n## ", 1)[0]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    create_active(org, "readme-web-1")
    monkeypatch.setenv("MYCLOUD_URL", org.api.base_url)
    monkeypatch.setenv("MYCLOUD_TOKEN", org.tokens["rw"])
    exec(compile(example, "README.md", "exec"), {})
    assert "readme-web-1 ACTIVE" in capsys.readouterr().out


# --- regressions from a first user's session --------------------------------------------


def test_private_key_refused_before_request(tmp_path: Path) -> None:
    """The private half of a key pair used to be uploaded before the server refused it."""
    key_file = tmp_path / "id_ed25519"
    key_file.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    # Nothing listens on this port, so any request would end in exit 4, not 2.
    dead_url = f"http://127.0.0.1:{free_port()}"
    result = run(None, "--url", dead_url, "--token", "unused",
                 "keypairs", "create", "k", "--public-key-file", str(key_file))
    assert result.exit_code == 2, result.output
    assert "private key" in result.output


def test_list_says_when_more_pages(org: Org) -> None:
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        for number in range(3):
            client.instances.create(name=f"page-{number}", flavor_id=TINY_FLAVOR, image_id=CIRROS_IMAGE)
    result = run(org, "instances", "list", "--limit", "2", "-o", "json")
    assert result.exit_code == 0, result.output
    assert "Showing 2 of 3; use --all" in result.stderr
    assert len(msgspec.json.decode(result.stdout)) == 2


def test_delete_continues_after_bad_id(org: Org) -> None:
    """One unknown id stopped the loop and left the following instances running."""
    with Client(org.api.base_url, org.tokens["rw"]) as client:
        first = client.instances.create(name="first", flavor_id=TINY_FLAVOR, image_id=CIRROS_IMAGE)
        last = client.instances.create(name="last", flavor_id=TINY_FLAVOR, image_id=CIRROS_IMAGE)
    unknown = str(uuid.UUID(int=5))
    result = run(org, "instances", "delete", str(first.id), unknown, str(last.id))
    assert result.exit_code == 3, result.output
    assert f"Delete of {last.id} accepted." in result.stderr
    assert f"{unknown}: instance {unknown} not found" in result.stderr


def test_url_without_scheme_is_usage_error(org: Org) -> None:
    result = run(org, "instances", "list", url="127.0.0.1:8093")
    assert result.exit_code == 2, result.output
    assert "http://" in result.output
