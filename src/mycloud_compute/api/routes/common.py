"""Helpers shared by the route modules."""

from __future__ import annotations

import re
import uuid

from mycloud_compute.services.errors import NotFound

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def path_id(kind: str, value: str) -> uuid.UUID:
    """Parse an id from the path; anything that is not a UUID names nothing, so 404."""
    if not _UUID.match(value):
        raise NotFound(f"{kind} {value} not found")
    return uuid.UUID(value)
