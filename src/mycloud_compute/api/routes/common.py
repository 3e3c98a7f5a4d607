"""Helpers shared by the route modules."""

from __future__ import annotations

import uuid

from mycloud_compute.services.errors import NotFound
from mycloud_compute.services.text import is_uuid


def path_id(kind: str, value: str) -> uuid.UUID:
    """Parse an id from the path; anything that is not a UUID names nothing, so 404."""
    if not is_uuid(value):
        raise NotFound(f"{kind} {value} not found")
    return uuid.UUID(value)
