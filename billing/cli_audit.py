"""The audit-trail and report commands of `billing`: `trace movement`, `trace metric`,
`reconcile` and `report` (expansion/trace.py, expansion/report.py).

They run under the `billing` group (`billing.cli` registers them), so their errors are one line
on stderr and a non-zero exit like every other command: 2 for a bad period, metric, segment or
an unknown movement, 1 for a database problem — and `reconcile` exits 1 when it finds exceptions.
Nothing here writes to the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from billing.cli_options import db_option, json_option
from billing.money import money_str
from billing.periods import iso
from billing.persistence import Engine, StoredCommand
from expansion.trace import (
    BilledLine,
    MetricTrail,
    MovementTrace,
    Reconciliation,
    TraceError,
    fx_rate_text,
    metric_trail_json,
    movement_trace_json,
    payload_text,
    reconcile_period,
    reconciliation_json,
    trace_metric,
    trace_movement,
)

FAILURE = 1



def _engine(ctx: click.Context, db: str) -> Engine:
    """An engine on an initialised database, disposed when the command ends. The group's helpers
    are imported when a command runs: billing.cli imports this module to register it."""
    from billing.cli import _open

    return _open(ctx, db)


def _dump(data: Any) -> str:
    from billing.cli import _dump as dump

    return dump(data)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    from billing.cli import _table as table

    return table(rows, headers)


@contextmanager
def _bad_input() -> Iterator[None]:
    """A TraceError (an unknown metric, a malformed period) is bad input: exit 2 with its message."""
    try:
        yield
    except TraceError as exc:
        raise click.UsageError(str(exc)) from None


def _signed(amount: Decimal, currency: str) -> str:
    text = money_str(amount, currency)
    return f"+{text} {currency}" if amount > 0 else f"{text} {currency}"


def _when(at: datetime | None) -> str:
    return "" if at is None else iso(at)


# --- trace ------------------------------------------------------------------------------------


@click.group()
def trace() -> None:
    """Follow a movement or a metric back to its commands and invoice lines."""


@trace.command("movement")
@click.argument("movement_id", metavar="ID", type=int)
@json_option
@db_option
@click.pass_context
def trace_movement_command(ctx: click.Context, movement_id: int, as_json: bool, db: str) -> None:
    """The command that caused movement ID, MRR before and after, and the lines that billed it."""
    engine = _engine(ctx, db)
    with _bad_input():
        result = trace_movement(engine, movement_id)
    click.echo(_dump(movement_trace_json(result)) if as_json else movement_trace_text(result))


def _command_text(command: StoredCommand) -> str:
    event = f" (event {command.event_index})" if command.event_index is not None else ""
    return f"command #{command.id} {command.type}{event} by {command.actor} at {iso(command.at)}"


def movement_trace_text(result: MovementTrace) -> str:
    m = result.movement
    origin = result.origin
    kind = f"{m.type}/{m.subtype}" if m.subtype else m.type
    sub = f" subscription {m.subscription}" if m.subscription else ""
    out = [f"movement #{m.id}  {kind}  customer {m.customer}{sub}  at {iso(m.at)}"]
    if origin.direct:
        assert origin.command is not None
        out.append(f"cause     {_command_text(origin.command)}")
        if m.entry == "reversal":
            out.append(f"reverses movement #{m.reverses} (the pair nets to zero in every metric)")
    else:
        scheduled = f", scheduled by {_command_text(origin.command)}" if origin.command else \
            ", no scheduling command found"
        out.append(f"cause     {origin.description}{scheduled}")
        for other in origin.others:
            out.append(f"          or by {_command_text(other)}")
        out.append(f"applied   during {_command_text(origin.applied_during)}")
    if origin.command is not None:
        out.append(f"payload   {payload_text(origin.command)}")
    out.append(f"MRR       {money_str(m.mrr_before, m.currency)} {m.currency} -> "
               f"{money_str(m.mrr_after, m.currency)} {m.currency}")
    rate = "" if result.fx_rate is None else f", rate {fx_rate_text(result.fx_rate)}"
    out.append(f"delta     {_signed(m.delta, m.currency)} = {_signed(m.reporting_delta, m.reporting_currency)} "
               f"(reporting{rate})")
    if result.reversed_by is not None:
        out.append(f"reversed  by movement #{result.reversed_by}: no metric counts this entry")
    if result.usage_events:
        ids = [c.id for c in result.usage_events]
        out.append(f"usage     {len(ids)} usage event(s) in the closed period: commands #{ids[0]}..#{ids[-1]}")
    if not result.lines:
        out.append("billed    by no invoice line (see `billing reconcile`)")
        return "\n".join(out)
    credited = f", credited {money_str(result.credited, m.currency)} {m.currency}" if result.credited else ""
    out.append(f"billed    by {len(result.lines)} line(s), net {money_str(result.billed, m.currency)} "
               f"{m.currency}{credited}")
    out.append(_lines_table(result.lines))
    return "\n".join(out)


def _lines_table(lines: tuple[BilledLine, ...] | list[BilledLine]) -> str:
    return _table(
        [[bl.ref.invoice, str(bl.ref.line), bl.status, bl.line.kind,
          f"{money_str(bl.line.amount, bl.currency)} {bl.currency}",
          f"{_when(bl.line.period_start)} .. {_when(bl.line.period_end)}" if bl.line.period_start else "",
          f"{money_str(bl.credited, bl.currency)} ({', '.join(bl.credit_notes)})" if bl.credited else "",
          bl.line.description]
         for bl in lines],
        ["INVOICE", "LINE", "STATUS", "KIND", "AMOUNT", "PERIOD", "CREDITED", "DESCRIPTION"],
    )


@trace.command("metric")
@click.argument("name", metavar="NAME")
@click.option("--period", required=True, metavar="P", help="2026-03 (month), 2026-Q1 (quarter) or 2026 (year).")
@click.option("--by", "by", multiple=True, metavar="KEY=VALUE",
              help="Only one segment: currency=EUR, subtype=seat, customer=acme or tag:segment=smb; repeatable.")
@json_option
@db_option
@click.pass_context
def trace_metric_command(ctx: click.Context, name: str, period: str, by: tuple[str, ...], as_json: bool,
                         db: str) -> None:
    """Every movement that makes up metric NAME in period P, and their total (the metric).

    NAME is new, expansion, contraction, churn, reactivation, expansion.SUBTYPE or
    contraction.SUBTYPE; contraction and churn count as positive amounts, as in the metrics.
    """
    engine = _engine(ctx, db)
    with _bad_input():
        result = trace_metric(engine, name, period, by)
    click.echo(_dump(metric_trail_json(result)) if as_json else metric_trail_text(result))


def metric_trail_text(trail: MetricTrail) -> str:
    rep = trail.reporting_currency
    segment = f" ({', '.join(s.label for s in trail.segments)})" if trail.segments else ""
    head = (f"{trail.metric.label} {trail.period.label}{segment}: {len(trail.rows)} movement(s), "
            f"{trail.accounts} account(s), [{iso(trail.period.start)}, {iso(trail.period.end)})")
    out = [head]
    if trail.rows:
        out.append(_table(
            [[str(r.movement.id), iso(r.movement.at), r.movement.customer, r.movement.subscription or "",
              f"{r.movement.type}/{r.movement.subtype}" if r.movement.subtype else r.movement.type,
              r.movement.cause, _signed(r.movement.delta, r.movement.currency), money_str(r.amount, rep)]
             for r in trail.rows],
            ["ID", "AT", "CUSTOMER", "SUBSCRIPTION", "TYPE", "CAUSE", "DELTA", f"AMOUNT ({rep})"],
        ))
    for m, reversal in trail.reversed:
        out.append(f"not counted: movement #{m.id} ({_signed(m.reporting_delta, rep)}), reversed by #{reversal}")
    out.append(f"total {trail.total_str} {rep} = {trail.metric.label} {trail.period.label}{segment}")
    return "\n".join(out)


# --- reconcile --------------------------------------------------------------------------------


@click.command("reconcile")
@click.option("--period", required=True, metavar="P", help="2026-03 (month), 2026-Q1 (quarter) or 2026 (year).")
@json_option
@db_option
@click.pass_context
def reconcile(ctx: click.Context, period: str, as_json: bool, db: str) -> None:
    """Tie the period's MRR movements to the invoice lines that bill them, and its proration lines
    to movements; exit 1 when there are exceptions.

    A movement with no line is explained (not an exception) when the rules write none: a period-end
    cancellation, an immediate change under proration `none`, or something not invoiced yet (a usage
    period closed, a period-end change, pending prorations). A proration line with no movement is
    explained when its change left MRR as it was.
    """
    engine = _engine(ctx, db)
    with _bad_input():
        result = reconcile_period(engine, period)
    click.echo(_dump(reconciliation_json(result)) if as_json else reconciliation_text(result))
    if result.exceptions:
        if not as_json:
            click.echo(f"billing: {len(result.exceptions)} reconciliation exception(s) in {result.period.label}",
                       err=True)
        ctx.exit(FAILURE)


def reconciliation_text(rec: Reconciliation) -> str:
    explained_lines = sum(1 for c in rec.lines if c.status == "explained")
    out = [f"reconcile {rec.period.label} [{iso(rec.period.start)}, {iso(rec.period.end)}): "
           f"{len(rec.movements)} movement(s): {rec.count('billed')} billed, {rec.count('explained')} explained, "
           f"{sum(1 for c in rec.movements if c.status == 'exception')} exception(s); "
           f"{len(rec.lines)} proration line(s) without a movement ({explained_lines} explained)"]
    if rec.movements:
        out.append(_table(
            [[str(c.movement.id), iso(c.movement.at), c.movement.customer,
              f"{c.movement.type}/{c.movement.subtype}" if c.movement.subtype else c.movement.type,
              _signed(c.movement.delta, c.movement.currency), c.status.upper(), c.reason,
              ", ".join(f"{bl.label} {money_str(bl.line.amount, bl.currency)}" for bl in c.lines) or "-"]
             for c in rec.movements],
            ["ID", "AT", "CUSTOMER", "TYPE", "DELTA", "STATUS", "REASON", "LINES"],
        ))
    for c in rec.movements:
        if c.status == "explained":
            out.append(f"explained: movement #{c.movement.id}: {c.explanation}")
        for note in c.notes:
            out.append(f"note: movement #{c.movement.id}: {note}")
    for lc in rec.lines:
        if lc.status == "explained":
            bl = lc.line
            out.append(f"explained: {bl.label} ({bl.line.kind} {money_str(bl.line.amount, bl.currency)} "
                       f"{bl.currency}, {bl.line.subscription}): {lc.explanation}")
    exceptions = rec.exceptions
    if not exceptions:
        out.append(f"clean: every movement of {rec.period.label} ties to its invoice lines")
        return "\n".join(out)
    out.append(f"{len(exceptions)} exception(s):")
    for c in rec.movements:
        if c.status == "exception":
            m = c.movement
            kind = f"{m.type}/{m.subtype}" if m.subtype else m.type
            out.append(f"  movement #{m.id} ({kind} {m.customer} {_signed(m.delta, m.currency)}): "
                       f"{c.reason}: {c.explanation}")
    for lc in rec.lines:
        if lc.status == "exception":
            bl = lc.line
            out.append(f"  {bl.label} ({bl.line.kind} {money_str(bl.line.amount, bl.currency)} {bl.currency}, "
                       f"{bl.line.subscription}): {lc.reason}: {lc.explanation}")
    return "\n".join(out)


# --- report -----------------------------------------------------------------------------------


@click.command("report")
@click.option("--out", "out", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Directory to write index.html and its trail pages into (created if missing).")
@db_option
@click.pass_context
def report(ctx: click.Context, out: str, db: str) -> None:
    """Write the expansion report: DIR/index.html (self-contained, opens offline) and
    DIR/trail/*.html, the movements behind every number. Prints the path of index.html."""
    from expansion.report import write_report

    engine = _engine(ctx, db)
    with _bad_input():
        written = write_report(engine, Path(out))
    click.echo(str(written))


@click.command("verify")
@json_option
@db_option
@click.pass_context
def verify(ctx: click.Context, as_json: bool, db: str) -> None:
    """Check the database against the engine's invariants — invoice totals, gap-free numbering,
    no period billed twice, periods that tile, ledger entries that sum to each customer's MRR,
    snapshots and the maintained monthly figures that agree with the ledger, links that resolve
    — and print every finding with its rows; exit 0 only when clean."""
    from expansion.verify import verification_lines
    from expansion.verify import verify as run_verify

    result = run_verify(_engine(ctx, db))
    click.echo(_dump(result.to_json()) if as_json else "\n".join(verification_lines(result)))
    if not result.clean:
        if not as_json:
            click.echo(f"billing: verify found {len(result.findings)} problem(s)", err=True)
        ctx.exit(FAILURE)


def audit_commands() -> list[click.Command]:
    """The commands billing.cli registers on its group."""
    return [trace, reconcile, report, verify]
