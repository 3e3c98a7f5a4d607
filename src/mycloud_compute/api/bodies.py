"""Strict decoding of JSON request bodies."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request

from mycloud_compute.services.errors import InvalidRequest

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


async def strict_body(request: Request[Any, Any, Any], body_type: type[T]) -> T:
    """Decode the body again in msgspec's strict mode.

    Litestar converts bodies leniently: it accepts "2" for an integer field, which
    the API contract does not allow. Its own parse still runs first, and documents
    the body in the OpenAPI schema.
    """
    try:
        return msgspec.json.decode(await request.body(), type=body_type)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH.search(text)
        if match is None:
            raise InvalidRequest(f"invalid request body: {text}") from exc
        field = match.group(1)
        message = text[: match.start()]
        raise InvalidRequest(
            f"invalid request body: {message} (field {field!r})", {"parameter": field}
        ) from exc
