"""HEAD on every GET route, and one Allow header per path.

Litestar 2.25 rejects HEAD with a 405 unless a handler declares it. Its automatic OPTIONS
handler is built with the first route handler of a path and keeps that handler's
methods, so ``OPTIONS /v1/flavors`` listed ``GET, OPTIONS`` while POST was served too.
This layer runs HEAD as GET without the body (RFC 9110, section 9.3.2), and sets the
Allow header of OPTIONS and 405 responses from the router's full method table.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.exceptions import MethodNotAllowedException, NotFoundException
from litestar.utils import normalize_path

# No route serves this method, so routing it makes the router list the path's methods.
_PROBE_METHOD = "MYCLOUD-ALLOW-PROBE"
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class MethodsMiddleware:
    """Wrap the Litestar application: serve HEAD and correct the Allow header."""

    def __init__(self, app: Litestar) -> None:
        self.app = app
        # Read by RequestMetrics to name the route of requests Litestar did not route.
        self.asgi_router = app.asgi_router

    def allow_header(self, path: str) -> bytes | None:
        """Return the Allow value for ``path``, or None when no route matches it."""
        try:
            self.asgi_router.handle_routing(normalize_path(path), _PROBE_METHOD)
        except MethodNotAllowedException as exc:
            listed = (exc.headers or {}).get("allow", "")
        except NotFoundException:
            return None
        else:
            return None
        methods = {item.strip() for item in listed.split(",") if item.strip()}
        if "GET" in methods:
            methods.add("HEAD")
        return ", ".join(method for method in _METHOD_ORDER if method in methods).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        is_head = scope["method"] == "HEAD"
        path = scope.get("path", "")

        async def send_corrected(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", ())
                if any(key.lower() == b"allow" for key, _ in headers):
                    allow = self.allow_header(path)
                    if allow is not None:
                        message["headers"] = [
                            (key, value) for key, value in headers if key.lower() != b"allow"
                        ] + [(b"allow", allow)]
            elif is_head and message["type"] == "http.response.body":
                # Content-Length stays the GET body's length; only the body is left out.
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        if is_head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send_corrected)  # type: ignore[arg-type]
