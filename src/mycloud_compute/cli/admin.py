"""``mycloud-compute``: the operators' command line (database, identity, serving)."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from mycloud_compute.drivers.simulated import parse_host_inventory
from mycloud_compute.logging_setup import configure_logging
from mycloud_compute.persistence import migrate
from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import hosts, identity
from mycloud_compute.services.errors import ServiceError
from mycloud_compute.settings import Settings, load_settings

T = TypeVar("T")

# Maximum token lifetime that --expires-in accepts (100 years), and the demo token's.
MAX_TOKEN_DAYS = 36500
DEMO_TOKEN_DAYS = 30

# Read by prometheus_client when it is first imported in each API process.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def _settings() -> Settings:
    try:
        return load_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"MYCLOUD_{str(error['loc'][0]).upper()}: {error['msg']}" for error in exc.errors()
        )
        raise click.ClickException(f"invalid settings: {problems}") from exc


def _run(make: Any) -> Any:
    """Run ``make(db)`` on a fresh Database and turn service errors into CLI errors."""

    async def main() -> Any:
        settings = _settings()
        db = Database(settings.database_url, pool_size=2)
        try:
            coroutine: Coroutine[Any, Any, Any] = make(db)
            return await coroutine
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except ServiceError as exc:
        raise click.ClickException(exc.message) from exc
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(_database_error_message(exc)) from exc


def _database_error_message(
    exc: Exception, hint: str = "check MYCLOUD_DATABASE_URL and run `mycloud-compute db upgrade`"
) -> str:
    """Describe a database failure in one line, without the SQL statement or parameters."""
    cause = getattr(exc, "orig", None) or exc
    first_line = (str(cause).splitlines() or [""])[0]
    return f"database request failed: {type(cause).__name__}: {first_line}; {hint}"


@click.group()
def main() -> None:
    """Operate a mycloud Compute region. Settings come from MYCLOUD_* variables."""


# --- database -------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Alembic revision to reach.")
def db_upgrade(revision: str) -> None:
    """Create or migrate the schema and install the default flavors and images."""
    settings = _settings()
    configure_logging("WARNING")
    try:
        migrate.upgrade(settings.database_url, revision)
    except (SQLAlchemyError, OSError) as exc:
        raise click.ClickException(
            _database_error_message(exc, "check MYCLOUD_DATABASE_URL")
        ) from exc
    click.echo(f"database at revision {revision}", err=True)


# --- organizations --------------------------------------------------------------------


@main.group()
def org() -> None:
    """Organizations."""


@org.command("create")
@click.argument("name")
def org_create(name: str) -> None:
    """Create organization NAME with its default network and security group."""
    organization_id = _run(lambda database: identity.create_organization(database, name))
    click.echo(str(organization_id))


@org.command("list")
def org_list() -> None:
    """List organizations."""
    for row in _run(identity.list_organizations):
        click.echo(f"{row.id}  {row.name}")


# --- tokens ---------------------------------------------------------------------------


@main.group()
def token() -> None:
    """API tokens."""


def _check_days(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"must be a number of days from 0 to {MAX_TOKEN_DAYS}")
    return value


def _parse_scopes(_ctx: click.Context, _param: click.Parameter, value: str) -> frozenset[str]:
    try:
        return identity.parse_scopes(value)
    except ServiceError as exc:
        raise click.BadParameter(exc.message) from exc


@token.command("create")
@click.option("--org", "organization", required=True, help="Organization name.")
@click.option(
    "--scopes", required=True, callback=_parse_scopes,
    help="Comma-separated scopes: read, write, admin.",
)
@click.option(
    "--name", default=None,
    help="Token name, unique in the organization. [default: token-<time>-<random hex>]",
)
@click.option(
    "--expires-in", "expires_in", type=click.FloatRange(min=0, min_open=True, max=MAX_TOKEN_DAYS),
    default=None, callback=_check_days,
    help="Days until the token expires. [default: never]",
)
def token_create(organization: str, scopes: frozenset[str], name: str | None, expires_in: float | None) -> None:
    """Create a token and print its secret (only the secret, on stdout). It is shown once."""
    # The random suffix keeps two unnamed tokens created in the same second distinct.
    token_name = name or f"token-{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
    secret = _run(
        lambda database: identity.create_token(
            database, organization, name=token_name, scopes=scopes, expires_in_days=expires_in
        )
    )
    click.echo(secret)


@token.command("revoke")
@click.option("--org", "organization", required=True, help="Organization name.")
@click.option("--name", required=True, help="Token name.")
def token_revoke(organization: str, name: str) -> None:
    """Revoke a token; requests with it get 401 from then on."""
    _run(lambda database: identity.revoke_token(database, organization, name))
    click.echo(f"token {name} revoked", err=True)


@token.command("list")
@click.option("--org", "organization", required=True, help="Organization name.")
def token_list(organization: str) -> None:
    """List the tokens of an organization (names, scopes, expiry; never secrets)."""
    for row in _run(lambda database: identity.list_tokens(database, organization)):
        if row.revoked_at:
            state = "revoked"
        elif row.expires_at and row.expires_at <= utcnow():
            state = "expired"
        else:
            state = "active"
        expires = row.expires_at.isoformat(timespec="seconds") + "Z" if row.expires_at else "never"
        click.echo(f"{row.name}  scopes={row.scopes}  expires={expires}  {state}")


# --- hosts ----------------------------------------------------------------------------


@main.group()
def host() -> None:
    """Compute hosts and their capacity.

    Workers add the hosts of MYCLOUD_SIMULATED_HOSTS at start-up and reset their
    capacity to the configured values. They never remove or re-enable a host.
    """


def _configured_host_names() -> set[str]:
    """Names in this shell's MYCLOUD_SIMULATED_HOSTS (empty when it does not parse)."""
    try:
        return {item.name for item in parse_host_inventory(_settings().simulated_hosts)}
    except ValueError:
        return set()


