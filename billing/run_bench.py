"""`billing bench invoice-run`: a realistic book of N subscriptions, one month-end invoice run,
and a plain bulk insert of the same invoice and line rows on the same database to compare with.

The book (built through the pure core in chunks, written with bulk inserts): customers in USD,
EUR, GBP and JPY with tax rates from 0 to 25 %, one to three subscriptions each — per-seat,
tiered, flat and metered plans, monthly and annual (one in ten), add-ons on a third, a 20 %
forever coupon on one customer in ten, a usage event on each metered subscription — all started
on 2026-01-01 and billed once that day. The measured run is the month end, 2026-02-01: every
monthly subscription renews, metered usage is billed in arrears, annual plans are not due.

The run itself goes through `billing.runs.run` exactly as `billing invoice-run` does, in a child
process (or K of them with `--workers K`), so peak memory is the run's own, not the build's.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, event, insert, select, text

from billing.book import Book
from billing.catalog import Catalog
from billing.gc_policy import fewer_collections
from billing.persistence import PartWrite, UnitOfWork, create_engine, upgrade
from billing.persistence.tables import CustomerRow, InvoiceLineRow, InvoiceRow, SubscriptionRow
from billing.scenario import EVENT_ADAPTER, Event, InvoiceRunEvent, Settings
from billing.shards import Counters, assemble, counters_of, due_of, split

START = datetime(2026, 1, 1, tzinfo=UTC)
AS_OF = datetime(2026, 2, 1, tzinfo=UTC)
CURRENCIES = ("USD", "EUR", "GBP", "JPY")
CHUNK = 1000

CATALOG: dict[str, Any] = {
    "plans": [
        {"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
         "prices": {"USD": "50.00", "EUR": "45.00", "GBP": "40.00", "JPY": "7000"}},
        {"code": "scale", "name": "Scale", "interval": "month", "pricing": "tiered", "tiers": [
            {"up_to": 25, "unit_amount": {"USD": "45.00", "EUR": "41.00", "GBP": "36.00", "JPY": "6300"},
             "flat_amount": {"USD": "200.00", "EUR": "180.00", "GBP": "160.00", "JPY": "28000"}},
            {"up_to": None, "unit_amount": {"USD": "35.00", "EUR": "32.00", "GBP": "28.00", "JPY": "4900"}}]},
        {"code": "starter", "name": "Starter", "interval": "month", "pricing": "flat",
         "prices": {"USD": "99.00", "EUR": "89.00", "GBP": "79.00", "JPY": "13900"}},
        {"code": "api", "name": "API", "interval": "month", "pricing": "flat",
         "prices": {"USD": "20.00", "EUR": "18.00", "GBP": "16.00", "JPY": "2800"}, "metrics": ["api_calls"]},
        {"code": "team-annual", "name": "Team (annual)", "interval": "year", "pricing": "per_unit",
         "prices": {"USD": "540.00", "EUR": "486.00", "GBP": "432.00", "JPY": "75600"}},
    ],
    "addons": [
        {"code": "analytics", "name": "Analytics", "interval": "month", "pricing": "flat",
         "prices": {"USD": "250.00", "EUR": "225.00", "GBP": "200.00", "JPY": "35000"}},
        {"code": "modules", "name": "Modules", "interval": "month", "pricing": "per_unit",
         "prices": {"USD": "100.00", "EUR": "90.00", "GBP": "80.00", "JPY": "14000"}},
    ],
    "metrics": [
        {"code": "api_calls", "name": "API calls", "aggregation": "sum", "pricing": "per_unit",
         "prices": {"USD": "0.002", "EUR": "0.0018", "GBP": "0.0016", "JPY": "0.3"}, "included": "10000"},
    ],
}
SETTINGS: dict[str, Any] = {
    "reporting_currency": "USD", "usage_in_mrr": True,
    "fx_rates": [{"currency": "EUR", "rate": "1.08", "from": "2026-01-01"},
                 {"currency": "GBP", "rate": "1.27", "from": "2026-01-01"},
                 {"currency": "JPY", "rate": "0.0067", "from": "2026-01-01"}],
}


@dataclass(frozen=True)
class BuildFigures:
    subscriptions: int
    customers: int
    seconds: float


def _events(rng: random.Random, customer: int, sub_counter: list[int], target: int) -> list[dict[str, Any]]:
    cid = f"c{customer:07d}"
    cur = CURRENCIES[customer % len(CURRENCIES)]
    tax = ("0", "0.07", "0.2", "0.25")[customer % 4]
    at = START.isoformat()
    events: list[dict[str, Any]] = [{"type": "customer", "at": at, "customer": cid, "currency": cur, "tax_rate": tax}]
    for _ in range(min(rng.choice((1, 1, 2, 3)), target - sub_counter[0])):
        sub_counter[0] += 1
        sid = f"{cid}-s{sub_counter[0]}"
        roll = rng.random()
        plan = ("team-annual" if roll < 0.1 else "api" if roll < 0.3 else "starter" if roll < 0.45
                else "scale" if roll < 0.6 else "team")
        event: dict[str, Any] = {"type": "subscribe", "at": at, "customer": cid, "subscription": sid, "plan": plan,
                                 "quantity": rng.randint(1, 40)}
        if plan in ("team", "scale") and rng.random() < 0.33:
            event["addons"] = [{"addon": "modules", "quantity": rng.randint(1, 5)}]
        events.append(event)
        if plan == "api":
            events.append({"type": "usage", "at": (START + timedelta(days=rng.randint(1, 27))).isoformat(),
                           "subscription": sid, "metric": "api_calls", "value": str(rng.randint(1000, 90000)),
                           "id": f"{sid}-u1"})
    if customer % 10 == 3:
        events.append({"type": "discount", "at": at, "customer": cid, "percent": "20", "duration": "forever"})
    return events


def build(url: str, subscriptions: int, *, seed: int = 5) -> BuildFigures:
    """Write the book of `subscriptions` subscriptions, billed on 2026-01-01, into an empty
    database at `url` (migrated here)."""
    from billing import service

    started = time.perf_counter()
    engine = create_engine(url)
    upgrade(engine)
    settings = Settings.model_validate(SETTINGS)
    catalog = Catalog.model_validate(CATALOG)
    service.load_catalog(engine, catalog, settings)
    rng = random.Random(seed)
    made = [0]
    customer = 0
    counters = Counters()
    first_run = InvoiceRunEvent(type="invoice_run", at=START)
    while made[0] < subscriptions:
        events: list[Event] = []
        usage: list[Event] = []
        while made[0] < subscriptions and len(events) < CHUNK * 3:
            for raw in _events(rng, customer, made, subscriptions):
                (usage if raw["type"] == "usage" else events).append(EVENT_ADAPTER.validate_python(raw))
            customer += 1
        with UnitOfWork(engine) as uow:
            command_id = uow.commands.add(recorded_at=START, at=START, type="bench_build",
                                          payload={"customers": customer}, actor="bench",
                                          idempotency_key=None, event_index=None)
            book = assemble(Book(settings, catalog), [], counters, START)
            book.use_usage_source(uow.usage)
            outcomes = [book.apply(ev, discard_on_error=True) for ev in [*events, first_run]]
            for ev in sorted(usage, key=lambda e: e.at):
                outcomes.append(book.apply(ev, discard_on_error=True))
            book.clock = START
            counters = counters_of(book)
            writes = []
            for cid, part in split(book).items():
                due = due_of(book, cid)
                writes.append(PartWrite(cid, part.account.order, part.dumps(), None, due.transition_at, due.due_at))
            uow.parts.save(writes)
            issued = [i for o in outcomes for i in o.issued]
            uow.ledger.add_invoices(issued, command_id)
            uow.parts.add_billed_periods(issued)
            movements = [m for o in outcomes for m in o.movements]
            uow.ledger.add_movements(movements, command_id)
            uow.ledger.add_links([link for o in outcomes for link in o.links], command_id)
            new_customers, new_subscriptions = service._changed(service._View(), service._view_of(book))
            uow.session.execute(insert(CustomerRow), [
                {"id": c.id, "currency": c.currency, "tax_rate": c.tax_rate, "timezone": c.timezone,
                 "locale": c.locale, "name": c.name, "tags": c.tags, "mrr": _minor(c.mrr, c.currency),
                 "credit_balance": _minor(c.credit_balance, c.currency), "created_at": c.created_at,
                 "updated_at": START, "version": 1} for c in new_customers])
            uow.session.execute(insert(SubscriptionRow), [
                {"id": s.id, "customer": s.customer, "plan": s.plan, "quantity": s.quantity, "addons": s.addons,
                 "status": s.status, "cancel_at_period_end": s.cancel_at_period_end, "scheduled": s.scheduled,
                 "trial_end": s.trial_end, "current_period_start": s.current_period_start,
                 "current_period_end": s.current_period_end, "ended_at": s.ended_at, "created_at": START,
                 "updated_at": START, "version": 1} for s, _ in new_subscriptions])
            uow.parts.save_sequences(uow.parts.lock_sequences(Counters.names()), vars(counters))
            uow.parts.set_clock(START)
            uow.commit()
    engine.dispose()
    return BuildFigures(subscriptions, customer, time.perf_counter() - started)


def _minor(amount: Decimal, currency: str) -> int:
    from billing.money import to_minor

    return to_minor(amount, currency)


def _worker(url: str, run_id: int | None, batch: int, queue: Any, claim_numbers: bool = False) -> None:
    """One worker process: plan the run (the first) or join it, bill, report its peak RSS and the
    CPU it and its server backends used."""
    from billing.runs import run

    engine = create_engine(url)
    backends = BackendCpu(engine)
    ev = InvoiceRunEvent(type="invoice_run", at=AS_OF)
    started, cpu = time.time(), time.process_time()
    summary = run(engine, ev, actor="bench", batch=batch, join=run_id,
                  skip_locked=engine.dialect.name == "postgresql", claim_numbers=claim_numbers)
    cpu = time.process_time() - cpu
    engine.dispose()  # closes the pooled connections: `backends` reads their CPU as they go
    queue.put({"run": summary.run_id, "invoices": summary.invoices, "started": started,
               "seconds": time.time() - started, "peak_rss_mb": _peak_rss_mb(), "cpu_seconds": cpu,
               "server_cpu_seconds": backends.seconds()})


class BackendCpu:
    """The CPU time (user + system) of the PostgreSQL backends serving an engine's connections,
    read from `/proc/PID/stat` as each connection closes: known only when the server runs on this
    machine (a backend is a local `postgres` process); `seconds()` is None otherwise, and for
    SQLite, whose work is the process's own CPU."""

    def __init__(self, engine: Engine) -> None:
        self.total = 0.0
        self.visible = engine.dialect.name == "postgresql"
        if self.visible:
            event.listen(engine, "close", self._closed)

    def _closed(self, dbapi_connection: Any, _record: Any) -> None:
        used = backend_cpu(int(dbapi_connection.info.backend_pid))
        if used is None:
            self.visible = False
        else:
            self.total += used

    def seconds(self) -> float | None:
        return self.total if self.visible else None


