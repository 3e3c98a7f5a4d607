"""Fixed ids of the default catalog, shared by every installation."""

from __future__ import annotations

import uuid

CATALOG_NAMESPACE = uuid.UUID("8d5c1f4e-2f4b-4c8e-9a51-6c3d2b1e0f7a")


def catalog_id(kind: str, name: str) -> uuid.UUID:
    """UUIDv5 of ``kind:name``, so docs and scripts can name default flavors and images."""
    return uuid.uuid5(CATALOG_NAMESPACE, f"{kind}:{name}")
