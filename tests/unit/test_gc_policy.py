"""`billing.gc_policy.fewer_collections` restores the caller's collector settings, even when the
block raises."""

from __future__ import annotations

import gc

import pytest

from billing.gc_policy import YOUNG, fewer_collections


def test_thresholds_and_freeze_are_restored() -> None:
    before = gc.get_threshold()
    gc.set_threshold(900, 11, 12)
    try:
        frozen = gc.get_freeze_count()
        with fewer_collections():
            assert gc.get_threshold() == (YOUNG, 20, 100)
            assert gc.get_freeze_count() >= frozen
        assert gc.get_threshold() == (900, 11, 12)
        assert gc.get_freeze_count() == 0
        with pytest.raises(RuntimeError), fewer_collections():
            raise RuntimeError("a batch failed")
        assert gc.get_threshold() == (900, 11, 12)
    finally:
        gc.set_threshold(*before)
