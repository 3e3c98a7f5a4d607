"""/v1/instances/{id}/actions: instance actions and the action history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from litestar import Request, get, post
from litestar.datastructures import State
from litestar.openapi.spec import Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.status_codes import HTTP_202_ACCEPTED
from sqlalchemy.engine import Row

from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.links import page_envelope
from mycloud_compute.api.openapi import ITEM_ERRORS, WRITE_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import (
    InstanceAction,
    InstanceActionEmpty,
    InstanceActionList,
    InstanceReboot,
    InstanceResize,
)
from mycloud_compute.api.views import optional_timestamp, timestamp
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import actions as service
from mycloud_compute.services.errors import NotFound
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.lifecycle import Action, RebootType
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]
T = TypeVar("T")

BASE = "/v1/instances/{instance_id:str}/actions"


@dataclass
class _OptionalBodyOperation(Operation):
    """An operation whose JSON body may be left out.

    Litestar documents a ``data: Body | None`` parameter as a required body that
    may be JSON null, while these routes accept no body at all and reject null.
    """

    def __post_init__(self) -> None:
        body = self.request_body
        if not isinstance(body, RequestBody):
            return
        body.required = False
        for media in body.content.values():
            schema = media.schema
            if isinstance(schema, Schema) and schema.one_of:
                without_null = [
                    item
                    for item in schema.one_of
                    if not (isinstance(item, Schema) and item.type == OpenAPIType.NULL)
                ]
                if len(without_null) == 1:
                    media.schema = without_null[0]


async def _optional_body(request: AuthRequest, body_type: type[T]) -> T:
    """Decode a body that may be absent (then every field takes its default).

    Litestar has already rejected bodies that are not JSON; this second, strict
    decode rejects JSON null and the lenient conversions Litestar allows.
    """
    if not (await request.body()).strip():
        return body_type()
    return await strict_body(request, body_type)


def _record(row: Row[Any]) -> InstanceAction:
    return InstanceAction(
        id=row.id,
        instance_id=row.instance_id,
        action=row.action,
        status=row.status,
        request_id=row.request_id,
        started_at=timestamp(row.started_at),
        finished_at=optional_timestamp(row.finished_at),
        message=row.message,
        token_name=row.token_name,
    )


async def _accept(
    request: AuthRequest,
    db: Database,
    instance_id: str,
    action: service.ActionRequest,
    request_id: str,
) -> InstanceAction:
    row = await service.request_action(
        db, request.user, path_id("instance", instance_id), action, request_id=request_id
    )
    return _record(row)


def _action_route(path: str, summary: str, description: str, *, body_required: bool = False) -> post:
    """The decorator of one action route: POST, write scope, 202 with the action record."""
    return post(
        f"{BASE}/{path}",
        opt={"scope": "write"},
        status_code=HTTP_202_ACCEPTED,
        summary=summary,
        description=description
        + " Returns 202 with the action record (status RUNNING). The instance's state"
        " and GET /v1/instances/{instance_id}/actions show the outcome. Returns 409 when"
        " the instance's state does not allow the action.",
        operation_class=Operation if body_required else _OptionalBodyOperation,
        responses=WRITE_ERRORS,
        tags=["instances"],
    )


@_action_route(
    "start",
    "Start an instance",
    "Boot a SHUTOFF instance: task_state POWERING_ON, then ACTIVE / RUNNING. No body, or {}.",
)
async def start_instance(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceActionEmpty | None = None,
) -> InstanceAction:
    await _optional_body(request, InstanceActionEmpty)
    return await _accept(request, db, instance_id, service.ActionRequest(Action.START), request_id)


@_action_route(
    "stop",
    "Stop an instance",
    "Power off an ACTIVE instance, or one in ERROR that has a host: task_state POWERING_OFF, "
    "then SHUTOFF (vm_state STOPPED, power_state SHUTDOWN). No body, or {}.",
)
async def stop_instance(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceActionEmpty | None = None,
) -> InstanceAction:
    await _optional_body(request, InstanceActionEmpty)
    return await _accept(request, db, instance_id, service.ActionRequest(Action.STOP), request_id)


@_action_route(
    "reboot",
    "Reboot an instance",
    "SOFT (default) restarts an ACTIVE instance through its guest: status REBOOT. HARD "
    "power-cycles an ACTIVE, SHUTOFF or ERROR instance: status HARD_REBOOT while ACTIVE. "
    "Both end ACTIVE / RUNNING.",
)
async def reboot_instance(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceReboot | None = None,
) -> InstanceAction:
    body = await _optional_body(request, InstanceReboot)
    action = service.ActionRequest(Action.REBOOT, reboot_type=RebootType(body.type))
    return await _accept(request, db, instance_id, action, request_id)


@_action_route(
    "resize",
    "Resize an instance",
    "Move an ACTIVE or SHUTOFF instance to another flavor: status RESIZE (task_state "
    "RESIZE_PREP, RESIZE_MIGRATING, RESIZE_FINISH), then VERIFY_RESIZE with the new flavor. "
    "Confirm or revert it next. The disk cannot shrink, and the flavor must differ.",
    body_required=True,
)
async def resize_instance(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceResize,
) -> InstanceAction:
    body = await strict_body(request, InstanceResize)
    action = service.ActionRequest(Action.RESIZE, flavor_id=body.flavor_id)
    return await _accept(request, db, instance_id, action, request_id)


@_action_route(
    "confirm-resize",
    "Confirm a resize",
    "Keep the new flavor of a VERIFY_RESIZE instance and release the old flavor's host "
    "resources; the instance returns to ACTIVE (SHUTOFF if it was stopped). No body, or {}.",
)
async def confirm_resize(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceActionEmpty | None = None,
) -> InstanceAction:
    await _optional_body(request, InstanceActionEmpty)
    action = service.ActionRequest(Action.CONFIRM_RESIZE)
    return await _accept(request, db, instance_id, action, request_id)


@_action_route(
    "revert-resize",
    "Revert a resize",
    "Return a VERIFY_RESIZE instance to its old flavor and host and release the new "
    "flavor's host resources; the instance returns to ACTIVE (SHUTOFF if it was stopped). "
    "No body, or {}.",
)
async def revert_resize(
    request: AuthRequest,
    instance_id: str,
    db: Database,
    request_id: str,
    data: InstanceActionEmpty | None = None,
) -> InstanceAction:
    await _optional_body(request, InstanceActionEmpty)
    action = service.ActionRequest(Action.REVERT_RESIZE)
    return await _accept(request, db, instance_id, action, request_id)


@post(f"{BASE}/{{action:str}}", opt={"scope": "write"}, include_in_schema=False)
async def unknown_action(action: str) -> None:
    """Reject an action name that no route above serves (the router tries static paths first)."""
    valid = ", ".join(item.value for item in Action)
    raise NotFound(f"unknown action {action!r}; valid actions: {valid}")


@get(
    BASE,
    opt={"scope": "read"},
    summary="List an instance's actions",
    description="The instance's action history (create, actions, delete), newest first. "
    "A DELETED instance keeps its history.",
    operation_class=list_operation(()),
    responses=ITEM_ERRORS,
    tags=["instances"],
)
async def list_actions(
    request: AuthRequest, instance_id: str, db: Database, settings: Settings
) -> InstanceActionList:
    query = parse_list_query(request.scope["query_string"], ())
    page = await service.list_actions(db, request.user, path_id("instance", instance_id), query)
    meta, links = page_envelope(request, settings, query, (), page)
    return InstanceActionList(actions=[_record(row) for row in page.rows], meta=meta, links=links)


ROUTES = [
    start_instance,
    stop_instance,
    reboot_instance,
    resize_instance,
    confirm_resize,
    revert_resize,
    unknown_action,
    list_actions,
]
