"""The Idempotency-Key header on creating POST routes.

A route becomes idempotent in three steps: pass ``operation_class=idempotent_operation()``
to its decorator (documents the header), let its service function take an
``Idempotency | None`` argument (see services/idempotency.py), and return
``await create_once(request, db, create, render)``, where ``create(idempotency)``
calls the service and ``render(row)`` builds the response with ``json_response``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.openapi.spec import Operation, Parameter, Schema
from litestar.openapi.spec.enums import OpenAPIType

from mycloud_compute.persistence.database import Database
from mycloud_compute.services import idempotency as service
from mycloud_compute.services.idempotency import (
    Created,
    Idempotency,
    IdempotencyKey,
    StoredResponse,
)
from mycloud_compute.services.identity import Principal

IDEMPOTENCY_PARAMETER = Parameter(
    name=service.HEADER,
    param_in="header",
    required=False,
    description=(
        "A client-chosen key (1 to 255 printable ASCII characters, e.g. a UUID). A repeat "
        "with the same key and the same body within 24 hours returns the first response "
        "(status, body and Location) and creates nothing; the same key with a different "
        "body is a 409. Keys are scoped by organization and route. Failed requests "
        "store nothing and may be retried with the same key."
    ),
    schema=Schema(
        type=OpenAPIType.STRING,
        min_length=1,
        max_length=service.MAX_KEY_LENGTH,
        pattern="^[\\x20-\\x7E]+$",
    ),
)


def idempotent_operation() -> type[Operation]:
    """Return an Operation class that documents the Idempotency-Key header."""

    @dataclass
    class IdempotentOperation(Operation):
        def __post_init__(self) -> None:
            self.parameters = [*(self.parameters or []), IDEMPOTENCY_PARAMETER]

    return IdempotentOperation


async def idempotency_key(request: Request[Principal, Any, Any]) -> IdempotencyKey | None:
    """Read and check the request's Idempotency-Key, or return None when the header is absent."""
    key = service.check_key(request.headers.getall(service.HEADER, []))
    if key is None:
        return None
    return IdempotencyKey(
        organization_id=request.user.organization_id,
        key=key,
        route=f"{request.method} {request.scope['path']}",
        request_hash=service.hash_body(await request.body()),
    )


def json_response(content: Any, status_code: int, location: str | None = None) -> StoredResponse:
    """Encode a response body the way it is sent and stored."""
    return StoredResponse(status_code, msgspec.json.encode(content), location)


async def create_once(
    request: Request[Principal, Any, Any],
    db: Database,
    create: Callable[[Idempotency | None], Awaitable[Created]],
    render: Callable[[Created], StoredResponse],
) -> Response[Any]:
    """Run a create, or return the stored first response of its Idempotency-Key."""
    stored = await service.create_once(db, await idempotency_key(request), create, render)
    headers = {"Location": stored.location} if stored.location else None
    return Response(
        stored.body, status_code=stored.status_code, media_type=MediaType.JSON, headers=headers
    )
