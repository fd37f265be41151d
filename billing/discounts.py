"""Coupons and the discount lines they put on invoices (SCENARIOS.md, "Invoices" → Discounts).

- A percent coupon applies to every line of the subscriptions it covers (plan, add-on, proration,
  usage); several apply in the order given, each on what the previous left.
- `once` covers the next invoice of the covered subscriptions; `{"periods": N}` the next N billing
  periods of each covered subscription starting at or after the coupon; `forever` every period
  starting at or after it. Coverage is decided per line, by the start of the period it belongs to.
- An amount coupon is taken once per covered subscription per billed period, capped at what is
  left of that subscription's lines, and never on an invoice of prorations only.
- Each coupon is one `discount` line per invoice it touches, rounded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from billing.money import RoundingMode, round_money
from billing.records import InvoiceLine

Tag = tuple[str, ...]


@dataclass
class Coupon:
    id: int
    customer: str
    subscription: str | None
    percent: Fraction | None
    amount: Decimal | None
    duration: Literal["forever", "once"] | int
    at: datetime
    windows: dict[str, tuple[datetime, datetime | None]] = field(default_factory=dict)
    used: bool = False
    lasts_until: datetime | None = None

    @property
    def recurring(self) -> bool:
        return self.duration != "once"

    def label(self) -> str:
        if self.percent is not None:
            pct = self.percent * 100
            return f"{_plain(Decimal(pct.numerator) / Decimal(pct.denominator))} % off"
        return f"{self.amount} off"


def covers(window: tuple[datetime, datetime | None], start: datetime) -> bool:
    """Whether a period starting at `start` lies in a coupon's covered window."""
    first, end = window
    return first <= start and (end is None or start < end)


def is_covered(coupon: Coupon, sub_id: str, period_start: datetime | None) -> bool:
    if coupon.subscription is not None and coupon.subscription != sub_id:
        return False
    if coupon.duration == "once":
        return not coupon.used
    window = coupon.windows.get(sub_id)
    return window is not None and period_start is not None and covers(window, period_start)


def discount_lines(
    lines: Sequence[InvoiceLine],
    coverage: dict[int, datetime],
    coupons: Sequence[Coupon],
    *,
    subscription_order: Callable[[str], int],
    currency: str,
    mode: RoundingMode,
    proration_only: bool,
) -> list[tuple[InvoiceLine, list[Tag]]]:
    """The discount lines for an invoice's `lines` (`coverage` maps id(line) to the start of the
    period it belongs to). Marks `once` coupons used when they took something."""
    out: list[tuple[InvoiceLine, list[Tag]]] = []
    if not coupons:
        return out
    remaining = {id(line): Fraction(line.amount) for line in lines}
    for coupon in coupons:
        covered = [line for line in lines if line.subscription is not None
                   and is_covered(coupon, line.subscription, coverage.get(id(line)))]
        if not covered or (coupon.amount is not None and proration_only):
            continue
        total = Fraction(0)
        if coupon.percent is not None:
            for line in covered:
                cut = remaining[id(line)] * coupon.percent
                remaining[id(line)] -= cut
                total += cut
        else:
            assert coupon.amount is not None
            subs = sorted({line.subscription or "" for line in covered if line.kind != "proration"},
                          key=subscription_order)
            for sub_id in subs:
                mine = [line for line in covered if line.subscription == sub_id]
                available = sum((remaining[id(line)] for line in mine), Fraction(0))
                take = min(Fraction(coupon.amount), max(available, Fraction(0)))
                total += take
                for line in mine:
                    part = min(take, max(remaining[id(line)], Fraction(0)))
                    remaining[id(line)] -= part
                    take -= part
        amount = round_money(-total, currency, mode)
        if amount == 0:
            continue  # nothing taken: no line, and a `once` coupon waits for the next invoice
        if coupon.duration == "once":
            coupon.used = True
        tags: list[Tag] = []
        for line in covered:
            start = coverage.get(id(line))
            if start is not None and line.subscription is not None:
                tag = ("cpn", str(coupon.id), line.subscription, start.isoformat())
                if tag not in tags:
                    tags.append(tag)
        out.append((InvoiceLine(
            kind="discount", description=f"Discount: {coupon.label()}", subscription=coupon.subscription,
            quantity=None, unit_amount=None, amount=amount, period_start=None, period_end=None), tags))
    return out


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")
