"""key pairs, security group rules and networks

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _name_type() -> sa.types.TypeEngine[str]:
    return sa.String(length=255).with_variant(sa.String(length=255, collation="C"), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.create_index(
            "ix_networks_org_created", ["organization_id", "created_at", "id"], unique=False
        )
    with op.batch_alter_table("security_groups", schema=None) as batch_op:
        batch_op.create_index(
            "ix_security_groups_org_created", ["organization_id", "created_at", "id"], unique=False
        )

    op.create_table(
        "keypairs",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("name", _name_type(), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_keypairs_organization_id_organizations"),
        ),
        sa.PrimaryKeyConstraint("organization_id", "name", name=op.f("pk_keypairs")),
    )

    op.create_table(
        "security_group_rules",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("security_group_id", sa.Uuid(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("protocol", sa.String(length=8), nullable=True),
        sa.Column("port_range_min", sa.Integer(), nullable=True),
        sa.Column("port_range_max", sa.Integer(), nullable=True),
        sa.Column("remote_ip_prefix", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id", "security_group_id"],
            ["security_groups.organization_id", "security_groups.id"],
            name=op.f("fk_security_group_rules_organization_id_security_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "id", name=op.f("pk_security_group_rules")),
    )
    with op.batch_alter_table("security_group_rules", schema=None) as batch_op:
        batch_op.create_index(
            "ix_security_group_rules_org_group_position",
            ["organization_id", "security_group_id", "position"],
            unique=False,
        )

    op.create_table(
        "instance_security_groups",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("security_group_id", sa.Uuid(), nullable=False),
        sa.Column("instance_id", sa.Uuid(), nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id", "security_group_id"],
            ["security_groups.organization_id", "security_groups.id"],
            name=op.f("fk_instance_security_groups_organization_id_security_groups"),
        ),
        sa.ForeignKeyConstraint(
            ["organization_id", "instance_id"],
            ["instances.organization_id", "instances.id"],
            name=op.f("fk_instance_security_groups_organization_id_instances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id",
            "security_group_id",
            "instance_id",
            name=op.f("pk_instance_security_groups"),
        ),
    )

    # instance_security_groups starts empty. Before this revision the only groups were
    # the organizations' ``default`` groups, which can never be deleted, so their
    # in-use check never runs and they need no rows.
    _add_default_rules()


def _add_default_rules() -> None:
    """Give the existing ``default`` groups the egress rules that new ones start with."""
    bind = op.get_bind()
    groups = sa.table(
        "security_groups",
        sa.column("organization_id", sa.Uuid()),
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
    )
    rules = sa.table(
        "security_group_rules",
        sa.column("organization_id", sa.Uuid()),
        sa.column("id", sa.Uuid()),
        sa.column("security_group_id", sa.Uuid()),
        sa.column("position", sa.Integer()),
        sa.column("direction", sa.String()),
        sa.column("protocol", sa.String()),
        sa.column("port_range_min", sa.Integer()),
        sa.column("port_range_max", sa.Integer()),
        sa.column("remote_ip_prefix", sa.String()),
        sa.column("created_at", sa.DateTime()),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    rows = []
    for group in bind.execute(sa.select(groups).where(groups.c.name == "default")):
        for position, prefix in enumerate(("0.0.0.0/0", "::/0")):
            rows.append(
                {
                    "organization_id": group.organization_id,
                    "id": uuid.uuid4(),
                    "security_group_id": group.id,
                    "position": position,
                    "direction": "egress",
                    "protocol": None,
                    "port_range_min": None,
                    "port_range_max": None,
                    "remote_ip_prefix": prefix,
                    "created_at": now,
                }
            )
    if rows:
        op.bulk_insert(rules, rows)


def downgrade() -> None:
    op.drop_table("instance_security_groups")
    with op.batch_alter_table("security_group_rules", schema=None) as batch_op:
        batch_op.drop_index("ix_security_group_rules_org_group_position")
    op.drop_table("security_group_rules")
    op.drop_table("keypairs")
    with op.batch_alter_table("security_groups", schema=None) as batch_op:
        batch_op.drop_index("ix_security_groups_org_created")
    with op.batch_alter_table("networks", schema=None) as batch_op:
        batch_op.drop_index("ix_networks_org_created")
