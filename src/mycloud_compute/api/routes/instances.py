"""/v1/instances"""

from __future__ import annotations

import functools
from typing import Any, cast

import msgspec
from litestar import MediaType, Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_202_ACCEPTED

from mycloud_compute.api import views
from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.idempotency import create_once, idempotent_operation, json_response
from mycloud_compute.api.links import envelope, page_envelope
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, WRITE_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import Instance, InstanceCreate, InstanceList, InstanceUpdate
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.instances import RenderedPage
from mycloud_compute.services import instance_pages
from mycloud_compute.services import instances as service
from mycloud_compute.services.errors import ServiceError
from mycloud_compute.services.identity import Principal, confirm_token
from mycloud_compute.services.listing import ListQuery, parse_list_query
from mycloud_compute.services.volumes import VolumeSpec
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]


@get(
    "/v1/instances",
    opt={"scope": "read", "token_cache": True},
    summary="List instances",
    description="List all instances in the current organization, newest first.",
    operation_class=list_operation(service.INSTANCE_FILTERS),
    responses=READ_ERRORS,
    tags=["instances"],
)
async def list_instances(request: AuthRequest) -> Response[InstanceList]:
    # The database and settings come from the application state rather than from
    # dependency injection, which costs this hot route a task group per request.
    db: Database = request.app.state.db
    settings: Settings = request.app.state.settings
    principal = request.user
    try:
        query = parse_list_query(request.scope["query_string"], service.INSTANCE_FILTERS)
        if db.is_sqlite:
            await confirm_token(db, principal)
            page = await service.list_instances(db, principal, query)
        else:
            rendered = await instance_pages.list_rendered(
                db, principal, query, crn_prefix_json=_crn_prefix(settings.region)
            )
    except ServiceError:
        # A principal from the token cache gets a 401 rather than another error when
        # its token was revoked meanwhile.
        await confirm_token(db, principal)
        raise
    if db.is_sqlite:
        meta, links = page_envelope(request, settings, query, service.INSTANCE_FILTERS, page)
        instances = [views.instance(row, settings.region) for row in page.rows]
        return Response(InstanceList(instances=instances, meta=meta, links=links))
    return _rendered_response(request, settings, query, rendered)


def _rendered_response(
    request: AuthRequest, settings: Settings, query: ListQuery, rendered: RenderedPage
) -> Response[InstanceList]:
    """Splice the page PostgreSQL rendered into the list envelope."""
    meta, links = envelope(
        request,
        settings,
        query,
        service.INSTANCE_FILTERS,
        total=rendered.total,
        last_id=rendered.last_id,
        has_more=rendered.has_more,
        previous_marker=rendered.previous_marker,
        previous_is_first=rendered.previous_is_first,
    )
    body = b"".join((
        b'{"instances":', rendered.instances_json.encode(),
        b',"meta":', msgspec.json.encode(meta),
        b',"links":', msgspec.json.encode(links), b"}",
    ))
    # The same bytes as encoding an InstanceList with these instances.
    return cast("Response[InstanceList]", Response(body, media_type=MediaType.JSON))


_crn_prefix = functools.lru_cache(maxsize=8)(instance_pages.crn_prefix)


@post(
    "/v1/instances",
    opt={"scope": "write"},
    status_code=HTTP_202_ACCEPTED,
    summary="Create an instance",
    description="Accept a create request; the instance builds asynchronously (status BUILD).",
    operation_class=idempotent_operation(),
    responses=WRITE_ERRORS,
    tags=["instances"],
)
async def create_instance(
    request: AuthRequest, data: InstanceCreate, db: Database, settings: Settings, request_id: str
) -> Response[Instance]:
    data = await strict_body(request, InstanceCreate)
    create_request = service.CreateRequest(
        name=data.name,
        flavor_id=data.flavor_id,
        image_id=data.image_id,
        description=data.description,
        networks=data.networks,
        key_names=data.key_names,
        security_groups=data.security_groups,
        metadata=data.metadata,
        tags=data.tags,
        volumes=[
            VolumeSpec(item.size_gb, item.volume_id, item.delete_on_termination)
            for item in data.volumes
        ],
    )
    return await create_once(
        request,
        db,
        lambda idempotency: service.create_instance(
            db, request.user, create_request, request_id=request_id, idempotency=idempotency
        ),
        lambda row: json_response(
            views.instance(row, settings.region), HTTP_202_ACCEPTED, f"/v1/instances/{row.id}"
        ),
    )


@get(
    "/v1/instances/{instance_id:str}",
    opt={"scope": "read"},
    summary="Show an instance",
    responses=ITEM_ERRORS,
    tags=["instances"],
)
async def show_instance(
    request: AuthRequest, instance_id: str, db: Database, settings: Settings
) -> Instance:
    row = await service.get_instance(db, request.user, path_id("instance", instance_id))
    return views.instance(row, settings.region)


def _unset_to_none(value: Any) -> Any:
    return None if value is msgspec.UNSET else value


@patch(
    "/v1/instances/{instance_id:str}",
    opt={"scope": "write"},
    summary="Update an instance",
    description="Change name, description, metadata (replaced) or tags (replaced).",
    responses=WRITE_ERRORS,
    tags=["instances"],
)
async def update_instance(
    request: AuthRequest, instance_id: str, data: InstanceUpdate, db: Database, settings: Settings
) -> Instance:
    data = await strict_body(request, InstanceUpdate)
    row = await service.update_instance(
        db,
        request.user,
        path_id("instance", instance_id),
        service.UpdateRequest(
            name=_unset_to_none(data.name),
            description=_unset_to_none(data.description),
            metadata=_unset_to_none(data.metadata),
            tags=_unset_to_none(data.tags),
        ),
    )
    return views.instance(row, settings.region)


@delete(
    "/v1/instances/{instance_id:str}",
    opt={"scope": "write"},
    status_code=HTTP_202_ACCEPTED,
    summary="Delete an instance",
    description="Accept a delete; the instance goes through task_state DELETING to DELETED.",
    responses=ITEM_ERRORS,
    tags=["instances"],
)
async def delete_instance(
    request: AuthRequest, instance_id: str, db: Database, request_id: str
) -> Response[None]:
    await service.delete_instance(
        db, request.user, path_id("instance", instance_id), request_id=request_id
    )
    return Response(None, status_code=HTTP_202_ACCEPTED, media_type=MediaType.TEXT)


ROUTES = [list_instances, create_instance, show_instance, update_instance, delete_instance]
