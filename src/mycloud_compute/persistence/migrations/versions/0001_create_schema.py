"""create schema

Revision ID: 0001
Revises:
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('flavors',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('ram', sa.Integer(), nullable=False),
    sa.Column('disk', sa.Integer(), nullable=False),
    sa.Column('is_public', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_flavors'))
    )
    with op.batch_alter_table('flavors', schema=None) as batch_op:
        batch_op.create_index('ix_flavors_name_id', ['name', 'id'], unique=False)

    op.create_table('hosts',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('vcpus', sa.Integer(), nullable=False),
    sa.Column('ram', sa.BigInteger(), nullable=False),
    sa.Column('disk', sa.BigInteger(), nullable=False),
    sa.Column('vcpus_used', sa.Integer(), nullable=False),
    sa.Column('ram_used', sa.BigInteger(), nullable=False),
    sa.Column('disk_used', sa.BigInteger(), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hosts')),
    sa.UniqueConstraint('name', name=op.f('uq_hosts_name'))
    )
    op.create_table('images',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('os_distro', sa.String(length=64), nullable=False),
    sa.Column('os_version', sa.String(length=64), nullable=False),
    sa.Column('min_disk', sa.Integer(), nullable=False),
    sa.Column('min_ram', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_images'))
    )
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.create_index('ix_images_name_id', ['name', 'id'], unique=False)

    op.create_table('instance_actions',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('instance_id', sa.Uuid(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('token_name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_instance_actions'))
    )
    with op.batch_alter_table('instance_actions', schema=None) as batch_op:
        batch_op.create_index('ix_instance_actions_org_instance_started', ['organization_id', 'instance_id', 'started_at', 'id'], unique=False)

    op.create_table('organizations',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_organizations')),
    sa.UniqueConstraint('name', name=op.f('uq_organizations_name'))
    )
    op.create_table('tasks',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('instance_id', sa.Uuid(), nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('step', sa.String(length=32), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('request_id', sa.String(length=64), nullable=True),
    sa.Column('action_id', sa.Uuid(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks'))
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_org_instance', ['organization_id', 'instance_id'], unique=False)
        batch_op.create_index('ix_tasks_state_created', ['state', 'created_at'], unique=False)

    op.create_table('instances',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('description', sa.String(length=1024), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('vm_state', sa.String(length=16), nullable=False),
    sa.Column('task_state', sa.String(length=32), nullable=True),
    sa.Column('power_state', sa.String(length=16), nullable=False),
    sa.Column('flavor_id', sa.Uuid(), nullable=False),
    sa.Column('flavor', sa.JSON(), nullable=False),
    sa.Column('image_id', sa.Uuid(), nullable=False),
    sa.Column('image', sa.JSON(), nullable=False),
    sa.Column('host_id', sa.Uuid(), nullable=True),
    sa.Column('network_ids', sa.JSON(), nullable=False),
    sa.Column('addresses', sa.JSON(), nullable=False),
    sa.Column('security_groups', sa.JSON(), nullable=False),
    sa.Column('volumes_attached', sa.JSON(), nullable=False),
    sa.Column('key_names', sa.JSON(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('fault', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('launched_at', sa.DateTime(), nullable=True),
    sa.Column('terminated_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], name=op.f('fk_instances_organization_id_organizations')),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_instances'))
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index('ix_instances_org_created', ['organization_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_instances_org_flavor_created', ['organization_id', 'flavor_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_instances_org_image_created', ['organization_id', 'image_id', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_instances_org_name_created', ['organization_id', 'name', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_instances_org_status_created', ['organization_id', 'status', 'created_at', 'id'], unique=False)

    op.create_table('networks',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('cidr', sa.String(length=64), nullable=False),
    sa.Column('ip_version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], name=op.f('fk_networks_organization_id_organizations')),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_networks')),
    sa.UniqueConstraint('organization_id', 'name', name=op.f('uq_networks_organization_id_name'))
    )
    op.create_table('security_groups',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('description', sa.String(length=1024), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], name=op.f('fk_security_groups_organization_id_organizations')),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_security_groups')),
    sa.UniqueConstraint('organization_id', 'name', name=op.f('uq_security_groups_organization_id_name'))
    )
    op.create_table('tokens',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('name', sa.String(length=255).with_variant(sa.String(length=255, collation='C'), 'postgresql'), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('scopes', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['organization_id'], ['organizations.id'], name=op.f('fk_tokens_organization_id_organizations')),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_tokens')),
    sa.UniqueConstraint('organization_id', 'name', name=op.f('uq_tokens_organization_id_name')),
    sa.UniqueConstraint('secret_hash', name=op.f('uq_tokens_secret_hash'))
    )
    op.create_table('instance_tags',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('instance_id', sa.Uuid(), nullable=False),
    sa.Column('tag', sa.String(length=60).with_variant(sa.String(length=60, collation='C'), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['organization_id', 'instance_id'], ['instances.organization_id', 'instances.id'], name=op.f('fk_instance_tags_organization_id_instances'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('organization_id', 'instance_id', 'tag', name=op.f('pk_instance_tags'))
    )
    with op.batch_alter_table('instance_tags', schema=None) as batch_op:
        batch_op.create_index('ix_instance_tags_org_tag_instance', ['organization_id', 'tag', 'instance_id'], unique=False)

    op.create_table('ports',
    sa.Column('organization_id', sa.Uuid(), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('network_id', sa.Uuid(), nullable=False),
    sa.Column('instance_id', sa.Uuid(), nullable=False),
    sa.Column('address', sa.String(length=64), nullable=False),
    sa.Column('address_value', sa.BigInteger(), nullable=False),
    sa.Column('mac_address', sa.String(length=17), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['organization_id', 'network_id'], ['networks.organization_id', 'networks.id'], name=op.f('fk_ports_organization_id_networks')),
    sa.PrimaryKeyConstraint('organization_id', 'id', name=op.f('pk_ports')),
    sa.UniqueConstraint('mac_address', name=op.f('uq_ports_mac_address')),
    sa.UniqueConstraint('organization_id', 'network_id', 'address_value', name=op.f('uq_ports_organization_id_network_id_address_value'))
    )
    with op.batch_alter_table('ports', schema=None) as batch_op:
        batch_op.create_index('ix_ports_org_instance', ['organization_id', 'instance_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('ports', schema=None) as batch_op:
        batch_op.drop_index('ix_ports_org_instance')

    op.drop_table('ports')
    with op.batch_alter_table('instance_tags', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_tags_org_tag_instance')

    op.drop_table('instance_tags')
    op.drop_table('tokens')
    op.drop_table('security_groups')
    op.drop_table('networks')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_org_status_created')
        batch_op.drop_index('ix_instances_org_name_created')
        batch_op.drop_index('ix_instances_org_image_created')
        batch_op.drop_index('ix_instances_org_flavor_created')
        batch_op.drop_index('ix_instances_org_created')

    op.drop_table('instances')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_state_created')
        batch_op.drop_index('ix_tasks_org_instance')

    op.drop_table('tasks')
    op.drop_table('organizations')
    with op.batch_alter_table('instance_actions', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_actions_org_instance_started')

    op.drop_table('instance_actions')
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_name_id')

    op.drop_table('images')
    op.drop_table('hosts')
    with op.batch_alter_table('flavors', schema=None) as batch_op:
        batch_op.drop_index('ix_flavors_name_id')

    op.drop_table('flavors')
