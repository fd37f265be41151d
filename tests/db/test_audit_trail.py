"""The audit trail and reconciliation on fixture scenarios replayed into SQLite and PostgreSQL:
`billing trace movement` (prorations, a period-end change, a usage close, credit notes, FX),
`billing trace metric` (its total equals expansion/metrics.py for every period and metric), and
`billing reconcile` (clean on prorations, credits, usage, `none` and period-end cancellations;
exceptions when a movement → line link is deleted behind the engine's back)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dbkit import Db
from sqlalchemy import text

from billing import service
from billing.cli import cli
from billing.records import EXPANSION_SUBTYPES
from billing.replay import ReplayResult
from billing.scenario import parse_scenario_text
from expansion.metrics import compute_metrics
from expansion.trace import (
    MOVEMENT_TYPES,
    TraceError,
    reconcile_period,
    trace_metric,
    trace_movement,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"


def fixture(prefix: str) -> dict[str, Any]:
    [path] = FIXTURES.glob(f"{prefix}-*.json")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def replay(db: Db, prefix: str | dict[str, Any]) -> ReplayResult:
    data = fixture(prefix) if isinstance(prefix, str) else prefix
    return service.replay(parse_scenario_text(json.dumps(data)), db.url)


def run(*args: str) -> Result:
    return CliRunner(catch_exceptions=False).invoke(cli, list(args))


def delete_link(db: Db, movement_id: int, invoice: str, line: int) -> None:
    """Remove a movement → invoice line link behind the engine's back (the ledger is insert-only;
    triggers that guard it are bypassed: dropped on SQLite, replication role on PostgreSQL)."""
    with db.engine.begin() as conn:
        if db.backend == "sqlite":
            triggers = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                         "AND tbl_name = 'movement_invoice_lines'")).scalars().all()
            for name in triggers:
                conn.execute(text(f'DROP TRIGGER "{name}"'))
        else:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        deleted = conn.execute(
            text("DELETE FROM movement_invoice_lines WHERE movement_id = :m AND invoice_number = :i "
                 "AND line_index = :l"),
            {"m": movement_id, "i": invoice, "l": line},
        )
        assert deleted.rowcount == 1


# --- trace movement ---------------------------------------------------------------------------


def test_trace_a_prorated_seat_change(db: Db) -> None:
    replay(db, "02")
    trace = trace_movement(db.engine, 2)
    m = trace.movement
    assert (m.type, m.subtype, m.customer, m.subscription) == ("expansion", "seat", "acme", "acme-team")
    command = trace.origin.command
    assert trace.origin.direct and command is not None
    assert (command.id, command.type, command.event_index, command.actor) == (4, "change_quantity", 3, "replay")
    assert command.payload["quantity"] == 25
    assert (m.mrr_before, m.mrr_after, m.delta, m.reporting_delta) == (
        Decimal("500.00"), Decimal("1250.00"), Decimal("750.00"), Decimal("750.00"))
    assert [(bl.ref.invoice, bl.ref.line, bl.line.kind, bl.line.amount) for bl in trace.lines] == [
        ("INV-0002", 2, "proration", Decimal("-274.19")), ("INV-0002", 3, "proration", Decimal("685.48"))]
    assert trace.billed == Decimal("411.29") and trace.fx_rate is None


def test_trace_a_period_end_change_names_the_scheduling_command(db: Db) -> None:
    replay(db, "37")
    trace = trace_movement(db.engine, 2)
    origin = trace.origin
    assert not origin.direct and origin.description == "period-end change_quantity"
    assert origin.command is not None
    assert (origin.command.id, origin.command.type, origin.command.payload["effective"]) == (
        4, "change_quantity", "period_end")
    assert (origin.applied_during.id, origin.applied_during.type) == (5, "invoice_run")
    assert trace.movement.delta == Decimal("-45.00")
    assert [(bl.label, bl.line.kind, bl.line.amount) for bl in trace.lines] == [("INV-0002#0", "plan",
                                                                                  Decimal("75.00"))]


def test_trace_a_usage_close(db: Db) -> None:
    replay(db, "24")
    trace = trace_movement(db.engine, 2)
    assert trace.origin.description == "usage period close"
    assert trace.origin.command is not None and (trace.origin.command.id, trace.origin.command.type) == (2, "subscribe")
    assert trace.origin.applied_during.type == "invoice_run"
    assert [c.id for c in trace.usage_events] == list(range(4, 16))
    assert [bl.line.amount for bl in trace.lines] == [Decimal("8.00"), Decimal("7.00"), Decimal("4.50")]
    assert trace.billed == Decimal("19.50") == trace.movement.delta


def test_trace_shows_what_credit_notes_took_back(db: Db) -> None:
    replay(db, "39")
    trace = trace_movement(db.engine, 2)
    assert [(bl.label, bl.line.amount, bl.credited, bl.credit_notes) for bl in trace.lines] == [
        ("INV-0002#2", Decimal("-193.55"), Decimal(0), ()),
        ("INV-0002#3", Decimal("232.26"), Decimal("232.26"), ("CN-0003",)),
    ]
    assert (trace.billed, trace.credited) == (Decimal("38.71"), Decimal("232.26"))


def test_trace_in_the_customer_and_the_reporting_currency(db: Db) -> None:
    replay(db, "23")
    trace = trace_movement(db.engine, 3)
    m = trace.movement
    assert (m.currency, m.delta, m.reporting_currency, m.reporting_delta) == ("EUR", Decimal("50.00"), "USD",
                                                                              Decimal("60.00"))
    assert trace.fx_rate is not None and str(Decimal(trace.fx_rate.numerator) / trace.fx_rate.denominator) == "1.2"


def test_trace_movement_cli(db: Db) -> None:
    replay(db, "37")
    result = run("trace", "movement", "2", "--db", db.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "movement #2  contraction/seat  customer acme subscription acme-team  at 2026-02-01T00:00:00Z"
    assert lines[1] == ("cause     period-end change_quantity, scheduled by command #4 change_quantity (event 3) "
                        "by replay at 2026-01-20T00:00:00Z")
    assert lines[2] == "applied   during command #5 invoice_run (event 4) by replay at 2026-02-01T00:00:00Z"
    assert "MRR       120.00 USD -> 75.00 USD" in lines
    assert "delta     -45.00 USD = -45.00 USD (reporting)" in lines
    assert "billed    by 1 line(s), net 75.00 USD" in lines
    data = json.loads(run("trace", "movement", "2", "--json", "--db", db.url).stdout)
    assert data["origin"]["command"]["id"] == 4 and data["origin"]["applied_during"]["id"] == 5
    assert data["lines"] == [{
        "invoice": "INV-0002", "line": 0, "status": "finalized", "customer": "acme",
        "issued_at": "2026-02-01T00:00:00Z", "kind": "plan", "description": "Team × 5", "subscription": "acme-team",
        "amount": "75.00", "currency": "USD", "period_start": "2026-02-01T00:00:00Z",
        "period_end": "2026-03-01T00:00:00Z", "credited": "0.00", "credit_notes": [],
    }]


# --- trace metric -----------------------------------------------------------------------------

METRIC_FIXTURES = ["02", "23", "24", "38", "39", "41", "46", "52", "54", "58"]


@pytest.mark.parametrize("prefix", METRIC_FIXTURES)
def test_trace_metric_total_equals_the_metric(db: Db, prefix: str) -> None:
    result = replay(db, prefix)
    checked = 0
    for kind in ("month", "quarter", "year"):
        for row in result.metrics[kind]:
            for name in MOVEMENT_TYPES:
                assert trace_metric(db.engine, name, row["period"]).total_str == row[name], (name, row["period"])
                checked += 1
            for subtype in EXPANSION_SUBTYPES:
                trail = trace_metric(db.engine, f"expansion.{subtype}", row["period"])
                assert trail.total_str == row["expansion_by_subtype"][subtype]  # type: ignore[index]
                checked += 1
            expansion = trace_metric(db.engine, "expansion", row["period"])
            assert expansion.accounts == row["expansion_accounts"]
            assert expansion.per_account == row["arpea"]
    assert checked >= 33


def test_trace_metric_lists_the_movements(db: Db) -> None:
    replay(db, "38")
    assert [r.movement.id for r in trace_metric(db.engine, "expansion", "2026-01").rows] == [4]
    assert [r.movement.id for r in trace_metric(db.engine, "churn", "2026-Q1").rows] == [5]
    year = trace_metric(db.engine, "new", "2025")
    assert [r.movement.id for r in year.rows] == [1, 2, 3] and year.total_str == "250.00"
    contraction = trace_metric(db.engine, "contraction.seat", "2026")
    assert [(r.movement.id, r.amount) for r in contraction.rows] == [(6, Decimal("20.00"))]


def test_trace_metric_by_segment(db: Db) -> None:
    data = fixture("23")
    for event in data["events"]:
        if event["type"] == "customer":
            event["tags"] = {"segment": "enterprise" if event["customer"] == "eu" else "smb"}
    result = replay(db, data)
    q1 = next(r for r in result.metrics["quarter"] if r["period"] == "2026-Q1")
    assert q1["expansion"] == "117.50"
    eur = trace_metric(db.engine, "expansion", "2026-Q1", ["currency=EUR"])
    usd = trace_metric(db.engine, "expansion", "2026-Q1", ["currency=USD"])
    assert (eur.total_str, usd.total_str) == ("117.50", "0.00")
    assert [r.movement.id for r in eur.rows] == [3, 4]
    assert [r.amount for r in eur.rows] == [Decimal("60.00"), Decimal("57.50")]
    enterprise = trace_metric(db.engine, "expansion", "2026-Q1", ["tag:segment=enterprise", "subtype=seat"])
    assert enterprise.total_str == "117.50"
    assert trace_metric(db.engine, "expansion", "2026-Q1", ["tag:segment=smb"]).rows == ()
    assert trace_metric(db.engine, "new", "2026-01", ["customer=us"]).total_str == "50.00"


def test_trace_metric_cli(db: Db) -> None:
    replay(db, "02")
    result = run("trace", "metric", "expansion", "--period", "2026-01", "--db", db.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("expansion 2026-01: 2 movement(s), 1 account(s)")
    assert lines[-1] == "total 1000.00 USD = expansion 2026-01"
    assert [line.split()[0] for line in lines[2:-1]] == ["2", "3"]
    data = json.loads(run("trace", "metric", "expansion.seat", "--period", "2026-Q1", "--json",
                          "--db", db.url).stdout)
    assert (data["total"], data["count"], [m["id"] for m in data["movements"]]) == ("750.00", 1, [2])
    by = json.loads(run("trace", "metric", "new", "--period", "2026", "--by", "customer=acme", "--json",
                        "--db", db.url).stdout)
    assert (by["by"], by["total"]) == ({"customer": "acme"}, "500.00")


@pytest.mark.parametrize(("args", "message"), [
    (["trace", "metric", "expansion", "--period", "2026-13"], "period '2026-13': expected YYYY-MM"),
    (["trace", "metric", "growth", "--period", "2026-01"], "metric 'growth': expected one of new, expansion"),
    (["trace", "metric", "new", "--period", "2026", "--by", "plan=team"], "unknown key 'plan'"),
    (["trace", "movement", "99"], "movement 99 not found"),
    (["reconcile", "--period", "Q1"], "period 'Q1'"),
])
def test_trace_errors_are_one_line(db: Db, args: list[str], message: str) -> None:
    replay(db, "02")
    result = run(*args, "--db", db.url)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("billing: error: ") and message in line


def test_an_empty_database_has_no_book(db: Db) -> None:
    with pytest.raises(TraceError, match="no book"):
        trace_metric(db.engine, "new", "2026")
    result = run("reconcile", "--period", "2026", "--db", db.url)
    assert result.exit_code == 2 and result.stderr.startswith("billing: error: the database holds no book")


# --- reconcile --------------------------------------------------------------------------------

EXPLAINED = {
    "16": {2: "proration_none", 3: "proration_none"},
    "31": {2: "period_end_cancel"},
    "51": {4: "period_end_cancel"},
    "54": {2: "proration_none", 3: "proration_none", 4: "proration_none"},
}


@pytest.mark.parametrize("prefix", ["02", "16", "24", "31", "32", "33", "36", "39", "43", "51", "52", "54", "55"])
def test_reconcile_is_clean_on_fixtures(db: Db, prefix: str) -> None:
    result = replay(db, prefix)
    explained: dict[int, str] = {}
    billed = 0
    for row in result.metrics["month"]:
        rec = reconcile_period(db.engine, row["period"])
        assert rec.exceptions == [], [(c.status, c.reason, c.explanation) for c in rec.exceptions]
        assert rec.lines == ()
        explained.update({c.movement.id: c.reason for c in rec.movements if c.status == "explained"})
        billed += rec.count("billed")
    assert explained == EXPLAINED.get(prefix, {})
    assert billed + len(explained) == len(result.movements)


def test_reconcile_notes_credit_notes_on_billed_lines(db: Db) -> None:
    replay(db, "39")
    rec = reconcile_period(db.engine, "2026-01")
    assert [(c.movement.id, c.status) for c in rec.movements] == [(1, "billed"), (2, "billed")]
    assert rec.movements[0].notes == ("INV-0001#0 credited 33.33 USD by CN-0002",
                                      "INV-0001#1 credited 250.00 USD by CN-0001, CN-0002 (fully)")
    assert rec.movements[1].notes == ("INV-0002#3 credited 232.26 USD by CN-0003 (fully)",)


def test_reconcile_explains_a_usage_close_not_invoiced_yet(db: Db) -> None:
    data = fixture("24")
    assert data["events"][-1] == {"at": "2026-03-01T00:00:00Z", "type": "invoice_run"}
    # the book's clock reaches Mar 1 (the usage period closes) but no run bills it
    data["events"][-1] = {"at": "2026-03-01T00:00:00Z", "type": "usage", "subscription": "acme-base",
                          "metric": "api_calls", "value": "5", "id": "march-1"}
    data.pop("expect")
    replay(db, data)
    rec = reconcile_period(db.engine, "2026-03")
    [check] = rec.movements
    assert (check.movement.id, check.movement.cause, check.movement.delta) == (3, "usage", Decimal("-19.50"))
    assert (check.status, check.reason) == ("explained", "not_invoiced_yet")
    assert check.explanation.startswith("not invoiced yet: usage period closed at 2026-03-01T00:00:00Z")
    assert run("reconcile", "--period", "2026-03", "--db", db.url).exit_code == 0


def test_reconcile_flags_a_link_deleted_behind_its_back(db: Db) -> None:
    replay(db, "02")
    clean = run("reconcile", "--period", "2026-01", "--db", db.url)
    assert clean.exit_code == 0, clean.output
    assert clean.stdout.splitlines()[-1] == "clean: every movement of 2026-01 ties to its invoice lines"

    # one line of the credit/charge pair loses its link: the movement is left with the credit
    # alone (the wrong sign for an expansion) and the charge with no movement
    delete_link(db, 2, "INV-0002", 3)
    rec = reconcile_period(db.engine, "2026-01")
    assert [(c.movement.id, c.reason) for c in rec.movements if c.status == "exception"] == [(2, "amount_sign")]
    assert rec.movements[1].explanation == ("the proration lines net -274.19 USD but MRR moved 750.00 USD: they bill "
                                            "a change in the other direction")
    assert [(c.line.label, c.reason) for c in rec.lines] == [("INV-0002#3", "unlinked_line")]
    result = run("reconcile", "--period", "2026-01", "--db", db.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == "billing: 2 reconciliation exception(s) in 2026-01"
    assert ("  INV-0002#3 (proration 685.48 USD, acme-team): unlinked_line: no movement references it, though "
            "acme-team moved MRR that day (movement #2, #3 do not link it): a broken link") in result.stdout

    delete_link(db, 2, "INV-0002", 2)
    rec = reconcile_period(db.engine, "2026-Q1")
    assert [(c.movement.id, c.status, c.reason) for c in rec.movements] == [
        (1, "billed", "billed"), (2, "exception", "unbilled"), (3, "billed", "billed")]
    assert [(c.line.label, c.line.line.amount, c.reason) for c in rec.lines] == [
        ("INV-0002#2", Decimal("-274.19"), "unlinked_line"), ("INV-0002#3", Decimal("685.48"), "unlinked_line")]
    data = json.loads(run("reconcile", "--period", "2026-Q1", "--json", "--db", db.url).stdout)
    assert (data["billed"], data["explained"], data["exceptions"]) == (2, 0, 3)
    assert run("reconcile", "--period", "2026-02", "--db", db.url).exit_code == 0


# --- corrections: reversing entries -----------------------------------------------------------


def test_a_reversal_is_traced_and_left_out_of_the_figures(db: Db) -> None:
    replay(db, "02")
    reversal = service.reverse_movement(db.engine, 3, actor="auditor", reason="add-on entered twice")
    assert (reversal.id, reversal.entry, reversal.reverses) == (4, "reversal", 3)

    trail = trace_metric(db.engine, "expansion", "2026-01")
    assert [r.movement.id for r in trail.rows] == [2] and trail.total_str == "750.00"
    assert [(m.id, by) for m, by in trail.reversed] == [(3, 4)]
    # the metric set nets the pair to zero the same way
    config = service.book_config(db.engine)
    assert config is not None
    metrics = compute_metrics(service.list_movements(db.engine), config[0], datetime(2026, 1, 1, tzinfo=UTC),
                              datetime(2026, 2, 1, tzinfo=UTC))
    assert metrics["month"][0]["expansion"] == "750.00"

    entry = trace_movement(db.engine, 4)
    assert entry.origin.description == "reversal of movement #3"
    assert entry.origin.command is not None and entry.origin.command.type == "reverse_movement"
    assert entry.origin.command.actor == "auditor" and entry.origin.command.payload["reason"] == "add-on entered twice"
    assert trace_movement(db.engine, 3).reversed_by == 4
    text_out = run("trace", "movement", "3", "--db", db.url).stdout
    assert "reversed  by movement #4: no metric counts this entry" in text_out
    metric_out = run("trace", "metric", "expansion", "--period", "2026-01", "--db", db.url).stdout.splitlines()
    assert metric_out[-2:] == ["not counted: movement #3 (+250.00 USD), reversed by #4",
                               "total 750.00 USD = expansion 2026-01"]

    rec = reconcile_period(db.engine, "2026-01")
    assert [(c.movement.id, c.status, c.reason) for c in rec.movements] == [
        (1, "billed", "billed"), (2, "billed", "billed"), (3, "explained", "reversed"),
        (4, "explained", "reversal")]
    assert rec.movements[2].explanation == ("reversed by movement #4: no metric counts it (its billing, INV-0002#4, "
                                            "stays as invoiced)")
    assert rec.exceptions == []


def test_the_report_reads_the_same_ledger(db: Db, tmp_path: Path) -> None:
    """The report on this backend: its numbers are the replay's, its trails sum to them."""
    from expansion.report import write_report
    from expansion.report_model import build_model, load_report_data

    result = replay(db, "39")
    model = build_model(load_report_data(db.engine))
    assert model.metrics == result.metrics
    assert model.trails[("expansion", "2026-01")].total_str == "100.00"
    assert model.traces[2].lines[1].credit_notes == ("CN-0003",)
    index = write_report(db.engine, tmp_path / "report")
    assert '<a href="trail/expansion-2026-01.html">100.00</a>' in index.read_text(encoding="utf-8")


