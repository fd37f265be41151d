"""Invoice runs at scale, with real processes: a run killed with SIGKILL and resumed bills every
due subscription exactly once with gap-free numbers, exactly as an uninterrupted run does; two
runs started at once share one run; a dropped connection rolls its batch back and the batch is
retried; a customer the book refuses is recorded with the reason and the run carries on; a dry
run writes nothing. The reference is the same book run uninterrupted on a SQLite file."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest
from dbkit import Db
from sqlalchemy import bindparam, text

from billing import runs
from billing.persistence import UnitOfWork, create_engine, utc_now
from billing.persistence.types import UTCDateTime
from billing.run_bench import AS_OF, build
from billing.runs import run
from billing.scenario import InvoiceRunEvent
from billing.shards import CustomerPart

SUBSCRIPTIONS = 300
BATCH = 20
RUN = InvoiceRunEvent(type="invoice_run", at=AS_OF)

CHILD = """
import os, sys
from billing.persistence import create_engine
from billing.run_bench import AS_OF
from billing.runs import run
from billing.scenario import InvoiceRunEvent
engine = create_engine(sys.argv[1])
kill_at = int(sys.argv[2])
def fault(batch):
    if batch == kill_at:
        os.kill(os.getpid(), 9)  # SIGKILL inside the batch's transaction, before its commit
run(engine, InvoiceRunEvent(type="invoice_run", at=AS_OF), actor="child", batch=int(sys.argv[3]), fault=fault,
    skip_locked=sys.argv[4] == "1")  # on PostgreSQL as `billing invoice-run` does: pipelined
