"""`billing bench usage`: ingest N synthetic usage events, aggregate and rate one period.

The run, all on one database:
1. a realistic catalog (a flat plan and a per-seat plan; metered API calls in graduated tiers
   with included units, EU requests counted through a property filter and sold in packages,
   peak concurrency as a max, active users as a distinct count that is also the seat-saturation
   metric, storage as a weighted sum) and S customers with one subscription each, through the
   ordinary services;
2. N events written to a JSON-lines file (1 % of them repeat an earlier id: duplicates), streamed;
3. the baseline: the same file read and its rows bulk-inserted into a plain table with no index,
   no constraint and no checks (SQLite `executemany`, PostgreSQL `COPY`), timed;
4. the real thing: `billing.metering.ingest` of the file (every check, idempotency on), timed;
   then, on PostgreSQL, `ANALYZE usage_events` (timed apart), as autovacuum would after a load;
5. every subscription's aggregate of every metric for the period, in SQL, and its rated amount.

Peak RSS is the process's high-water mark (`getrusage`), so a flat figure as N grows shows the
file is streamed, never loaded.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing import service
from billing.catalog import Catalog
from billing.metering import ingest, read_jsonl
from billing.money import round_money
from billing.persistence import Engine, UnitOfWork, create_engine, display_url, upgrade
from billing.persistence.usage_store import aggregate_all
from billing.scenario import Settings
from billing.usage import micros, rate

START = datetime(2026, 2, 1, tzinfo=UTC)
END = datetime(2026, 3, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "plans": [
        {"code": "starter", "name": "Starter", "interval": "month", "pricing": "flat",
         "prices": {"USD": "49.00"}, "metrics": ["api_calls", "storage_gb", "active_users"]},
        {"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
         "prices": {"USD": "12.00"},
         "metrics": ["api_calls", "eu_requests", "peak_concurrency", "storage_gb", "active_users"]},
    ],
    "metrics": [
        {"code": "api_calls", "name": "API calls", "aggregation": "sum", "pricing": "tiered",
         "tiers": [{"up_to": 100000, "unit_amount": {"USD": "0.002"}},
                   {"up_to": 1000000, "unit_amount": {"USD": "0.001"}},
                   {"up_to": None, "unit_amount": {"USD": "0.0005"}}],
         "included": "10000"},
        {"code": "eu_requests", "name": "EU requests", "aggregation": "count", "filter": {"region": "eu"},
         "pricing": "package", "package_size": 1000, "prices": {"USD": "1.00"}},
        {"code": "peak_concurrency", "name": "Peak concurrency", "aggregation": "max", "pricing": "volume",
         "tiers": [{"up_to": 10, "unit_amount": {"USD": "5.00"}},
                   {"up_to": None, "unit_amount": {"USD": "4.00"}}]},
        {"code": "storage_gb", "name": "Storage", "aggregation": "weighted_sum", "pricing": "per_unit",
         "prices": {"USD": "0.10"}, "included": "5", "minimum": {"USD": "1.00"}},
        {"code": "active_users", "name": "Active users", "aggregation": "unique_count", "field": "user",
         "pricing": "per_unit", "prices": {"USD": "0"}, "active_seats": True},
    ],
}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024, 1)


def _setup(engine: Engine, subscriptions: int) -> list[str]:
    with UnitOfWork(engine) as uow:
        if uow.book.load() is not None:
            raise ValueError(f"{display_url(engine.url)} already holds a book; the bench needs an empty database")
    service.load_catalog(engine, Catalog.model_validate(CATALOG), Settings())
    subs: list[str] = []
    for i in range(subscriptions):
        customer, sub = f"c{i:05d}", f"s{i:05d}"
        plan = "team" if i % 3 else "starter"
        service.apply_event(engine, {"type": "customer", "at": START.isoformat(), "customer": customer,
                                     "currency": "USD"}, actor="bench")
        service.apply_event(engine, {"type": "subscribe", "at": START.isoformat(), "customer": customer,
                                     "subscription": sub, "plan": plan, "quantity": 10 + i % 20}, actor="bench")
        subs.append(sub)
    return subs


def generate(path: Path, events: int, subs: list[str], seed: int) -> int:
    """Write `events` JSON lines (1 % repeating an earlier id of the same subscription); how
    many are repeats. Written line by line: memory does not grow with N."""
    rnd = random.Random(seed)
    span = int((END - START).total_seconds()) - 1
    base = int(START.timestamp())
    team = [s for i, s in enumerate(subs) if i % 3]
    repeats = 0
    recent: dict[str, int] = {}
    with path.open("w", buffering=1 << 20) as out:
        for n in range(events):
            at = datetime.fromtimestamp(base + (n * span) // max(events, 1), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            roll = rnd.random()
            if n % 100 == 99 and recent:
                sub = subs[n % len(subs)]
                if sub in recent:
                    repeats += 1
                    out.write(f'{{"subscription":"{sub}","metric":"api_calls","at":"{at}","value":1,'
                              f'"id":"e{recent[sub]}"}}\n')
                    continue
            if roll < 0.70:
                sub = subs[n % len(subs)]
                line = f'{{"subscription":"{sub}","metric":"api_calls","at":"{at}","value":{1 + n % 7},"id":"e{n}"}}'
                recent[sub] = n
            elif roll < 0.85:
                sub = team[n % len(team)]
                region = "eu" if n % 2 else "us"
                line = (f'{{"subscription":"{sub}","metric":"eu_requests","at":"{at}","value":1,"id":"e{n}",'
                        f'"properties":{{"region":"{region}"}}}}')
            elif roll < 0.89:
                sub = team[n % len(team)]
                line = (f'{{"subscription":"{sub}","metric":"peak_concurrency","at":"{at}",'
                        f'"value":{n % 23},"id":"e{n}"}}')
            elif roll < 0.99:
                sub = subs[n % len(subs)]
                line = (f'{{"subscription":"{sub}","metric":"active_users","at":"{at}","value":1,"id":"e{n}",'
                        f'"properties":{{"user":"u{n % 37}"}}}}')
            else:
                sub = subs[n % len(subs)]
                line = (f'{{"subscription":"{sub}","metric":"storage_gb","at":"{at}",'
                        f'"value":"{n % 50}.{n % 10}","id":"e{n}"}}')
            out.write(line + "\n")
    return repeats


def _plain_ddl(sqlite: bool) -> list[str]:
    seq = "seq INTEGER PRIMARY KEY" if sqlite else "seq BIGSERIAL PRIMARY KEY"
    return [f"CREATE TABLE usage_bench_plain ({seq}, subscription VARCHAR(200) NOT NULL, "
            "metric VARCHAR(200) NOT NULL, at BIGINT NOT NULL, value BIGINT NOT NULL, matched BOOLEAN NOT NULL, "
            "quantity BIGINT, dim TEXT, key VARCHAR(500) NOT NULL, properties TEXT NOT NULL)",
            "CREATE INDEX ix_usage_bench_plain ON usage_bench_plain (subscription, metric, at)"]


PLAIN_COLUMNS = "subscription, metric, at, value, matched, quantity, dim, key, properties"


def baseline(engine: Engine, path: Path, chunk: int = 20_000) -> tuple[int, float]:
    """The same rows bulk-inserted the plainest way: no checks, no idempotency (no unique
    constraint, no conflict handling), into a table of the same columns with only the index any
    usage store needs to aggregate a subscription's period; (rows, seconds)."""
    raw = engine.raw_connection()
    dbapi: Any = raw.driver_connection
    sqlite = engine.dialect.name == "sqlite"
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    micro = timedelta(microseconds=1)
    decoder = json.JSONDecoder(parse_float=Decimal)
    try:
        cur = dbapi.cursor()
        cur.execute("DROP TABLE IF EXISTS usage_bench_plain")
        for ddl in _plain_ddl(sqlite):
            cur.execute(ddl)
        dbapi.commit()
        rows = 0
        started = time.perf_counter()
        batch: list[tuple[Any, ...]] = []

        def flush() -> None:
            if sqlite:
                dbapi.executemany(f"INSERT INTO usage_bench_plain ({PLAIN_COLUMNS}) "  # noqa: S608
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
            else:
                with cur.copy(f"COPY usage_bench_plain ({PLAIN_COLUMNS}) FROM STDIN") as copy:  # noqa: S608
                    for row in batch:
                        copy.write_row(row)
            dbapi.commit()
            batch.clear()

        with path.open("rb") as stream:
            for line in stream:
                d = decoder.decode(line.decode())
                at = (datetime.fromisoformat(d["at"]) - epoch) // micro
                props = d.get("properties")
                value = int(Decimal(d["value"]) * 1_000_000)
                batch.append((d["subscription"], d["metric"], at, value, True, value, None, d["id"],
                              json.dumps(props) if props else "{}"))
                rows += 1
                if len(batch) >= chunk:
                    flush()
        if batch:
            flush()
        seconds = time.perf_counter() - started
        cur.execute("DROP TABLE usage_bench_plain")
        dbapi.commit()
        return rows, seconds
    finally:
        raw.close()


def run(url: str, events: int, *, seed: int = 7, subscriptions: int = 200,
        progress: Any = None) -> dict[str, Any]:
    engine = create_engine(url)
    try:
        upgrade(engine)
        t0 = time.perf_counter()
        subs = _setup(engine, subscriptions)
        setup_seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="billing-bench-usage-") as tmp:
            path = Path(tmp) / "events.jsonl"
            t0 = time.perf_counter()
            repeats = generate(path, events, subs, seed)
            generate_seconds = time.perf_counter() - t0
            plain_rows, plain_seconds = baseline(engine, path)
            clock = lambda: END - timedelta(seconds=1)  # noqa: E731 - the bench's fixed "now"
            t0 = time.perf_counter()
            with path.open("rb") as stream:
                summary = ingest(engine, read_jsonl(stream), clock=clock, progress=progress)
            ingest_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if engine.dialect.name == "postgresql":
            # fresh planner statistics after the bulk load, as autovacuum would take in time
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE usage_events")
        analyze_seconds = time.perf_counter() - t0
        catalog = Catalog.model_validate(CATALOG)
        t0 = time.perf_counter()
        with engine.connect() as conn:
            aggregates = aggregate_all(conn, catalog.metrics, micros(START), micros(END))
        amounts = {key: round_money(rate(catalog.metric(key[1]), quantity, "USD"), "USD", "half_up")
                   for key, quantity in aggregates.items()}
        aggregate_seconds = time.perf_counter() - t0
        rate_per_s = summary.rows / ingest_seconds if ingest_seconds else 0.0
        base_per_s = plain_rows / plain_seconds if plain_seconds else 0.0
        return {
            "database": engine.dialect.name,
            "events": events,
            "subscriptions": len(subs),
            "accepted": summary.accepted,
            "duplicates": summary.duplicated,
            "duplicates_generated": repeats,
            "rejected": summary.rejected,
            "ingest_seconds": round(ingest_seconds, 3),
            "events_per_second": round(rate_per_s),
            "baseline_seconds": round(plain_seconds, 3),
            "baseline_rows_per_second": round(base_per_s),
            "fraction_of_baseline": round(rate_per_s / base_per_s, 3) if base_per_s else None,
            "aggregate_seconds": round(aggregate_seconds, 3),
            "analyze_seconds": round(analyze_seconds, 3),
            "aggregates": len(aggregates),
            "billed_total": str(sum(amounts.values(), Decimal(0))),
            "setup_seconds": round(setup_seconds, 3),
            "generate_seconds": round(generate_seconds, 3),
            "peak_rss_mb": peak_rss_mb(),
        }
    finally:
        engine.dispose()
