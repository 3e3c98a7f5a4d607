"""/v1/volumes"""

from __future__ import annotations

from typing import Any

from litestar import MediaType, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.engine import Row

from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.idempotency import create_once, idempotent_operation, json_response
from mycloud_compute.api.links import page_envelope
from mycloud_compute.api.openapi import (
    ERROR_409,
    ITEM_ERRORS,
    READ_ERRORS,
    WRITE_ERRORS,
    list_operation,
)
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import InstanceAttachment, Volume, VolumeCreate, VolumeList
from mycloud_compute.api.views import timestamp
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import volumes as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]


def volume_view(row: Row[Any], region: str) -> Volume:
    attachments = []
    if row.instance_id is not None:
        attachments.append(InstanceAttachment(instance_id=row.instance_id, device=row.device))
    return Volume(
        id=row.id,
        crn=f"crn:{region}:compute:volume:{row.id}",
        name=row.name,
        size_gb=row.size_gb,
        status=row.status,
        attachments=attachments,
        created_at=timestamp(row.created_at),
    )


@get(
    "/v1/volumes",
    opt={"scope": "read"},
    summary="List volumes",
    description="List the volumes of the current organization, newest first. "
    "Deleted volumes are not listed.",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["volumes"],
)
async def list_volumes(request: AuthRequest, db: Database, settings: Settings) -> VolumeList:
    query = parse_list_query(request.scope["query_string"], ())
    page = await service.list_volumes(db, request.user, query)
    meta, links = page_envelope(request, settings, query, (), page)
    return VolumeList(volumes=[volume_view(row, settings.region) for row in page.rows], meta=meta, links=links)


@post(
    "/v1/volumes",
    opt={"scope": "write"},
    status_code=HTTP_201_CREATED,
    summary="Create a volume",
    description="Create an empty volume; it is AVAILABLE at once.",
    operation_class=idempotent_operation(),
    responses=WRITE_ERRORS,
    tags=["volumes"],
)
async def create_volume(
    request: AuthRequest, data: VolumeCreate, db: Database, settings: Settings
) -> Response[Volume]:
    data = await strict_body(request, VolumeCreate)
    return await create_once(
        request,
        db,
        lambda idempotency: service.create_volume(
            db, request.user, data.name, data.size_gb, idempotency=idempotency
        ),
        lambda row: json_response(
            volume_view(row, settings.region), HTTP_201_CREATED, f"/v1/volumes/{row.id}"
        ),
    )


@get(
    "/v1/volumes/{volume_id:str}",
    opt={"scope": "read"},
    summary="Show a volume",
    responses=ITEM_ERRORS,
    tags=["volumes"],
)
async def show_volume(request: AuthRequest, volume_id: str, db: Database, settings: Settings) -> Volume:
    row = await service.get_volume(db, request.user, path_id("volume", volume_id))
    return volume_view(row, settings.region)


@delete(
    "/v1/volumes/{volume_id:str}",
    opt={"scope": "write"},
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a volume",
    description="Delete an AVAILABLE volume. A volume attached to an instance is a 409.",
    responses={**ITEM_ERRORS, 409: ERROR_409},
    tags=["volumes"],
)
async def delete_volume(request: AuthRequest, volume_id: str, db: Database) -> Response[None]:
    await service.delete_volume(db, request.user, path_id("volume", volume_id))
    return Response(None, status_code=HTTP_204_NO_CONTENT, media_type=MediaType.TEXT)


ROUTES = [list_volumes, create_volume, show_volume, delete_volume]
