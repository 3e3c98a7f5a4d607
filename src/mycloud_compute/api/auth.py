"""Bearer-token authentication and scope checks."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.authentication import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
)

from mycloud_compute.services.errors import Forbidden, Unauthorized
from mycloud_compute.services.identity import Principal, authenticate

# Routes that need no token (operations endpoints and the API documentation).
PUBLIC_PATHS = ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"]


class BearerTokenMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        headers = connection.headers.getall("authorization", [])
        if not headers:
            raise Unauthorized("authentication required: send Authorization: Bearer <token>", token_given=False)
        # Proxies and caches may keep a different one of several headers than we do.
        if len(headers) > 1:
            raise Unauthorized("send exactly one Authorization header", token_given=False)
        header = headers[0]
        scheme, _, secret = header.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret or " " in secret:
            raise Unauthorized(
                "the Authorization header must be 'Bearer <token>'", token_given=False
            )
        # A route with opt["token_cache"] confirms the token in its own statement.
        route_handler = connection.scope.get("route_handler")
        use_cache = route_handler is not None and bool(route_handler.opt.get("token_cache"))
        principal = await authenticate(connection.app.state.db, secret, use_cache=use_cache)
        return AuthenticationResult(user=principal, auth=None)


async def scope_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Reject a token that lacks the scope named in the route's ``opt["scope"]``.

    A coroutine on purpose: Litestar runs a plain-function guard in a worker thread,
    which costs every request a thread hand-off.
    """
    required = handler.opt.get("scope")
    if required is None:
        return
    principal: Principal = connection.user
    if not principal.allows(required):
        raise Forbidden(f"this operation needs a token with the {required!r} scope")
