"""Domain errors. The HTTP layer turns each into the contract's error envelope."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error a client can cause; ``status`` and ``type`` are stable."""

    status = 400
    type = "invalid_request"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidParameter(ServiceError):
    type = "invalid_parameter"

    def __init__(self, parameter: str, value: object, message: str) -> None:
        super().__init__(message, {"parameter": parameter, "value": value})


class InvalidRequest(ServiceError):
    type = "invalid_request"


class Unauthorized(ServiceError):
    status = 401
    type = "unauthorized"

    def __init__(self, message: str, *, token_given: bool) -> None:
        super().__init__(message)
        self.token_given = token_given


class Forbidden(ServiceError):
    status = 403
    type = "forbidden"


class NotFound(ServiceError):
    status = 404
    type = "not_found"


class Conflict(ServiceError):
    status = 409
    type = "conflict"


class ServiceUnavailable(ServiceError):
    status = 503
    type = "service_unavailable"
