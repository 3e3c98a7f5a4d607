"""``mycloud``: the customers' command line, built on the SDK in mycloud_compute.client.

Settings come from flags first, then the MYCLOUD_URL / MYCLOUD_TOKEN environment
variables, then a profile of ``<user config dir>/mycloud/config.toml``.
Exit codes: 0 success, 1 a wait that timed out or ended in ERROR, 2 usage or
configuration error, 3 API error, 4 connection failure.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tomllib
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec
import platformdirs
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from mycloud_compute.client import (
    Action,
    APIError,
    Client,
    Collection,
    ConnectionFailed,
    Instance,
    InstanceFailed,
    Page,
    WaitTimeout,
)

EXIT_WAIT_FAILED = 1
EXIT_USAGE = 2
EXIT_API_ERROR = 3
EXIT_CONNECTION_FAILED = 4

FORMATS = ["table", "json", "yaml", "csv", "value"]
CONFIG_VARIABLE = "MYCLOUD_CONFIG"
PROFILE_VARIABLE = "MYCLOUD_PROFILE"
DEFAULT_PROFILE = "default"
# Page size of --all: the API's maximum limit, so a walk needs the fewest requests.
MAX_PAGE_SIZE = 1000
# Width of tables written to a pipe or file, wide enough for UUIDs in several columns.
PIPE_TABLE_WIDTH = 250


# --- configuration ---------------------------------------------------------------------


def config_path() -> Path:
    """Return the profile file: MYCLOUD_CONFIG, or config.toml in the user config dir."""
    override = os.environ.get(CONFIG_VARIABLE)
    if override:
        return Path(override)
    return Path(platformdirs.user_config_dir("mycloud")) / "config.toml"


def load_profile(name: str | None) -> dict[str, str]:
    """Read one profile (a TOML table with ``url`` and ``token``) from the profile file.

    A missing file or a missing ``default`` profile gives an empty profile; a profile
    that was asked for by name must exist.
    """
    path = config_path()
    requested = name or os.environ.get(PROFILE_VARIABLE) or DEFAULT_PROFILE
    explicit = name is not None or PROFILE_VARIABLE in os.environ
    try:
        profiles = tomllib.loads(path.read_text())
    except FileNotFoundError:
        profiles = {}
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise click.UsageError(f"cannot read the profile file {path}: {error}") from error

    profile = profiles.get(requested)
    if profile is None:
        if explicit:
            raise click.UsageError(f"profile {requested!r} not found in {path}")
        return {}
    if not isinstance(profile, dict):
        raise click.UsageError(f"profile {requested!r} in {path} must be a table with url and token")
    return {key: str(value) for key, value in profile.items() if key in ("url", "token")}


@dataclass
class Settings:
    url: str | None
    token: str | None
    profile: str | None
    timeout: float
    _client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            profile = load_profile(self.profile)
            url = self.url or os.environ.get("MYCLOUD_URL") or profile.get("url")
            token = self.token or os.environ.get("MYCLOUD_TOKEN") or profile.get("token")
            if not url:
                raise click.UsageError(
                    f"no API URL: pass --url, set MYCLOUD_URL or add url to a profile in {config_path()}")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise click.UsageError(f"the API URL must start with http:// or https://, got {url!r}")
            if not isinstance(token, str) or not token:
                raise click.UsageError(
                    f"no API token: set MYCLOUD_TOKEN, pass --token or add token to a profile in {config_path()}")
            self._client = Client(url, token, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_settings = click.make_pass_decorator(Settings)


# --- output ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a list: its header, the field name used by -c and JSON, and its value."""

    header: str
    key: str
    value: Callable[[Any], Any]


def field(header: str, key: str) -> Column:
    return Column(header, key, lambda item: getattr(item, key))


def format_addresses(instance: Instance) -> str:
    return "; ".join(
        f"{network}={', '.join(address.addr for address in addresses)}"
        for network, addresses in sorted(instance.addresses.items())
    )


