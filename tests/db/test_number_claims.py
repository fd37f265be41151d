"""Number claims (`billing.persistence.claims`): concurrent PostgreSQL batches forecast disjoint
ranges in claim order, a claim lives exactly as long as its batch's transaction, and a batch
that finds other numbers moves the claims after it."""

from __future__ import annotations

import pytest
from dbkit import Db
from sqlalchemy import text
from sqlalchemy.orm import Session

from billing.persistence import claims
from billing.shards import Counters


@pytest.fixture
def pg(db: Db) -> Db:
    if db.backend != "postgresql":
        pytest.skip("only PostgreSQL workers claim numbers (SQLite has one writer)")
    with db.engine.begin() as connection:
        connection.execute(text("DELETE FROM number_sequences WHERE series IN ('invoice', 'movement', 'change')"))
        connection.execute(text("INSERT INTO number_sequences (series, prefix, next) VALUES "
                                "('invoice', 'INV-', 101), ('movement', '', 51), ('change', '', 7)"))
    return db


def _counts(invoice: int, movement: int, change: int) -> Counters:
    return Counters(invoice=invoice, movement=movement, change=change)


def _rows(db: Db) -> list[tuple[int, ...]]:
    with db.engine.connect() as connection:
        return [tuple(r) for r in connection.execute(text(
            "SELECT ticket, invoice_from, invoice_to, movement_from, movement_to, change_from, change_to "
            "FROM number_claims ORDER BY ticket"))]


def test_live_claims_get_consecutive_ranges_after_the_sequences(pg: Db) -> None:
    with Session(pg.engine) as first, Session(pg.engine) as second:
        a = claims.claim(pg.engine, claims.take_ticket(first), 1, _counts(10, 4, 1))
        b = claims.claim(pg.engine, claims.take_ticket(second), 1, _counts(3, 2, 0))
        assert (a.base.invoice, a.base.movement, a.base.change, a.after) == (101, 51, 7, None)
        assert (b.base.invoice, b.base.movement, b.base.change, b.after) == (111, 55, 8, a.ticket)
        assert _rows(pg) == [(a.ticket, 101, 111, 51, 55, 7, 8), (b.ticket, 111, 114, 55, 57, 8, 8)]


def test_a_claim_whose_batch_rolled_back_is_ignored_and_deleted(pg: Db) -> None:
    with Session(pg.engine) as gone:
        dead = claims.claim(pg.engine, claims.take_ticket(gone), 1, _counts(10, 4, 1))
        gone.rollback()  # its advisory lock goes with the transaction
    with Session(pg.engine) as live:
        c = claims.claim(pg.engine, claims.take_ticket(live), 1, _counts(2, 1, 0))
        assert (c.base.invoice, c.base.movement, c.base.change, c.after) == (101, 51, 7, None)
        assert [row[0] for row in _rows(pg)] == [c.ticket] and c.ticket > dead.ticket


def test_a_batch_numbered_elsewhere_moves_the_claims_after_it(pg: Db) -> None:
    with Session(pg.engine) as first, Session(pg.engine) as second:
        a = claims.claim(pg.engine, claims.take_ticket(first), 1, _counts(10, 4, 1))
        b = claims.claim(pg.engine, claims.take_ticket(second), 1, _counts(3, 2, 0))
        # a command took 2 invoice numbers and 1 movement id before `a` locked the sequences
        claims.release(first, pg.engine, a.ticket, _counts(103, 52, 7))
        assert _rows(pg) == [(a.ticket, 101, 111, 51, 55, 7, 8),  # deleted only when `first` commits
                             (b.ticket, 113, 116, 56, 58, 8, 8)]
        first.commit()
        assert _rows(pg) == [(b.ticket, 113, 116, 56, 58, 8, 8)]
        claims.release(second, pg.engine, b.ticket, _counts(113, 56, 8))  # as claimed: nothing moves
        second.commit()
        assert _rows(pg) == []


def test_a_batch_waits_its_turn_until_the_one_claimed_before_it_ends(pg: Db) -> None:
    with Session(pg.engine) as first, Session(pg.engine) as second:
        a = claims.claim(pg.engine, claims.take_ticket(first), 1, _counts(1, 0, 0))
        b = claims.claim(pg.engine, claims.take_ticket(second), 1, _counts(1, 0, 0))
        assert b.after == a.ticket
        assert not claims.turn_taken(second, b.after)
        second.execute(text("SET lock_timeout = 200"))
        with pytest.raises(Exception, match="lock timeout"):  # still held: it would wait
            second.execute(text("SELECT pg_advisory_xact_lock_shared(:ns, :key)"),
                           {"ns": claims.NAMESPACE, "key": claims._key(a.ticket)})
        second.rollback()
        first.commit()
    with Session(pg.engine) as third:
        assert claims.turn_taken(third, a.ticket) and claims.turn_taken(third, None)
        claims.await_turn(third, a.ticket)  # ended: no wait
        third.commit()
