"""Garbage-collector settings for an API process that serves requests for hours."""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def tune_for_serving(gen0_threshold: int) -> None:
    """Freeze the objects built at startup and run young collections less often.

    A full collection walks every object the collector tracks. After startup an
    API process has 100,000 to 150,000 of them (the framework, the OpenAPI
    schema, SQLAlchemy's metadata). Under load each full collection stopped the
    process for 20 to 125 ms (``bench/tail_latency.py``), and every request in
    flight waited for it. Later collections skip frozen objects. Reference
    counting still frees them, but cycles among them are never collected.
    ``gen0_threshold`` 0 leaves the collector as Python configured it.
    """
    if gen0_threshold == 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1_threshold, gen2_threshold = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1_threshold, gen2_threshold)
    log.info(
        "garbage collector tuned: %d objects frozen, thresholds %s",
        gc.get_freeze_count(),
        gc.get_threshold(),
    )
