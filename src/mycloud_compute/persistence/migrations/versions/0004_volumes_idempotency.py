"""volumes and idempotency keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _name() -> sa.String:
    return sa.String(length=255).with_variant(sa.String(length=255, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", _name(), nullable=False),
        sa.Column("size_gb", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attach_status", sa.String(length=16), nullable=True),
        sa.Column("instance_id", sa.Uuid(), nullable=True),
        sa.Column("device", sa.String(length=32), nullable=True),
        sa.Column("delete_on_termination", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_volumes")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_volumes_organization_id_organizations"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id", "instance_id"],
            ["instances.organization_id", "instances.id"],
            name=op.f("fk_volumes_organization_id_instances"),
        ),
    )
    op.create_index(
        "ix_volumes_org_created", "volumes", ["organization_id", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_volumes_org_instance", "volumes", ["organization_id", "instance_id"], unique=False
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("route", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("location", sa.String(length=255), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "key", "route", name=op.f("pk_idempotency_keys")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_idempotency_keys_organization_id_organizations"),
        ),
    )
    op.create_index(
        "ix_idempotency_keys_org_created",
        "idempotency_keys",
        ["organization_id", "created_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_org_created", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_volumes_org_instance", table_name="volumes")
    op.drop_index("ix_volumes_org_created", table_name="volumes")
    op.drop_table("volumes")
