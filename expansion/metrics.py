"""The expansion metric set per calendar period, computed from the MRR movements alone.

Definitions (SCENARIOS.md, "Metric definitions"), per period P = [start, end) in UTC, with
A = customers whose MRR is positive when P starts (MRR before any movement dated at P's start):

- starting_mrr / ending_mrr: total MRR at P's start / end, each customer's MRR converted at the
  rate in force at P's first / last instant (each conversion rounded).
- new, expansion, contraction, churn, reactivation: sums of the movements' reporting deltas in P
  (contraction and churn as positive amounts); expansion also by subtype.
- fx_impact closes `starting + new + expansion + reactivation − contraction − churn + fx = ending`.
- expansion_accounts: distinct customers with an expansion movement in P;
  arpea = expansion ÷ expansion_accounts (Average Revenue Per Expansion Account).
- expansion_growth_rate = (expansion(P) − expansion(P−1)) ÷ expansion(P−1) × 100.
- nrr = Σ_A MRR at end ÷ Σ_A MRR at start × 100; grr = Σ_A min(end, start) ÷ Σ_A start × 100.
- arpa = ending_mrr ÷ customers with MRR > 0 at P's end.
- quick_ratio = (new + expansion + reactivation) ÷ (contraction + churn).
Rates are percentages with two decimals; a rate whose denominator is 0 is null.

A reversed entry and its reversal (`entry == "reversal"`, dated at the entry it negates) net to
zero: both are left out before anything is computed, and each customer's MRR is the running sum
of its remaining deltas (equal to `mrr_after` in a ledger without corrections).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from dateutil.relativedelta import relativedelta

from billing.fx import rate_at
from billing.money import RoundingMode, money_str, round_money, round_to_places
from billing.records import EXPANSION_SUBTYPES, MrrMovement
from billing.scenario import Settings

PeriodKind = str  # "month" | "quarter" | "year"


@dataclass(frozen=True)
class CalendarPeriod:
    label: str
    start: datetime
    end: datetime


def calendar_periods(kind: PeriodKind, first: datetime, last: datetime) -> list[CalendarPeriod]:
    """Calendar periods in UTC, without gaps, from the one holding `first` to the one holding `last`."""
    months = {"month": 1, "quarter": 3, "year": 12}[kind]
    first = first.astimezone(UTC)
    start_month = ((first.month - 1) // months) * months + 1
    cursor = datetime(first.year, start_month, 1, tzinfo=UTC)
    out: list[CalendarPeriod] = []
    while cursor <= last.astimezone(UTC):
        end = cursor + relativedelta(months=months)
        if kind == "month":
            label = f"{cursor.year}-{cursor.month:02d}"
        elif kind == "quarter":
            label = f"{cursor.year}-Q{(cursor.month - 1) // 3 + 1}"
        else:
            label = f"{cursor.year}"
        out.append(CalendarPeriod(label, cursor, end))
        cursor = end
    return out


def effective(movements: Sequence[MrrMovement]) -> list[MrrMovement]:
    """The movements that count: without reversals and the entries they reverse."""
    reversed_ids = {m.reverses for m in movements if m.entry == "reversal"}
    return [m for m in movements if m.entry != "reversal" and m.id not in reversed_ids]


class MrrHistory:
    """Each customer's MRR over time: the running sum of its movements' deltas."""

    def __init__(self, movements: Sequence[MrrMovement]) -> None:
        self.currency: dict[str, str] = {}
        self._times: dict[str, list[datetime]] = {}
        self._values: dict[str, list[Decimal]] = {}
        for m in movements:
            self.currency[m.customer] = m.currency
            self._times.setdefault(m.customer, []).append(m.at)
            values = self._values.setdefault(m.customer, [])
            values.append((values[-1] if values else Decimal(0)) + m.delta)

    @property
    def customers(self) -> list[str]:
        return list(self._times)

    def before(self, customer: str, instant: datetime) -> Decimal:
        """MRR just before `instant` (movements dated at `instant` not yet applied)."""
        times = self._times[customer]
        i = bisect_left(times, instant)
        return self._values[customer][i - 1] if i > 0 else Decimal(0)


def compute_metrics(
    movements: Sequence[MrrMovement],
    settings: Settings,
    first_at: datetime,
    last_at: datetime,
    fx_rate: Callable[[str, datetime], Fraction] | None = None,
) -> dict[str, list[dict[str, object]]]:
    """The `metrics` object of the replay output: month, quarter and year lists."""
    movements = effective(movements)
    if fx_rate is None:
        def fx_rate(currency: str, at: datetime) -> Fraction:
            return rate_at(settings, currency, at)
    history = MrrHistory(movements)
    return {
        kind: period_metrics(movements, history, settings, calendar_periods(kind, first_at, last_at), fx_rate)
        for kind in ("month", "quarter", "year")
    }


def period_metrics(
    movements: Sequence[MrrMovement],
    history: MrrHistory,
    settings: Settings,
    periods: Sequence[CalendarPeriod],
    fx_rate: Callable[[str, datetime], Fraction],
) -> list[dict[str, object]]:
    rep = settings.reporting_currency
    mode: RoundingMode = settings.rounding
    rows: list[dict[str, object]] = []
    previous_expansion: Decimal | None = None
    if periods:
        span = periods[0].end - periods[0].start
        prior_start = periods[0].start - span
        previous_expansion = _sum(m.reporting_delta for m in movements
                                  if m.type == "expansion" and prior_start <= m.at < periods[0].start)

    def value(customer: str, instant: datetime, rate_at: datetime) -> Decimal:
        mrr = history.before(customer, instant)
        if mrr == 0:
            return Decimal(0)
        return round_money(Fraction(mrr) * fx_rate(history.currency[customer], rate_at), rep, mode)

    for period in periods:
        inside = [m for m in movements if period.start <= m.at < period.end]
        last_instant = period.end - timedelta(microseconds=1)
        start_values = {c: value(c, period.start, period.start) for c in history.customers}
        end_values = {c: value(c, period.end, last_instant) for c in history.customers}
        starting = _sum(start_values.values())
        ending = _sum(end_values.values())
        by_type = {t: _sum(m.reporting_delta for m in inside if m.type == t)
                   for t in ("new", "expansion", "contraction", "churn", "reactivation")}
        contraction = -by_type["contraction"]
        churn = -by_type["churn"]
        expansion = by_type["expansion"]
        fx_impact = ending - (starting + by_type["new"] + expansion + by_type["reactivation"] - contraction - churn)
        by_subtype = {s: _sum(m.reporting_delta for m in inside if m.type == "expansion" and m.subtype == s)
                      for s in EXPANSION_SUBTYPES}
        accounts = len({m.customer for m in inside if m.type == "expansion"})
        active = [c for c, v in start_values.items() if v > 0]
        start_sum = _sum(start_values[c] for c in active)
        end_sum = _sum(end_values[c] for c in active)
        kept = _sum(min(start_values[c], end_values[c]) for c in active)
        payers_at_end = sum(1 for v in end_values.values() if v > 0)
        gained = by_type["new"] + expansion + by_type["reactivation"]
        lost = contraction + churn
        rows.append({
            "period": period.label,
            "starting_mrr": money_str(starting, rep, mode),
            "new": money_str(by_type["new"], rep, mode),
            "expansion": money_str(expansion, rep, mode),
            "expansion_by_subtype": {s: money_str(v, rep, mode) for s, v in by_subtype.items()},
            "contraction": money_str(contraction, rep, mode),
            "churn": money_str(churn, rep, mode),
            "reactivation": money_str(by_type["reactivation"], rep, mode),
            "ending_mrr": money_str(ending, rep, mode),
            "fx_impact": money_str(fx_impact, rep, mode),
            "expansion_accounts": accounts,
            "arpea": money_str(Fraction(expansion) / accounts, rep, mode) if accounts else None,
            "expansion_growth_rate": _rate(Fraction(expansion - previous_expansion) / Fraction(previous_expansion)
                                           * 100, mode) if previous_expansion else None,
            "nrr": _rate(Fraction(end_sum) / Fraction(start_sum) * 100, mode) if start_sum else None,
            "grr": _rate(Fraction(kept) / Fraction(start_sum) * 100, mode) if start_sum else None,
            "arpa": money_str(Fraction(ending) / payers_at_end, rep, mode) if payers_at_end else None,
            "quick_ratio": _rate(Fraction(gained) / Fraction(lost), mode) if lost else None,
        })
        previous_expansion = expansion
    return rows


def _sum(values: object) -> Decimal:
    total = Decimal(0)
    for v in values:  # type: ignore[attr-defined]
        total += v
    return total


def _rate(value: Fraction, mode: RoundingMode) -> str:
    return str(round_to_places(value, 2, mode))
