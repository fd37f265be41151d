"""The audit trail: from a number back to the movements, commands and invoice lines behind it.

Three questions an auditor asks, each a pure function over records plus a thin query layer
(`trace_movement`, `trace_metric`, `reconcile_period`) that reads the ledger through
`billing.persistence.audit` and never writes:

- **Where does this movement come from?** (`movement_trace`) The command that caused it — or,
  for a transition (a usage period closing, a period-end change or cancellation, a trial ending, a
  coupon starting or ending), the command that scheduled it and the command during which it was
  applied — MRR before and after, the delta in the customer's and the reporting currency, and the
  invoice lines that billed it, with what credit notes took back from them.
- **What makes up this figure?** (`metric_trail`) Every movement of a period (optionally of one
  segment: currency, subtype, customer or a customer tag) that a metric sums, and a total that
  equals the metric of `expansion.metrics` (contraction and churn as positive amounts).
- **Does the ledger tie to the invoices?** (`reconcile`) Each movement of a period against the
  lines that bill it, and each proration line against a movement. A movement without a line is an
  exception unless the rules say it has none (see `check_movement`); a proration line without a
  movement is one unless its change left MRR as it was (see `check_orphan_line`).

Invariant: `metric_trail(...).total` equals the period's metric computed by
`expansion.metrics.compute_metrics` — both are the sum of the same reporting deltas, without the
entries a reversal cancels (`expansion.metrics.effective`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Literal

from billing.fx import MissingRate, rate_at
from billing.money import RoundingMode, money_str
from billing.periods import iso
from billing.persistence import Engine, StoredCommand
from billing.records import (
    CONTRACTION_SUBTYPES,
    EXPANSION_SUBTYPES,
    CreditNote,
    Invoice,
    InvoiceLine,
    LineRef,
    MrrMovement,
    movement_json,
)
from billing.scenario import Settings
from expansion.metrics import CalendarPeriod, calendar_periods, effective

MOVEMENT_TYPES: tuple[str, ...] = ("new", "expansion", "contraction", "churn", "reactivation")
NEGATIVE_TYPES = frozenset({"contraction", "churn"})  # metrics show these as positive amounts
CHANGE_CAUSES: tuple[str, ...] = ("change_quantity", "change_plan", "add_addon", "remove_addon")
DIRECT_CAUSES = frozenset({"subscribe", "reactivate", "cancel", "discount", *CHANGE_CAUSES})
SEGMENT_KEYS = ("currency", "subtype", "customer", "tag:KEY")
# A `day` proration line starts at local midnight of the change date: the change is within a
# (DST-long) local day of it.
CHANGE_DAY = timedelta(hours=25)


class TraceError(ValueError):
    """A period, metric name or segment the trail cannot use (bad input)."""


# ---------------------------------------------------------------------------------------------
# Periods, metric names and segments
# ---------------------------------------------------------------------------------------------

_PERIOD = re.compile(r"^(?P<year>\d{4})(?:-(?:(?P<month>0[1-9]|1[0-2])|Q(?P<quarter>[1-4])))?$")


def parse_period(text: str) -> CalendarPeriod:
    """A calendar period in UTC: `2026-03` (month), `2026-Q1` (quarter) or `2026` (year)."""
    match = _PERIOD.match(text.strip())
    if match is None:
        raise TraceError(f"period {text!r}: expected YYYY-MM, YYYY-Qn or YYYY (e.g. 2026-03, 2026-Q1, 2026)")
    year = int(match["year"])
    if year < 1:
        raise TraceError(f"period {text!r}: no year 0")
    if match["month"]:
        kind, month = "month", int(match["month"])
    elif match["quarter"]:
        kind, month = "quarter", (int(match["quarter"]) - 1) * 3 + 1
    else:
        kind, month = "year", 1
    first = datetime(year, month, 1, tzinfo=UTC)
    [period] = calendar_periods(kind, first, first)
    return period


@dataclass(frozen=True)
class MetricName:
    """An amount metric: a movement type, optionally one subtype (`expansion.seat`)."""

    type: str
    subtype: str | None = None

    @property
    def label(self) -> str:
        return self.type if self.subtype is None else f"{self.type}.{self.subtype}"

    def counts(self, movement: MrrMovement) -> bool:
        return movement.type == self.type and (self.subtype is None or movement.subtype == self.subtype)

    def amount(self, movement: MrrMovement) -> Decimal:
        """What the movement adds to the metric: its reporting delta, contraction and churn as
        positive amounts (SCENARIOS.md, "Metric definitions")."""
        return -movement.reporting_delta if self.type in NEGATIVE_TYPES else movement.reporting_delta


def metric_names() -> list[str]:
    return [*MOVEMENT_TYPES, *(f"expansion.{s}" for s in EXPANSION_SUBTYPES),
            *(f"contraction.{s}" for s in CONTRACTION_SUBTYPES)]


def parse_metric(text: str) -> MetricName:
    name = text.strip()
    kind, _, subtype = name.partition(".")
    subtypes = {"expansion": EXPANSION_SUBTYPES, "contraction": CONTRACTION_SUBTYPES}
    if kind in MOVEMENT_TYPES and not subtype:
        return MetricName(kind)
    if kind in subtypes and subtype in subtypes[kind]:
        return MetricName(kind, subtype)
    raise TraceError(f"metric {text!r}: expected one of {', '.join(metric_names())}")


@dataclass(frozen=True)
class Segment:
    """`--by KEY=VALUE`: movements of one currency, subtype, customer or customer tag."""

    key: str
    value: str

    @property
    def label(self) -> str:
        return f"{self.key}={self.value}"

    def keeps(self, movement: MrrMovement, tags: Mapping[str, Mapping[str, str]]) -> bool:
        if self.key == "currency":
            return movement.currency == self.value.upper()
        if self.key == "subtype":
            return (movement.subtype or "") == self.value
        if self.key == "customer":
            return movement.customer == self.value
        tag = self.key.removeprefix("tag:")
        return tags.get(movement.customer, {}).get(tag) == self.value


def parse_segment(text: str) -> Segment:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise TraceError(f"--by {text!r}: expected KEY=VALUE with KEY one of {', '.join(SEGMENT_KEYS)}")
    if key not in ("currency", "subtype", "customer") and not (key.startswith("tag:") and len(key) > 4):
        raise TraceError(f"--by {text!r}: unknown key {key!r} (expected one of {', '.join(SEGMENT_KEYS)})")
    return Segment(key, value)


# ---------------------------------------------------------------------------------------------
# What makes up a figure
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrailRow:
    movement: MrrMovement
    amount: Decimal  # what it adds to the metric, in the reporting currency


@dataclass(frozen=True)
class MetricTrail:
    metric: MetricName
    period: CalendarPeriod
    segments: tuple[Segment, ...]
    rows: tuple[TrailRow, ...]
    total: Decimal
    reporting_currency: str
    rounding: RoundingMode = "half_up"
    # entries the metric would count but a reversing entry cancels: (entry, id of its reversal)
    reversed: tuple[tuple[MrrMovement, int], ...] = ()

    @property
    def accounts(self) -> int:
        """Distinct customers among the rows (the `expansion_accounts` of an expansion trail)."""
        return len({row.movement.customer for row in self.rows})

    @property
    def total_str(self) -> str:
        return money_str(self.total, self.reporting_currency, self.rounding)

    @property
    def per_account(self) -> str | None:
        """total ÷ accounts (ARPEA for the expansion trail); None without accounts."""
        if not self.accounts:
            return None
        return money_str(Fraction(self.total) / self.accounts, self.reporting_currency, self.rounding)


def metric_trail(
    movements: Iterable[MrrMovement],
    metric: MetricName,
    period: CalendarPeriod,
    settings: Settings,
    *,
    segments: Sequence[Segment] = (),
    tags: Mapping[str, Mapping[str, str]] | None = None,
) -> MetricTrail:
    """Every movement dated in `period` that `metric` sums (of the segments, when given), in
    ledger order, and their total. A reversed entry and its reversal net to zero and are left out,
    as the metric set leaves them out (`expansion.metrics.effective`); the trail names them."""
    tag_map = tags or {}
    ordered = sorted(movements, key=lambda m: m.id)
    reversal_of = {m.reverses: m.id for m in ordered if m.entry == "reversal" and m.reverses is not None}
    counted = {m.id for m in effective(ordered)}

    def selected(m: MrrMovement) -> bool:
        return period.start <= m.at < period.end and metric.counts(m) and all(s.keeps(m, tag_map) for s in segments)

    rows = tuple(TrailRow(m, metric.amount(m)) for m in ordered if m.id in counted and selected(m))
    cancelled = tuple((m, reversal_of[m.id]) for m in ordered if m.id in reversal_of and selected(m))
    total = sum((row.amount for row in rows), Decimal(0))
    return MetricTrail(metric, period, tuple(segments), rows, total, settings.reporting_currency, settings.rounding,
                       cancelled)


def metric_trail_json(trail: MetricTrail) -> dict[str, object]:
    rep = trail.reporting_currency
    return {
        "metric": trail.metric.label,
        "period": trail.period.label,
        "from": iso(trail.period.start),
        "to": iso(trail.period.end),
        "by": {s.key: s.value for s in trail.segments},
        "reporting_currency": rep,
        "movements": [
            {**_movement_head(row.movement), "amount": money_str(row.amount, rep)} for row in trail.rows
        ],
        "reversed": [{"id": m.id, "reversed_by": reversal} for m, reversal in trail.reversed],
        "count": len(trail.rows),
        "accounts": trail.accounts,
        "total": trail.total_str,
    }


# ---------------------------------------------------------------------------------------------
# Where a movement comes from
# ---------------------------------------------------------------------------------------------


def is_direct(movement: MrrMovement, applied: StoredCommand) -> bool:
    """True when the command whose transaction wrote the movement caused it itself (an
    immediate change, a subscription starting, …); False for a transition due at the movement's
    time that the command's clock merely reached."""
    if movement.cause not in DIRECT_CAUSES or applied.type != movement.cause:
        return False
    if applied.at != movement.at or applied.event_index != movement.event_index:
        return False
    if not _names_subject(applied, movement):
        return False
    return applied.payload.get("effective") in (None, "immediately")


