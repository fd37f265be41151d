"""Usage events on the database: the book's SQL usage source, set-based bulk inserts, and the
aggregation of a period in SQL (billing.usage describes the columns and the rules).

- `SqlUsage` is the `billing.usage.UsageSource` of the services: it records a scenario's `usage`
  event in the command's own transaction and aggregates one (subscription, metric, period) with
  one query on the `(subscription, metric, at)` index.
- `BulkWriter` writes the ingester's chunks. SQLite: one `INSERT OR IGNORE … SELECT … FROM
  json_each(?)` of the whole chunk as a JSON array (SQLite runs it without holding Python's
  interpreter lock, so the next chunk is parsed meanwhile), or `executemany` for a chunk JSON
  cannot carry exactly (a NUL character); the unique `(subscription, key)` constraint keeps
  duplicates out and the change count says how many. PostgreSQL: the chunk's new rows by one
  `COPY` straight into the table — new meaning not earlier in the chunk, not in the chunk this
  writer committed last and, once a COPY has met a stored key, not found by probing the unique
  index — and, when the constraint refuses that COPY (another ingester stored a key meanwhile),
  `COPY` into a temporary staging table, then `INSERT … SELECT … ON CONFLICT DO NOTHING`. Either
  way the database's constraint decides, so two processes ingesting one file at once never
  store an event twice.
- `aggregate_all` aggregates one period for every subscription at once (the bench, reports).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from fractions import Fraction
from functools import cache
from typing import Any

import orjson
from sqlalchemy import TextClause, bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from billing.catalog import Metric
from billing.usage import SCALE, UsageRecord, measure, micros, scaled

Row = tuple[str, str, int, int, bool, int | None, str | None, str, str]
"""(subscription, metric, at µs, value scaled, matched, quantity scaled, dim, key, properties JSON)"""

COLUMNS = "subscription, metric, at, value, matched, quantity, dim, key, properties"

_SCALAR = {
    "count": "COUNT(*)",
    "sum": "SUM(quantity)",
    "max": "MAX(quantity)",
    "unique_count": "COUNT(DISTINCT dim)",
}


def row_of(subscription: str, metric: Metric, record: UsageRecord) -> Row:
    matched, quantity, dim = measure(metric, record.value, record.properties)
    return (subscription, metric.code, micros(record.at), scaled(record.value), matched, quantity, dim,
            record.key, json.dumps(dict(record.properties), default=str, separators=(",", ":")))


class SqlUsage:
    """The usage source of one transaction (the unit of work's session, or a connection)."""

    def __init__(self, connection: Connection | Session) -> None:
        self.connection = connection

    def record(self, subscription: str, metric: Metric, record: UsageRecord) -> bool:
        conflict = "ON CONFLICT (subscription, key) DO NOTHING"
        result = self.connection.execute(
            text(f"INSERT INTO usage_events ({COLUMNS}) VALUES (:s, :m, :at, :v, :ok, :q, :d, :k, :p) "  # noqa: S608
                 f"{conflict}"),
            dict(zip(("s", "m", "at", "v", "ok", "q", "d", "k", "p"),
                     row_of(subscription, metric, record), strict=True)),
        )
        return bool(getattr(result, "rowcount", 1))

    def aggregate(self, subscription: str, metric: Metric, start: datetime, end: datetime,
                  *, held_until: datetime | None = None) -> Fraction:
        return aggregate_one(self.connection, subscription, metric, micros(start), micros(end),
                             micros(held_until or end))


_WHERE = "subscription = :s AND metric = :m AND matched"


def aggregate_one(conn: Connection | Session, subscription: str, metric: Metric, lo: int, hi: int,
                  full_hi: int) -> Fraction:
    """One subscription's aggregate of `metric` over `[lo, hi)` (UTC µs), in SQL."""
    params: dict[str, Any] = {"s": subscription, "m": metric.code, "lo": lo, "hi": hi}
    kind = metric.aggregation
    period = f"{_WHERE} AND at >= :lo AND at < :hi"
    if kind in _SCALAR:
        value = conn.execute(text(f"SELECT {_SCALAR[kind]} FROM usage_events WHERE {period}"),  # noqa: S608
                             params).scalar()
        if value is None:
            return Fraction(0)
        return Fraction(int(value)) if kind in ("count", "unique_count") else Fraction(int(value), SCALE)
    if kind == "last":
        value = conn.execute(text(
            f"SELECT quantity FROM usage_events WHERE {period} AND quantity IS NOT NULL "  # noqa: S608
            "ORDER BY at DESC, seq DESC LIMIT 1"), params).scalar()
        return Fraction(0) if value is None else Fraction(int(value), SCALE)
    if kind == "weighted_sum":
        level = conn.execute(text(
            f"SELECT quantity FROM usage_events WHERE {_WHERE} AND at < :lo AND quantity IS NOT NULL "  # noqa: S608
            "ORDER BY at DESC, seq DESC LIMIT 1"), params).scalar()
        # each level with the time it was held inside the period, summed per distinct level in
        # SQL (a sum of durations never exceeds the period, so it cannot overflow); the few
        # distinct levels are multiplied out exactly here
        held = conn.execute(text(
            "SELECT quantity, SUM(nxt - at), MIN(at) FROM ("  # noqa: S608
            "  SELECT quantity, at, LEAD(at, 1, :hi) OVER (ORDER BY at, seq) AS nxt"
            f"  FROM usage_events WHERE {period} AND quantity IS NOT NULL"
            ") AS held GROUP BY quantity"), params).all()
        first = min((int(r[2]) for r in held), default=hi)
        acc = int(level or 0) * (first - lo) + sum(int(q) * int(d) for q, d, _ in held)
        total = full_hi - lo
        return Fraction(0) if total <= 0 else Fraction(acc, total * SCALE)
    raise ValueError(f"unknown aggregation {kind!r}")


def aggregate_all(conn: Connection | Session, metrics: Sequence[Metric], lo: int,
                  hi: int) -> dict[tuple[str, str], Fraction]:
    """Every subscription's aggregate of each metric over `[lo, hi)`, keyed (subscription,
    metric): one scan of the period for `count`, `sum` and `max` of all metrics together, one for
    the distinct counts, window functions for `last`, and `weighted_sum` per subscription."""
    out: dict[tuple[str, str], Fraction] = {}
    by_kind: dict[str, list[Metric]] = {}
    for metric in metrics:
        by_kind.setdefault(metric.aggregation, []).append(metric)
    period = "matched AND at >= :lo AND at < :hi"

    def codes(kinds: Sequence[str]) -> tuple[str, dict[str, Any]]:
        chosen = [m.code for k in kinds for m in by_kind.get(k, [])]
        params: dict[str, Any] = {f"m{i}": code for i, code in enumerate(chosen)}
        return ", ".join(f":m{i}" for i in range(len(chosen))), {**params, "lo": lo, "hi": hi}

    kind_of = {m.code: m.aggregation for m in metrics}
    names, params = codes(["count", "sum", "max"])
    if names:
        rows: Iterable[Any] = conn.execute(text(
            "SELECT subscription, metric, COUNT(*), SUM(quantity), MAX(quantity) FROM usage_events "  # noqa: S608
            f"WHERE metric IN ({names}) AND {period} GROUP BY subscription, metric"), params)
        for sub, code, count, total, top in rows:
            kind = kind_of[code]
            if kind == "count":
                out[(sub, code)] = Fraction(int(count))
            elif kind == "sum" and total is not None:
                out[(sub, code)] = Fraction(int(total), SCALE)
            elif kind == "max" and top is not None:
                out[(sub, code)] = Fraction(int(top), SCALE)
    names, params = codes(["unique_count"])
    if names:
        rows = conn.execute(text(
            "SELECT subscription, metric, COUNT(DISTINCT dim) FROM usage_events "  # noqa: S608
            f"WHERE metric IN ({names}) AND {period} GROUP BY subscription, metric"), params)
        for sub, code, count in rows:
            out[(sub, code)] = Fraction(int(count))
    names, params = codes(["last"])
    if names:
        rows = conn.execute(text(
            "SELECT subscription, metric, quantity FROM ("  # noqa: S608
            "  SELECT subscription, metric, quantity, ROW_NUMBER() OVER "
            "    (PARTITION BY subscription, metric ORDER BY at DESC, seq DESC) AS rn"
            f"  FROM usage_events WHERE metric IN ({names}) AND {period} AND quantity IS NOT NULL"
            ") AS ranked WHERE rn = 1"), params)
        for sub, code, value in rows:
            out[(sub, code)] = Fraction(int(value), SCALE)
    for metric in by_kind.get("weighted_sum", []):
        subs = [r[0] for r in conn.execute(text(
            "SELECT DISTINCT subscription FROM usage_events WHERE metric = :m AND matched AND at < :hi"),
            {"m": metric.code, "hi": hi})]
        for sub in subs:
            out[(sub, metric.code)] = aggregate_one(conn, sub, metric, lo, hi, hi)
    return out


# -- bulk writes (the ingester) ----------------------------------------------------------------

STAGE_DDL = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS usage_stage (ord BIGINT NOT NULL, subscription TEXT NOT NULL, "
    "metric TEXT NOT NULL, at BIGINT NOT NULL, value BIGINT NOT NULL, matched BOOLEAN NOT NULL, "
    "quantity BIGINT, dim TEXT, key TEXT NOT NULL, properties TEXT NOT NULL) ON COMMIT DELETE ROWS"
)
KEYS_DDL = ("CREATE TEMPORARY TABLE IF NOT EXISTS usage_stage_keys (ord INTEGER NOT NULL, subscription TEXT NOT NULL, "
            "key TEXT NOT NULL) ON COMMIT DELETE ROWS")
# the chunk's rows whose (subscription, key) is stored already: one index probe each (LATERAL …
# LIMIT 1 keeps the planner from hashing the whole table)
STORED_KEYS = ("SELECT k.ord FROM usage_stage_keys AS k CROSS JOIN LATERAL (SELECT 1 FROM usage_events AS e "
               "WHERE e.subscription = k.subscription AND e.key = k.key LIMIT 1) AS found")
UNIQUE_VIOLATION = "23505"
DATA_EXCEPTION = "22"  # SQLSTATE class: a value the column cannot take
# the binary COPY's column types, in COLUMNS order, then ingest_id
BINARY_TYPES = ["varchar", "varchar", "int8", "int8", "bool", "int8", "text", "varchar", "text", "int4"]
PROBE_CHUNKS = 8  # after a COPY met a stored key, probe the index for this many chunks at least


CACHE_KB = 65_536
BOOK_TOKEN = "SELECT COUNT(*), COALESCE(SUM(version), 0) FROM customer_books"


class BulkWriter:
    """Writes chunks of rows in transactions of its own on one raw driver connection (see the
    module docstring for how).

    Each chunk is one transaction that first reads a token of the book's state (the customer
    parts' count and versions) — on PostgreSQL after `LOCK TABLE customer_books IN SHARE MODE`
    (ingesters share it; a command or invoice-run batch, which writes the parts, waits for the
    chunk, and the chunk for one in flight); on SQLite under `BEGIN IMMEDIATE`, which takes the
    write lock at once — so the book does not change while a chunk is checked against it and
    written."""

    def __init__(self, engine: Any, ingest_id: int | None = None) -> None:
        self.engine = engine
        self.ingest_id = None if ingest_id is None else int(ingest_id)  # an int: safe in the SQL below
        self.dialect: str = engine.dialect.name
        self.raw = engine.raw_connection()
        self.dbapi: Any = self.raw.driver_connection
        self._staged = False
        # PostgreSQL (see _write_postgresql): the keys of the chunk written last and of the one
        # committed last, and how many more chunks to probe the index for
        self._pending: AbstractSet[tuple[str, str]] = frozenset()
        self._recent: AbstractSet[tuple[str, str]] = frozenset()
        self._probing = 0
        self._json = False
        if self.dialect == "sqlite":
            # a larger page cache while the indexes grow (SQLite's default is 2 MB)
            self._cache = self.dbapi.execute("PRAGMA cache_size").fetchone()[0]
            self.dbapi.execute(f"PRAGMA cache_size = {-CACHE_KB}")
            self._json = _has_json(self.dbapi)

    def close(self) -> None:
        if self.dialect == "sqlite":
            self.dbapi.execute(f"PRAGMA cache_size = {int(self._cache)}")
        self.raw.close()

    def begin(self) -> tuple[int, int]:
        """Start a chunk's transaction; a token of the book's state (its customer parts and their
        versions: every command and every invoice-run batch bumps the parts it changes)."""
        if self.dialect == "sqlite":
            self.dbapi.execute("BEGIN IMMEDIATE")
            row = self.dbapi.execute(BOOK_TOKEN).fetchone()
        else:
            with self.dbapi.cursor() as cur:
                if not self._staged:
                    cur.execute(STAGE_DDL)
                    cur.execute(KEYS_DDL)
                    self._staged = True
                cur.execute("LOCK TABLE customer_books IN SHARE MODE")
                cur.execute(BOOK_TOKEN)
                row = cur.fetchone()
        return (int(row[0]), int(row[1]))

    def write(self, rows: Sequence[Row]) -> int:
        """Insert the rows (their order kept); how many were new (the rest were duplicates)."""
        if not rows:
            return 0
        if self.dialect == "sqlite":
            before = self.dbapi.total_changes
            payload = _json_rows(rows) if self._json else None
            if payload is not None:
                # one statement: SQLite inserts the whole chunk in one step, without Python's lock
                self.dbapi.execute(
                    f"INSERT OR IGNORE INTO usage_events ({COLUMNS}, ingest_id) SELECT {_JSON_COLUMNS}, "  # noqa: S608
                    f"{self._ingest_sql} FROM json_each(?) AS j ORDER BY j.key", (payload,))
            else:
                self.dbapi.executemany(
                    f"INSERT OR IGNORE INTO usage_events ({COLUMNS}, ingest_id) "  # noqa: S608
                    f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {self._ingest_sql})", rows)
            return int(self.dbapi.total_changes - before)
        return self._write_postgresql(rows)

    def _write_postgresql(self, rows: Sequence[Row]) -> int:
        """PostgreSQL: the chunk's new rows straight into the table by one COPY, which it writes
        in batches — much cheaper than `INSERT … ON CONFLICT` row by row. A row is new unless
        its key came earlier in the chunk (the first of each key is kept) or is stored already:
        in the chunk this writer committed last (a repeated event is usually a recent one), or —
        after a COPY has met a stored key — as found by probing the unique index for every key.
        A key stored by another ingester meanwhile fails the COPY: `_insert_staged` then."""
        pairs = [(row[0], row[7]) for row in rows]
        # the first row of each key, by its place (built in reverse, the dict keeps the smallest)
        first = dict(zip(reversed(pairs), range(len(pairs) - 1, -1, -1), strict=True))
        self._pending = first.keys()
        with self.dbapi.cursor() as cur:
            if not self._probing:
                fresh = set(first.values())
                fresh.difference_update(first[key] for key in first.keys() & self._recent)
                inserted = self._copy_new(cur, rows, fresh)
                if inserted is not None:
                    return inserted
                self._probing = PROBE_CHUNKS
            with cur.copy("COPY usage_stage_keys (ord, subscription, key) FROM STDIN") as copy:
                for ord_, pair in enumerate(pairs):
                    copy.write_row((ord_, *pair))
            cur.execute(STORED_KEYS)
            stored = {int(found) for (found,) in cur.fetchall()}
            if any(pairs[ord_] not in self._recent for ord_ in stored):
                self._probing = PROBE_CHUNKS
            else:
                self._probing = max(0, self._probing - 1)
            fresh = set(first.values())
            fresh.difference_update(stored)
            inserted = self._copy_new(cur, rows, fresh)
            return self._insert_staged(cur, rows) if inserted is None else inserted

    def _copy_new(self, cur: Any, rows: Sequence[Row], fresh: set[int]) -> int | None:
        """COPY `rows[i]` for each `i` in `fresh`, in order; None (and nothing written) when one
        of them turns out to be stored already. Binary COPY (about half the work of text on both
        sides); a value it refuses as data (a NUL character) is sent again as text, which fails
        as it always has."""
        ingest_id = self.ingest_id
        order = sorted(fresh)
        for binary in (True, False):
            cur.execute("SAVEPOINT usage_copy")
            try:
                with cur.copy(f"COPY usage_events ({COLUMNS}, ingest_id) FROM STDIN"  # noqa: S608
                              f"{' (FORMAT BINARY)' if binary else ''}") as copy:
                    if binary:
                        copy.set_types(BINARY_TYPES)
                    for ord_ in order:
                        copy.write_row((*rows[ord_], ingest_id))
            except Exception as exc:
                code = getattr(exc, "sqlstate", None) or ""
                if code == UNIQUE_VIOLATION:
                    cur.execute("ROLLBACK TO SAVEPOINT usage_copy")
                    return None
                if binary and code.startswith(DATA_EXCEPTION):
                    cur.execute("ROLLBACK TO SAVEPOINT usage_copy")
                    continue
                raise
            cur.execute("RELEASE SAVEPOINT usage_copy")
            break
        return len(order)

    def _insert_staged(self, cur: Any, rows: Sequence[Row]) -> int:
        """PostgreSQL: COPY into the staging table, then `INSERT … ON CONFLICT DO NOTHING` in
        input order; how many were new."""
        with cur.copy(f"COPY usage_stage (ord, {COLUMNS}) FROM STDIN") as copy:  # noqa: S608
            for ord_, row in enumerate(rows):
                copy.write_row((ord_, *row))
        cur.execute(f"INSERT INTO usage_events ({COLUMNS}, ingest_id) "  # noqa: S608
                    f"SELECT {COLUMNS}, {self._ingest_sql} FROM usage_stage "
                    "ORDER BY ord ON CONFLICT (subscription, key) DO NOTHING")
        return int(cur.rowcount)  # the staged rows go at commit (ON COMMIT DELETE ROWS)

    @property
    def _ingest_sql(self) -> str:
        return "NULL" if self.ingest_id is None else str(self.ingest_id)

    def commit(self) -> None:
        self.dbapi.commit()
        self._recent, self._pending = self._pending, frozenset()

    def retryable(self, exc: BaseException) -> bool:
        """A deadlock or serialization failure (PostgreSQL), a busy database (SQLite): the
        chunk's transaction was rolled back whole and may simply run again."""
        code = getattr(exc, "sqlstate", None)
        if code in ("40P01", "40001"):
            return True
        return self.dialect == "sqlite" and "database is locked" in str(exc)

    def rollback(self) -> None:
        self.dbapi.rollback()
        self._pending = frozenset()


_JSON_COLUMNS = ", ".join(f"json_extract(j.value, '$[{i}]')" for i in range(9))


def _has_json(dbapi: Any) -> bool:
    """Whether this SQLite has its JSON functions (built in since 3.38, an option before)."""
    try:
        dbapi.execute("SELECT json_extract('[1]', '$[0]') FROM json_each('[1]')").fetchall()
    except sqlite3.OperationalError:  # no such function
        return False
    return True


def _json_rows(rows: Sequence[Row]) -> str | None:
    """The rows as one JSON array of arrays for `json_each`, or None where SQLite would not read
    back exactly what Python holds: a NUL character (SQLite's JSON strings end at it), a lone
    surrogate (not UTF-8; the row-by-row insert reports it as ever). Integers are below 2^63
    (values and quantities below 10^18, instants in microseconds), which SQLite reads exactly."""
    try:
        payload = orjson.dumps(rows)
    except TypeError:  # orjson.JSONEncodeError: a lone surrogate
        return None
    if b"\\u0000" in payload:
        return None
    return payload.decode()


class BatchedUsage:
    """A usage source for many subscriptions at once (an invoice run's batch): the first time a
    (metric, period) is asked for, the aggregates of every subscription in the batch for that
    metric and period come from one grouped query — still in SQL, never the events themselves in
    Python — and later asks are answered from that result. Recording goes to `SqlUsage`."""

    def __init__(self, connection: Connection | Session, subscriptions: Sequence[str]) -> None:
        self.sql = SqlUsage(connection)
        self.subscriptions = sorted(set(subscriptions))
        self.members = frozenset(self.subscriptions)
        self.cache: dict[tuple[str, int, int, int], dict[str, Fraction]] = {}

    def record(self, subscription: str, metric: Metric, record: UsageRecord) -> bool:
        return self.sql.record(subscription, metric, record)

    def aggregate(self, subscription: str, metric: Metric, start: datetime, end: datetime,
                  *, held_until: datetime | None = None) -> Fraction:
        lo, hi, full = micros(start), micros(end), micros(held_until or end)
        if metric.aggregation == "weighted_sum" or subscription not in self.members:
            return aggregate_one(self.sql.connection, subscription, metric, lo, hi, full)
        key = (metric.code, lo, hi, full)
        found = self.cache.get(key)
        if found is None:
            found = self.cache[key] = aggregate_group(self.sql.connection, self.subscriptions, metric, lo, hi)
        return found.get(subscription, Fraction(0))


_GROUP_WHERE = "subscription IN :subs AND metric = :m AND matched AND at >= :lo AND at < :hi"


@cache
def _group_statement(kind: str) -> TextClause:
    """One statement per aggregation, its IN list an expanding parameter, so the compiled form is
    cached whatever the number of subscriptions."""
    if kind in _SCALAR:
        sql = (f"SELECT subscription, {_SCALAR[kind]} FROM usage_events WHERE {_GROUP_WHERE} "  # noqa: S608
               "GROUP BY subscription")
    elif kind == "last":
        sql = ("SELECT subscription, quantity FROM ("  # noqa: S608
               "  SELECT subscription, quantity, ROW_NUMBER() OVER "
               "    (PARTITION BY subscription ORDER BY at DESC, seq DESC) AS rn"
               f"  FROM usage_events WHERE {_GROUP_WHERE} AND quantity IS NOT NULL"
               ") AS ranked WHERE rn = 1")
    else:
        raise ValueError(f"aggregate_group does not do {kind!r}")
    return text(sql).bindparams(bindparam("subs", expanding=True))


def aggregate_group(conn: Connection | Session, subscriptions: Sequence[str], metric: Metric, lo: int,
                    hi: int, chunk: int = 500) -> dict[str, Fraction]:
    """The aggregate of `metric` over `[lo, hi)` for each of `subscriptions` (those with no event
    left out: their aggregate is 0), grouped in SQL, 500 subscriptions a query. Not for
    `weighted_sum` (see `aggregate_one`)."""
    out: dict[str, Fraction] = {}
    kind = metric.aggregation
    statement = _group_statement(kind)
    for start in range(0, len(subscriptions), chunk):
        params: dict[str, Any] = {"subs": list(subscriptions[start:start + chunk]), "m": metric.code,
                                  "lo": lo, "hi": hi}
        rows: Iterable[Any] = conn.execute(statement, params)
        if kind == "last":
            for sub, value in rows:
                out[sub] = Fraction(int(value), SCALE)
        else:
            for sub, value in rows:
                if value is not None:
                    out[sub] = (Fraction(int(value)) if kind in ("count", "unique_count")
                                else Fraction(int(value), SCALE))
    return out
