"""Exceptions raised by the SDK.

Hierarchy::

    MycloudError                 every error the SDK raises
    ├── ConfigurationError       no base URL or token was given or found
    ├── ConnectionFailed         the server could not be reached (after retries)
    ├── WaitTimeout              wait_for_status ran out of time
    ├── InstanceFailed           wait_for_status saw the instance go to ERROR
    └── APIError                 the server returned an error response
        ├── InvalidRequest       400 invalid_parameter / invalid_request
        ├── Unauthorized         401
        ├── Forbidden            403
        ├── NotFound             404
        ├── Conflict             409
        ├── RateLimited          429
        └── ServiceUnavailable   503
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "APIError",
    "ConfigurationError",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "InstanceFailed",
    "InvalidRequest",
    "MycloudError",
    "NotFound",
    "RateLimited",
    "ServiceUnavailable",
    "Unauthorized",
    "WaitTimeout",
    "api_error_class",
]


class MycloudError(Exception):
    """Base class of every error the SDK raises."""


class ConfigurationError(MycloudError):
    """The client has no base URL or no token."""


class ConnectionFailed(MycloudError):
    """The request did not reach the server, or no response came back."""


class WaitTimeout(MycloudError):
    """An instance did not reach the expected status in time."""


class InstanceFailed(MycloudError):
    """An instance went to ERROR while the caller waited for another status."""

    def __init__(self, message: str, instance: Any) -> None:
        super().__init__(message)
        self.instance = instance


class APIError(MycloudError):
    """An error response of the API, with the fields of its error body."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        request_id: str | None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.request_id = request_id
        self.details = details

    def __str__(self) -> str:
        return f"{self.status} {self.type}: {self.message} (request id {self.request_id})"


class InvalidRequest(APIError):
    """400: a parameter or the body is invalid."""


class Unauthorized(APIError):
    """401: the token is missing, unknown, expired or revoked."""


class Forbidden(APIError):
    """403: the token lacks the scope for the operation."""


class NotFound(APIError):
    """404: the resource does not exist in the token's organization."""


class Conflict(APIError):
    """409: a duplicate, or a change the resource's current state does not allow."""


class RateLimited(APIError):
    """429: too many requests; the SDK retried until its retry budget ran out."""


class ServiceUnavailable(APIError):
    """503: the service cannot serve the request now; the SDK retried first."""


_CLASS_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: ServiceUnavailable,
}


def api_error_class(status: int) -> type[APIError]:
    """Return the APIError subclass for an HTTP status (APIError itself for others)."""
    return _CLASS_BY_STATUS.get(status, APIError)