def _names_subject(command: StoredCommand, movement: MrrMovement) -> bool:
    payload = command.payload
    if movement.subscription is not None and payload.get("subscription") == movement.subscription:
        return True
    return command.type == "discount" and payload.get("customer") == movement.customer


def transition_name(movement: MrrMovement) -> str:
    """What kind of transition moved MRR (for a movement that is not direct)."""
    if movement.cause == "usage":
        return "usage period close"
    if movement.cause == "trial_end":
        return "trial end"
    if movement.cause == "discount":
        return "coupon starting on a period"
    if movement.cause == "discount_end":
        return "coupon's last covered period ending"
    if movement.cause == "cancel":
        return "period-end cancellation"
    if movement.cause in CHANGE_CAUSES:
        return f"period-end {movement.cause}"
    return f"{movement.cause} transition"


def scheduling_types(movement: MrrMovement) -> tuple[str, ...]:
    """The command types that can schedule this movement's transition."""
    if movement.cause == "usage":
        return ("subscribe", "reactivate")
    if movement.cause == "trial_end":
        return ("subscribe",)
    if movement.cause in ("discount", "discount_end"):
        return ("discount",)
    if movement.cause == "cancel" or movement.cause in CHANGE_CAUSES:
        return (movement.cause,)
    return ()


