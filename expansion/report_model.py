"""The report's model: what `billing report` shows, computed from the ledger (pure, except
`load_report_data`, which reads the database once, read-only).

- The metric set is `expansion.metrics.compute_metrics` over every movement, from the book's first
  to its last command — exactly what `billing replay --json` prints for a scenario.
- Each amount's trail is `expansion.trace.metric_trail` (what `billing trace metric` prints): the
  movements that sum to it. Starting/ending MRR, FX impact, NRR, GRR and ARPA come with a
  `PeriodSnapshot`: every customer's MRR at the period's start and end, converted and rounded as the
  metric set does, and the sums the rates divide.
- Each movement's audit trail is `expansion.trace.movement_trace` (what `billing trace movement`
  prints), built from the commands in memory.
- **Cohorts** come from the cohort table (`expansion.cohorts.cohort_table`, in SQL): a
  customer's cohort is the month of its first movement, cell (cohort, k) the cohort's MRR at the end
  of month cohort + k ÷ its MRR at the end of the signup month × 100 (net; gross counts each
  customer at most at its base), each currency's sum valued at the rate in force at the end of the
  table's last month. `cohort_rows` adds the customers behind each row, month by month, so a
  cell's trail page sums to it.
- **Expansion readiness** is deliberately simple: customers paying at the book's last command who
  expanded in the trailing `READINESS_WINDOW_DAYS` days, ranked by the number of expansion
  movements in the window, then the expansion amount, then the most recent one — an account that
  keeps adding seats, add-ons or usage is the likeliest to expand again — with the seats in force on
  its active subscriptions.

Every number has a page of its own (`trail_url`, `period_url`, `cohort_url`, `customer_url`,
`movement_url` say where), relative to the report's directory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.fx import rate_at
from billing.money import RoundingMode, round_money, round_to_places
from billing.persistence import CustomerView, Engine, StoredCommand, SubscriptionView, display_url
from billing.records import CONTRACTION_SUBTYPES, EXPANSION_SUBTYPES, CreditNote, Invoice, MrrMovement
from billing.scenario import Settings
from expansion.cohorts import CohortTable
from expansion.metrics import CalendarPeriod, MrrHistory, calendar_periods, compute_metrics, effective
from expansion.trace import (
    MOVEMENT_TYPES,
    MetricName,
    MetricTrail,
    MovementTrace,
    billed_lines,
    metric_trail,
    movement_trace,
    usage_window,
)

READINESS_WINDOW_DAYS = 90
READINESS_LIMIT = 10
PERIOD_KINDS = ("month", "quarter", "year")
TRAIL_METRICS: tuple[MetricName, ...] = (
    *(MetricName(t) for t in MOVEMENT_TYPES),
    *(MetricName("expansion", s) for s in EXPANSION_SUBTYPES),
    *(MetricName("contraction", s) for s in CONTRACTION_SUBTYPES),
)


# ---------------------------------------------------------------------------------------------
# Reading the ledger
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportData:
    """Everything the report reads, in one read-only pass over the database."""

    settings: Settings
    source: str
    movements: tuple[MrrMovement, ...]
    command_of: Mapping[int, int]  # movement id -> id of the command whose transaction wrote it
    commands: Mapping[int, StoredCommand]
    invoices: Mapping[str, Invoice]
    credit_notes: tuple[CreditNote, ...]
    customers: tuple[CustomerView, ...]
    subscriptions: tuple[SubscriptionView, ...]
    first_at: datetime | None  # the book's first and last command
    last_at: datetime | None
    cohort_table: CohortTable | None = None  # expansion.cohorts' table; None for an empty ledger


def load_report_data(engine: Engine) -> ReportData:
    """Read everything the report needs: the book's settings, the ledger (movements with their
    commands, invoices, credit notes) and the current customers and subscriptions."""
    from billing import service
    from billing.persistence.audit import audit_reader
    from expansion.cohorts import cohort_table
    from expansion.trace import book_settings

    settings = book_settings(engine)
    with audit_reader(engine) as reader:
        pairs = reader.movements()
        commands = {c.id: c for c in reader.all_commands()}
        invoices = reader.invoices()
        notes = reader.credit_notes()
        span = reader.command_span()
    return ReportData(
        settings=settings,
        source=display_url(engine.url),
        movements=tuple(m for m, _ in pairs),
        command_of={m.id: cid for m, cid in pairs},
        commands=commands,
        invoices=invoices,
        credit_notes=tuple(notes),
        customers=tuple(service.list_customers(engine)),
        subscriptions=tuple(service.list_subscriptions(engine)),
        first_at=None if span is None else span[0],
        last_at=None if span is None else span[1],
        cohort_table=cohort_table(engine) if pairs else None,
    )


# ---------------------------------------------------------------------------------------------
# The model: metrics, trails, period snapshots, cohorts, readiness (pure)
# ---------------------------------------------------------------------------------------------

FxRate = Callable[[str, datetime], Fraction]


@dataclass(frozen=True)
class CustomerMrr:
    customer: str
    currency: str
    start: Decimal  # customer currency, MRR just before the period starts
    end: Decimal  # customer currency, MRR at the period's end
    start_rep: Decimal  # converted at the rate in force at the period's first instant
    end_rep: Decimal  # converted at the rate in force at the period's last instant

    @property
    def active(self) -> bool:
        """In A: paying when the period starts."""
        return self.start_rep > 0


@dataclass(frozen=True)
class PeriodSnapshot:
    """Every customer's MRR at a period's start and end: the inputs of starting/ending MRR,
    NRR, GRR and ARPA (expansion/metrics.py, the same conversion and rounding)."""

    period: CalendarPeriod
    customers: tuple[CustomerMrr, ...]

    @property
    def starting(self) -> Decimal:
        return sum((c.start_rep for c in self.customers), Decimal(0))

    @property
    def ending(self) -> Decimal:
        return sum((c.end_rep for c in self.customers), Decimal(0))

    @property
    def active_start(self) -> Decimal:
        return sum((c.start_rep for c in self.customers if c.active), Decimal(0))

    @property
    def active_end(self) -> Decimal:
        return sum((c.end_rep for c in self.customers if c.active), Decimal(0))

    @property
    def kept(self) -> Decimal:
        return sum((min(c.start_rep, c.end_rep) for c in self.customers if c.active), Decimal(0))

    @property
    def payers_at_end(self) -> int:
        return sum(1 for c in self.customers if c.end_rep > 0)


def _converted(mrr: Decimal, currency: str, instant: datetime, settings: Settings, fx: FxRate) -> Decimal:
    if mrr == 0:
        return Decimal(0)
    return round_money(Fraction(mrr) * fx(currency, instant), settings.reporting_currency, settings.rounding)


def period_snapshot(history: MrrHistory, period: CalendarPeriod, settings: Settings, fx: FxRate) -> PeriodSnapshot:
    last_instant = period.end - timedelta(microseconds=1)
    rows = []
    for customer in history.customers:
        cur = history.currency[customer]
        start = history.before(customer, period.start)
        end = history.before(customer, period.end)
        rows.append(CustomerMrr(customer, cur, start, end, _converted(start, cur, period.start, settings, fx),
                                _converted(end, cur, last_instant, settings, fx)))
    return PeriodSnapshot(period, tuple(rows))


@dataclass(frozen=True)
class Cohort:
    """One row of the cohort table (`expansion.cohorts.cohort_table`, in SQL) and the
    customers behind it, so that each cell can show what it is made of.

    The table's convention: a customer's cohort is the month of its first movement and its base is
    its MRR at the end of that month; cell k is the cohort's MRR at the end of month cohort + k ÷
    its base × 100 (net) or Σ min(MRR, base) ÷ base × 100 (gross). Amounts are summed per currency
    and each sum valued at the rate in force at the end of the table's last month (constant
    currency)."""

    month: CalendarPeriod
    months: tuple[CalendarPeriod, ...]  # the cohort month .. the table's last month
    customers: tuple[str, ...]
    currency: Mapping[str, str]
    native: Mapping[str, tuple[Decimal, ...]]  # customer -> its MRR at the end of each month
    valued: tuple[Decimal, ...]  # the cohort's MRR at the end of each month, reporting currency
    kept: tuple[Decimal, ...]  # Σ min(MRR, base), reporting currency
    net: tuple[str | None, ...]  # the table's net retention, % (what the report shows)
    gross: tuple[str | None, ...]
    paying: tuple[int, ...]
    rounding: RoundingMode = "half_up"

    @property
    def base(self) -> Decimal:
        return self.valued[0] if self.valued else Decimal(0)

    def recomputed(self, values: Sequence[Decimal]) -> tuple[str | None, ...]:
        """values ÷ base × 100 from the customers above (equal to the table's, which the tests
        check)."""
        if not self.base:
            return tuple(None for _ in values)
        return tuple(str(round_to_places(Fraction(v) / Fraction(self.base) * 100, 2, self.rounding))
                     for v in values)


def cohort_rows(
    table: CohortTable, movements: Sequence[MrrMovement], history: MrrHistory, months: Sequence[CalendarPeriod],
    settings: Settings, fx: FxRate,
) -> list[Cohort]:
    """Each row of the cohort table with its customers' MRR month by month."""
    index = {month.label: i for i, month in enumerate(months)}
    first: dict[str, str] = {}
    for m in sorted(movements, key=lambda m: (m.at, m.id)):
        if m.customer not in first:
            first[m.customer] = next(p.label for p in months if p.start <= m.at < p.end)
    valued_at = months[-1].end - timedelta(microseconds=1)
    rep = settings.reporting_currency

    def value(by_currency: Mapping[str, Decimal]) -> Decimal:
        return sum((v if cur == rep else round_money(Fraction(v) * fx(cur, valued_at), rep, settings.rounding)
                    for cur, v in by_currency.items() if v), Decimal(0))

    out = []
    for row in table.cohorts:
        start = index[row.cohort]
        span = tuple(months[start:])
        members = tuple(c for c, label in first.items() if label == row.cohort)
        native = {c: tuple(history.before(c, month.end) for month in span) for c in members}
        valued, kept = [], []
        for k in range(len(span)):
            totals: dict[str, Decimal] = {}
            floors: dict[str, Decimal] = {}
            for c in members:
                cur = history.currency[c]
                totals[cur] = totals.get(cur, Decimal(0)) + native[c][k]
                floors[cur] = floors.get(cur, Decimal(0)) + min(native[c][k], native[c][0])
            valued.append(value(totals))
            kept.append(value(floors))
        out.append(Cohort(months[start], span, members, {c: history.currency[c] for c in members}, native,
                          tuple(valued), tuple(kept), tuple(row.net), tuple(row.gross), tuple(row.paying),
                          settings.rounding))
    return out


