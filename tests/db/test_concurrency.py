"""Two commands racing on one book cannot both win: the second save finds the version moved,
raises ConcurrentModification, and nothing of it is written."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from dbkit import Db
from sqlalchemy import func, select

from billing import service
from billing.catalog import Catalog
from billing.persistence import ConcurrentModification, PartWrite, UnitOfWork
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


def test_a_customer_part_changed_since_it_was_loaded_is_not_overwritten(db: Db) -> None:
    """Two sessions load the same customer's part; the second save finds the version moved and
    writes nothing (a run and a mid-cycle change on one customer cannot both win)."""
    from billing.catalog import Plan

    plan = Plan(code="team", name="Team", interval="month", pricing="per_unit", prices={"USD": "50.00"})
    service.load_catalog(db.engine, Catalog(plans=[plan]), Settings())
    service.create_customer(db.engine, customer="acme", currency="USD", at="2026-01-01", actor="t")
    with UnitOfWork(db.engine) as first, UnitOfWork(db.engine) as second:
        [mine] = first.parts.load(["acme"])
        [theirs] = second.parts.load(["acme"])
        first.parts.save([PartWrite("acme", mine.position, mine.snapshot, mine.version, None, None)])
        first.commit()
        with pytest.raises(ConcurrentModification, match="changed since it was loaded"):
            second.parts.save([PartWrite("acme", theirs.position, b"stale", theirs.version, None, None)])
    with UnitOfWork(db.engine) as check:
        [stored] = check.parts.load(["acme"])
        assert (stored.snapshot, stored.version) == (mine.snapshot, mine.version + 1)


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