def schedulers(movement: MrrMovement, candidates: Iterable[StoredCommand]) -> list[StoredCommand]:
    """The commands that may have scheduled a transition, most likely first.

    - period-end change or cancellation: the command of that type on the subscription with
      `effective: period_end` (and the movement's event index when it has one);
    - usage period close, trial end: the subscribe (or reactivate) that set the period grid;
    - coupon start or end: the recurring coupons on the subscription or its customer (a `periods`
      coupon for an end).
    """
    types = scheduling_types(movement)
    found = []
    for command in candidates:
        if command.type not in types or command.at > movement.at or not _names_subject(command, movement):
            continue
        payload = command.payload
        if movement.cause == "cancel" or movement.cause in CHANGE_CAUSES:
            if payload.get("effective") != "period_end":
                continue
            if movement.event_index is not None and command.event_index != movement.event_index:
                continue
        elif movement.cause == "discount" and payload.get("duration", "forever") == "once":
            continue
        elif movement.cause == "discount_end" and not isinstance(payload.get("duration"), dict):
            continue
        found.append(command)
    found.sort(key=lambda c: c.id, reverse=True)
    if movement.cause in ("discount", "discount_end"):
        return found
    return found[:1]


@dataclass(frozen=True)
class Origin:
    """How a movement came about. `command` is the command that caused it (direct) or scheduled
    it (a transition); `others` are further possible schedulers (several coupons);
    `applied_during` is the command whose transaction wrote it."""

    direct: bool
    description: str
    command: StoredCommand | None
    applied_during: StoredCommand
    others: tuple[StoredCommand, ...] = ()


