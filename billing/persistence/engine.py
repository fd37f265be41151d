"""Engines and schema migrations. Nothing here runs at import: callers create the engine.

- The database is a URL: `BILLING_DATABASE_URL`, else the embedded default
  `sqlite:///billing.sqlite`. `postgresql://` URLs are routed to psycopg 3.
- SQLite connections enforce foreign keys and wait for a busy database instead of failing at once.
- The schema is managed by the Alembic scripts shipped inside this package
  (`migrations/`), run programmatically, so `billing init` works from an installed package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

DatabaseError = SQLAlchemyError
"""Any error raised by the database layer (connection, constraint, SQL)."""

DEFAULT_URL = "sqlite:///billing.sqlite"
ENV_VAR = "BILLING_DATABASE_URL"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def default_url() -> str:
    """`BILLING_DATABASE_URL` if set and not empty, else the embedded SQLite file."""
    return os.environ.get(ENV_VAR) or DEFAULT_URL


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; plain `postgresql://` and `postgres://` use the psycopg 3 driver."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def display_url(url: str | URL) -> str:
    """The URL with any password masked, for messages."""
    return normalize_url(url).render_as_string(hide_password=True)


def create_engine(url: str | URL | None = None, *, durable: bool = True, echo: bool = False) -> Engine:
    """A new engine for `url` (default: `default_url()`).

    `durable=False` relaxes SQLite's fsync (`synchronous=OFF`); only for throw-away databases
    such as a scenario replay's temporary file.
    """
    parsed = normalize_url(url if url is not None else default_url())
    engine = sa.create_engine(parsed, echo=echo)
    if engine.dialect.name == "sqlite":
        pragmas = ["PRAGMA foreign_keys=ON", "PRAGMA busy_timeout=10000"]
        if not durable:
            pragmas.append("PRAGMA synchronous=OFF")

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            try:
                for pragma in pragmas:
                    cursor.execute(pragma)
            finally:
                cursor.close()

    return engine


def sqlite_file(url: str | URL) -> Path | None:
    """The file behind a file-based SQLite URL; None for other databases and in-memory ones."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def describe_error(exc: BaseException) -> str:
    """A database error as one line, without the SQL statement or the documentation link."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None else str(exc).split("\n(Background", 1)[0]
    text = text.split("\n[SQL:", 1)[0]
    return " ".join(text.split())


def migration_config() -> Config:
    """Alembic configuration pointing at the migrations shipped in this package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision` (idempotent at head). A SQLite file is
    put in WAL mode first (`write_ahead_log`)."""
    write_ahead_log(engine)
    config = migration_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def write_ahead_log(engine: Engine) -> None:
    """Put a SQLite file in WAL mode (it stays so: the mode is stored in the file). Readers — a
    report, `billing metrics` — then read the last commit without blocking a run's commits, nor
    a run them; commits stay durable (`synchronous` stays FULL: the log is synced at each). The
    database is then the file with its `-wal` and `-shm` beside it while it is open. Where SQLite
    cannot keep a log (a file system without shared memory), or cannot switch now (another
    process has the file open), it keeps its rollback journal, which is as safe, only readers and
    the writer then wait for each other; the next `billing init` tries again."""
    if engine.dialect.name != "sqlite" or sqlite_file(engine.url) is None:
        return
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA journal_mode=WAL")
    except sa.exc.OperationalError:  # "database is locked": switched the next time
        pass


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at; None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(migration_config()).get_current_head()
