"""Application services on a real book: one transaction per command, nothing written on error,
idempotency keys, validation naming the field, catalog loading rules, and replay through the
database giving exactly the in-memory result."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dbkit import Db, FakeBook, invoice, line, scripted_command
from sqlalchemy import select

from billing import service
from billing.book import BookError, Outcome
from billing.catalog import AddOn, Catalog, Plan
from billing.persistence import PersistenceError
from billing.persistence.tables import Base
from billing.replay import replay_in_memory
from billing.scenario import ScenarioError, Settings, parse_scenario_text

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))

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
    """acme (USD, 20 % tax) with 10 seats of team from Jan 1, 2026, invoiced on Jan 1."""
    service.load_catalog(db.engine, CATALOG, Settings())
    service.create_customer(db.engine, customer="acme", currency="USD", tax_rate="0.20",
                            at="2026-01-01", actor="t")
    service.subscribe(db.engine, customer="acme", subscription="acme-team", plan="team", quantity=10,
                      at="2026-01-01", actor="t")
    service.run_invoices(db.engine, "2026-01-01", actor="t")
    return db


def test_verbs_bill_to_the_cent(acme: Db) -> None:
    [first] = service.list_invoices(acme.engine)
    assert (first.subtotal, first.tax, first.total, first.amount_due) == (
        Decimal("500.00"), Decimal("100.00"), Decimal("600.00"), Decimal("600.00"))
    service.change_quantity(acme.engine, subscription="acme-team", quantity=25, at="2026-01-15", actor="t")
    service.add_addon(acme.engine, subscription="acme-team", addon="analytics", at="2026-01-15", actor="t")
    outcome = service.run_invoices(acme.engine, "2026-02-01", actor="t")
    [issued] = outcome.issued
    second = service.get_invoice(acme.engine, issued.number)
    assert second == issued
    assert [str(ln.amount) for ln in second.lines] == ["1250.00", "250.00", "-274.19", "685.48", "137.10"]
    assert (str(second.subtotal), str(second.tax), str(second.total)) == ("2048.39", "409.68", "2458.07")

    moves = service.list_movements(acme.engine)
    assert [(m.type, m.subtype, str(m.mrr_after), str(m.delta)) for m in moves] == [
        ("new", None, "500.00", "500.00"),
        ("expansion", "seat", "1250.00", "750.00"),
        ("expansion", "add_on", "1500.00", "250.00"),
    ]
    assert [(r.invoice, r.line) for r in moves[1].invoice_lines] == [(second.number, 2), (second.number, 3)]

    service.pay(acme.engine, invoice=first.number, at="2026-02-02", actor="t")
    assert [i.status for i in service.list_invoices(acme.engine)] == ["paid", "finalized"]
    assert [i.number for i in service.list_invoices(acme.engine, status="finalized")] == [second.number]


def test_view_tracks_customers_and_subscriptions(acme: Db) -> None:
    service.cancel(acme.engine, subscription="acme-team", at="2026-01-20", actor="t")
    customer = service.get_customer(acme.engine, "acme")
    assert (customer.currency, customer.tax_rate, str(customer.mrr)) == ("USD", Decimal("0.20"), "500.00")
    [sub] = service.list_subscriptions(acme.engine, customer="acme")
    assert (sub.plan, sub.quantity, sub.status, sub.cancel_at_period_end) == ("team", 10, "active", True)
    assert sub.current_period_end is not None and sub.current_period_end.isoformat() == "2026-02-01T00:00:00+00:00"
    service.run_invoices(acme.engine, "2026-02-01", actor="t")
    [sub] = service.list_subscriptions(acme.engine)
    assert sub.status == "cancelled"
    assert str(service.get_customer(acme.engine, "acme").mrr) == "0.00"


def test_a_refused_command_leaves_the_database_exactly_as_it_was(acme: Db) -> None:
    before = everything(acme)
    with pytest.raises(BookError, match="unknown plan 'pro'"):
        service.change_plan(acme.engine, subscription="acme-team", plan="pro", at="2026-01-10", actor="t")
    with pytest.raises(BookError, match="time goes backwards"):
        service.change_quantity(acme.engine, subscription="acme-team", quantity=2, at="2025-12-01", actor="t")
    with pytest.raises(BookError, match="unknown invoice"):
        service.pay(acme.engine, invoice="INV-404", at="2026-01-10", actor="t")
    assert everything(acme) == before


def test_a_failure_after_partial_writes_rolls_everything_back(acme: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot is saved and the command row written before the invoices; a duplicate
    invoice number fails at the end and takes all of it back."""
    before = everything(acme)
    [existing] = service.list_invoices(acme.engine)
    monkeypatch.setattr(service, "Book", FakeBook)

    def from_real(data: bytes) -> FakeBook:
        return FakeBook(Settings(), CATALOG)

    monkeypatch.setattr(FakeBook, "loads", staticmethod(from_real))
    monkeypatch.setattr(FakeBook, "script", lambda book, event, index: Outcome(
        issued=[invoice("NEW-1", "USD", [line("5.00")]), invoice(existing.number, "USD", [line("5.00")])]))
    with pytest.raises(Exception, match="(?i)unique|duplicate|constraint"):
        scripted_command(acme.engine, "2026-01-05", actor="t")
    assert everything(acme) == before

    monkeypatch.setattr(FakeBook, "script", lambda book, event, index: Outcome(status_changes=[("NOPE", "paid")]))
    with pytest.raises(PersistenceError, match="NOPE"):
        scripted_command(acme.engine, "2026-01-05", actor="t")
    assert everything(acme) == before