@dataclass(frozen=True)
class ReadinessRow:
    customer: str
    name: str
    tags: Mapping[str, str]
    currency: str
    mrr: Decimal  # customer currency, at the book's last command
    seats: int  # seats in force on its active subscriptions
    expansions: int  # expansion movements in the window
    seat_expansions: int
    amount: Decimal  # their reporting deltas
    last_at: datetime
    last_subtype: str
    movement_ids: tuple[int, ...]


def readiness(
    movements: Sequence[MrrMovement],
    history: MrrHistory,
    customers: Sequence[CustomerView],
    subscriptions: Sequence[SubscriptionView],
    as_of: datetime,
    *,
    window_days: int = READINESS_WINDOW_DAYS,
    limit: int = READINESS_LIMIT,
) -> list[ReadinessRow]:
    """The expansion-readiness list (see the module doc)."""
    since = as_of - timedelta(days=window_days)
    views = {c.id: c for c in customers}
    seats: dict[str, int] = {}
    for sub in subscriptions:
        if sub.status in ("active", "trialing"):
            seats[sub.customer] = seats.get(sub.customer, 0) + sub.quantity
    recent: dict[str, list[MrrMovement]] = {}
    for m in movements:
        if m.type == "expansion" and since < m.at <= as_of:
            recent.setdefault(m.customer, []).append(m)
    rows = []
    for customer, found in recent.items():
        mrr = history.before(customer, as_of + timedelta(microseconds=1))
        if mrr <= 0:
            continue
        last = max(found, key=lambda m: (m.at, m.id))
        view = views.get(customer)
        rows.append(ReadinessRow(
            customer=customer,
            name=view.name if view else "",
            tags=dict(view.tags) if view else {},
            currency=history.currency[customer],
            mrr=mrr,
            seats=seats.get(customer, 0),
            expansions=len(found),
            seat_expansions=sum(1 for m in found if m.subtype == "seat"),
            amount=sum((m.reporting_delta for m in found), Decimal(0)),
            last_at=last.at,
            last_subtype=last.subtype or "",
            movement_ids=tuple(m.id for m in found),
        ))
    rows.sort(key=lambda r: (-r.expansions, -r.amount, -r.last_at.timestamp(), r.customer))
    return rows[:limit]