INSTANCE_COLUMNS = [
    field("ID", "id"),
    field("Name", "name"),
    field("Status", "status"),
    field("Power State", "power_state"),
    Column("Networks", "networks", format_addresses),
    Column("Image", "image", lambda instance: instance.image.name),
    Column("Flavor", "flavor", lambda instance: instance.flavor.name),
]
ACTION_COLUMNS = [
    field("ID", "id"),
    field("Action", "action"),
    field("Status", "status"),
    field("Request ID", "request_id"),
    field("Started", "started_at"),
    field("Finished", "finished_at"),
    field("Message", "message"),
]
FLAVOR_COLUMNS = [
    field("ID", "id"), field("Name", "name"), field("RAM", "ram"), field("Disk", "disk"),
    field("VCPUs", "vcpus"), field("Is Public", "is_public"),
]
IMAGE_COLUMNS = [
    field("ID", "id"), field("Name", "name"), field("Status", "status"),
    field("OS Distro", "os_distro"), field("OS Version", "os_version"),
]
NETWORK_COLUMNS = [field("ID", "id"), field("Name", "name"), field("CIDR", "cidr")]
KEYPAIR_COLUMNS = [field("Name", "name"), field("Fingerprint", "fingerprint"), field("Type", "type")]
SECURITY_GROUP_COLUMNS = [
    field("ID", "id"), field("Name", "name"), field("Description", "description"),
    Column("Rules", "rules", lambda group: len(group.rules)),
]
VOLUME_COLUMNS = [
    field("ID", "id"), field("Name", "name"), field("Status", "status"), field("Size", "size_gb"),
    Column("Attached to", "attachments",
           lambda volume: ", ".join(f"{a.instance_id} on {a.device}" for a in volume.attachments)),
]


def select_columns(columns: Sequence[Column], requested: Sequence[str]) -> list[Column]:
    """Pick the -c columns by header or field name, case-insensitively, in the given order."""
    if not requested:
        return list(columns)
    by_name = {name.lower(): column for column in columns for name in (column.header, column.key)}
    selected = []
    for name in requested:
        column = by_name.get(name.lower())
        if column is None:
            choices = ", ".join(column.header for column in columns)
            raise click.UsageError(f"unknown column {name!r}. Choose from: {choices}")
        selected.append(column)
    return selected


def default_format() -> str:
    return "table" if sys.stdout.isatty() else "json"


def text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    builtins = msgspec.to_builtins(value)
    return builtins if isinstance(builtins, str) else json.dumps(builtins)


def console() -> Console:
    return Console(width=None if sys.stdout.isatty() else PIPE_TABLE_WIDTH, soft_wrap=False)


def emit(data: Any) -> None:
    """Write JSON or YAML built-ins already rendered to text."""
    click.echo(data, nl=not data.endswith("\n"))


def print_list(items: Iterable[Any], columns: Sequence[Column], output: str | None, requested: Sequence[str]) -> None:
    """Print items in the chosen format; JSON and YAML hold whole objects unless -c is given."""
    output = output or default_format()
    selected = select_columns(columns, requested)
    items = list(items)

    if output in ("json", "yaml"):
        if requested:
            data: Any = [{column.key: msgspec.to_builtins(column.value(item)) for column in selected}
                         for item in items]
        else:
            data = msgspec.to_builtins(items)
        emit(dump(data, output))
        return

    rows = [[text(column.value(item)) for column in selected] for item in items]
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([column.header for column in selected])
        writer.writerows(rows)
        emit(buffer.getvalue())
    elif output == "value":
        for row in rows:
            click.echo(" ".join(row))
    else:
        table = Table(*(column.header for column in selected))
        for row in rows:
            table.add_row(*row)
        console().print(table)


def print_item(item: Any, output: str | None, requested: Sequence[str]) -> None:
    """Print one object: a Field/Value table, or the object as JSON, YAML, CSV or values."""
    output = output or default_format()
    data: dict[str, Any] = msgspec.to_builtins(item)
    if requested:
        missing = [name for name in requested if name not in data]
        if missing:
            raise click.UsageError(f"unknown column {missing[0]!r}. Choose from: {', '.join(data)}")
        data = {name: data[name] for name in requested}

    if output in ("json", "yaml"):
        emit(dump(data, output))
    elif output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(list(data))
        writer.writerow([text(value) for value in data.values()])
        emit(buffer.getvalue())
    elif output == "value":
        for value in data.values():
            click.echo(text(value))
    else:
        table = Table("Field", "Value")
        for name, value in data.items():
            table.add_row(name, text(value))
        console().print(table)