"""


def _instant(name: str) -> Any:
    return bindparam(name, type_=UTCDateTime())


def _invoices(url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(str(v) for v in r) for r in conn.execute(text(
                "SELECT number, customer, billing_date, subtotal, discount, tax, total, credit_applied, amount_due "
                "FROM invoices WHERE issued_at >= :as_of ORDER BY seq").bindparams(_instant("as_of")),
                {"as_of": AS_OF})]
    finally:
        engine.dispose()


def _check_once_and_gap_free(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            numbers = [n for (n,) in conn.execute(text("SELECT number FROM invoices"))]
            assert sorted(int(n.removeprefix("INV-")) for n in numbers) == list(range(1, len(numbers) + 1))
            twice = conn.execute(text(
                "SELECT l.subscription, l.period_start, count(*) FROM invoice_lines l WHERE l.kind = 'plan' "
                "GROUP BY l.subscription, l.period_start, l.period_end HAVING count(*) > 1")).all()
            assert twice == []
            # every monthly subscription (all but the annual ones) is billed for February exactly once
            monthly = conn.execute(text(
                "SELECT count(*) FROM subscriptions WHERE plan <> 'team-annual'")).scalar_one()
            february = conn.execute(text(
                "SELECT count(DISTINCT subscription) FROM invoice_lines WHERE kind = 'plan' "
                "AND period_start = :feb").bindparams(_instant("feb")), {"feb": AS_OF}).scalar_one()
            assert february == monthly
            runs = conn.execute(text("SELECT state FROM invoice_runs")).all()
            assert runs and {r[0] for r in runs} == {"done"}
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('reference') / 'ref.sqlite'}"
    build(url, SUBSCRIPTIONS)
    engine = create_engine(url)
    summary = run(engine, RUN, actor="reference", batch=BATCH)
    engine.dispose()
    assert summary.state == "done" and summary.invoices > 100 and summary.failed == []
    _check_once_and_gap_free(url)
    return _invoices(url)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_run_killed_with_sigkill_and_resumed_bills_everyone_exactly_once(
        db: Db, reference: list[tuple[Any, ...]], seed: int) -> None:
    build(db.url, SUBSCRIPTIONS)
    batches = -(-len({r[1] for r in reference}) // BATCH)
    kill_at = random.Random(seed).randrange(batches)
    child = subprocess.run([sys.executable, "-c", CHILD, db.url, str(kill_at), str(BATCH),
                            "1" if db.backend == "postgresql" else "0"], capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    with UnitOfWork(db.engine) as uow:
        stored = uow.runs.latest()
        assert stored is not None and stored.state == "drafting"
        progress = uow.runs.progress(stored.id)
    assert progress["done"] == kill_at * BATCH and progress["pending"] > 0
    # resumed by running the same command again
    resumed = subprocess.run([sys.executable, "-c", "from billing.cli import main; main()", "invoice-run",
                              "--as-of", "2026-02-01", "--db", db.url, "--quiet"], capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert "(resumed)" in resumed.stdout.decode()
    _check_once_and_gap_free(db.url)
    assert _invoices(db.url) == reference
    # and once more: nothing new
    again = run(db.engine, RUN, actor="t", batch=BATCH)
    assert again.invoices == 0 and not again.resumed


def test_two_runs_started_at_once_share_one_run(db: Db, reference: list[tuple[Any, ...]]) -> None:
    build(db.url, SUBSCRIPTIONS)
    command = [sys.executable, "-c", "from billing.cli import main; main()", "invoice-run", "--as-of", "2026-02-01",
               "--db", db.url, "--quiet", "--json", "--batch", str(BATCH)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.decode() for _, e in outs]
    summaries = [json.loads(o) for o, _ in outs]
    # the second either joined the first's run or, started once it was done, found nothing due
    assert {s["run"] for s in summaries} <= {1, 2}
    assert all(s["invoices"] == [] for s in summaries if s["run"] == 2)
    assert sum(len(s["invoices"]) for s in summaries) == len(reference)
    _check_once_and_gap_free(db.url)
    if db.backend == "postgresql":  # two workers number in the order their batches are written
        assert sorted(row[1:] for row in _invoices(db.url)) == sorted(row[1:] for row in reference)
    else:  # one writer at a time: creation order
        assert _invoices(db.url) == reference


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_dropped_connection_rolls_the_batch_back_and_it_is_retried(
        db: Db, reference: list[tuple[Any, ...]], pipelined: bool) -> None:
    if pipelined and db.backend != "postgresql":
        pytest.skip("PostgreSQL workers draft the next batch while one is written")
    build(db.url, SUBSCRIPTIONS)
    dropped: list[int] = []

    def fault(batch: int) -> None:
        if batch == 2 and not dropped:
            dropped.append(batch)
            batch_uow = _current["uow"]
            with UnitOfWork(db.engine) as spy:  # another session: nothing of batch 2 is visible
                assert spy.runs.progress(1)["done"] == 2 * BATCH
            raise_on_commit(db, batch_uow)

    summary = run(db.engine, RUN, actor="t", batch=BATCH, fault=fault, skip_locked=pipelined)
    assert dropped == [2] and summary.retries == 1 and summary.state == "done"
    _check_once_and_gap_free(db.url)
    assert _invoices(db.url) == reference


def test_a_pipelined_worker_hands_the_gil_over_sooner_while_it_runs_and_restores_it(db: Db) -> None:
    build(db.url, SUBSCRIPTIONS)
    seen: list[float] = []
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        summary = run(db.engine, RUN, actor="t", batch=BATCH, skip_locked=db.backend == "postgresql",
                      fault=lambda _: seen.append(sys.getswitchinterval()))
        after = sys.getswitchinterval()
    finally:
        sys.setswitchinterval(before)
    assert summary.state == "done" and len(seen) == summary.batches > 1
    # PostgreSQL workers write a batch on a thread while drafting the next; SQLite runs one thread
    assert set(seen) == ({runs.SWITCH_INTERVAL} if db.backend == "postgresql" else {0.004})
    assert after == 0.004


def test_a_number_taken_while_a_batch_is_drafted_renumbers_it(db: Db, reference: list[tuple[Any, ...]],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipelined worker numbers the batch it drafts past the one being written; when another
    worker takes numbers in between, the batch takes the real ones when it is written."""
    if db.backend != "postgresql":
        pytest.skip("PostgreSQL workers draft the next batch while one is written")
    build(db.url, SUBSCRIPTIONS)
    original_draft = runs._draft_batch
    joined: list[Any] = []

    def draft(engine: Any, run_id: int, *args: Any, **kwargs: Any) -> Any:
        drafted = original_draft(engine, run_id, *args, **kwargs)
        if drafted is not None and drafted.number == 1 and not joined:  # batch 0 is being written meanwhile
            # another worker joins and bills every customer not locked: its first batch waits for
            # batch 0's numbers, then takes the ones this batch was numbered with
            joined.append(None)
            joined[0] = run(db.engine, RUN, actor="other", batch=BATCH, join=run_id, skip_locked=True)
        return drafted

    monkeypatch.setattr(runs, "_draft_batch", draft)
    renumbered = _count_calls(monkeypatch, runs, "renumber")
    summary = run(db.engine, RUN, actor="t", batch=BATCH, skip_locked=True)
    assert summary.state == "done" and summary.failed == []
    assert len(joined) == 1 and joined[0].batches > 0
    assert renumbered  # at least this worker's batch 1 (and the joined worker's first)
    _check_once_and_gap_free(db.url)
    billed = _invoices(db.url)
    assert sorted(row[1:] for row in billed) == sorted(row[1:] for row in reference)  # numbers apart