def origin_of(movement: MrrMovement, applied: StoredCommand, candidates: Iterable[StoredCommand] = ()) -> Origin:
    if movement.entry == "reversal":
        return Origin(True, f"reversal of movement #{movement.reverses}", applied, applied)
    if is_direct(movement, applied):
        return Origin(True, f"{applied.type} command", applied, applied)
    found = schedulers(movement, candidates)
    return Origin(False, transition_name(movement), found[0] if found else None, applied, tuple(found[1:]))


@dataclass(frozen=True)
class BilledLine:
    """An invoice line as the audit shows it: where it is, what it bills, what was credited."""

    ref: LineRef
    invoice_customer: str
    currency: str
    status: str
    issued_at: datetime
    line: InvoiceLine
    credited: Decimal = Decimal(0)
    credit_notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.ref.invoice}#{self.ref.line}"


def billed_lines(
    refs: Iterable[LineRef], invoices: Mapping[str, Invoice], credit_notes: Iterable[CreditNote] = ()
) -> dict[LineRef, BilledLine]:
    """The lines behind references, with the credit notes against each (refs to a line that does
    not exist are left out: the caller reports them)."""
    credited: dict[LineRef, Decimal] = {}
    notes: dict[LineRef, list[str]] = {}
    for note in credit_notes:
        for cl in note.lines:
            key = LineRef(invoice=note.invoice, line=cl.invoice_line)
            credited[key] = credited.get(key, Decimal(0)) + cl.amount
            notes.setdefault(key, []).append(note.number)
    out: dict[LineRef, BilledLine] = {}
    for ref in refs:
        invoice = invoices.get(ref.invoice)
        if invoice is None or not 0 <= ref.line < len(invoice.lines):
            continue
        out[ref] = BilledLine(ref, invoice.customer, invoice.currency, invoice.status, invoice.issued_at,
                              invoice.lines[ref.line], credited.get(ref, Decimal(0)), tuple(notes.get(ref, ())))
    return out


@dataclass(frozen=True)
class MovementTrace:
    movement: MrrMovement
    origin: Origin
    fx_rate: Fraction | None  # customer currency → reporting currency at the movement; None if the same
    lines: tuple[BilledLine, ...]
    usage_events: tuple[StoredCommand, ...] = ()  # for a usage close: the usage recorded in the period
    reversed_by: int | None = None  # the reversing entry that cancels this one in every metric

    @property
    def billed(self) -> Decimal:
        return sum((bl.line.amount for bl in self.lines), Decimal(0))

    @property
    def credited(self) -> Decimal:
        return sum((bl.credited for bl in self.lines), Decimal(0))


def movement_trace(
    movement: MrrMovement,
    applied: StoredCommand,
    settings: Settings,
    lines: Mapping[LineRef, BilledLine],
    candidates: Iterable[StoredCommand] = (),
    usage_events: Sequence[StoredCommand] = (),
    reversed_by: int | None = None,
) -> MovementTrace:
    fx: Fraction | None = None
    if movement.currency != settings.reporting_currency:
        try:
            fx = rate_at(settings, movement.currency, movement.at)
        except MissingRate:
            fx = None
    return MovementTrace(
        movement,
        origin_of(movement, applied, candidates),
        fx,
        tuple(lines[ref] for ref in movement.invoice_lines if ref in lines),
        tuple(usage_events),
        reversed_by,
    )


def usage_window(trace_lines: Iterable[BilledLine]) -> tuple[datetime, datetime] | None:
    """The usage period a usage close billed, from its usage lines."""
    for bl in trace_lines:
        if bl.line.kind == "usage" and bl.line.period_start is not None and bl.line.period_end is not None:
            return bl.line.period_start, bl.line.period_end
    return None


def command_json(command: StoredCommand | None) -> dict[str, object] | None:
    if command is None:
        return None
    return {
        "id": command.id,
        "type": command.type,
        "actor": command.actor,
        "at": iso(command.at),
        "recorded_at": iso(command.recorded_at),
        "event_index": command.event_index,
        "idempotency_key": command.idempotency_key,
        "payload": command.payload,
    }


