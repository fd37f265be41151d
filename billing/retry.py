"""Retrying a command that lost a race.

A command runs in one transaction and writes nothing unless it commits, so when it loses a race
it can simply run again from the start, on fresh state. Losing a race means one of:

- `ConcurrentModification`: a customer's part or the book changed since it was loaded (our
  optimistic version check);
- PostgreSQL SQLSTATE 40001 (serialization failure), 40P01 (deadlock detected, the server
  already rolled the victim back) or 55P03 (lock not available);
- SQLite "database is locked" / "database is busy" after its busy timeout.

Anything else (bad input, a refused command, a broken connection that is not transient) is
raised at once. Attempts back off exponentially with jitter so racing writers spread out.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from billing.persistence.repository import ConcurrentModification

T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
ATTEMPTS = 12


def lost_a_race(exc: BaseException) -> bool:
    """Whether `exc` means "another transaction won; run again"."""
    if isinstance(exc, ConcurrentModification):
        return True
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        if sqlstate in RETRYABLE_SQLSTATES:
            return True
        message = str(orig).lower()
        return "database is locked" in message or "database is busy" in message
    return False


def retrying(command: Callable[[], T], *, attempts: int = ATTEMPTS, base_delay: float = 0.005,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `command` (one whole transaction) until it does not lose a race, at most `attempts`
    times; the last loss is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return command()
        except Exception as exc:
            if attempt == attempts or not lost_a_race(exc):
                raise
            sleep(base_delay * (2 ** min(attempt, 8)) * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not crypto
    raise AssertionError("unreachable")