def test_idempotency_key_applies_a_command_once(acme: Db) -> None:
    first = service.change_quantity(acme.engine, subscription="acme-team", quantity=12, at="2026-01-10",
                                    actor="t", idempotency_key="req-1")
    after_first = everything(acme)
    again = service.change_quantity(acme.engine, subscription="acme-team", quantity=12, at="2026-01-10",
                                    actor="t", idempotency_key="req-1")
    assert everything(acme) == after_first
    assert [m.id for m in again.movements] == [m.id for m in first.movements] == [2]
    assert str(again.movements[0].delta) == "100.00"
    with pytest.raises(service.ServiceError, match="req-1"):
        service.change_quantity(acme.engine, subscription="acme-team", quantity=13, at="2026-01-10",
                                actor="t", idempotency_key="req-1")
    assert everything(acme) == after_first
    applied = service.execute(acme.engine, {"type": "invoice_run", "at": "2026-02-01"}, actor="t",
                              idempotency_key="run-feb")
    repeat = service.execute(acme.engine, {"type": "invoice_run", "at": "2026-02-01"}, actor="t",
                             idempotency_key="run-feb")
    assert (applied.duplicate, repeat.duplicate) == (False, True)
    assert repeat.command_id == applied.command_id
    assert repeat.outcome.issued == applied.outcome.issued and len(applied.outcome.issued) == 1


def test_bad_arguments_name_the_field(acme: Db) -> None:
    before = everything(acme)
    with pytest.raises(ScenarioError, match=r"^subscribe: quantity: .*greater than or equal to 0"):
        service.subscribe(acme.engine, customer="acme", subscription="s2", plan="team", quantity=-1,
                          at="2026-01-10", actor="t")
    with pytest.raises(ScenarioError, match="usage: value"):
        service.record_usage(acme.engine, subscription="acme-team", metric="api", value=1.5,  # type: ignore[arg-type]
                             id="u1", at="2026-01-10", actor="t")
    with pytest.raises(ScenarioError, match=r"change_quantity\.quantty: unknown field"):
        service.apply_event(acme.engine, {"type": "change_quantity", "at": "2026-01-10",
                                          "subscription": "acme-team", "quantty": 3}, actor="t")
    with pytest.raises(ScenarioError, match="at: "):
        service.cancel(acme.engine, subscription="acme-team", at="yesterday", actor="t")
    with pytest.raises(BookError, match="events\\[7\\] \\(cancel\\)"):
        service.apply_event(acme.engine, {"type": "cancel", "at": "2026-01-10", "subscription": "nope"},
                            actor="t", index=7)
    assert everything(acme) == before


def test_commands_need_a_catalog_first(db: Db) -> None:
    with pytest.raises(service.ServiceError, match="no catalog loaded"):
        service.create_customer(db.engine, customer="acme", currency="USD", at="2026-01-01", actor="t")
    assert service.book_config(db.engine) is None


def test_catalog_can_be_replaced_before_use_and_only_extended_after(db: Db) -> None:
    assert service.load_catalog(db.engine, Catalog(plans=[TEAM])) == "created"
    assert service.load_catalog(db.engine, Catalog(plans=[TEAM])) == "unchanged"
    assert service.load_catalog(db.engine, CATALOG, Settings(rounding="half_even")) == "replaced"
    service.create_customer(db.engine, customer="acme", currency="USD", at="2026-01-01", actor="t")
    bigger = Catalog(plans=[TEAM, TEAM.model_copy(update={"code": "pro"})], addons=[ANALYTICS])
    assert service.load_catalog(db.engine, bigger) == "extended"
    service.subscribe(db.engine, customer="acme", subscription="s1", plan="pro", at="2026-01-02", actor="t")
    with pytest.raises(service.ServiceError, match="plan 'team' is in use"):
        service.load_catalog(db.engine, Catalog(plans=[TEAM.model_copy(update={"prices": {"USD": 60}})]))
    with pytest.raises(service.ServiceError, match="settings can no longer change"):
        service.load_catalog(db.engine, bigger, Settings())
    config = service.book_config(db.engine)
    assert config is not None and config[0].rounding == "half_even" and len(config[1].plans) == 2


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_replay_through_the_database_equals_the_in_memory_replay(path: Path, db: Db) -> None:
    scenario = parse_scenario_text(path.read_text(encoding="utf-8"))
    url = db.url if db.backend == "postgresql" else None
    if url is not None:
        db.engine.dispose()
    try:
        expected = replay_in_memory(scenario).to_json()
    except BookError as exc:  # a scenario the book refuses is refused the same way
        with pytest.raises(BookError) as raised:
            service.replay(scenario, url)
        assert str(raised.value) == str(exc)
        return
    assert service.replay(scenario, url).to_json() == expected


def test_replay_refuses_a_database_that_holds_a_book(acme: Db) -> None:
    scenario = parse_scenario_text(FIXTURES[0].read_text(encoding="utf-8"))
    before = everything(acme)
    with pytest.raises(service.ServiceError, match="already holds a book"):
        service.replay(scenario, acme.url)
    assert everything(acme) == before


def test_replay_into_a_url_keeps_the_database(empty_db: Db) -> None:
    scenario = parse_scenario_text(FIXTURES[1].read_text(encoding="utf-8"))
    result = service.replay(scenario, empty_db.url)
    assert service.list_invoices(empty_db.engine) == result.invoices
    assert len(result.invoices) == 2
