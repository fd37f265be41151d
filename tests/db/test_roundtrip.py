"""Invoices, lines and movements survive the database exactly: integer minor units in the
columns, the same Decimals and UTC instants back out (USD 2 decimals, JPY 0, KWD 3)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from dbkit import Db, FakeBook, invoice, line, scripted_command, t
from sqlalchemy import select

from billing import service
from billing.book import Outcome
from billing.catalog import Catalog
from billing.money import MoneyError
from billing.persistence import UnitOfWork
from billing.persistence.tables import InvoiceLineRow, InvoiceRow, MovementLineRow, MovementRow
from billing.records import Contraction, Expansion, LineRef, New
from billing.scenario import Settings

USD = invoice("INV-1", "USD", [
    line("1234.56", quantity="25", unit="49.3824"),
    line("-274.19", kind="proration", quantity="10", unit="50.00"),
    line("-10.00", kind="discount", quantity=None, sub=None, start=None, end=None),
], tax="190.07", credit="0.01")
JPY = invoice("INV-2", "JPY", [line("5000", quantity="1"), line("1234", kind="usage", quantity="1234567.125",
                                                                  unit="0.001", included="1000")],
              customer="c2", tax="623")
KWD = invoice("INV-3", "KWD", [line("12.345", quantity="3", unit="4.115")], customer="c3", tax="0.617")


def movements() -> list[New | Expansion | Contraction]:
    common = {"reporting_currency": "USD", "cause": "subscribe", "event_index": 0}
    return [
        New(id=1, at=t("2026-01-01T00:00:00Z"), customer="c1", subscription="s1", currency="USD",
            mrr_before=Decimal("0.00"), mrr_after=Decimal("1234.56"), delta=Decimal("1234.56"),
            reporting_delta=Decimal("1234.56"), **common),
        Expansion(id=2, at=t("2026-01-15T09:30:00Z"), customer="c2", subscription="s2", currency="JPY",
                  subtype="seat", mrr_before=Decimal("5000"), mrr_after=Decimal("6234"), delta=Decimal("1234"),
                  reporting_delta=Decimal("8.23"), **common),
        Contraction(id=3, at=t("2026-01-20T00:00:00Z"), customer="c3", subscription=None, currency="KWD",
                    subtype="discount", mrr_before=Decimal("12.345"), mrr_after=Decimal("10.001"),
                    delta=Decimal("-2.344"), reporting_delta=Decimal("-7.63"), **common),
    ]


LINKS = [(1, LineRef(invoice="INV-1", line=0)), (2, LineRef(invoice="INV-2", line=1)),
         (2, LineRef(invoice="INV-2", line=0)), (1, LineRef(invoice="INV-1", line=1))]


@pytest.fixture
def scripted(db: Db, fake_book: type[FakeBook]) -> Db:
    fake_book.script = lambda book, event, index: Outcome(
        issued=[USD, JPY, KWD], movements=list(movements()), links=list(LINKS))
    service.load_catalog(db.engine, Catalog(), Settings())
    scripted_command(db.engine, "2026-02-01", actor="test")
    return db


def test_invoices_come_back_exactly(scripted: Db) -> None:
    assert service.list_invoices(scripted.engine) == [USD, JPY, KWD]
    kwd = service.get_invoice(scripted.engine, "INV-3")
    assert kwd.total == Decimal("12.962") and str(kwd.lines[0].amount) == "12.345"
    jpy = service.get_invoice(scripted.engine, "INV-2")
    assert str(jpy.total) == "6857" and jpy.lines[1].quantity == Decimal("1234567.125")
    assert jpy.lines[1].unit_amount == Decimal("0.001") and jpy.lines[1].included == Decimal("1000")


def test_amounts_are_stored_as_integer_minor_units(scripted: Db) -> None:
    with UnitOfWork(scripted.engine) as uow:
        rows = {r.number: r for r in uow.session.scalars(select(InvoiceRow))}
        uow.session.expunge_all()
        lines = {(r.invoice_number, r.line_index): r.amount for r in uow.session.scalars(select(InvoiceLineRow))}
        moves = {r.id: (r.mrr_after, r.delta, r.reporting_delta) for r in uow.session.scalars(select(MovementRow))}
    assert (rows["INV-1"].subtotal, rows["INV-1"].discount, rows["INV-1"].tax) == (96037, 1000, 19007)
    assert (rows["INV-1"].total, rows["INV-1"].credit_applied, rows["INV-1"].amount_due) == (114044, 1, 114043)
    assert (rows["INV-2"].subtotal, rows["INV-2"].tax, rows["INV-2"].total) == (6234, 623, 6857)
    assert (rows["INV-3"].total, rows["INV-3"].tax) == (12962, 617)
    assert lines == {("INV-1", 0): 123456, ("INV-1", 1): -27419, ("INV-1", 2): -1000,
                     ("INV-2", 0): 5000, ("INV-2", 1): 1234, ("INV-3", 0): 12345}
    assert moves == {1: (123456, 123456, 123456), 2: (6234, 1234, 823), 3: (10001, -2344, -763)}


def test_movements_come_back_with_their_invoice_lines(scripted: Db) -> None:
    stored = service.list_movements(scripted.engine)
    expected = movements()
    refs = {1: ("INV-1", 0, "INV-1", 1), 2: ("INV-2", 0, "INV-2", 1), 3: ()}
    assert [m.model_copy(update={"invoice_lines": ()}) for m in stored] == expected
    for m in stored:
        assert tuple(x for r in m.invoice_lines for x in (r.invoice, r.line)) == refs[m.id]
    assert [m.id for m in service.list_movements(scripted.engine, customer="c2")] == [2]


def test_instants_are_utc_aware_whatever_zone_they_were_written_in(db: Db, fake_book: type[FakeBook]) -> None:
    tokyo = timezone(timedelta(hours=9))
    at = datetime(2026, 3, 1, 9, 0, tzinfo=tokyo)
    shifted = USD.model_copy(update={"issued_at": at})
    fake_book.script = lambda book, event, index: Outcome(issued=[shifted])
    service.load_catalog(db.engine, Catalog(), Settings())
    scripted_command(db.engine, "2026-03-01", actor="test")
    back = service.get_invoice(db.engine, "INV-1")
    assert back.issued_at == at
    assert back.issued_at.utcoffset() == timedelta(0)
    assert back.issued_at.hour == 0


def test_an_unrounded_amount_is_refused_not_truncated(db: Db, fake_book: type[FakeBook]) -> None:
    bad = invoice("INV-9", "JPY", [line("10.5")])
    fake_book.script = lambda book, event, index: Outcome(issued=[bad])
    service.load_catalog(db.engine, Catalog(), Settings())
    with pytest.raises(MoneyError, match="not rounded"):
        scripted_command(db.engine, "2026-02-01")
    assert service.list_invoices(db.engine) == []


def test_links_are_not_duplicated_when_rediscovered(scripted: Db, fake_book: type[FakeBook]) -> None:
    fake_book.script = lambda book, event, index: Outcome(links=[LINKS[0], (3, LineRef(invoice="INV-3", line=0))])
    scripted_command(scripted.engine, "2026-03-01", actor="test")
    with UnitOfWork(scripted.engine) as uow:
        count = len(list(uow.session.scalars(select(MovementLineRow))))
    assert count == 5
    assert [(r.invoice, r.line) for r in service.list_movements(scripted.engine)[2].invoice_lines] == [("INV-3", 0)]