def backend_cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of the local `postgres` process `pid`; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    if not name.startswith("postgres"):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb() -> int:
    """This process's own peak RSS: `VmHWM` on Linux, where `ru_maxrss` also keeps the peak of the
    parent it was started from (the bench's, after building the book)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def measure(url: str, *, workers: int = 1, batch: int = 500) -> dict[str, Any]:
    """Run the month-end invoice run in `workers` processes and time it: `seconds` from planning
    to the last worker's end (what `billing invoice-run` costs), of which `plan_seconds` planning
    and `start_seconds` starting the workers (a new interpreter importing the package) until the
    last one began billing; `worker_cpu_seconds` the CPU the workers used billing (every thread),
    `server_cpu_seconds` that of their PostgreSQL backends (None unless the server is local)."""
    from billing.runs import _plan

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    started = time.time()
    engine = create_engine(url)
    ev = InvoiceRunEvent(type="invoice_run", at=AS_OF)
    run_id, _, _ = _plan(engine, ev, actor="bench", idempotency_key=None, index=None,
                         clock=lambda: datetime.now(UTC), join=None)
    engine.dispose()
    planned = time.time()
    procs = [ctx.Process(target=_worker, args=(url, run_id, batch, queue, workers > 1)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    results = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    seconds = time.time() - started
    servers = [r["server_cpu_seconds"] for r in results]
    return {"run": run_id, "seconds": seconds, "plan_seconds": planned - started,
            "start_seconds": max(r["started"] for r in results) - planned,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "worker_cpu_seconds": sum(r["cpu_seconds"] for r in results),
            "server_cpu_seconds": None if None in servers else sum(servers)}


def baseline(url: str, run_command: int) -> tuple[int, float]:
    """Insert the run's invoice and line rows again, as plain rows, into two scratch tables
    shaped like `invoices` and `invoice_lines` (same columns and keys), with executemany in
    batches of 5,000: the rows per second a bulk insert of the same data reaches here."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            heads = [dict(r._mapping) for r in conn.execute(
                select(InvoiceRow.__table__).where(InvoiceRow.command_id == run_command))]
            numbers = {h["number"] for h in heads}
            lines = [dict(r._mapping) for r in conn.execute(
                select(InvoiceLineRow.__table__).join(InvoiceRow.__table__,
                                                       InvoiceRow.number == InvoiceLineRow.invoice_number)
                .where(InvoiceRow.command_id == run_command))]
            assert all(line["invoice_number"] in numbers for line in lines)
        scratch: list[Table] = []
        from sqlalchemy import MetaData

        meta = MetaData()
        for source, name in ((InvoiceRow.__table__, "bench_plain_invoices"),
                             (InvoiceLineRow.__table__, "bench_plain_invoice_lines")):
            table = Table(name, meta, *[c._copy() for c in source.columns])
            scratch.append(table)
        with engine.begin() as conn:
            for table in scratch:
                table.drop(conn, checkfirst=True)
                table.create(conn)
        started = time.perf_counter()
        with engine.begin() as conn:
            for table, rows in ((scratch[0], heads), (scratch[1], lines)):
                for start in range(0, len(rows), 5000):
                    conn.execute(insert(table), rows[start:start + 5000])
        seconds = time.perf_counter() - started
        with engine.begin() as conn:
            for table in scratch:
                table.drop(conn)
        return len(heads) + len(lines), seconds
    finally:
        engine.dispose()


