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
    """Return a name column type compared byte by byte (collation "C" on PostgreSQL).

    Prefix filters are range scans (``name >= 'web-' AND name < 'web.'``), which
    match prefixes only under a code-point ordering. SQLite's default BINARY
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
    # Host claims of a resize besides (flavor, host_id), migration 0005. While the
    # resize runs, new_* is the target flavor and its claim (new_host_id is set once
    # claimed). From VERIFY_RESIZE until confirm or revert, old_* is the previous
    # flavor and the claim it still holds. Both pairs are null otherwise.
    Column("new_flavor", JSON, nullable=True),
    Column("new_host_id", Uuid, nullable=True),
    Column("old_flavor", JSON, nullable=True),
    Column("old_host_id", Uuid, nullable=True),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    # One index per filter, each ending in the list order, so every filtered page
    # is an index range scan that stops after `limit` rows.
    Index("ix_instances_org_created", "organization_id", "created_at", "id", postgresql_include=["status"]),
    Index("ix_instances_org_status_created", "organization_id", "status", "created_at", "id"),
    Index(
        "ix_instances_org_name_created", "organization_id", "name", "created_at", "id",
        postgresql_include=["status"],
    ),
    Index("ix_instances_org_flavor_created", "organization_id", "flavor_id", "created_at", "id"),
    Index("ix_instances_org_image_created", "organization_id", "image_id", "created_at", "id"),
)

instance_tags = Table(
    "instance_tags",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    Column("tag", Name(60), nullable=False),
    # The instance's status, kept by database triggers (migration 0006), so that the
    # total of a tags filter counts index entries without reading the instances.
    Column("status", String(16), nullable=True),
    PrimaryKeyConstraint("organization_id", "instance_id", "tag"),
    ForeignKeyConstraint(
        ["organization_id", "instance_id"],
        ["instances.organization_id", "instances.id"],
        ondelete="CASCADE",
    ),
    Index(
        "ix_instance_tags_org_tag_instance", "organization_id", "tag", "instance_id",
        postgresql_include=["status"],
    ),
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


# --- key pairs, security group rules and the resource lists (migration 0003) ----------

# Networks and security groups are listed newest first, like instances.
Index("ix_networks_org_created", networks.c.organization_id, networks.c.created_at, networks.c.id)
Index(
    "ix_security_groups_org_created",
    security_groups.c.organization_id,
    security_groups.c.created_at,
    security_groups.c.id,
)

# A key pair is addressed by its name, so the name is its key, and the primary key
# is also the index of the list, which is ordered by name.
keypairs = Table(
    "keypairs",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    # The OpenSSH key type, e.g. "ssh-ed25519" or "ecdsa-sha2-nistp256".
    Column("type", String(32), nullable=False),
    # The key in canonical OpenSSH form: type, base64 blob and the optional comment.
    Column("public_key", Text, nullable=False),
    # "SHA256:" and the unpadded base64 SHA-256 of the key blob, as ssh-keygen -l prints it.
    Column("fingerprint", String(64), nullable=False),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "name"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
)

security_group_rules = Table(
    "security_group_rules",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("security_group_id", Uuid, nullable=False),
    # Order of the rules within their group: the order they were given and added in.
    Column("position", Integer, nullable=False),
    Column("direction", String(8), nullable=False),
    # NULL: any protocol. The ports are NULL for any port and for ICMP or any protocol.
    Column("protocol", String(8), nullable=True),
    Column("port_range_min", Integer, nullable=True),
    Column("port_range_max", Integer, nullable=True),
    # NULL: any address of either IP version.
    Column("remote_ip_prefix", String(64), nullable=True),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(
        ["organization_id", "security_group_id"],
        ["security_groups.organization_id", "security_groups.id"],
        ondelete="CASCADE",
    ),
    Index("ix_security_group_rules_org_group_position", "organization_id", "security_group_id", "position"),
)

# The security groups of each instance, by group id. The instance row keeps the
# names in its JSON for the API, and this table finds the users of a group (the
# in-use check) with an index range scan on (organization_id, security_group_id).
# Rows stay when the instance is DELETED (the in-use check joins the instance's
# status) and are removed with the group. The foreign key to the group has no
# cascade on purpose, so a group cannot be deleted while a row refers to it.
instance_security_groups = Table(
    "instance_security_groups",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("security_group_id", Uuid, nullable=False),
    Column("instance_id", Uuid, nullable=False),
    PrimaryKeyConstraint("organization_id", "security_group_id", "instance_id"),
    ForeignKeyConstraint(
        ["organization_id", "security_group_id"],
        ["security_groups.organization_id", "security_groups.id"],
    ),
    ForeignKeyConstraint(
        ["organization_id", "instance_id"],
        ["instances.organization_id", "instances.id"],
        ondelete="CASCADE",
    ),
)


# --- volumes and idempotency keys (migration 0004) ------------------------------------

# A volume is attached to at most one instance, so the attachment is stored on the
# volume row. instance_id, device and delete_on_termination are set while the status
# is IN_USE and NULL otherwise. DELETED rows stay, so their ids remain valid markers.
volumes = Table(
    "volumes",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("name", Name(), nullable=False),
    Column("size_gb", Integer, nullable=False),
    # AVAILABLE, IN_USE or DELETED, exactly as the API shows it.
    Column("status", String(16), nullable=False),
    # Progress of an IN_USE volume's attachment: RESERVED when the create request
    # claimed it, ATTACHED once the build's BLOCK_DEVICE_MAPPING step has run.
    Column("attach_status", String(16), nullable=True),
    Column("instance_id", Uuid, nullable=True),
    Column("device", String(32), nullable=True),
    Column("delete_on_termination", Boolean, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("deleted_at", DateTime, nullable=True),
    PrimaryKeyConstraint("organization_id", "id"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    ForeignKeyConstraint(
        ["organization_id", "instance_id"], ["instances.organization_id", "instances.id"]
    ),
    Index("ix_volumes_org_created", "organization_id", "created_at", "id"),
    Index("ix_volumes_org_instance", "organization_id", "instance_id"),
)

# The stored first response of each Idempotency-Key, per organization and route.
# The row is inserted at the start of the transaction that creates the resource, so
# a concurrent request with the same key waits on the primary key until that
# transaction ends. The response columns are filled before the same commit, so no
# other transaction ever sees them NULL.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("key", String(255), nullable=False),
    # Method and path, e.g. "POST /v1/instances".
    Column("route", String(255), nullable=False),
    # SHA-256 (hex) of the request body as canonical JSON (sorted keys, no whitespace).
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("response_body", Text, nullable=True),
    Column("location", String(255), nullable=True),
    Column("created_at", DateTime, nullable=False),
    PrimaryKeyConstraint("organization_id", "key", "route"),
    ForeignKeyConstraint(["organization_id"], ["organizations.id"]),
    # Finds an organization's expired keys for the lazy purge.
    Index("ix_idempotency_keys_org_created", "organization_id", "created_at"),
)


# --- list totals (migrations 0006 and 0007) ------------------------------------------

# How many instances each organization has per (status, flavor_id, image_id), kept
# exact by database triggers on ``instances``. The list's ``meta.total`` sums a few
# of these rows instead of counting the organization's instances.
instance_counts = Table(
    "instance_counts",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("status", String(16), nullable=False),
    Column("flavor_id", Uuid, nullable=False),
    Column("image_id", Uuid, nullable=False),
    Column("count", BigInteger, nullable=False),
    PrimaryKeyConstraint("organization_id", "status", "flavor_id", "image_id"),
)

# How many instances each organization has per (tag, status), kept exact by database
# triggers on ``instance_tags`` (migration 0007). The list's ``meta.total`` for one
# tag, with or without a status filter, sums a few of these rows.
instance_tag_counts = Table(
    "instance_tag_counts",
    metadata,
    Column("organization_id", Uuid, nullable=False),
    Column("tag", Name(60), nullable=False),
    Column("status", String(16), nullable=False),
    Column("count", BigInteger, nullable=False),
    PrimaryKeyConstraint("organization_id", "tag", "status"),
)
