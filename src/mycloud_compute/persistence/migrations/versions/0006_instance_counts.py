"""instance counts for list totals

Adds ``instance_counts``: how many instances each organization has per (status,
flavor_id, image_id). The list endpoint's ``meta.total`` for the unfiltered list
and for any mix of the status, flavor_id and image_id filters is a sum over a few
rows of this table instead of a count over the organization's instances.

Database triggers keep it exact, so every write site is covered, the API's and
the worker's alike. On PostgreSQL the triggers are deferred to commit, so a
transaction holds the lock on a counter row only while it commits, and a status
change locks its two rows in key order, so two opposite changes cannot deadlock.
SQLite runs one writer at a time, so plain row triggers suffice there.

It also copies each instance's status onto its ``instance_tags`` rows (a trigger
sets it on insert and follows every status change), so the total of a tags filter
is an index-only count over the tag's index entries instead of a join with the
instances. On PostgreSQL the tag index and the name index carry the status as an
included column for the same reason.

SQLite drops a table's triggers when a batch migration rebuilds the table; a later
migration that rebuilds ``instances`` must create them again (``create_sqlite_triggers``).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KEY = "organization_id, status, flavor_id, image_id"

POSTGRESQL_STATEMENTS = tuple(
    statement.strip()
    for statement in """
CREATE FUNCTION instance_counts_apply() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_first boolean;
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM instance_counts_add(NEW.organization_id, NEW.status, NEW.flavor_id, NEW.image_id, 1);
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM instance_counts_add(OLD.organization_id, OLD.status, OLD.flavor_id, OLD.image_id, -1);
    ELSE
        -- Lock the two counter rows in key order.
        old_first := (OLD.organization_id, OLD.status, OLD.flavor_id, OLD.image_id)
                   < (NEW.organization_id, NEW.status, NEW.flavor_id, NEW.image_id);
        IF old_first THEN
            PERFORM instance_counts_add(OLD.organization_id, OLD.status, OLD.flavor_id, OLD.image_id, -1);
        END IF;
        PERFORM instance_counts_add(NEW.organization_id, NEW.status, NEW.flavor_id, NEW.image_id, 1);
        IF NOT old_first THEN
            PERFORM instance_counts_add(OLD.organization_id, OLD.status, OLD.flavor_id, OLD.image_id, -1);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION instance_counts_add(
    p_organization_id uuid, p_status varchar, p_flavor_id uuid, p_image_id uuid, p_delta integer
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO instance_counts AS counts (organization_id, status, flavor_id, image_id, count)
    VALUES (p_organization_id, p_status, p_flavor_id, p_image_id, p_delta)
    ON CONFLICT (organization_id, status, flavor_id, image_id)
    DO UPDATE SET count = counts.count + EXCLUDED.count
$$;

CREATE FUNCTION instance_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM instance_counts;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER instance_counts_insert AFTER INSERT ON instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION instance_counts_apply();

CREATE CONSTRAINT TRIGGER instance_counts_delete AFTER DELETE ON instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION instance_counts_apply();

CREATE CONSTRAINT TRIGGER instance_counts_update AFTER UPDATE ON instances
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.organization_id, OLD.status, OLD.flavor_id, OLD.image_id)
          IS DISTINCT FROM (NEW.organization_id, NEW.status, NEW.flavor_id, NEW.image_id))
    EXECUTE FUNCTION instance_counts_apply();

CREATE TRIGGER instance_counts_truncate AFTER TRUNCATE ON instances
    FOR EACH STATEMENT EXECUTE FUNCTION instance_counts_clear();

CREATE FUNCTION instance_tags_take_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT status INTO NEW.status FROM instances
    WHERE organization_id = NEW.organization_id AND id = NEW.instance_id;
    RETURN NEW;
END $$;

CREATE FUNCTION instance_tags_follow_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE instance_tags SET status = NEW.status
    WHERE organization_id = NEW.organization_id AND instance_id = NEW.id;
    RETURN NULL;
END $$;

CREATE TRIGGER instance_tags_take_status BEFORE INSERT ON instance_tags
    FOR EACH ROW EXECUTE FUNCTION instance_tags_take_status();

CREATE TRIGGER instance_tags_follow_status AFTER UPDATE OF status ON instances
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION instance_tags_follow_status();

DROP INDEX ix_instance_tags_org_tag_instance;

CREATE INDEX ix_instance_tags_org_tag_instance
    ON instance_tags (organization_id, tag, instance_id) INCLUDE (status);

DROP INDEX ix_instances_org_name_created;

