"""Metered usage: the one rule set for a usage event, aggregation of a period and rating (pure).

Rules (SCENARIOS.md, "Catalog" → metric):
- `field` names the value summed, maxed or held (`value`, or a property), or the property
  counted distinct; `filter` keeps only events whose properties match.
- `sum`, `count`, `max`, `unique_count`, `last` (latest value in the period; 0 with no events) and
  `weighted_sum` (each value weighted by the share of the period it was held; the level at a
  period's start is the last value before it, 0 if none).
- Billable quantity = aggregate − `included` (not below 0), then priced by the metric's pricing
  model; a `minimum` per currency raises the amount to at least that figure.
Periods are half-open: an event exactly at a boundary belongs to the period that starts there.

Storage shape. An event's metric never changes and a metric's definition never changes once the
book uses it (catalogs only grow), so the metric's `field` and `filter` are resolved once, when the
event is accepted (`measure`): whether it passes the filter, the scaled integer it contributes
(`quantity`, None when the field is missing or not a number) and the text it is counted distinct
by (`dim`). Aggregation then works on those plain columns — in memory here (`MemoryUsage`, for
the pure replay), in SQL on the database (billing.persistence.usage_store). Values are exact:
at most `DECIMALS` decimal places, stored as integers scaled by `SCALE`, bounded so sums fit in
64 bits; instants are integer UTC microseconds. Ties at one instant go by arrival order.

The book asks a `UsageSource` (a port) for a period's aggregate, so it holds no usage records
and stays free of I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Protocol

from billing.catalog import Metric, exact, price_quantity
from billing.money import shown

DECIMALS = 6
SCALE = 10**DECIMALS
MAX_VALUE = Decimal(10) ** 12  # |value| below this; a scaled value then stays below 10**18
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


class UsageValueError(ValueError):
    """A usage value the engine cannot store exactly."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One usage event as the book receives it."""

    at: datetime
    metric: str
    value: Decimal
    key: str
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Measured:
    """An accepted event as aggregation reads it (see the module docstring)."""

    at: int  # UTC microseconds
    seq: int  # arrival order
    matched: bool
    quantity: int | None  # scaled by SCALE
    dim: str | None


class UsageSource(Protocol):
    """Where the book's usage events live: it records accepted ones and aggregates a period."""

    def record(self, subscription: str, metric: Metric, record: UsageRecord) -> bool:
        """Store one event; False when its key was already seen for the subscription."""
        ...

    def aggregate(self, subscription: str, metric: Metric, start: datetime, end: datetime,
                  *, held_until: datetime | None = None) -> Fraction:
        """The metric's aggregate over `[start, end)` (see `aggregate`)."""
        ...


# -- the value rules ------------------------------------------------------------------------------


def micros(at: datetime) -> int:
    """An instant as integer UTC microseconds since the epoch."""
    return (at - EPOCH) // _MICRO


