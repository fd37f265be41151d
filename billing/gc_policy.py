"""Garbage collection while a run bills.

A batch allocates hundreds of thousands of short-lived objects (Decimals, Fractions, records,
unpickled parts), almost none of them in reference cycles. With CPython's default thresholds
(700, 10, 10) the collector runs every 700 net allocations and, every hundred of those, scans
everything alive — the catalog, the interpreter's modules, SQLAlchemy's caches — measured at 10
to 30 % of a run's time. During a run the objects alive before it are frozen out of the scans
(`gc.freeze`) and the young generation is collected every 50,000 allocations; both are put back
as they were afterwards, so an embedding application keeps its own settings (and what it froze
itself stays frozen).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

YOUNG = 50_000


@contextmanager
def fewer_collections(young: int = YOUNG) -> Iterator[None]:
    """Freeze what is alive now and collect the young generation every `young` allocations
    until the block ends; then unfreeze and restore the thresholds."""
    before = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0  # a caller that froze objects itself keeps them frozen
    if freeze:
        gc.freeze()
    gc.set_threshold(max(young, before[0]), 20, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        if freeze:
            gc.unfreeze()
