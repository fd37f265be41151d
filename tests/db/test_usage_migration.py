"""A book saved before 0004_usage kept its usage records inside the snapshot's subscriptions:
the migration moves them into `usage_events`, and the next run bills them as before."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from dbkit import Db
from sqlalchemy import text

from billing import service
from billing.book import Book
from billing.catalog import Catalog
from billing.persistence import upgrade
from billing.scenario import EVENT_ADAPTER, Settings
from billing.usage import UsageRecord

# a free plan: no MRR and no movement before the run, so the legacy book needs no ledger rows
CATALOG = Catalog.model_validate({
    "plans": [{"code": "p", "name": "P", "interval": "month", "pricing": "flat", "prices": {"USD": "0.00"}}],
    "metrics": [{"code": "api", "name": "API", "aggregation": "sum", "pricing": "per_unit",
                 "prices": {"USD": "0.50"}, "included": "2"}],
})


def _legacy_snapshot() -> bytes:
    book = Book(Settings(), CATALOG)
    for i, ev in enumerate([
        {"type": "customer", "at": "2026-01-01", "customer": "c", "currency": "USD"},
        {"type": "subscribe", "at": "2026-01-01", "customer": "c", "subscription": "s", "plan": "p"},
    ]):
        book.apply(EVENT_ADAPTER.validate_python(ev), i)
    records = [UsageRecord(datetime(2026, 1, 5, tzinfo=UTC), "api", Decimal("4"), "k1", {}),
               UsageRecord(datetime(2026, 1, 9, tzinfo=UTC), "api", Decimal("2.5"), "k2", {"region": "eu"})]
    sub = book.subscriptions["s"]
    sub.__dict__["usage"] = records  # as a snapshot saved before 0004_usage held them
    sub.__dict__["usage_keys"] = {"k1", "k2"}
    return book.dumps()


def test_records_in_an_old_snapshot_move_to_the_table_and_are_billed(empty_db: Db) -> None:
    engine = empty_db.engine
    upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO book_state (id, settings, catalog, snapshot, version, updated_at) "
                          "VALUES (1, :settings, :catalog, :snapshot, 1, :now)"),
                     {"settings": json.dumps(Settings().model_dump(mode="json")),
                      "catalog": json.dumps(CATALOG.model_dump(mode="json")),
                      "snapshot": _legacy_snapshot(), "now": datetime(2026, 1, 10, tzinfo=UTC)})
        # the customers / subscriptions view a command of that time refreshed
        now = datetime(2026, 1, 1, tzinfo=UTC)
        conn.execute(text("INSERT INTO customers (id, currency, tax_rate, timezone, locale, name, tags, mrr, "
                          "credit_balance, created_at, updated_at, version) VALUES ('c', 'USD', 0, 'UTC', 'en', 'c', "
                          "'{}', 0, 0, :now, :now, 1)"), {"now": now})
        conn.execute(text("INSERT INTO subscriptions (id, customer, plan, quantity, addons, status, "
                          "cancel_at_period_end, scheduled, created_at, updated_at, version) VALUES ('s', 'c', 'p', "
                          "1, '{}', 'active', false, '[]', :now, :now, 1)"), {"now": now})
    upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT subscription, key, at, value FROM usage_events ORDER BY seq")).all()
    assert [(r[0], r[1], int(r[3])) for r in rows] == [("s", "k1", 4_000_000), ("s", "k2", 2_500_000)]
    # a repeated key is still a duplicate, and the next run bills 4 + 2.5 − 2 included = 4.5 × 0.50
    service.apply_event(engine, {"type": "usage", "at": "2026-01-20", "subscription": "s", "metric": "api",
                                 "value": "9", "id": "k1"}, actor="test")
    outcome = service.apply_event(engine, {"type": "invoice_run", "at": "2026-02-01"}, actor="test")
    usage = [ln for inv in outcome.issued for ln in inv.lines if ln.kind == "usage"]
    assert [(ln.quantity, ln.amount) for ln in usage] == [(Decimal("6.5"), Decimal("2.25"))]