@host.command("list")
def host_list() -> None:
    """List hosts with their usage and capacity (USED/TOTAL; RAM in MiB, disk in GiB)."""
    rows = [["NAME", "STATUS", "VCPUS", "RAM_MIB", "DISK_GIB", "INSTANCES", "ID"]]
    for item in _run(hosts.list_all_hosts):
        rows.append([
            item.name,
            item.status,
            f"{item.vcpus_used}/{item.vcpus}",
            f"{item.ram_used}/{item.ram}",
            f"{item.disk_used}/{item.disk}",
            str(item.instance_count),
            str(item.id),
        ])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@host.command("add")
@click.argument("name")
@click.option("--vcpus", required=True, type=click.IntRange(min=1), help="Number of vCPUs.")
@click.option("--ram", required=True, type=click.IntRange(min=1), help="RAM in MiB.")
@click.option("--disk", required=True, type=click.IntRange(min=1), help="Disk in GiB.")
def host_add(name: str, vcpus: int, ram: int, disk: int) -> None:
    """Add an enabled simulated host NAME with no instances and print its id."""
    added = _run(lambda database: hosts.add_host(database, name, vcpus=vcpus, ram=ram, disk=disk))
    click.echo(str(added.id))
    if name in _configured_host_names():
        click.echo(
            f"warning: {name!r} is also in MYCLOUD_SIMULATED_HOSTS; workers reset its capacity "
            "to the configured values when they start",
            err=True,
        )


@host.command("disable")
@click.argument("name")
def host_disable(name: str) -> None:
    """Stop placing new instances on host NAME. Its instances keep running."""
    _run(lambda database: hosts.disable_host(database, name))
    click.echo(f"host {name} disabled", err=True)


