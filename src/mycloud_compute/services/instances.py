"""Instance rules: what a request may create, change, list or delete."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import catalog as catalog_store
from mycloud_compute.persistence import instances as store
from mycloud_compute.persistence import networks as network_store
from mycloud_compute.persistence import security_groups as security_group_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.instances import InstanceFilters
from mycloud_compute.persistence.tables import flavors, images, instance_actions, tasks
from mycloud_compute.services import idempotency as idempotency_service
from mycloud_compute.services import instance_create, networks
from mycloud_compute.services import keypairs as keypair_service
from mycloud_compute.services import security_groups as security_group_service
from mycloud_compute.services import volumes as volume_service
from mycloud_compute.services.errors import InvalidParameter, NotFound
from mycloud_compute.services.idempotency import Idempotency
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.lifecycle import Status, TaskState, derive_status
from mycloud_compute.services.listing import ListQuery, QueryFilter, parse_uuid
from mycloud_compute.services.text import CONTROL_CLASS, WHITESPACE_CLASS, reject_control_characters

log = logging.getLogger(__name__)

# Most tags one instance may carry.
MAX_TAGS = 50

# Built once, so that a create does not rebuild them (building a statement costs Python time).
_INSERT_ACTION = instance_actions.insert()
_INSERT_TASK = tasks.insert()


# --- list filters -------------------------------------------------------------------


def _parse_name(value: str) -> tuple[str, bool]:
    if value == "":
        raise InvalidParameter("name", value, "name must not be empty; use name=* to match every name")
    if len(value) > 255:
        raise InvalidParameter("name", value, "name must be at most 255 characters")
    reject_control_characters("name", value)
    stem = value[:-1] if value.endswith("*") else value
    if "*" in stem:
        raise InvalidParameter(
            "name", value, "name may contain '*' only as its last character (prefix match)"
        )
    return stem, value.endswith("*")


def _parse_status(value: str) -> tuple[str, ...]:
    statuses: list[str] = []
    valid = ", ".join(Status)
    for part in value.split(","):
        candidate = part.strip().upper()
        if not candidate:
            raise InvalidParameter(
                "status", value, f"status must not contain an empty element; valid statuses: {valid}"
            )
        # str.upper() maps some non-ASCII letters to ASCII ones ("ſ" to "S").
        if not candidate.isascii() or candidate not in Status.__members__:
            raise InvalidParameter(
                "status", value, f"unknown status {part.strip()!r}; valid statuses: {valid}"
            )
        if candidate not in statuses:
            statuses.append(candidate)
    return tuple(statuses)


def _parse_tags(value: str) -> tuple[str, ...]:
    tags: list[str] = []
    parts = value.split(",")
    if len(parts) > MAX_TAGS:
        # An instance carries at most MAX_TAGS tags, so more can never match. The
        # limit also bounds the cost of the query.
        raise InvalidParameter("tags", value, f"tags may list at most {MAX_TAGS} tags")
    for part in parts:
        tag = part.strip()
        if not tag:
            raise InvalidParameter("tags", value, "tags must not contain an empty tag")
        reject_control_characters("tags", tag)
        if tag not in tags:
            tags.append(tag)
    return tuple(tags)


UUID_SCHEMA = {"type": "string", "format": "uuid"}

# The filter rules above as regular expressions for the OpenAPI document. Statuses
# match case-insensitively through [Aa] classes, because ECMA-262 patterns, which
# JSON Schema uses, have no inline flags.
_NAME_FILTER_PATTERN = rf"^[^*{CONTROL_CLASS}]*\*?$"
_STATUS_WORD = "|".join(
    "".join(f"[{char}{char.lower()}]" if char.isalpha() else char for char in status.value)
    for status in Status
)
_STATUS_ITEM = rf"[{WHITESPACE_CLASS}]*({_STATUS_WORD})[{WHITESPACE_CLASS}]*"
_STATUS_FILTER_PATTERN = rf"^{_STATUS_ITEM}(,{_STATUS_ITEM})*$"
_TAG_ITEM = rf"[{WHITESPACE_CLASS}]*[^,{WHITESPACE_CLASS}{CONTROL_CLASS}]([^,{CONTROL_CLASS}]*[^,{WHITESPACE_CLASS}{CONTROL_CLASS}])?[{WHITESPACE_CLASS}]*"
_TAGS_FILTER_PATTERN = rf"^{_TAG_ITEM}(,{_TAG_ITEM}){{0,{MAX_TAGS - 1}}}$"

INSTANCE_FILTERS = (
    QueryFilter(
        "name",
        _parse_name,
        "Filter by name: exact and case-sensitive, or a prefix when it ends with a single "
        "`*` (`web-*`). `*` alone matches every name. Other characters are literal.",
        {"type": "string", "minLength": 1, "maxLength": 255, "pattern": _NAME_FILTER_PATTERN},
        "web-*",
    ),
    QueryFilter(
        "status",
        _parse_status,
        "Filter by status, case-insensitive; a comma-separated list matches any of them. "
        "Without it, DELETED instances are not listed.",
        {"type": "string", "pattern": _STATUS_FILTER_PATTERN},
        "ACTIVE",
    ),
    QueryFilter(
        "tags",
        _parse_tags,
        "Comma-separated tags; an instance matches when it has every one of them.",
        {"type": "string", "pattern": _TAGS_FILTER_PATTERN},
        "web,production",
    ),
    QueryFilter(
        "flavor_id", lambda value: parse_uuid("flavor_id", value), "Filter by flavor ID.", UUID_SCHEMA
    ),
    QueryFilter(
        "image_id", lambda value: parse_uuid("image_id", value), "Filter by image ID.", UUID_SCHEMA
    ),
)


def _filters_from(query: ListQuery) -> InstanceFilters:
    name = query.filters.get("name")
    return InstanceFilters(
        name=name[0] if name else None,
        name_is_prefix=name[1] if name else False,
        statuses=query.filters.get("status"),
        tags=query.filters.get("tags"),
        flavor_id=query.filters.get("flavor_id"),
        image_id=query.filters.get("image_id"),
    )


@dataclass(frozen=True)
class InstancePage:
    rows: list[Row[Any]]
    total: int
    has_more: bool
    # Marker of the previous page: None with previous_is_first=False means there is
    # no previous page (this is the first page).
    previous_marker: uuid.UUID | None
    previous_is_first: bool


async def list_instances(db: Database, principal: Principal, query: ListQuery) -> InstancePage:
    filters = _filters_from(query)
    organization_id = principal.organization_id
    async with db.snapshot() as conn:
        position = None
        previous_marker, previous_is_first = None, False
        if query.marker is not None:
            position = await store.find_position(conn, organization_id, query.marker)
            if position is None:
                raise InvalidParameter(
                    "marker", str(query.marker), f"marker {query.marker} not found"
                )
            previous_is_first, previous_marker = await store.position_before(
                conn, organization_id, filters, marker=position, limit=query.limit
            )
        rows = list(
            await store.list_page(conn, organization_id, filters, after=position, limit=query.limit)
        )
        total = await store.count(conn, organization_id, filters)
    has_more = len(rows) > query.limit
    return InstancePage(
        rows=rows[: query.limit],
        total=total,
        has_more=has_more,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )


# --- single instances ---------------------------------------------------------------


async def get_instance(db: Database, principal: Principal, instance_id: uuid.UUID) -> Row[Any]:
    async with db.snapshot() as conn:
        row = await store.get(conn, principal.organization_id, instance_id)
    if row is None or row.status == Status.DELETED:
        raise NotFound(f"instance {instance_id} not found")
    return row


def check_name(name: str) -> None:
    reject_control_characters("name", name)
    if name != name.strip():
        raise InvalidParameter("name", name, "name must not start or end with whitespace")


def check_description(description: str) -> None:
    reject_control_characters("description", description, allow_line_breaks=True)


def check_metadata(metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        if not 1 <= len(key) <= 255:
            raise InvalidParameter("metadata", key, "metadata keys must be 1 to 255 characters")
        if len(value) > 255:
            raise InvalidParameter(
                "metadata", key, f"metadata value of {key!r} must be at most 255 characters"
            )
        reject_control_characters("metadata", key)
        reject_control_characters("metadata", value)


def check_tags(tags: list[str]) -> None:
    seen: set[str] = set()
    for tag in tags:
        if "," in tag or "/" in tag:
            raise InvalidParameter("tags", tag, f"tag {tag!r} must not contain ',' or '/'")
        if tag != tag.strip():
            raise InvalidParameter("tags", tag, f"tag {tag!r} must not start or end with whitespace")
        reject_control_characters("tags", tag)
        if tag in seen:
            raise InvalidParameter("tags", tag, f"tag {tag!r} is given more than once")
        seen.add(tag)


@dataclass(frozen=True)
class CreateRequest:
    """Validated fields of a create request (the HTTP layer decodes the JSON)."""

    name: str
    flavor_id: uuid.UUID
    image_id: uuid.UUID
    description: str
    networks: list[uuid.UUID] | None
    key_names: list[str]
    security_groups: list[str] | None
    metadata: dict[str, str]
    tags: list[str]
    volumes: list[volume_service.VolumeSpec] = field(default_factory=list)


async def _resolve_networks(
    conn: AsyncConnection, organization_id: uuid.UUID, requested: list[uuid.UUID] | None
) -> list[uuid.UUID]:
    # The networks stay locked until the create commits, so that a concurrent
    # network delete waits and then finds this instance (see networks.delete_network).
    if requested is None:
        return [await networks.ensure_default_network(conn, organization_id, lock=True)]
    if not requested:
        raise InvalidParameter("networks", [], "networks must name at least one network")
    if len(set(requested)) != len(requested):
        raise InvalidParameter("networks", [str(n) for n in requested], "networks must not repeat a network")
    found = await network_store.get_networks(conn, organization_id, requested, lock=True)
    for network_id in requested:
        if network_id not in found:
            raise InvalidParameter("networks", str(network_id), f"network {network_id} not found")
    return requested


async def _resolve_catalog(
    conn: AsyncConnection, principal: Principal, request: CreateRequest
) -> tuple[Row[Any], Row[Any]]:
    flavor = await catalog_store.get(
        conn, flavors, request.flavor_id, include_private=principal.allows("admin")
    )
    if flavor is None:
        raise InvalidParameter("flavor_id", str(request.flavor_id), f"flavor {request.flavor_id} not found")
    image = await catalog_store.get(conn, images, request.image_id)
    if image is None or image.status != "ACTIVE":
        raise InvalidParameter("image_id", str(request.image_id), f"image {request.image_id} not found")
    if flavor.disk < image.min_disk:
        raise InvalidParameter(
            "flavor_id",
            str(flavor.id),
            f"flavor {flavor.name} has a {flavor.disk} GiB disk, but image {image.name!r} "
            f"needs at least {image.min_disk} GiB",
        )
    if flavor.ram < image.min_ram:
        raise InvalidParameter(
            "flavor_id",
            str(flavor.id),
            f"flavor {flavor.name} has {flavor.ram} MiB of RAM, but image {image.name!r} "
            f"needs at least {image.min_ram} MiB",
        )
    instance_create.remember_catalog(flavor, image)
    return flavor, image


def _check_create(request: CreateRequest) -> None:
    check_name(request.name)
    check_description(request.description)
    check_metadata(request.metadata)
    check_tags(request.tags)
    volume_service.check_specs(request.volumes)
    for key_name in request.key_names:
        reject_control_characters("key_names", key_name)


async def _record_action(
    conn: AsyncConnection,
    principal: Principal,
    instance_id: uuid.UUID,
    action: str,
    request_id: str | None,
) -> uuid.UUID:
    action_id = uuid.uuid4()
    await conn.execute(
        _INSERT_ACTION,
        {
            "organization_id": principal.organization_id,
            "id": action_id,
            "instance_id": instance_id,
            "action": action,
            "status": "RUNNING",
            "request_id": request_id,
            "token_name": principal.token_name,
            "started_at": utcnow(),
        },
    )
    return action_id


async def _enqueue_task(
    conn: AsyncConnection,
    *,
    organization_id: uuid.UUID,
    instance_id: uuid.UUID,
    action: str,
    request_id: str | None,
    action_id: uuid.UUID,
) -> None:
    now = utcnow()
    await conn.execute(
        _INSERT_TASK,
        {
            "id": uuid.uuid4(),
            "organization_id": organization_id,
            "instance_id": instance_id,
            "action": action,
            "state": "PENDING",
            "step": None,
            "attempts": 0,
            "request_id": request_id,
            "action_id": action_id,
            "created_at": now,
            "updated_at": now,
        },
    )


async def create_instance(
    db: Database,
    principal: Principal,
    request: CreateRequest,
    *,
    request_id: str | None,
    idempotency: Idempotency | None = None,
) -> Row[Any] | instance_create.CreatedInstance:
    """Store a new instance in BUILD with its volumes reserved, and queue its create task.

    On PostgreSQL a create is first tried as one statement (services/instance_create.py);
    the transaction below runs when that changes nothing.
    """
    _check_create(request)
    if not db.is_sqlite:
        created = await instance_create.create_in_one_statement(
            db, principal, request, request_id=request_id, idempotency=idempotency
        )
        if created is not None:
            return created
    return await _create_in_transaction(
        db, principal, request, request_id=request_id, idempotency=idempotency
    )


async def _create_in_transaction(
    db: Database,
    principal: Principal,
    request: CreateRequest,
    *,
    request_id: str | None,
    idempotency: Idempotency | None,
) -> Row[Any]:
    organization_id = principal.organization_id
    instance_id = uuid.uuid4()
    now = utcnow()

    async with db.transaction() as conn:
        # First, so that a concurrent retry with the same key waits here.
        await idempotency_service.claim(conn, idempotency)
        flavor, image = await _resolve_catalog(conn, principal, request)
        network_ids = await _resolve_networks(conn, organization_id, request.networks)
        groups = await security_group_service.resolve_for_instance(
            conn, organization_id, request.security_groups
        )
        key_names = await keypair_service.resolve_key_names(conn, organization_id, request.key_names)
        attachments = await volume_service.plan_attachments(conn, organization_id, request.volumes)

        row = await store.insert_instance(
            conn,
            instance_create.instance_values(
                organization_id,
                instance_id,
                request,
                flavor={
                    "id": str(flavor.id),
                    "name": flavor.name,
                    "vcpus": flavor.vcpus,
                    "ram": flavor.ram,
                    "disk": flavor.disk,
                },
                image={"id": str(image.id), "name": image.name},
                network_ids=[str(network_id) for network_id in network_ids],
                security_group_names=[group.name for group in groups],
                key_names=key_names,
                volumes_attached=volume_service.attachments_document(attachments),
                now=now,
            ),
        )
        await security_group_store.attach_to_instance(
            conn, organization_id, instance_id, [group.id for group in groups]
        )
        await volume_service.apply_attachments(
            conn, organization_id, instance_id, request.name, attachments, now
        )
        action_id = await _record_action(conn, principal, instance_id, "create", request_id)
        await _enqueue_task(
            conn,
            organization_id=organization_id,
            instance_id=instance_id,
            action="create",
            request_id=request_id,
            action_id=action_id,
        )
        await idempotency_service.record(conn, idempotency, row)

    log.info(
        "instance create accepted request_id=%s organization=%s instance_id=%s flavor=%s image=%s "
        "volumes=%d",
        request_id, organization_id, instance_id, flavor.name, image.id, len(attachments),
    )
    return row


@dataclass(frozen=True)
class UpdateRequest:
    name: str | None = None
    description: str | None = None
    metadata: dict[str, str] | None = None
    tags: list[str] | None = None


async def update_instance(
    db: Database, principal: Principal, instance_id: uuid.UUID, request: UpdateRequest
) -> Row[Any]:
    values: dict[str, Any] = {}
    if request.name is not None:
        check_name(request.name)
        values["name"] = request.name
    if request.description is not None:
        check_description(request.description)
        values["description"] = request.description
    if request.metadata is not None:
        check_metadata(request.metadata)
        values["metadata"] = request.metadata
    if request.tags is not None:
        check_tags(request.tags)
        values["tags"] = request.tags

    organization_id = principal.organization_id
    async with db.transaction() as conn:
        row = await store.get_for_update(conn, organization_id, instance_id)
        if row is None or row.status == Status.DELETED:
            raise NotFound(f"instance {instance_id} not found")
        if values:
            values["updated_at"] = utcnow()
            await store.update_instance(conn, organization_id, instance_id, values)
            row = await store.get(conn, organization_id, instance_id)
    assert row is not None
    return row


async def delete_instance(
    db: Database, principal: Principal, instance_id: uuid.UUID, *, request_id: str | None
) -> None:
    """Mark the instance DELETING and queue its delete task; repeated deletes are no-ops."""
    organization_id = principal.organization_id
    async with db.transaction() as conn:
        row = await store.get_for_update(conn, organization_id, instance_id)
        if row is None or row.status == Status.DELETED:
            raise NotFound(f"instance {instance_id} not found")
        if row.task_state == TaskState.DELETING:
            return
        await store.update_instance(
            conn,
            organization_id,
            instance_id,
            {
                "task_state": TaskState.DELETING,
                "status": derive_status(row.vm_state, TaskState.DELETING),
                "updated_at": utcnow(),
            },
        )
        action_id = await _record_action(conn, principal, instance_id, "delete", request_id)
        await _enqueue_task(
            conn,
            organization_id=organization_id,
            instance_id=instance_id,
            action="delete",
            request_id=request_id,
            action_id=action_id,
        )
    log.info(
        "instance delete accepted request_id=%s organization=%s instance_id=%s",
        request_id, organization_id, instance_id,
    )
