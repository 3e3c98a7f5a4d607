"""Instance actions (start, stop, reboot, resize, confirm-resize, revert-resize) and their history.

Accepting an action is one transaction: lock the instance row, check the
lifecycle table, set the action's task_state, record the action and queue its
task. A second request for the same instance waits for the lock and then reads
the new task_state, so two actions never start together. The worker runs the
task and records the outcome in the action record.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from mycloud_compute.persistence import actions as action_store
from mycloud_compute.persistence import catalog as catalog_store
from mycloud_compute.persistence import instances as instance_store
from mycloud_compute.persistence.clock import utcnow
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.tables import flavors, images
from mycloud_compute.services.errors import InvalidParameter, NotFound
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.instances import _enqueue_task, _record_action
from mycloud_compute.services.lifecycle import (
    Action,
    InstanceInvalidState,
    RebootType,
    Status,
    action_label,
    check_action,
    derive_status,
)
from mycloud_compute.services.listing import ListQuery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActionRequest:
    """A decoded action request: ``reboot_type`` is set for reboot only, ``flavor_id`` for resize only."""

    action: Action
    reboot_type: RebootType | None = None
    flavor_id: uuid.UUID | None = None


def flavor_document(flavor: Row[Any]) -> dict[str, Any]:
    """Return the ``flavor`` JSON an instance stores: the catalog values at this moment."""
    return {
        "id": str(flavor.id),
        "name": flavor.name,
        "vcpus": flavor.vcpus,
        "ram": flavor.ram,
        "disk": flavor.disk,
    }


async def _resolve_resize_flavor(
    conn: AsyncConnection, instance: Row[Any], flavor_id: uuid.UUID | None, *, include_private: bool
) -> dict[str, Any]:
    """Return the target flavor's JSON, or raise InvalidParameter when it cannot take the instance.

    A private flavor is "not found" unless ``include_private``, as in a create, so a
    resize does not show its name or size to a caller who cannot list it.
    """
    if flavor_id is None:
        raise InvalidParameter("flavor_id", None, "resize needs a flavor_id")
    flavor = await catalog_store.get(conn, flavors, flavor_id, include_private=include_private)
    if flavor is None:
        raise InvalidParameter("flavor_id", str(flavor_id), f"flavor {flavor_id} not found")

    current = instance.flavor
    if str(flavor.id) == current["id"]:
        raise InvalidParameter(
            "flavor_id",
            str(flavor_id),
            f"instance {instance.id} already has flavor {flavor.name}; choose another flavor",
        )
    if flavor.disk < int(current["disk"]):
        raise InvalidParameter(
            "flavor_id",
            str(flavor_id),
            f"flavor {flavor.name} has a {flavor.disk} GiB disk, smaller than the "
            f"{current['disk']} GiB disk of instance {instance.id}, and a resize cannot shrink a disk",
        )

    # The image may have left the catalog since the build; its minimums still apply.
    image = await catalog_store.get(conn, images, instance.image_id, deleted=True)
    if image is not None and flavor.ram < image.min_ram:
        raise InvalidParameter(
            "flavor_id",
            str(flavor_id),
            f"flavor {flavor.name} has {flavor.ram} MiB of RAM, but image {image.name!r} "
            f"needs at least {image.min_ram} MiB",
        )
    return flavor_document(flavor)


async def _check_no_unfinished_task(conn: AsyncConnection, instance: Row[Any], label: str) -> None:
    """Reject the action while a task of the instance is queued or running.

    confirm-resize and revert-resize leave task_state null, so task_state alone
    does not show that their task is still queued.
    """
    task = await action_store.find_unfinished_task(conn, instance.organization_id, instance.id)
    if task is not None:
        raise InstanceInvalidState(
            f"instance {instance.id} has a {task.action} task in progress, so the {label} "
            "action cannot start; retry when it has finished",
            {
                "action": label,
                "status": instance.status,
                "vm_state": instance.vm_state,
                "task_state": instance.task_state,
            },
        )


def _check_no_resize_claims(instance: Row[Any], label: str) -> None:
    """Reject a resize while claims of an earlier resize are still recorded.

    Only a resize whose failure could not be cleaned up leaves them behind; the
    instance's delete releases them.
    """
    if instance.new_host_id is not None or instance.old_host_id is not None:
        raise InstanceInvalidState(
            f"instance {instance.id} has host resources claimed by an earlier resize that did "
            f"not finish, so the {label} action cannot start (delete the instance to release them)",
            {
                "action": label,
                "status": instance.status,
                "vm_state": instance.vm_state,
                "task_state": instance.task_state,
            },
        )


async def request_action(
    db: Database,
    principal: Principal,
    instance_id: uuid.UUID,
    request: ActionRequest,
    *,
    request_id: str | None,
) -> Row[Any]:
    """Accept an action: check the state, set the action's task_state and queue its task.

    Returns the new action record (status RUNNING). Raises NotFound for an
    instance that is not in the caller's organization or is DELETED,
    InvalidParameter for a resize flavor that does not fit, and
    InstanceInvalidState (409) when the instance's state does not allow the action.
    """
    organization_id = principal.organization_id
    label = action_label(request.action, request.reboot_type)
    async with db.transaction() as conn:
        instance = await instance_store.get_for_update(conn, organization_id, instance_id)
        if instance is None or instance.status == Status.DELETED:
            raise NotFound(f"instance {instance_id} not found")

        new_flavor = None
        if request.action == Action.RESIZE:
            new_flavor = await _resolve_resize_flavor(
                conn, instance, request.flavor_id, include_private=principal.allows("admin")
            )
        rule = check_action(
            request.action,
            request.reboot_type,
            instance_id=instance.id,
            vm_state=instance.vm_state,
            task_state=instance.task_state,
            has_host=instance.host_id is not None,
        )
        await _check_no_unfinished_task(conn, instance, label)
        if request.action == Action.RESIZE:
            _check_no_resize_claims(instance, label)

        values: dict[str, Any] = {}
        if rule.task_state is not None:
            values["task_state"] = rule.task_state.value
            values["status"] = derive_status(instance.vm_state, rule.task_state).value
        if new_flavor is not None:
            values["new_flavor"] = new_flavor
        if values:
            values["updated_at"] = utcnow()
            await instance_store.update_instance(conn, organization_id, instance_id, values)

        action_id = await _record_action(conn, principal, instance_id, request.action.value, request_id)
        await _enqueue_task(
            conn,
            organization_id=organization_id,
            instance_id=instance_id,
            action=request.action.value,
            request_id=request_id,
            action_id=action_id,
        )
        record = await action_store.get(conn, organization_id, action_id)

    log.info(
        "instance action accepted request_id=%s organization=%s instance_id=%s action=%s action_id=%s",
        request_id, organization_id, instance_id, label, action_id,
    )
    assert record is not None
    return record


# --- history ------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionPage:
    rows: list[Row[Any]]
    total: int
    has_more: bool
    # Marker of the previous page: None with previous_is_first=False means there is
    # no previous page (this is the first page).
    previous_marker: uuid.UUID | None
    previous_is_first: bool


async def list_actions(
    db: Database, principal: Principal, instance_id: uuid.UUID, query: ListQuery
) -> ActionPage:
    """Return one page of the instance's action history, newest first.

    A DELETED instance keeps its history, so it can still be listed here.
    """
    organization_id = principal.organization_id
    async with db.snapshot() as conn:
        if await instance_store.find_position(conn, organization_id, instance_id) is None:
            raise NotFound(f"instance {instance_id} not found")

        position = None
        previous_marker, previous_is_first = None, False
        if query.marker is not None:
            position = await action_store.find_position(conn, organization_id, instance_id, query.marker)
            if position is None:
                raise InvalidParameter("marker", str(query.marker), f"marker {query.marker} not found")
            previous_is_first, previous_marker = await action_store.position_before(
                conn, organization_id, instance_id, marker=position, limit=query.limit
            )
        rows = await action_store.list_page(
            conn, organization_id, instance_id, after=position, limit=query.limit
        )
        total = await action_store.count(conn, organization_id, instance_id)
    return ActionPage(
        rows=rows[: query.limit],
        total=total,
        has_more=len(rows) > query.limit,
        previous_marker=previous_marker,
        previous_is_first=previous_is_first,
    )
