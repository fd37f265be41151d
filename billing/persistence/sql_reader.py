"""Hand-written aggregate SQL for `expansion.ledger`, and bulk loading for its benchmark.

The metric set is computed by the database (GROUP BY and window functions over the ledger), so
`expansion.ledger` writes SQL text; this module is how it reaches the database without importing
SQLAlchemy itself. `read_ledger(engine)` opens one connection whose transaction is always rolled
back: nothing a reader does (temporary tables included) outlives it. `bulk_insert` appends many
rows at once — COPY on PostgreSQL, executemany on SQLite — for synthetic ledgers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine


class SqlReader:
    """Runs SQL text with named parameters (`:name`) on one connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self.connection.execute(text(sql), dict(params or {}))]

    def scalar(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        return self.connection.execute(text(sql), dict(params or {})).scalar()

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> None:
        self.connection.execute(text(sql), dict(params or {}))


@contextmanager
def read_ledger(engine: Engine) -> Iterator[SqlReader]:
    """A reader on a fresh connection; its transaction is rolled back at the end."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # the metric queries sort and hash millions of rows: let them do it in memory
            connection.execute(text("SET LOCAL work_mem = '256MB'"))
        try:
            yield SqlReader(connection)
        finally:
            connection.rollback()


def bulk_insert(engine: Engine, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
                *, batch: int = 50_000) -> int:
    """Append rows (tuples in `columns` order) to `table` in one transaction; return how many.

    PostgreSQL gets them through COPY, SQLite through executemany in batches. Values go in as
    they are (ints, strings; instants as `datetime`), so the caller writes what the table's
    columns store: minor units for money, UTC for instants.
    """
    count = 0
    with engine.begin() as connection:
        raw = connection.connection.driver_connection
        assert raw is not None
        if connection.dialect.name == "postgresql":
            names = ", ".join(columns)
            with raw.cursor() as cursor, cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
                    count += 1
            return count
        # SQLite keeps instants as naive UTC text, in the format SQLAlchemy writes and reads
        rows = (tuple(_sqlite_value(v) for v in row) for row in rows)
        placeholders = ", ".join("?" for _ in columns)
        # table and column names come from the caller's code, never from input
        statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders})"  # noqa: S608
        cursor = raw.cursor()
        chunk: list[Sequence[Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= batch:
                cursor.executemany(statement, chunk)
                count += len(chunk)
                chunk = []
        if chunk:
            cursor.executemany(statement, chunk)
            count += len(chunk)
        cursor.close()
    return count


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return value
