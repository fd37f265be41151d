"""The expansion metric commands: `billing metrics`, `billing cohorts`, `billing export movements`
and `billing bench metrics` (registered on the `billing` group at the end of billing/cli.py).

Thin like the rest of the command line: parse, call `expansion.ledger` / `expansion.cohorts` /
`expansion.accounts` / `expansion.bench`, print. Errors surface through the `billing` group as
one line on stderr (bad options and an empty ledger exit 2, database failures 1).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import click

from billing.cli_options import db_option
from billing.persistence import Engine

FORMULA_CELL = ("=", "+", "-", "@", "\t", "\r")
F = TypeVar("F", bound=Callable[..., Any])


def _format_option(choices: Sequence[str]) -> Callable[[F], F]:
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0], show_default=True)


def _engine(ctx: click.Context, db: str) -> Engine:
    from billing.cli import _open

    return _open(ctx, db)


def _checked(kind: str, value: str | None) -> str | None:
    """A --from/--to label, checked before the database is touched."""
    from expansion.sqlkit import parse_period

    if value is not None:
        try:
            parse_period(kind, value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _ledger_errors(exc: Exception) -> Exception:
    from billing.service import ServiceError

    return ServiceError(str(exc)) if isinstance(exc, (LookupError, ValueError)) else exc


def escape_cell(value: object) -> str:
    """A CSV cell that a spreadsheet will not run as a formula: text beginning with = + - @ (or a
    tab or carriage return) gets a leading single quote (OWASP's CSV injection advice)."""
    text = "" if value is None else str(value)
    return f"'{text}" if text.startswith(FORMULA_CELL) else text


def _write_csv(out: TextIO, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([escape_cell(h) for h in header])
    for row in rows:
        writer.writerow([escape_cell(cell) for cell in row])


# --- billing metrics --------------------------------------------------------------------------

BRIDGE = [("starting_mrr", "STARTING"), ("new", "NEW"), ("expansion", "EXPANSION"), ("contraction", "CONTRACTION"),
          ("churn", "CHURN"), ("reactivation", "REACTIVATION"), ("transfer_in", "TRANSFER IN"),
          ("transfer_out", "TRANSFER OUT"), ("fx_impact", "FX"), ("ending_mrr", "ENDING")]
RATES = [("expansion_accounts", "EXP ACCTS"), ("arpea", "ARPEA"), ("expansion_growth_rate", "EXP GROWTH %"),
         ("nrr", "NRR %"), ("grr", "GRR % (snapshots)"), ("grr_event_sum", "GRR % (event sum)"),
         ("arpa", "ARPA"), ("quick_ratio", "QUICK"), ("arr", "ARR"), ("expansion_arr", "EXP ARR"),
         ("expansion_share", "EXP SHARE %"), ("expansion_activation_rate", "ACTIVATION %"),
         ("rolling_quarter_expansion_arr", "RQ EXP ARR"), ("rolling_quarter_new_logo_arr", "RQ NEW ARR"),
         ("rolling_quarter_expansion_vs_new_logo", "RQ EXP/NEW"), ("ttm_nrr", "TTM NRR %"),
         ("ttm_grr", "TTM GRR %")]


def _flat(row: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            out[key] = value
    return out


@click.command("metrics")
@click.option("--period", type=click.Choice(["month", "quarter", "year"]), default="month", show_default=True)
@click.option("--from", "first", default=None, metavar="PERIOD", help="First period (2026-01, 2026-Q1 or 2026).")
@click.option("--to", "last", default=None, metavar="PERIOD", help="Last period (default: the ledger's last).")
@click.option("--by", default=None, metavar="SEGMENT",
              help="Split by plan, product, subtype, currency, cohort or tag:KEY.")
@click.option("--days", default=90, show_default=True, type=click.IntRange(min=0),
              help="Window for contraction after expansion and for recent seat growth.")
@_format_option(["table", "json", "csv"])
@db_option
@click.pass_context
def metrics(ctx: click.Context, period: str, first: str | None, last: str | None, by: str | None, days: int,
            fmt: str, db: str) -> None:
    """The expansion metric set for a range of months, quarters or years, computed in SQL.

    JSON and table also show time to first expansion, contraction after expansion and the
    expansion-readiness list for the same range."""
    from billing.cli import _dump, _table
    from expansion.accounts import contraction_after_expansion, expansion_readiness, time_to_first_expansion
    from expansion.ledger import metric_set
    from expansion.sqlkit import parse_period, parse_segmentation, period_label

    try:
        parse_segmentation(by)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--by") from None
    _checked(period, first)
    _checked(period, last)
    engine = _engine(ctx, db)
    try:
        result = metric_set(engine, period=period, first=first, last=last, by=by)
    except (LookupError, ValueError) as exc:
        raise _ledger_errors(exc) from None
    if fmt == "csv":
        rows = [_flat(row) for row in result.rows]
        header = list(rows[0]) if rows else []
        _write_csv(sys.stdout, header, ([row.get(h) for h in header] for row in rows))
        return
    k = {"month": 1, "quarter": 3, "year": 12}[period]
    months = (period_label("month", parse_period(period, result.first) * k),
              period_label("month", (parse_period(period, result.last) + 1) * k - 1))
    first_expansion = time_to_first_expansion(engine, first=months[0], last=months[1])
    after = contraction_after_expansion(engine, first=months[0], last=months[1], days=days)
    ready = expansion_readiness(engine, days=days)
    if fmt == "json":
        click.echo(_dump({**result.to_json(), "time_to_first_expansion": first_expansion.to_json(),
                          "contraction_after_expansion": after.to_json(), "expansion_readiness": ready}))
        return
    lead = [("segment", "SEGMENT")] if result.by else []
    cur = result.reporting_currency
    click.echo(f"MRR bridge ({cur}), {result.period}s {result.first} to {result.last}"
               + (f", by {result.by}" if result.by else ""))
    for columns in (BRIDGE, RATES):
        picked = [*lead, ("period", "PERIOD"), *columns]
        click.echo(_table([["" if row.get(k) is None else str(row.get(k)) for k, _ in picked] for row in result.rows],
                          [h for _, h in picked]))
        click.echo("")
    covered = (f"{first_expansion.covers} of {first_expansion.accounts} new account(s) expanded; "
               f"median {first_expansion.median_days} days, mean {first_expansion.mean_days} days"
               if first_expansion.covers else f"none of {first_expansion.accounts} new account(s) expanded yet")
    click.echo(f"time to first expansion: {covered}")
    click.echo(f"contraction after expansion ({days} days): {after.accounts_contracting} of "
               f"{after.expanding_accounts} expanding account(s) ({after.account_share or '-'} %), "
               f"{after.expansion_mrr_contracting} of {after.expansion_mrr} {cur} expansion MRR "
               f"({after.mrr_share or '-'} %)")
    if ready:
        click.echo(f"\nexpansion readiness ({len(ready)} subscription(s)):")
        click.echo(_table([[r["customer"], r["subscription"], r["plan"], str(r["quantity"]),
                            "" if r["tier_up_to"] is None else str(r["tier_up_to"]), r["saturation"] or "",
                            r["seat_expansion_mrr"] or "", r.get("seat_saturation") or "",
                            ", ".join(r["signals"])] for r in ready[:50]],
                          ["CUSTOMER", "SUBSCRIPTION", "PLAN", "SEATS", "TIER UP TO", "SATURATION %",
                           "SEAT GROWTH MRR", "SEATS USED %", "SIGNALS"]))


# --- billing cohorts --------------------------------------------------------------------------


@click.command("cohorts")
@click.option("--from", "first", default=None, metavar="MONTH", help="First signup month (2026-01).")
@click.option("--to", "last", default=None, metavar="MONTH", help="Last signup month.")
@_format_option(["table", "json", "csv"])
@db_option
@click.pass_context
def cohorts(ctx: click.Context, first: str | None, last: str | None, fmt: str, db: str) -> None:
    """Net and gross MRR retention (%) by signup month × months since signup."""
    from billing.cli import _dump, _table
    from expansion.cohorts import cohort_table

    _checked("month", first)
    _checked("month", last)
    try:
        table = cohort_table(_engine(ctx, db), first=first, last=last)
    except (LookupError, ValueError) as exc:
        raise _ledger_errors(exc) from None
    if fmt == "json":
        click.echo(_dump(table.to_json()))
        return
    width = max((len(c.net) for c in table.cohorts), default=0)
    months = [f"M{k}" for k in range(width)]
    if fmt == "csv":
        _write_csv(sys.stdout, ["cohort", "customers", "mrr", "retention", *months], (
            [c.cohort, c.customers, c.mrr, kind, *values]
            for c in table.cohorts for kind, values in (("net", c.net), ("gross", c.gross))))
        return
    for kind in ("net", "gross"):
        click.echo(f"{kind} MRR retention (%) by signup month, to {table.last} ({table.reporting_currency})")
        click.echo(_table([[c.cohort, str(c.customers), c.mrr,
                            *[v or "" for v in getattr(c, kind)], *[""] * (width - len(c.net))]
                           for c in table.cohorts], ["COHORT", "CUSTOMERS", "MRR", *months]))
        click.echo("")


# --- billing export movements -----------------------------------------------------------------

EXPORT_COLUMNS = ["id", "at", "customer", "subscription", "type", "subtype", "entry", "reverses", "currency",
                  "mrr_before", "mrr_after", "delta", "reporting_currency", "reporting_delta", "cause", "command",
                  "invoices", "invoice_lines"]


@click.group("export")
def export() -> None:
    """Export the ledger."""


@export.command("movements")
@_format_option(["csv"])
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default="-",
              help="Write to this file instead of standard output.")
@db_option
@click.pass_context
def export_movements(ctx: click.Context, fmt: str, output: str, db: str) -> None:
    """Every ledger entry as one CSV row, with the invoices and invoice lines that billed it.

    Cells that begin with = + - @ are prefixed with a single quote so a spreadsheet never runs
    them as formulas (negative amounts therefore read '-70.00)."""
    from expansion.export import movement_rows

    engine = _engine(ctx, db)
    if output == "-":
        _write_csv(sys.stdout, EXPORT_COLUMNS, movement_rows(engine))
        return
    with Path(output).open("w", encoding="utf-8", newline="") as out:
        _write_csv(out, EXPORT_COLUMNS, movement_rows(engine))


# --- billing bench metrics --------------------------------------------------------------------


@click.group("bench")
def bench() -> None:
    """Benchmarks."""


@bench.command("metrics")
@click.option("--movements", "count", required=True, type=click.IntRange(min=1), help="Movements to generate.")
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic ledger.")
@click.option("--db", "db", default=None, metavar="URL",
              help="An empty database to build the ledger in (kept); default: a temporary SQLite file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_metrics(count: int, seed: int, db: str | None, as_json: bool) -> None:
    """Build a synthetic ledger of N movements (5 years, many customers), then time the full
    monthly metric set, the cohort table and one metric trace, and report peak memory."""
    from expansion.bench import run

    if db is not None:
        figures = run(db, count, seed=seed)
    else:
        with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp:
            figures = run(f"sqlite:///{Path(tmp) / 'bench.sqlite'}", count, seed=seed)
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f"{figures['movements']} movements, {figures['customers']} customers on {figures['database']} "
               f"(generated in {figures['generate_seconds']} s, loaded in {figures['load_seconds']} s)")
    for key, label in (("metrics_seconds", "full monthly metric set"), ("cohorts_seconds", "cohort table"),
                       ("trace_seconds", "one metric trace")):
        click.echo(f"  {label:<24} {figures[key]:>8.3f} s")
    click.echo(f"  peak RSS {figures['peak_rss_mb']} MB (building the ledger: {figures['build_peak_rss_mb']} MB)")


def metrics_commands() -> list[click.Command]:
    """The commands this module adds to the `billing` group."""
    return [metrics, cohorts, export, bench]
