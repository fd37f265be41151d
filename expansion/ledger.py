"""The expansion metric set computed by the database over the insert-only ledger.

For a range of calendar months, quarters or years (UTC) and optionally a segmentation, the
database aggregates the ledger with GROUP BY and window functions; Python only turns the
per-period aggregates into the output rows (rates, rounding, labels). The definitions are those
of SCENARIOS.md ("Metric definitions"), with the same rounding and nulls as
`expansion.metrics.compute_metrics` (a test checks the two agree on every fixture), plus:

- `arr`, `expansion_arr`: `ending_mrr` × 12 and `expansion` × 12.
- `expansion_share`: expansion ÷ (new + expansion + reactivation) × 100 — expansion's share of
  gross new MRR.
- `expansion_activation_rate`: accounts of A (MRR > 0 when P starts) with an expansion in P ÷
  |A| × 100.
- `grr_event_sum`: (Σ_A start − Σ_A contraction and churn in P) ÷ Σ_A start × 100, each account
  losing at most what it had at the start. `grr` (SCENARIOS.md) is the snapshot figure, each
  account's MRR at P's end against its start; the two differ for an account that churns and
  comes back inside P (the snapshots see nothing lost, the event sum sees the churn).
- `rolling_quarter_expansion_arr`, `rolling_quarter_new_logo_arr`: expansion × 12 and new × 12
  over the three months that end with P's last month; `rolling_quarter_expansion_vs_new_logo`
  is their ratio.
- `ttm_nrr`, `ttm_grr`: trailing twelve months to P's last month — accounts with MRR when the
  window starts, Σ MRR at its end ÷ Σ MRR at its start and Σ min(end, start) ÷ Σ start × 100,
  both ends valued at the rate in force at the window's end (constant currency).
- `transfer_in`, `transfer_out`: MRR that moved into / out of the segment between the segments
  of one customer (plan and product segments; 0 otherwise).

Every period of every segment satisfies
`starting + new + expansion + reactivation − contraction − churn + transfer_in − transfer_out
+ fx_impact = ending` (fx_impact is 0 when every amount is in the reporting currency).

Where the numbers come from:
- the whole book (months, quarters, years): the tables maintained in every command's
  transaction — `mrr_month_flows` and the difference arrays of `mrr_month_measures`
  (billing.month_measures), accumulated by a window function — so the metric set reads
  O(periods) rows whatever the ledger's size. Everything below is the aggregation of the ledger
  itself, used for segments and with `fast=False` (the tests check both ways agree);
- flows (new … reactivation, by subtype, transfers): sums of `reporting_delta` per month; a
  reversal has the negated amounts of the entry it reverses and the same month, so the pair nets
  to zero without being looked for;
- MRR levels: `customer_mrr_months` (each customer's MRR at the start and end of every month it
  moved) — for customers in the reporting currency by running sums per period, for the others
  per customer and period (each converted and rounded on its own at the period's first or last
  instant, as the contract asks);
- plan and product segments: the movement legs. When one movement's legs fall in several
  segments, the part of the movement that is the customer's net change keeps its type and the
  rest moves between segments as transfers: with a net rise the segments that lost MRR transfer
  it all out and the segments that gained receive it in proportion to their gain (the integer
  residue on the largest), the remainder being the movement's type; symmetrically for a fall.
  An upgrade A($100) → B($150) is, for plan A, a transfer out of 100, and for plan B a transfer
  in of 100 plus an expansion of 50.
- `--by subtype` splits the flows only: MRR levels have no subtype, so starting/ending MRR and
  the rates built on them are null.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from fractions import Fraction
from typing import Any

from billing.fx import MissingRate
from billing.persistence import Engine
from billing.persistence.sql_reader import SqlReader, read_ledger
from billing.records import EXPANSION_SUBTYPES
from expansion.sqlkit import (
    MONTHS_IN,
    LedgerBook,
    Segmentation,
    compose,
    conversion,
    convert_minor,
    customer_segment,
    load_book,
    parse_period,
    parse_segmentation,
    period_bounds,
    period_label,
)

SCENARIO_KEYS = (
    "period", "starting_mrr", "new", "expansion", "expansion_by_subtype", "contraction", "churn", "reactivation",
    "ending_mrr", "fx_impact", "expansion_accounts", "arpea", "expansion_growth_rate", "nrr", "grr", "arpa",
    "quick_ratio",
)
EXTRA_KEYS = (
    "transfer_in", "transfer_out", "arr", "expansion_arr", "expansion_share", "expansion_activation_rate",
    "grr_event_sum", "rolling_quarter_expansion_arr", "rolling_quarter_new_logo_arr",
    "rolling_quarter_expansion_vs_new_logo", "ttm_nrr", "ttm_grr",
)
TYPES = ("new", "expansion", "contraction", "churn", "reactivation")


@dataclass
class MetricSet:
    """The metric rows of a range: one per period, or per (segment, period) when segmented."""

    period: str
    first: str
    last: str
    by: str | None
    reporting_currency: str
    rows: list[dict[str, object]] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"period": self.period, "from": self.first, "to": self.last, "by": self.by,
                "reporting_currency": self.reporting_currency, "rows": self.rows}


# --- SQL --------------------------------------------------------------------------------------

# Per-customer monthly levels for the whole book or a per-customer segment.
SNAPSHOT_BASE = """
SELECT {seg} AS seg, s.customer, s.currency, s.month, s.mrr_start, s.mrr_end, s.expansions, s.lost
FROM customer_mrr_months s {join}
WHERE s.month < :m_hi
"""

# Legs per movement and segment, with the transfer allocation (see the module docstring).
LEGS_ALLOCATED = """
WITH ls AS (
  SELECT l.movement_id, COALESCE(l.{column}, '') AS seg, SUM(l.delta) AS d, SUM(l.reporting_delta) AS r
  FROM mrr_movement_legs l JOIN mrr_movements m ON m.id = l.movement_id
  WHERE m.month < :m_hi
  GROUP BY l.movement_id, COALESCE(l.{column}, '')
), la AS (
  SELECT ls.movement_id, ls.seg, ls.d, ls.r, m.customer, m.currency, m.month, m.type, m.subtype, m.entry,
    SUM(CASE WHEN ls.r > 0 THEN ls.r ELSE 0 END) OVER (PARTITION BY ls.movement_id) AS pos,
    SUM(CASE WHEN ls.r < 0 THEN -ls.r ELSE 0 END) OVER (PARTITION BY ls.movement_id) AS neg,
    ROW_NUMBER() OVER (PARTITION BY ls.movement_id, CASE WHEN ls.r > 0 THEN 1 ELSE 0 END
                       ORDER BY ABS(ls.r) DESC, ls.seg) AS rk
  FROM ls JOIN mrr_movements m ON m.id = ls.movement_id
), lf AS (
  SELECT la.*,
    CASE WHEN pos >= neg THEN (CASE WHEN r > 0 THEN (neg * r) / pos ELSE 0 END)
         ELSE (CASE WHEN r < 0 THEN (pos * (-r)) / neg ELSE 0 END) END AS share
  FROM la
), lr AS (
  SELECT lf.*, SUM(share) OVER (PARTITION BY movement_id) AS shares FROM lf
), lt AS (
  SELECT lr.*,
    CASE WHEN pos >= neg THEN (CASE WHEN r > 0 THEN share + (CASE WHEN rk = 1 THEN neg - shares ELSE 0 END)
                                    ELSE 0 END)
         ELSE (CASE WHEN r > 0 THEN r ELSE 0 END) END AS tin,
    CASE WHEN pos >= neg THEN (CASE WHEN r < 0 THEN -r ELSE 0 END)
         ELSE (CASE WHEN r < 0 THEN share + (CASE WHEN rk = 1 THEN pos - shares ELSE 0 END) ELSE 0 END)
         END AS tout
  FROM lr
)
SELECT movement_id, seg, customer, currency, month, type, subtype, entry, d, r - tin + tout AS own, tin, tout
FROM lt
"""

# Per-(customer, segment) monthly levels from the allocated legs.
LEGS_BASE = """
SELECT seg, customer, currency, month, e - d AS mrr_start, e AS mrr_end, expansions, lost FROM (
  SELECT g.*, SUM(d) OVER (PARTITION BY seg, customer ORDER BY month ROWS UNBOUNDED PRECEDING) AS e FROM (
    SELECT seg, customer, currency, month, SUM(d) AS d,
      SUM(CASE WHEN type = 'expansion' AND own <> 0 THEN (CASE WHEN entry = 'reversal' THEN -1 ELSE 1 END)
               ELSE 0 END) AS expansions,
      SUM(CASE WHEN type IN ('contraction', 'churn') THEN -own ELSE 0 END) AS lost
    FROM {legs} GROUP BY seg, customer, currency, month) g) z
