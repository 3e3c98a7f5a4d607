"""plan list statements for large organizations

The list endpoint's statements are prepared once per connection, and after a few
runs PostgreSQL reuses a generic plan, which it chooses without the organization's
id. With the column's sampled statistics it then plans for an organization of
average size (100 instances in a region of 1,000,000 over 10,000 organizations).
For a page after a marker, that plan found the previous page's marker by reading
all of a large organization's entries of the name index and sorting them.

Two changes make the generic plans walk the list order and stop after the page:
- ``organization_id`` of ``instances`` gets a fixed ``n_distinct`` of -0.0001
  (one organization per 10,000 instances), so a generic plan assumes an
  organization of 10,000 instances, or the whole table when it is smaller.
- ``ix_instances_org_created`` includes the status, so the previous-page lookup,
  which needs only the order and the status, is an index-only scan in list order.

It also adds ``ix_instance_counts_totals``, the counter key with the count
included, so a list total sums the organization's counters from a few index pages
by an index-only scan. Through the primary key it read one heap page per counter
row (88 pages for the 100 counters of the large organization of the benchmark).
Counter updates are no longer heap-only (HOT) updates, because the count is now
in an index: each one also writes both index entries.

PostgreSQL only; SQLite plans every statement with its values.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ORGANIZATION_SHARE = "-0.0001"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_instances_org_created")
    op.execute(
        "CREATE INDEX ix_instances_org_created ON instances (organization_id, created_at, id) "
        "INCLUDE (status)"
    )
    op.execute(
        f"ALTER TABLE instances ALTER COLUMN organization_id SET (n_distinct = {ORGANIZATION_SHARE})"
    )
    op.execute(
        "CREATE INDEX ix_instance_counts_totals "
        "ON instance_counts (organization_id, status, flavor_id, image_id) INCLUDE (count)"
    )
    # The setting takes effect at the next ANALYZE; run it now rather than waiting
    # for autovacuum.
    op.execute("ANALYZE instances")
    op.execute("ANALYZE instance_counts")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_instance_counts_totals")
    op.execute("ALTER TABLE instances ALTER COLUMN organization_id RESET (n_distinct)")
    op.execute("DROP INDEX ix_instances_org_created")
    op.execute("CREATE INDEX ix_instances_org_created ON instances (organization_id, created_at, id)")
    op.execute("ANALYZE instances")