def bench(subscriptions: int, *, url: str | None = None, workers: int = 1, batch: int = 500,
          seed: int = 5, step: str = "all") -> dict[str, Any]:
    """Build the book and time its run (`step` "all"); or only build it ("build": a copy of the
    database can then be timed again and again) or only time the run of a book built so
    ("run")."""
    if url is None:
        if step != "all":
            raise ValueError("building or running separately needs a database URL")
        with tempfile.TemporaryDirectory(prefix="billing-bench-runs-") as tmp:
            return bench(subscriptions, url=f"sqlite:///{Path(tmp) / 'bench.sqlite'}", workers=workers,
                         batch=batch, seed=seed)
    if step == "run":
        engine = create_engine(url)
        with engine.connect() as conn:
            subscriptions = conn.execute(text("SELECT count(*) FROM subscriptions")).scalar_one()
            customers = conn.execute(text("SELECT count(*) FROM customers")).scalar_one()
            if conn.execute(text("SELECT count(*) FROM invoice_runs")).scalar_one():
                raise ValueError("this book was already run: time a fresh copy of the built database")
        engine.dispose()
        built = BuildFigures(subscriptions, customers, 0.0)
    else:
        with fewer_collections():
            built = build(url, subscriptions, seed=seed)
        if step == "build":
            return {"subscriptions": subscriptions, "customers": built.customers,
                    "build_seconds": round(built.seconds, 3)}
    timed = measure(url, workers=workers, batch=batch)
    engine = create_engine(url)
    with UnitOfWork(engine) as uow:
        stored = uow.runs.get(timed["run"])
        assert stored is not None
        counts = uow.runs.progress(stored.id)
        command_id = stored.command_id
        invoices = uow.session.scalar(text("SELECT count(*) FROM invoices WHERE command_id = :c"),
                                      {"c": command_id}) or 0
        lines = uow.session.scalar(text(
            "SELECT count(*) FROM invoice_lines l JOIN invoices i ON i.number = l.invoice_number "
            "WHERE i.command_id = :c"), {"c": command_id}) or 0
    engine.dispose()
    rows, base_seconds = baseline(url, command_id)
    seconds = timed["seconds"]
    server_cpu = timed["server_cpu_seconds"]
    postgres = engine.dialect.name == "postgresql"
    cores_busy = (None if not seconds or (postgres and server_cpu is None)
                  else round((timed["worker_cpu_seconds"] + (server_cpu or 0.0)) / seconds, 2))
    ours = (invoices + lines) / seconds if seconds else 0.0
    base = rows / base_seconds if base_seconds else 0.0
    return {
        "subscriptions": built.subscriptions,
        "customers": built.customers,
        "invoices": invoices,
        "invoice_lines": lines,
        "failed": counts["failed"],
        "seconds": round(seconds, 3),
        "subscriptions_per_second": round(built.subscriptions / seconds, 1) if seconds else None,
        "invoices_per_second": round(invoices / seconds, 1) if seconds else None,
        "rows_per_second": round(ours, 1),
        "baseline_rows_per_second": round(base, 1),
        "fraction_of_baseline": round(ours / base, 3) if base else None,
        "plan_seconds": round(timed["plan_seconds"], 3),
        "start_seconds": round(timed["start_seconds"], 3),
        "peak_rss_mb": timed["peak_rss_mb"],
        "worker_cpu_seconds": round(timed["worker_cpu_seconds"], 2),
        "server_cpu_seconds": None if server_cpu is None else round(server_cpu, 2),
        "cores_busy": cores_busy,
        "workers": workers,
        "batch": batch,
        "database": engine.dialect.name,
        "build_seconds": round(built.seconds, 3),
    }


def main_json(figures: dict[str, Any]) -> str:
    return json.dumps(figures)
