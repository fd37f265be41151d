"""Hand-written aggregate SQL for `expansion.ledger`, and bulk loading for its benchmark.

The metric set is computed by the database (GROUP BY and window functions over the ledger), so
`expansion.ledger` writes SQL text; this module is how it reaches the database without importing
SQLAlchemy itself. `read_ledger(engine)` opens one connection whose transaction is always rolled
back: nothing a reader does (temporary tables included) outlives it. `load_tsv` appends many
rows at once — COPY on PostgreSQL, executemany on SQLite — for synthetic ledgers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from billing.persistence.tables import Base


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

    def stream(self, sql: str, params: Mapping[str, Any] | None = None) -> Iterable[tuple[Any, ...]]:
        """Rows one at a time, without holding the whole result in memory."""
        result = self.connection.execution_options(stream_results=True, yield_per=10_000).execute(
            text(sql), dict(params or {}))
        for row in result:
            yield tuple(row)


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


def load_tsv(engine: Engine, table: str, columns: Sequence[str], path: Path, *, batch: int = 100_000) -> int:
    """Append the rows of a tab-separated file (PostgreSQL COPY text format: `\\N` is NULL,
    instants as naive UTC `YYYY-MM-DD HH:MM:SS.ffffff`) to `table`; return how many.

    The table's secondary indexes are dropped before and rebuilt after (faster than maintaining
    them row by row), then the table is analysed. PostgreSQL reads the file through COPY; SQLite
    through executemany in batches (its column affinity turns the digits into integers)."""
    model = Base.metadata.tables[table]
    indexes = list(model.indexes)
    count = 0
    with engine.begin() as connection:
        for index in indexes:
            index.drop(connection)
        raw = connection.connection.driver_connection
        assert raw is not None
        names = ", ".join(columns)
        if connection.dialect.name == "postgresql":
            with raw.cursor() as cursor:
                cursor.execute("SET LOCAL TIME ZONE 'UTC'")
                with cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy, path.open("rb") as source:
                    while block := source.read(1 << 20):
                        copy.write(block)
            count = int(connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar() or 0)  # noqa: S608
        else:
            # table and column names come from the caller's code, never from input
            statement = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"  # noqa: S608
            cursor = raw.cursor()
            chunk: list[list[str | None]] = []
            with path.open(encoding="utf-8") as source:
                for line in source:
                    chunk.append([None if cell == "\\N" else cell for cell in line.rstrip("\n").split("\t")])
                    if len(chunk) >= batch:
                        cursor.executemany(statement, chunk)
                        count += len(chunk)
                        chunk = []
            if chunk:
                cursor.executemany(statement, chunk)
                count += len(chunk)
            cursor.close()
        for index in indexes:
            index.create(connection)
        connection.execute(text(f"ANALYZE {table}"))
    return count
