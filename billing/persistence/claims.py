"""Number claims: the order in which concurrent PostgreSQL run workers write their batches, and
the numbers each expects to take (table `number_claims`, migration 0009).

Gap-free numbers are taken at commit from `number_sequences`, under its row lock, in the batch's
own transaction (`billing.runs`). A batch drafted while another worker's batch is drafted would
number from the same counters; the one written second found its numbers taken and was renumbered
while it held the lock, so two workers wrote one after the other. A claim is a forecast that keeps
them apart:

- a drafted batch takes a ticket and holds an advisory lock on it for its whole transaction;
- it claims the range after every live claim (a claim is live while its ticket's lock is held:
  a batch that committed deleted its row, one that rolled back or died let its lock go) and
  numbers from it, then sends its writes while the batch before it is still being written;
- it waits for the claim before it (`await_turn`) and only then locks the sequences: if they hold
  what it claimed, its writes stand; if not (a claim before it rolled back, a command took
  numbers meanwhile), it is renumbered as before, and the claims after it are moved by the same
  difference so that the next batches number right again (`release`).

Nothing here decides a number: a wrong forecast costs a renumbering, never a gap or a duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from billing.shards import Counters

NAMESPACE = 0x62696C6C  # 'bill': the first key of every advisory lock taken here
_CLAIMING = 0  # the second key serialising the claimers
TURN_TIMEOUT_MS = 2000  # past this a batch stops waiting for the one before it (renumbered if need be)
SERIES = ("invoice", "movement", "change")


_SHIFT = text(
    "UPDATE number_claims SET invoice_from = invoice_from + :invoice, invoice_to = invoice_to + :invoice, "
    "movement_from = movement_from + :movement, movement_to = movement_to + :movement, "
    "change_from = change_from + :change, change_to = change_to + :change "
    "WHERE ticket IN (SELECT ticket FROM number_claims WHERE ticket > :ticket FOR UPDATE SKIP LOCKED)")


@dataclass(frozen=True)
class Claim:
    ticket: int
    base: Counters  # where the batch expects to number from
    after: int | None  # the live claim before it, whose batch commits first


def _key(ticket: int) -> int:
    return ticket % 2_147_483_647 + 1  # int4, never _CLAIMING


def _claiming(connection: Connection) -> None:
    """Serialise the claimers; a claim is a hint that dies with its batch, so its commit need not
    wait for the disk (a claim lost in a crash is a claim whose batch is gone too)."""
    connection.execute(text("SET LOCAL synchronous_commit = off"))
    connection.execute(text("SELECT pg_advisory_xact_lock(:ns, :key)"), {"ns": NAMESPACE, "key": _CLAIMING})


def take_ticket(session: Session) -> int:
    """A ticket for the batch in `session`'s transaction, locked until the transaction ends (its
    claim is live exactly as long)."""
    return int(session.execute(text(
        "SELECT t, pg_advisory_xact_lock(:ns, (t % 2147483647 + 1)::int) "
        "FROM (SELECT nextval('number_claim_tickets') AS t) AS ticket"), {"ns": NAMESPACE}).scalar_one())


def claim(engine: Engine, ticket: int, run_id: int, counts: Counters) -> Claim:
    """Claim `counts` numbers of each series past the sequences and every live claim, in a
    transaction of its own (committed at once, so the next claimer sees it): one call of the
    `number_claim` function (migration 0009), which deletes on the way the claims left by
    batches that rolled back or died."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        row = connection.execute(text(
            "SELECT * FROM number_claim(:ticket, :run_id, :invoices, :movements, :changes, :ns)"),
            {"ticket": ticket, "run_id": run_id, "invoices": counts.invoice, "movements": counts.movement,
             "changes": counts.change, "ns": NAMESPACE}).one()
    base = Counters(invoice=int(row.invoice_from), movement=int(row.movement_from), change=int(row.change_from))
    return Claim(ticket, base, None if row.after is None else int(row.after))


def turn_taken(session: Session, after: int | None) -> bool:
    """Whether the batch of the claim before this one has ended already (committed or rolled
    back): always so with one worker. One round trip, no wait."""
    if after is None:
        return True
    return bool(session.execute(text("SELECT pg_try_advisory_xact_lock_shared(:ns, :key)"),
                                {"ns": NAMESPACE, "key": _key(after)}).scalar_one())


def await_turn(session: Session, after: int | None) -> None:
    """Wait until the batch of the claim before this one has committed or rolled back (at most
    TURN_TIMEOUT_MS: a batch may be held up for reasons of its own, and the sequence lock taken
    next keeps the numbers right whoever comes first)."""
    if after is None:
        return
    key = {"ns": NAMESPACE, "key": _key(after)}
    savepoint = session.begin_nested()
    try:
        session.execute(text(f"SET LOCAL lock_timeout = {TURN_TIMEOUT_MS}"))
        session.execute(text("SELECT pg_advisory_xact_lock_shared(:ns, :key)"), key)
    except OperationalError as exc:  # lock_timeout: go on without waiting further
        if getattr(exc.orig, "sqlstate", None) != "55P03":
            raise
        savepoint.rollback()
        return
    session.execute(text("SET LOCAL lock_timeout = DEFAULT"))
    savepoint.commit()


def release(session: Session, engine: Engine, ticket: int, real: Counters) -> None:
    """The batch is numbered from `real` (the sequences as locked): delete its claim in its own
    transaction (gone when it commits). If the claim expected other numbers, move every later
    claim by the difference, at once and in a transaction of its own, so the batches claimed
    next number from where this one ends."""
    row = session.execute(text(
        "DELETE FROM number_claims WHERE ticket = :ticket RETURNING invoice_from, movement_from, change_from"),
        {"ticket": ticket}).one_or_none()
    if row is None:
        return
    delta = {s: getattr(real, s) - int(getattr(row, f"{s}_from")) for s in SERIES}
    if not any(delta.values()):
        return
    with engine.connect() as connection:
        _claiming(connection)
        connection.execute(_SHIFT, {"ticket": ticket, **delta})
        connection.commit()