@dataclass
class ReportModel:
    data: ReportData
    metrics: dict[str, list[dict[str, Any]]]
    periods: dict[str, list[CalendarPeriod]]
    trails: dict[tuple[str, str], MetricTrail]  # (metric label, period label)
    snapshots: dict[str, PeriodSnapshot]  # by period label
    cohorts: list[Cohort]
    ready: list[ReadinessRow]
    traces: dict[int, MovementTrace]
    slugs: dict[str, str]  # customer id -> file-safe slug of its page

    @property
    def rep(self) -> str:
        return self.data.settings.reporting_currency

    def row(self, kind: str, label: str) -> dict[str, Any]:
        return next(r for r in self.metrics[kind] if r["period"] == label)


def build_model(data: ReportData) -> ReportModel:
    settings = data.settings

    def fx(currency: str, at: datetime) -> Fraction:
        return rate_at(settings, currency, at)

    movements = list(data.movements)
    slugs = {c.id: f"c{i + 1}" for i, c in enumerate(data.customers)}
    for m in movements:
        slugs.setdefault(m.customer, f"c{len(slugs) + 1}")
    if data.first_at is None or data.last_at is None or not movements:
        empty: dict[str, list[dict[str, Any]]] = {kind: [] for kind in PERIOD_KINDS}
        return ReportModel(data, empty, {k: [] for k in PERIOD_KINDS}, {}, {}, [], [], {}, slugs)
    metrics = compute_metrics(movements, settings, data.first_at, data.last_at, fx)
    periods = {kind: calendar_periods(kind, data.first_at, data.last_at) for kind in PERIOD_KINDS}
    counted = effective(movements)  # a reversed entry and its reversal net to zero, as in the metrics
    history = MrrHistory(counted)
    trails = {}
    snapshots = {}
    for kind in PERIOD_KINDS:
        for period in periods[kind]:
            inside = [m for m in movements if period.start <= m.at < period.end]
            for metric in TRAIL_METRICS:
                trails[(metric.label, period.label)] = metric_trail(inside, metric, period, settings)
            snapshots[period.label] = period_snapshot(history, period, settings, fx)
    return ReportModel(
        data=data,
        metrics={k: list(v) for k, v in metrics.items()},
        periods=periods,
        trails=trails,
        snapshots=snapshots,
        cohorts=cohort_rows(data.cohort_table, counted, history, periods["month"], settings, fx)
        if data.cohort_table is not None else [],
        ready=readiness(counted, history, data.customers, data.subscriptions, data.last_at),
        traces=_traces(data),
        slugs=slugs,
    )


def _traces(data: ReportData) -> dict[int, MovementTrace]:
    """Every movement's audit trail, from the commands in memory (as `trace_movement` reads it)."""
    by_subject: dict[tuple[str, str], list[StoredCommand]] = {}
    for command in data.commands.values():
        for key in ("subscription", "customer"):
            value = command.payload.get(key)
            if isinstance(value, str):
                by_subject.setdefault((key, value), []).append(command)
    reversed_by = {m.reverses: m.id for m in data.movements if m.entry == "reversal" and m.reverses is not None}
    refs = [ref for m in data.movements for ref in m.invoice_lines]
    lines = billed_lines(refs, data.invoices, data.credit_notes)
    out = {}
    for m in data.movements:
        applied = data.commands[data.command_of[m.id]]
        about = by_subject.get(("subscription", m.subscription or ""), []) + \
            by_subject.get(("customer", m.customer), [])
        candidates = [c for c in about if c.id <= applied.id]
        usage: list[StoredCommand] = []
        window = usage_window(lines[r] for r in m.invoice_lines if r in lines) if m.cause == "usage" else None
        if window is not None:
            usage = sorted((c for c in by_subject.get(("subscription", m.subscription or ""), [])
                            if c.type == "usage" and window[0] <= c.at < window[1] and c.id <= applied.id),
                           key=lambda c: c.id)
        out[m.id] = movement_trace(m, applied, data.settings, lines, candidates, usage, reversed_by.get(m.id))
    return out


# ---------------------------------------------------------------------------------------------
# Where each number's trail lives (paths relative to the report's directory, or to trail/)
# ---------------------------------------------------------------------------------------------


def trail_url(metric: str, period: str, prefix: str = "trail/") -> str:
    return f"{prefix}{metric}-{period}.html"


def period_url(period: str, prefix: str = "trail/") -> str:
    return f"{prefix}period-{period}.html"


def cohort_url(month: str, prefix: str = "trail/") -> str:
    return f"{prefix}cohort-{month}.html"


def customer_url(model: ReportModel, customer: str, prefix: str = "trail/") -> str:
    return f"{prefix}customer-{model.slugs[customer]}.html"


def movement_url(movement_id: int, prefix: str = "") -> str:
    return f"{prefix}movements.html#m-{movement_id}"
