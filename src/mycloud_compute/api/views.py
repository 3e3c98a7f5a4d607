"""Build response bodies from database rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Row

from mycloud_compute.api import schemas


def timestamp(value: datetime) -> datetime:
    """Convert a stored naive UTC time into an aware UTC time with whole seconds."""
    return value.replace(microsecond=0, tzinfo=UTC)


def optional_timestamp(value: datetime | None) -> datetime | None:
    return None if value is None else timestamp(value)


def instance(row: Row[Any], region: str) -> schemas.Instance:
    # The nested values are the JSON documents stored with the row, already in
    # their public shape; msgspec encodes them as they are, without conversion.
    return schemas.Instance(
        id=row.id,
        crn=f"crn:{region}:compute:instance:{row.id}",
        name=row.name,
        description=row.description,
        status=row.status,
        power_state=row.power_state,
        task_state=row.task_state,
        vm_state=row.vm_state,
        flavor=row.flavor,
        image=row.image,
        addresses=row.addresses,
        security_groups=row.security_groups,
        volumes_attached=row.volumes_attached,
        key_names=row.key_names,
        metadata=row.metadata,
        tags=row.tags,
        fault=row.fault,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        launched_at=optional_timestamp(row.launched_at),
        terminated_at=optional_timestamp(row.terminated_at),
    )


def flavor(row: Row[Any]) -> schemas.Flavor:
    return schemas.Flavor(
        id=row.id,
        name=row.name,
        vcpus=row.vcpus,
        ram=row.ram,
        disk=row.disk,
        is_public=row.is_public,
        created_at=timestamp(row.created_at),
    )


def image(row: Row[Any]) -> schemas.Image:
    return schemas.Image(
        id=row.id,
        name=row.name,
        os_distro=row.os_distro,
        os_version=row.os_version,
        min_disk=row.min_disk,
        min_ram=row.min_ram,
        status=row.status,
        created_at=timestamp(row.created_at),
    )
