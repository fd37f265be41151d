"""The command line end to end (click's CliRunner): happy paths print what the services return,
and every error is one line on stderr with a non-zero exit, never a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dbkit import Db

from billing.cli import cli
from billing.replay import replay_in_memory
from billing.scenario import parse_scenario_text

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
SEATS = FIXTURES / "02-seat-expansion-with-addon.json"

Run = Callable[..., Result]


@pytest.fixture
def run() -> Run:
    runner = CliRunner(catch_exceptions=False)

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(cli, list(args), env=env)

    return invoke


def one_error_line(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billing: error: ")
    return lines[0]


def write(tmp_path: Path, name: str, data: Any) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def test_init_apply_run_list_show(run: Run, db: Db, tmp_path: Path) -> None:
    scenario = json.loads(SEATS.read_text(encoding="utf-8"))
    first_two = dict(scenario, events=scenario["events"][:2])
    first_two.pop("expect", None)
    result = run("init", "--db", db.url)
    assert result.exit_code == 0 and "schema revision 0010_hot_views" in result.stdout

    result = run("apply", write(tmp_path, "s.json", first_two), "--db", db.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].endswith("subscribe acme-team at 2026-01-01T00:00:00Z: new acme 500.00 USD")

    again = run("apply", str(tmp_path / "s.json"), "--db", db.url)
    assert again.exit_code == 0 and again.stdout.count("already applied") == 2

    result = run("invoice-run", "--as-of", "2026-01-01", "--db", db.url)
    assert result.exit_code == 0, result.output
    assert "1 invoice(s) issued" in result.stdout
    assert "USD: 1 invoice(s), total 500.00, credit applied 0.00, amount due 500.00" in result.stdout

    again = run("invoice-run", "--as-of", "2026-01-01", "--json", "--db", db.url)
    assert json.loads(again.stdout)["invoices"] == []

    listed = run("invoices", "list", "--db", db.url)
    number, customer, status = listed.stdout.splitlines()[1].split()[:3]
    assert (customer, status) == ("acme", "finalized")
    shown = run("invoices", "show", number, "--format", "json", "--db", db.url)
    assert json.loads(shown.stdout)["total"] == "500.00"
    text = run("invoices", "show", number, "--db", db.url)
    assert text.exit_code == 0 and "$500.00" in text.stdout
    html = run("invoices", "show", number, "--format", "html", "--db", db.url)
    assert html.exit_code == 0 and "<html" in html.stdout

    moves = json.loads(run("movements", "list", "--json", "--customer", "acme", "--db", db.url).stdout)
    assert [(m["type"], m["delta"], m["invoice_lines"]) for m in moves] == [
        ("new", "500.00", [{"invoice": number, "line": 0}])]


def test_database_url_from_the_environment(run: Run, db: Db) -> None:
    env = {"BILLING_DATABASE_URL": db.url}
    assert run("init", env=env).exit_code == 0
    result = run("movements", "list", env=env)
    assert result.exit_code == 0 and result.stdout.strip() == "no movements"


def test_catalog_load_both_file_forms(run: Run, db: Db, tmp_path: Path) -> None:
    scenario = json.loads(SEATS.read_text(encoding="utf-8"))
    bare = write(tmp_path, "bare.json", scenario["catalog"])
    wrapped = write(tmp_path, "wrapped.json", {"settings": {"rounding": "half_even"}, "catalog": scenario["catalog"]})
    result = run("catalog", "load", bare, "--db", db.url)
    assert result.exit_code == 0 and result.stdout.startswith("catalog created: 1 plan(s), 1 add-on(s)")
    result = run("catalog", "load", wrapped, "--db", db.url)
    assert result.exit_code == 0 and result.stdout.startswith("catalog replaced")
    bad = write(tmp_path, "bad.json", {"plans": [{"code": "x", "interval": "month", "prices": {"USD": "1"},
                                                  "pricing": "flat", "intervall": 1}]})
    assert "plans[0].intervall: unknown field" in one_error_line(run("catalog", "load", bad, "--db", db.url), 2)


def test_replay_json_and_check(run: Run) -> None:
    result = run("replay", str(SEATS), "--json")
    assert result.exit_code == 0, result.output
    expected = replay_in_memory(parse_scenario_text(SEATS.read_text(encoding="utf-8"))).to_json()
    assert json.loads(result.stdout) == json.loads(json.dumps(expected))
    checked = run("replay", str(SEATS), "--check")
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("ok: ") and checked.stdout.strip().endswith(" checks")


def test_replay_check_reports_each_difference(run: Run, tmp_path: Path) -> None:
    scenario = json.loads(SEATS.read_text(encoding="utf-8"))
    scenario["expect"] = {
        "invoices": [{"total": "500"}, {"total": "12.00", "lines": [{"amount": "1250"}] * 5}],
        "movements": [{"type": "new"}, {"type": "expansion", "delta": "750.00"}, {"subtype": "seat"}],
    }
    result = run("replay", write(tmp_path, "x.json", scenario), "--check")
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "invoices[1].total: expected 12.00, got 2048.39",
        "invoices[1].lines[1].amount: expected 1250, got 250.00",
        "invoices[1].lines[2].amount: expected 1250, got -274.19",
        "invoices[1].lines[3].amount: expected 1250, got 685.48",
        "invoices[1].lines[4].amount: expected 1250, got 137.10",
        "movements[2].subtype: expected seat, got add_on",
    ]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["replay", "missing.json"], 2, "missing.json: No such file or directory"),
        (["replay", "{bad}"], 2, "not valid JSON"),
        (["replay", "{unknown}", "--json"], 2, "events[1].quantty: unknown field"),
        (["replay", "{backwards}"], 2, "events[1].at: time goes backwards"),
        (["replay", "{refused}"], 2, "events[1] (subscribe): "),
        (["replay", "{noexpect}", "--check"], 2, "has no expect block"),
        (["invoice-run"], 2, "Missing option '--as-of'"),
        (["invoice-run", "--as-of", "2026-13-01"], 2, "Invalid value for '--as-of'"),
        (["invoices", "show", "INV-404"], 2, "invoice 'INV-404' not found"),
        (["invoices", "list", "--status", "lost"], 2, "Invalid value for '--status'"),
        (["frobnicate"], 2, "No such command 'frobnicate'"),
        (["catalog", "load", "{bad}"], 2, "not valid JSON"),
        (["apply", "{unknown}"], 2, "events[1].quantty: unknown field"),
    ],
)
def test_errors_are_one_line(run: Run, db: Db, tmp_path: Path, args: list[str], code: int, fragment: str) -> None:
    base = [{"at": "2026-01-02", "type": "customer", "customer": "a", "currency": "USD"}]
    files = {
        "{bad}": write(tmp_path, "bad.json", '{"events": [,]}'),
        "{unknown}": write(tmp_path, "unknown.json", {"events": [*base, {
            "at": "2026-01-02", "type": "subscribe", "customer": "a", "subscription": "s", "plan": "p",
            "quantty": 3}]}),
        "{backwards}": write(tmp_path, "backwards.json", {"events": [*base, {
            "at": "2026-01-01", "type": "customer", "customer": "b", "currency": "USD"}]}),
        "{refused}": write(tmp_path, "refused.json", {"events": [*base, {
            "at": "2026-01-02", "type": "subscribe", "customer": "a", "subscription": "s", "plan": "pro"}]}),
        "{noexpect}": write(tmp_path, "noexpect.json", {"events": base}),
    }
    run("init", "--db", db.url)
    argv = [files.get(a, a) for a in args]
    if argv[0] not in ("replay", "frobnicate"):
        argv += ["--db", db.url]
    assert fragment in one_error_line(run(*argv), code)


def test_database_problems_are_one_line(run: Run, tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'none.sqlite'}"
    assert "run `billing init" in one_error_line(run("invoices", "list", "--db", missing), 2)
    assert not (tmp_path / "none.sqlite").exists()
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert "has no billing schema" in one_error_line(run("movements", "list", "--db", f"sqlite:///{empty}"), 2)
    refused = "postgresql://nobody@127.0.0.1:1/nothing"
    assert "database error: " in one_error_line(run("invoices", "list", "--db", refused), 1)
    assert "does not exist" in one_error_line(run("init", "--db", f"sqlite:///{tmp_path}/no/such/dir.db"), 2)


def test_apply_without_any_catalog_is_refused(run: Run, db: Db, tmp_path: Path) -> None:
    run("init", "--db", db.url)
    path = write(tmp_path, "events.json", {"events": [{"at": "2026-01-02", "type": "invoice_run"}]})
    assert "no catalog in the database and none in" in one_error_line(run("apply", path, "--db", db.url), 2)


def test_apply_in_slices_between_runs(run: Run, db: Db, tmp_path: Path) -> None:
    """`apply --until` applies only earlier events; a later call applies the rest exactly once."""
    scenario = json.loads(SEATS.read_text(encoding="utf-8"))
    book = dict(scenario, events=[e for e in scenario["events"] if e["type"] != "invoice_run"])
    book.pop("expect", None)
    path = write(tmp_path, "book.json", book)
    assert run("init", "--db", db.url).exit_code == 0
    first = run("apply", path, "--until", "2026-01-10", "--db", db.url)
    assert first.exit_code == 0, first.output
    assert run("invoice-run", "--as-of", "2026-01-10", "--quiet", "--db", db.url).exit_code == 0
    rest = run("apply", path, "--db", db.url)
    assert rest.exit_code == 0, rest.output
    assert rest.stdout.count("already applied") == 2  # the customer and the subscription
    moves = json.loads(run("movements", "list", "--json", "--db", db.url).stdout)
    assert [(m["type"], m["subtype"], m["delta"]) for m in moves] == [
        ("new", None, "500.00"), ("expansion", "seat", "750.00"), ("expansion", "add_on", "250.00")]