CREATE INDEX ix_instances_org_name_created
    ON instances (organization_id, name, created_at, id) INCLUDE (status)
""".split(";\n\n")
)

POSTGRESQL_DROP = (
    "DROP INDEX ix_instances_org_name_created",
    "CREATE INDEX ix_instances_org_name_created ON instances (organization_id, name, created_at, id)",
    "DROP INDEX ix_instance_tags_org_tag_instance",
    "CREATE INDEX ix_instance_tags_org_tag_instance ON instance_tags (organization_id, tag, instance_id)",
    "DROP TRIGGER IF EXISTS instance_tags_follow_status ON instances",
    "DROP TRIGGER IF EXISTS instance_tags_take_status ON instance_tags",
    "DROP FUNCTION IF EXISTS instance_tags_follow_status()",
    "DROP FUNCTION IF EXISTS instance_tags_take_status()",
    "DROP TRIGGER IF EXISTS instance_counts_truncate ON instances",
    "DROP TRIGGER IF EXISTS instance_counts_update ON instances",
    "DROP TRIGGER IF EXISTS instance_counts_delete ON instances",
    "DROP TRIGGER IF EXISTS instance_counts_insert ON instances",
    "DROP FUNCTION IF EXISTS instance_counts_clear()",
    "DROP FUNCTION IF EXISTS instance_counts_apply()",
    "DROP FUNCTION IF EXISTS instance_counts_add(uuid, varchar, uuid, uuid, integer)",
)


def _sqlite_add(row: str, delta: int) -> str:
    return (
        f"INSERT INTO instance_counts ({KEY}, count) "
        f"VALUES ({row}.organization_id, {row}.status, {row}.flavor_id, {row}.image_id, {delta}) "
        f"ON CONFLICT ({KEY}) DO UPDATE SET count = count + ({delta});"
    )


SQLITE_TRIGGERS = (
    f"CREATE TRIGGER instance_counts_insert AFTER INSERT ON instances BEGIN {_sqlite_add('NEW', 1)} END",
    f"CREATE TRIGGER instance_counts_delete AFTER DELETE ON instances BEGIN {_sqlite_add('OLD', -1)} END",
    "CREATE TRIGGER instance_counts_update AFTER UPDATE OF organization_id, status, flavor_id, image_id "
    "ON instances WHEN OLD.organization_id IS NOT NEW.organization_id OR OLD.status IS NOT NEW.status "
    "OR OLD.flavor_id IS NOT NEW.flavor_id OR OLD.image_id IS NOT NEW.image_id "
    f"BEGIN {_sqlite_add('OLD', -1)} {_sqlite_add('NEW', 1)} END",
    "CREATE TRIGGER instance_tags_take_status AFTER INSERT ON instance_tags BEGIN "
    "UPDATE instance_tags SET status = (SELECT status FROM instances WHERE "
    "instances.organization_id = NEW.organization_id AND instances.id = NEW.instance_id) "
    "WHERE rowid = NEW.rowid; END",
    "CREATE TRIGGER instance_tags_follow_status AFTER UPDATE OF status ON instances "
    "WHEN OLD.status IS NOT NEW.status BEGIN "
    "UPDATE instance_tags SET status = NEW.status "
    "WHERE organization_id = NEW.organization_id AND instance_id = NEW.id; END",
)


def create_sqlite_triggers() -> None:
    for statement in SQLITE_TRIGGERS:
        op.execute(statement)


def upgrade() -> None:
    op.create_table(
        "instance_counts",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("flavor_id", sa.Uuid(), nullable=False),
        sa.Column("image_id", sa.Uuid(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint(
            "organization_id", "status", "flavor_id", "image_id", name=op.f("pk_instance_counts")
        ),
    )
    op.execute(
        f"INSERT INTO instance_counts ({KEY}, count) "
        f"SELECT {KEY}, count(*) FROM instances GROUP BY {KEY}"
    )
    op.add_column("instance_tags", sa.Column("status", sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE instance_tags SET status = (SELECT status FROM instances WHERE "
        "instances.organization_id = instance_tags.organization_id "
        "AND instances.id = instance_tags.instance_id)"
    )
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRESQL_STATEMENTS:
            op.execute(statement)
    else:
        create_sqlite_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRESQL_DROP:
            op.execute(statement)
    else:
        for name in ("instance_counts_insert", "instance_counts_delete", "instance_counts_update",
                     "instance_tags_take_status", "instance_tags_follow_status"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    with op.batch_alter_table("instance_tags") as batch_op:
        batch_op.drop_column("status")
    op.drop_table("instance_counts")
