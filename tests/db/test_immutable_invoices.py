"""Issued invoices, their lines and credit notes cannot be edited or deleted, even by SQL behind
the engine's back (migration 0006 triggers): only an invoice's status moves, from finalized to
paid or void. On SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from dbkit import Db
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing import service
from billing.scenario import parse_scenario_text

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"


def replay(db: Db, prefix: str) -> None:
    [path] = FIXTURES.glob(f"{prefix}-*.json")
    service.replay(parse_scenario_text(path.read_text(encoding="utf-8")), db.url)


def run_sql(db: Db, sql: str, **params: str) -> int:
    with db.engine.begin() as conn:
        return int(conn.execute(text(sql), params).rowcount)


@pytest.mark.parametrize("sql", [
    "UPDATE invoices SET total = total + 1 WHERE number = 'INV-0001'",
    "UPDATE invoices SET status = 'paid', amount_due = 0 WHERE number = 'INV-0002'",
    "UPDATE invoices SET status = 'finalized' WHERE number = 'INV-0001'",
    "DELETE FROM invoices WHERE number = 'INV-0002'",
    "UPDATE invoice_lines SET amount = 1 WHERE invoice_number = 'INV-0001'",
    "DELETE FROM invoice_lines WHERE invoice_number = 'INV-0002'",
    "UPDATE credit_notes SET total = 0",
    "DELETE FROM credit_note_lines",
], ids=["total", "status-and-amount", "paid-back-to-finalized", "delete-invoice", "line-amount", "delete-line",
        "credit-note", "delete-credit-note-line"])
def test_an_issued_invoice_cannot_be_edited(db: Db, sql: str) -> None:
    replay(db, "39")
    with db.engine.connect() as conn:
        before = conn.execute(text("SELECT number, status, total FROM invoices ORDER BY number")).all()
    with pytest.raises(DBAPIError, match="immutable once issued"):
        run_sql(db, sql)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT number, status, total FROM invoices ORDER BY number")).all() == before


def test_only_the_status_moves_from_finalized(db: Db) -> None:
    replay(db, "39")
    with db.engine.connect() as conn:
        finalized = conn.execute(text("SELECT number FROM invoices WHERE status = 'finalized' ORDER BY number")
                                 ).scalars().all()
    assert finalized
    assert run_sql(db, "UPDATE invoices SET status = 'void' WHERE number = :n", n=finalized[0]) == 1
    with pytest.raises(DBAPIError, match="immutable once issued"):
        run_sql(db, "UPDATE invoices SET status = 'paid' WHERE number = :n", n=finalized[0])


def test_paying_and_voiding_through_the_engine_still_work(db: Db) -> None:
    replay(db, "32")  # pays one invoice and voids another through the engine
    with db.engine.connect() as conn:
        statuses = set(conn.execute(text("SELECT status FROM invoices")).scalars().all())
    assert {"paid", "void"} <= statuses