def line_json(bl: BilledLine) -> dict[str, object]:
    line = bl.line
    return {
        "invoice": bl.ref.invoice,
        "line": bl.ref.line,
        "status": bl.status,
        "customer": bl.invoice_customer,
        "issued_at": iso(bl.issued_at),
        "kind": line.kind,
        "description": line.description,
        "subscription": line.subscription,
        "amount": money_str(line.amount, bl.currency),
        "currency": bl.currency,
        "period_start": None if line.period_start is None else iso(line.period_start),
        "period_end": None if line.period_end is None else iso(line.period_end),
        "credited": money_str(bl.credited, bl.currency),
        "credit_notes": list(bl.credit_notes),
    }


def movement_trace_json(trace: MovementTrace) -> dict[str, object]:
    m = trace.movement
    origin = trace.origin
    return {
        "movement": {**movement_json(m), "cause": m.cause, "event_index": m.event_index,
                     "reporting_currency": m.reporting_currency, "entry": m.entry, "reverses": m.reverses,
                     "reversed_by": trace.reversed_by},
        "origin": {
            "direct": origin.direct,
            "description": origin.description,
            "command": command_json(origin.command),
            "other_candidates": [command_json(c) for c in origin.others],
            "applied_during": command_json(origin.applied_during),
        },
        "fx_rate": None if trace.fx_rate is None else fx_rate_text(trace.fx_rate),
        "lines": [line_json(bl) for bl in trace.lines],
        "billed": money_str(trace.billed, m.currency),
        "credited": money_str(trace.credited, m.currency),
        "usage_events": [c.id for c in trace.usage_events],
    }


def fx_rate_text(rate: Fraction) -> str:
    """An exchange rate as its decimal (rates come from decimal strings, so this is exact)."""
    return str(Decimal(rate.numerator) / Decimal(rate.denominator))


def _movement_head(m: MrrMovement) -> dict[str, object]:
    return {
        "id": m.id,
        "at": iso(m.at),
        "customer": m.customer,
        "subscription": m.subscription,
        "type": m.type,
        "subtype": m.subtype,
        "cause": m.cause,
        "currency": m.currency,
        "delta": money_str(m.delta, m.currency),
        "reporting_delta": money_str(m.reporting_delta, m.reporting_currency),
    }


# ---------------------------------------------------------------------------------------------
# Reconciliation: the ledger against the invoices
# ---------------------------------------------------------------------------------------------

Status = Literal["billed", "explained", "exception"]


@dataclass(frozen=True)
class MovementCheck:
    movement: MrrMovement
    status: Status
    reason: str  # billed | period_end_cancel | proration_none | not_invoiced_yet | unbilled | ...
    explanation: str
    lines: tuple[BilledLine, ...] = ()
    notes: tuple[str, ...] = ()  # information, not exceptions (credit notes on the lines)


@dataclass(frozen=True)
class OrphanLine:
    """A proration line no movement references, with what may explain it: movements of its
    subscription dated on the change's day, the latest change command on the subscription, and
    the change commands of that day that emitted no movement (`silent`)."""

    line: BilledLine
    nearby: tuple[MrrMovement, ...] = ()
    change: StoredCommand | None = None
    silent: tuple[StoredCommand, ...] = ()


@dataclass(frozen=True)
class LineCheck:
    line: BilledLine
    status: Status
    reason: str  # no_mrr_change | unlinked_line | no_movement
    explanation: str
    at: datetime  # when the change took effect (as far as the ledger tells)


@dataclass(frozen=True)
class Reconciliation:
    period: CalendarPeriod
    movements: tuple[MovementCheck, ...]
    lines: tuple[LineCheck, ...]
    reporting_currency: str = "USD"

    @property
    def exceptions(self) -> list[MovementCheck | LineCheck]:
        found: list[MovementCheck | LineCheck] = [c for c in self.movements if c.status == "exception"]
        return found + [c for c in self.lines if c.status == "exception"]

    def count(self, status: Status) -> int:
        return sum(1 for c in self.movements if c.status == status)