def instant(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def scaled(value: Decimal, what: str = "value") -> int:
    """`value` × SCALE as an exact integer; refuses what cannot be stored exactly."""
    if not value.is_finite():
        raise UsageValueError(f"{what} {value} is not a finite number")
    if abs(value) >= MAX_VALUE:
        raise UsageValueError(f"{what} {value:f} is out of range (|value| must be below 10^12)")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -DECIMALS and value != value.quantize(Decimal(1).scaleb(-DECIMALS)):
        raise UsageValueError(f"{what} {value:f} has more than {DECIMALS} decimal places")
    return int(value.scaleb(DECIMALS))


def parse_value(raw: object, what: str = "value") -> Decimal:
    """A usage value from a decimal string, an integer or a JSON number already read as Decimal
    (never a binary float), checked by `scaled`."""
    if isinstance(raw, bool):
        raise UsageValueError(f"{what} must be a number, not a boolean")
    if isinstance(raw, int):
        value = Decimal(raw)
    elif isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            raise UsageValueError(f"{what} {shown(raw)} is not a decimal number") from None
    elif isinstance(raw, float):
        raise UsageValueError(f"{what} must be a decimal string or an exact number, not a float")
    else:
        raise UsageValueError(f"{what} must be a decimal number, not {type(raw).__name__}")
    scaled(value, what)
    return value


def _property_quantity(raw: object) -> int | None:
    if raw is None or isinstance(raw, bool):
        return None
    try:
        value = raw if isinstance(raw, Decimal) else Decimal(str(raw).strip())
        return scaled(value)
    except (InvalidOperation, UsageValueError):
        return None


def matches(metric: Metric, properties: Mapping[str, Any]) -> bool:
    """The metric's property filter: every listed property must equal the given string."""
    return all(str(properties.get(k)) == v for k, v in metric.filter.items())


def measure(metric: Metric, value: Decimal, properties: Mapping[str, Any]) -> tuple[bool, int | None, str | None]:
    """(passes the filter, scaled quantity of the metric's field, distinct-count text)."""
    matched = matches(metric, properties)
    distinct = metric.aggregation == "unique_count"  # only a distinct count reads `dim`
    if metric.field == "value":
        return matched, scaled(value), str(value) if distinct else None
    raw = properties.get(metric.field)
    return matched, _property_quantity(raw), str(raw) if distinct and raw is not None else None


# -- where an event may fall ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageWindow:
    """When one subscription accepts events of one metric, as the book stands (instants in UTC
    microseconds). The one rule set for a usage event, used by the book for a scenario's `usage`
    event and by the ingester for every row (billing.metering):

    - before the subscription started, or at/after it ended (or a scheduled cancellation takes
      effect), an event is outside its life;
    - during a trial it is accepted and never billed (README, choice 8);
    - in a usage period already invoiced it is late: issued invoices never change;
    - in a period that has closed but is not invoiced yet it is accepted while the ingest clock
      is within `grace` of the period's end (the scenario's own events are never late).
    """

    subscription: str
    started: int | None
    ends: int | None
    trial_end: int | None
    invoiced_until: int | None  # events before this fall in periods already invoiced
    closed: tuple[tuple[int, int], ...]  # closed, not yet invoiced periods

    def reject(self, at: int, *, now: int | None = None, grace: int | None = None) -> str | None:
        """Why an event at `at` is refused, or None when it is accepted."""
        if self.started is not None and at < self.started:
            return (f"at: {instant(at).isoformat()} is before subscription {self.subscription!r} started "
                    f"({instant(self.started).isoformat()}): outside its life")
        if self.ends is not None and at >= self.ends:
            return (f"at: {instant(at).isoformat()} is outside the life of subscription "
                    f"{self.subscription!r} (it ends at {instant(self.ends).isoformat()})")
        if self.trial_end is not None and at < self.trial_end:
            return None
        if self.invoiced_until is not None and at < self.invoiced_until:
            return (f"at: late: the usage period of {instant(at).isoformat()} of subscription "
                    f"{self.subscription!r} is already invoiced")
        if now is not None and grace is not None:
            for start, end in self.closed:
                if start <= at < end and now > end + grace:
                    return (f"at: late: the usage period [{instant(start).isoformat()}, "
                            f"{instant(end).isoformat()}) closed more than the grace period "
                            f"({timedelta(microseconds=grace)}) ago")
        return None


# -- aggregation --------------------------------------------------------------------------------


def aggregate_rows(metric: Metric, rows: list[Measured], start: datetime, end: datetime,
                   *, held_until: datetime | None = None) -> Fraction:
    """The metric's aggregate over `[start, end)` from one subscription's measured rows of it.

    `held_until` is the natural end of a period cut short by a cancellation: `weighted_sum`
    then weights by the share of the whole period (a GB held 13 days of 28 bills 13/28).
    """
    lo, hi = micros(start), micros(end)
    ordered = sorted((r for r in rows if r.matched), key=lambda r: (r.at, r.seq))
    inside = [r for r in ordered if lo <= r.at < hi]
    kind = metric.aggregation
    if kind == "count":
        return Fraction(len(inside))
    if kind == "unique_count":
        return Fraction(len({r.dim for r in inside if r.dim is not None}))
    present = [r for r in inside if r.quantity is not None]
    if kind == "sum":
        return Fraction(sum(r.quantity or 0 for r in present), SCALE)
    if kind == "max":
        return Fraction(max((r.quantity or 0 for r in present), default=0), SCALE)
    if kind == "last":
        return Fraction(present[-1].quantity or 0, SCALE) if present else Fraction(0)
    if kind == "weighted_sum":
        before = [r.quantity for r in ordered if r.at < lo and r.quantity is not None]
        level = before[-1] if before else 0
        points = [(r.at, r.quantity or 0) for r in present]
        return weighted(level, points, lo, hi, micros(held_until or end))
    raise ValueError(f"unknown aggregation {kind!r}")


def weighted(level: int, points: list[tuple[int, int]], lo: int, hi: int, full_hi: int) -> Fraction:
    """Σ level × time held over `[lo, hi)` ÷ (full_hi − lo); levels scaled by SCALE."""
    total_us = full_hi - lo
    if total_us <= 0:
        return Fraction(0)
    acc = 0
    cursor = lo
    for at, value in points:
        acc += level * (at - cursor)
        level, cursor = value, at
    acc += level * (hi - cursor)
    return Fraction(acc, total_us * SCALE)


def aggregate(metric: Metric, records: list[UsageRecord], start: datetime, end: datetime,
              *, held_until: datetime | None = None) -> Fraction:
    """The aggregate of plain records (measured here, in the order given)."""
    rows = []
    for seq, r in enumerate(records):
        if r.metric != metric.code:
            continue
        matched, quantity, dim = measure(metric, r.value, r.properties)
        rows.append(Measured(micros(r.at), seq, matched, quantity, dim))
    return aggregate_rows(metric, rows, start, end, held_until=held_until)


@dataclass
class MemoryUsage:
    """The in-memory usage source of the pure replay: measured rows per (subscription, metric)."""

    rows: dict[tuple[str, str], list[Measured]] = field(default_factory=dict)
    keys: set[tuple[str, str]] = field(default_factory=set)
    seq: int = 0

    def record(self, subscription: str, metric: Metric, record: UsageRecord) -> bool:
        if (subscription, record.key) in self.keys:
            return False
        matched, quantity, dim = measure(metric, record.value, record.properties)
        self.keys.add((subscription, record.key))
        self.seq += 1
        self.rows.setdefault((subscription, metric.code), []).append(
            Measured(micros(record.at), self.seq, matched, quantity, dim))
        return True

    def aggregate(self, subscription: str, metric: Metric, start: datetime, end: datetime,
                  *, held_until: datetime | None = None) -> Fraction:
        return aggregate_rows(metric, self.rows.get((subscription, metric.code), []), start, end,
                              held_until=held_until)


# -- rating -----------------------------------------------------------------------------------


def rate(metric: Metric, quantity: Fraction, currency: str) -> Fraction:
    """Exact amount for an aggregate: price the quantity above `included`, floor at `minimum`."""
    billable = max(quantity - exact(metric.included), Fraction(0))
    amount = price_quantity(metric, billable, currency)
    minimum = metric.minimum.get(currency)
    if minimum is not None:
        amount = max(amount, exact(minimum))
    return amount
