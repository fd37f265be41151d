"""Billing periods: half-open `[start, end)` intervals on a grid computed from an anchor.

Rules (SCENARIOS.md, "Time and periods"):
- Boundary *n* is `anchor + n × interval` (dateutil `relativedelta`), never a step from the
  previous end: an anchor on Jan 31 gives Feb 28 (29), Mar 31, Apr 30.
- Under `day` proration the anchor is the local date of the start and every boundary is local
  midnight in the customer's timezone, so a daylight-saving change never moves a bill. Under
  `second` the anchor is the exact local wall-clock time of the start.
- `billing_day` (month-based intervals only) moves the grid: boundary *n* is
  `relativedelta(months=n × months_per_period, day=billing_day)` from the start month. The first,
  partial period runs from the start to the next boundary; its "full period" (the denominator of
  every fraction inside it) is the whole period ending at that boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from functools import cache, lru_cache
from typing import Literal
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

Interval = Literal["day", "week", "month", "year"]
ProrationPolicy = Literal["day", "second", "none"]

MONTHLY_FACTOR: dict[str, Fraction] = {
    "month": Fraction(1),
    "year": Fraction(1, 12),
    "week": Fraction(52, 12),
    "day": Fraction(365, 12),
}


@cache
def monthly_factor(interval: str, count: int) -> Fraction:
    """Multiplier from an amount per period to a monthly amount (SCENARIOS.md, MRR)."""
    return MONTHLY_FACTOR[interval] / count


def to_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime where an instant was expected")
    return value.astimezone(UTC)


def month_index(instant: datetime) -> int:
    """The UTC calendar month of an instant as one integer, `year * 12 + month - 1`; quarters and
    years are `month_index // 3` and `month_index // 12` (the metric periods are UTC months)."""
    utc = to_utc(instant)
    return utc.year * 12 + utc.month - 1


def month_start(index: int) -> datetime:
    """Midnight UTC of the first day of month `index` (the inverse of `month_index`)."""
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def local_wall(instant: datetime, tz: str) -> datetime:
    """The naive local wall-clock time of an instant in `tz`."""
    return instant.astimezone(ZoneInfo(tz)).replace(tzinfo=None)


def local_date(instant: datetime, tz: str) -> date:
    return instant.astimezone(ZoneInfo(tz)).date()


def instant_of(wall: datetime, tz: str) -> datetime:
    """The UTC instant of a naive local wall-clock time in `tz` (fold 0 when ambiguous)."""
    return wall.replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def midnight(day: date, tz: str) -> datetime:
    return instant_of(datetime.combine(day, time()), tz)


def _step(interval: str, n: int) -> relativedelta:
    if interval == "day":
        return relativedelta(days=n)
    if interval == "week":
        return relativedelta(weeks=n)
    if interval == "month":
        return relativedelta(months=n)
    if interval == "year":
        return relativedelta(years=n)
    raise ValueError(f"unknown interval {interval!r}")


@dataclass(frozen=True)
class Period:
    """A billing period `[start, end)`; `full_start` is the start of the full period that the
    fractions inside it divide by (earlier than `start` only for a first, partial period)."""

    start: datetime
    end: datetime
    full_start: datetime

    @property
    def partial(self) -> bool:
        return self.full_start != self.start

    def contains(self, instant: datetime) -> bool:
        return self.start <= instant < self.end


@dataclass(frozen=True)
class Grid:
    """The boundaries of a subscription's periods.

    `anchor` is the local wall-clock anchor (midnight under `day`), `origin` the instant the
    subscription's billing starts (its start or trial end).
    """

    tz: str
    interval: Interval
    count: int
    anchor: datetime  # naive local wall clock
    origin: datetime  # aware UTC instant
    billing_day: int | None = None

    def boundary(self, n: int) -> datetime:
        return _boundary(self.tz, self.interval, self.count, self.anchor, self.anchor.fold, self.billing_day, n)

    def _index_at_or_before(self, instant: datetime) -> int:
        """Largest n with boundary(n) <= instant."""
        approx_days = {"day": 1, "week": 7, "month": 30.44, "year": 365.25}[self.interval] * self.count
        base = _anchor_instant(self.anchor, self.anchor.fold, self.tz) if self.billing_day is None \
            else self.boundary(0)
        n = int((instant - base).total_seconds() / 86400 / approx_days)
        while self.boundary(n) > instant:
            n -= 1
        while self.boundary(n + 1) <= instant:
            n += 1
        return n

    def first_boundary_at_or_after(self, instant: datetime) -> datetime:
        n = self._index_at_or_before(instant)
        b = self.boundary(n)
        return b if b == instant else self.boundary(n + 1)

    def is_boundary(self, instant: datetime) -> bool:
        return self.boundary(self._index_at_or_before(instant)) == instant

    def period_containing(self, instant: datetime) -> Period:
        """The period that holds `instant` (the first partial period when before the first
        boundary after the origin)."""
        n = self._index_at_or_before(instant)
        start, end = self.boundary(n), self.boundary(n + 1)
        if start < self.origin <= instant:
            return Period(self.origin, end, start)
        return Period(start, end, start)

    def period_starting(self, start: datetime) -> Period:
        return self.period_containing(start)


@lru_cache(maxsize=1 << 16)
def _boundary(tz: str, interval: str, count: int, anchor: datetime, fold: int, billing_day: int | None,
              n: int) -> datetime:
    """Boundary n of a grid (`Grid.boundary`), memoized: a pure function of the grid's fields
    (`fold` is passed on its own because equal naive datetimes may differ in it)."""
    del fold  # part of the cache key only; `anchor` carries it
    if billing_day is None:
        wall = anchor + _step(interval, n * count)
    else:
        months = n * count * (12 if interval == "year" else 1)
        wall = anchor.replace(day=1) + relativedelta(months=months, day=billing_day)
    return instant_of(wall, tz)


@lru_cache(maxsize=1 << 12)
def _anchor_instant(anchor: datetime, fold: int, tz: str) -> datetime:
    del fold  # part of the cache key only
    return instant_of(anchor, tz)


def day_fraction(change: datetime, period: Period, tz: str) -> Fraction:
    """`day` policy: whole local days from the local date of the change to the period end ÷
    days in the (full) period."""
    end = local_date(period.end, tz)
    days_left = (end - local_date(change, tz)).days
    days_total = (end - local_date(period.full_start, tz)).days
    return Fraction(max(days_left, 0), days_total)


def second_fraction(change: datetime, period: Period) -> Fraction:
    """`second` policy: real seconds left ÷ real seconds in the (full) period."""
    left = _micros(period.end - change)
    total = _micros(period.end - period.full_start)
    return Fraction(max(left, 0), total)


def fraction_left(change: datetime, period: Period, tz: str, policy: ProrationPolicy) -> Fraction:
    """Share of `period` remaining after `change` under a proration policy (`none` → 0)."""
    if policy == "day":
        return day_fraction(change, period, tz)
    if policy == "second":
        return second_fraction(change, period)
    return Fraction(0)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def iso(instant: datetime) -> str:
    """ISO 8601 in UTC with a `Z` (the replay output form)."""
    text = to_utc(instant).isoformat()
    return text.replace("+00:00", "Z")