def check_movement(
    movement: MrrMovement,
    applied: StoredCommand,
    lines: Sequence[BilledLine],
    settings: Settings,
    last_run_id: int | None,
) -> MovementCheck:
    """Tie one movement to the lines that bill it.

    With lines: an exception when a line is another customer's (`foreign_line`) or another
    subscription's (`wrong_subscription`), when an immediate change's proration lines net the
    opposite sign of its MRR delta (`amount_sign`), or when every line is on a void invoice
    (`void_only`: a voided period is never billed again); else `billed`, with a note for each line
    a credit note took back from.

    Without lines, explained when the rules write none:
    - `period_end_cancel`: a period-end cancellation — the ended period was billed in advance
      and nothing is credited;
    - `proration_none`: an immediate change under proration `none` — no proration lines, the next
      period is billed in the new state;
    - `not_invoiced_yet`: no invoice run since the command that wrote it (a usage period closed,
      a period-end change, a new period or pending prorations wait for the next run);
    otherwise an exception (`unbilled`).
    """
    direct = is_direct(movement, applied)
    cur = movement.currency
    if lines:
        problems = []
        foreign = [bl.label for bl in lines if bl.invoice_customer != movement.customer]
        if foreign:
            problems.append(("foreign_line", f"{', '.join(foreign)} bill(s) another customer"))
        wrong = [bl.label for bl in lines if bl.line.subscription not in (None, movement.subscription)]
        if wrong:
            problems.append(("wrong_subscription", f"{', '.join(wrong)} bill(s) another subscription"))
        mismatch = _proration_sign_mismatch(movement, lines, direct)
        if mismatch:
            problems.append(("amount_sign", mismatch))
        if all(bl.status == "void" for bl in lines):
            problems.append(("void_only", "billed only on void invoice(s) "
                             f"{', '.join(sorted({bl.ref.invoice for bl in lines}))}; a voided period is not "
                             "billed again"))
        notes = tuple(
            f"{bl.label} credited {money_str(bl.credited, bl.currency)} {bl.currency} by {', '.join(bl.credit_notes)}"
            + (" (fully)" if bl.credited >= bl.line.amount > 0 else "")
            for bl in lines if bl.credited
        )
        if problems:
            return MovementCheck(movement, "exception", problems[0][0], "; ".join(p[1] for p in problems),
                                 tuple(lines), notes)
        net = sum((bl.line.amount for bl in lines), Decimal(0))
        kinds = sorted({bl.line.kind for bl in lines})
        return MovementCheck(movement, "billed", "billed",
                             f"billed by {len(lines)} {'/'.join(kinds)} line(s), net {money_str(net, cur)} {cur}",
                             tuple(lines), notes)
    if movement.cause == "cancel" and not direct:
        return MovementCheck(movement, "explained", "period_end_cancel",
                             "period-end cancellation: the ended period was billed in advance, nothing to credit")
    if direct and settings.proration == "none" and movement.cause in (*CHANGE_CAUSES, "cancel"):
        return MovementCheck(movement, "explained", "proration_none",
                             "proration `none`: an immediate change writes no proration lines; "
                             "the next period is billed in the new state")
    immediate = direct and settings.proration_invoicing == "immediate" and settings.proration != "none" \
        and movement.cause in (*CHANGE_CAUSES, "cancel")
    if not immediate and (last_run_id is None or last_run_id < applied.id):
        what = "usage period closed" if movement.cause == "usage" else "change"
        return MovementCheck(movement, "explained", "not_invoiced_yet",
                             f"not invoiced yet: {what} at {iso(movement.at)}, no invoice run since "
                             f"command #{applied.id}; the next run bills it")
    return MovementCheck(movement, "exception", "unbilled", "no invoice line bills this movement")


def _proration_sign_mismatch(movement: MrrMovement, lines: Sequence[BilledLine], direct: bool) -> str | None:
    """The amounts check: an immediate change billed by a credit/charge pair over one period
    (no interval change) bills the price difference for the rest of the period, so its net has
    the sign of the MRR delta (or is 0 after rounding). A net of the opposite sign means the lines
    bill another change than the movement records."""
    if not direct or movement.cause not in (*CHANGE_CAUSES, "cancel"):
        return None
    if any(bl.line.kind != "proration" for bl in lines) or len({bl.line.period_end for bl in lines}) != 1:
        return None
    net = sum((bl.line.amount for bl in lines), Decimal(0))
    if net == 0 or (net > 0) == (movement.delta > 0):
        return None
    cur = movement.currency
    return (f"the proration lines net {money_str(net, cur)} {cur} but MRR moved {money_str(movement.delta, cur)} "
            f"{cur}: they bill a change in the other direction")


