"""`billing usage ingest | show | saturation` and `billing bench usage` through the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from dbkit import Db

from billing import service
from billing.catalog import Catalog
from billing.scenario import Settings

Run = Callable[..., Result]


@pytest.fixture
def run() -> Run:
    runner = CliRunner(catch_exceptions=False)

    def invoke(*args: str, input: str | None = None) -> Result:
        from billing.cli import cli

        return runner.invoke(cli, list(args), input=input)

    return invoke


def _book(db: Db) -> None:
    service.load_catalog(db.engine, Catalog.model_validate({
        "plans": [{"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
                   "prices": {"USD": "10.00"}}],
        "metrics": [{"code": "api", "name": "API calls", "aggregation": "sum", "pricing": "package",
                     "package_size": 1000, "prices": {"USD": "2.00"}, "included": "500"},
                    {"code": "users", "aggregation": "unique_count", "field": "user", "active_seats": True,
                     "prices": {"USD": "0"}}],
    }), Settings())
    service.create_customer(db.engine, customer="acme", currency="USD", actor="t", at="2026-01-01")
    service.subscribe(db.engine, customer="acme", subscription="acme-team", plan="team", quantity=2,
                      actor="t", at="2026-01-01")


def test_ingest_a_file_then_show_the_running_bill(run: Run, db: Db, tmp_path: Path) -> None:
    _book(db)
    path = tmp_path / "events.jsonl"
    path.write_text(
        '{"subscription": "acme-team", "metric": "api", "at": "2026-01-03T10:00:00Z", "value": 1800, "id": "a"}\n'
        '{"subscription": "acme-team", "metric": "api", "at": "2026-01-04T10:00:00Z", "value": 1800, "id": "a"}\n'
        '{"subscription": "acme-team", "metric": "api", "at": "2026-01-04T10:00:00Z", "value": "x", "id": "b"}\n'
        '\n'
        '{"customer": "acme", "metric": "users", "at": "2026-01-05", "value": 1, "id": "u1", '
        '"properties": {"user": "ann"}}\n')
    result = run("usage", "ingest", str(path), "--grace", "none", "--no-progress", "--db", db.url)
    assert result.exit_code == 1  # a line was rejected
    assert result.stdout.splitlines()[-1] == "2 accepted, 1 duplicated, 1 rejected"
    assert f"{path}: line 3: value 'x' is not a decimal number" in result.stderr

    again = run("usage", "ingest", "-", "--json", "--no-progress", "--db", db.url, input=path.read_text())
    assert json.loads(again.stdout.splitlines()[-1]) == {"accepted": 0, "duplicated": 3, "rejected": 1}

    shown = run("usage", "show", "acme-team", "--at", "2026-01-20", "--json", "--db", db.url)
    metrics = {m["metric"]: m for m in json.loads(shown.stdout)["metrics"]}
    # 1800 calls, 500 included: 1300 billable = 2 started blocks of 1000 at 2.00
    assert (metrics["api"]["quantity"], metrics["api"]["amount"]) == ("1800", "4.00")
    text = run("usage", "show", "acme-team", "--at", "2026-01-20", "--db", db.url).stdout
    assert "quantity 1800 (500 included) → 4.00 USD" in text

    sat = json.loads(run("usage", "saturation", "--at", "2026-01-20", "--json", "--db", db.url).stdout)
    assert [(s["subscription"], s["active"], s["purchased"], s["ratio"]) for s in sat] == [
        ("acme-team", "1", 2, "0.5000")]


def test_bad_options_and_unknown_subscription(run: Run, db: Db, tmp_path: Path) -> None:
    _book(db)
    bad = run("usage", "ingest", "-", "--grace", "soon", "--db", db.url, input="")
    assert bad.exit_code == 2 and "give a number with s, m, h or d" in bad.stderr
    missing = run("usage", "show", "nope", "--db", db.url)
    assert missing.exit_code == 2 and "unknown subscription 'nope'" in missing.stderr
    header = tmp_path / "e.csv"
    header.write_text("subscription,metric,when,value,id\n")
    refused = run("usage", "ingest", str(header), "--db", db.url)
    assert refused.exit_code == 2 and "unknown column(s) 'when'" in refused.stderr


def test_bench_usage_prints_the_figures(run: Run, db: Db) -> None:
    result = run("bench", "usage", "--events", "3000", "--subscriptions", "12", "--json", "--db", db.url)
    figures = json.loads(result.stdout)
    for key in ("events", "events_per_second", "duplicates", "aggregate_seconds", "baseline_rows_per_second",
                "fraction_of_baseline", "peak_rss_mb"):
        assert key in figures
    assert figures["events"] == 3000
    assert figures["duplicates"] == figures["duplicates_generated"] > 0
    assert figures["accepted"] + figures["duplicates"] == 3000 and figures["rejected"] == 0
