"""Translate the plain database URLs users write into the async drivers' URLs."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


class DatabaseUrlError(ValueError):
    pass


def to_async_url(plain: str) -> URL:
    """Return the async-driver form of ``sqlite:///path`` or ``postgresql://...``."""
    try:
        url = make_url(plain)
    except ArgumentError as exc:
        raise DatabaseUrlError(f"invalid database URL {plain!r}: {exc}") from exc
    backend = url.get_backend_name()
    if backend not in ASYNC_DRIVERS:
        raise DatabaseUrlError(
            f"unsupported database {backend!r} in {plain!r}; use sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DB"
        )
    return url.set(drivername=ASYNC_DRIVERS[backend])
