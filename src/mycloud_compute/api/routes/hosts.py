"""/v1/hosts: the compute hosts and their capacity usage, for tokens with the admin scope."""

from __future__ import annotations

from litestar import Request, get
from litestar.datastructures import State

from mycloud_compute.api import schemas
from mycloud_compute.api.links import page_links, page_meta
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, list_operation
from mycloud_compute.api.routes.common import path_id
from mycloud_compute.persistence.database import Database
from mycloud_compute.persistence.hosts import Host
from mycloud_compute.services import hosts as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.services.listing import parse_list_query
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]

_USAGE = (
    "`vcpus_used`, `ram_used` (MiB), `disk_used` (GiB) and `instance_count` are the sums "
    "over the instances placed on the host. A DISABLED host gets no new instances."
)


def _host(host: Host) -> schemas.Host:
    return schemas.Host(
        id=host.id,
        name=host.name,
        vcpus=host.vcpus,
        ram=host.ram,
        disk=host.disk,
        vcpus_used=host.vcpus_used,
        ram_used=host.ram_used,
        disk_used=host.disk_used,
        instance_count=host.instance_count,
        status=host.status,
    )


@get(
    "/v1/hosts",
    opt={"scope": "admin"},
    summary="List compute hosts",
    description=f"List compute hosts, ordered by name. {_USAGE}",
    operation_class=list_operation(()),
    responses=READ_ERRORS,
    tags=["hosts"],
)
async def list_hosts(request: AuthRequest, db: Database, settings: Settings) -> schemas.HostList:
    query = parse_list_query(request.scope["query_string"], ())
    page = await service.list_hosts(db, query)
    last_id = page.hosts[-1].id if page.hosts else None
    links = page_links(
        request,
        settings,
        query,
        (),
        last_id=last_id,
        has_more=page.has_more,
        previous_marker=page.previous_marker,
        previous_is_first=page.previous_is_first,
    )
    return schemas.HostList(
        hosts=[_host(host) for host in page.hosts],
        meta=page_meta(page.total, query.limit, last_id, page.has_more),
        links=links,
    )


@get(
    "/v1/hosts/{host_id:str}",
    opt={"scope": "admin"},
    summary="Show a compute host",
    description=_USAGE,
    responses=ITEM_ERRORS,
    tags=["hosts"],
)
async def show_host(host_id: str, db: Database) -> schemas.Host:
    return _host(await service.get_host(db, path_id("host", host_id)))


ROUTES = [list_hosts, show_host]
