"""An instance create on PostgreSQL as one statement.

The statement checks what the create refers to and, only when every check
passes, inserts the Idempotency-Key row with its response, the instance, its
tags and security group links, the action record and the create task. It runs on
a connection outside a transaction, so it commits on its own: one round trip
instead of a transaction of a dozen statements.

It changes nothing when a check fails or the Idempotency-Key is live already. The
caller then runs the create as a transaction (services/instances.py), which
raises the error the request deserves, or finds the stored response. So the
statement only has to decide "everything is valid", never which error applies.

Checks, all on the rows as of the statement's snapshot and locks:
- the flavor exists, is not deleted, is public unless private flavors are
  included, and has the name, vCPUs, RAM and disk that the caller rendered into
  the instance and the response (the caller takes them from a cache);
- the image exists, is not deleted, is ACTIVE, has the rendered name, and needs
  no more disk and RAM than the flavor has;
- the networks exist in the organization: its default network (by name), or
  every id requested;
- every requested security group name and key pair name exists in the
  organization;
- with a key: the key has no live row (the INSERT ... ON CONFLICT takes over an
  expired one, like ``persistence.idempotency.insert_claim``).

The networks, security groups and key pairs are locked FOR KEY SHARE until the
statement commits, as in the transaction, so a concurrent delete waits and then
finds the new instance. The instance_tags trigger reads the instance's status
from the instance row that the same statement inserted: a trigger's queries see
the changes that the statement made before them. The instance counters are
deferred triggers, which run at the statement's commit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from mycloud_compute.persistence.idempotency import PURGE_BATCH


@dataclass(frozen=True)
class CreateShape:
    """The variant of the statement; each shape is one prepared statement."""

    # The organization's default network, found by name, rather than networks by id.
    default_network: bool
    idempotency_key: bool
    # Also delete up to PURGE_BATCH expired keys of the organization (needs a key).
    purge_expired_keys: bool


class _Parameters:
    """Numbers the statement's parameters by name, in the order they are first used."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, sql_type: str) -> str:
        if name not in self.names:
            self.names.append(name)
        return f"${self.names.index(name) + 1}::{sql_type}"


# Columns of the instance row, with the parameter and type of each value. The
# network_ids value comes from the statement itself for the default network.
_INSTANCE_COLUMNS = (
    ("organization_id", "uuid"),
    ("id", "uuid"),
    ("name", "varchar"),
    ("description", "varchar"),
    ("status", "varchar"),
    ("vm_state", "varchar"),
    ("task_state", "varchar"),
    ("power_state", "varchar"),
    ("flavor_id", "uuid"),
    ("flavor", "json"),
    ("image_id", "uuid"),
    ("image", "json"),
    ("network_ids", "json"),
    ("addresses", "json"),
    ("security_groups", "json"),
    ("volumes_attached", "json"),
    ("key_names", "json"),
    ("metadata", "json"),
    ("tags", "json"),
    ("fault", "json"),
    ("created_at", "timestamp"),
    ("updated_at", "timestamp"),
)


@functools.lru_cache(maxsize=16)
def create_statement(shape: CreateShape) -> tuple[str, tuple[str, ...]]:
    """Return the SQL for ``shape`` and the names of its parameters, in order.

    The statement returns one row: the stored ``network_ids`` JSON text (NULL when
    it changed nothing) and whether the flavor and image rows matched.
    """
    parameter = _Parameters()
    organization = parameter("organization_id", "uuid")
    if shape.default_network:
        network_filter = f"n.name = {parameter('default_network_name', 'varchar')}"
        network_count = "1"
        network_ids = """('["' || (SELECT id FROM network)::text || '"]')::json"""
    else:
        network_filter = f"n.id = ANY({parameter('network_id_list', 'uuid[]')})"
        network_count = f"cardinality({parameter('network_id_list', 'uuid[]')})"
        network_ids = parameter("network_ids", "json")
    group_names = parameter("group_names", "varchar[]")
    key_names = parameter("key_name_list", "varchar[]")
    flavor_disk = parameter("flavor_disk", "integer")
    flavor_ram = parameter("flavor_ram", "integer")

    parts = [f"""
WITH flavor AS MATERIALIZED (
    SELECT f.id FROM flavors f
    WHERE f.id = {parameter("flavor_id", "uuid")} AND f.deleted_at IS NULL
      AND (f.is_public OR {parameter("include_private", "boolean")})
      AND f.name = {parameter("flavor_name", "varchar")} AND f.vcpus = {parameter("flavor_vcpus", "integer")}
      AND f.ram = {flavor_ram} AND f.disk = {flavor_disk}
), image AS MATERIALIZED (
    SELECT m.id FROM images m
    WHERE m.id = {parameter("image_id", "uuid")} AND m.deleted_at IS NULL AND m.status = 'ACTIVE'
      AND m.name = {parameter("image_name", "varchar")}
      AND m.min_disk <= {flavor_disk} AND m.min_ram <= {flavor_ram}
), network AS MATERIALIZED (
    SELECT n.id FROM networks n
    WHERE n.organization_id = {organization} AND {network_filter}
    FOR KEY SHARE
), groups AS MATERIALIZED (
    SELECT g.id FROM security_groups g
    WHERE g.organization_id = {organization} AND g.name = ANY({group_names})
    FOR KEY SHARE
), keys AS MATERIALIZED (
    SELECT k.name FROM keypairs k
    WHERE k.organization_id = {organization} AND k.name = ANY({key_names})
    FOR KEY SHARE
), checked AS MATERIALIZED (
    SELECT 1 AS ok
    WHERE (SELECT count(*) FROM flavor) = 1
      AND (SELECT count(*) FROM image) = 1
      AND (SELECT count(*) FROM network) = {network_count}
      AND (SELECT count(*) FROM groups) = cardinality({group_names})
      AND (SELECT count(*) FROM keys) = cardinality({key_names})
)"""]
    source = "checked"
    if shape.idempotency_key:
        key = parameter("key", "varchar")
        route = parameter("route", "varchar")
        expired_before = parameter("expired_before", "timestamp")
        parts.append(f""", claimed AS (
    INSERT INTO idempotency_keys AS k
        (organization_id, key, route, request_hash, status_code, response_body, location, created_at)
    SELECT {organization}, {key}, {route}, {parameter("request_hash", "varchar")},
           {parameter("status_code", "integer")}, {parameter("response_body", "text")},
           {parameter("location", "varchar")}, {parameter("key_created_at", "timestamp")}
    FROM checked
    ON CONFLICT (organization_id, key, route) DO UPDATE SET
        request_hash = EXCLUDED.request_hash, status_code = EXCLUDED.status_code,
        response_body = EXCLUDED.response_body, location = EXCLUDED.location,
        created_at = EXCLUDED.created_at
    WHERE k.created_at < {expired_before}
    RETURNING 1 AS ok
)""")
        source = "claimed"
        if shape.purge_expired_keys:
            # The claimed key is left out: its expired row may be the one the claim
            # takes over, and one statement must not change a row twice.
            parts.append(f""", purged AS (
    DELETE FROM idempotency_keys d
    WHERE (d.organization_id, d.key, d.route) IN (
        SELECT e.organization_id, e.key, e.route FROM idempotency_keys e
        WHERE e.organization_id = {organization} AND e.created_at < {expired_before}
          AND (e.key, e.route) <> ({key}, {route})
          AND EXISTS (SELECT 1 FROM claimed)
        LIMIT {PURGE_BATCH}
        FOR UPDATE SKIP LOCKED
    )
)""")

    columns = ", ".join(name for name, _ in _INSTANCE_COLUMNS)
    values = ", ".join(
        network_ids if name == "network_ids" else parameter(name, sql_type)
        for name, sql_type in _INSTANCE_COLUMNS
    )
    request_id = parameter("request_id", "varchar")
    action_id = parameter("action_id", "uuid")
    parts.append(f""", instance AS (
    INSERT INTO instances ({columns})
    SELECT {values}
    FROM {source}
    RETURNING id, network_ids
), tags AS (
    INSERT INTO instance_tags (organization_id, instance_id, tag)
    SELECT {organization}, instance.id, tag
    FROM instance, unnest({parameter("tag_list", "varchar[]")}) AS tag
), group_links AS (
    INSERT INTO instance_security_groups (organization_id, security_group_id, instance_id)
    SELECT {organization}, groups.id, instance.id FROM instance, groups
), action AS (
    INSERT INTO instance_actions
        (organization_id, id, instance_id, action, status, request_id, token_name, started_at)
    SELECT {organization}, {action_id}, instance.id, 'create', 'RUNNING', {request_id},
           {parameter("token_name", "varchar")}, {parameter("action_started_at", "timestamp")}
    FROM instance
), task AS (
    INSERT INTO tasks (id, organization_id, instance_id, action, state, step, attempts,
                       request_id, action_id, created_at, updated_at)
    SELECT {parameter("task_id", "uuid")}, {organization}, instance.id, 'create', 'PENDING', NULL, 0,
           {request_id}, {action_id}, {parameter("task_created_at", "timestamp")},
           {parameter("task_created_at", "timestamp")}
    FROM instance
)
SELECT (SELECT network_ids::text FROM instance) AS network_ids,
       EXISTS (SELECT 1 FROM flavor) AND EXISTS (SELECT 1 FROM image) AS catalog_matched""")
    return "".join(parts), tuple(parameter.names)


@dataclass(frozen=True)
class CreateOutcome:
    """The result of the create statement."""

    # The stored network_ids JSON text; None when the statement changed nothing.
    network_ids: str | None
    # Whether the flavor and image rows matched the values the caller rendered.
    catalog_matched: bool


async def insert_checked(raw_connection: Any, shape: CreateShape, values: dict[str, Any]) -> CreateOutcome:
    """Run the create statement on an asyncpg connection outside a transaction.

    ``values`` maps each parameter name of :func:`create_statement` to its value,
    JSON values as encoded text.
    """
    sql, names = create_statement(shape)
    row = await raw_connection.fetchrow(sql, *(values[name] for name in names))
    return CreateOutcome(network_ids=row["network_ids"], catalog_matched=row["catalog_matched"])
