"""Process-wide logging configuration (standard ``logging``, key=value messages)."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    # Every request is logged once, with its request id, by the request-context layer.
    logging.getLogger("uvicorn.access").disabled = True
