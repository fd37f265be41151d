"""Credit notes through the database, on SQLite and PostgreSQL: exact round trips in minor units,
the credit balance and the next invoice, idempotency keys, nothing written when a note fails, the
CLI, and the 0001 → 0002 migration of a database that already holds a book."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from dbkit import Db, FakeBook, invoice, line, scripted_command
from sqlalchemy import inspect, select

from billing import service
from billing.book import BookError, Outcome
from billing.catalog import AddOn, Catalog, Plan
from billing.cli import cli
from billing.persistence import UnitOfWork, upgrade
from billing.persistence.tables import Base, CreditNoteLineRow, CreditNoteRow
from billing.records import CreditNote, CreditNoteLine
from billing.scenario import ScenarioError, Settings

TEAM = Plan(code="team", name="Team", interval="month", pricing="per_unit", prices={"USD": "50.00"})
ANALYTICS = AddOn(code="analytics", name="Analytics", interval="month", prices={"USD": "250.00"})
CATALOG = Catalog(plans=[TEAM], addons=[ANALYTICS])


def everything(db: Db) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with db.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(select(table).order_by(*table.primary_key.columns)).all()
            out[table.name] = [tuple(r) for r in rows]
    return out


@pytest.fixture
def acme(db: Db) -> Db:
    """acme (USD, 20 % tax): 10 seats of team and analytics from Jan 1, 2026; INV-0001 is
    500.00 + 250.00 + 150.00 tax = 900.00."""
    service.load_catalog(db.engine, CATALOG, Settings())
    service.create_customer(db.engine, customer="acme", currency="USD", tax_rate="0.20", at="2026-01-01", actor="t")
    service.subscribe(db.engine, customer="acme", subscription="acme-team", plan="team", quantity=10,
                      addons={"analytics": 1}, at="2026-01-01", actor="t")
    service.run_invoices(db.engine, "2026-01-01", actor="t")
    return db


def test_round_trip_and_the_credit_on_the_next_invoice(acme: Db) -> None:
    before = service.get_invoice(acme.engine, "INV-0001")
    first = service.issue_credit_note(acme.engine, invoice="INV-0001", lines=[(1, "100.00")],
                                      reason="product_unsatisfactory", at="2026-01-10", actor="support")
    second = service.issue_credit_note(acme.engine, invoice="INV-0001",
                                       lines=[{"line": 0, "amount": Decimal("33.33")}, 1],
                                       reason="duplicate", at="2026-01-12", actor="support")
    assert (first.number, str(first.subtotal), str(first.tax), str(first.total)) == ("CN-0001", "100.00", "20.00",
                                                                                     "120.00")
    assert second == CreditNote(
        number="CN-0002", invoice="INV-0001", customer="acme", currency="USD", issued_at=second.issued_at,
        reason="duplicate",
        lines=(CreditNoteLine(invoice_line=0, kind="plan", description="Team × 10", amount=Decimal("33.33")),
               CreditNoteLine(invoice_line=1, kind="addon", description="Analytics", amount=Decimal("150.00"))),
        subtotal=Decimal("183.33"), tax=Decimal("36.67"), total=Decimal("220.00"))
    assert service.list_credit_notes(acme.engine) == [first, second]
    assert service.list_credit_notes(acme.engine, invoice="INV-0001", customer="acme") == [first, second]
    assert service.list_credit_notes(acme.engine, invoice="INV-0002") == []
    assert service.list_credit_notes(acme.engine, customer="other") == []
    with acme.engine.connect() as conn:  # integer minor units, lines pointing at the invoice lines
        assert conn.execute(select(CreditNoteRow.number, CreditNoteRow.subtotal, CreditNoteRow.tax,
                                   CreditNoteRow.total).order_by(CreditNoteRow.seq)).all() == [
            ("CN-0001", 10000, 2000, 12000), ("CN-0002", 18333, 3667, 22000)]
        assert conn.execute(select(CreditNoteLineRow.credit_note_number, CreditNoteLineRow.line_index,
                                   CreditNoteLineRow.invoice_number, CreditNoteLineRow.invoice_line_index,
                                   CreditNoteLineRow.amount)
                            .order_by(CreditNoteLineRow.credit_note_number, CreditNoteLineRow.line_index)).all() == [
            ("CN-0001", 0, "INV-0001", 1, 10000), ("CN-0002", 0, "INV-0001", 0, 3333),
            ("CN-0002", 1, "INV-0001", 1, 15000)]
    # the invoice is as issued, the customer holds the credit, MRR did not move
    assert service.get_invoice(acme.engine, "INV-0001") == before
    customer = service.get_customer(acme.engine, "acme")
    assert (str(customer.credit_balance), str(customer.mrr)) == ("340.00", "750.00")
    assert len(service.list_movements(acme.engine)) == 1
    [february] = service.run_invoices(acme.engine, "2026-02-01", actor="t").issued
    assert (str(february.total), str(february.credit_applied), str(february.amount_due)) == ("900.00", "340.00",
                                                                                             "560.00")
    assert str(service.get_customer(acme.engine, "acme").credit_balance) == "0.00"


def test_idempotency_key_issues_a_note_once(acme: Db) -> None:
    kwargs: dict[str, Any] = dict(invoice="INV-0001", lines=[0], reason="other", at="2026-01-10", actor="t",
                                  idempotency_key="cn-1")
    first = service.issue_credit_note(acme.engine, **kwargs)
    after = everything(acme)
    again = service.issue_credit_note(acme.engine, **kwargs)
    assert again == first and first.number == "CN-0001"
    assert everything(acme) == after
    with pytest.raises(service.ServiceError, match="cn-1"):
        service.issue_credit_note(acme.engine, **(kwargs | {"lines": [(0, "1.00")]}))
    assert everything(acme) == after
    assert str(service.get_customer(acme.engine, "acme").credit_balance) == "600.00"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lines": [(0, "400.01")]}, BookError,
         "credit_note: lines[0].amount: 400.01 exceeds the 400.00 left to credit on INV-0001 line 0"),
        ({"lines": [0, 0]}, BookError, "credit_note: lines[1].line: INV-0001 line 0 is already credited by lines[0]"),
        ({"invoice": "INV-0404"}, BookError, "credit_note: invoice: unknown invoice 'INV-0404'"),
        ({"reason": "fraud"}, ScenarioError, "credit_note: reason: "),
        ({"lines": [(0, "0.00")]}, ScenarioError, "credit_note: lines[0].amount: "),
        ({"lines": [(0, 1.5)]}, ScenarioError, "credit_note: lines[0].amount: "),
        ({"lines": []}, ScenarioError, "credit_note: lines: "),
        ({"lines": ["0"]}, ScenarioError, "credit_note: lines[0]: give a line index"),
        ({"at": "2025-12-31"}, BookError, "credit_note: at: time goes backwards"),
    ],
)
def test_a_failing_note_writes_nothing(acme: Db, kwargs: dict[str, Any], error: type[Exception],
                                       message: str) -> None:
    service.issue_credit_note(acme.engine, invoice="INV-0001", lines=[(0, "100.00")], reason="other",
                              at="2026-01-05", actor="t")
    before = everything(acme)
    args: dict[str, Any] = dict(invoice="INV-0001", lines=[(0, "400.00")], reason="other", at="2026-01-10",
                                actor="t") | kwargs
    with pytest.raises(error) as raised:
        service.issue_credit_note(acme.engine, **args)
    assert str(raised.value).startswith(message)
    assert everything(acme) == before


def test_a_note_the_database_refuses_takes_the_whole_command_back(acme: Db,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A note on an invoice line that does not exist fails on the foreign key after the snapshot,
    the command and a first note were written: none of it stays."""
    before = everything(acme)
    monkeypatch.setattr(service, "Book", FakeBook)
    monkeypatch.setattr(FakeBook, "loads", staticmethod(lambda data: FakeBook(Settings(), CATALOG)))
    good = CreditNote(number="CN-0001", invoice="INV-0001", customer="acme", currency="USD",
                      issued_at=service.get_invoice(acme.engine, "INV-0001").issued_at, reason="other",
                      lines=(CreditNoteLine(invoice_line=0, kind="plan", description="x", amount=Decimal("1.00")),),
                      subtotal=Decimal("1.00"), tax=Decimal("0.20"), total=Decimal("1.20"))
    bad = good.model_copy(update={"number": "CN-0002", "lines": (good.lines[0].model_copy(
        update={"invoice_line": 7}),)})
    monkeypatch.setattr(FakeBook, "script", lambda book, event, index: Outcome(credit_notes=[good, bad]))
    with pytest.raises(Exception, match="(?i)foreign key|violates"):
        scripted_command(acme.engine, "2026-01-05", actor="t")
    assert everything(acme) == before
    # and a note for an invoice the database does not have
    monkeypatch.setattr(FakeBook, "script", lambda book, event, index: Outcome(
        issued=[invoice("INV-0002", "USD", [line("5.00", sub="acme-team")], customer="acme")],
        credit_notes=[good.model_copy(update={"invoice": "INV-0404"})]))
    with pytest.raises(Exception, match="(?i)foreign key|violates"):
        scripted_command(acme.engine, "2026-01-05", actor="t")
    assert everything(acme) == before


