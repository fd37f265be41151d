"""billing.periods: grids from anchors, billing_day, timezones and proration fractions."""

from __future__ import annotations

from datetime import UTC, date, datetime
from fractions import Fraction

import pytest

from billing.periods import (
    Grid,
    Interval,
    Period,
    day_fraction,
    fraction_left,
    instant_of,
    iso,
    local_date,
    midnight,
    monthly_factor,
    second_fraction,
)

NY = "America/New_York"


def utc(text: str) -> datetime:
    """`"2026-01-31"` or `"2026-01-31T12:00"` as a UTC instant."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def grid(
    anchor: str,
    interval: Interval = "month",
    count: int = 1,
    *,
    tz: str = "UTC",
    billing_day: int | None = None,
    origin: datetime | None = None,
) -> Grid:
    """A grid anchored at a local wall-clock time; billing starts at the anchor unless told."""
    wall = datetime.fromisoformat(anchor)
    return Grid(tz, interval, count, wall, origin or instant_of(wall, tz), billing_day)


def local_dates(g: Grid, ns: range) -> list[str]:
    return [local_date(g.boundary(n), g.tz).isoformat() for n in ns]


def period(start: str, end: str, full_start: str | None = None) -> Period:
    return Period(utc(start), utc(end), utc(full_start or start))


# ── anniversary grids ────────────────────────────────────────────────────────────────────────

GRIDS: list[tuple[str, Interval, int, list[str]]] = [
    # month-end anchors clamp, and come back: computed from the anchor, never from the last end
    ("2026-01-31", "month", 1, ["2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]),
    ("2028-01-31", "month", 1, ["2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30", "2028-05-31"]),
    ("2026-01-30", "month", 1, ["2026-01-30", "2026-02-28", "2026-03-30", "2026-04-30", "2026-05-30"]),
    ("2026-01-29", "month", 1, ["2026-01-29", "2026-02-28", "2026-03-29", "2026-04-29", "2026-05-29"]),
    ("2028-01-29", "month", 1, ["2028-01-29", "2028-02-29", "2028-03-29", "2028-04-29", "2028-05-29"]),
    ("2026-12-31", "month", 1, ["2026-12-31", "2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30"]),
    ("2026-01-15", "month", 1, ["2026-01-15", "2026-02-15", "2026-03-15", "2026-04-15", "2026-05-15"]),
    # quarterly
    ("2026-01-31", "month", 3, ["2026-01-31", "2026-04-30", "2026-07-31", "2026-10-31", "2027-01-31"]),
    ("2025-11-30", "month", 3, ["2025-11-30", "2026-02-28", "2026-05-30", "2026-08-30", "2026-11-30"]),
    # yearly, from a leap day
    ("2028-02-29", "year", 1, ["2028-02-29", "2029-02-28", "2030-02-28", "2031-02-28", "2032-02-29"]),
    ("2026-03-15", "year", 1, ["2026-03-15", "2027-03-15", "2028-03-15", "2029-03-15", "2030-03-15"]),
    # weekly and daily, across month and year ends
    ("2026-12-24", "week", 1, ["2026-12-24", "2026-12-31", "2027-01-07", "2027-01-14", "2027-01-21"]),
    ("2026-01-01", "week", 2, ["2026-01-01", "2026-01-15", "2026-01-29", "2026-02-12", "2026-02-26"]),
    ("2028-02-27", "day", 1, ["2028-02-27", "2028-02-28", "2028-02-29", "2028-03-01", "2028-03-02"]),
    ("2026-02-27", "day", 1, ["2026-02-27", "2026-02-28", "2026-03-01", "2026-03-02", "2026-03-03"]),
]


@pytest.mark.parametrize(("anchor", "interval", "count", "expected"), GRIDS)
def test_boundaries_from_the_anchor(anchor: str, interval: Interval, count: int, expected: list[str]) -> None:
    g = grid(anchor, interval, count)
    assert local_dates(g, range(5)) == expected
    assert all(g.boundary(n).time() == datetime.min.time() for n in range(5))


def test_boundaries_before_the_anchor() -> None:
    expected = ["2025-10-31", "2025-11-30", "2025-12-31", "2026-01-31"]
    assert local_dates(grid("2026-01-31"), range(-3, 1)) == expected


@pytest.mark.parametrize(
    ("instant", "start", "end"),
    [
        ("2026-01-31", "2026-01-31", "2026-02-28"),  # a boundary starts the period
        ("2026-02-27T23:59:59", "2026-01-31", "2026-02-28"),
        ("2026-02-28", "2026-02-28", "2026-03-31"),  # half-open: the end belongs to the next one
        ("2026-03-30T12:00", "2026-02-28", "2026-03-31"),
        ("2026-04-30", "2026-04-30", "2026-05-31"),
        ("2027-02-01", "2027-01-31", "2027-02-28"),  # far from the anchor
    ],
)
def test_period_containing_is_half_open(instant: str, start: str, end: str) -> None:
    p = grid("2026-01-31").period_containing(utc(instant))
    assert (p.start, p.end, p.full_start) == (utc(start), utc(end), utc(start))
    assert not p.partial
    assert p.contains(utc(instant))
    assert not p.contains(utc(end))


def test_boundary_queries() -> None:
    g = grid("2026-01-31")
    assert g.is_boundary(utc("2026-02-28"))
    assert not g.is_boundary(utc("2026-02-28T00:00:01"))
    assert g.first_boundary_at_or_after(utc("2026-02-28")) == utc("2026-02-28")
    assert g.first_boundary_at_or_after(utc("2026-02-28T00:00:01")) == utc("2026-03-31")
    assert g.period_starting(utc("2026-03-31")) == period("2026-03-31", "2026-04-30")


# ── billing_day ──────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("anchor", "billing_day", "count", "expected"),
    [
        ("2026-01-10", 31, 1, ["2025-12-31", "2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30"]),
        ("2028-01-10", 31, 1, ["2027-12-31", "2028-01-31", "2028-02-29", "2028-03-31", "2028-04-30"]),
        ("2026-01-10", 30, 1, ["2025-12-30", "2026-01-30", "2026-02-28", "2026-03-30", "2026-04-30"]),
        ("2026-01-10", 1, 1, ["2025-12-01", "2026-01-01", "2026-02-01", "2026-03-01", "2026-04-01"]),
        ("2026-01-10", 15, 3, ["2025-10-15", "2026-01-15", "2026-04-15", "2026-07-15", "2026-10-15"]),
    ],
)
def test_billing_day_grid(anchor: str, billing_day: int, count: int, expected: list[str]) -> None:
    g = grid(anchor, "month", count, billing_day=billing_day)
    assert local_dates(g, range(-1, 4)) == expected


def test_billing_day_grid_for_a_yearly_plan() -> None:
    g = grid("2026-03-10", "year", billing_day=1)
    assert local_dates(g, range(3)) == ["2026-03-01", "2027-03-01", "2028-03-01"]


@pytest.mark.parametrize(
    ("start", "billing_day", "end", "full_start", "fraction"),
    [
        # SCENARIOS.md: 9 days of a 31-day period → 9/31
        ("2026-01-22", 31, "2026-01-31", "2025-12-31", Fraction(9, 31)),
        # start after the billing day: the partial period runs to next month's boundary
        ("2026-01-10", 1, "2026-02-01", "2026-01-01", Fraction(22, 31)),
        ("2026-02-10", 1, "2026-03-01", "2026-02-01", Fraction(19, 28)),
        ("2028-02-10", 1, "2028-03-01", "2028-02-01", Fraction(20, 29)),
        # start before the billing day in the same month
        ("2026-03-05", 20, "2026-03-20", "2026-02-20", Fraction(15, 28)),
    ],
)
def test_first_partial_period_with_billing_day(
    start: str, billing_day: int, end: str, full_start: str, fraction: Fraction
) -> None:
    g = grid(start, billing_day=billing_day)
    p = g.period_containing(utc(start))
    assert p == period(start, end, full_start)
    assert p.partial
    assert day_fraction(utc(start), p, "UTC") == fraction
    # later in the partial period: still measured against the full period
    later = g.period_containing(utc(end) - (utc(end) - utc(start)) / 2)
    assert later == p
    # the next period is a whole one
    following = g.period_containing(utc(end))
    assert not following.partial
    assert following.start == utc(end)


def test_no_partial_period_when_the_start_is_on_the_billing_day() -> None:
    g = grid("2026-02-01", billing_day=1)
    p = g.period_containing(utc("2026-02-01"))
    assert p == period("2026-02-01", "2026-03-01")
    assert not p.partial


def test_billing_day_31_start_on_a_clamped_boundary_is_not_partial() -> None:
    g = grid("2026-02-28", billing_day=31)
    assert g.period_containing(utc("2026-02-28")) == period("2026-02-28", "2026-03-31")


def test_partial_period_with_billing_day_in_a_local_timezone() -> None:
    start = midnight(date(2026, 1, 10), NY)
    g = grid("2026-01-10", tz=NY, billing_day=1)
    p = g.period_containing(start)
    assert (iso(p.start), iso(p.end), iso(p.full_start)) == (
        "2026-01-10T05:00:00Z",
        "2026-02-01T05:00:00Z",
        "2026-01-01T05:00:00Z",
    )
    assert day_fraction(start, p, NY) == Fraction(22, 31)


# ── timezones ────────────────────────────────────────────────────────────────────────────────


def test_local_midnight_boundaries_across_dst_in_new_york() -> None:
    g = grid("2026-02-15", tz=NY)
    # EST (UTC-5) until 2026-03-08, EDT (UTC-4) until 2026-11-01
    assert [iso(g.boundary(n)) for n in range(0, 10)] == [
        "2026-02-15T05:00:00Z",
        "2026-03-15T04:00:00Z",
        "2026-04-15T04:00:00Z",
        "2026-05-15T04:00:00Z",
        "2026-06-15T04:00:00Z",
        "2026-07-15T04:00:00Z",
        "2026-08-15T04:00:00Z",
        "2026-09-15T04:00:00Z",
        "2026-10-15T04:00:00Z",
        "2026-11-15T05:00:00Z",
    ]
    assert local_dates(g, range(10)) == [f"2026-{m:02d}-15" for m in range(2, 12)]


def test_daily_periods_on_dst_days_are_23_and_25_hours() -> None:
    spring = grid("2026-03-08", "day", tz=NY).period_containing(utc("2026-03-08T12:00"))
    assert (spring.start, spring.end) == (utc("2026-03-08T05:00"), utc("2026-03-09T04:00"))
    assert spring.end - spring.start == (utc("2026-01-01T23:00") - utc("2026-01-01"))
    fall = grid("2026-11-01", "day", tz=NY).period_containing(utc("2026-11-01T12:00"))
    assert (fall.start, fall.end) == (utc("2026-11-01T04:00"), utc("2026-11-02T05:00"))


def test_period_containing_uses_local_time() -> None:
    g = grid("2026-01-01", tz=NY)
    # 2026-02-01T03:00Z is still Jan 31 in New York
    assert g.period_containing(utc("2026-02-01T03:00")).start == utc("2026-01-01T05:00")
    assert g.period_containing(utc("2026-02-01T05:00")).start == utc("2026-02-01T05:00")


def test_midnight_and_local_date() -> None:
    assert midnight(date(2026, 7, 4), NY) == utc("2026-07-04T04:00")
    assert midnight(date(2026, 1, 4), "Asia/Tokyo") == utc("2026-01-03T15:00")
    assert local_date(utc("2026-01-03T15:00"), "Asia/Tokyo") == date(2026, 1, 4)


def test_second_grid_keeps_the_wall_clock_time_across_dst() -> None:
    g = grid("2026-02-20T14:30", tz=NY)
    assert iso(g.boundary(0)) == "2026-02-20T19:30:00Z"
    assert iso(g.boundary(1)) == "2026-03-20T18:30:00Z"


# ── fractions ────────────────────────────────────────────────────────────────────────────────

DAY_FRACTIONS = [
    # change, period start, period end, fraction
    ("2026-01-16", "2026-01-01", "2026-02-01", Fraction(16, 31)),
    ("2026-01-16T23:59", "2026-01-01", "2026-02-01", Fraction(16, 31)),  # whole local days
    ("2026-01-01", "2026-01-01", "2026-02-01", Fraction(1)),
    ("2026-01-31", "2026-01-01", "2026-02-01", Fraction(1, 31)),  # the last day
    ("2026-02-01", "2026-01-01", "2026-02-01", Fraction(0)),
    ("2026-02-14", "2026-01-31", "2026-02-28", Fraction(14, 28)),
    ("2028-02-15", "2028-02-01", "2028-03-01", Fraction(15, 29)),
    ("2026-07-01", "2026-01-01", "2027-01-01", Fraction(184, 365)),
]


@pytest.mark.parametrize(("change", "start", "end", "fraction"), DAY_FRACTIONS)
def test_day_fraction(change: str, start: str, end: str, fraction: Fraction) -> None:
    got = day_fraction(utc(change), period(start, end), "UTC")
    assert isinstance(got, Fraction)
    assert got == fraction


def test_day_fraction_counts_local_days() -> None:
    p = grid("2026-03-01", tz=NY).period_containing(utc("2026-03-10"))
    # 2026-03-16T03:00Z is March 15 in New York: 17 of 31 days left
    assert day_fraction(utc("2026-03-16T03:00"), p, NY) == Fraction(17, 31)
    assert day_fraction(utc("2026-03-16T05:00"), p, NY) == Fraction(16, 31)


SECOND_FRACTIONS = [
    ("2026-01-16T12:00", "2026-01-01", "2026-02-01", Fraction(15 * 24 + 12, 31 * 24)),
    ("2026-01-01", "2026-01-01", "2026-02-01", Fraction(1)),
    ("2026-01-31T23:59:59", "2026-01-01", "2026-02-01", Fraction(1, 31 * 86400)),
    ("2026-02-01", "2026-01-01", "2026-02-01", Fraction(0)),
]


@pytest.mark.parametrize(("change", "start", "end", "fraction"), SECOND_FRACTIONS)
def test_second_fraction(change: str, start: str, end: str, fraction: Fraction) -> None:
    got = second_fraction(utc(change), period(start, end))
    assert isinstance(got, Fraction)
    assert got == fraction


def test_second_fraction_counts_real_seconds_across_dst() -> None:
    # March 2026 in New York is 31 days less one hour long
    p = grid("2026-03-01", tz=NY).period_containing(utc("2026-03-10"))
    assert p.end - p.start == utc("2026-01-31T23:00") - utc("2026-01-01")
    change = utc("2026-03-16T04:00")  # Mar 16 00:00 EDT: 16 days left
    assert second_fraction(change, p) == Fraction(16 * 24, 31 * 24 - 1)


def test_fractions_in_a_partial_period_divide_by_the_full_period() -> None:
    p = period("2026-01-22", "2026-01-31", "2025-12-31")
    assert day_fraction(utc("2026-01-26"), p, "UTC") == Fraction(5, 31)
    assert second_fraction(utc("2026-01-26T12:00"), p) == Fraction(4 * 24 + 12, 31 * 24)


@pytest.mark.parametrize(
    ("policy", "fraction"),
    [("day", Fraction(16, 31)), ("second", Fraction(15 * 24 + 12, 31 * 24)), ("none", Fraction(0))],
)
def test_fraction_left_by_policy(policy: str, fraction: Fraction) -> None:
    p = period("2026-01-01", "2026-02-01")
    assert fraction_left(utc("2026-01-16T12:00"), p, "UTC", policy) == fraction  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("interval", "count", "factor"),
    [
        ("month", 1, Fraction(1)),
        ("month", 3, Fraction(1, 3)),
        ("year", 1, Fraction(1, 12)),
        ("week", 1, Fraction(52, 12)),
        ("week", 2, Fraction(26, 12)),
        ("day", 1, Fraction(365, 12)),
    ],
)
def test_monthly_factor(interval: str, count: int, factor: Fraction) -> None:
    assert monthly_factor(interval, count) == factor


def test_iso_is_utc_with_z() -> None:
    assert iso(instant_of(datetime(2026, 7, 1), NY)) == "2026-07-01T04:00:00Z"
    with pytest.raises(ValueError):
        iso(datetime(2026, 7, 1))
