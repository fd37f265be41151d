"""Exchange rates: the value of one unit of a currency in the reporting currency.

Rule (SCENARIOS.md, "Top level"): an `fx_rates` entry applies from midnight UTC of its `from`
date on; the latest entry in force wins. The reporting currency is worth 1.
"""

from __future__ import annotations

from datetime import datetime
from fractions import Fraction

from billing.scenario import Settings


class MissingRate(ValueError):
    """No rate in force where an amount must be converted."""


def rate_at(settings: Settings, currency: str, at: datetime) -> Fraction:
    if currency == settings.reporting_currency:
        return Fraction(1)
    best = None
    for entry in settings.fx_rates:
        if entry.currency == currency and entry.from_ <= at.date() and (best is None or entry.from_ >= best.from_):
            best = entry
    if best is None:
        raise MissingRate(f"no fx rate for {currency} in {settings.reporting_currency} at "
                          f"{at.isoformat()} (settings.fx_rates)")
    return Fraction(best.rate)