"""

# Levels per (segment, customer, period): a period's start is its first month's start, its end
# the last month's end.
LEVELS_MONTHLY = """
SELECT seg, customer, currency, month AS p, mrr_start AS s, mrr_end AS e, expansions, lost FROM ({base}) b
"""
LEVELS_GROUPED = """
SELECT seg, customer, currency, p, MAX(CASE WHEN rf = 1 THEN mrr_start END) AS s,
  MAX(CASE WHEN rl = 1 THEN mrr_end END) AS e, SUM(expansions) AS expansions, SUM(lost) AS lost
FROM (SELECT b.*, b.month / {k} AS p,
        ROW_NUMBER() OVER (PARTITION BY b.seg, b.customer, b.month / {k} ORDER BY b.month) AS rf,
        ROW_NUMBER() OVER (PARTITION BY b.seg, b.customer, b.month / {k} ORDER BY b.month DESC) AS rl
      FROM ({base}) b) x
GROUP BY seg, customer, currency, p
"""

# Customers in the reporting currency: per-period sums, levels as running sums.
REPORTING = """
SELECT seg, p, net, up, loss, payers_delta, activated, accounts, lost_a,
  SUM(net) OVER (PARTITION BY seg ORDER BY p ROWS UNBOUNDED PRECEDING) AS level_end,
  SUM(payers_delta) OVER (PARTITION BY seg ORDER BY p ROWS UNBOUNDED PRECEDING) AS payers_end
