"""`billing metrics`, `billing cohorts`, `billing export movements` and `billing bench metrics`
end to end (click's CliRunner), on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dbkit import Db

from billing import service
from billing.cli import cli
from billing.cli_metrics import escape_cell
from billing.scenario import Scenario, parse_scenario_text

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
QOQ = FIXTURES / "60-expansion-growth-quarter-over-quarter.json"
SEATS = FIXTURES / "02-seat-expansion-with-addon.json"

Run = Callable[..., Result]


@pytest.fixture
def run() -> Run:
    runner = CliRunner(catch_exceptions=False)

    def invoke(*args: str) -> Result:
        return runner.invoke(cli, list(args))

    return invoke


def test_metrics_as_json_csv_and_table(run: Run, db: Db) -> None:
    service.replay(parse_scenario_text(QOQ.read_text()), db.url)
    result = run("metrics", "--period", "quarter", "--format", "json", "--db", db.url)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["period"], data["from"], data["to"], data["by"]) == ("quarter", "2026-Q1", "2026-Q3", None)
    q2 = data["rows"][1]
    assert (q2["period"], q2["expansion"], q2["expansion_growth_rate"], q2["arpea"], q2["nrr"]) == (
        "2026-Q2", "750.00", "50.00", "375.00", "137.50")
    assert data["time_to_first_expansion"] == {"accounts": 2, "covers": 2, "median_days": "52.50",
                                               "mean_days": "52.50"}
    assert (data["contraction_after_expansion"]["account_share"],
            data["contraction_after_expansion"]["mrr_share"]) == ("50.00", "16.00")
    assert [r["subscription"] for r in data["expansion_readiness"]] == ["a-seat"]

    result = run("metrics", "--format", "csv", "--by", "plan", "--from", "2026-06", "--to", "2026-07",
                 "--db", db.url)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [(r["segment"], r["period"], r["expansion_by_subtype.add_on"], r["churn"]) for r in rows] == [
        ("seat", "2026-06", "250.00", "0.00"), ("seat", "2026-07", "0.00", "1000.00")]

    result = run("metrics", "--db", db.url)
    assert result.exit_code == 0, result.output
    assert "GRR % (snapshots)" in result.stdout and "GRR % (event sum)" in result.stdout
    assert "2 of 2 new account(s) expanded; median 52.50 days" in result.stdout


def test_cohorts(run: Run, db: Db) -> None:
    service.replay(parse_scenario_text(QOQ.read_text()), db.url)
    result = run("cohorts", "--format", "json", "--db", db.url)
    assert result.exit_code == 0, result.output
    [cohort] = json.loads(result.stdout)["cohorts"]
    assert (cohort["cohort"], cohort["customers"], cohort["mrr"]) == ("2026-01", 2, "1500.00")
    assert cohort["net"] == ["100.00", "113.33", "133.33", "153.33", "166.67", "183.33", "116.67"]
    assert cohort["gross"][-1] == "66.67" and cohort["paying"] == [2, 2, 2, 2, 2, 2, 1]
    table = run("cohorts", "--db", db.url).stdout
    assert "net MRR retention" in table and "gross MRR retention" in table
    lines = run("cohorts", "--format", "csv", "--db", db.url).stdout.splitlines()
    assert lines[0] == "cohort,customers,mrr,retention,M0,M1,M2,M3,M4,M5,M6"
    assert lines[2] == "2026-01,2,1500.00,gross,100.00,100.00,100.00,100.00,100.00,100.00,66.67"


def test_export_movements_escapes_formula_cells(run: Run, db: Db, tmp_path: Path) -> None:
    doc = json.loads(SEATS.read_text())
    doc.pop("expect")
    text = json.dumps(doc).replace('"acme"', '"=HYPERLINK(1)"').replace('"acme-team"', '"@SUM(A1)"')
    scenario = Scenario.model_validate(json.loads(text))
    service.replay(scenario, db.url)
    service.change_quantity(db.engine, subscription="@SUM(A1)", quantity=5, actor="t", at="2026-03-01")
    result = run("export", "movements", "--format", "csv", "--db", db.url)
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:6] == ["id", "at", "customer", "subscription", "type", "subtype"]
    assert rows[1][:6] == ["1", "2026-01-01T00:00:00Z", "'=HYPERLINK(1)", "'@SUM(A1)", "new", ""]
    assert rows[2][-2:] == ["INV-0002", "INV-0002#2;INV-0002#3"]  # the seat proration credit and charge
    assert rows[-1][9:14] == ["1500.00", "500.00", "'-1000.00", "USD", "'-1000.00"]  # 5 seats + add-on
    out = tmp_path / "movements.csv"
    assert run("export", "movements", "--output", str(out), "--db", db.url).exit_code == 0
    assert out.read_text(encoding="utf-8") == result.stdout
    assert [escape_cell(v) for v in ("+1", "-2", "3", "@x", "\tx", None, "a=b")] == [
        "'+1", "'-2", "3", "'@x", "'\tx", "", "a=b"]


def test_bench_metrics_json(run: Run, db: Db) -> None:
    result = run("bench", "metrics", "--movements", "3000", "--json", "--db", db.url)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert figures["movements"] == 3000 and figures["database"] == db.backend
    for key in ("metrics_seconds", "cohorts_seconds", "trace_seconds", "peak_rss_mb"):
        assert figures[key] > 0, key
    assert figures["periods"] == 60 and figures["customers"] > 300
    # the maintained monthly tables the bench writes agree with the aggregation of its ledger
    from expansion.cohorts import cohort_table
    from expansion.ledger import metric_set

    assert metric_set(db.engine).rows == metric_set(db.engine, fast=False).rows
    assert cohort_table(db.engine).to_json() == cohort_table(db.engine, fast=False).to_json()
    again = run("bench", "metrics", "--movements", "10", "--db", db.url)
    assert "empty database" in again.stderr and again.exit_code != 0


def test_metric_command_errors_are_one_line(run: Run, db: Db) -> None:
    def fails(message: str, *args: str) -> None:
        result = run(*args, "--db", db.url)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr

    fails("unknown segment 'colour'", "metrics", "--by", "colour")
    fails("'2026-13' is not a period", "metrics", "--from", "2026-13")
    fails("the database holds no book", "metrics")
    service.load_catalog(db.engine, parse_scenario_text(SEATS.read_text()).catalog)
    fails("the ledger is empty", "metrics")
    fails("the ledger is empty", "cohorts")
