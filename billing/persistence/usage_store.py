"""Usage events on the database: the book's SQL usage source, set-based bulk inserts, and the
aggregation of a period in SQL (billing.usage describes the columns and the rules).

- `SqlUsage` is the `billing.usage.UsageSource` of the services: it records a scenario's `usage`
  event in the command's own transaction and aggregates one (subscription, metric, period) with
  one query on the `(subscription, metric, at)` index.
- `BulkWriter` writes the ingester's chunks: on SQLite `INSERT OR IGNORE` by `executemany` on the
  raw driver; on PostgreSQL `COPY` into a temporary staging table, then one
  `INSERT … SELECT … ON CONFLICT DO NOTHING`. Both count the rows the unique
  `(subscription, key)` constraint kept out — duplicates — from the row counts, so two processes
  ingesting one file at once never store an event twice.
- `aggregate_all` aggregates one period for every subscription at once (the bench, reports).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from fractions import Fraction
from typing import Any

from sqlalchemy import text
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
                  hi: int) -> dict[tuple[str, str], Fraction]:  # noqa: E501
    """Every subscription's aggregate of each metric over `[lo, hi)`: one grouped query per
    metric (`weighted_sum` and `last` with window functions). Keys are (subscription, metric)."""
    out: dict[tuple[str, str], Fraction] = {}
    for metric in metrics:
        params: dict[str, Any] = {"m": metric.code, "lo": lo, "hi": hi}
        period = "metric = :m AND matched AND at >= :lo AND at < :hi"
        kind = metric.aggregation
        if kind in _SCALAR:
            rows: Iterable[Any] = conn.execute(text(
                f"SELECT subscription, {_SCALAR[kind]} FROM usage_events WHERE {period} "  # noqa: S608
                "GROUP BY subscription"), params)
            for sub, value in rows:
                if value is not None:
                    out[(sub, metric.code)] = (Fraction(int(value)) if kind in ("count", "unique_count")
                                               else Fraction(int(value), SCALE))
        elif kind == "last":
            rows = conn.execute(text(
                "SELECT subscription, quantity FROM ("  # noqa: S608
                "  SELECT subscription, quantity, ROW_NUMBER() OVER "
                "    (PARTITION BY subscription ORDER BY at DESC, seq DESC) AS rn"
                f"  FROM usage_events WHERE {period} AND quantity IS NOT NULL"
                ") AS ranked WHERE rn = 1"), params)
            for sub, value in rows:
                out[(sub, metric.code)] = Fraction(int(value), SCALE)
        elif kind == "weighted_sum":
            subs = [r[0] for r in conn.execute(text(
                "SELECT DISTINCT subscription FROM usage_events WHERE metric = :m AND matched AND at < :hi"),
                params)]
            for sub in subs:
                out[(sub, metric.code)] = aggregate_one(conn, sub, metric, lo, hi, hi)
        else:
            raise ValueError(f"unknown aggregation {kind!r}")
    return out


__all__ = ["COLUMNS", "Row", "SqlUsage", "aggregate_all", "aggregate_one", "row_of"]


# -- bulk writes (the ingester) ----------------------------------------------------------------

STAGE_DDL = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS usage_stage (ord BIGINT NOT NULL, subscription TEXT NOT NULL, "
    "metric TEXT NOT NULL, at BIGINT NOT NULL, value BIGINT NOT NULL, matched BOOLEAN NOT NULL, "
    "quantity BIGINT, dim TEXT, key TEXT NOT NULL, properties TEXT NOT NULL) ON COMMIT DELETE ROWS"
)


CACHE_KB = 65_536


class BulkWriter:
    """Writes chunks of rows in transactions of its own on one raw driver connection.

    Each chunk is one transaction that first reads the latest command's id — on PostgreSQL
    after `LOCK TABLE commands IN SHARE MODE` (ingesters share it; a command, which records
    itself in `commands`, waits for the chunk, and the chunk for a command in flight); on SQLite
    under `BEGIN IMMEDIATE`, which takes the write lock at once — so no command changes the book
    while a chunk is checked against it and written."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self.raw = engine.raw_connection()
        self.dbapi: Any = self.raw.driver_connection
        self._staged = False
        if self.dialect == "sqlite":
            # a larger page cache while the indexes grow (SQLite's default is 2 MB)
            self._cache = self.dbapi.execute("PRAGMA cache_size").fetchone()[0]
            self.dbapi.execute(f"PRAGMA cache_size = {-CACHE_KB}")

    def close(self) -> None:
        if self.dialect == "sqlite":
            self.dbapi.execute(f"PRAGMA cache_size = {int(self._cache)}")
        self.raw.close()

    def begin(self) -> int:
        """Start a chunk's transaction; the latest command's id (the book changes only by
        commands, each recorded in `commands`)."""
        if self.dialect == "sqlite":
            self.dbapi.execute("BEGIN IMMEDIATE")
            row = self.dbapi.execute("SELECT COALESCE(MAX(id), 0) FROM commands").fetchone()
        else:
            with self.dbapi.cursor() as cur:
                if not self._staged:
                    cur.execute(STAGE_DDL)
                    self._staged = True
                cur.execute("LOCK TABLE commands IN SHARE MODE")
                cur.execute("SELECT COALESCE(MAX(id), 0) FROM commands")
                row = cur.fetchone()
        return int(row[0])

    def write(self, rows: Sequence[Row]) -> int:
        """Insert the rows (their order kept); how many were new (the rest were duplicates)."""
        if not rows:
            return 0
        if self.dialect == "sqlite":
            before = self.dbapi.total_changes
            self.dbapi.executemany(
                f"INSERT OR IGNORE INTO usage_events ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)  # noqa: S608
            return int(self.dbapi.total_changes - before)
        with self.dbapi.cursor() as cur:
            with cur.copy(f"COPY usage_stage (ord, {COLUMNS}) FROM STDIN") as copy:  # noqa: S608
                for ord_, row in enumerate(rows):
                    copy.write_row((ord_, *row))
            cur.execute(f"INSERT INTO usage_events ({COLUMNS}) SELECT {COLUMNS} FROM usage_stage "  # noqa: S608
                        "ORDER BY ord ON CONFLICT (subscription, key) DO NOTHING")
            return int(cur.rowcount)  # the staged rows go at commit (ON COMMIT DELETE ROWS)

    def commit(self) -> None:
        self.dbapi.commit()

    def rollback(self) -> None:
        self.dbapi.rollback()