def check_orphan_line(orphan: OrphanLine) -> LineCheck:
    """A proration line that no movement references.

    - `no_mrr_change` (explained): a change command on the subscription that day emitted no
      movement — a change that left MRR as it was (monthly swapped for yearly at the same price
      per month) bills prorations and emits none, even beside another change that moved MRR;
    - `unlinked_line` (exception): every change that day moved MRR, yet no movement references
      the line — a broken link;
    - `no_mrr_change` (explained) too when no movement is on that day and a change command on the
      subscription explains the line;
    - `no_movement` (exception): nothing explains the line.
    """
    bl = orphan.line
    start = bl.line.period_start or bl.issued_at
    if orphan.silent:
        change = orphan.silent[-1]
        return LineCheck(bl, "explained", "no_mrr_change",
                         f"command #{change.id} {change.type} at {iso(change.at)} billed a change that left "
                         "MRR as it was (no movement)", change.at if change.at >= start else start)
    if orphan.nearby:
        ids = ", ".join(f"#{m.id}" for m in orphan.nearby)
        verb = "does" if len(orphan.nearby) == 1 else "do"
        return LineCheck(bl, "exception", "unlinked_line",
                         f"no movement references it, though {bl.line.subscription} moved MRR that day "
                         f"(movement {ids} {verb} not link it): a broken link", orphan.nearby[0].at)
    if orphan.change is not None:
        change = orphan.change
        at = change.at if change.at >= start else start
        return LineCheck(bl, "explained", "no_mrr_change",
                         f"command #{change.id} {change.type} at {iso(change.at)} billed a change that left "
                         "MRR as it was (no movement)", at)
    return LineCheck(bl, "exception", "no_movement", "a billed change with no movement and no change command",
                     start)


def reconcile(
    period: CalendarPeriod,
    movements: Sequence[tuple[MrrMovement, StoredCommand]],
    lines: Mapping[LineRef, BilledLine],
    orphans: Sequence[OrphanLine],
    settings: Settings,
    last_run_id: int | None,
) -> Reconciliation:
    checks = []
    reversal_of = {m.reverses: m.id for m, _ in movements if m.entry == "reversal" and m.reverses is not None}
    for m, applied in sorted(movements, key=lambda pair: pair[0].id):
        if m.entry == "reversal":
            checks.append(MovementCheck(m, "explained", "reversal", f"reversing entry of movement #{m.reverses}: "
                                        "corrects the ledger, bills nothing"))
            continue
        if m.id in reversal_of:
            refs = ", ".join(f"{r.invoice}#{r.line}" for r in m.invoice_lines) or "no line"
            checks.append(MovementCheck(m, "explained", "reversed", f"reversed by movement #{reversal_of[m.id]}: "
                                        f"no metric counts it (its billing, {refs}, stays as invoiced)",
                                        tuple(lines[r] for r in m.invoice_lines if r in lines)))
            continue
        missing = [r for r in m.invoice_lines if r not in lines]
        if missing:
            checks.append(MovementCheck(m, "exception", "missing_line", "references invoice line(s) that do not "
                                        f"exist: {', '.join(f'{r.invoice}#{r.line}' for r in missing)}"))
            continue
        checks.append(check_movement(m, applied, [lines[r] for r in m.invoice_lines], settings, last_run_id))
    line_checks = tuple(
        check for check in (check_orphan_line(o) for o in orphans) if period.start <= check.at < period.end
    )
    return Reconciliation(period, tuple(checks), line_checks, settings.reporting_currency)


def reconciliation_json(rec: Reconciliation) -> dict[str, object]:
    return {
        "period": rec.period.label,
        "from": iso(rec.period.start),
        "to": iso(rec.period.end),
        "movements": [
            {**_movement_head(c.movement), "status": c.status, "reason": c.reason, "explanation": c.explanation,
             "lines": [line_json(bl) for bl in c.lines], "notes": list(c.notes)}
            for c in rec.movements
        ],
        "lines": [
            {**line_json(c.line), "status": c.status, "reason": c.reason, "explanation": c.explanation,
             "at": iso(c.at)}
            for c in rec.lines
        ],
        "billed": rec.count("billed"),
        "explained": rec.count("explained") + sum(1 for c in rec.lines if c.status == "explained"),
        "exceptions": len(rec.exceptions),
    }


# ---------------------------------------------------------------------------------------------
# The query layer: read the ledger, call the pure functions
# ---------------------------------------------------------------------------------------------


