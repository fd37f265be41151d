"""`billing verify` on SQLite and PostgreSQL: clean on every replayed fixture, and each kind of
corruption made behind the engine's back (triggers bypassed) is found, named, with its rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from dbkit import Db
from sqlalchemy import text

from billing import service
from billing.cli import cli
from billing.scenario import parse_scenario_text
from expansion.verify import CHECKS, verify

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"


def replay(db: Db, prefix: str) -> None:
    [path] = FIXTURES.glob(f"{prefix}-*.json")
    service.replay(parse_scenario_text(path.read_text(encoding="utf-8")), db.url)


def tamper(db: Db, *statements: tuple[str, dict[str, Any]]) -> None:
    """Run statements with the ledger's insert-only triggers out of the way (dropped on SQLite,
    replication role on PostgreSQL), as someone with direct database access could."""
    with db.engine.begin() as conn:
        if db.backend == "sqlite":
            for name in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars().all():
                conn.execute(text(f'DROP TRIGGER "{name}"'))
        else:
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        for sql, params in statements:
            conn.execute(text(sql), params)


def found(db: Db) -> dict[str, list[str]]:
    result = verify(db.engine)
    out: dict[str, list[str]] = {}
    for f in result.findings:
        out.setdefault(f.check, []).append(f.message)
    return out


@pytest.mark.parametrize("prefix", ["02", "11", "23", "34", "41", "57", "61"])
def test_replayed_fixtures_verify_clean(db: Db, prefix: str) -> None:
    replay(db, prefix)
    result = verify(db.engine)
    assert result.findings == []
    assert list(result.checked) == list(CHECKS)
    assert result.checked["movement_mrr"] > 0 and result.checked["ledger_snapshots"] > 0
    run = CliRunner().invoke(cli, ["verify", "--db", db.url])
    assert run.exit_code == 0 and run.output.rstrip().endswith("clean")


def test_a_total_that_is_not_its_lines(db: Db) -> None:
    replay(db, "02")
    tamper(db, ("UPDATE invoices SET total = total + 1 WHERE number = 'INV-0002'", {}))
    assert found(db) == {"invoice_totals": [
        "invoice INV-0002: total 204840 ≠ subtotal − discount + tax 204839; amount_due 204839 ≠ 204840 (minor units)"]}
    run = CliRunner().invoke(cli, ["verify", "--json", "--db", db.url])
    assert run.exit_code == 1
    data = json.loads(run.stdout)
    assert data["clean"] is False and data["findings"][0]["rows"][0]["number"] == "INV-0002"


def test_a_gap_in_the_numbers_and_a_period_billed_twice(db: Db) -> None:
    replay(db, "02")
    tamper(db,
           ("INSERT INTO invoices (number, seq, customer, currency, status, issued_at, billing_date, subtotal, "
            "discount, tax, total, credit_applied, amount_due, credit_added, command_id) "
            "SELECT 'INV-0005', 5, customer, currency, status, issued_at, billing_date, subtotal, discount, tax, "
            "total, credit_applied, amount_due, credit_added, command_id FROM invoices WHERE number = 'INV-0001'", {}),
           ("INSERT INTO invoice_lines (invoice_number, line_index, kind, description, subscription, quantity, "
            "unit_amount, amount, included, period_start, period_end) SELECT 'INV-0005', line_index, kind, "
            "description, subscription, quantity, unit_amount, amount, included, period_start, period_end "
            "FROM invoice_lines WHERE invoice_number = 'INV-0001'", {}))
    findings = found(db)
    assert findings["invoice_numbering"] == ["series 'INV-' (invoices): 2 number(s) missing: 3, 4"]
    assert findings["double_billing"] == [
        "subscription acme-team: the plan period starting 2026-01-01T00:00:00Z is billed 2 times"]
    assert len(findings["period_tiling"]) == 1 and "overlaps the previous one" in findings["period_tiling"][0]
    assert set(findings) == {"invoice_numbering", "double_billing", "period_tiling"}


def test_mrr_that_the_ledger_does_not_explain(db: Db) -> None:
    replay(db, "02")
    tamper(db, ("UPDATE customers SET mrr = mrr + 100 WHERE id = 'acme'", {}))
    assert found(db) == {"movement_mrr": [
        "customer acme: MRR 150100 but its 3 ledger entries sum to 150000 (minor units of USD)"]}


def test_a_snapshot_and_a_maintained_figure_that_disagree_with_the_ledger(db: Db) -> None:
    replay(db, "02")
    tamper(db, ("UPDATE mrr_month_measures SET amount = amount + 500 WHERE measure = 'ending'", {}))
    findings = found(db)
    assert list(findings) == ["ledger_bridge"]
    # the measures are difference arrays: a change in January counts in every later month
    assert findings["ledger_bridge"] == [f"{month}: fx_impact 5.00 maintained, 0.00 from the ledger; "
                                         "ending_mrr 1505.00 maintained, 1500.00 from the ledger"
                                         for month in ("2026-01", "2026-02")]

    tamper(db, ("UPDATE mrr_month_measures SET amount = amount - 500 WHERE measure = 'ending'", {}),
           ("UPDATE customer_mrr_months SET mrr_end = mrr_end + 7 WHERE customer = 'acme'", {}))
    findings = found(db)
    assert findings["ledger_snapshots"] == ["customer acme, 2026-01: moved 150007 but its entries sum to 150000"]


def test_a_number_written_twice_in_another_padding(db: Db) -> None:
    replay(db, "02")
    tamper(db, ("INSERT INTO invoices (number, seq, customer, currency, status, issued_at, billing_date, subtotal, "
                "discount, tax, total, credit_applied, amount_due, credit_added, command_id) "
                "SELECT 'INV-002', 9, customer, currency, status, issued_at, billing_date, 0, 0, 0, 0, 0, 0, 0, "
                "command_id FROM invoices WHERE number = 'INV-0001'", {}))
    assert found(db)["invoice_numbering"] == ["series 'INV-' (invoices): used twice: 2"]
