"""``mycloud-compute``: the operators' command line (database, identity, serving)."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import click
from sqlalchemy.exc import SQLAlchemyError

from mycloud_compute.logging_setup import configure_logging
from mycloud_compute.persistence import migrate
from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import identity
from mycloud_compute.services.errors import ServiceError
from mycloud_compute.settings import Settings, load_settings

T = TypeVar("T")


def _settings() -> Settings:
    try:
        return load_settings()
    except ValueError as exc:
        raise click.ClickException(f"invalid MYCLOUD_* settings: {exc}") from exc


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
    "--expires-in", "expires_in", type=click.FloatRange(min=0, min_open=True), default=None,
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
        state = "revoked" if row.revoked_at else "active"
        expires = row.expires_at.isoformat(timespec="seconds") + "Z" if row.expires_at else "never"
        click.echo(f"{row.name}  scopes={row.scopes}  expires={expires}  {state}")


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
        )

    secret = _run(setup)
    click.echo(f"Organization: {organization}")
    click.echo(f"Token (read, write): {secret}")
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
    uvicorn.run(
        "mycloud_compute.api.asgi:app",
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        timeout_graceful_shutdown=30,
    )


@main.command("worker")
def worker() -> None:
    """Run a standalone lifecycle worker until SIGTERM or SIGINT (PostgreSQL deployments)."""
    from mycloud_compute.worker.__main__ import main as worker_main

    worker_main()


if __name__ == "__main__":
    sys.exit(main())
