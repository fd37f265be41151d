"""Monthly measures of the whole book, maintained with every ledger entry ("fast metrics").

The monthly metric set needs, for every calendar month m, sums over all customers of values
that depend only on the customer's MRR L at the end of months m − 12, m − 1 and m (and on what
moved in m). Customer c's contribution q_c(m) to a measure:

| measure | q_c(m), with S = L(m−1) and E = L(m) converted at m's first / last instant |
| --- | --- |
| starting, ending | S, E |
| payers_start, payers_end | [S > 0], [E > 0] |
| a_end, a_min | [S > 0]·E, [S > 0]·min(S, E) — NRR and GRR numerators (A = [S > 0]) |
| accounts, activated | [expansions in m > 0], [S > 0 and expansions in m > 0] |
| lost_a | [S > 0]·min(lost in m, S) — the event-sum GRR's loss |
| ttm_f:CUR, ttm_g:CUR, ttm_h:CUR | [L(m−12) > 0]·L(m), min(L(m−12), L(m)), L(m−12) in the customer's currency |
| cohort_net:C:CUR, …_kept, …_base, …_paying | for m ≥ C (signup month), B = L(C): L(m), min(L(m), B), B, [L(m) > 0] |

The same level measures (starting … lost_a) are kept per quarter and per year as
`quarter:NAME` and `year:NAME`, stored at the period's first month: S is the MRR at the end of
the month before the period, E at the end of its last month, "in m" becomes "in the period".

As a function of m, q_c is piecewise constant: it changes only in a month where the customer
moved, the month after, twelve months after, or where an exchange rate changes (the book's
rates are fixed once it holds a command, so every future conversion is known). So each measure
is stored as a difference array — Q(m) = Σ_{m' ≤ m} D(m') — and a change to a customer's
months from m0 on adds (new contribution − old contribution) to D at the breakpoints from m0
on. Conversions are rounded per customer with the book's mode, exactly as the contract's
metric set does, so the monthly metric set read from these sums equals the replay's.

Rows are a customer's `customer_mrr_months` (month, mrr_start, mrr_end, expansions, lost);
amounts are integer minor units (customer currency; `lost` in the reporting currency).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from fractions import Fraction
from functools import cache

from billing.fx import MissingRate, rate_at
from billing.money import minor_units, round_quotient
from billing.periods import month_start
from billing.scenario import Settings

LEVEL_MEASURES = ("starting", "ending", "payers_start", "payers_end", "a_end", "a_min", "accounts", "activated",
                  "lost_a")
TTM_MEASURES = ("ttm_f", "ttm_g", "ttm_h")
COHORT_MEASURES = ("cohort_net", "cohort_kept", "cohort_base", "cohort_paying")
PERIODS = (("quarter", 3), ("year", 12))
_PERIOD_NAMES = {period: tuple(f"{period}:{name}" for name in LEVEL_MEASURES) for period, _ in PERIODS}


@dataclass(frozen=True)
class MonthRow:
    month: int
    mrr_start: int
    mrr_end: int
    expansions: int = 0
    lost: int = 0


class Conversion:
    """Customer-currency minor units to reporting minor units at a month's first or last instant,
    rounded per amount with the book's mode; and the months where a rate changes. The book
    refuses a movement it cannot convert, so a customer has MRR only where a rate is in force;
    `strict=False` (the write path) counts an amount without a rate as 0 rather than failing a
    command over a ledger written by other means."""

    def __init__(self, settings: Settings, *, strict: bool = True) -> None:
        self.settings = settings
        self.strict = strict
        self.reporting = settings.reporting_currency
        self.rounding = settings.rounding
        breaks: set[int] = set()
        for entry in settings.fx_rates:
            # the end rate changes in the month holding `from`, the start rate then or a month later
            month = entry.from_.year * 12 + entry.from_.month - 1
            breaks.update((month, month + 1))
        self.breaks = tuple(sorted(breaks))
        # (currency, month, end) -> the factor as (numerator, denominator), None without a rate
        self._ratios: dict[tuple[str, int, bool], tuple[int, int] | None] = {}

    def _compute_factor(self, currency: str, month: int, end: bool) -> Fraction | None:
        at = month_start(month + 1) - timedelta(microseconds=1) if end else month_start(month)
        try:
            rate = rate_at(self.settings, currency, at)
        except MissingRate:
            return None
        return rate * Fraction(10) ** (minor_units(self.reporting) - minor_units(currency))

    def ratio(self, currency: str, month: int, end: bool) -> tuple[int, int] | None:
        """The factor at a month's first or last instant as (numerator, denominator); None
        without a rate."""
        key = (currency, month, end)
        ratio = self._ratios.get(key, _UNKNOWN)
        if ratio is _UNKNOWN:
            factor = self._compute_factor(currency, month, end)
            ratio = self._ratios[key] = None if factor is None else (factor.numerator, factor.denominator)
        return ratio

    def convert(self, currency: str, month: int, amount: int, *, end: bool) -> int:
        if currency == self.reporting or amount == 0:
            return amount
        key = (currency, month, end)
        ratio = self._ratios.get(key, _UNKNOWN)
        if ratio is _UNKNOWN:
            ratio = self.ratio(currency, month, end)
        if ratio is None:
            if not self.strict:
                return 0
            raise MissingRate(f"no fx rate for {currency} in {self.reporting} in month {month}")
        return round_quotient(amount * ratio[0], ratio[1], self.rounding)


_UNKNOWN = (0, 0)  # a ratio not computed yet (no real ratio has a zero denominator)


@cache
def _measures(currency: str, cohort: int | None) -> tuple[str, ...]:
    names = (*LEVEL_MEASURES, *(f"{name}:{currency}" for name in TTM_MEASURES))
    if cohort is None:
        return names
    return (*names, *(f"{name}:{cohort}:{currency}" for name in COHORT_MEASURES))


class _Customer:
    """One customer's rows, for evaluating its contributions month by month."""

    def __init__(self, rows: Sequence[MonthRow], currency: str, conversion: Conversion, before: int,
                 first: MonthRow | None) -> None:
        self.months = [row.month for row in rows]
        self.ends = [row.mrr_end for row in rows]
        self.expansions = [row.expansions for row in rows]
        self.lost = [row.lost for row in rows]
        self.rows = {row.month: row for row in rows}
        self.currency = currency
        self.conversion = conversion
        self.before = before
        self.first = first

    def period_values(self, p: int, k: int) -> tuple[int, ...]:
        """The level measures of period p of k months (a quarter or a year)."""
        first, last = p * k, (p + 1) * k - 1
        months, ends = self.months, self.ends
        lo, hi = bisect_right(months, first - 1), bisect_right(months, last)
        # the level L(m), MRR at the end of month m, is the latest row's at or before m, else `before`
        s = ends[lo - 1] if lo else self.before  # L(first - 1)
        e = ends[hi - 1] if hi else self.before  # L(last)
        if lo == hi:  # no row inside the period
            expansions = lost = 0
        else:
            expansions = sum(self.expansions[lo:hi])
            lost = sum(self.lost[lo:hi])
        convert, currency = self.conversion.convert, self.currency
        start = convert(currency, first, s, end=False)
        end = convert(currency, last, e, end=True)
        if start > 0:
            return (start, end, 1, int(end > 0), end, min(start, end), int(expansions > 0), int(expansions > 0),
                    min(lost, start))
        return (start, end, 0, int(end > 0), 0, 0, int(expansions > 0), 0, 0)

    def same_period(self, p: int, q: int, k: int) -> bool:
        """Whether period q (after p) of k months has the level measures of period p without
        computing them: every row is before p, so both start and end at the last level with
        nothing moving inside, and the rates at their first and last instants are the same."""
        months = self.months
        if months and months[-1] >= p * k:
            return False
        currency, conversion = self.currency, self.conversion
        if currency == conversion.reporting:
            return True
        return (conversion.ratio(currency, p * k, False) == conversion.ratio(currency, q * k, False)
                and conversion.ratio(currency, p * k + k - 1, True) == conversion.ratio(currency, q * k + k - 1, True))

    def values(self, month: int) -> tuple[int, ...]:
        """q_c(month), in the order of `_measures(currency, cohort)`."""
        months, ends, before = self.months, self.ends, self.before
        i = bisect_right(months, month - 1)
        s = ends[i - 1] if i else before  # L(month - 1)
        j = i + 1 if i < len(months) and months[i] == month else i
        e = ends[j - 1] if j else before  # L(month): the row of `month` if there is one
        i = bisect_right(months, month - 12, 0, i)
        then = ends[i - 1] if i else before  # L(month - 12)
        own = self.rows.get(month)
        expansions = own.expansions if own is not None else 0
        lost = own.lost if own is not None else 0
        convert, currency = self.conversion.convert, self.currency
        start = convert(currency, month, s, end=False)
        end = convert(currency, month, e, end=True)
        member = start > 0
        out = (
            start, end, int(member), int(end > 0),
            end if member else 0, min(start, end) if member else 0,
            int(expansions > 0), int(member and expansions > 0), min(lost, start) if member else 0,
            e if then > 0 else 0, min(then, e), then,
        )
        if self.first is None:
            return out
        if month < self.first.month:
            return (*out, 0, 0, 0, 0)
        base = self.first.mrr_end
        return (*out, e, min(e, base), base, int(e > 0))