FROM (
  SELECT seg, p, SUM(e - s) AS net,
    SUM(CASE WHEN s > 0 THEN e - s ELSE 0 END) AS up,
    SUM(CASE WHEN s > 0 AND e < s THEN s - e ELSE 0 END) AS loss,
    SUM(CASE WHEN e > 0 THEN 1 ELSE 0 END) - SUM(CASE WHEN s > 0 THEN 1 ELSE 0 END) AS payers_delta,
    SUM(CASE WHEN s > 0 AND expansions > 0 THEN 1 ELSE 0 END) AS activated,
    SUM(CASE WHEN expansions > 0 THEN 1 ELSE 0 END) AS accounts,
    SUM(CASE WHEN s > 0 THEN (CASE WHEN lost > s THEN s ELSE lost END) ELSE 0 END) AS lost_a
  FROM ({levels}) v WHERE currency = :rep GROUP BY seg, p) g
"""

# Customers in other currencies: one row per customer and period in range (months without a
# movement carry the previous end), each converted and rounded on its own.
FOREIGN = """
WITH RECURSIVE seq(p) AS (
  SELECT CAST(:p_lo AS INTEGER) UNION ALL SELECT p + 1 FROM seq WHERE p < :p_hi
), v AS (
  SELECT v0.*, LEAD(v0.p) OVER (PARTITION BY v0.seg, v0.customer ORDER BY v0.p) AS next_p
  FROM ({levels}) v0 WHERE v0.currency <> :rep
), grid AS (
  SELECT seg, customer, currency, p, s, e, expansions, lost FROM v WHERE p >= :p_lo
  UNION ALL
  SELECT v.seg, v.customer, v.currency, seq.p, v.e, v.e, 0, 0
  FROM v JOIN seq ON seq.p > v.p AND seq.p < COALESCE(v.next_p, :p_hi + 1)
  WHERE v.e <> 0
), c AS (
  SELECT seg, p, s, e, expansions, lost, {start} AS sc, {end} AS ec FROM grid
)
SELECT seg, p, SUM(sc), SUM(ec),
  SUM(CASE WHEN sc > 0 THEN ec ELSE 0 END),
  SUM(CASE WHEN sc > 0 THEN (CASE WHEN ec < sc THEN ec ELSE sc END) ELSE 0 END),
  SUM(CASE WHEN ec > 0 THEN 1 ELSE 0 END), SUM(CASE WHEN sc > 0 THEN 1 ELSE 0 END),
  SUM(CASE WHEN sc > 0 AND expansions > 0 THEN 1 ELSE 0 END), SUM(CASE WHEN expansions > 0 THEN 1 ELSE 0 END),
  SUM(CASE WHEN sc > 0 THEN (CASE WHEN lost > sc THEN sc ELSE lost END) ELSE 0 END),
  SUM(CASE WHEN (sc IS NULL AND s <> 0) OR (ec IS NULL AND e <> 0) THEN 1 ELSE 0 END)