def dump(data: Any, output: str) -> str:
    if output == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return json.dumps(data, indent=2, ensure_ascii=False)


output_option = click.option(
    "-o", "--output", type=click.Choice(FORMATS), default=None,
    help="Output format [default: table on a terminal, json otherwise].",
)
column_option = click.option(
    "-c", "--column", "columns", multiple=True, metavar="NAME",
    help="Show only this column (header or field name); repeat for several.",
)


def fetch_pages(
    list_page: Callable[..., Page[Any]],
    filters: dict[str, Any],
    limit: int | None,
    marker: str | None,
    walk_all: bool,
) -> list[Any]:
    """Fetch one page, or with ``walk_all`` every page, showing progress on a terminal."""
    if not walk_all:
        page = list_page(limit=limit, marker=marker, **filters)
        if page.meta.has_more:
            click.echo(
                f"Showing {len(page.items)} of {page.meta.total}; use --all, or --marker "
                f"{page.meta.marker} for the next page.",
                err=True,
            )
        return page.items

    items: list[Any] = []
    page_size = limit or MAX_PAGE_SIZE
    with Progress(console=Console(stderr=True), disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task("Listing", total=None)
        while True:
            page = list_page(limit=page_size, marker=marker, **filters)
            items.extend(page.items)
            progress.update(task, total=page.meta.total, completed=len(items))
            if not page.meta.has_more:
                return items
            marker = page.meta.marker


# --- the command group and its error handling ------------------------------------------


class ApiGroup(click.Group):
    """A command group that turns SDK errors into a message on stderr and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as error:
            click.echo(f"Error: {error.message} (HTTP {error.status} {error.type}, "
                       f"request id {error.request_id})", err=True)
            ctx.exit(EXIT_API_ERROR)
        except ConnectionFailed as error:
            click.echo(f"Error: cannot reach the API: {error}", err=True)
            ctx.exit(EXIT_CONNECTION_FAILED)
        except (WaitTimeout, InstanceFailed) as error:
            click.echo(f"Error: {error}", err=True)
            ctx.exit(EXIT_WAIT_FAILED)


@click.group(cls=ApiGroup)
@click.option("--url", envvar="MYCLOUD_URL", help="API base URL, e.g. https://api.spo1.mycloud.com [env MYCLOUD_URL].")
@click.option("--token", envvar="MYCLOUD_TOKEN",
              help="API token [env MYCLOUD_TOKEN]. Prefer the variable or a profile: "
                   "other users can see command-line arguments.")
@click.option("--profile", default=None,
              help=f"Profile of the config file to use [env {PROFILE_VARIABLE}; default 'default'].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Timeout of each HTTP request, in seconds.")
@click.version_option(package_name="mycloud-compute")
@click.pass_context
def cli(ctx: click.Context, url: str | None, token: str | None, profile: str | None, timeout: float) -> None:
    """Manage mycloud Compute instances and the resources around them.

    Profiles live in the file that MYCLOUD_CONFIG names, by default
    config.toml in the user config directory's mycloud folder, as TOML tables:

    \b
        [default]
        url = "https://api.spo1.mycloud.com"
        token = "mcp_..."
    """
    ctx.obj = Settings(url, token, profile, timeout)
    ctx.call_on_close(ctx.obj.close)


# --- instances -------------------------------------------------------------------------


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def resolve_by_name(collection: Collection[Any], kind: str, value: str) -> str:
    """Return the id of a flavor, image, network or security group given by id or name."""
    if is_uuid(value):
        return value
    matches = [item.id for item in collection.iter() if item.name == value]
    if not matches:
        raise click.UsageError(f"{kind} {value!r} not found; give its name or id")
    if len(matches) > 1:
        raise click.UsageError(f"{kind} name {value!r} is ambiguous; give its id")
    return str(matches[0])


def parse_properties(values: Sequence[str]) -> dict[str, str]:
    properties = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint="--property")
        properties[key] = item
    return properties


def wait_and_report(client: Client, instance_id: str, status: str, timeout: float) -> Instance | None:
    """Wait for ``status`` and print each new (status, task_state) pair to stderr."""
    last: list[tuple[str, str | None]] = []

    def report(instance: Instance) -> None:
        state = (instance.status, instance.task_state)
        if not last or last[-1] != state:
            last.append(state)
            click.echo(f"{instance.id}: {instance.status} task_state={instance.task_state or '-'}", err=True)

    return client.instances.wait_for_status(instance_id, status, timeout=timeout, interval=0.5, on_poll=report)


@cli.group()
def instances() -> None:
    """List, create, change, act on and delete instances."""


@instances.command("list")
@click.option("--name", help="Exact name; a trailing * matches a prefix (web-*).")
@click.option("--status", multiple=True, help="Status, case-insensitive; repeat or use commas for any of several.")
@click.option("--tag", "tags", multiple=True, help="Tag the instance must have; repeat for all of several.")
@click.option("--flavor", "flavor_id", metavar="FLAVOR_ID", help="Id of the flavor the instance runs.")
@click.option("--image", "image_id", metavar="IMAGE_ID", help="Id of the image the instance was built from.")
@click.option("--limit", type=int, help="Instances per page (1 to 1000; the API's default is 20).")
@click.option("--marker", help="Id of the last instance of the previous page.")
@click.option("--all", "walk_all", is_flag=True, help="Fetch every page (--limit sets the page size).")
@output_option
@column_option
@pass_settings
def instances_list(settings: Settings, name: str | None, status: tuple[str, ...], tags: tuple[str, ...],
                   flavor_id: str | None, image_id: str | None, limit: int | None, marker: str | None,
                   walk_all: bool, output: str | None, columns: tuple[str, ...]) -> None:
    """List instances, newest first, like `openstack server list`."""
    filters = {
        "name": name,
        "status": ",".join(status) if status else None,
        "tags": ",".join(tags) if tags else None,
        "flavor_id": flavor_id,
        "image_id": image_id,
    }
    client = settings.client()
    items = fetch_pages(client.instances.list_page, filters, limit, marker, walk_all)
    print_list(items, INSTANCE_COLUMNS, output, columns)


@instances.command("show")
@click.argument("instance_id")
@output_option
@column_option
@pass_settings
def instances_show(settings: Settings, instance_id: str, output: str | None, columns: tuple[str, ...]) -> None:
    """Show one instance."""
    print_item(settings.client().instances.get(instance_id), output, columns)


@instances.command("create")
@click.argument("name")
@click.option("--flavor", required=True, help="Flavor name or id.")
@click.option("--image", required=True, help="Image name or id.")
@click.option("--description", default=None, help="Free text, at most 1024 characters.")
@click.option("--network", "networks", multiple=True, help="Network name or id; repeat for several.")
@click.option("--key-name", "key_names", multiple=True, help="Key pair name; repeat for several.")
@click.option("--security-group", "security_groups", multiple=True, help="Security group name; repeat for several.")
@click.option("--tag", "tags", multiple=True, help="Tag; repeat for several.")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE", help="Metadata entry; repeat for several.")
@click.option("--volume-size", "volume_sizes", multiple=True, type=click.IntRange(min=1), metavar="GIB",
              help="Create and attach a new volume of this size; repeat for several.")
@click.option("--wait", is_flag=True, help="Wait until the instance is ACTIVE, printing its task states.")
@click.option("--wait-timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
@output_option
@column_option
@pass_settings
def instances_create(settings: Settings, name: str, flavor: str, image: str, description: str | None,
                     networks: tuple[str, ...], key_names: tuple[str, ...], security_groups: tuple[str, ...],
                     tags: tuple[str, ...], properties: tuple[str, ...], volume_sizes: tuple[int, ...],
                     wait: bool, wait_timeout: float, output: str | None, columns: tuple[str, ...]) -> None:
    """Create an instance NAME."""
    client = settings.client()
    instance = client.instances.create(
        name,
        resolve_by_name(client.flavors, "flavor", flavor),
        resolve_by_name(client.images, "image", image),
        description=description,
        networks=[resolve_by_name(client.networks, "network", item) for item in networks] or None,
        key_names=list(key_names) or None,
        security_groups=list(security_groups) or None,
        tags=list(tags) or None,
        metadata=parse_properties(properties) or None,
        volumes=[{"size_gb": size, "delete_on_termination": True} for size in volume_sizes] or None,
    )
    if wait:
        instance = wait_and_report(client, instance.id, "ACTIVE", wait_timeout) or instance
    print_item(instance, output, columns)


@instances.command("update")
@click.argument("instance_id")
@click.option("--name", help="New name.")
@click.option("--description", help="New description.")
@click.option("--tag", "tags", multiple=True, help="Tag; the given tags replace all tags.")
@click.option("--no-tags", is_flag=True, help="Remove every tag.")
@click.option("--property", "properties", multiple=True, metavar="KEY=VALUE",
              help="Metadata entry; the given entries replace all metadata.")
@output_option
@column_option
@pass_settings
def instances_update(settings: Settings, instance_id: str, name: str | None, description: str | None,
                     tags: tuple[str, ...], no_tags: bool, properties: tuple[str, ...],
                     output: str | None, columns: tuple[str, ...]) -> None:
    """Change an instance's name, description, tags or metadata."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if description is not None:
        changes["description"] = description
    if tags or no_tags:
        changes["tags"] = list(tags)
    if properties:
        changes["metadata"] = parse_properties(properties)
    if not changes:
        raise click.UsageError("nothing to change: give --name, --description, --tag, --no-tags or --property")
    print_item(settings.client().instances.update(instance_id, **changes), output, columns)


@instances.command("delete")
@click.argument("instance_ids", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="Wait until each instance is DELETED, printing its task states.")
@click.option("--wait-timeout", type=float, default=600.0, show_default=True, help="Seconds --wait waits.")
@pass_settings
def instances_delete(settings: Settings, instance_ids: tuple[str, ...], wait: bool, wait_timeout: float) -> None:
    """Delete one or more instances."""
    client = settings.client()
    accepted: list[str] = []
    failures: list[APIError] = []
    for instance_id in instance_ids:
        try:
            client.instances.delete(instance_id)
        except APIError as error:
            # Keep going: one bad id must not leave the other instances running.
            click.echo(f"Error: {instance_id}: {error.message} (HTTP {error.status} "
                       f"{error.type}, request id {error.request_id})", err=True)
            failures.append(error)
            continue
        click.echo(f"Delete of {instance_id} accepted.", err=True)
        accepted.append(instance_id)
    if wait:
        for instance_id in accepted:
            wait_and_report(client, instance_id, "DELETED", wait_timeout)
    if failures:
        click.get_current_context().exit(EXIT_API_ERROR)


def action_command(name: str, help_text: str, run: Callable[[Client, str], Action]) -> None:
    @instances.command(name, help=help_text)
    @click.argument("instance_id")
    @output_option
    @column_option
    @pass_settings
    def command(settings: Settings, instance_id: str, output: str | None, columns: tuple[str, ...]) -> None:
        print_item(run(settings.client(), instance_id), output, columns)


action_command("start", "Start a stopped instance.", lambda client, id_: client.instances.start(id_))
action_command("stop", "Stop a running instance.", lambda client, id_: client.instances.stop(id_))
action_command("confirm-resize", "Confirm a resize (VERIFY_RESIZE).",
               lambda client, id_: client.instances.confirm_resize(id_))
action_command("revert-resize", "Revert a resize (VERIFY_RESIZE) to the old flavor.",
               lambda client, id_: client.instances.revert_resize(id_))


@instances.command("reboot")
@click.argument("instance_id")
@click.option("--hard", is_flag=True, help="Power-cycle the VM instead of rebooting through the guest OS.")
@output_option
@column_option
@pass_settings
def instances_reboot(settings: Settings, instance_id: str, hard: bool, output: str | None,
                     columns: tuple[str, ...]) -> None:
    """Reboot an instance (SOFT unless --hard)."""
    print_item(settings.client().instances.reboot(instance_id, hard=hard), output, columns)


@instances.command("resize")
@click.argument("instance_id")
@click.argument("flavor")
@output_option
@column_option
@pass_settings
def instances_resize(settings: Settings, instance_id: str, flavor: str, output: str | None,
                     columns: tuple[str, ...]) -> None:
    """Resize an instance to FLAVOR (name or id); confirm or revert it afterwards."""
    client = settings.client()
    flavor_id = resolve_by_name(client.flavors, "flavor", flavor)
    print_item(client.instances.resize(instance_id, flavor_id), output, columns)


@instances.command("actions")
@click.argument("instance_id")
@click.option("--limit", type=int, help="Records per page (1 to 1000).")
@click.option("--marker", help="Id of the last record of the previous page.")
@click.option("--all", "walk_all", is_flag=True, help="Fetch every page.")
@output_option
@column_option
@pass_settings
def instances_actions(settings: Settings, instance_id: str, limit: int | None, marker: str | None,
                      walk_all: bool, output: str | None, columns: tuple[str, ...]) -> None:
    """List an instance's action history, newest first."""
    client = settings.client()

    def list_page(**params: Any) -> Page[Action]:
        return client.instances.actions(instance_id, **params)

    print_list(fetch_pages(list_page, {}, limit, marker, walk_all), ACTION_COLUMNS, output, columns)


# --- catalog and organization resources ------------------------------------------------


def resource_group(
    name: str,
    help_text: str,
    collection: Callable[[Client], Collection[Any]],
    table_columns: list[Column],
    id_name: str = "ID",
) -> click.Group:
    """Build a command group with list, show and delete for one kind of resource."""
    group = click.Group(name, help=help_text)

    @group.command("list")
    @click.option("--limit", type=int, help="Items per page (1 to 1000).")
    @click.option("--marker", help=f"{id_name} of the last item of the previous page.")
    @click.option("--all", "walk_all", is_flag=True, help="Fetch every page.")
    @output_option
    @column_option
    @pass_settings
    def list_command(settings: Settings, limit: int | None, marker: str | None, walk_all: bool,
                     output: str | None, columns: tuple[str, ...]) -> None:
        """List the items."""
        items = fetch_pages(collection(settings.client()).list_page, {}, limit, marker, walk_all)
        print_list(items, table_columns, output, columns)

    @group.command("show")
    @click.argument("item_id", metavar=id_name)
    @output_option
    @column_option
    @pass_settings
    def show_command(settings: Settings, item_id: str, output: str | None, columns: tuple[str, ...]) -> None:
        """Show one item."""
        print_item(collection(settings.client()).get(item_id), output, columns)

    @group.command("delete")
    @click.argument("item_ids", nargs=-1, required=True, metavar=f"{id_name}...")
    @pass_settings
    def delete_command(settings: Settings, item_ids: tuple[str, ...]) -> None:
        """Delete one or more items."""
        for item_id in item_ids:
            collection(settings.client()).delete(item_id)

    cli.add_command(group)
    return group


flavors = resource_group("flavors", "Flavors: vCPUs, RAM (MiB) and disk (GiB) of an instance.",
                         lambda client: client.flavors, FLAVOR_COLUMNS)
images = resource_group("images", "Images that instances boot from.", lambda client: client.images, IMAGE_COLUMNS)
networks = resource_group("networks", "The organization's networks.", lambda client: client.networks,
                          NETWORK_COLUMNS)
keypairs = resource_group("keypairs", "OpenSSH public keys for instances.", lambda client: client.keypairs,
                          KEYPAIR_COLUMNS, id_name="NAME")
security_groups = resource_group("security-groups", "Security groups and their rules.",
                                 lambda client: client.security_groups, SECURITY_GROUP_COLUMNS)
volumes = resource_group("volumes", "Block storage volumes.", lambda client: client.volumes, VOLUME_COLUMNS)


@flavors.command("create")
@click.argument("name")
@click.option("--vcpus", type=int, required=True, help="Number of virtual CPUs.")
@click.option("--ram", type=int, required=True, help="RAM in MiB.")
@click.option("--disk", type=int, required=True, help="Root disk in GiB.")
@click.option("--private", is_flag=True, help="Hide the flavor from the public catalog.")
@output_option
@column_option
@pass_settings
def flavors_create(settings: Settings, name: str, vcpus: int, ram: int, disk: int, private: bool,
                   output: str | None, columns: tuple[str, ...]) -> None:
    """Create a flavor (needs a token with the admin scope)."""
    flavor = settings.client().flavors.create(name=name, vcpus=vcpus, ram=ram, disk=disk, is_public=not private)
    print_item(flavor, output, columns)


@images.command("create")
@click.argument("name")
@click.option("--os-distro", required=True, help="Distribution, e.g. ubuntu.")
@click.option("--os-version", required=True, help="Distribution version, e.g. 22.04.")
@click.option("--min-disk", type=int, default=0, show_default=True, help="Smallest root disk, in GiB.")
@click.option("--min-ram", type=int, default=0, show_default=True, help="Smallest RAM, in MiB.")
@output_option
@column_option
@pass_settings
def images_create(settings: Settings, name: str, os_distro: str, os_version: str, min_disk: int, min_ram: int,
                  output: str | None, columns: tuple[str, ...]) -> None:
    """Create an image entry (needs a token with the admin scope)."""
    image = settings.client().images.create(name=name, os_distro=os_distro, os_version=os_version,
                                            min_disk=min_disk, min_ram=min_ram)
    print_item(image, output, columns)


@networks.command("create")
@click.argument("name")
@click.option("--cidr", required=True, help="Address range, e.g. 10.0.0.0/24 or fd00::/64.")
@output_option
@column_option
@pass_settings
def networks_create(settings: Settings, name: str, cidr: str, output: str | None, columns: tuple[str, ...]) -> None:
    """Create a network."""
    print_item(settings.client().networks.create(name=name, cidr=cidr), output, columns)


@keypairs.command("create")
@click.argument("name")
@click.option("--public-key-file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="OpenSSH public key file, e.g. ~/.ssh/id_ed25519.pub.")
@output_option
@column_option
@pass_settings
def keypairs_create(settings: Settings, name: str, public_key_file: Path, output: str | None,
                    columns: tuple[str, ...]) -> None:
    """Import the public key of a key pair NAME."""
    public_key = public_key_file.read_text().strip()
    if "PRIVATE KEY" in public_key:
        # Refused before any request: the private key must never leave this machine.
        raise click.BadParameter(
            f"{public_key_file} contains a private key; pass the public key (the .pub file)",
            param_hint="--public-key-file",
        )
    print_item(settings.client().keypairs.create(name=name, public_key=public_key), output, columns)


def parse_rule(value: str) -> dict[str, Any]:
    """Parse ``direction=ingress,protocol=tcp,port=22,remote=10.0.0.0/8`` into a rule body."""
    rule: dict[str, Any] = {}
    for part in value.split(","):
        key, sep, item = part.partition("=")
        key = key.strip()
        if not sep or key not in ("direction", "protocol", "port", "remote"):
            raise click.BadParameter(
                f"expected direction=...,protocol=...,port=N[-M],remote=CIDR, got {value!r}", param_hint="--rule")
        if key == "port":
            low, _, high = item.partition("-")
            try:
                rule["port_range_min"], rule["port_range_max"] = int(low), int(high or low)
            except ValueError as error:
                raise click.BadParameter(f"port must be N or N-M, got {item!r}", param_hint="--rule") from error
        elif key == "remote":
            rule["remote_ip_prefix"] = item
        else:
            rule[key] = item
    return rule


@security_groups.command("create")
@click.argument("name")
@click.option("--description", default="", help="Free text, at most 1024 characters.")
@click.option("--rule", "rules", multiple=True, metavar="direction=D,protocol=P,port=N[-M],remote=CIDR",
              help="A rule; only direction is required. Repeat for several.")
@output_option
@column_option
@pass_settings
def security_groups_create(settings: Settings, name: str, description: str, rules: tuple[str, ...],
                           output: str | None, columns: tuple[str, ...]) -> None:
    """Create a security group."""
    group = settings.client().security_groups.create(
        name=name, description=description, rules=[parse_rule(rule) for rule in rules])
    print_item(group, output, columns)


@volumes.command("create")
@click.argument("name")
@click.option("--size", type=int, required=True, help="Size in GiB (1 to 16384).")
@output_option
@column_option
@pass_settings
def volumes_create(settings: Settings, name: str, size: int, output: str | None, columns: tuple[str, ...]) -> None:
    """Create a volume."""
    print_item(settings.client().volumes.create(name=name, size_gb=size), output, columns)


EXIT_INTERRUPTED = 130


def main() -> None:
    """Run the ``mycloud`` command (shell completion: ``_MYCLOUD_COMPLETE=bash_source mycloud``)."""
    try:
        # Without standalone mode, click returns ctx.exit() codes instead of exiting.
        code = cli(prog_name="mycloud", standalone_mode=False)
    except click.exceptions.Abort:
        # Ctrl-C: stop waiting; whatever the API accepted goes on without us.
        click.echo("\nInterrupted; requests already accepted by the API still complete.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