_current: dict[str, Any] = {}


def raise_on_commit(db: Db, uow: UnitOfWork) -> None:
    """Drop the batch's connection under it: PostgreSQL terminates the backend, SQLite closes
    the file handle; the commit that follows fails."""
    connection = uow.session.connection()
    if db.backend == "postgresql":
        try:
            connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        except Exception:  # noqa: BLE001,S110 - the backend is gone: that is the point
            pass
    else:
        connection.connection.dbapi_connection.close()  # type: ignore[union-attr]


@pytest.fixture(autouse=True)
def _spy_on_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the unit of work of the batch being written at hand, so a fault can reach its
    connection (on PostgreSQL workers the next batch is already drafted in another)."""
    original = runs._write_batch

    def write(drafted: Any, *args: Any) -> Any:
        _current["uow"] = drafted.uow
        return original(drafted, *args)

    monkeypatch.setattr(runs, "_write_batch", write)


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_customer_the_book_refuses_is_recorded_and_the_run_carries_on(db: Db, pipelined: bool) -> None:
    if pipelined and db.backend != "postgresql":
        pytest.skip("PostgreSQL workers draft the next batch while one is written")
    build(db.url, 60)
    with UnitOfWork(db.engine) as uow:
        [victim] = uow.parts.load(["c0000004"])
        part = CustomerPart.loads(victim.snapshot)
        for sub in part.subscriptions.values():
            sub.items.plan = "withdrawn"  # bad data: a plan the catalog does not have
            for lp in sub.unbilled:
                lp.items.plan = "withdrawn"
        uow.session.execute(text("UPDATE customer_books SET snapshot = :s WHERE customer = 'c0000004'"),
                            {"s": pickle.dumps(part)})
        uow.commit()
    summary = run(db.engine, RUN, actor="t", batch=BATCH, skip_locked=pipelined)
    assert summary.state == "done"
    assert [c for c, _ in summary.failed] == ["c0000004"]
    assert "withdrawn" in summary.failed[0][1]
    assert summary.done == summary.customers - 1 and summary.invoices > 20
    with UnitOfWork(db.engine) as uow:
        [still] = uow.parts.load(["c0000004"])
        assert still.version == victim.version  # left as it was: still due, retried by the next run
    again = run(db.engine, RUN, actor="t", batch=BATCH, skip_locked=pipelined)
    assert [c for c, _ in again.failed] == ["c0000004"] and again.invoices == 0 and again.run_id == 2


def test_a_dry_run_writes_nothing(db: Db, reference: list[tuple[Any, ...]]) -> None:
    build(db.url, SUBSCRIPTIONS)

    def counts() -> list[int]:
        with db.engine.connect() as conn:
            return [conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()  # noqa: S608
                    for t in ("invoices", "invoice_lines", "invoice_runs", "mrr_movements", "commands")]

    before = counts()
    with UnitOfWork(db.engine) as uow:
        versions = {p.customer: p.version for p in uow.parts.load_all()}
    summary = run(db.engine, RUN, actor="t", batch=BATCH, dry_run=True)
    assert summary.invoices == len(reference)
    assert sum(summary.totals.values()) > 0
    assert counts() == before
    with UnitOfWork(db.engine) as uow:
        assert {p.customer: p.version for p in uow.parts.load_all()} == versions


@pytest.mark.parametrize("option", [["--as-of", "2026-02-01", "--workers", "2"], ["--join", "999"]])
def test_sqlite_refuses_workers(db: Db, option: list[str]) -> None:
    """Before anything else: a run number that does not exist does not hide the reason."""
    if db.backend != "sqlite":
        pytest.skip("PostgreSQL takes workers")
    result = subprocess.run([sys.executable, "-c", "from billing.cli import main; main()", "invoice-run",
                             *option, "--db", db.url], capture_output=True, timeout=120, env={**os.environ})
    assert result.returncode == 2 and b"SQLite has one writer" in result.stderr
    with UnitOfWork(db.engine) as uow:
        assert uow.runs.get(1) is None  # nothing planned


def test_a_run_that_cannot_go_on_is_marked_failed_and_resumed_by_the_same_command(
        db: Db, reference: list[tuple[Any, ...]]) -> None:
    build(db.url, SUBSCRIPTIONS)

    def fault(batch: int) -> None:
        if batch == 1:
            raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="disk is full"):
        run(db.engine, RUN, actor="t", batch=BATCH, fault=fault)
    with UnitOfWork(db.engine) as uow:
        stored = uow.runs.latest()
        assert stored is not None and stored.state == "failed" and "disk is full" in (stored.error or "")
        assert uow.runs.progress(stored.id)["done"] == BATCH
    resumed = run(db.engine, RUN, actor="t", batch=BATCH)
    assert resumed.resumed and resumed.state == "done" and resumed.run_id == stored.id
    _check_once_and_gap_free(db.url)
    assert _invoices(db.url) == reference


def test_workers_on_postgresql_bill_everyone_once_with_gap_free_numbers(
        db: Db, reference: list[tuple[Any, ...]]) -> None:
    if db.backend != "postgresql":
        pytest.skip("SQLite has one writer")
    build(db.url, SUBSCRIPTIONS)
    result = subprocess.run([sys.executable, "-c", "from billing.cli import main; main()", "invoice-run",
                             "--as-of", "2026-02-01", "--db", db.url, "--workers", "3", "--batch", "10", "--quiet",
                             "--json"], capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    assert summary["state"] == "done" and summary["failed"] == []
    _check_once_and_gap_free(db.url)
    # the same invoices as one worker, numbered in the order the workers finalized them
    assert sorted(r[1:] for r in _invoices(db.url)) == sorted(r[1:] for r in reference)
    assert sorted(r[0] for r in _invoices(db.url)) == sorted(r[0] for r in reference)
    with UnitOfWork(db.engine) as uow:
        assert uow.runs.progress(1) == {"pending": 0, "done": summary["customers"], "failed": 0}
        # the workers joined the run, so each batch claimed its numbers and deleted its claim as it committed
        assert uow.session.scalar(text("SELECT count(*) FROM number_claims")) == 0
        assert uow.session.scalar(text("SELECT is_called FROM number_claim_tickets")) is True


def test_a_change_that_comes_in_while_a_run_is_unfinished_is_neither_lost_nor_billed_twice(
        db: Db, reference: list[tuple[Any, ...]]) -> None:
    from billing import service

    build(db.url, SUBSCRIPTIONS)
    child = subprocess.run([sys.executable, "-c", CHILD, db.url, "3", str(BATCH),
                            "1" if db.backend == "postgresql" else "0"], capture_output=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    with db.engine.connect() as conn:
        sub, quantity = conn.execute(text(
            "SELECT s.id, s.quantity FROM subscriptions s JOIN invoice_run_customers r ON r.customer = s.customer "
            "WHERE r.state = 'pending' AND s.plan = 'team' ORDER BY r.position LIMIT 1")).one()
    # mid-cycle, after the run's date: it advances the customers still waiting for the run
    service.change_quantity(db.engine, subscription=sub, quantity=quantity + 5, at="2026-02-10", actor="sales")
    resumed = run(db.engine, RUN, actor="t", batch=BATCH)
    assert resumed.resumed and resumed.state == "done" and resumed.failed == []
    _check_once_and_gap_free(db.url)
    assert len(_invoices(db.url)) == len(reference)
    with UnitOfWork(db.engine) as uow:
        assert uow.parts.clock() == datetime(2026, 2, 10, tzinfo=UTC)  # the clock never goes back
        mine = [i for i in uow.ledger.invoices() if any(line.subscription == sub for line in i.lines)]
    february = mine[-1]
    kinds = [line.kind for line in february.lines if line.subscription == sub]
    assert kinds.count("plan") == 1 and kinds.count("proration") == 2  # the change billed once, on that invoice
    assert [line.quantity for line in february.lines if line.subscription == sub and line.kind == "plan"] == [quantity]


def test_a_change_to_a_customer_of_a_batch_waits_until_the_batch_commits(
        db: Db, reference: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL: a batch (computing without the sequence lock, as workers do) holds its
    customers' `customer_books` rows from load to commit; a mid-cycle change on one of them
    waits on that row lock, then reads what the batch wrote — it is applied once, on top of the
    billed state, without losing a race (one attempt), and the run bills everyone once."""
    import threading

    from billing import service

    if db.backend != "postgresql":
        pytest.skip("row locks: on SQLite the batch holds the write lock, so every writer waits anyway")
    build(db.url, SUBSCRIPTIONS)
    attempts = _count_calls(monkeypatch, service, "_execute_once")
    seen: dict[str, Any] = {}

    def change(sub: str, quantity: int) -> None:
        try:
            service.change_quantity(db.engine, subscription=sub, quantity=quantity, at="2026-02-10", actor="sales")
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            seen["error"] = exc

    def fault(batch: int) -> None:
        if batch != 0:
            return
        batch_session = _current["uow"].session  # this batch's transaction: its customers are done in it
        customer, sub, quantity = batch_session.execute(text(
            "SELECT s.customer, s.id, s.quantity FROM subscriptions s JOIN invoice_run_customers r "
            "ON r.customer = s.customer WHERE r.state = 'done' AND s.plan = 'team' ORDER BY r.position LIMIT 1")).one()
        batch_pid = batch_session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with db.engine.connect() as conn:
            seen["version"] = conn.execute(text("SELECT version FROM customer_books WHERE customer = :c"),
                                           {"c": customer}).scalar_one()
        seen.update(customer=customer, sub=sub, quantity=quantity)
        worker = threading.Thread(target=change, args=(sub, quantity + 5))
        worker.start()
        seen["thread"] = worker
        waiting = 0
        with db.engine.connect() as conn:
            for _ in range(600):  # until the change queues behind this batch's row locks (no timing assumed)
                waiting = conn.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE :batch = ANY(pg_blocking_pids(pid)) "
                    "AND query LIKE 'SELECT customer_books.customer%'"), {"batch": batch_pid}).scalar_one()
                if waiting or not worker.is_alive():
                    break
                conn.execute(text("SELECT pg_sleep(0.05)"))
                conn.rollback()  # pg_stat_activity is read once per transaction
        assert waiting == 1 and worker.is_alive(), seen.get("error")  # blocked behind this uncommitted batch

    summary = run(db.engine, RUN, actor="t", batch=BATCH, skip_locked=True, fault=fault)
    seen["thread"].join(timeout=120)
    assert not seen["thread"].is_alive() and "error" not in seen
    assert attempts == [1]  # it waited instead of losing a race
    assert summary.state == "done" and summary.failed == []
    _check_once_and_gap_free(db.url)
    assert len(_invoices(db.url)) == len(reference)
    with UnitOfWork(db.engine) as uow:
        version = uow.session.execute(text("SELECT version FROM customer_books WHERE customer = :c"),
                                      {"c": seen["customer"]}).scalar_one()
        assert version == seen["version"] + 2  # the batch's write, then the change's on top of it
        view = uow.view.subscription(seen["sub"])
        assert view is not None and view.quantity == seen["quantity"] + 5
        invoices = [i for i in uow.ledger.invoices(customer=seen["customer"]) if i.billing_date == "2026-02-01"]
        assert [line.quantity for i in invoices for line in i.lines
                if line.subscription == seen["sub"] and line.kind == "plan"] == [seen["quantity"]]
        moved = [m for m in uow.ledger.movements(customer=seen["customer"])
                 if m.at == datetime(2026, 2, 10, tzinfo=UTC)]
        assert len(moved) == 1 and moved[0].type == "expansion"


