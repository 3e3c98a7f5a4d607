"""Load a realistic instance dataset into PostgreSQL with COPY.

Usage:
    python bench/generate_dataset.py --database-url postgresql://postgres@127.0.0.1:5432/mycloud_bench \
        --instances 1000000 --organizations 10000 --big-organization 100000

The database is dropped if it exists, created, migrated and filled. One organization
("bench-big") owns ``--big-organization`` instances, and the rest are spread over the
other organizations. Each instance gets a realistic name, 0-5 tags from a small
vocabulary, metadata, one fixed address on the organization's private network, a
flavor and image from the default catalog, and a status drawn from a mix with a few
percent DELETED. A token for the big organization and one for a small organization
are written to ``--tokens-file`` for the load scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from mycloud_compute.persistence import identity as identity_store
from mycloud_compute.persistence.catalog_ids import catalog_id
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.migrate import upgrade
from mycloud_compute.services import identity, networks
from mycloud_compute.services.lifecycle import derive_status

FLAVORS = [
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
    ("m1.xlarge", 8, 16384, 160),
]
IMAGES = ["Ubuntu 22.04 LTS", "Ubuntu 24.04 LTS", "Debian 12", "Rocky Linux 9"]
ROLES = ["web", "api", "db", "cache", "worker", "queue", "search", "batch", "proxy", "auth"]
TAGS = ["web", "frontend", "backend", "production", "staging", "dev", "blue", "green",
        "eu", "us", "critical", "batch", "gpu", "canary", "legacy"]
ENVIRONMENTS = ["production", "staging", "development"]
TEAMS = ["backend", "frontend", "data", "platform", "search", "payments"]

# (vm_state, power_state, share): mostly ACTIVE, some stopped, errors and deleted.
STATE_MIX = [
    ("ACTIVE", "RUNNING", 0.80),
    ("STOPPED", "SHUTDOWN", 0.10),
    ("ERROR", "NOSTATE", 0.03),
    ("BUILDING", "NOSTATE", 0.02),
    ("DELETED", "NOSTATE", 0.05),
]
NETWORK = ipaddress.ip_network("192.168.0.0/16")


def _json(value: Any) -> str:
    # Compact, as the service writes its JSON columns: the list endpoint copies the
    # stored text into responses.
    return msgspec.json.encode(value).decode()


def _mac(rng: random.Random) -> str:
    return "fa:16:3e:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))


def _pick_state(rng: random.Random) -> tuple[str, str]:
    roll = rng.random()
    for vm_state, power_state, share in STATE_MIX:
        if roll < share:
            return vm_state, power_state
        roll -= share
    return STATE_MIX[0][0], STATE_MIX[0][1]


def instance_record(
    rng: random.Random, organization_id: uuid.UUID, index: int, created_at: datetime
) -> tuple[tuple[Any, ...], list[str]]:
    flavor_name, vcpus, ram, disk = rng.choice(FLAVORS)
    image_name = rng.choice(IMAGES)
    vm_state, power_state = _pick_state(rng)
    tags = rng.sample(TAGS, rng.randint(0, 5))
    instance_id = uuid.uuid4()
    address = str(NETWORK.network_address + 2 + index % 65000)
    addresses = {} if vm_state in ("BUILDING", "DELETED") else {
        "private-network": [{"addr": address, "version": 4, "type": "fixed", "mac_addr": _mac(rng)}]
    }
    launched_at = created_at + timedelta(seconds=20) if vm_state != "BUILDING" else None
    terminated_at = created_at + timedelta(days=1) if vm_state == "DELETED" else None
    fault = None
    if vm_state == "ERROR":
        fault = {"code": 500, "message": "No valid host was found",
                 "details": "no enabled host has enough free capacity",
                 "created": created_at.isoformat(timespec="seconds") + "Z"}
    record = (
        organization_id,
        instance_id,
        f"{rng.choice(ROLES)}-server-{index:06d}",
        "",
        derive_status(vm_state, None).value,
        vm_state,
        None,
        power_state,
        catalog_id("flavor", flavor_name),
        _json({"id": str(catalog_id("flavor", flavor_name)), "name": flavor_name,
                    "vcpus": vcpus, "ram": ram, "disk": disk}),
        catalog_id("image", image_name),
        _json({"id": str(catalog_id("image", image_name)), "name": image_name}),
        None,
        _json([]),
        _json(addresses),
        _json([{"name": "default"}]),
        _json([]),
        _json([]),
        _json({"environment": rng.choice(ENVIRONMENTS), "team": rng.choice(TEAMS)}),
        _json(tags),
        _json(fault) if fault else None,
        created_at,
        created_at,
        launched_at,
        terminated_at,
    )
    return record, tags


COUNT_KEY = "organization_id, status, flavor_id, image_id"
TAG_COUNT_KEY = "organization_id, tag, status"
INSTANCE_COLUMNS = [
    "organization_id", "id", "name", "description", "status", "vm_state", "task_state",
    "power_state", "flavor_id", "flavor", "image_id", "image", "host_id", "network_ids",
    "addresses", "security_groups", "volumes_attached", "key_names", "metadata", "tags",
    "fault", "created_at", "updated_at", "launched_at", "terminated_at",
]


async def _create_database(admin_url: str, name: str) -> None:
    """Drop the database if it exists and create it empty.

    A dataset loaded on top of an earlier one would double the instances while the
    command line still gives the old size, so every run starts from an empty database.
    """
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()


async def _organizations(db: Database, count: int) -> list[tuple[uuid.UUID, str]]:
    """Create the organizations as the admin CLI does, a thousand per transaction."""
    names = ["bench-big"] + [f"bench-{number:05d}" for number in range(1, count)]
    organizations: list[tuple[uuid.UUID, str]] = []
    for start in range(0, len(names), 1000):
        async with db.transaction() as conn:
            for name in names[start:start + 1000]:
                row = await identity_store.find_organization(conn, name)
                if row is not None:
                    organizations.append((uuid.UUID(str(row.id)), name))
                    continue
                organization_id = uuid.uuid4()
                await identity_store.insert_organization(
                    conn, {"id": organization_id, "name": name, "created_at": utcnow()}
                )
                await networks.ensure_default_network(conn, organization_id)
                await networks.ensure_default_security_group(conn, organization_id)
                organizations.append((organization_id, name))
    return organizations


async def load(args: argparse.Namespace) -> None:
    base, _, name = args.database_url.rpartition("/")
    await _create_database(f"{base}/postgres", name)
    await asyncio.to_thread(upgrade, args.database_url)

    db = Database(args.database_url, pool_size=2)
    started = time.monotonic()
    organizations = await _organizations(db, args.organizations)
    print(f"organizations ready: {len(organizations)} in {time.monotonic() - started:.1f} s")

    tokens = {
        "big": await identity.create_token(db, "bench-big", name=f"bench-{uuid.uuid4().hex[:8]}",
                                           scopes=frozenset({"read", "write"})),
        "small": await identity.create_token(db, organizations[-1][1],
                                             name=f"bench-{uuid.uuid4().hex[:8]}",
                                             scopes=frozenset({"read", "write"})),
    }
    await db.dispose()
    Path(args.tokens_file).write_text(json.dumps(tokens))

    rng = random.Random(args.seed)
    small_total = max(args.instances - args.big_organization, 0)
    small_orgs = organizations[1:] or organizations
    plan = [(organizations[0][0], args.big_organization)]
    per_org, remainder = divmod(small_total, len(small_orgs))
    plan += [(org_id, per_org + (1 if i < remainder else 0)) for i, (org_id, _) in enumerate(small_orgs)]

    connection = await asyncpg.connect(args.database_url.replace("postgresql://", "postgres://", 1))
    await connection.set_type_codec(
        "json", encoder=str.encode, decoder=bytes.decode, schema="pg_catalog", format="binary"
    )
    # Row triggers (the instance and tag counters) are off while loading. The counters are
    # rebuilt from the rows at the end, because that is much faster than a trigger per row.
    await connection.execute("SET session_replication_role = replica")
    start_time = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=365)
    loaded = 0
    batch: list[tuple[Any, ...]] = []
    tag_batch: list[tuple[Any, ...]] = []
    for organization_id, count in plan:
        for index in range(count):
            # Spread creation over a year; some share a timestamp, as bulk creates do.
            created_at = start_time + timedelta(seconds=index * 30 + rng.randrange(3))
            record, tags = instance_record(rng, organization_id, index, created_at)
            batch.append(record)
            tag_batch.extend((organization_id, record[1], tag, record[4]) for tag in tags)
            if len(batch) >= 50_000:
                loaded += await _flush(connection, batch, tag_batch)
                print(f"loaded {loaded} instances, {time.monotonic() - started:.0f} s")
    loaded += await _flush(connection, batch, tag_batch)
    await connection.execute("SET session_replication_role = DEFAULT")
    await connection.execute(
        "DELETE FROM instance_counts; "
        f"INSERT INTO instance_counts ({COUNT_KEY}, count) "
        f"SELECT {COUNT_KEY}, count(*) FROM instances GROUP BY {COUNT_KEY}; "
        "DELETE FROM instance_tag_counts; "
        f"INSERT INTO instance_tag_counts ({TAG_COUNT_KEY}, count) "
        f"SELECT {TAG_COUNT_KEY}, count(*) FROM instance_tags GROUP BY {TAG_COUNT_KEY}"
    )
    print(f"counters rebuilt, {time.monotonic() - started:.0f} s")
    await connection.execute("VACUUM (ANALYZE) instances")
    await connection.execute("VACUUM (ANALYZE) instance_tags")
    await connection.execute("VACUUM (ANALYZE) instance_counts")
    await connection.execute("VACUUM (ANALYZE) instance_tag_counts")
    await connection.close()
    print(f"done: {loaded} instances in {time.monotonic() - started:.0f} s; tokens in {args.tokens_file}")


async def _flush(
    connection: asyncpg.Connection, batch: list[tuple[Any, ...]], tag_batch: list[tuple[Any, ...]]
) -> int:
    count = len(batch)
    if count:
        await connection.copy_records_to_table("instances", records=batch, columns=INSTANCE_COLUMNS)
    if tag_batch:
        await connection.copy_records_to_table(
            "instance_tags", records=tag_batch,
            columns=["organization_id", "instance_id", "tag", "status"],
        )
    batch.clear()
    tag_batch.clear()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", required=True, help="postgresql://user@host:port/dbname")
    parser.add_argument("--instances", type=int, default=10_000, help="Instances in all.")
    parser.add_argument("--organizations", type=int, default=100, help="Organizations in all.")
    parser.add_argument("--big-organization", type=int, default=5_000,
                        help="Instances of the largest organization (bench-big).")
    parser.add_argument("--seed", type=int, default=1, help="Random seed.")
    parser.add_argument("--tokens-file", default="bench/tokens.json", help="Where to write tokens.")
    load_args = parser.parse_args()
    asyncio.run(load(load_args))


if __name__ == "__main__":
    main()
