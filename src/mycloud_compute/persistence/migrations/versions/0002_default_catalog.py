"""install the default flavors and images

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from mycloud_compute.persistence.catalog_ids import catalog_id

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# name, vcpus, RAM MiB, disk GiB: the classic OpenStack m1 sizes.
FLAVORS = [
    ("m1.tiny", 1, 512, 1),
    ("m1.small", 1, 2048, 20),
    ("m1.medium", 2, 4096, 40),
    ("m1.large", 4, 8192, 80),
    ("m1.xlarge", 8, 16384, 160),
]

# name, os_distro, os_version, min_disk GiB, min_ram MiB
IMAGES = [
    ("Ubuntu 22.04 LTS", "ubuntu", "22.04", 10, 512),
    ("Ubuntu 24.04 LTS", "ubuntu", "24.04", 10, 1024),
    ("Debian 12", "debian", "12", 8, 512),
    ("Rocky Linux 9", "rocky", "9", 10, 1024),
    ("CirrOS 0.6.2", "cirros", "0.6.2", 1, 128),
]

flavors = sa.table(
    "flavors",
    sa.column("id", sa.Uuid),
    sa.column("name", sa.String),
    sa.column("vcpus", sa.Integer),
    sa.column("ram", sa.Integer),
    sa.column("disk", sa.Integer),
    sa.column("is_public", sa.Boolean),
    sa.column("created_at", sa.DateTime),
)

images = sa.table(
    "images",
    sa.column("id", sa.Uuid),
    sa.column("name", sa.String),
    sa.column("os_distro", sa.String),
    sa.column("os_version", sa.String),
    sa.column("min_disk", sa.Integer),
    sa.column("min_ram", sa.Integer),
    sa.column("status", sa.String),
    sa.column("created_at", sa.DateTime),
)


def upgrade() -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    op.bulk_insert(
        flavors,
        [
            {
                "id": catalog_id("flavor", name),
                "name": name,
                "vcpus": vcpus,
                "ram": ram,
                "disk": disk,
                "is_public": True,
                "created_at": now,
            }
            for name, vcpus, ram, disk in FLAVORS
        ],
    )
    op.bulk_insert(
        images,
        [
            {
                "id": catalog_id("image", name),
                "name": name,
                "os_distro": distro,
                "os_version": version,
                "min_disk": min_disk,
                "min_ram": min_ram,
                "status": "ACTIVE",
                "created_at": now,
            }
            for name, distro, version, min_disk, min_ram in IMAGES
        ],
    )


def downgrade() -> None:
    op.execute(flavors.delete().where(flavors.c.id.in_([catalog_id("flavor", f[0]) for f in FLAVORS])))
    op.execute(images.delete().where(images.c.id.in_([catalog_id("image", i[0]) for i in IMAGES])))
