"""Record every garbage collection's pause in a process started by bench/tail_latency.py.

Python imports ``sitecustomize`` at startup when this folder is on ``PYTHONPATH``.
With ``MYCLOUD_BENCH_GC_DIR`` set, each process writes the pauses it has seen, per
generation, to ``gc-<pid>.json`` in that folder once a second.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_OUTPUT_DIR = os.environ.get("MYCLOUD_BENCH_GC_DIR", "")
_pauses_ms: dict[int, list[float]] = {0: [], 1: [], 2: []}
_started = [0.0]


def _record(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _pauses_ms[info["generation"]].append((time.perf_counter() - _started[0]) * 1000)


def _write_forever(path: Path) -> None:
    while True:
        time.sleep(1)
        snapshot = {str(generation): list(pauses) for generation, pauses in _pauses_ms.items()}
        report = {"tracked_objects": len(gc.get_objects()), "frozen_objects": gc.get_freeze_count(),
                  "pauses_ms": snapshot}
        path.with_suffix(".tmp").write_text(json.dumps(report))
        path.with_suffix(".tmp").replace(path)


if _OUTPUT_DIR:
    gc.callbacks.append(_record)
    threading.Thread(target=_write_forever, args=(Path(_OUTPUT_DIR) / f"gc-{os.getpid()}.json",),
                     daemon=True, name="gc-probe").start()