def test_bulk_rows_are_stored_exactly_as_sqlalchemy_stores_them(db: Db) -> None:
    """`Bulk` (executemany on SQLite, array literals on PostgreSQL) stores every value kind the
    run writes — text with quotes, backslashes, commas, braces and newlines, big integers, exact
    decimals, instants in any zone with microseconds, dates, booleans, JSON, bytes, NULLs — as
    the column types do through SQLAlchemy, inserted and updated."""
    from datetime import date
    from decimal import Decimal
    from zoneinfo import ZoneInfo

    from sqlalchemy import JSON, BigInteger, Boolean, Column, Date, Integer, LargeBinary, MetaData, Table, Text

    from billing.persistence.repository import Bulk
    from billing.persistence.types import ExactDecimal

    meta = MetaData()
    kinds = (("s", "text"), ("n", "bigint"), ("d", "numeric"), ("t", "timestamptz"), ("day", "date"),
             ("b", "boolean"), ("j", "json"), ("blob", "bytea"))

    def table(name: str) -> Table:
        return Table(name, meta, Column("k", Integer, primary_key=True), Column("s", Text), Column("n", BigInteger),
                     Column("d", ExactDecimal()), Column("t", UTCDateTime()), Column("day", Date),
                     Column("b", Boolean), Column("j", JSON), Column("blob", LargeBinary))

    table("bulk_ours")
    theirs = table("bulk_theirs")
    meta.create_all(db.engine)
    values = [
        (1, "plain", 5, Decimal("50.00"), datetime(2026, 2, 1, tzinfo=UTC), date(2026, 2, 1), True, {"a": 1},
         b"\x00\\\"x"),
        (2, 'q"uo\\te, {brace} NULL\n\ttab é', -2**40, Decimal("1E+2"),
         datetime(2026, 3, 1, 1, 2, 3, 456789, tzinfo=ZoneInfo("America/New_York")), None, False, ["x", None], b""),
        (3, None, None, None, None, None, None, None, None),
    ]
    changed = [(2, "", 7, Decimal("0.0020"), datetime(2026, 1, 31, 23, 59, tzinfo=UTC), date(2027, 1, 1), True,
                {"b": '"'}, b"\x01")]

    def plain(row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(("k", *(name for name, _ in kinds)), row, strict=True))

    with UnitOfWork(db.engine) as uow:
        connection = uow.session.connection()
        connection.execute(theirs.insert(), [plain(r) for r in values])
        connection.execute(theirs.update().where(theirs.c.k == 2), plain(changed[0]))
        bulk = Bulk(uow.session)

        def converted(row: tuple[Any, ...]) -> tuple[Any, ...]:
            k, s, n, d, t, day, b, j, blob = row
            return (k, s, n, bulk.decimal(d), bulk.instant(t), bulk.day(day),
                    None if b is None else bulk.flag(b), bulk.json(j), blob)

        bulk.insert("bulk_ours", (("k", "integer"), *kinds), [converted(r) for r in values])
        assert bulk.update("bulk_ours", (("k", "integer"),), kinds, [converted(r) for r in changed]) == 1
        uow.commit()

    def stored(name: str) -> list[tuple[Any, ...]]:
        if db.backend == "postgresql":
            query = (f"SELECT k, s, n::text, d::text, t::text, day::text, b::text, j::text, "  # noqa: S608
                     f"encode(blob, 'hex') FROM {name} ORDER BY k")
        else:
            query = (f"SELECT k, s, typeof(n), n, typeof(d), d, typeof(t), t, typeof(day), day, "  # noqa: S608
                     f"typeof(b), b, j, typeof(blob), hex(blob) FROM {name} ORDER BY k")
        with db.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(query)]

    assert stored("bulk_ours") == stored("bulk_theirs")
    assert len(stored("bulk_ours")) == 3