FROM c GROUP BY seg, p
"""

# Flows per month: movements (whole book, per-customer segments, subtypes) or allocated legs.
FLOWS = """
SELECT {seg} AS seg, m.month, m.type, m.subtype, SUM(m.reporting_delta), 0, 0
FROM mrr_movements m {join}
WHERE m.month >= :m_lo AND m.month < :m_hi
GROUP BY 1, 2, 3, 4
"""
FLOWS_LEGS = """
SELECT seg, month, type, subtype, SUM(own), SUM(tin), SUM(tout) FROM {legs}
WHERE month >= :m_lo AND month < :m_hi GROUP BY 1, 2, 3, 4
"""
SUBTYPE = "CASE WHEN m.subtype IS NULL THEN m.type ELSE m.type || '/' || m.subtype END"
SUBTYPE_ACCOUNTS = """
SELECT seg, p, COUNT(*) FROM (
  SELECT {seg} AS seg, m.month / {k} AS p, m.customer, SUM(CASE WHEN m.entry = 'reversal' THEN -1 ELSE 1 END) AS n
  FROM mrr_movements m WHERE m.type = 'expansion' AND m.month >= :m_lo AND m.month < :m_hi GROUP BY 1, 2, 3
) x WHERE n > 0 GROUP BY seg, p
"""

# Trailing twelve months: for every customer, the points where its MRR now or twelve months ago
# changes; the MRR then and now carried forward to each point, per-point changes of
# [then > 0]·now, min(then, now) and then summed per (segment, currency, month) and accumulated.
TTM = """
WITH pts AS (
  SELECT seg, customer, currency, month AS t FROM {table} WHERE month <= :m_top
  UNION
  SELECT seg, customer, currency, month + 12 FROM {table} WHERE month + 12 <= :m_top
), j AS (
  SELECT pts.seg, pts.customer, pts.currency, pts.t, a.mrr_end AS ea, b.mrr_end AS eb
  FROM pts
  LEFT JOIN {table} a ON a.seg = pts.seg AND a.customer = pts.customer AND a.month = pts.t
  LEFT JOIN {table} b ON b.seg = pts.seg AND b.customer = pts.customer AND b.month = pts.t - 12
), g AS (
  SELECT j.*,
    COUNT(ea) OVER (PARTITION BY seg, customer ORDER BY t ROWS UNBOUNDED PRECEDING) AS ga,
    COUNT(eb) OVER (PARTITION BY seg, customer ORDER BY t ROWS UNBOUNDED PRECEDING) AS gb
  FROM j
), c AS (
  SELECT seg, customer, currency, t,
    COALESCE(MAX(ea) OVER (PARTITION BY seg, customer, ga), 0) AS now_,
    COALESCE(MAX(eb) OVER (PARTITION BY seg, customer, gb), 0) AS then_
  FROM g
), v AS (
  SELECT seg, customer, currency, t, CASE WHEN then_ > 0 THEN now_ ELSE 0 END AS f,
    CASE WHEN then_ < now_ THEN then_ ELSE now_ END AS gg, then_ AS h
  FROM c
), dv AS (
  SELECT seg, currency, t,
    f - COALESCE(LAG(f) OVER (PARTITION BY seg, customer ORDER BY t), 0) AS df,
    gg - COALESCE(LAG(gg) OVER (PARTITION BY seg, customer ORDER BY t), 0) AS dg,
    h - COALESCE(LAG(h) OVER (PARTITION BY seg, customer ORDER BY t), 0) AS dh
  FROM v
)
SELECT seg, currency, t,
  SUM(SUM(df)) OVER (PARTITION BY seg, currency ORDER BY t ROWS UNBOUNDED PRECEDING),
  SUM(SUM(dg)) OVER (PARTITION BY seg, currency ORDER BY t ROWS UNBOUNDED PRECEDING),
  SUM(SUM(dh)) OVER (PARTITION BY seg, currency ORDER BY t ROWS UNBOUNDED PRECEDING)