def _first(rows: Sequence[MonthRow], first: MonthRow | None, before: int) -> MonthRow | None:
    """The customer's first row: given, or the first of `rows` when they start from nothing."""
    if first is not None:
        return next((row for row in rows if row.month == first.month), first)
    return rows[0] if rows and before == 0 else None


def contribution(rows: Sequence[MonthRow], currency: str, month: int, conversion: Conversion,
                 before: int = 0, first: MonthRow | None = None) -> dict[str, int]:
    """q_c(month) for every measure (see the module docstring); `before` is the level before the
    first row given, `first` the customer's first row if `rows` do not start with it."""
    start = _first(rows, first, before)
    values = _Customer(rows, currency, conversion, before, start).values(month)
    return dict(zip(_measures(currency, start.month if start else None), values, strict=True))


def period_contribution(rows: Sequence[MonthRow], currency: str, p: int, k: int, conversion: Conversion,
                        before: int = 0) -> dict[str, int]:
    """q_c of period p of k months for the level measures (`quarter:` and `year:` families)."""
    values = _Customer(rows, currency, conversion, before, None).period_values(p, k)
    return dict(zip(LEVEL_MEASURES, values, strict=True))


def _points(rows: Sequence[MonthRow], currency: str, since: int, conversion: Conversion) -> set[int]:
    """The months from `since` on where the contributions of these rows may change."""
    points = {since}
    for row in rows:
        for month in (row.month, row.month + 1, row.month + 12):
            if month > since:
                points.add(month)
    if currency != conversion.reporting:
        points.update(b for b in conversion.breaks if b > since)
    return points


