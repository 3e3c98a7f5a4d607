"""Outermost ASGI layer: request ids, JSON content-type checks and security headers.

It wraps the whole Litestar application, so every response, including the router's
own 404 and 405 responses, carries ``X-Request-Id`` and counts in the request metrics.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import msgspec

from mycloud_compute.api.metrics import RequestMetrics
from mycloud_compute.api.schemas import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)

ASGIApp = Any
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}
_JSON_TYPES = {"application/json"}

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]


def request_id_of(scope: Any) -> str:
    """Return the request id that the request-context layer stored in the ASGI scope."""
    state = scope.get("state") or {}
    return str(state.get("request_id", "req-unknown"))


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _has_body(scope: dict[str, Any]) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"0", b"")
    return _header(scope, b"transfer-encoding") is not None


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media_type = content_type.decode("latin-1").split(";", 1)[0].strip().lower()
    return media_type in _JSON_TYPES


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics = RequestMetrics(app)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        # A request that ends without a response (an error escaped, or the client left)
        # counts as a 500, which is what uvicorn sends when the connection is still open.
        status = 500
        incoming = _header(scope, b"x-request-id")
        incoming_text = incoming.decode("latin-1") if incoming else ""
        if _CLIENT_REQUEST_ID.match(incoming_text):
            request_id = incoming_text
        else:
            request_id = f"req-{uuid.uuid4()}"
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = [(b"x-request-id", request_id.encode()), *SECURITY_HEADERS]

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                message["headers"] = headers + extra_headers
            await send(message)

        path = scope.get("path", "")
        try:
            if (
                scope["method"].encode() in _BODY_METHODS
                and path.startswith("/v1/")
                and _has_body(scope)
                and not _is_json(_header(scope, b"content-type"))
            ):
                await self._send_415(request_id, send_with_headers)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.record(scope, status, elapsed)
            # One line per request, so every request id a client quotes can be found.
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request method=%s path=%s status=%d duration_ms=%.1f request_id=%s",
                    scope["method"], path[:200], status, elapsed * 1000, request_id,
                )

    @staticmethod
    async def _send_415(request_id: str, send: Any) -> None:
        body = msgspec.json.encode(
            ErrorBody(
                ErrorDetail(
                    code=415,
                    type="unsupported_media_type",
                    message="request bodies must be JSON; send Content-Type: application/json",
                    details=None,
                    request_id=request_id,
                )
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 415,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