FROM dv GROUP BY seg, currency, t
"""


# The whole book by month, from the tables maintained with every entry.
MONTHLY_FLOWS = "SELECT month, type, subtype, amount FROM mrr_month_flows WHERE month >= :m_lo AND month < :m_hi"
MONTHLY_MEASURES = """
SELECT measure, month, SUM(amount) OVER (PARTITION BY measure ORDER BY month ROWS UNBOUNDED PRECEDING)
FROM mrr_month_measures WHERE month < :m_hi AND measure NOT LIKE 'cohort%' ORDER BY measure, month
"""


# --- the metric set ---------------------------------------------------------------------------


def metric_set(
    engine: Engine,
    *,
    period: str = "month",
    first: str | None = None,
    last: str | None = None,
    by: str | None = None,
    ttm: bool = True,
    fast: bool = True,
) -> MetricSet:
    """The metric set for periods `first`..`last` (labels; default: the whole ledger, from the
    first to the last command or movement) of kind `period`, split `by` a segment.

    The whole book comes from the monthly tables maintained with every entry (`mrr_month_flows`,
    `mrr_month_measures`); segments, and everything with `fast=False`, are aggregated from the
    ledger and its snapshots (the two agree: a test checks it)."""
    with read_ledger(engine) as reader:
        return LedgerMetrics(reader).metric_set(period=period, first=first, last=last, by=by, ttm=ttm, fast=fast)


class LedgerMetrics:
    """The metric set on one reader (see `metric_set`)."""

    def __init__(self, reader: SqlReader) -> None:
        self.reader = reader
        self.book: LedgerBook = load_book(reader)
        self._temp: list[str] = []
        self._legs: dict[str, str] = {}  # allocated legs per segmentation, as temporary tables

    def range(self, period: str, first: str | None, last: str | None) -> tuple[int, int]:
        k = MONTHS_IN[period]
        lo, hi = self.book.first_month, self.book.last_month
        if (first is None and lo is None) or (last is None and hi is None):
            raise LookupError("the ledger is empty: give --from and --to")
        p_first = parse_period(period, first) if first is not None else int(lo or 0) // k
        p_last = parse_period(period, last) if last is not None else int(hi or 0) // k
        if p_last < p_first:
            raise ValueError(f"--to {period_label(period, p_last)} is before --from {period_label(period, p_first)}")
        return p_first, p_last

    def metric_set(self, *, period: str = "month", first: str | None = None, last: str | None = None,
                   by: str | None = None, ttm: bool = True, fast: bool = True) -> MetricSet:
        if period not in MONTHS_IN:
            raise ValueError(f"unknown period {period!r}: month, quarter or year")
        seg = parse_segmentation(by)
        p_first, p_last = self.range(period, first, last)
        try:
            if fast and seg.kind is None:
                rows = self._maintained_rows(period, p_first, p_last, ttm=ttm)
            else:
                rows = self._rows(period, seg, p_first, p_last, ttm=ttm)
        finally:
            self.drop_temporary()
        return MetricSet(period, period_label(period, p_first), period_label(period, p_last), seg.label,
                         self.book.reporting_currency, rows)

    # -- the whole book by month: the maintained monthly tables --------------------------------

    def _maintained_rows(self, period: str, p_first: int, p_last: int, *, ttm: bool) -> list[dict[str, object]]:
        """Periods of the whole book from `mrr_month_flows` and the difference arrays of
        `mrr_month_measures` (billing.month_measures), accumulated by the database."""
        k = MONTHS_IN[period]
        kept = self._maintained(min((p_first - 1) * k, p_first * k - 2), (p_last + 1) * k)
        prefix = "" if k == 1 else f"{period}:"
        names = ("starting", "ending", "a_end", "a_min", "payers_start", "payers_end", "activated", "accounts",
                 "lost_a")
        levels = {p: Levels(*(kept.value(prefix + name, p * k) for name in names)) for p in range(p_first, p_last + 1)}
        ttm_values: dict[int, tuple[str | None, str | None]] = {}
        if ttm:
            by_month = self._maintained_ttm(kept, [(p + 1) * k - 1 for p in range(p_first, p_last + 1)])
            ttm_values = {p: by_month[(p + 1) * k - 1] for p in range(p_first, p_last + 1)}
        return format_rows(self.book, period, None, p_first, p_last, kept.flows, levels, {}, ttm_values)

    def _maintained(self, m_lo: int, m_hi: int) -> Maintained:
        """The whole book's flows per month in [m_lo, m_hi) and its monthly measures up to m_hi."""
        params = {"m_lo": m_lo, "m_hi": m_hi}
        kept = Maintained()
        for month, type_, subtype, amount in self.reader.rows(MONTHLY_FLOWS, params):
            cell = kept.flows.setdefault(int(month), {})
            cell[type_] = cell.get(type_, 0) + int(amount)
            if type_ == "expansion":
                cell[f"expansion/{subtype}"] = cell.get(f"expansion/{subtype}", 0) + int(amount)
        for measure, month, value in self.reader.rows(MONTHLY_MEASURES, params):
            kept.series.setdefault(str(measure), []).append((int(month), int(value)))
        return kept

    def _maintained_ttm(self, kept: Maintained, months: Iterable[int]) -> dict[int, tuple[str | None, str | None]]:
        """Trailing-twelve-month NRR and GRR to the end of each month, from the TTM measures."""
        out: dict[int, tuple[str | None, str | None]] = {}
        for m in months:
            instant = period_bounds("month", m)[1] - timedelta(microseconds=1)
            f = g = h = 0
            for cur in kept.currencies():
                f += self._convert(cur, instant, kept.value(f"ttm_f:{cur}", m))
                g += self._convert(cur, instant, kept.value(f"ttm_g:{cur}", m))
                h += self._convert(cur, instant, kept.value(f"ttm_h:{cur}", m))
            out[m] = (self.book.rate(f, h), self.book.rate(g, h))
        return out

    # -- building blocks -----------------------------------------------------------------------

    def temporary(self, select_sql: str, params: dict[str, object]) -> str:
        """Materialise a SELECT as a temporary table for this reader; return its name."""
        name = f"tmp_metrics_{uuid.uuid4().hex[:12]}"
        self.reader.execute(compose("CREATE TEMPORARY TABLE {name} AS {select}", name=name, select=select_sql),
                            params)
        self._temp.append(name)
        return name

    def drop_temporary(self) -> None:
        for name in self._temp:
            self.reader.execute(compose("DROP TABLE IF EXISTS {name}", name=name))
        self._temp = []
        self._legs = {}

    def monthly_base(self, seg: Segmentation, params: dict[str, object]) -> str:
        """SQL of per-(segment, customer) monthly levels: seg, customer, currency, month,
        mrr_start, mrr_end, expansions, lost."""
        if seg.by_legs:
            legs = self.allocated_legs(seg, params)
            return compose(LEGS_BASE, legs=legs)
        expr, join = customer_segment(seg, self.reader, "s", params)
        return compose(SNAPSHOT_BASE, seg=expr, join=join)

    def allocated_legs(self, seg: Segmentation, params: dict[str, object]) -> str:
        key = f"{seg.kind}:{params['m_hi']}"
        if key not in self._legs:
            column = "plan" if seg.kind == "plan" else "product"
            self._legs[key] = self.temporary(compose(LEGS_ALLOCATED, column=column), {"m_hi": params["m_hi"]})
        return self._legs[key]

    def levels(self, seg: Segmentation, k: int, params: dict[str, object]) -> str:
        base = self.monthly_base(seg, params)
        if k == 1:
            return compose(LEVELS_MONTHLY, base=base)
        return compose(LEVELS_GROUPED, base=base, k=k)

    def currencies(self) -> list[str]:
        return [c for (c,) in self.reader.rows(
            "SELECT DISTINCT currency FROM customer_mrr_months WHERE currency <> :rep ORDER BY currency",
            {"rep": self.book.reporting_currency})]

    # -- the rows ------------------------------------------------------------------------------

    def _rows(self, period: str, seg: Segmentation, p_first: int, p_last: int, *,
              ttm: bool) -> list[dict[str, object]]:
        """Rows aggregated from the ledger and the snapshots (segments, and `fast=False`)."""
        k = MONTHS_IN[period]
        p_lo = p_first - 1
        m_hi = (p_last + 1) * k
        m_lo = min(p_lo * k, p_first * k - 2)
        params: dict[str, object] = {"m_lo": m_lo, "m_hi": m_hi, "p_lo": p_lo, "p_hi": p_last,
                                     "rep": self.book.reporting_currency}
        flows = self.flows(seg, params)
        levels_known = seg.kind != "subtype"
        reporting: dict[str, list[tuple[Any, ...]]] = {}
        foreign: dict[tuple[str, int], tuple[Any, ...]] = {}
        accounts: dict[tuple[str, int], int] = {}
        if levels_known:
            levels = self.levels(seg, k, params)
            for row in self.reader.rows(compose(REPORTING, levels=levels), params):
                reporting.setdefault(str(row[0]), []).append(row)
            currencies = self.currencies()
            if currencies:
                start = conversion(self.book, currencies, period, p_lo, p_last, level="s", currency="currency",
                                   period="p", at="start", params=params)
                end = conversion(self.book, currencies, period, p_lo, p_last, level="e", currency="currency",
                                 period="p", at="end", params=params)
                sql = compose(FOREIGN, levels=levels, start=start, end=end)
                for row in self.reader.rows(sql, params):
                    if row[-1]:
                        raise MissingRate("no fx rate in force for a customer's currency in "
                                          f"{period_label(period, row[1])}")
                    foreign[(str(row[0]), int(row[1]))] = row
        else:
            expr = SUBTYPE
            for s, p, n in self.reader.rows(compose(SUBTYPE_ACCOUNTS, seg=expr, k=k), params):
                accounts[(str(s), int(p))] = int(n)
        ttm_values = self.ttm(seg, period, p_first, p_last, params) if ttm and levels_known else {}
        segments = sorted({s for s, _ in flows} | set(reporting) | {s for s, _ in foreign} | {s for s, _ in accounts})
        if seg.kind is None:
            segments = [""]
        out: list[dict[str, object]] = []
        for s in segments:
            out.extend(self._segment_rows(period, seg, s, p_first, p_last, flows, reporting.get(s, []), foreign,
                                          accounts, ttm_values, levels_known))
        return out

    def flows(self, seg: Segmentation, params: dict[str, object]) -> dict[tuple[str, int], dict[str, int]]:
        """Per (segment, month): sums by type and expansion subtype, transfers in and out."""
        if seg.by_legs:
            sql = compose(FLOWS_LEGS, legs=self.allocated_legs(seg, params))
        elif seg.kind == "subtype":
            sql = compose(FLOWS, seg=SUBTYPE, join="")
        else:
            expr, join = customer_segment(seg, self.reader, "m", params)
            sql = compose(FLOWS, seg=expr, join=join)
        out: dict[tuple[str, int], dict[str, int]] = {}
        for s, month, type_, subtype, amount, tin, tout in self.reader.rows(sql, params):
            cell = out.setdefault((str(s), int(month)), {})
            cell[type_] = cell.get(type_, 0) + int(amount)
            if type_ == "expansion":
                cell[f"expansion/{subtype}"] = cell.get(f"expansion/{subtype}", 0) + int(amount)
            cell["transfer_in"] = cell.get("transfer_in", 0) + int(tin)
            cell["transfer_out"] = cell.get("transfer_out", 0) + int(tout)
        return out

    def ttm(self, seg: Segmentation, period: str, p_first: int, p_last: int,
            params: dict[str, object]) -> dict[tuple[str, int], tuple[str | None, str | None]]:
        """Trailing-twelve-month NRR and GRR per (segment, period), at each period's last month."""
        k = MONTHS_IN[period]
        m_top = (p_last + 1) * k - 1
        local = dict(params, m_top=m_top, m_hi=m_top + 1)
        if seg.by_legs:
            table = self.temporary(compose(LEGS_BASE, legs=self.allocated_legs(seg, params)), local)
        else:
            expr, join = customer_segment(seg, self.reader, "s", local)
            table = self.temporary(compose(SNAPSHOT_BASE, seg=expr, join=join), local)
        self.reader.execute(compose("CREATE INDEX {name}_key ON {name} (customer, seg, month)", name=table))
        runs: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
        for s, cur, t, f, g, h in self.reader.rows(compose(TTM, table=table), local):
            runs.setdefault((str(s), str(cur)), []).append((int(t), int(f), int(g), int(h)))
        out: dict[tuple[str, int], tuple[str | None, str | None]] = {}
        segments = {s for s, _ in runs}
        for p in range(p_first, p_last + 1):
            month = (p + 1) * k - 1
            at = period_bounds(period, p)[1] - timedelta(microseconds=1)
            for s in segments:
                num = gross = den = 0
                for (s2, cur), values in runs.items():
                    if s2 != s:
                        continue
                    latest = _latest(values, month)
                    if latest is None:
                        continue
                    _, f, g, h = latest
                    num += self._convert(cur, at, f)
                    gross += self._convert(cur, at, g)
                    den += self._convert(cur, at, h)
                out[(s, p)] = (self.book.rate(num, den), self.book.rate(gross, den))
        return out

    def _convert(self, currency: str, at: Any, minor: int) -> int:
        if currency == self.book.reporting_currency or minor == 0:
            return minor
        return convert_minor(self.book, currency, at, minor)

    def _segment_rows(self, period: str, seg: Segmentation, s: str, p_first: int, p_last: int,
                      flows: dict[tuple[str, int], dict[str, int]], reporting: Sequence[tuple[Any, ...]],
                      foreign: dict[tuple[str, int], tuple[Any, ...]], accounts_by_subtype: dict[tuple[str, int], int],
                      ttm_values: dict[tuple[str, int], tuple[str | None, str | None]],
                      levels_known: bool) -> list[dict[str, object]]:
        levels: dict[int, Levels] | None = None
        if levels_known:
            by_p = {int(row[1]): row for row in reporting}
            ordered = sorted(by_p)

            def level_at(p: int) -> tuple[int, int]:
                """(level, payers) of reporting-currency customers at the end of period p."""
                best = None
                for q in ordered:
                    if q > p:
                        break
                    best = q
                if best is None:
                    return 0, 0
                return int(by_p[best][9]), int(by_p[best][10])

            levels = {}
            for p in range(p_first, p_last + 1):
                rep_start, payers_start = level_at(p - 1)
                rep_end, payers_end = level_at(p)
                own = by_p.get(p)
                up, loss, activated, accounts, lost_a = (
                    (int(own[3]), int(own[4]), int(own[6]), int(own[7]), int(own[8])) if own else (0, 0, 0, 0, 0))
                fo = [int(x or 0) for x in foreign[(s, p)][2:11]] if (s, p) in foreign else [0] * 9
                levels[p] = Levels(
                    starting=rep_start + fo[0], ending=rep_end + fo[1], a_end=rep_start + up + fo[2],
                    a_min=rep_start - loss + fo[3], payers_end=payers_end + fo[4], payers_start=payers_start + fo[5],
                    activated=activated + fo[6], accounts=accounts + fo[7], lost_a=lost_a + fo[8])
        return format_rows(self.book, period, seg.segment_label(s) if seg.kind is not None else None, p_first,
                           p_last, {m: cell for (s2, m), cell in flows.items() if s2 == s}, levels,
                           {p: n for (s2, p), n in accounts_by_subtype.items() if s2 == s},
                           {p: v for (s2, p), v in ttm_values.items() if s2 == s})


