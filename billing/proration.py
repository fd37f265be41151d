"""Proration lines for an immediate mid-period change (SCENARIOS.md, "Changes and proration").

For each item that changed (plan before add-ons): a credit line (negative) for the unused part of
the old item and a charge line for the remaining part of the new one, each rounded on its own.
An item whose price is unchanged by the change writes nothing; a side with quantity 0 (or absent)
writes no line. The fraction comes from `billing.periods.fraction_left`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from billing.catalog import Catalog, Priced, price_quantity
from billing.money import RoundingMode, round_money
from billing.periods import Period
from billing.records import InvoiceLine
from billing.subscription import Items


def item_of(catalog: Catalog, kind: str, code: str) -> Priced:
    return catalog.plan(code) if kind == "plan" else catalog.addon(code)


def shown_quantity(item: Priced, qty: int) -> int:
    """A flat item shows quantity 1; the other models show their unit count."""
    return 1 if item.pricing == "flat" else qty


def describe(item: Priced, qty: int) -> str:
    name = item.name or item.code
    return name if item.pricing == "flat" else f"{name} × {qty}"


def proration_lines(
    old: Items | None,
    new: Items | None,
    *,
    catalog: Catalog,
    subscription: str,
    currency: str,
    mode: RoundingMode,
    start: datetime,
    period: Period,
    fraction: Fraction,
) -> list[InvoiceLine]:
    """Credit `old` and charge `new` for `fraction` of `period`, lines covering [start, period.end)."""
    old_map = {(k, c): q for k, c, q in old.priced()} if old is not None else {}
    new_map = {(k, c): q for k, c, q in new.priced()} if new is not None else {}
    keys = list(old_map) + [k for k in new_map if k not in old_map]
    keys.sort(key=lambda k: 0 if k[0] == "plan" else 1)
    lines: list[InvoiceLine] = []
    for key in keys:
        item = item_of(catalog, *key)
        before, after = old_map.get(key), new_map.get(key)
        if before is not None and after is not None and price_quantity(
                item, Fraction(before), currency) == price_quantity(item, Fraction(after), currency):
            continue
        for sign, qty in ((-1, before), (1, after)):
            if not qty:
                continue
            full = price_quantity(item, Fraction(qty), currency)
            what = "Unused time on" if sign < 0 else "Remaining time on"
            lines.append(InvoiceLine(
                kind="proration",
                description=f"{what} {describe(item, qty)}",
                subscription=subscription,
                quantity=Decimal(shown_quantity(item, qty)),
                unit_amount=item.unit_price(currency),
                amount=round_money(full * fraction * sign, currency, mode),
                period_start=start,
                period_end=period.end,
            ))
    return lines
