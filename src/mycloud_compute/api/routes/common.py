"""Helpers shared by the route modules."""

from __future__ import annotations

import uuid

from mycloud_compute.services.errors import NotFound
from mycloud_compute.services.text import is_uuid


def path_id(kind: str, value: str) -> uuid.UUID:
    """Parse an id from the path; anything that is not a UUID names nothing, so 404."""
    if not is_uuid(value):
        # Short printable text is echoed back to help the caller; anything else
        # (kilobytes, control characters) is not.
        if len(value) <= 64 and value.isprintable():
            raise NotFound(f"{kind} {value} not found")
        raise NotFound(f"{kind} not found; ids are UUIDs")
    return uuid.UUID(value)
