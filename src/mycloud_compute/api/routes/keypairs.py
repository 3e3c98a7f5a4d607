"""/v1/keypairs: OpenSSH public keys, addressed by name.

Key pairs have no id, so their list is ordered by name and its ``marker`` is the
name of the last key pair of the previous page. Paging works otherwise exactly as
for every other list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from litestar import Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.openapi.spec import Operation, Parameter, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.engine import Row

from mycloud_compute.api.bodies import strict_body
from mycloud_compute.api.links import origin
from mycloud_compute.api.openapi import ITEM_ERRORS, READ_ERRORS, WRITE_ERRORS, list_parameters
from mycloud_compute.api.schemas import (
    KeyPair,
    KeyPairCreate,
    KeyPairList,
    KeyPairPageMeta,
    PageLinks,
)
from mycloud_compute.api.views import timestamp
from mycloud_compute.persistence.database import Database
from mycloud_compute.services import keypairs as service
from mycloud_compute.services.identity import Principal
from mycloud_compute.settings import Settings

AuthRequest = Request[Principal, None, State]

MARKER_PARAMETER = Parameter(
    name="marker",
    param_in="query",
    required=False,
    description="Name of the last key pair of the previous page (for pagination). A name "
    "that matches no key pair of the organization is a 400 invalid_parameter.",
    schema=Schema(type=OpenAPIType.STRING, min_length=1, max_length=service.MAX_NAME_LENGTH),
)


@dataclass
class KeyPairListOperation(Operation):
    """The list operation with ``limit`` and a ``marker`` that is a name, not a UUID."""

    def __post_init__(self) -> None:
        shared = [item for item in list_parameters(()) if item.name != "marker"]
        self.parameters = [*(self.parameters or []), *shared, MARKER_PARAMETER]


def keypair_view(row: Row[Any]) -> KeyPair:
    return KeyPair(
        name=row.name,
        public_key=row.public_key,
        fingerprint=row.fingerprint,
        type=row.type,
        created_at=timestamp(row.created_at),
    )


def _page_url(base: str, limit: int, marker: str | None) -> str:
    params = [("limit", str(limit))]
    if marker is not None:
        params.append(("marker", marker))
    return f"{base}?{urlencode(params, quote_via=quote)}"


def _links(
    request: AuthRequest,
    settings: Settings,
    query: service.KeyPairQuery,
    page: Any,
    last_name: str | None,
) -> PageLinks:
    base = origin(request, settings) + request.scope["path"]
    next_url = _page_url(base, query.limit, last_name) if page.has_more and last_name else None
    previous_url = None
    if query.marker is not None:
        previous_marker = None if page.previous_is_first else page.previous_marker
        previous_url = _page_url(base, query.limit, previous_marker)
    return PageLinks(
        self=_page_url(base, query.limit, query.marker), next=next_url, previous=previous_url
    )


@get(
    "/v1/keypairs",
    opt={"scope": "read"},
    summary="List key pairs",
    description="List the key pairs of the current organization, ordered by name.",
    operation_class=KeyPairListOperation,
    responses=READ_ERRORS,
    tags=["keypairs"],
)
async def list_keypairs(request: AuthRequest, db: Database, settings: Settings) -> KeyPairList:
    query = service.parse_list_query(request.scope["query_string"])
    page = await service.list_keypairs(db, request.user, query)
    last_name = page.rows[-1].name if page.rows else None
    return KeyPairList(
        keypairs=[keypair_view(row) for row in page.rows],
        meta=KeyPairPageMeta(
            total=page.total, limit=query.limit, marker=last_name, has_more=page.has_more
        ),
        links=_links(request, settings, query, page, last_name),
    )


@post(
    "/v1/keypairs",
    opt={"scope": "write"},
    status_code=HTTP_201_CREATED,
    summary="Import a key pair",
    description=(
        "Store an OpenSSH public key under a name that is unique in the organization (409). "
        "Accepted types: ssh-ed25519, ssh-rsa with 2048 to 16384 bits, "
        "ecdsa-sha2-nistp256/384/521. The response has the key's SHA256 fingerprint."
    ),
    responses=WRITE_ERRORS,
    tags=["keypairs"],
)
async def create_keypair(
    request: AuthRequest, data: KeyPairCreate, db: Database
) -> Response[KeyPair]:
    data = await strict_body(request, KeyPairCreate)
    row = await service.create_keypair(db, request.user, data.name, data.public_key)
    return Response(
        keypair_view(row),
        status_code=HTTP_201_CREATED,
        headers={"Location": f"/v1/keypairs/{quote(row.name, safe='')}"},
    )


@get(
    "/v1/keypairs/{keypair_name:str}",
    opt={"scope": "read"},
    summary="Show a key pair",
    responses=ITEM_ERRORS,
    tags=["keypairs"],
)
async def show_keypair(request: AuthRequest, keypair_name: str, db: Database) -> KeyPair:
    return keypair_view(await service.get_keypair(db, request.user, keypair_name))


@delete(
    "/v1/keypairs/{keypair_name:str}",
    opt={"scope": "write"},
    status_code=HTTP_204_NO_CONTENT,
    summary="Delete a key pair",
    description="Instances created with the key pair keep its name in `key_names`.",
    responses=ITEM_ERRORS,
    tags=["keypairs"],
)
async def delete_keypair(request: AuthRequest, keypair_name: str, db: Database) -> None:
    await service.delete_keypair(db, request.user, keypair_name)


ROUTES = [list_keypairs, create_keypair, show_keypair, delete_keypair]
