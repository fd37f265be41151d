"""The metered-usage commands: `billing usage ingest FILE`, `billing usage show SUBSCRIPTION`,
`billing usage saturation` and `billing bench usage` (registered on the `billing` group at the
end of billing/cli.py). Thin: parse, call `billing.metering` / `billing.usage_bench`, print."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import click

from billing.cli_options import db_option

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_grace(text: str) -> timedelta | None:
    """`none` (no limit), or a number with a unit: `90s`, `30m`, `6h`, `3d`."""
    value = text.strip().lower()
    if value == "none":
        return None
    if len(value) < 2 or value[-1] not in _UNITS or not value[:-1].isdigit():
        raise click.BadParameter(f"{text!r}: give a number with s, m, h or d (e.g. 1d), or none")
    return timedelta(seconds=int(value[:-1]) * _UNITS[value[-1]])


def _service_error(exc: Exception) -> Exception:
    from billing.service import ServiceError

    return ServiceError(str(exc.args[0]) if exc.args else str(exc))


@click.group("usage")
def usage() -> None:
    """Metered usage: ingest events, show current usage, seat saturation."""


@usage.command("ingest")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "csv"]), default="auto", show_default=True,
              help="Input format; auto: csv for a .csv file, otherwise JSON lines.")
@click.option("--grace", default="1d", show_default=True, metavar="DURATION",
              help="How long after a usage period ends its late events are still accepted (until it "
                   "is invoiced): 90s, 30m, 6h, 3d, or none for no limit.")
@click.option("--rejects", "rejects_path", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              show_default=True, help="Where the rejected lines' report goes (- for stderr).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("--actor", envvar="BILLING_ACTOR", default="cli", show_default=True,
              help="Who is ingesting, recorded in the audit log with the time and the file (env BILLING_ACTOR).")
@db_option
@click.pass_context
def ingest_command(ctx: click.Context, file: str, fmt: str, grace: str, rejects_path: str, no_progress: bool,
                   as_json: bool, actor: str, db: str) -> None:
    """Ingest usage events from FILE (JSON lines or CSV; - for stdin). Bad lines are reported
    with their line number and reason, good ones kept; repeated ids are counted as duplicates."""
    from tqdm import tqdm

    from billing.cli import _open
    from billing.metering import IngestError, Rejection, ingest, open_reader

    grace_period = parse_grace(grace)
    engine = _open(ctx, db)
    kind = fmt if fmt != "auto" else ("csv" if file.lower().endswith(".csv") else "jsonl")
    stream: IO[bytes] = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115 - closed below
    report: IO[str] = sys.stderr if rejects_path == "-" else open(rejects_path, "w", encoding="utf-8")  # noqa: SIM115
    total = None if file == "-" else os.fstat(stream.fileno()).st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="ingest", disable=no_progress or None,
               file=sys.stderr, leave=False)
    position = [0]

    def progress(_rows: int) -> None:
        if total is not None:
            now = stream.tell() if stream.seekable() else position[0]
            bar.update(now - position[0])
            position[0] = now

    def on_reject(rejection: Rejection) -> None:
        report.write(f"{file}: {rejection}\n")

    try:
        summary = ingest(engine, open_reader(stream, kind), grace=grace_period, on_reject=on_reject,
                         progress=progress, actor=actor, source="stdin" if file == "-" else file)
    except IngestError as exc:
        raise _service_error(exc) from None
    finally:
        bar.close()
        if stream is not sys.stdin.buffer:
            stream.close()
        if report is not sys.stderr:
            report.close()
    if as_json:
        data = summary.to_json()
        data.pop("rejections")
        click.echo(json.dumps(data))
    else:
        click.echo(f"{summary.accepted} accepted, {summary.duplicated} duplicated, {summary.rejected} rejected")
    if summary.rejected:
        ctx.exit(1)


@usage.command("show")
@click.argument("subscription")
@click.option("--at", "at", default=None, metavar="TIME", help="Usage up to this time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
@click.pass_context
def show(ctx: click.Context, subscription: str, at: str | None, as_json: bool, db: str) -> None:
    """Period-to-date usage of SUBSCRIPTION per metric and the amount it would bill now."""
    from billing.cli import _open
    from billing.metering import IngestError, current_usage

    as_of = _instant(at)
    engine = _open(ctx, db)
    try:
        rows = current_usage(engine, subscription, as_of=as_of)
    except (IngestError, KeyError) as exc:
        raise _service_error(exc) from None
    if as_json:
        click.echo(json.dumps({"subscription": subscription, "metrics": [r.to_json() for r in rows]}, indent=2))
        return
    if not rows:
        click.echo(f"{subscription}: no open usage period")
        return
    click.echo(f"{subscription}: period {rows[0].period_start.isoformat()} – {rows[0].period_end.isoformat()}")
    for r in rows:
        tier = "" if r.next_tier_at is None else f", next tier at {r.next_tier_at}"
        click.echo(f"  {r.metric:<20} {r.aggregation:<13} quantity {r.quantity} ({r.included} included) "
                   f"→ {r.amount} {r.currency}{tier}")


@usage.command("saturation")
@click.option("--at", "at", default=None, metavar="TIME", help="Active seats up to this time (default: now).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@db_option
@click.pass_context
def saturation(ctx: click.Context, at: str | None, as_json: bool, db: str) -> None:
    """Active seats ÷ purchased seats per subscription (metrics declared active_seats)."""
    from billing.cli import _open
    from billing.metering import seat_saturation

    engine = _open(ctx, db)
    rows = seat_saturation(engine, as_of=_instant(at))
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows], indent=2))
        return
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio * 100:.2f} %"
        click.echo(f"{r.customer:<16} {r.subscription:<16} {r.metric:<16} {r.active} / {r.purchased} = {ratio}")


def _instant(text: str | None) -> datetime | None:
    if text is None:
        return None
    from billing.scenario import parse_instant

    try:
        return parse_instant(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("usage")
@click.option("--events", "count", required=True, type=click.IntRange(min=1), help="Events to generate.")
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic events.")
@click.option("--subscriptions", default=200, show_default=True, type=click.IntRange(min=1),
              help="Subscriptions the events are spread over.")
@click.option("--db", "db", default=None, metavar="URL",
              help="An empty database to run in (kept); default: a temporary SQLite file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_usage(count: int, seed: int, subscriptions: int, db: str | None, as_json: bool) -> None:
    """Ingest N synthetic events (1 % duplicates), aggregate and rate one period for every
    subscription; compare with a plain bulk insert of the same rows on the same database."""
    from billing.usage_bench import run

    def go(url: str) -> dict[str, Any]:
        return run(url, count, seed=seed, subscriptions=subscriptions)

    if db is not None:
        figures = go(db)
    else:
        with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp:
            figures = go(f"sqlite:///{Path(tmp) / 'bench.sqlite'}")
    if as_json:
        click.echo(json.dumps(figures))
        return
    click.echo(f"{figures['events']} events over {figures['subscriptions']} subscriptions on {figures['database']}")
    click.echo(f"  ingested        {figures['events_per_second']:>10} events/s  ({figures['ingest_seconds']} s; "
               f"{figures['accepted']} accepted, {figures['duplicates']} duplicates, {figures['rejected']} rejected)")
    click.echo(f"  plain insert    {figures['baseline_rows_per_second']:>10} rows/s    "
               f"({figures['baseline_seconds']} s, no index, no checks)")
    click.echo(f"  fraction of the plain insert rate: {figures['fraction_of_baseline']}")
    click.echo(f"  aggregate + rate one period: {figures['aggregate_seconds']} s "
               f"({figures['aggregates']} subscription × metric aggregates, {figures['billed_total']} USD)")
    click.echo(f"  peak RSS {figures['peak_rss_mb']} MB")


def usage_commands() -> list[click.Command]:
    """The commands this module adds to the `billing` group (and `bench usage` to `bench`)."""
    from billing.cli_metrics import bench

    bench.add_command(bench_usage)
    return [usage]
