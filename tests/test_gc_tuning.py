"""The API process's garbage-collector tuning, on this test process's real collector."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mycloud_compute.api.gc_tuning import tune_for_serving


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tuning_freezes_and_sets_threshold(restored_collector: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    tune_for_serving(12_345)
    assert gc.get_threshold() == (12_345, gen1, gen2)
    assert gc.get_freeze_count() > 1_000


def test_zero_leaves_collector_alone(restored_collector: None) -> None:
    thresholds = gc.get_threshold()
    frozen = gc.get_freeze_count()
    tune_for_serving(0)
    assert gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == frozen