def test_void_is_refused_once_an_invoice_has_a_credit_note(acme: Db) -> None:
    service.issue_credit_note(acme.engine, invoice="INV-0001", lines=[(0, "1.00")], reason="other",
                              at="2026-01-05", actor="t")
    before = everything(acme)
    with pytest.raises(BookError, match="has credit note\\(s\\) CN-0001 and can no longer be voided"):
        service.void(acme.engine, invoice="INV-0001", at="2026-01-06", actor="t")
    assert everything(acme) == before


def test_replay_through_the_database_carries_the_credit_notes(empty_db: Db) -> None:
    fixture = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios" / "39-credit-note.json"
    from billing.replay import replay_in_memory
    from billing.scenario import parse_scenario_text

    scenario = parse_scenario_text(fixture.read_text(encoding="utf-8"))
    result = service.replay(scenario, empty_db.url)
    assert [n.number for n in result.credit_notes] == ["CN-0001", "CN-0002", "CN-0003"]
    assert result.to_json() == replay_in_memory(scenario).to_json()
    assert service.list_credit_notes(empty_db.engine, invoice="INV-0002") == result.credit_notes[2:]


def test_a_0001_database_with_a_book_migrates_to_0002(empty_db: Db) -> None:
    upgrade(empty_db.engine, "0001")
    tables = set(inspect(empty_db.engine).get_table_names())
    assert "credit_notes" not in tables
    upgrade(empty_db.engine)
    assert {"credit_notes", "credit_note_lines"} <= set(inspect(empty_db.engine).get_table_names())
    service.check_schema(empty_db.engine)
    with UnitOfWork(empty_db.engine) as uow:
        assert uow.ledger.credit_notes() == []
        assert uow.ledger.counts()["credit_notes"] == uow.ledger.counts()["credit_note_lines"] == 0


