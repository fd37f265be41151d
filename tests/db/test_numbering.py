"""Invoice numbers with settings `invoice_numbering` (README, Invoice numbers): a custom prefix
and width stay gap-free through a run that computes with provisional numbers and takes the real
ones at the end (the PostgreSQL worker path), and `scope: customer` gives every customer its own
gap-free series; `billing verify` finds nothing wrong with either."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from dbkit import Db
from pydantic import ValidationError
from sqlalchemy import text

from billing import service
from billing.catalog import Catalog
from billing.runs import run
from billing.scenario import InvoiceRunEvent, Settings
from expansion.verify import verify

CATALOG = Catalog.model_validate({"plans": [
    {"code": "basic", "name": "Basic", "interval": "month", "pricing": "flat", "prices": {"USD": "10.00"}}]})
JAN, FEB, MAR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3))


def _book(db: Db, numbering: dict[str, object], customers: int) -> None:
    service.load_catalog(db.engine, CATALOG, Settings.model_validate({"invoice_numbering": numbering}))
    events: list[dict[str, object]] = []
    for i in range(customers):
        events.append({"type": "customer", "at": JAN.isoformat(), "customer": f"k{i:02d}", "currency": "USD"})
        events.append({"type": "subscribe", "at": JAN.isoformat(), "customer": f"k{i:02d}",
                       "subscription": f"k{i:02d}-s", "plan": "basic"})
    service.apply_events(db.engine, events, actor="test")


def _numbers(db: Db) -> list[tuple[str, str]]:
    with db.engine.connect() as conn:
        return [(n, c) for n, c in conn.execute(text("SELECT number, customer FROM invoices ORDER BY seq"))]


def test_custom_prefix_stays_gap_free_through_provisional_numbers(db: Db) -> None:
    _book(db, {"prefix": "F-2026/", "digits": 5}, customers=7)
    for at in (JAN, FEB, MAR):  # batches of 3 computed with provisional numbers, renumbered at the end
        summary = run(db.engine, InvoiceRunEvent(type="invoice_run", at=at), actor="test", batch=3,
                      skip_locked=True)
        assert summary.state == "done" and summary.invoices == 7
    numbers = [n for n, _ in _numbers(db)]
    assert numbers == [f"F-2026/{i:05d}" for i in range(1, 22)]
    result = verify(db.engine)
    assert result.findings == [] and result.checked["invoice_numbering"] == 21


def test_customer_scope_gives_each_customer_its_own_series(db: Db) -> None:
    _book(db, {"prefix": "INV-", "scope": "customer", "digits": 3}, customers=4)
    for at in (JAN, FEB):
        run(db.engine, InvoiceRunEvent(type="invoice_run", at=at), actor="test", batch=3, skip_locked=True)
    found = _numbers(db)
    assert len(found) == 8
    for i in range(4):
        own = [n for n, c in found if c == f"k{i:02d}"]
        assert own == [f"INV-k{i:02d}-001", f"INV-k{i:02d}-002"]
    service.pay(db.engine, invoice="INV-k02-002", actor="test", at=datetime(2026, 2, 3, tzinfo=UTC))
    assert verify(db.engine).findings == []


@pytest.mark.parametrize(("numbering", "message"), [
    ({"prefix": "F2026"}, "cannot end with a digit"),
    ({"prefix": "IN V"}, "letters, digits and"),
    ({"prefix": ""}, "1 to 20 characters"),
    ({"scope": "region"}, "'book' or 'customer'"),
    ({"digits": 0}, "greater than or equal to 1"),
])
def test_bad_numbering_settings_are_named(numbering: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate({"invoice_numbering": numbering})
