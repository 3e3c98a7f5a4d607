"""instance tag counts for list totals

Adds ``instance_tag_counts``: how many tag rows each organization has per (tag,
status), where the status is the instance's status that ``instance_tags`` carries
(migration 0006). An instance has a tag at most once, so this is the number of
instances per (organization, tag, status). The list endpoint's ``meta.total`` for
a filter on one tag, alone or with the status filter, is a sum over at most a few
rows of this table instead of a count over the tag's index entries.

Database triggers on ``instance_tags`` keep it exact through inserts, deletes
(including the cascade from a deleted instance) and updates, among them the status
updates that follow an instance's status. Rows whose status is still NULL are not
counted. On SQLite the trigger that copies the status sets it right after the
insert, and the update trigger counts the row then.

On PostgreSQL the counter rows are locked only while a transaction commits, and
in key order. One transaction often changes several tag rows (an instance with
three tags, a tag replacement, a status change of a tagged instance), so the row
trigger ``instance_tag_counts_collect`` writes each change to a temporary table,
``instance_tag_count_changes`` (created on first use in each session, emptied at
each commit). The deferred constraint trigger ``instance_tag_counts_flush`` then
applies the changes at commit, summed per counter row and sorted by key, so two
transactions that change the same counter rows lock them in the same order and
cannot deadlock on them. Changes that sum to zero, such as a tag replacement that
keeps a tag, lock nothing. The first deferred call applies every change of the
transaction, and the later calls find the temporary table empty. The trigger
names sort "collect" before "flush", so that even under SET CONSTRAINTS ...
IMMEDIATE, which fires both at the end of the statement in name order, a change
is collected before the flush of its row. SQLite runs one writer at a time, so
plain row triggers suffice there.

NOTE: a transaction locks ``instance_counts`` and this table in the order of its
first queued change to each. The service's write paths (create, tag replacement,
status change, delete) write the instance row before its tag rows, so
``instance_counts`` comes first. A transaction that changed tag rows and then an
instance's status, flavor or image could deadlock with one in the usual order.

SQLite drops a table's triggers when a batch migration rebuilds the table, so a
later migration that rebuilds ``instance_tags`` must create them again with
``create_sqlite_triggers`` (this one's and 0006's).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

KEY = "organization_id, tag, status"

POSTGRESQL_STATEMENTS = tuple(
    statement.strip()
    for statement in """
CREATE FUNCTION instance_tag_counts_collect() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('pg_temp.instance_tag_count_changes') IS NULL THEN
        CREATE TEMPORARY TABLE instance_tag_count_changes (
            organization_id uuid NOT NULL,
            tag varchar(60) COLLATE "C" NOT NULL,
            status varchar(16) NOT NULL,
            delta integer NOT NULL
        ) ON COMMIT DELETE ROWS;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        IF OLD.status IS NOT NULL THEN
            INSERT INTO pg_temp.instance_tag_count_changes
            VALUES (OLD.organization_id, OLD.tag, OLD.status, -1);
        END IF;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        IF NEW.status IS NOT NULL THEN
            INSERT INTO pg_temp.instance_tag_count_changes
            VALUES (NEW.organization_id, NEW.tag, NEW.status, 1);
        END IF;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION instance_tag_counts_flush() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass('pg_temp.instance_tag_count_changes') IS NULL THEN
        RETURN NULL;
    END IF;
    -- The INSERT takes the sorted rows one by one, so it locks them in key order.
    WITH changes AS (
        DELETE FROM pg_temp.instance_tag_count_changes
        RETURNING organization_id, tag, status, delta
    )
    INSERT INTO instance_tag_counts AS counts (organization_id, tag, status, count)
    SELECT organization_id, tag, status, sum(delta) FROM changes
    GROUP BY organization_id, tag, status
    HAVING sum(delta) <> 0
    ORDER BY organization_id, tag, status
    ON CONFLICT (organization_id, tag, status)
    DO UPDATE SET count = counts.count + EXCLUDED.count;
    RETURN NULL;
END $$;

CREATE FUNCTION instance_tag_counts_clear() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM instance_tag_counts;
    IF to_regclass('pg_temp.instance_tag_count_changes') IS NOT NULL THEN
        DELETE FROM pg_temp.instance_tag_count_changes;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER instance_tag_counts_collect AFTER INSERT OR DELETE ON instance_tags
    FOR EACH ROW EXECUTE FUNCTION instance_tag_counts_collect();

