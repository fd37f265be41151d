"""MRR retention by signup cohort, computed in SQL over the monthly snapshots.

A customer's cohort is the month of its first movement (its first `new`); its base is its MRR at
the end of that month. For cohort c and k = 0, 1, 2, … months since:

- net retention(c, k) = Σ MRR at the end of month c + k ÷ Σ base × 100 (expansion counts);
- gross retention(c, k) = Σ min(MRR at the end of month c + k, base) ÷ Σ base × 100 (it never
  exceeds 100: expansion above the base does not count, contraction and churn do);
- customers(c, k) = customers of the cohort with MRR > 0 at the end of month c + k.

The database accumulates, per (cohort, currency), the month-to-month changes of MRR, of
min(MRR, base) and of [MRR > 0] that every entry maintains (`billing.month_measures`), with a
window function; `fast=False` computes the same from the monthly snapshots (one row per customer
and month it moved). Amounts in other currencies are valued at
the rate in force at the end of the table's last month (constant currency, so the cells show
retention and not exchange rates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from billing.periods import month_start
from billing.persistence import Engine
from billing.persistence.sql_reader import SqlReader, read_ledger
from expansion.sqlkit import convert_minor, load_book, parse_period, period_label

COHORTS = """
WITH b AS (
  SELECT s.customer, s.currency, s.month, s.mrr_start, s.mrr_end,
    MIN(s.month) OVER (PARTITION BY s.customer) AS cohort,
    FIRST_VALUE(s.mrr_end) OVER (PARTITION BY s.customer ORDER BY s.month) AS base
  FROM customer_mrr_months s WHERE s.month <= :m_last
), d AS (
  SELECT cohort, currency, month, SUM(mrr_end - mrr_start) AS dnet,
    SUM((CASE WHEN mrr_end < base THEN mrr_end ELSE base END)
        - (CASE WHEN mrr_start < base THEN mrr_start ELSE base END)) AS dkept,
    SUM(CASE WHEN month = cohort THEN base ELSE 0 END) AS dbase,
    SUM(CASE WHEN mrr_end > 0 THEN 1 ELSE 0 END) - SUM(CASE WHEN mrr_start > 0 THEN 1 ELSE 0 END) AS dpaying
  FROM b WHERE cohort >= :c_first AND cohort <= :c_last GROUP BY cohort, currency, month
)
SELECT cohort, currency, month,
  SUM(dnet) OVER (PARTITION BY cohort, currency ORDER BY month ROWS UNBOUNDED PRECEDING),
  SUM(dkept) OVER (PARTITION BY cohort, currency ORDER BY month ROWS UNBOUNDED PRECEDING),
  SUM(dbase) OVER (PARTITION BY cohort, currency ORDER BY month ROWS UNBOUNDED PRECEDING),
  SUM(dpaying) OVER (PARTITION BY cohort, currency ORDER BY month ROWS UNBOUNDED PRECEDING)
FROM d ORDER BY cohort, currency, month
"""


@dataclass
class Cohort:
    cohort: str
    customers: int  # paying at the end of the signup month
    mrr: str  # base MRR of the cohort, reporting currency
    net: list[str | None] = field(default_factory=list)  # by months since signup, percent
    gross: list[str | None] = field(default_factory=list)
    paying: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"cohort": self.cohort, "customers": self.customers, "mrr": self.mrr, "net": self.net,
                "gross": self.gross, "paying": self.paying}


@dataclass
class CohortTable:
    first: str
    last: str  # the last month retention is measured to
    reporting_currency: str
    cohorts: list[Cohort]

    def to_json(self) -> dict[str, object]:
        return {"from": self.first, "to": self.last, "reporting_currency": self.reporting_currency,
                "cohorts": [c.to_json() for c in self.cohorts]}


MAINTAINED = """
SELECT measure, month, SUM(amount) OVER (PARTITION BY measure ORDER BY month ROWS UNBOUNDED PRECEDING)
FROM mrr_month_measures WHERE measure LIKE 'cohort%' AND month <= :m_last ORDER BY measure, month
"""


def _maintained(reader: SqlReader, m_last: int, c_first: int, c_last: int) -> list[tuple[Any, ...]]:
    """The same rows as COHORTS, from the cohort measures maintained with every entry
    (`billing.month_measures`): (cohort, currency, month, net, kept, base, paying) running."""
    series: dict[tuple[int, str], dict[str, list[tuple[int, int]]]] = {}
    for measure, month, value in reader.rows(MAINTAINED, {"m_last": m_last}):
        name, signup, currency = str(measure).split(":")
        if c_first <= int(signup) <= c_last:
            series.setdefault((int(signup), currency), {}).setdefault(name, []).append((int(month), int(value)))
    out: list[tuple[Any, ...]] = []
    names = ("cohort_net", "cohort_kept", "cohort_base", "cohort_paying")
    for (cohort, currency), by_name in sorted(series.items()):
        months = sorted({m for points in by_name.values() for m, _ in points})
        for month in months:
            values = []
            for name in names:
                value = 0
                for m, v in by_name.get(name, ()):
                    if m > month:
                        break
                    value = v
                values.append(value)
            out.append((cohort, currency, month, *values))
    return out


def cohort_table(engine: Engine, *, first: str | None = None, last: str | None = None,
                 fast: bool = True) -> CohortTable:
    """Net and gross MRR retention for signup months `first`..`last` (default: every cohort),
    measured to the ledger's last month: from the cohort measures maintained with every entry,
    or with `fast=False` aggregated from the monthly snapshots (the two agree: a test checks it)."""
    with read_ledger(engine) as reader:
        book = load_book(reader)
        if book.first_month is None or book.last_month is None:
            raise LookupError("the ledger is empty")
        c_first = parse_period("month", first) if first is not None else book.first_month
        c_last = parse_period("month", last) if last is not None else book.last_month
        m_last = book.last_month
        if fast:
            rows = _maintained(reader, m_last, c_first, c_last)
        else:
            rows = reader.rows(COHORTS, {"m_last": m_last, "c_first": c_first, "c_last": c_last})
    at = month_start(m_last + 1) - timedelta(microseconds=1)

    def value(currency: str, minor: int) -> int:
        if currency == book.reporting_currency or minor == 0:
            return minor
        return convert_minor(book, currency, at, minor)

    series: dict[int, dict[str, list[tuple[int, int, int, int, int]]]] = {}
    for cohort, currency, month, net, kept, base, paying in rows:
        series.setdefault(int(cohort), {}).setdefault(str(currency), []).append(
            (int(month), int(net), int(kept), int(base), int(paying)))
    out: list[Cohort] = []
    for cohort in sorted(series):
        by_currency = series[cohort]
        cells: list[tuple[int, int, int, int]] = []
        for month in range(cohort, m_last + 1):
            net = kept = base = paying = 0
            for currency, points in by_currency.items():
                latest = None
                for point in points:
                    if point[0] <= month:
                        latest = point
                    else:
                        break
                if latest is not None:
                    net += value(currency, latest[1])
                    kept += value(currency, latest[2])
                    base += value(currency, latest[3])
                    paying += latest[4]
            cells.append((net, kept, base, paying))
        base0 = cells[0][2]
        out.append(Cohort(
            cohort=period_label("month", cohort),
            customers=cells[0][3],
            mrr=book.money(base0),
            net=[book.rate(net, base) for net, _, base, _ in cells],
            gross=[book.rate(kept, base) for _, kept, base, _ in cells],
            paying=[paying for _, _, _, paying in cells],
        ))
    return CohortTable(period_label("month", c_first), period_label("month", m_last), book.reporting_currency, out)
