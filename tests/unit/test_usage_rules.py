"""The one rule set for a usage event (billing.usage.UsageWindow via Book.usage_window) and the
exact value rules, as the book applies them to a scenario's `usage` events."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from billing.book import Book, BookError
from billing.catalog import Catalog
from billing.scenario import EVENT_ADAPTER, Settings
from billing.usage import UsageValueError, UsageWindow, micros, parse_value, scaled

CATALOG = Catalog.model_validate({
    "plans": [{"code": "p", "name": "P", "interval": "month", "pricing": "flat", "prices": {"USD": "10"},
               "metrics": ["calls"]}],
    "metrics": [{"code": "calls", "aggregation": "sum", "prices": {"USD": "1"}},
                {"code": "other", "aggregation": "count", "prices": {"USD": "1"}}],
})


def _book(*events: dict[str, Any]) -> Book:
    book = Book(Settings(), CATALOG)
    base = [{"type": "customer", "at": "2026-01-01", "customer": "c", "currency": "USD"},
            {"type": "subscribe", "at": "2026-01-01", "customer": "c", "subscription": "s", "plan": "p"}]
    for i, ev in enumerate([*base, *events]):
        book.apply(EVENT_ADAPTER.validate_python(ev), i)
    return book


def _use(at: str, id_: str, metric: str = "calls", value: str = "1") -> dict[str, Any]:
    return {"type": "usage", "at": at, "subscription": "s", "metric": metric, "value": value, "id": id_}


def test_a_repeated_id_is_ignored_and_never_billed_twice() -> None:
    book = _book(_use("2026-01-05", "a", value="4"), _use("2026-01-06", "a", value="4"), _use("2026-01-07", "b"))
    jan, feb = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    assert book.usage.aggregate("s", CATALOG.metric("calls"), jan, feb) == 5


@pytest.mark.parametrize(("event", "message"), [
    (_use("2026-01-05", "x", metric="other"), "metric: metric 'other' is not billed on plan 'p'"),
    (_use("2026-01-05", "x", metric="nope"), "metric: unknown metric 'nope'"),
])
def test_refused_events_name_the_reason(event: dict[str, Any], message: str) -> None:
    with pytest.raises(BookError, match=message.replace("(", r"\(")):
        _book(event)


def test_a_scenario_value_follows_the_ingester_rule() -> None:
    with pytest.raises(ValidationError, match="value 0.0000001 has more than 6 decimal places"):
        EVENT_ADAPTER.validate_python(_use("2026-01-05", "x", value="0.0000001"))


def test_usage_after_the_subscription_ended_is_outside_its_life() -> None:
    cancel = {"type": "cancel", "at": "2026-01-10", "subscription": "s", "effective": "immediately"}
    with pytest.raises(BookError, match=r"events\[3\] \(usage\): at: 2026-01-11T00:00:00\+00:00 is outside the life "
                                        r"of subscription 's' \(it ends at 2026-01-10T00:00:00\+00:00\)"):
        _book(cancel, _use("2026-01-11", "late"))


def test_window_rules() -> None:
    day = 86_400_000_000
    w = UsageWindow(subscription="s", started=10 * day, ends=100 * day, trial_end=None,
                    invoiced_until=40 * day, closed=((40 * day, 70 * day),))
    assert "before subscription 's' started" in (w.reject(9 * day) or "")
    assert "outside the life" in (w.reject(100 * day) or "")
    assert "already invoiced" in (w.reject(39 * day) or "")
    assert w.reject(50 * day) is None  # closed, not invoiced, no grace given (a scenario's event)
    assert w.reject(50 * day, now=70 * day + day, grace=day) is None
    assert "closed more than the grace period" in (w.reject(50 * day, now=70 * day + day + 1, grace=day) or "")
    assert w.reject(80 * day, now=200 * day, grace=0) is None  # the open period is never late
    trial = UsageWindow(subscription="s", started=0, ends=None, trial_end=5 * day, invoiced_until=5 * day, closed=())
    assert trial.reject(2 * day) is None  # during a trial: accepted, never billed


@pytest.mark.parametrize(("raw", "expected"), [
    ("12.5", 12_500_000), (7, 7_000_000), (Decimal("0.000001"), 1), ("-3", -3_000_000),
    ("1.500000000", 1_500_000),
])
def test_values_are_stored_exactly(raw: object, expected: int) -> None:
    assert scaled(parse_value(raw)) == expected


@pytest.mark.parametrize(("raw", "message"), [
    (1.5, "not a float"), (True, "not a boolean"), ("abc", "is not a decimal number"),
    ("1e12", "out of range"), ("NaN", "not a finite number"), ("0.1234567", "more than 6 decimal places"),
])
def test_values_that_cannot_be_stored_exactly_are_refused(raw: object, message: str) -> None:
    with pytest.raises(UsageValueError, match=message):
        parse_value(raw)


def test_micros_are_utc() -> None:
    assert micros(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)) == 1_000_000
