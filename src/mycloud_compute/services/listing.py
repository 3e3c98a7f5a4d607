"""Query-string parsing shared by every list endpoint.

Each resource declares its filters as data, a ``QueryFilter`` per parameter. This
module checks the whole query string against that table. Unknown and repeated
parameters are rejected by name, ``limit`` and ``marker`` are parsed the same way
everywhere, and each filter value goes through its own parser.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from mycloud_compute.services.errors import InvalidParameter, InvalidRequest
from mycloud_compute.services.text import is_uuid

DEFAULT_LIMIT = 20
MAX_LIMIT = 1000
MAX_QUERY_FIELDS = 32



@dataclass(frozen=True)
class QueryFilter:
    """One filter parameter: its name, parser and OpenAPI description."""

    name: str
    parse: Callable[[str], Any]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    example: str | None = None


@dataclass(frozen=True)
class ListQuery:
    """A parsed list request: the page window and the filter values by name."""

    limit: int
    marker: uuid.UUID | None
    filters: dict[str, Any]
    # The parameters exactly as the client sent them, for building links.
    raw: dict[str, str]


def parse_uuid(parameter: str, value: str) -> uuid.UUID:
    if not is_uuid(value):
        raise InvalidParameter(parameter, value, f"{parameter} must be a UUID, got {value!r}")
    return uuid.UUID(value)


def parse_limit(value: str) -> int:
    message = f"limit must be an integer between 1 and {MAX_LIMIT}, got {value!r}"
    if not value.isascii() or not value.isdigit() or len(value.lstrip("0")) > 7:
        raise InvalidParameter("limit", value, message)
    limit = int(value)
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidParameter("limit", value, message)
    return limit


def split_query_string(query_string: bytes) -> list[tuple[str, str]]:
    """Decode a raw query string into (name, value) pairs, in order."""
    try:
        # Clients should percent-encode, but raw UTF-8 bytes are accepted as well.
        text = query_string.decode("utf-8")
        return parse_qsl(
            text,
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except UnicodeDecodeError as exc:
        raise InvalidRequest("the query string is not valid UTF-8 once percent-decoded") from exc
    except ValueError as exc:
        raise InvalidRequest(
            f"the query string has more than {MAX_QUERY_FIELDS} parameters"
        ) from exc


def parse_list_query(query_string: bytes, filters: Sequence[QueryFilter]) -> ListQuery:
    """Parse ``limit``, ``marker`` and the declared filters; reject anything else."""
    by_name = {item.name: item for item in filters}
    raw: dict[str, str] = {}
    for name, value in split_query_string(query_string):
        if name not in by_name and name not in ("limit", "marker"):
            known = ", ".join(["limit", "marker", *by_name])
            raise InvalidParameter(
                name, value, f"unknown query parameter {name!r}; valid parameters: {known}"
            )
        if name in raw:
            raise InvalidParameter(name, value, f"query parameter {name!r} is given more than once")
        raw[name] = value

    limit = parse_limit(raw["limit"]) if "limit" in raw else DEFAULT_LIMIT
    marker = parse_uuid("marker", raw["marker"]) if "marker" in raw else None
    values = {name: by_name[name].parse(value) for name, value in raw.items() if name in by_name}
    return ListQuery(limit=limit, marker=marker, filters=values, raw=raw)
