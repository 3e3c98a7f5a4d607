"""Table definitions (SQLAlchemy Core).

Every table that belongs to an organization starts its primary key with
``organization_id``, so the data can later be partitioned or sharded by
organization without changing keys. Timestamps are naive UTC datetimes with full
precision; the API layer formats them.

The instance row is denormalized for the list endpoint: the nested objects the API
returns (flavor, image, addresses, security groups, ...) are stored as JSON columns
next to the filter columns, so one index range scan yields whole objects with no
extra queries. Normalized side tables (``instance_tags``, ``ports``) exist for what
must be filtered on or kept unique.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


def Name(length: int = 255) -> String:  # noqa: N802 - reads like a column type
    """A name column compared byte by byte (collation "C" on PostgreSQL).

    Prefix filters are range scans (``name >= 'web-' AND name < 'web.'``), which
    only match prefixes under a code-point ordering; SQLite's default BINARY
    collation already is one.
    """
    return String(length).with_variant(String(length, collation="C"), "postgresql")


organizations = Table(
    "organizations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Name(), nullable=False, unique=True),
    Column("created_at", DateTime, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    # SHA-256 of the token secret, hex. Tokens carry 256 random bits, so a fast
    # hash is enough: there is nothing to brute-force.
    Column("secret_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),
    Column("expires_at", DateTime, nullable=True),
    Column("revoked_at", DateTime, nullable=True),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    UniqueConstraint("organization_id", "name"),
)

flavors = Table(
    "flavors",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Name(), nullable=False),
    Column("vcpus", Integer, nullable=False),
    Column("ram", Integer, nullable=False),
    Column("disk", Integer, nullable=False),
    Column("is_public", Boolean, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("deleted_at", DateTime, nullable=True),
    Index("ix_flavors_name_id", "name", "id"),
)

images = Table(
    "images",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Name(), nullable=False),
    Column("os_distro", String(64), nullable=False),
    Column("os_version", String(64), nullable=False),
    Column("min_disk", Integer, nullable=False),
    Column("min_ram", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("deleted_at", DateTime, nullable=True),
    Index("ix_images_name_id", "name", "id"),
)

hosts = Table(
    "hosts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("name", Name(), nullable=False, unique=True),
    Column("vcpus", Integer, nullable=False),
    Column("ram", BigInteger, nullable=False),
    Column("disk", BigInteger, nullable=False),
    Column("vcpus_used", Integer, nullable=False, default=0),
    Column("ram_used", BigInteger, nullable=False, default=0),
    Column("disk_used", BigInteger, nullable=False, default=0),
    Column("instance_count", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
)

networks = Table(
    "networks",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    Column("cidr", String(64), nullable=False),
    Column("ip_version", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    UniqueConstraint("organization_id", "name"),
)

security_groups = Table(
    "security_groups",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    Column("description", String(1024), nullable=False),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    UniqueConstraint("organization_id", "name"),
)

instances = Table(
    "instances",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    Column("description", String(1024), nullable=False),
    Column("status", String(16), nullable=False),
    Column("vm_state", String(16), nullable=False),
    Column("task_state", String(32), nullable=True),
    Column("power_state", String(16), nullable=False),
    Column("flavor_id", Uuid, nullable=False),
    Column("flavor", JSON, nullable=False),
    Column("image_id", Uuid, nullable=False),
    Column("image", JSON, nullable=False),
    Column("host_id", Uuid, nullable=True),
    Column("network_ids", JSON, nullable=False),
    Column("addresses", JSON, nullable=False),
    Column("security_groups", JSON, nullable=False),
    Column("volumes_attached", JSON, nullable=False),
    Column("key_names", JSON, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("fault", JSON, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("launched_at", DateTime, nullable=True),
    Column("terminated_at", DateTime, nullable=True),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    # One index per filter, each ending in the list order, so every filtered page
    # is an index range scan that stops after `limit` rows.
    Index("ix_instances_org_created", "organization_id", "created_at", "id"),
    Index("ix_instances_org_status_created", "organization_id", "status", "created_at", "id"),
    Index("ix_instances_org_name_created", "organization_id", "name", "created_at", "id"),
    Index("ix_instances_org_flavor_created", "organization_id", "flavor_id", "created_at", "id"),
    Index("ix_instances_org_image_created", "organization_id", "image_id", "created_at", "id"),
)

instance_tags = Table(
    "instance_tags",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    Column("tag", Name(60), nullable=False),
    PrimaryKeyConstraint("organization_id", "instance_id", "tag"),
    ForeignKeyConstraint(
        ["organization_id", "instance_id"],
        ["instances.organization_id", "instances.id"],
        ondelete="CASCADE",
    ),
    Index("ix_instance_tags_org_tag_instance", "organization_id", "tag", "instance_id"),
)

ports = Table(
    "ports",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("network_id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    Column("address", String(64), nullable=False),
    # Offset of the address from its network's first address (a full IPv6 address
    # would not fit in 64 bits), so the allocator can find free addresses by range.
    Column("address_value", BigInteger, nullable=False),
    Column("mac_address", String(17), nullable=False, unique=True),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(
        ["organization_id", "network_id"], ["networks.organization_id", "networks.id"]
    ),
    UniqueConstraint("organization_id", "network_id", "address_value"),
    Index("ix_ports_org_instance", "organization_id", "instance_id"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("organization_id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    Column("action", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("step", String(32), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(128), nullable=True),
    Column("lease_expires_at", DateTime, nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("action_id", Uuid, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_tasks_state_created", "state", "created_at"),
    Index("ix_tasks_org_instance", "organization_id", "instance_id"),
)

instance_actions = Table(
    "instance_actions",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    Column("action", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("request_id", String(64), nullable=True),
    Column("token_name", Name(), nullable=True),
    Column("message", Text, nullable=True),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    PrimaryKeyConstraint("organization_id", "id"),
    Index("ix_instance_actions_org_instance_started", "organization_id", "instance_id", "started_at", "id"),
)
