"""Metered usage: aggregation of a period's events and rating of the aggregate (pure).

Rules (SCENARIOS.md, "Catalog" → metric):
- `field` names the value summed, maxed or held (`value`, or a property), or the property
  counted distinct; `filter` keeps only events whose properties match.
- `sum`, `count`, `max`, `unique_count`, `last` (latest value in the period; 0 with no events) and
  `weighted_sum` (each value weighted by the share of the period it was held; the level at a
  period's start is the last value before it, 0 if none).
- Billable quantity = aggregate − `included` (not below 0), then priced by the metric's pricing
  model; a `minimum` per currency raises the amount to at least that figure.
Periods are half-open: an event exactly at a boundary belongs to the period that starts there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.catalog import Metric, price_quantity
from billing.money import MoneyError, parse_decimal


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One accepted usage event."""

    at: datetime
    metric: str
    value: Decimal
    key: str
    properties: Mapping[str, Any] = field(default_factory=dict)


def matches(metric: Metric, record: UsageRecord) -> bool:
    """The metric's property filter: every listed property must equal the given string."""
    return all(str(record.properties.get(k)) == v for k, v in metric.filter.items())


def field_value(metric: Metric, record: UsageRecord) -> Decimal | None:
    if metric.field == "value":
        return record.value
    raw = record.properties.get(metric.field)
    if raw is None:
        return None
    try:
        return parse_decimal(raw if not isinstance(raw, float) else str(raw), what=metric.field)
    except MoneyError:
        return None


def aggregate(
    metric: Metric, records: Iterable[UsageRecord], start: datetime, end: datetime,
    *, held_until: datetime | None = None,
) -> Fraction:
    """The metric's aggregate over `[start, end)` for one subscription's records (time-ordered).

    `held_until` is the natural end of a period cut short by a cancellation: `weighted_sum`
    then weights by the share of the whole period (a GB held 13 days of 28 bills 13/28).
    """
    relevant = [r for r in records if r.metric == metric.code and matches(metric, r)]
    inside = [r for r in relevant if start <= r.at < end]
    kind = metric.aggregation
    if kind == "count":
        return Fraction(len(inside))
    if kind == "unique_count":
        seen: set[str] = set()
        for r in inside:
            raw = r.value if metric.field == "value" else r.properties.get(metric.field)
            if raw is not None:
                seen.add(str(raw))
        return Fraction(len(seen))
    values = [(r.at, field_value(metric, r)) for r in inside]
    present = [(at, Fraction(v)) for at, v in values if v is not None]
    if kind == "sum":
        return sum((v for _, v in present), Fraction(0))
    if kind == "max":
        return max((v for _, v in present), default=Fraction(0))
    if kind == "last":
        return present[-1][1] if present else Fraction(0)
    if kind == "weighted_sum":
        before = [field_value(metric, r) for r in relevant if r.at < start]
        known = [v for v in before if v is not None]
        level = Fraction(known[-1]) if known else Fraction(0)
        total_us = _micros((held_until or end) - start)
        if total_us <= 0:
            return Fraction(0)
        weighted = Fraction(0)
        cursor = start
        for at, value in present:
            weighted += level * _micros(at - cursor)
            level, cursor = value, at
        weighted += level * _micros(end - cursor)
        return weighted / total_us
    raise ValueError(f"unknown aggregation {kind!r}")


def rate(metric: Metric, quantity: Fraction, currency: str) -> Fraction:
    """Exact amount for an aggregate: price the quantity above `included`, floor at `minimum`."""
    billable = max(quantity - Fraction(metric.included), Fraction(0))
    amount = price_quantity(metric, billable, currency)
    minimum = metric.minimum.get(currency)
    if minimum is not None:
        amount = max(amount, Fraction(minimum))
    return amount


def _micros(delta: Any) -> int:
    return int((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds)