@pytest.mark.parametrize("first_commits", [True, False])
def test_a_claimed_batch_written_while_the_one_before_it_is_open_waits_for_it(
        db: Db, first_commits: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two claimed batches drafted at once: the second numbers past the first's claim, sends its
    early writes, and waits for the first to end before it takes the sequences. If the first
    commits, the second's numbers stand; if it rolls back, the second's early writes roll back to
    the savepoint and it is renumbered under the lock. Either way nothing is billed twice and the
    numbers have no gap."""
    if db.backend != "postgresql":
        pytest.skip("only PostgreSQL workers claim numbers")
    build(db.url, SUBSCRIPTIONS)
    run_id, command_id, _ = runs._plan(db.engine, RUN, actor="t", idempotency_key=None, index=None,
                                       clock=utc_now, join=None)
    drafting = {"index": None, "batch": BATCH, "clock": utc_now, "skip_locked": True, "pipelined": True,
                "claiming": True}
    first = runs._draft_batch(db.engine, run_id, command_id, RUN, number=0, **drafting)
    second = runs._draft_batch(db.engine, run_id, command_id, RUN, number=1, **drafting)
    assert first is not None and second is not None and first.claim is not None and second.claim is not None
    assert second.claim.after == first.claim.ticket
    assert second.base is not None and first.base is not None
    assert second.base.invoice == first.base.invoice + len(first.outcome.issued) > first.base.invoice
    renumbered = _count_calls(monkeypatch, runs, "renumber")
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(runs._write_batch, second, run_id, command_id, None)
        time.sleep(0.5)
        assert not later.done()  # its turn comes when the first batch ends
        if first_commits:
            runs._write_batch(first, run_id, command_id, None)
        else:
            runs._discard(first)
        written = later.result(timeout=30)
    assert renumbered == ([] if first_commits else [1])
    numbers = sorted(int(i.number.removeprefix("INV-")) for i in written.outcome.issued)
    start = first.base.invoice + (len(first.outcome.issued) if first_commits else 0)
    assert numbers == list(range(start, start + len(numbers)))
    summary = run(db.engine, RUN, actor="t", batch=BATCH, join=run_id, skip_locked=True)  # the rest
    assert summary.state == "done" and summary.failed == []
    _check_once_and_gap_free(db.url)
    with UnitOfWork(db.engine) as uow:
        assert uow.session.scalar(text("SELECT count(*) FROM number_claims")) == 0


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Wrap `owner.name` for the test: a list that gets a 1 for each call, which goes through."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls
