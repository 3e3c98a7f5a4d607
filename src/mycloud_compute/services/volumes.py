"""Volume rules: create, list, show and delete volumes, and attach them to new instances.

Attaching follows OpenStack Nova and Cinder. An instance create request reserves
its volumes in the API transaction that stores the instance. Volumes it names are
locked and must be AVAILABLE, and volumes it requests by size are created there.
Both become IN_USE with the instance as their attachment at once, so a concurrent
request for the same volume finds it taken and fails with a 400, and no volume is
ever attached to two instances. Cinder has a separate ``reserved`` status for this
phase. The API has only AVAILABLE, IN_USE and DELETED, and a reserved volume is no
longer available, so it is shown as IN_USE. The ``attach_status`` column keeps the
difference: RESERVED until the build's BLOCK_DEVICE_MAPPING step marks it ATTACHED.

A build that fails keeps its volumes attached to the instance in ERROR. Deleting
the instance releases them like any other: volumes attached with
``delete_on_termination`` are deleted, the others become AVAILABLE.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import volumes as store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import idempotency as idempotency_service
from mycloud_compute.services.errors import Conflict, InvalidParameter, NotFound
from mycloud_compute.services.idempotency import Idempotency
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import ListQuery
from mycloud_compute.services.text import reject_control_characters

log = logging.getLogger(__name__)

MIN_SIZE_GB = 1
MAX_SIZE_GB = 16384
# Devices /dev/vdb to /dev/vdq, because /dev/vda is the root disk.
MAX_VOLUMES_PER_INSTANCE = 16


def check_name(name: str) -> None:
    """Apply the instance name rules: 1 to 255 characters, no control characters, trimmed."""
    if not 1 <= len(name) <= 255:
        raise InvalidParameter("name", name, "name must be 1 to 255 characters")
    reject_control_characters("name", name)
    if name != name.strip():
        raise InvalidParameter("name", name, "name must not start or end with whitespace")


def check_size(parameter: str, size_gb: int) -> None:
    if not MIN_SIZE_GB <= size_gb <= MAX_SIZE_GB:
        raise InvalidParameter(
            parameter, size_gb, f"size_gb must be between {MIN_SIZE_GB} and {MAX_SIZE_GB} GiB"
        )


# --- list, show, create, delete ------------------------------------------------------


@dataclass(frozen=True)
class VolumePage:
    rows: list[Row[Any]]
    total: int
    has_more: bool
    # Marker of the previous page: None with previous_is_first=False means there is
    # no previous page (this is the first page).
    previous_marker: uuid.UUID | None
    previous_is_first: bool


async def list_volumes(db: Database, principal: Principal, query: ListQuery) -> VolumePage:
    """Return a page of the organization's volumes, newest first, DELETED ones left out."""
    organization_id = principal.organization_id
    async with db.snapshot() as conn:
        position = None
        previous_marker, previous_is_first = None, False
        if query.marker is not None:
            # Deleted volumes stay valid markers, like deleted instances.
            position = await store.find_position(conn, organization_id, query.marker)
            if position is None:
                raise InvalidParameter("marker", str(query.marker), f"marker {query.marker} not found")
            previous_is_first, previous_marker = await store.position_before(
                conn, organization_id, marker=position, limit=query.limit
            )
        rows = await store.list_page(conn, organization_id, after=position, limit=query.limit)
        total = await store.count(conn, organization_id)
    return VolumePage(
        rows=rows[: query.limit],
        total=total,
        has_more=len(rows) > query.limit,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )


async def get_volume(db: Database, principal: Principal, volume_id: uuid.UUID) -> Row[Any]:
    async with db.snapshot() as conn:
        row = await store.get(conn, principal.organization_id, volume_id)
    if row is None or row.status == "DELETED":
        raise NotFound(f"volume {volume_id} not found")
    return row


def _new_volume_values(
    organization_id: uuid.UUID, volume_id: uuid.UUID, name: str, size_gb: int, now: datetime
) -> dict[str, Any]:
    return {
        "organization_id": organization_id,
        "id": volume_id,
        "name": name,
        "size_gb": size_gb,
        "status": "AVAILABLE",
        "attach_status": None,
        "instance_id": None,
        "device": None,
        "delete_on_termination": None,
        "created_at": now,
        "updated_at": now,
        "deleted_at": None,
    }


async def create_volume(
    db: Database,
    principal: Principal,
    name: str,
    size_gb: int,
    *,
    idempotency: Idempotency | None = None,
) -> Row[Any]:
    """Create a volume, AVAILABLE at once because volumes need no worker."""
    check_name(name)
    check_size("size_gb", size_gb)
    organization_id = principal.organization_id
    volume_id = uuid.uuid4()
    async with db.transaction() as conn:
        await idempotency_service.claim(conn, idempotency)
        await store.insert_volume(
            conn, _new_volume_values(organization_id, volume_id, name, size_gb, utcnow())
        )
        row = await store.get(conn, organization_id, volume_id)
        assert row is not None
        await idempotency_service.record(conn, idempotency, row)
    log.info(
        "volume created organization=%s volume_id=%s size_gb=%d", organization_id, volume_id, size_gb
    )
    return row


