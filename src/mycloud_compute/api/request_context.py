"""Outermost ASGI layer: request ids, size and rate limits, JSON content-type checks
and security headers.

It wraps the whole Litestar application, so every response, including the router's
own 404 and 405 responses and the 414, 415, 429 and 431 responses of this layer,
carries ``X-Request-Id`` and the security headers and counts in the request metrics.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, NamedTuple

import msgspec

from mycloud_compute.api.metrics import RequestMetrics
from mycloud_compute.api.proxies import forwarded_proto
from mycloud_compute.api.rate_limit import RateLimiter
from mycloud_compute.api.schemas import ErrorBody, ErrorDetail
from mycloud_compute.services.identity import TOKEN_PREFIX
from mycloud_compute.settings import Settings

log = logging.getLogger(__name__)

ASGIApp = Any
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_BODY_METHODS = {b"POST", b"PUT", b"PATCH"}
_JSON_TYPES = {"application/json"}
_JSON_CHARSETS = {"utf-8", "utf8"}
# A token pasted into a URL path by mistake; replaced before the path is logged.
_TOKEN_IN_PATH = re.compile(re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_-]*")

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
# JSON responses load nothing and may not be framed. A response that sets its own
# policy (the /docs page) keeps it.
CONTENT_SECURITY_POLICY = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
# One year, the usual value. includeSubDomains is left to the proxy, which serves the subdomains.
STRICT_TRANSPORT_SECURITY = (b"strict-transport-security", b"max-age=31536000")


def request_id_of(scope: Any) -> str:
    """Return the request id that the request-context layer stored in the ASGI scope."""
    state = scope.get("state") or {}
    return str(state.get("request_id", "req-unknown"))


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def loggable_path(path: str) -> str:
    """Return the first 200 characters of a decoded URL path, safe to write to a log.

    A token pasted into the path is redacted. Control and other non-ASCII characters
    are written as Python escapes (``\\n``, ``\\x00``, ``\\u202e``), so a client
    cannot start a forged log line or hide text with a percent-encoded line break or
    direction override.
    """
    logged = path[:200]
    if TOKEN_PREFIX in logged:
        logged = _TOKEN_IN_PATH.sub(TOKEN_PREFIX + "[redacted]", logged)
    return logged.encode("unicode_escape").decode("ascii")


def _has_body(scope: dict[str, Any]) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"0", b"")
    return _header(scope, b"transfer-encoding") is not None


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    # Only the optional whitespace of HTTP: str.strip() would also drop bytes such as
    # 0x85 (NEL in Latin-1), so "application/json<0x85>" passed as JSON.
    media_type, *parameters = content_type.decode("latin-1").split(";")
    if media_type.strip(" \t").lower() not in _JSON_TYPES:
        return False
    # JSON is UTF-8 (RFC 8259), so a body declared in another charset is not JSON.
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip(" \t").lower() == "charset":
            return value.strip(" \t").strip('"').lower() in _JSON_CHARSETS
    return True


def _header_bytes(scope: dict[str, Any]) -> int:
    return sum(len(key) + len(value) for key, value in scope.get("headers", ()))


class RequestContextMiddleware:
    """Wrap ``app`` with request ids, limits and security headers.

    Without ``settings`` (a bare application, as in the benchmark's ceiling app) the
    limits take their default values and no rate limit applies.
    """

    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        self.metrics = RequestMetrics(app)
        self.settings = settings or Settings.model_construct()
        self.limiter: RateLimiter | None = None
        if settings is not None and settings.rate_limit_per_second > 0:
            self.limiter = RateLimiter(
                settings.rate_limit_per_second,
                settings.rate_limit_burst,
                settings.trusted_proxy_networks,
            )
        public_url = self.settings.public_url
        self.always_https = public_url is not None and public_url.startswith("https://")

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
        # An id that looks like a token would be logged with every line of the request.
        if _CLIENT_REQUEST_ID.match(incoming_text) and not incoming_text.startswith(TOKEN_PREFIX):
            request_id = incoming_text
        else:
            request_id = f"req-{uuid.uuid4()}"
        scope.setdefault("state", {})["request_id"] = request_id
        extra_headers = [(b"x-request-id", request_id.encode()), *SECURITY_HEADERS]
        if self.always_https or self._is_https(scope):
            extra_headers.append(STRICT_TRANSPORT_SECURITY)
        limiter = self.limiter

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"
                ]
                if not any(k.lower() == CONTENT_SECURITY_POLICY[0] for k, _ in headers):
                    headers.append(CONTENT_SECURITY_POLICY)
                message["headers"] = headers + extra_headers
                if status == 401 and limiter is not None:
                    limiter.record_unauthorized(scope)
            await send(message)

        path = scope.get("path", "")
        try:
            rejection = self._reject(scope, path)
            if rejection is not None:
                await _send_error(request_id, send_with_headers, *rejection)
                return
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.record(scope, status, elapsed)
            # One line per request, so every request id a client quotes can be found.
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "request method=%s path=%s status=%d duration_ms=%.1f request_id=%s",
                    scope["method"], loggable_path(path), status, elapsed * 1000, request_id,
                )

    def _is_https(self, scope: dict[str, Any]) -> bool:
        return forwarded_proto(scope, self.settings.trusted_proxy_networks) == "https"

    def _reject(self, scope: dict[str, Any], path: str) -> _Rejection | None:
        """Return the error response for a request this layer rejects, or None to pass it on."""
        header_bytes = _header_bytes(scope)
        if header_bytes > self.settings.max_header_bytes:
            return _Rejection(
                431,
                "invalid_request",
                f"the request headers are {header_bytes} bytes; the limit is "
                f"{self.settings.max_header_bytes} bytes",
            )
        query_bytes = len(scope.get("query_string", b""))
        if query_bytes > self.settings.max_query_bytes:
            return _Rejection(
                414,
                "invalid_request",
                f"the query string is {query_bytes} bytes; the limit is "
                f"{self.settings.max_query_bytes} bytes",
            )
        if self.limiter is not None:
            wait = self.limiter.admit(scope)
            if wait:
                return _Rejection(
                    429,
                    "rate_limited",
                    f"too many requests; retry after {wait} second{'' if wait == 1 else 's'}",
                    {"retry_after": wait},
                    [(b"retry-after", str(wait).encode())],
                )
        if (
            scope["method"].encode() in _BODY_METHODS
            and path.startswith("/v1/")
            and _has_body(scope)
            and not _is_json(_header(scope, b"content-type"))
        ):
            return _Rejection(
                415,
                "unsupported_media_type",
                "request bodies must be JSON; send Content-Type: application/json",
            )
        return None


class _Rejection(NamedTuple):
    status: int
    error_type: str
    message: str
    details: dict[str, Any] | None = None
    headers: list[tuple[bytes, bytes]] = []


async def _send_error(
    request_id: str,
    send: Any,
    status: int,
    error_type: str,
    message: str,
    details: dict[str, Any] | None,
    headers: list[tuple[bytes, bytes]],
) -> None:
    body = msgspec.json.encode(
        ErrorBody(
            ErrorDetail(
                code=status,
                type=error_type,
                message=message,
                details=details,
                request_id=request_id,
            )
        )
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