@dataclass
class Maintained:
    """The whole book's monthly flows and accumulated monthly measures, as read."""

    flows: dict[int, dict[str, int]] = field(default_factory=dict)
    series: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # measure -> (month, value)

    def value(self, measure: str, month: int) -> int:
        """The measure at the end of `month`: its latest accumulated value up to it."""
        value = 0
        for m, v in self.series.get(measure, ()):
            if m > month:
                break
            value = v
        return value

    def currencies(self) -> list[str]:
        return sorted({name.split(":", 1)[1] for name in self.series if name.startswith("ttm_")})


@dataclass(frozen=True)
class Levels:
    """What a period's MRR levels give (reporting minor units and account counts): total MRR at
    its start and end, the NRR and GRR numerators over A (accounts with MRR at the start), paying
    accounts at the start and end, accounts that expanded (of A, and in all), A's event-sum loss."""

    starting: int
    ending: int
    a_end: int
    a_min: int
    payers_start: int
    payers_end: int
    activated: int
    accounts: int
    lost_a: int


def format_rows(book: LedgerBook, period: str, segment: str | None, p_first: int, p_last: int,
                flows: dict[int, dict[str, int]], levels: dict[int, Levels] | None,
                accounts_by_subtype: dict[int, int],
                ttm_values: dict[int, tuple[str | None, str | None]]) -> list[dict[str, object]]:
    """The output rows of one segment from per-month flows and per-period levels (None when the
    segmentation has no levels, as for subtypes)."""
    k = MONTHS_IN[period]

    def flow(p: int) -> dict[str, int]:
        total: dict[str, int] = {}
        for month in range(p * k, (p + 1) * k):
            for key, value in flows.get(month, {}).items():
                total[key] = total.get(key, 0) + value
        return total

    def rolling(p: int, key: str) -> int:
        last_month = (p + 1) * k - 1
        return sum(flows.get(m, {}).get(key, 0) for m in range(last_month - 2, last_month + 1))

    rows: list[dict[str, object]] = []
    previous = flow(p_first - 1).get("expansion", 0)
    for p in range(p_first, p_last + 1):
        f = flow(p)
        new, expansion, reactivation = f.get("new", 0), f.get("expansion", 0), f.get("reactivation", 0)
        contraction, churn = -f.get("contraction", 0), -f.get("churn", 0)
        tin, tout = f.get("transfer_in", 0), f.get("transfer_out", 0)
        gained = new + expansion + reactivation
        lost = contraction + churn
        level = levels.get(p) if levels is not None else None
        accounts = level.accounts if level is not None else accounts_by_subtype.get(p, 0)
        row: dict[str, object] = {} if segment is None else {"segment": segment}
        row.update({
            "period": period_label(period, p),
            "starting_mrr": book.money(level.starting) if level else None,
            "new": book.money(new),
            "expansion": book.money(expansion),
            "expansion_by_subtype": {st: book.money(f.get(f"expansion/{st}", 0)) for st in EXPANSION_SUBTYPES},
            "contraction": book.money(contraction),
            "churn": book.money(churn),
            "reactivation": book.money(reactivation),
            "ending_mrr": book.money(level.ending) if level else None,
            "fx_impact": book.money(level.ending - (level.starting + gained - lost + tin - tout)) if level else None,
            "expansion_accounts": accounts,
            "arpea": book.money(Fraction(expansion, accounts)) if accounts else None,
            "expansion_growth_rate": book.rate(expansion - previous, previous) if previous else None,
            "nrr": book.rate(level.a_end, level.starting) if level else None,
            "grr": book.rate(level.a_min, level.starting) if level else None,
            "arpa": book.money(Fraction(level.ending, level.payers_end)) if level and level.payers_end else None,
            "quick_ratio": book.rate(gained, lost, scale=1),
            "transfer_in": book.money(tin),
            "transfer_out": book.money(tout),
            "arr": book.money(level.ending * 12) if level else None,
            "expansion_arr": book.money(expansion * 12),
            "expansion_share": book.rate(expansion, gained),
            "expansion_activation_rate": book.rate(level.activated, level.payers_start) if level else None,
            "grr_event_sum": book.rate(level.starting - level.lost_a, level.starting) if level else None,
        })
        rq_expansion, rq_new = rolling(p, "expansion"), rolling(p, "new")
        ttm_nrr, ttm_grr = ttm_values.get(p, (None, None))
        row.update({
            "rolling_quarter_expansion_arr": book.money(rq_expansion * 12),
            "rolling_quarter_new_logo_arr": book.money(rq_new * 12),
            "rolling_quarter_expansion_vs_new_logo": book.rate(rq_expansion, rq_new, scale=1),
            "ttm_nrr": ttm_nrr,
            "ttm_grr": ttm_grr,
        })
        rows.append(row)
        previous = expansion
    return rows


def _latest(values: Sequence[tuple[int, int, int, int]], month: int) -> tuple[int, int, int, int] | None:
    best = None
    for value in values:
        if value[0] <= month:
            best = value
        else:
            break
    return best


def scenario_view(row: dict[str, object]) -> dict[str, object]:
    """A metric row restricted to the keys of the replay output (SCENARIOS.md)."""
    return {key: row[key] for key in SCENARIO_KEYS}