async def delete_volume(db: Database, principal: Principal, volume_id: uuid.UUID) -> None:
    """Mark an AVAILABLE volume DELETED. Raises Conflict (409) when it is attached."""
    organization_id = principal.organization_id
    async with db.transaction() as conn:
        locked = await store.lock_volumes(conn, organization_id, [volume_id])
        row = locked.get(volume_id)
        if row is None or row.status == "DELETED":
            raise NotFound(f"volume {volume_id} not found")
        if row.status != "AVAILABLE":
            raise Conflict(
                f"volume {volume_id} cannot be deleted while it is attached to instance "
                f"{row.instance_id} as {row.device}. Delete the instance first.",
                {"instance_id": str(row.instance_id)},
            )
        await store.delete_available(conn, organization_id, volume_id, utcnow())
    log.info("volume deleted organization=%s volume_id=%s", organization_id, volume_id)


# --- attaching at instance create ----------------------------------------------------


@dataclass(frozen=True)
class VolumeSpec:
    """One entry of an instance create request's ``volumes``: a new volume or an existing one."""

    size_gb: int | None = None
    volume_id: uuid.UUID | None = None
    delete_on_termination: bool = False


@dataclass(frozen=True)
class PlannedAttachment:
    """A volume for the new instance, with ``size_gb`` set when the volume is to be created."""

    volume_id: uuid.UUID
    device: str
    delete_on_termination: bool
    size_gb: int | None


def device_name(index: int) -> str:
    """Return the device of the ``index``-th attached volume: 0 is /dev/vdb."""
    if not 0 <= index < MAX_VOLUMES_PER_INSTANCE:
        raise ValueError(f"volume index {index} is outside 0..{MAX_VOLUMES_PER_INSTANCE - 1}")
    return f"/dev/vd{chr(ord('b') + index)}"


def check_specs(specs: list[VolumeSpec]) -> None:
    """Check the shape of ``volumes`` in a create request. ``plan_attachments`` checks the volumes it names."""
    if len(specs) > MAX_VOLUMES_PER_INSTANCE:
        raise InvalidParameter(
            "volumes", len(specs), f"volumes must list at most {MAX_VOLUMES_PER_INSTANCE} volumes"
        )
    seen: set[uuid.UUID] = set()
    for index, spec in enumerate(specs):
        if (spec.size_gb is None) == (spec.volume_id is None):
            raise InvalidParameter(
                "volumes",
                index,
                f"volumes[{index}] must have either size_gb (a new volume) or volume_id "
                "(an existing volume), not both and not neither",
            )
        if spec.size_gb is not None:
            check_size("volumes", spec.size_gb)
        if spec.volume_id is not None:
            if spec.volume_id in seen:
                raise InvalidParameter(
                    "volumes", str(spec.volume_id), f"volume {spec.volume_id} is listed more than once"
                )
            seen.add(spec.volume_id)


async def plan_attachments(
    conn: AsyncConnection, organization_id: uuid.UUID, specs: list[VolumeSpec]
) -> list[PlannedAttachment]:
    """Lock the existing volumes that ``specs`` name and check that each is AVAILABLE.

    The locks last until the transaction ends, so a concurrent create that names
    the same volume waits and then finds it IN_USE (on SQLite, writers run one at
    a time to the same effect). Devices follow the order of ``specs``.
    """
    requested = [spec.volume_id for spec in specs if spec.volume_id is not None]
    locked = await store.lock_volumes(conn, organization_id, requested)
    plan = []
    for index, spec in enumerate(specs):
        if spec.volume_id is not None:
            row = locked.get(spec.volume_id)
            if row is None or row.status == "DELETED":
                raise InvalidParameter("volumes", str(spec.volume_id), f"volume {spec.volume_id} not found")
            if row.status != "AVAILABLE":
                raise InvalidParameter(
                    "volumes",
                    str(spec.volume_id),
                    f"volume {spec.volume_id} is {row.status}, attached to instance "
                    f"{row.instance_id}. Only AVAILABLE volumes can be attached.",
                )
        plan.append(
            PlannedAttachment(
                volume_id=spec.volume_id or uuid.uuid4(),
                device=device_name(index),
                delete_on_termination=spec.delete_on_termination,
                size_gb=spec.size_gb,
            )
        )
    return plan


def attachments_document(plan: list[PlannedAttachment]) -> list[dict[str, Any]]:
    """Return the instance's ``volumes_attached`` value, in device order."""
    return [
        {"id": str(item.volume_id), "device": item.device, "delete_on_termination": item.delete_on_termination}
        for item in plan
    ]


def _generated_name(instance_name: str, device: str) -> str:
    """Name a volume created with an instance: "<instance name>-vdb", at most 255 characters."""
    suffix = "-" + device.rsplit("/", 1)[-1]
    return instance_name[: 255 - len(suffix)] + suffix


async def apply_attachments(
    conn: AsyncConnection,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    instance_name: str,
    plan: list[PlannedAttachment],
    now: datetime,
) -> None:
    """Create the planned new volumes and reserve the existing ones for the instance.

    Runs after the instance row is inserted (the volumes refer to it) and after
    ``plan_attachments`` locked the existing volumes in the same transaction.
    """
    for item in plan:
        if item.size_gb is not None:
            values = _new_volume_values(
                organization_id,
                item.volume_id,
                _generated_name(instance_name, item.device),
                item.size_gb,
                now,
            )
            values.update(
                status="IN_USE",
                attach_status=store.ATTACH_RESERVED,
                instance_id=instance_id,
                device=item.device,
                delete_on_termination=item.delete_on_termination,
            )
            await store.insert_volume(conn, values)
            continue
        reserved = await store.reserve(
            conn,
            organization_id,
            item.volume_id,
            instance_id=instance_id,
            device=item.device,
            delete_on_termination=item.delete_on_termination,
            now=now,
        )
        if not reserved:
            # plan_attachments holds the row lock, so only a bug gets here.
            raise RuntimeError(f"volume {item.volume_id} changed while it was locked")