CREATE TRIGGER instance_tag_counts_collect_update AFTER UPDATE ON instance_tags
    FOR EACH ROW
    WHEN ((OLD.organization_id, OLD.tag, OLD.status)
          IS DISTINCT FROM (NEW.organization_id, NEW.tag, NEW.status))
    EXECUTE FUNCTION instance_tag_counts_collect();

CREATE CONSTRAINT TRIGGER instance_tag_counts_flush AFTER INSERT OR DELETE ON instance_tags
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION instance_tag_counts_flush();

CREATE CONSTRAINT TRIGGER instance_tag_counts_flush_update AFTER UPDATE ON instance_tags
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN ((OLD.organization_id, OLD.tag, OLD.status)
          IS DISTINCT FROM (NEW.organization_id, NEW.tag, NEW.status))
    EXECUTE FUNCTION instance_tag_counts_flush();

CREATE TRIGGER instance_tag_counts_truncate AFTER TRUNCATE ON instance_tags
    FOR EACH STATEMENT EXECUTE FUNCTION instance_tag_counts_clear()
""".split(";\n\n")
)

POSTGRESQL_DROP = (
    "DROP TRIGGER IF EXISTS instance_tag_counts_truncate ON instance_tags",
    "DROP TRIGGER IF EXISTS instance_tag_counts_flush_update ON instance_tags",
    "DROP TRIGGER IF EXISTS instance_tag_counts_flush ON instance_tags",
    "DROP TRIGGER IF EXISTS instance_tag_counts_collect_update ON instance_tags",
    "DROP TRIGGER IF EXISTS instance_tag_counts_collect ON instance_tags",
    "DROP FUNCTION IF EXISTS instance_tag_counts_clear()",
    "DROP FUNCTION IF EXISTS instance_tag_counts_flush()",
    "DROP FUNCTION IF EXISTS instance_tag_counts_collect()",
)


def _sqlite_add(row: str, delta: int) -> str:
    # The WHERE clause also keeps SQLite from reading ON CONFLICT as part of the SELECT.
    return (
        f"INSERT INTO instance_tag_counts ({KEY}, count) "
        f"SELECT {row}.organization_id, {row}.tag, {row}.status, {delta} WHERE {row}.status IS NOT NULL "
        f"ON CONFLICT ({KEY}) DO UPDATE SET count = count + ({delta});"
    )


SQLITE_TRIGGER_NAMES = (
    "instance_tag_counts_insert",
    "instance_tag_counts_delete",
    "instance_tag_counts_update",
)

SQLITE_TRIGGERS = (
    f"CREATE TRIGGER instance_tag_counts_insert AFTER INSERT ON instance_tags "
    f"BEGIN {_sqlite_add('NEW', 1)} END",
    f"CREATE TRIGGER instance_tag_counts_delete AFTER DELETE ON instance_tags "
    f"BEGIN {_sqlite_add('OLD', -1)} END",
    "CREATE TRIGGER instance_tag_counts_update AFTER UPDATE OF organization_id, tag, status "
    "ON instance_tags WHEN OLD.organization_id IS NOT NEW.organization_id OR OLD.tag IS NOT NEW.tag "
    "OR OLD.status IS NOT NEW.status "
    f"BEGIN {_sqlite_add('OLD', -1)} {_sqlite_add('NEW', 1)} END",
)


def create_sqlite_triggers() -> None:
    for statement in SQLITE_TRIGGERS:
        op.execute(statement)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    op.create_table(
        "instance_tag_counts",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column(
            "tag",
            sa.String(length=60).with_variant(sa.String(length=60, collation="C"), "postgresql"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "tag", "status", name=op.f("pk_instance_tag_counts")),
    )
    if postgresql:
        # Writers of tag rows wait until the triggers exist, so the backfill misses none.
        op.execute("LOCK TABLE instance_tags IN SHARE ROW EXCLUSIVE MODE")
    op.execute(
        f"INSERT INTO instance_tag_counts ({KEY}, count) "
        f"SELECT {KEY}, count(*) FROM instance_tags WHERE status IS NOT NULL GROUP BY {KEY}"
    )
    if postgresql:
        for statement in POSTGRESQL_STATEMENTS:
            op.execute(statement)
    else:
        create_sqlite_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in POSTGRESQL_DROP:
            op.execute(statement)
    else:
        for name in SQLITE_TRIGGER_NAMES:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_table("instance_tag_counts")