def test_two_same_day_changes_only_one_moving_mrr_reconcile_clean(db: Db) -> None:
    """A seat change (moves MRR) and, an hour later, monthly swapped for yearly at the same price
    per month (bills prorations, moves nothing): the second change's lines are explained by
    their own command, not flagged as a broken link of the first change's movement."""
    plans = [{"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit", "prices": {"USD": "30.00"}},
             {"code": "team-year", "name": "Team yearly", "interval": "year", "pricing": "per_unit",
              "prices": {"USD": "360.00"}}]
    scenario = {"catalog": {"plans": plans}, "events": [
        {"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "acme", "currency": "USD"},
        {"at": "2026-01-01T00:00:00Z", "type": "subscribe", "customer": "acme", "subscription": "acme-team",
         "plan": "team", "quantity": 2},
        {"at": "2026-01-01T00:00:00Z", "type": "invoice_run"},
        {"at": "2026-01-15T10:00:00Z", "type": "change_quantity", "subscription": "acme-team", "quantity": 3},
        {"at": "2026-01-15T11:00:00Z", "type": "change_plan", "subscription": "acme-team", "plan": "team-year"},
        {"at": "2026-01-16T00:00:00Z", "type": "invoice_run"}]}
    result = replay(db, scenario)
    assert [(m.type, m.subtype, str(m.delta)) for m in result.movements] == [
        ("new", None, "60.00"), ("expansion", "seat", "30.00")]
    rec = reconcile_period(db.engine, "2026-01")
    assert list(rec.exceptions) == []
    explained = [(c.line.label, c.reason) for c in rec.lines]
    assert explained and {reason for _, reason in explained} == {"no_mrr_change"}
    assert all("change_plan" in c.explanation for c in rec.lines)
    assert run("reconcile", "--period", "2026-01", "--db", db.url).exit_code == 0
