"""The `billing` command line: parse, call a service, print.

Every command takes `--db URL` (env `BILLING_DATABASE_URL`, default `sqlite:///billing.sqlite`),
except `replay`, which uses a temporary database unless `--db` is given. An error is one line on
stderr and a non-zero exit, never a traceback: 2 for bad input or usage (a malformed file, a
rule the book refuses, an unknown invoice), 1 for a failed `--check` and for database or
environment failures. `BILLING_DEBUG=1` re-raises unexpected errors with their traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError

from billing import service
from billing.catalog import Catalog
from billing.cli_options import db_option
from billing.money import MoneyError, money_str
from billing.periods import iso
from billing.persistence import (
    ConcurrentModification,
    DatabaseError,
    Engine,
    PersistenceError,
    create_engine,
    describe_error,
    display_url,
    sqlite_file,
)
from billing.records import (
    CREDIT_NOTE_REASONS,
    CreditNote,
    Invoice,
    MrrMovement,
    credit_note_json,
    invoice_json,
    movement_json,
)
from billing.scenario import (
    ScenarioError,
    Settings,
    describe_validation_error,
    parse_instant,
    parse_scenario_text,
)
from billing.service import BookError, Outcome, ServiceError

BAD_INPUT = 2
FAILURE = 1


class InputError(ValueError):
    """A file or argument the command cannot use."""


class Failure:
    """An error as the user sees it: one line on stderr and an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        self.message = one_line(message)
        self.exit_code = exit_code

    def show(self) -> None:
        click.echo(f"billing: error: {self.message}", err=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def _failure(exc: BaseException) -> Failure:
    """Map an exception to the one-line message and exit code the user sees."""
    if isinstance(exc, ValidationError):
        return Failure(describe_validation_error(exc), BAD_INPUT)
    if isinstance(exc, ConcurrentModification):
        return Failure(f"{exc} (another command changed the book meanwhile)", FAILURE)
    if isinstance(exc, (ScenarioError, BookError, ServiceError, MoneyError, InputError)):
        return Failure(str(exc), BAD_INPUT)
    if isinstance(exc, DatabaseError):
        return Failure(f"database error: {describe_error(exc)}", FAILURE)
    if isinstance(exc, PersistenceError):
        return Failure(str(exc), FAILURE)
    if isinstance(exc, OSError):
        return Failure(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", FAILURE)
    return Failure(f"internal error: {type(exc).__name__}: {exc}", FAILURE)


class BillingGroup(click.Group):
    """The top-level group: runs click without its own error handling and turns every error
    into one line on stderr and an exit code."""

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"billing: error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("billing: aborted", err=True)
            sys.exit(FAILURE)
        except BrokenPipeError:
            sys.exit(FAILURE)
        except Exception as exc:  # noqa: BLE001 - the one place errors become messages
            if os.environ.get("BILLING_DEBUG"):
                raise
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                sys.exit(FAILURE)
            failure = _failure(exc)
            failure.show()
            sys.exit(failure.exit_code)
        sys.exit(result if isinstance(result, int) else 0)


# --- shared options and helpers ---------------------------------------------------------------

actor_option = click.option(
    "--actor",
    envvar="BILLING_ACTOR",
    default="cli",
    show_default=True,
    help="Who is acting, recorded with each command (env BILLING_ACTOR).",
)


def _instant_option(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """Parse an ISO 8601 instant with an offset, or a date meaning midnight UTC."""
    if value is None:
        return None
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


def _read_text(path: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from None


def _read_json(path: str) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _open(ctx: click.Context, db: str) -> Engine:
    """An engine on an initialised database (disposed when the command ends)."""
    path = sqlite_file(db)
    if path is not None and not path.exists():
        raise ServiceError(f"no database at {path}; run `billing init --db {db}` first")
    engine = create_engine(db)
    ctx.call_on_close(engine.dispose)
    service.check_schema(engine)
    return engine


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _amount(value: Decimal, currency: str) -> str:
    return f"{money_str(value, currency)} {currency}"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------


@click.group(cls=BillingGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Subscription billing: catalog, subscriptions, invoices and MRR movements."""


@cli.command()
@db_option
def init(db: str) -> None:
    """Create the database schema, or migrate it to this version."""
    path = sqlite_file(db)
    if path is not None and not path.parent.exists():
        raise InputError(f"directory {path.parent} does not exist")
    revision = service.init_database(db)
    click.echo(f"database ready: {display_url(db)} (schema revision {revision})")


@cli.group()
def catalog() -> None:
    """Manage the catalog of plans, add-ons and metrics."""


def _catalog_file(raw: Any, path: str) -> tuple[Catalog, Settings | None]:
    """A catalog file is a bare catalog {plans, addons, metrics} or {"settings", "catalog"}."""
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a catalog file must be a JSON object")
    if "catalog" in raw or "settings" in raw:
        unknown = sorted(set(raw) - {"catalog", "settings"})
        if unknown:
            raise InputError(f"{path}: {unknown[0]}: unknown field (expected settings and catalog)")
        try:
            settings = Settings.model_validate(raw["settings"]) if "settings" in raw else None
        except ValidationError as exc:
            raise InputError(f"{path}: settings.{describe_validation_error(exc)}") from None
        body = raw.get("catalog", {})
        prefix = "catalog."
    else:
        settings, body, prefix = None, raw, ""
    try:
        return Catalog.model_validate(body), settings
    except ValidationError as exc:
        raise InputError(f"{path}: {prefix}{describe_validation_error(exc)}") from None


@catalog.command("load")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@db_option
@actor_option
@click.pass_context
def catalog_load(ctx: click.Context, file: str, db: str, actor: str) -> None:
    """Load a catalog from FILE (a bare catalog or {"settings": ..., "catalog": ...}); a load that
    changes something is recorded in the audit log with the actor."""
    new_catalog, settings = _catalog_file(_read_json(file), file)
    engine = _open(ctx, db)
    result = service.load_catalog(engine, new_catalog, settings, actor=actor)
    click.echo(
        f"catalog {result}: {len(new_catalog.plans)} plan(s), {len(new_catalog.addons)} add-on(s), "
        f"{len(new_catalog.metrics)} metric(s)"
    )


def _summary(index: int, event: Any, applied: service.Applied) -> str:
    subject = next(
        (str(getattr(event, name)) for name in ("subscription", "customer", "invoice") if getattr(event, name, None)),
        "",
    )
    head = f"events[{index}] {event.type}{f' {subject}' if subject else ''} at {iso(event.at)}"
    if applied.duplicate:
        return f"{head}: already applied (command #{applied.command_id})"
    out = applied.outcome
    parts = []
    if out.issued:
        parts.append("issued " + ", ".join(f"{i.number} ({_amount(i.total, i.currency)})" for i in out.issued))
    parts.extend(f"{number} {status}" for number, status in out.status_changes)
    parts.extend(f"credit note {n.number} for {n.invoice} ({_amount(n.total, n.currency)})"
                 for n in out.credit_notes)
    for m in out.movements:
        kind = f"{m.type}/{m.subtype}" if m.subtype else m.type
        parts.append(f"{kind} {m.customer} {money_str(m.delta, m.currency)} {m.currency}")
    return f"{head}: {'; '.join(parts) if parts else 'ok'}"


@cli.command("apply")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--until", "until", default=None, metavar="DATE", callback=_instant_option,
              help="Apply only the events before this time (the rest on a later call).")
@db_option
@actor_option
@click.pass_context
def apply_file(ctx: click.Context, file: str, until: datetime | None, db: str, actor: str) -> None:
    """Apply the events of a scenario-format FILE, each in its own transaction.

    The file's catalog and settings are loaded first when the database has none. Re-running
    the same file skips the events already applied (each event's idempotency key is derived
    from the file's content and the event's position), so a book can be applied in slices
    with `--until`, between invoice runs.
    """
    text = _read_text(file)
    try:
        raw = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as exc:
        raise InputError(f"{file}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    scenario = parse_scenario_text(text)
    engine = _open(ctx, db)
    existing = service.book_config(engine)
    has_catalog = isinstance(raw, dict) and "catalog" in raw
    if existing is None:
        if not has_catalog:
            raise ServiceError(f"no catalog in the database and none in {file}; run `billing catalog load` first")
        service.load_catalog(engine, scenario.catalog, scenario.settings, actor=actor)
        click.echo(f"loaded the catalog and settings of {file}")
    elif has_catalog and (existing[1] != scenario.catalog or existing[0] != scenario.settings):
        click.echo(f"note: the database already has a catalog; the one in {file} is not loaded", err=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    for index, event in enumerate(scenario.events):
        if until is not None and event.at >= until:
            break
        applied = service.execute(
            engine, event, actor=actor, idempotency_key=f"apply:{digest}:{index}", index=index
        )
        click.echo(_summary(index, event, applied))


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--json", "as_json", is_flag=True, help="Print invoices, movements and metrics as JSON.")
@click.option("--check", "check", is_flag=True, help="Compare the output with the file's expect block.")
@click.option(
    "--db",
    "db",
    default=None,
    metavar="URL",
    help="Replay into this (empty) database and keep it; default: a temporary SQLite file.",
)
@click.pass_context
def replay(ctx: click.Context, file: str, as_json: bool, check: bool, db: str | None) -> None:
    """Replay a scenario FILE on a fresh database (SCENARIOS.md)."""
    scenario = parse_scenario_text(_read_text(file))
    if check and scenario.expect is None:
        raise InputError(f"{file} has no expect block to check")
    result, output, report = service.replay_and_check(scenario, db)
    if as_json:
        click.echo(_dump(output))
    if check:
        for difference in report.differences:
            click.echo(difference, err=as_json)
        if report.differences:
            click.echo(f"{len(report.differences)} difference(s) in {report.checks} checks", err=True)
            ctx.exit(FAILURE)
        click.echo(f"ok: {report.checks} checks", err=as_json)
    if not as_json and not check:
        click.echo(f"{scenario.name or file}: {len(result.invoices)} invoice(s), "
                   f"{len(result.movements)} movement(s)")
        if result.invoices:
            click.echo(_invoice_table(result.invoices))
        if result.movements:
            click.echo(_movement_table(result.movements))
        if result.credit_notes:
            click.echo(_credit_note_table(result.credit_notes))


@cli.command("invoice-run")
@click.option("--as-of", "as_of", default=None, metavar="DATE", callback=_instant_option,
              help="Bill everything due at this time (ISO 8601 instant or date = midnight UTC).")
@click.option("--dry-run", is_flag=True, help="Print what would be billed; write nothing.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes (PostgreSQL; SQLite has one writer).")
@click.option("--join", "join", type=int, default=None, metavar="RUN_ID",
              help="Work on an unfinished run started elsewhere (PostgreSQL).")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True,
              help="Customers per transaction.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's summary, invoices and movements as JSON.")
@db_option
@actor_option
@click.pass_context
def invoice_run(ctx: click.Context, as_of: datetime | None, dry_run: bool, workers: int, join: int | None,
                batch: int, quiet: bool, as_json: bool, db: str, actor: str) -> None:
    """Issue every invoice due at --as-of as one resumable run (running it again finishes what a
    killed run left and otherwise issues nothing new)."""
    from billing.cli_runs import invoice_run_command

    invoice_run_command(_open(ctx, db), db, as_of=as_of, dry_run=dry_run, workers=workers, join=join,
                        batch=batch, quiet=quiet, as_json=as_json, actor=actor)


def _totals(invoices: list[Invoice]) -> dict[str, dict[str, str]]:
    sums: dict[str, dict[str, Decimal]] = {}
    for inv in invoices:
        entry = sums.setdefault(inv.currency, {"invoices": Decimal(0), "total": Decimal(0),
                                               "credit_applied": Decimal(0), "amount_due": Decimal(0)})
        entry["invoices"] += 1
        entry["total"] += inv.total
        entry["credit_applied"] += inv.credit_applied
        entry["amount_due"] += inv.amount_due
    return {
        cur: {
            "invoices": str(int(v["invoices"])),
            "total": money_str(v["total"], cur),
            "credit_applied": money_str(v["credit_applied"], cur),
            "amount_due": money_str(v["amount_due"], cur),
        }
        for cur, v in sorted(sums.items())
    }


def _run_summary(as_of: datetime, outcome: Outcome, totals: dict[str, dict[str, str]]) -> str:
    lines = [f"invoice run as of {iso(as_of)}: {len(outcome.issued)} invoice(s) issued, "
             f"{len(outcome.movements)} MRR movement(s)"]
    for cur, t in totals.items():
        lines.append(f"  {cur}: {t['invoices']} invoice(s), total {t['total']}, "
                     f"credit applied {t['credit_applied']}, amount due {t['amount_due']}")
    return "\n".join(lines)


@cli.group()
def invoices() -> None:
    """List and show issued invoices."""


def _invoice_table(rows: list[Invoice]) -> str:
    return _table(
        [[i.number, i.customer, i.status, iso(i.issued_at), i.billing_date, _amount(i.total, i.currency),
          _amount(i.amount_due, i.currency)] for i in rows],
        ["NUMBER", "CUSTOMER", "STATUS", "ISSUED", "BILLS", "TOTAL", "DUE"],
    )


@invoices.command("list")
@click.option("--customer", default=None, help="Only this customer's invoices.")
@click.option("--status", type=click.Choice(["finalized", "paid", "void"]), default=None)
@click.option("--json", "as_json", is_flag=True)
@db_option
@click.pass_context
def invoices_list(ctx: click.Context, customer: str | None, status: str | None, as_json: bool, db: str) -> None:
    """Invoices in the order issued."""
    rows = service.list_invoices(_open(ctx, db), customer=customer, status=status)
    if as_json:
        click.echo(_dump([invoice_json(i) for i in rows]))
    elif rows:
        click.echo(_invoice_table(rows))
    else:
        click.echo("no invoices")


@invoices.command("show")
@click.argument("number")
@click.option("--format", "fmt", type=click.Choice(["text", "html", "json"]), default="text", show_default=True)
@click.option("--locale", default=None, help="Locale for amounts and dates (default: the customer's).")
@db_option
@click.pass_context
def invoices_show(ctx: click.Context, number: str, fmt: str, locale: str | None, db: str) -> None:
    """Show invoice NUMBER as text, HTML or JSON."""
    engine = _open(ctx, db)
    invoice = service.get_invoice(engine, number)
    if fmt == "json":
        click.echo(_dump(invoice_json(invoice)))
        return
    from billing.render import invoice_html, invoice_text

    try:
        customer = service.get_customer(engine, invoice.customer)
        cust_locale, tz = customer.locale, customer.timezone
    except service.NotFound:
        cust_locale, tz = "en_US", "UTC"
    chosen = locale or cust_locale
    text = invoice_html(invoice, chosen, tz=tz) if fmt == "html" else invoice_text(invoice, chosen, tz=tz)
    click.echo(text.rstrip("\n"))


@cli.group()
def movements() -> None:
    """List MRR movements."""


def _movement_table(rows: list[MrrMovement]) -> str:
    return _table(
        [[str(m.id), iso(m.at), m.customer, m.subscription or "", m.type, m.subtype or "",
          _amount(m.delta, m.currency), _amount(m.mrr_after, m.currency),
          ", ".join(f"{r.invoice}#{r.line}" for r in m.invoice_lines)] for m in rows],
        ["ID", "AT", "CUSTOMER", "SUBSCRIPTION", "TYPE", "SUBTYPE", "DELTA", "MRR AFTER", "LINES"],
    )


@movements.command("list")
@click.option("--customer", default=None, help="Only this customer's movements.")
@click.option("--json", "as_json", is_flag=True)
@db_option
@click.pass_context
def movements_list(ctx: click.Context, customer: str | None, as_json: bool, db: str) -> None:
    """MRR movements in the order they happened."""
    rows = service.list_movements(_open(ctx, db), customer=customer)
    if as_json:
        click.echo(_dump([movement_json(m) for m in rows]))
    elif rows:
        click.echo(_movement_table(rows))
    else:
        click.echo("no movements")


def _credit_line(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[dict[str, str | int]]:
    """`--line N` (all that is left of invoice line N) or `--line N=AMOUNT` (before tax)."""
    lines: list[dict[str, str | int]] = []
    for value in values:
        index, sep, amount = value.partition("=")
        if not index.strip().isdigit() or (sep and not amount.strip()):
            raise click.BadParameter(f"{value!r}: expected N or N=AMOUNT, e.g. 0 or 1=12.50", ctx=ctx, param=param)
        line: dict[str, str | int] = {"line": int(index)}
        if sep:
            line["amount"] = amount.strip()
        lines.append(line)
    return lines


def _credit_note_text(note: CreditNote) -> str:
    cur = note.currency
    head = (f"CREDIT NOTE {note.number} for {note.invoice} ({note.customer}), issued {iso(note.issued_at)}, "
            f"reason: {note.reason}")
    table = _table(
        [[str(line.invoice_line), line.kind, line.description, money_str(line.amount, cur)] for line in note.lines],
        ["LINE", "KIND", "DESCRIPTION", "CREDITED"],
    )
    totals = "\n".join(f"{label:<9}{_amount(value, cur)}" for label, value in
                       (("subtotal", note.subtotal), ("tax", note.tax), ("total", note.total)))
    return f"{head}\n{table}\n{totals}\n{_amount(note.total, cur)} added to {note.customer}'s credit balance"


def _credit_note_table(rows: list[CreditNote]) -> str:
    return _table(
        [[n.number, n.invoice, n.customer, iso(n.issued_at), n.reason, _amount(n.subtotal, n.currency),
          _amount(n.tax, n.currency), _amount(n.total, n.currency)] for n in rows],
        ["NUMBER", "INVOICE", "CUSTOMER", "ISSUED", "REASON", "SUBTOTAL", "TAX", "TOTAL"],
    )


@cli.command("credit-note")
@click.argument("invoice")
@click.option("--line", "lines", multiple=True, required=True, metavar="N[=AMOUNT]", callback=_credit_line,
              help="Invoice line N to credit, all that is left of it or AMOUNT before tax; repeatable.")
@click.option("--reason", required=True, type=click.Choice(CREDIT_NOTE_REASONS))
@click.option("--at", "at", default=None, metavar="DATE", callback=_instant_option,
              help="When the note is issued (ISO 8601 instant or date = midnight UTC; default: now).")
@click.option("--idempotency-key", default=None, help="A retry with the same key issues nothing new.")
@click.option("--json", "as_json", is_flag=True, help="Print the credit note as JSON.")
@db_option
@actor_option
@click.pass_context
def credit_note(ctx: click.Context, invoice: str, lines: list[dict[str, str | int]], reason: str,
                at: datetime | None, idempotency_key: str | None, as_json: bool, db: str, actor: str) -> None:
    """Issue a credit note against INVOICE (finalized or paid); its total (with tax at the
    customer's rate) goes to the customer's credit balance. The invoice does not change."""
    note = service.issue_credit_note(_open(ctx, db), invoice=invoice, lines=lines, reason=reason, actor=actor,
                                     at=at, idempotency_key=idempotency_key)
    click.echo(_dump(credit_note_json(note)) if as_json else _credit_note_text(note))


@cli.group("credit-notes")
def credit_notes() -> None:
    """List issued credit notes."""


@credit_notes.command("list")
@click.option("--customer", default=None, help="Only this customer's credit notes.")
@click.option("--invoice", default=None, help="Only the credit notes against this invoice.")
@click.option("--json", "as_json", is_flag=True)
@db_option
@click.pass_context
def credit_notes_list(ctx: click.Context, customer: str | None, invoice: str | None, as_json: bool, db: str) -> None:
    """Credit notes in the order issued."""
    rows = service.list_credit_notes(_open(ctx, db), invoice=invoice, customer=customer)
    if as_json:
        click.echo(_dump([credit_note_json(n) for n in rows]))
    elif rows:
        click.echo(_credit_note_table(rows))
    else:
        click.echo("no credit notes")


def main() -> None:
    """Console entry point (`billing`)."""
    cli.main(prog_name="billing")


# The audit trail and report commands (trace, reconcile, report) live in billing/cli_audit.py.
from billing.cli_audit import audit_commands  # noqa: E402 - registered once the group exists

for _audit_command in audit_commands():
    cli.add_command(_audit_command)

# The expansion metric commands (metrics, cohorts, export movements, bench metrics) live in billing/cli_metrics.py.
from billing.cli_metrics import metrics_commands  # noqa: E402 - registered once the group exists

for _metrics_command in metrics_commands():
    cli.add_command(_metrics_command)

# The metered-usage commands (usage ingest/show/saturation, bench usage) live in billing/cli_usage.py.
from billing.cli_usage import usage_commands  # noqa: E402 - registered once the group exists

for _usage_command in usage_commands():
    cli.add_command(_usage_command)

# `bench invoice-run` lives in billing/cli_runs.py (with the invoice-run helpers).
import billing.cli_runs  # noqa: E402,F401 - registers itself on the bench group