class NoBook(TraceError):
    """The database holds no book (no catalog loaded)."""


def book_settings(engine: Engine) -> Settings:
    """The settings of the book in the database (NoBook when there is none)."""
    from billing import service

    config = service.book_config(engine)
    if config is None:
        raise NoBook("the database holds no book yet (no catalog loaded)")
    return config[0]


def trace_movement(engine: Engine, movement_id: int) -> MovementTrace:
    """`billing trace movement ID`."""
    from billing.persistence.audit import audit_reader
    from billing.service import NotFound

    settings = book_settings(engine)
    with audit_reader(engine) as reader:
        found = reader.movements(ids=[movement_id])
        if not found:
            raise NotFound(f"movement {movement_id} not found")
        [(movement, command_id)] = found
        applied = reader.commands([command_id])[command_id]
        candidates: list[StoredCommand] = []
        if not is_direct(movement, applied) and scheduling_types(movement):
            candidates = reader.commands_about(
                scheduling_types(movement), subscription=movement.subscription,
                customer=movement.customer if movement.cause in ("discount", "discount_end") else None,
                up_to=applied.id,
            )
        numbers = {ref.invoice for ref in movement.invoice_lines}
        lines = billed_lines(movement.invoice_lines, reader.invoices(numbers), reader.credit_notes(numbers))
        usage: list[StoredCommand] = []
        window = usage_window(lines.values()) if movement.cause == "usage" else None
        if window is not None and movement.subscription is not None:
            usage = reader.commands_about(("usage",), subscription=movement.subscription,
                                          start=window[0], end=window[1], up_to=applied.id)
        reversed_by = reader.reversals_of([movement.id]).get(movement.id)
    return movement_trace(movement, applied, settings, lines, candidates, usage, reversed_by)


def trace_metric(engine: Engine, metric: str, period: str, by: Sequence[str] = ()) -> MetricTrail:
    """`billing trace metric NAME --period P [--by KEY=VALUE ...]`."""
    from billing.persistence.audit import audit_reader

    name = parse_metric(metric)
    calendar = parse_period(period)
    segments = [parse_segment(s) for s in by]
    settings = book_settings(engine)
    with audit_reader(engine) as reader:
        movements = [m for m, _ in reader.movements(start=calendar.start, end=calendar.end)]
        tags = reader.customer_tags() if any(s.key.startswith("tag:") for s in segments) else {}
    return metric_trail(movements, name, calendar, settings, segments=segments, tags=tags)


def reconcile_period(engine: Engine, period: str) -> Reconciliation:
    """`billing reconcile --period P`."""
    from billing.persistence.audit import audit_reader

    calendar = parse_period(period)
    settings = book_settings(engine)
    with audit_reader(engine) as reader:
        found = reader.movements(start=calendar.start, end=calendar.end)
        commands = reader.commands({command_id for _, command_id in found})
        pairs = [(m, commands[command_id]) for m, command_id in found]
        orphan_refs = reader.unlinked_lines("proration", calendar.start - CHANGE_DAY, calendar.end + CHANGE_DAY)
        refs = [ref for m, _ in found for ref in m.invoice_lines] + orphan_refs
        numbers = {ref.invoice for ref in refs}
        lines = billed_lines(refs, reader.invoices(numbers), reader.credit_notes(numbers))
        orphans = []
        for ref in orphan_refs:
            bl = lines[ref]
            sub = bl.line.subscription
            start = bl.line.period_start or bl.issued_at
            near = reader.movements(customer=bl.invoice_customer, subscription=sub,
                                    start=start, end=start + CHANGE_DAY) if sub else []
            changes = reader.commands_about((*CHANGE_CAUSES, "cancel"), subscription=sub,
                                            end=start + CHANGE_DAY) if sub else []
            movers = {command_id for _, command_id in near}
            silent = tuple(c for c in changes if c.at >= start and c.id not in movers)
            orphans.append(OrphanLine(bl, tuple(m for m, _ in near), changes[-1] if changes else None, silent))
        last_run = reader.last_invoice_run()
    return reconcile(calendar, pairs, lines, orphans, settings, None if last_run is None else last_run.id)


def payload_text(command: StoredCommand) -> str:
    """A command's payload as one line of JSON, keys sorted."""
    return json.dumps(command.payload, sort_keys=True, ensure_ascii=False, default=str)
