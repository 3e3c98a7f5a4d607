"""One mapping from every exception to the contract's error envelope."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from mycloud_compute.api.request_context import loggable_path, request_id_of
from mycloud_compute.api.schemas import ErrorBody, ErrorDetail
from mycloud_compute.persistence.database import is_database_unavailable
from mycloud_compute.services.errors import ServiceError, Unauthorized

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = "5"

# Error type of each status that Litestar itself raises.
_TYPE_BY_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "service_unavailable",
}

# The detail of the InternalServerException that Litestar raises when the client
# disconnects while the body is read (litestar/connection/request.py).
CLIENT_DISCONNECTED = "client disconnected prematurely"

_GENERIC_MESSAGES = {
    404: "the requested URL was not found",
    405: "the method is not allowed for the requested URL",
    413: "the request body is too large",
}


def error_response(
    request: Request[Any, Any, Any],
    status: int,
    error_type: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response[ErrorBody]:
    body = ErrorBody(
        ErrorDetail(
            code=status,
            type=error_type,
            message=message,
            details=details,
            request_id=request_id_of(request.scope),
        )
    )
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def handle_service_error(request: Request[Any, Any, Any], exc: ServiceError) -> Response[ErrorBody]:
    headers = None
    if isinstance(exc, Unauthorized):
        challenge = 'Bearer realm="mycloud"'
        if exc.token_given:
            challenge += ', error="invalid_token"'
        headers = {"WWW-Authenticate": challenge}
    elif exc.status == 503:
        headers = {"Retry-After": RETRY_AFTER_SECONDS}
    return error_response(request, exc.status, exc.type, exc.message, exc.details, headers)


def _validation_message(exc: ValidationException) -> tuple[str, dict[str, Any] | None]:
    """Turn Litestar's body validation error into one readable sentence."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    if extra and isinstance(extra[0], dict):
        first = extra[0]
        message = str(first.get("message", exc.detail))
        key = first.get("key")
        if key == "data":  # Litestar's name for the whole body
            if message == "'data'":  # the KeyError text Litestar reports for an empty body
                return "the request body is missing; send a JSON object", None
            return f"invalid request body: {message}", None
        if key:
            return f"invalid request body: {message} (field {key!r})", {"parameter": key}
        return f"invalid request body: {message}", None
    return "the request body is not valid JSON or does not match the expected object", None


def handle_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        message, details = _validation_message(exc)
        return error_response(request, 400, "invalid_request", message, details)
    if status == 500 and exc.detail == CLIENT_DISCONNECTED:
        # The client closed the connection before sending the whole body, so this
        # response is never read. It is a client error, not a server error.
        log.info("client disconnected before the end of the body request_id=%s",
                 request_id_of(request.scope))
        return error_response(request, 400, "invalid_request", "the request body is incomplete")
    if status >= 500:
        return handle_unexpected(request, exc)
    error_type = _TYPE_BY_STATUS.get(status, "invalid_request")
    message = _GENERIC_MESSAGES.get(status) or str(exc.detail) or error_type
    if status == 413:
        message += f"; the limit is {request.app.state.settings.max_body_bytes} bytes"
    if isinstance(exc.__cause__, SerializationException):
        message = f"the request body is not valid JSON: {exc.detail}"
    headers = None
    if status == 405:
        allowed = exc.headers.get("allow") if exc.headers else None
        headers = {"Allow": allowed} if allowed else None
    return error_response(request, status, error_type, message, None, headers)


def _database_error_text(exc: Exception) -> str:
    """Return the driver's own message, without the SQL statement or its parameters."""
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {original}"[:300]


def handle_database_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.warning(
        "database unavailable request_id=%s error=%s",
        request_id_of(request.scope), _database_error_text(exc),
    )
    return error_response(
        request,
        503,
        "service_unavailable",
        "the service is temporarily unavailable; retry later",
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    """True when ``exc`` or an exception it was raised from is a ``kind``."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    if is_database_unavailable(exc):
        return handle_database_unavailable(request, exc)
    if _caused_by(exc, RecursionError):
        # msgspec raises it while decoding JSON nested about a thousand levels deep.
        return error_response(
            request, 400, "invalid_request", "the request body is nested too deeply"
        )
    log.exception(
        "unhandled error request_id=%s method=%s path=%s",
        request_id_of(request.scope), request.method, loggable_path(request.url.path),
    )
    return error_response(request, 500, "internal_error", "internal server error")


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    ServiceError: handle_service_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