# --- the command line --------------------------------------------------------------------------


def run(*args: str) -> Result:
    return CliRunner(catch_exceptions=False).invoke(cli, list(args))


def test_cli_issues_and_lists_credit_notes(acme: Db) -> None:
    result = run("credit-note", "INV-0001", "--line", "0=33.33", "--line", "1", "--reason", "duplicate",
                 "--at", "2026-01-12", "--db", acme.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "CREDIT NOTE CN-0001 for INV-0001 (acme), issued 2026-01-12T00:00:00Z, reason: duplicate",
        "LINE  KIND   DESCRIPTION  CREDITED",
        "0     plan   Team × 10    33.33",
        "1     addon  Analytics    250.00",
        "subtotal 283.33 USD",
        "tax      56.67 USD",
        "total    340.00 USD",
        "340.00 USD added to acme's credit balance",
    ]
    again = run("credit-note", "INV-0001", "--line", "0=1", "--reason", "other", "--at", "2026-01-13", "--json",
                "--idempotency-key", "k1", "--db", acme.url)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) | {"lines": None} == {
        "number": "CN-0002", "invoice": "INV-0001", "customer": "acme", "currency": "USD",
        "issued_at": "2026-01-13T00:00:00Z", "reason": "other", "lines": None,
        "subtotal": "1.00", "tax": "0.20", "total": "1.20"}

    listed = run("credit-notes", "list", "--db", acme.url)
    assert listed.exit_code == 0
    assert [row.split()[:5] for row in listed.stdout.splitlines()[1:]] == [
        ["CN-0001", "INV-0001", "acme", "2026-01-12T00:00:00Z", "duplicate"],
        ["CN-0002", "INV-0001", "acme", "2026-01-13T00:00:00Z", "other"]]
    as_json = json.loads(run("credit-notes", "list", "--json", "--customer", "acme", "--invoice", "INV-0001",
                             "--db", acme.url).stdout)
    assert [n["total"] for n in as_json] == ["340.00", "1.20"]
    assert run("credit-notes", "list", "--invoice", "INV-0002", "--db", acme.url).stdout.strip() == "no credit notes"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--line", "0=900.00", "--reason", "other"], "credit_note: lines[0].amount: 900.00 exceeds the 500.00"),
        (["--line", "x", "--reason", "other"], "Invalid value for '--line': 'x': expected N or N=AMOUNT"),
        (["--line", "0=", "--reason", "other"], "Invalid value for '--line'"),
        (["--line", "0", "--reason", "fraud"], "Invalid value for '--reason'"),
        (["--line", "0"], "Missing option '--reason'"),
        (["--reason", "other"], "Missing option '--line'"),
        (["--line", "0=abc", "--reason", "other"], "credit_note: lines[0].amount: "),
    ],
)
def test_cli_errors_are_one_line(acme: Db, args: list[str], fragment: str) -> None:
    before = everything(acme)
    result = run("credit-note", "INV-0001", *args, "--at", "2026-01-12", "--db", acme.url)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    [message] = result.stderr.strip().splitlines()
    assert message.startswith("billing: error: ") and fragment in message
    assert everything(acme) == before