def _periods(points: set[int], k: int, opening: int) -> set[int]:
    """The periods of k months from `opening` on where the level measures may change."""
    periods = {month // k for month in points}
    periods.update(month // k + 1 for month in points)
    return {p for p in periods if p >= opening}


def differences(rows: Sequence[MonthRow], currency: str, since: int, conversion: Conversion,
                before: int = 0, first: MonthRow | None = None) -> dict[tuple[str, int], int]:
    """The difference-array entries of one customer's contributions from month `since` on:
    D(since) = q(since), and at each later breakpoint the change of q. `rows` must hold every row
    from `since − 12` on; `before` is the level before the first of them and `first` the
    customer's first row when `rows` do not start with it."""
    start = _first(rows, first, before)
    points = _points(rows, currency, since, conversion)
    customer = _Customer(rows, currency, conversion, before, start)
    names = _measures(currency, start.month if start else None)
    out: dict[tuple[str, int], int] = {}
    previous = (0,) * len(names)
    for month in sorted(points):
        current = customer.values(month)
        if current != previous:
            for name, now, then in zip(names, current, previous, strict=True):
                if now != then:
                    out[(name, month)] = now - then
        previous = current
    for period, k in PERIODS:
        previous = (0,) * len(LEVEL_MEASURES)
        for p in sorted(_periods(points, k, since // k)):
            current = customer.period_values(p, k)
            if current != previous:
                for name, now, then in zip(_PERIOD_NAMES[period], current, previous, strict=True):
                    if now != then:
                        out[(name, p * k)] = now - then
            previous = current
    return out


def change(old: Sequence[MonthRow], new: Sequence[MonthRow], currency: str, since: int, conversion: Conversion,
           before: int = 0, first: MonthRow | None = None) -> dict[tuple[str, int], int]:
    """What to add to the difference arrays when a customer's rows go from `old` to `new`, the
    two being equal before month `since` (`first`: the customer's first row as stored, if the rows
    do not reach back to it): `differences(new) − differences(old)` without its zeros, in its
    order (the entries of `new`, then those only `old` has).

    When both measure the same cohort (the usual case) the two are walked together, once over
    their breakpoints: each history is evaluated only at its own breakpoints, as `differences`
    does, and only the net entry is kept."""
    new_start, old_start = _first(new, first, before), _first(old, first, before)
    names = _measures(currency, new_start.month if new_start else None)
    if names != _measures(currency, old_start.month if old_start else None):
        out = differences(new, currency, since, conversion, before, first)
        for key, value in differences(old, currency, since, conversion, before, first).items():
            out[key] = out.get(key, 0) - value
        return {key: value for key, value in out.items() if value}
    new_customer = _Customer(new, currency, conversion, before, new_start)
    old_customer = _Customer(old, currency, conversion, before, old_start)
    new_points, old_points = _points(new, currency, since, conversion), _points(old, currency, since, conversion)
    net: dict[tuple[str, int], int] = {}
    only_old: dict[tuple[str, int], int] = {}
    _walk(net, only_old, names, new_points, old_points, new_customer.values, old_customer.values)
    for period, k in PERIODS:
        opening = since // k
        _walk(net, only_old, _PERIOD_NAMES[period], _periods(new_points, k, opening), _periods(old_points, k, opening),
              new_customer.period_values, old_customer.period_values, k, new_customer.same_period,
              old_customer.same_period)
    net.update(only_old)
    return net


class _Walker:
    """One history's side of `_walk`: where it steps, how it is evaluated, and where it stands."""

    def __init__(self, points: set[int], values: Callable[..., tuple[int, ...]],
                 same: Callable[[int, int, int], bool] | None, width: int) -> None:
        self.points, self.values, self.same = points, values, same
        self.current: tuple[int, ...] = (0,) * width
        self.last = -1  # the last point it was evaluated at

    def step_to(self, point: int, k: int) -> tuple[int, ...]:
        """Its measures at `point`: evaluated at its own breakpoints (for periods, unless `same`
        says the period reads as the last one evaluated), else as they stood."""
        if point in self.points:
            if not k:
                self.current = self.values(point)
            elif self.same is None or self.last < 0 or not self.same(self.last, point, k):
                self.current = self.values(point, k)
                self.last = point
        return self.current


def _walk(net: dict[tuple[str, int], int], only_old: dict[tuple[str, int], int], names: tuple[str, ...],
          new_points: set[int], old_points: set[int], new_values: Callable[..., tuple[int, ...]],
          old_values: Callable[..., tuple[int, ...]], k: int = 0,
          new_same: Callable[[int, int, int], bool] | None = None,
          old_same: Callable[[int, int, int], bool] | None = None) -> None:
    """`change` over one family of measures (months, or with `k` periods of k months): at each
    breakpoint of either history the step of each (0 at a point that is not its own, or, for
    periods, at one that `same` says reads as its previous one), the new step less the old one
    put in `net` where the new history steps and in `only_old` where only the old one does."""
    new = _Walker(new_points, new_values, new_same, len(names))
    old = _Walker(old_points, old_values, old_same, len(names))
    for point in sorted(new_points | old_points):
        new_previous, old_previous = new.current, old.current
        new_current, old_current = new.step_to(point, k), old.step_to(point, k)
        if new_current != new_previous or old_current != old_previous:
            month = point * k if k else point
            for name, now, then, old_now, old_then in zip(names, new_current, new_previous, old_current, old_previous,
                                                          strict=True):
                step = now - then
                old_step = old_now - old_then
                if step:
                    if step != old_step:
                        net[(name, month)] = step - old_step
                elif old_step:
                    only_old[(name, month)] = -old_step
