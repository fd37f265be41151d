"""`billing invoice-run` (a resumable run, its progress bar and closing summary, `--dry-run`,
`--workers`, `--join`) and `billing bench invoice-run`; thin: parse, call `billing.runs`, print."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from typing import Any

import click

from billing.cli_metrics import bench
from billing.money import money_str
from billing.periods import iso
from billing.persistence import Engine
from billing.records import invoice_json, movement_json
from billing.runs import RunSummary, run
from billing.scenario import InvoiceRunEvent
from billing.service import BookError, Outcome, ServiceError


def invoice_run_command(engine: Engine, db: str, *, as_of: datetime | None, dry_run: bool, workers: int,
                        join: int | None, batch: int, quiet: bool, as_json: bool, actor: str) -> None:
    from tqdm import tqdm

    from billing.persistence import UnitOfWork

    postgres = engine.dialect.name == "postgresql"
    if (workers > 1 or join is not None) and not postgres:
        raise ServiceError("SQLite has one writer: --workers and --join need PostgreSQL (see README, Scaling)")
    if join is not None:
        with UnitOfWork(engine) as uow:
            stored = uow.runs.get(join)
        if stored is None:
            raise ServiceError(f"run {join} not found")
        as_of = stored.as_of
    if as_of is None:
        raise click.UsageError("Missing option '--as-of' (or --join RUN_ID).")
    ev = InvoiceRunEvent(type="invoice_run", at=as_of)
    bar = tqdm(total=0, unit="customer", desc="invoice run", file=sys.stderr,
               disable=quiet or not sys.stderr.isatty(), leave=False)
    collected = Outcome() if as_json else None
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        if dry_run:
            summary = run(engine, ev, actor=actor, batch=batch, dry_run=True, collect=collected)
        else:
            if workers > 1 and join is None:
                from billing.runs import _plan

                join, _, _ = _plan(engine, ev, actor=actor, idempotency_key=None, index=None,
                                   clock=_now, join=None)
                command = [sys.executable, "-c", "from billing.cli import main; main()", "invoice-run",
                           "--join", str(join), "--batch", str(batch), "--quiet", "--db", db, "--actor", actor]
                helpers = [subprocess.Popen(command, stdout=subprocess.DEVNULL) for _ in range(workers - 1)]
            summary = run(engine, ev, actor=actor, batch=batch, progress=progress, collect=collected, join=join,
                          skip_locked=postgres)
            for helper in helpers:
                helper.wait()
            if helpers:
                summary = run(engine, ev, actor=actor, batch=batch, join=join, skip_locked=postgres)
    except BookError:
        raise
    finally:
        bar.close()
    if as_json:
        out: dict[str, Any] = {"as_of": iso(as_of), **summary.to_json()}
        assert collected is not None
        out["invoices"] = [invoice_json(i) for i in collected.issued]
        out["movements"] = [movement_json(m) for m in collected.movements]
        out["totals"] = _totals(summary)
        click.echo(json.dumps(out, indent=2, ensure_ascii=False, default=str))
        return
    click.echo(describe(summary))


def _now() -> datetime:
    from billing.persistence import utc_now

    return utc_now()


def _totals(summary: RunSummary) -> dict[str, dict[str, str]]:
    return {cur: {"invoices": str(summary.by_currency.get(cur, 0)), "total": money_str(summary.totals[cur], cur),
                  "credit_applied": money_str(summary.credit_applied.get(cur, 0), cur),
                  "amount_due": money_str(summary.amount_due.get(cur, 0), cur)}
            for cur in sorted(summary.totals)}


def describe(summary: RunSummary) -> str:
    what = "dry run (nothing written)" if summary.dry_run else f"run {summary.run_id} {summary.state}"
    lines = [f"invoice run as of {iso(summary.as_of)}: {what}; {summary.invoices} invoice(s) issued, "
             f"{summary.done} of {summary.customers} customer(s) billed, {len(summary.failed)} failed"
             f"{' (resumed)' if summary.resumed else ''} in {summary.seconds:.1f} s"]
    for cur, t in _totals(summary).items():
        lines.append(f"  {cur}: {t['invoices']} invoice(s), total {t['total']}, "
                     f"credit applied {t['credit_applied']}, amount due {t['amount_due']}")
    for customer, error in summary.failed:
        lines.append(f"  failed: {customer}: {error}")
    if summary.failed and not summary.dry_run:
        lines.append("  a new run at the same date retries the failed customers")
    return "\n".join(lines)


@bench.command("invoice-run")
@click.option("--subscriptions", "count", required=True, type=click.IntRange(min=1), help="Subscriptions in the book.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True, help="Customers per batch.")
@click.option("--seed", default=5, show_default=True, help="Seed of the synthetic book.")
@click.option("--db", "db", default=None, metavar="URL",
              help="An empty database to build the book in (kept); default: a temporary SQLite file.")
@click.option("--step", type=click.Choice(["all", "build", "run"]), default="all", show_default=True,
              help="build: only build the book in --db; run: only time the run of a book built so "
                   "(--subscriptions is then read from it).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_invoice_run(count: int, workers: int, batch: int, seed: int, db: str | None, step: str,
                      as_json: bool) -> None:
    """Build a realistic book of N subscriptions, run one month-end invoice run, and compare its
    rate with a plain bulk insert of the same invoice and line rows on the same database."""
    from billing.persistence import create_engine
    from billing.run_bench import bench as run_bench

    if workers > 1 and (db is None or create_engine(db).dialect.name != "postgresql"):
        raise click.UsageError("--workers needs a PostgreSQL --db (SQLite has one writer)")
    if step != "all" and db is None:
        raise click.UsageError(f"--step {step} needs --db (the book is kept there)")
    try:
        figures = run_bench(count, url=db, workers=workers, batch=batch, seed=seed, step=step)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json or step == "build":
        click.echo(json.dumps(figures))
        return
    click.echo(f"{figures['subscriptions']} subscriptions, {figures['customers']} customers on {figures['database']}, "
               f"{figures['workers']} worker(s): {figures['invoices']} invoices, {figures['invoice_lines']} lines "
               f"in {figures['seconds']} s")
    click.echo(f"  {figures['subscriptions_per_second']} subscriptions/s, {figures['invoices_per_second']} invoices/s, "
               f"{figures['rows_per_second']} rows/s = {figures['fraction_of_baseline']} of a plain bulk insert "
               f"({figures['baseline_rows_per_second']} rows/s)")
    click.echo(f"  peak RSS {figures['peak_rss_mb']} MB (build {figures['build_seconds']} s)")
    server = figures["server_cpu_seconds"]
    click.echo(f"  CPU: workers {figures['worker_cpu_seconds']} s"
               + ("" if server is None else f", server backends {server} s")
               + ("" if figures["cores_busy"] is None else f" ({figures['cores_busy']} cores busy)"))
