"""Strict decoding of JSON request bodies."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from litestar import Request

from mycloud_compute.services.errors import InvalidRequest

T = TypeVar("T")

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def _integral_to_int(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_to_int(item) for item in value]
    if isinstance(value, dict):
        return {key: _integral_to_int(item) for key, item in value.items()}
    return value


def _decode_integral_floats(body: bytes, body_type: type[T]) -> T | None:
    """Decode ``body`` with numbers such as 2.0 read as integers, or return None.

    JSON Schema counts 2.0 as an integer, and so does this API; msgspec's strict mode
    does not. No request field is a float, so every integral number can become an int.
    """
    try:
        return msgspec.convert(_integral_to_int(msgspec.json.decode(body)), body_type)
    except msgspec.ValidationError:
        return None


async def strict_body(request: Request[Any, Any, Any], body_type: type[T]) -> T:
    """Decode the body again in msgspec's strict mode.

    Litestar converts bodies leniently: it accepts "2" for an integer field, which
    the API contract does not allow. Its own parse still runs first, and documents
    the body in the OpenAPI schema.
    """
    body = await request.body()
    try:
        return msgspec.json.decode(body, type=body_type)
    except msgspec.ValidationError as exc:
        integral = _decode_integral_floats(body, body_type)
        if integral is not None:
            return integral
        text = str(exc)
        match = _PATH.search(text)
        if match is None:
            raise InvalidRequest(f"invalid request body: {text}") from exc
        field = match.group(1)
        message = text[: match.start()]
        raise InvalidRequest(
            f"invalid request body: {message} (field {field!r})", {"parameter": field}
        ) from exc
