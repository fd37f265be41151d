"""`billing.retry`: a command that lost a race runs again; anything else is raised at once."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from billing.persistence import ConcurrentModification
from billing.retry import lost_a_race, retrying


class PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def db_error(orig: Exception) -> OperationalError:
    return OperationalError("UPDATE ...", {}, orig)


@pytest.mark.parametrize(("exc", "retried"), [
    (ConcurrentModification("a customer changed"), True),
    (db_error(PgError("40001")), True),
    (db_error(PgError("40P01")), True),
    (db_error(PgError("23505")), False),
    (db_error(Exception("database is locked")), True),
    (db_error(Exception("no such table: invoices")), False),
    (ValueError("quantity: must be positive"), False),
])
def test_what_counts_as_losing_a_race(exc: Exception, retried: bool) -> None:
    assert lost_a_race(exc) is retried


def test_a_command_runs_again_until_it_wins() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def command() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConcurrentModification("lost")
        return "done"

    assert retrying(command, sleep=waits.append) == "done"
    assert len(calls) == 3 and len(waits) == 2 and all(w > 0 for w in waits)


def test_the_last_loss_and_other_errors_are_raised() -> None:
    def always_loses() -> None:
        raise ConcurrentModification("lost again")

    with pytest.raises(ConcurrentModification):
        retrying(always_loses, attempts=4, sleep=lambda _: None)
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        retrying(refused, sleep=lambda _: None)
    assert calls == [1]