@host.command("enable")
@click.argument("name")
def host_enable(name: str) -> None:
    """Place new instances on host NAME again."""
    _run(lambda database: hosts.enable_host(database, name))
    click.echo(f"host {name} enabled", err=True)


@host.command("remove")
@click.argument("name")
def host_remove(name: str) -> None:
    """Remove host NAME. Rejected while instances are placed on it."""
    _run(lambda database: hosts.remove_host(database, name))
    click.echo(f"host {name} removed", err=True)
    if name in _configured_host_names():
        click.echo(
            f"warning: {name!r} is in MYCLOUD_SIMULATED_HOSTS; workers add it again when they start",
            err=True,
        )


# --- demo -----------------------------------------------------------------------------


@main.command("demo")
@click.option("--org", "organization", default="demo", show_default=True, help="Organization name.")
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Service URL to show.")
def demo(organization: str, url: str) -> None:
    """Make sure a demo organization exists, create a read/write token and print how to call the API."""

    async def setup(database: Database) -> str:
        await identity.ensure_organization(database, organization)
        return await identity.create_token(
            database,
            organization,
            name=f"demo-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}",
            scopes=frozenset({"read", "write"}),
            expires_in_days=DEMO_TOKEN_DAYS,
        )

    secret = _run(setup)
    click.echo(f"Organization: {organization}")
    click.echo(f"Token (read, write; expires in {DEMO_TOKEN_DAYS} days): {secret}")
    click.echo("")
    click.echo("List instances:")
    click.echo(f'  curl -X GET "{url}/v1/instances" \\')
    click.echo(f'    -H "Authorization: Bearer {secret}" \\')
    click.echo('    -H "Content-Type: application/json"')
    click.echo("")
    click.echo("Create one (m1.small, Ubuntu 22.04 LTS; ids from GET /v1/flavors and /v1/images):")
    click.echo(f'  curl -X POST "{url}/v1/instances" \\')
    click.echo(f'    -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\')
    click.echo(
        "    -d '{\"name\": \"web-server-01\", \"flavor_id\": \"" + _default_flavor_id()
        + "\", \"image_id\": \"" + _default_image_id() + "\"}'"
    )
    click.echo("")
    click.echo(f"API documentation: {url}/docs")


def _default_flavor_id() -> str:
    return str(catalog_id("flavor", "m1.small"))


def _default_image_id() -> str:
    return str(catalog_id("image", "Ubuntu 22.04 LTS"))


# --- processes ------------------------------------------------------------------------


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="TCP port.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="API processes. More than one needs PostgreSQL.")
def serve(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (with the embedded lifecycle worker on SQLite)."""
    import uvicorn

    settings = _settings()
    if workers > 1 and settings.is_sqlite:
        raise click.ClickException(
            "SQLite serves one API process; set MYCLOUD_DATABASE_URL to PostgreSQL for --workers > 1"
        )
    configure_logging(settings.log_level)
    metrics_dir = None
    if workers > 1 and not os.environ.get(METRICS_DIR_VARIABLE):
        # prometheus_client's multiprocess mode: every API process writes its metrics
        # to files in this directory and a scrape of any process merges them. A fresh
        # directory keeps the counters of an earlier run out.
        metrics_dir = tempfile.mkdtemp(prefix="mycloud-metrics-")
        os.environ[METRICS_DIR_VARIABLE] = metrics_dir
    try:
        uvicorn.run(
            "mycloud_compute.api.asgi:app",
            host=host,
            port=port,
            workers=workers,
            access_log=False,
            log_config=None,
            proxy_headers=False,
            http="mycloud_compute.api.http_protocol:EnvelopeHttpToolsProtocol",
            timeout_graceful_shutdown=30,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@main.command("worker")
def worker() -> None:
    """Run a standalone lifecycle worker until SIGTERM or SIGINT (PostgreSQL deployments)."""
    from mycloud_compute.worker.__main__ import main as worker_main

    worker_main()


if __name__ == "__main__":
    sys.exit(main())
