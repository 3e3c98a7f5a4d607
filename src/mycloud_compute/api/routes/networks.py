"""/v1/networks: the organization's networks, from which instances get their addresses."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.engine import Row

from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.links import page_envelope
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, WRITE_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.api.schemas import Network, NetworkCreate, NetworkList
from mycloud_compute.api.views import timestamp
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import networks as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]


def network_view(row: Row[Any], region: str) -> Network:
    return Network(
        id=row.id,
        crn=f"crn:{region}:compute:network:{row.id}",
        name=row.name,
        cidr=row.cidr,
        ip_version=row.ip_version,
        created_at=timestamp(row.created_at),
    )


@get(
    "/v1/networks",
    opt={"scope": "read"},
    summary="List networks",
    description="List the networks of the current organization, newest first.",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["networks"],
)
async def list_networks(request: AuthRequest, db: Database, settings: Settings) -> NetworkList:
    query = parse_list_query(request.scope["query_string"], ())
    page = await service.list_networks(db, request.user.organization_id, query)
    meta, links = page_envelope(request, settings, query, (), page)
    return NetworkList(networks=[network_view(row, settings.region) for row in page.rows], meta=meta, links=links)


@post(
    "/v1/networks",
    opt={"scope": "write"},
    status_code=HTTP_201_CREATED,
    summary="Create a network",
    description=(
        "Create a network from a CIDR: IPv4 /8 to /29 or IPv6 /48 to /124, with the host "
        "bits zero, outside the loopback, link-local, multicast and reserved ranges. Names "
        "are unique in the organization (409)."
    ),
    responses=WRITE_ERRORS,
    tags=["networks"],
)
async def create_network(
    request: AuthRequest, data: NetworkCreate, db: Database, settings: Settings
) -> Response[Network]:
    data = await strict_body(request, NetworkCreate)
    row = await service.create_network(db, request.user.organization_id, data.name, data.cidr)
    return Response(
        network_view(row, settings.region),
        status_code=HTTP_201_CREATED,
        headers={"Location": f"/v1/networks/{row.id}"},
    )


@get(
    "/v1/networks/{network_id:str}",
    opt={"scope": "read"},
    summary="Show a network",
    responses=ITEM_ERRORS,
    tags=["networks"],
)
async def show_network(
    request: AuthRequest, network_id: str, db: Database, settings: Settings
) -> Network:
    row = await service.get_network(
        db, request.user.organization_id, path_id("network", network_id)
    )
    return network_view(row, settings.region)


@delete(
    "/v1/networks/{network_id:str}",
    opt={"scope": "write"},
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a network",
    description=(
        "Delete a network that no instance uses. A network with ports, or named by an "
        "instance that is still building, is in use (409)."
    ),
    responses={**ITEM_ERRORS, 409: WRITE_ERRORS[409]},
    tags=["networks"],
)
async def delete_network(request: AuthRequest, network_id: str, db: Database) -> None:
    await service.delete_network(db, request.user.organization_id, path_id("network", network_id))


ROUTES = [list_networks, create_network, show_network, delete_network]
