"""Process-wide logging configuration (standard ``logging``, key=value messages)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    # Every request is logged once, with its request id, by the request-context layer.
    logging.getLogger("uvicorn.access").disabled = True
    # aiosqlite (at DEBUG) and SQLAlchemy (at INFO) log statements with their parameters
    # and result rows, which contain request data and token hashes. They are held at
    # WARNING or above, while the service's own DEBUG lines stay available.
    quiet_level = max(logging.getLogger().level, logging.WARNING)
    for name in ("aiosqlite", "asyncpg", "sqlalchemy.engine", "sqlalchemy.pool"):
        logging.getLogger(name).setLevel(quiet_level)
