"""Two commands racing on one book cannot both win: the second save finds the version moved,
raises ConcurrentModification, and nothing of it is written."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from dbkit import Db, FakeBook, invoice, line
from sqlalchemy import func, select

from billing import service
from billing.book import Outcome
from billing.catalog import Catalog
from billing.persistence import ConcurrentModification, UnitOfWork
from billing.persistence.tables import CommandRow, InvoiceRow
from billing.scenario import Settings

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _count(db: Db, table: type[CommandRow] | type[InvoiceRow]) -> int:
    with UnitOfWork(db.engine) as uow:
        return uow.session.scalar(select(func.count()).select_from(table)) or 0


def test_second_of_two_sessions_loses_and_writes_nothing(db: Db) -> None:
    with UnitOfWork(db.engine) as setup:
        setup.book.create(Settings(), Catalog(), b"v1", now=NOW)
        setup.commit()

    with UnitOfWork(db.engine) as first, UnitOfWork(db.engine) as second:
        loaded_first = first.book.load()
        loaded_second = second.book.load()
        assert loaded_first is not None and loaded_second is not None
        assert loaded_first.version == loaded_second.version == 1

        assert first.book.save(b"first", expected_version=loaded_first.version, now=NOW) == 2
        first.commit()

        # the loser has already written a row of its own before it tries to save
        second.commands.add(recorded_at=NOW, at=NOW, type="invoice_run", payload={}, actor="b",
                            idempotency_key=None, event_index=None)
        with pytest.raises(ConcurrentModification, match="version 1"):
            second.book.save(b"second", expected_version=loaded_second.version, now=NOW)

    with UnitOfWork(db.engine) as check:
        stored = check.book.load()
        assert stored is not None
        assert (stored.snapshot, stored.version) == (b"first", 2)
        assert check.commands.count() == 0


def test_a_command_overtaken_mid_flight_is_rolled_back(db: Db, fake_book: type[FakeBook]) -> None:
    """While command A computes, command B commits; A's save fails and leaves no trace."""
    service.load_catalog(db.engine, Catalog(), Settings())
    racing = {"done": False}

    def script(book: FakeBook, event: object, index: int | None) -> Outcome:
        if not racing["done"]:
            racing["done"] = True
            service.run_invoices(db.engine, "2026-01-01", actor="B")  # commits first
            return Outcome(issued=[invoice("A-1", "USD", [line("10.00")])])
        return Outcome(issued=[invoice("B-1", "USD", [line("20.00")])])

    fake_book.script = script
    with pytest.raises(ConcurrentModification):
        service.run_invoices(db.engine, "2026-01-01", actor="A")

    assert [i.number for i in service.list_invoices(db.engine)] == ["B-1"]
    assert _count(db, CommandRow) == 1
    with UnitOfWork(db.engine) as uow:
        stored = uow.book.load()
        assert stored is not None and stored.version == 2
        assert FakeBook.loads(stored.snapshot).applied == 1

    # the loser simply retries on the new state
    fake_book.script = lambda book, event, index: Outcome(issued=[invoice("A-1", "USD", [line("10.00")])])
    service.run_invoices(db.engine, "2026-01-01", actor="A")
    assert [i.number for i in service.list_invoices(db.engine)] == ["B-1", "A-1"]
    assert _count(db, InvoiceRow) == 2


def test_view_rows_carry_a_version_bumped_on_each_change(db: Db) -> None:
    from billing.catalog import Plan

    plan = Plan(code="team", name="Team", interval="month", pricing="per_unit", prices={"USD": "50.00"})
    service.load_catalog(db.engine, Catalog(plans=[plan]), Settings())
    service.create_customer(db.engine, customer="acme", currency="USD", at="2026-01-01", actor="t")
    service.subscribe(db.engine, customer="acme", subscription="s1", plan="team", quantity=10,
                      at="2026-01-01", actor="t")
    with UnitOfWork(db.engine) as uow:
        assert uow.view.version_of("subscription", "s1") == 1
    service.change_quantity(db.engine, subscription="s1", quantity=12, at="2026-01-10", actor="t")
    service.change_quantity(db.engine, subscription="s1", quantity=15, at="2026-01-11", actor="t")
    with UnitOfWork(db.engine) as uow:
        assert uow.view.version_of("subscription", "s1") == 3
        # created, then its MRR moved three times
        assert uow.view.version_of("customer", "acme") == 4


def test_two_threads_racing_one_wins(db: Db, fake_book: type[FakeBook]) -> None:
    """Both commands load version 1 before either saves; exactly one commits."""
    service.load_catalog(db.engine, Catalog(), Settings())
    both_loaded = threading.Barrier(2, timeout=20)

    def script(book: FakeBook, event: object, index: int | None) -> Outcome:
        both_loaded.wait()
        name = threading.current_thread().name
        return Outcome(issued=[invoice(f"{name}-1", "USD", [line("10.00")])])

    fake_book.script = script
    errors: dict[str, BaseException] = {}

    def command(name: str) -> None:
        try:
            service.run_invoices(db.engine, "2026-01-01", actor=name)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors[name] = exc

    threads = [threading.Thread(target=command, args=(n,), name=n) for n in ("A", "B")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(errors) == 1, errors
    [(loser, error)] = errors.items()
    assert isinstance(error, ConcurrentModification), repr(error)
    winner = "B" if loser == "A" else "A"
    assert [i.number for i in service.list_invoices(db.engine)] == [f"{winner}-1"]
    assert _count(db, CommandRow) == 1
