"""instance actions and resize

Adds the columns that record the host claims of a resize besides the instance's
current (flavor, host_id): the target flavor and its claim while the resize runs,
and the previous flavor and its claim until the resize is confirmed or reverted.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RESIZE_COLUMNS = (
    ("new_flavor", sa.JSON),
    ("new_host_id", sa.Uuid),
    ("old_flavor", sa.JSON),
    ("old_host_id", sa.Uuid),
)


def upgrade() -> None:
    # Batch mode, so that SQLite, which cannot alter most of a table in place, works too.
    with op.batch_alter_table("instances") as batch_op:
        for name, column_type in RESIZE_COLUMNS:
            batch_op.add_column(sa.Column(name, column_type(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch_op:
        for name, _ in reversed(RESIZE_COLUMNS):
            batch_op.drop_column(name)
