"""Invoice runs as records: planned, drafting, finalizing, done (or failed), resumable.

A run at `as_of` is a row in `invoice_runs` and one row per customer due by then in
`invoice_run_customers` (planned in one INSERT … SELECT over `customer_books.due_at`). It then
works through the pending customers in creation order, a batch at a time; each batch is one
transaction: load the batch's customer parts in one query, assemble a book of them
(billing.shards), apply the run with the pure core, take the invoice numbers from the locked
`number_sequences` row, write parts, invoices, lines, billed periods, movements and links with
one statement per table (`billing.persistence.repository.Bulk`), and mark the batch's customers
done — or nothing at all if anything fails.

- **One customer, one writer.** On PostgreSQL a batch locks its customers' `customer_books` rows
  when it loads them (`FOR UPDATE`, key order) and holds them until it commits, so a command on
  one of them waits for the batch and then reads what it wrote; every writer locks customers
  before the sequences (`billing.service.load_parts`), so none waits in a cycle. On SQLite the
  write lock, taken first, serialises every writer.

- **Resume.** A run killed at any point (even `kill -9`) is resumed by the same command: the
  unfinished run at that `as_of` carries on with its pending customers; customers marked done
  were committed with their invoices and are not touched again.
- **Failures.** A customer the book refuses (bad data, a rating error) is recorded as failed
  with the reason and the run carries on; its part is left as it was, so it is still due and the
  next run at that date bills it.
- **Never twice.** What a run bills is taken out of the customer's part in the same transaction
  that writes the invoice, and `billed_periods` has one primary-key row per billed subscription
  period: a second invoice for it cannot be written, whatever the code does.
- **Gap-free numbers.** Numbers are taken at finalization from the sequence row, locked by the
  batch's transaction; a batch that rolls back takes none.
- **Dropped connections.** A batch that fails with a database error (a dropped connection, a
  serialization failure, a version conflict) is rolled back whole and retried.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from billing.book import Book, BookError, Outcome
from billing.gc_policy import fewer_collections
from billing.money import from_minor
from billing.persistence import ConcurrentModification, DatabaseError, Engine, UnitOfWork, claims, utc_now
from billing.persistence.claims import Claim
from billing.persistence.repository import defer_writes, hold_accumulations, ordered
from billing.persistence.usage_store import BatchedUsage
from billing.records import Invoice, LineRef
from billing.scenario import InvoiceRunEvent
from billing.shards import Counters, counters_of, renumber
from billing.usage import UsageSource

if TYPE_CHECKING:
    from billing.service import Applied

ProgressCallback = Callable[[int, int], None]
BATCH = 500
RETRIES = 5
SWITCH_INTERVAL = 0.001  # seconds; CPython's default is 0.005


@dataclass
class RunSummary:
    """What a run did: for the closing summary (`--json`)."""

    run_id: int | None
    as_of: datetime
    state: str
    customers: int = 0
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    invoices: int = 0
    totals: dict[str, Decimal] = field(default_factory=dict)
    credit_applied: dict[str, Decimal] = field(default_factory=dict)
    amount_due: dict[str, Decimal] = field(default_factory=dict)
    by_currency: dict[str, int] = field(default_factory=dict)  # invoices per currency
    seconds: float = 0.0
    dry_run: bool = False
    resumed: bool = False
    batches: int = 0
    retries: int = 0

    def count(self, invoices: Sequence[Invoice]) -> None:
        for invoice in invoices:
            cur = invoice.currency
            self.invoices += 1
            self.by_currency[cur] = self.by_currency.get(cur, 0) + 1
            self.totals[cur] = self.totals.get(cur, Decimal(0)) + invoice.total
            self.credit_applied[cur] = self.credit_applied.get(cur, Decimal(0)) + invoice.credit_applied
            self.amount_due[cur] = self.amount_due.get(cur, Decimal(0)) + invoice.amount_due

    def to_json(self) -> dict[str, object]:
        return {
            "run": self.run_id, "as_of": self.as_of.isoformat(), "state": self.state, "dry_run": self.dry_run,
            "resumed": self.resumed, "customers": self.customers, "done": self.done,
            "failed": [{"customer": c, "error": e} for c, e in self.failed], "invoices": self.invoices,
            "invoices_by_currency": dict(sorted(self.by_currency.items())),
            "totals": {c: str(v) for c, v in sorted(self.totals.items())},
            "credit_applied": {c: str(v) for c, v in sorted(self.credit_applied.items())},
            "amount_due": {c: str(v) for c, v in sorted(self.amount_due.items())},
            "seconds": round(self.seconds, 3),
        }


class BatchUsage(BatchedUsage):
    """A usage source for one batch (billing.persistence.usage_store.BatchedUsage): the first
    time the book asks for a (metric, period), the aggregates of every subscription of the batch
    for it come from one grouped SQL query, never the events themselves into Python, so a batch's
    memory does not grow with its usage. `weighted_sum` asks per subscription; recording goes to
    the database. Its queries run on the batch's connection without SQLAlchemy's statement
    cache: their text names each subscription of the batch, so every batch size would add an
    entry (up to the cache's 500) and a run's memory would grow with its length."""

    def __init__(self, fallback: UsageSource, session: Any, book: Book, until: datetime) -> None:
        del fallback, until  # the batch's own session is the source; periods end where the book asks
        super().__init__(session.connection().execution_options(compiled_cache=None),
                         [sub.id for sub in book.subscriptions.values()
                          if sub.usage_open is not None or sub.usage_unbilled])


@dataclass
class _Batch:
    outcome: Outcome
    done: dict[str, int]
    failed: dict[str, str]
    end: Counters  # the shared counters once written


def run_invoices_event(engine: Engine, ev: InvoiceRunEvent, *, actor: str, idempotency_key: str | None = None,
                       index: int | None = None, clock: Callable[[], datetime] = utc_now,
                       progress: ProgressCallback | None = None) -> Applied:
    """`service.execute` for an invoice run: the run record, its batches, the combined outcome."""
    from billing.service import Applied, ServiceError, _recorded_outcome

    if idempotency_key is not None:
        payload = ev.model_dump(mode="json", by_alias=True)
        with UnitOfWork(engine) as uow:
            previous = uow.commands.by_key(idempotency_key)
            if previous is not None:
                if previous.payload != payload:
                    raise ServiceError(
                        f"idempotency key {idempotency_key!r} was already used for a different "
                        f"{previous.type} command (#{previous.id})")
                found = uow.runs.by_command(previous.id)
                if found is None or found.state in ("done", "failed"):
                    return Applied(_recorded_outcome(uow, previous), previous.id, duplicate=True)
    outcome = Outcome()
    summary = run(engine, ev, actor=actor, idempotency_key=idempotency_key, index=index, clock=clock,
                  progress=progress, collect=outcome)
    assert summary.run_id is not None
    with UnitOfWork(engine) as uow:
        stored = uow.runs.get(summary.run_id)
        assert stored is not None
        command_id = stored.command_id
    return Applied(outcome, command_id)


def run(engine: Engine, ev: InvoiceRunEvent, *, actor: str, idempotency_key: str | None = None,
        index: int | None = None, clock: Callable[[], datetime] = utc_now, progress: ProgressCallback | None = None,
        batch: int = BATCH, dry_run: bool = False, collect: Outcome | None = None,
        join: int | None = None, skip_locked: bool = False, claim_numbers: bool | None = None,
        fault: Callable[[int], None] | None = None) -> RunSummary:
    """Plan (or resume, or join) the run at `ev.at` and bill its customers batch by batch.

    `collect` receives every batch's outcome (the replay and `service.execute` need them; a
    large run leaves it out to keep memory flat). `fault(batch_number)` is called inside each
    batch's transaction before it commits (tests use it to break a batch). The collector runs
    less often meanwhile (billing.gc_policy). `claim_numbers` (default: when joining a run, as
    every worker of `--workers K` does): on PostgreSQL, claim each batch's numbers so concurrent
    workers number apart (`billing.persistence.claims`); a lone worker spares the claims, and a
    worker that does not claim is renumbered when another took its numbers, as before."""
    with fewer_collections():
        return _run(engine, ev, actor=actor, idempotency_key=idempotency_key, index=index, clock=clock,
                    progress=progress, batch=batch, dry_run=dry_run, collect=collect, join=join,
                    skip_locked=skip_locked,
                    claim_numbers=join is not None if claim_numbers is None else claim_numbers, fault=fault)


def _run(engine: Engine, ev: InvoiceRunEvent, *, actor: str, idempotency_key: str | None, index: int | None,
         clock: Callable[[], datetime], progress: ProgressCallback | None, batch: int, dry_run: bool,
         collect: Outcome | None, join: int | None, skip_locked: bool, claim_numbers: bool,
         fault: Callable[[int], None] | None) -> RunSummary:
    started = time.perf_counter()
    if dry_run:
        return _dry_run(engine, ev, index=index, batch=batch, started=started, collect=collect)
    run_id, command_id, resumed = _plan(engine, ev, actor=actor, idempotency_key=idempotency_key, index=index,
                                        clock=clock, join=join)
    summary = RunSummary(run_id=run_id, as_of=ev.at, state="drafting", resumed=resumed)
    with UnitOfWork(engine) as uow:
        counts = uow.runs.progress(run_id)
    total = sum(counts.values())
    done_count = counts["done"] + counts["failed"]
    pipelined = skip_locked and engine.dialect.name == "postgresql"
    attempt = 0

    def retry_or_give_up(exc: BaseException) -> None:
        nonlocal attempt
        attempt += 1
        summary.retries += 1
        if attempt > RETRIES:
            _give_up(engine, run_id, exc, clock=clock)
            raise exc
        time.sleep(min(0.05 * 2 ** attempt, 1.0))

    def written(result: _Batch) -> None:
        nonlocal attempt, done_count
        attempt = 0
        summary.batches += 1
        done_count += len(result.done) + len(result.failed)
        summary.count(result.outcome.issued)
        if collect is not None:
            collect.issued.extend(result.outcome.issued)
            collect.movements.extend(result.outcome.movements)
            collect.links.extend(result.outcome.links)
            collect.status_changes.extend(result.outcome.status_changes)
        if progress is not None:
            progress(done_count, total)

    with ThreadPoolExecutor(1, thread_name_prefix="run-writer") as writer, \
            (prompt_writer() if pipelined else nullcontext()):
        in_flight: Future[_Batch] | None = None
        floor: Counters | None = None
        while True:
            number = summary.batches + (in_flight is not None)
            drafted: _Drafted | None = None
            compute_error: BaseException | None = None
            try:
                drafted = _draft_batch(engine, run_id, command_id, ev, index=index, batch=batch, clock=clock,
                                       skip_locked=skip_locked, number=number, pipelined=pipelined,
                                       claiming=pipelined and claim_numbers,
                                       floor=floor if in_flight is not None else None)
            except (DatabaseError, ConcurrentModification) as exc:
                compute_error = exc
            except Exception as exc:
                _settle_quietly(in_flight)
                _give_up(engine, run_id, exc, clock=clock)
                raise
            write_failed = False
            prior: Counters | None = None  # the real counters after the batch written meanwhile
            if in_flight is not None:
                try:
                    result = in_flight.result()
                    prior = result.end
                    written(result)
                except (DatabaseError, ConcurrentModification) as exc:
                    write_failed = True
                    _discard(drafted)
                    drafted = None
                    retry_or_give_up(exc)
                except Exception as exc:
                    _discard(drafted)
                    _give_up(engine, run_id, exc, clock=clock)
                    raise
                finally:
                    in_flight = None
            if compute_error is not None:
                retry_or_give_up(compute_error)
                continue
            if drafted is None:
                if write_failed:
                    continue  # its customers are pending again: claim them anew
                break
            if pipelined:  # the next batch is drafted while this one is written, numbered past it
                floor = _expected_end(drafted, prior)
                in_flight = writer.submit(_write_batch, drafted, run_id, command_id, fault)
                continue
            try:
                written(_write_batch(drafted, run_id, command_id, fault))
            except (DatabaseError, ConcurrentModification) as exc:
                retry_or_give_up(exc)
            except Exception as exc:
                _give_up(engine, run_id, exc, clock=clock)
                raise
    return _close(engine, run_id, command_id, summary, clock=clock, started=started)


@contextmanager
def prompt_writer(interval: float = SWITCH_INTERVAL) -> Iterator[None]:
    """While a pipelined worker runs, the thread holding the GIL is asked to hand it over after
    `interval` seconds instead of CPython's 5 ms: each statement the writer thread sends returns
    while the drafting thread computes, and the writer (a few ms of Python per batch) would
    otherwise wait up to 5 ms for the GIL after every one of its dozens of statements, leaving
    the server idle. The interval is put back as it was afterwards (it is the process's)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, before))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _expected_end(drafted: _Drafted, prior: Counters | None) -> Counters:
    """The counters a drafted batch will leave once written: its own end, moved by how far the
    batch written meanwhile (`prior`, its real end: where this one will start) ended from where
    this one was numbered from."""
    end = counters_of(drafted.book)
    if prior is None or drafted.base is None or drafted.claim is not None:  # a claimed batch ends where it claimed
        return end
    base = drafted.base
    return Counters(invoice=end.invoice - base.invoice + prior.invoice,
                    movement=end.movement - base.movement + prior.movement,
                    change=end.change - base.change + prior.change)


def _settle_quietly(in_flight: Future[_Batch] | None) -> None:
    """Let a batch being written finish (or fail) before the run gives up."""
    if in_flight is not None:
        try:
            in_flight.result()
        except Exception:  # noqa: BLE001,S110 - the run is failing for another reason, reported by the caller
            pass


def _discard(drafted: _Drafted | None) -> None:
    """Roll back a drafted batch that will not be written (its customers stay pending)."""
    if drafted is not None:
        drafted.uow.__exit__(None, None, None)


def _give_up(engine: Engine, run_id: int, exc: BaseException, *, clock: Callable[[], datetime]) -> None:
    """The run cannot go on (the database keeps failing, a bug): mark it failed with the reason;
    running the same command again resumes it."""
    try:
        with UnitOfWork(engine, clock=clock) as uow:
            uow.runs.set_state(run_id, "failed", now=uow.now(), error=f"{type(exc).__name__}: {exc}"[:2000])
            uow.commit()
    except DatabaseError:
        pass  # the database is gone: the run stays in drafting, which resumes the same way


def _plan(engine: Engine, ev: InvoiceRunEvent, *, actor: str, idempotency_key: str | None, index: int | None,
          clock: Callable[[], datetime], join: int | None) -> tuple[int, int, bool]:
    payload = ev.model_dump(mode="json", by_alias=True)
    with UnitOfWork(engine, clock=clock) as uow:
        uow.parts.lock_sequences(())  # two runs started at once plan one after the other
        if join is not None:
            stored = uow.runs.get(join)
            if stored is None:
                raise BookError(f"run {join} not found")
            return stored.id, stored.command_id, True
        if idempotency_key is not None:
            previous = uow.commands.by_key(idempotency_key)
            if previous is not None:
                found = uow.runs.by_command(previous.id)
                if found is not None:
                    return found.id, found.command_id, True
        unfinished = uow.runs.unfinished(ev.at)
        if unfinished is not None:
            if unfinished.state == "failed":
                uow.runs.set_state(unfinished.id, "drafting", now=uow.now())
                uow.commit()
            return unfinished.id, unfinished.command_id, True
        if uow.book.load() is None:
            from billing.service import ServiceError

            raise ServiceError("no catalog loaded; run `billing catalog load FILE` first")
        book_clock = uow.parts.clock()
        if book_clock is not None and ev.at < book_clock:
            where = f"events[{index}] (invoice_run): " if index is not None else "invoice_run: "
            raise BookError(f"{where}at: time goes backwards ({ev.at.isoformat()} is before "
                            f"{book_clock.isoformat()})")
        now = uow.now()
        command_id = uow.commands.add(recorded_at=now, at=ev.at, type=ev.type, payload=payload, actor=actor,
                                      idempotency_key=idempotency_key, event_index=index)
        run_id = uow.runs.create(as_of=ev.at, command_id=command_id, actor=actor, now=now)
        uow.runs.plan(run_id, ev.at)
        uow.runs.set_state(run_id, "drafting", now=now)
        uow.parts.set_clock(ev.at)
        uow.commit()
    return run_id, command_id, False


@dataclass
class _Drafted:
    """A batch computed in its open transaction (customers claimed and locked), not yet written.
    `base`: the counters its numbers start from when it takes them late; `writes`: its writes,
    prepared against `base` (pipelined batches), sent as they are if the sequences still hold
    `base` when the batch takes them."""

    uow: UnitOfWork
    customers: list[str]
    book: Book
    loaded: dict[str, int]
    sequences: dict[str, int]
    before: Any
    outcome: Outcome
    failed: dict[str, str]
    number: int
    base: Counters | None
    writes: list[Callable[[], object]] | None = None
    claim: Claim | None = None


def _draft_batch(engine: Engine, run_id: int, command_id: int, ev: InvoiceRunEvent, *, index: int | None,
                 batch: int, clock: Callable[[], datetime], skip_locked: bool, number: int,
                 pipelined: bool = False, claiming: bool = False, floor: Counters | None = None
                 ) -> _Drafted | None:
    """Open the batch's transaction, claim its customers and apply the run to them (None: no
    customer left to claim). The transaction stays open for `_write_batch`.

    A batch's numbers are taken in the transaction that writes it. With SKIP LOCKED claims
    (PostgreSQL workers) a batch computes first, numbering from the counters it expects (those it
    reads, or past the batch still being written: `floor`), and takes the real ones when it is
    written, renumbering if they differ — so workers compute in parallel; a pipelined worker also
    prepares the batch's writes here, while its previous batch is being written. Otherwise it
    takes the sequences before it computes. On SQLite it takes them first: their write lock
    serialises the batches, so whoever holds it sees every batch committed before (no customer
    claimed twice). On PostgreSQL it claims its customers' run rows (SKIP LOCKED) and locks their
    parts (`load_parts`) before the sequences, the order every writer takes them in."""
    from billing.service import _require_book

    uow = UnitOfWork(engine, clock=clock).__enter__()
    try:
        late = skip_locked
        postgres = uow.parts.postgres
        if not late and not postgres:
            uow.parts.lock_sequences(())
        customers = uow.runs.claim(run_id, batch, skip_locked=skip_locked or postgres)
        if not customers:
            uow.__exit__(None, None, None)
            return None
        stored = _require_book(uow)
        failed: dict[str, str] = {}
        try:
            book, loaded, sequences, before, outcome, base = _bill(uow, stored, ev, customers, index=index, late=late,
                                                                   floor=floor)
        except DatabaseError:
            raise
        except Exception:  # noqa: BLE001 - bad data in one customer: find whom, bill the others
            failed = _failing(uow, stored, ev, customers, index=index, late=late)
            good = [c for c in customers if c not in failed]
            book, loaded, sequences, before, outcome, base = _bill(uow, stored, ev, good, index=index, late=late,
                                                                   floor=floor)
        drafted = _Drafted(uow, customers, book, loaded, sequences, before, outcome, failed, number, base)
        if pipelined and base is not None:
            if claiming:
                _claim(engine, drafted, run_id)
            with defer_writes(uow.session) as writes:
                _writes(drafted, run_id, command_id)
            drafted.writes = writes
    except BaseException as exc:
        uow.__exit__(type(exc), exc, exc.__traceback__)
        raise
    return drafted


def _claim(engine: Engine, drafted: _Drafted, run_id: int) -> None:
    """Claim the numbers the drafted batch takes past every live claim (`billing.persistence.
    claims`) and number it from there, before its writes are prepared."""
    assert drafted.base is not None
    end = counters_of(drafted.book)
    counts = Counters(invoice=end.invoice - drafted.base.invoice, movement=end.movement - drafted.base.movement,
                      change=end.change - drafted.base.change)
    drafted.claim = claims.claim(engine, claims.take_ticket(drafted.uow.session), run_id, counts)
    if not _same_numbers(drafted.claim.base, drafted.base):
        drafted.outcome = renumber(drafted.book, drafted.outcome, drafted.claim.base, drafted.base)
        drafted.base = drafted.claim.base


def _write_prepared(drafted: _Drafted, run_id: int, command_id: int) -> dict[str, int]:
    """Lock the sequences and send the batch's prepared writes if they hold the numbers it was
    drafted with, else renumber it and write it anew. Returns the sequences."""
    assert drafted.base is not None
    sequences = drafted.uow.parts.lock_sequences(())
    real = Counters.of(sequences)
    if drafted.writes is not None and _same_numbers(real, drafted.base):
        for write in drafted.writes:
            write()
    else:
        drafted.outcome = renumber(drafted.book, drafted.outcome, real, drafted.base)
        _writes(drafted, run_id, command_id)
    return sequences


def _write_claimed(drafted: _Drafted, run_id: int, command_id: int) -> dict[str, int]:
    """Write a claimed batch. If the batch claimed before it has ended (always, with one worker),
    it locks the sequences and writes as an unclaimed batch does. Otherwise its writes that no
    other batch's can collide with go out at once, while that batch is still being written; then
    it waits for that batch to end, locks the sequences, and sends the rest (invoices, whose issue
    order continues the table's, what references them, and the additions to the rows every batch
    shares). If the sequences do not hold what it claimed, its early writes are rolled back to a
    savepoint and the batch is renumbered under the lock. Returns the sequences."""
    assert drafted.claim is not None and drafted.base is not None and drafted.writes is not None
    uow = drafted.uow
    session = uow.session
    if claims.turn_taken(session, drafted.claim.after):
        sequences = _write_prepared(drafted, run_id, command_id)
        claims.release(session, uow.engine, drafted.claim.ticket, Counters.of(sequences))
        return sequences
    savepoint = session.begin_nested()
    session.connection()  # the SAVEPOINT goes out now, before the writes sent on the connection itself
    collided = False
    with hold_accumulations(session) as shared:
        try:
            for write in drafted.writes:
                if not ordered(write):
                    write()
        except IntegrityError:  # a batch claimed before it took the same ids: renumbered below
            collided = True
    if not collided:
        claims.await_turn(session, drafted.claim.after)
        sequences = uow.parts.lock_sequences(())
        real = Counters.of(sequences)
    if not collided and _same_numbers(real, drafted.base):
        for write in [*filter(ordered, drafted.writes), *shared]:
            write()
        savepoint.commit()
    else:
        savepoint.rollback()  # the writes and the sequence lock taken after the savepoint
        sequences = uow.parts.lock_sequences(())
        real = Counters.of(sequences)
        drafted.outcome = renumber(drafted.book, drafted.outcome, real, drafted.base)
        _writes(drafted, run_id, command_id)
    claims.release(session, uow.engine, drafted.claim.ticket, real)
    return sequences


def _write_batch(drafted: _Drafted, run_id: int, command_id: int, fault: Callable[[int], None] | None) -> _Batch:
    """Number (if late), write and commit a drafted batch; roll it back whole on any failure."""
    from billing.service import save_counters

    uow = drafted.uow
    try:
        sequences = drafted.sequences
        if drafted.claim is not None:
            sequences = _write_claimed(drafted, run_id, command_id)
        elif drafted.base is not None:
            sequences = _write_prepared(drafted, run_id, command_id)
        else:
            _writes(drafted, run_id, command_id)
        save_counters(uow, drafted.book, sequences)
        if fault is not None:
            fault(drafted.number)
        uow.commit()
    finally:
        uow.__exit__(None, None, None)
    return _Batch(drafted.outcome, _issued(drafted), drafted.failed, counters_of(drafted.book))


def _issued(drafted: _Drafted) -> dict[str, int]:
    """How many invoices the batch issued to each of its customers billed (not failed)."""
    issued: dict[str, int] = {c: 0 for c in drafted.customers if c not in drafted.failed}
    for invoice in drafted.outcome.issued:
        issued[invoice.customer] = issued.get(invoice.customer, 0) + 1
    return issued


def _same_numbers(real: Counters, base: Counters) -> bool:
    return (real.invoice, real.movement, real.change) == (base.invoice, base.movement, base.change)


def _writes(drafted: _Drafted, run_id: int, command_id: int) -> None:
    """Everything a batch writes but the shared counters and the clock: its customers' parts,
    invoices, billed periods, movements and links, the views, and its customers marked done."""
    from billing.service import _run_changes, _run_view_of, write_parts

    uow, book, outcome, failed = drafted.uow, drafted.book, drafted.outcome, drafted.failed
    now = uow.now()
    write_parts(uow, book, {c: v for c, v in drafted.loaded.items() if c not in failed})
    uow.ledger.add_invoices(outcome.issued, command_id)
    uow.parts.add_billed_periods(outcome.issued)
    uow.ledger.add_movements(outcome.movements, command_id,
                             command_key=f"run:{run_id}:{drafted.number}:{drafted.customers[0]}")
    own_links = [(m.id, ref) for m in outcome.movements for ref in m.invoice_lines]
    uow.ledger.add_links([*own_links, *outcome.links], command_id,
                         new_movements={m.id for m in outcome.movements},
                         new_invoices={i.number for i in outcome.issued})
    customers_changed, subscriptions_changed = _run_changes(drafted.before, _run_view_of(book))
    uow.parts.update_views(customers_changed, subscriptions_changed, now=now)
    uow.runs.finish(run_id, _issued(drafted), failed)


def _bill(uow: UnitOfWork, stored: Any, ev: InvoiceRunEvent, customers: Sequence[str], *, index: int | None,
          late: bool = False, floor: Counters | None = None
          ) -> tuple[Book, dict[str, int], dict[str, int], Any, Outcome, Counters | None]:
    """Assemble these customers' book and apply the run to it (nothing written yet); `late`:
    numbering from the counters expected (read after the parts, so above every number the
    parts hold; at least `floor`), nothing shared locked (see `billing.shards.renumber`)."""
    from billing.service import _run_view_of, load_parts

    book, loaded, sequences = load_parts(uow, stored, ev, customers, lock=not late)
    if book.clock is not None and book.clock > ev.at:
        # commands dated after the run's date came in while it ran (or before it was resumed):
        # their customers are already past it, and the run still bills what was due at its date
        book.clock = ev.at
    base: Counters | None = None
    if late:
        read = counters_of(book)
        base = Counters(invoice=max(read.invoice, floor.invoice if floor else 0),
                        movement=max(read.movement, floor.movement if floor else 0),
                        change=max(read.change, floor.change if floor else 0))
        book.next_invoice, book.next_movement, book.next_change = base.invoice, base.movement, base.change
    book.use_usage_source(BatchUsage(uow.usage, uow.session, book, ev.at))
    before = _run_view_of(book)
    outcome = book.apply(ev, index, discard_on_error=True) if customers else Outcome()
    return book, loaded, sequences, before, outcome, base


def _failing(uow: UnitOfWork, stored: Any, ev: InvoiceRunEvent, customers: Sequence[str], *,
             index: int | None, late: bool = False) -> dict[str, str]:
    """The customers of a batch the book refuses, each tried alone, with the reason (`late` as
    the batch: a batch that takes its numbers late does not lock the sequences to find them)."""
    failed: dict[str, str] = {}
    for customer in customers:
        try:
            _bill(uow, stored, ev, [customer], index=index, late=late)
        except DatabaseError:
            raise
        except BookError as exc:
            failed[customer] = str(exc)
        except Exception as exc:  # noqa: BLE001 - recorded against the customer, the run goes on
            failed[customer] = f"{type(exc).__name__}: {exc}"
    return failed


def _close(engine: Engine, run_id: int, command_id: int, summary: RunSummary, *, clock: Callable[[], datetime],
           started: float) -> RunSummary:
    with UnitOfWork(engine, clock=clock) as uow:
        counts = uow.runs.progress(run_id)
        stored = uow.runs.get(run_id)
        assert stored is not None
        if counts["pending"] == 0 and stored.state in ("planned", "drafting", "failed"):
            uow.runs.set_state(run_id, "finalizing", now=uow.now())
            uow.runs.set_state(run_id, "done", now=uow.now())
        uow.commit()
    with UnitOfWork(engine) as uow:
        stored = uow.runs.get(run_id)
        assert stored is not None
        counts = uow.runs.progress(run_id)
        summary.state = stored.state
        summary.customers = stored.customers
        summary.done = counts["done"]
        summary.failed = uow.runs.failures(run_id)
        if summary.resumed:  # the invoices written before the resume count too
            summary.invoices = 0
            summary.totals, summary.credit_applied, summary.amount_due, summary.by_currency = {}, {}, {}, {}
            for cur, count, total, credit, due in uow.runs.totals_of(command_id):
                summary.invoices += count
                summary.by_currency[cur] = count
                summary.totals[cur] = from_minor(total, cur)
                summary.credit_applied[cur] = from_minor(credit, cur)
                summary.amount_due[cur] = from_minor(due, cur)
    summary.seconds = time.perf_counter() - started
    return summary


def _dry_run(engine: Engine, ev: InvoiceRunEvent, *, index: int | None, batch: int, started: float,
             collect: Outcome | None) -> RunSummary:
    """What the run would bill, computed batch by batch in transactions that are rolled back."""
    from billing.service import _require_book, load_parts

    summary = RunSummary(run_id=None, as_of=ev.at, state="dry_run", dry_run=True)
    with UnitOfWork(engine) as uow:
        due = uow.parts.due_customers(ev.at)
    summary.customers = len(due)
    counters: Mapping[str, int] | None = None
    for start in range(0, len(due), batch):
        chunk = due[start:start + batch]
        with UnitOfWork(engine) as uow:
            stored = _require_book(uow)
            failed = _failing(uow, stored, ev, chunk, index=index)
            summary.failed.extend(failed.items())
            good = [c for c in chunk if c not in failed]
            book, _, _ = load_parts(uow, stored, ev, good)
            if book.clock is not None and book.clock > ev.at:
                book.clock = ev.at
            if counters is not None:
                _continue_counters(book, counters)
            book.use_usage_source(BatchUsage(uow.usage, uow.session, book, ev.at))
            outcome = book.apply(ev, index, discard_on_error=True) if good else Outcome()
            from billing.shards import counters_of

            counters = vars(counters_of(book))
            summary.count(outcome.issued)
            summary.done += len(chunk)
            if collect is not None:
                collect.issued.extend(outcome.issued)
            uow.rollback()
    summary.done -= len(summary.failed)
    summary.seconds = time.perf_counter() - started
    return summary


def _continue_counters(book: Book, counters: Mapping[str, int]) -> None:
    book.next_invoice = counters["invoice"]
    book.next_movement = counters["movement"]
    book.next_change = counters["change"]


def line_refs(outcome: Outcome) -> list[tuple[int, LineRef]]:
    return list(outcome.links)
