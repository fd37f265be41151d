"""The Alembic migrations shipped in the package create exactly the schema the models describe."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from dbkit import Db
from sqlalchemy import inspect, text

from billing import service
from billing.persistence import current_revision, head_revision, upgrade
from billing.persistence.engine import migration_config, write_ahead_log
from billing.persistence.tables import Base

TABLES = {
    "alembic_version",
    "audit_log",
    "billed_periods",
    "book_state",
    "commands",
    "credit_note_lines",
    "credit_notes",
    "customer_books",
    "customer_mrr_months",
    "customers",
    "invoice_lines",
    "invoice_run_customers",
    "invoice_runs",
    "invoices",
    "movement_invoice_lines",
    "mrr_month_flows",
    "mrr_month_measures",
    "mrr_movement_legs",
    "mrr_movements",
    "number_claims",
    "number_sequences",
    "subscriptions",
    "usage_events",
}


def test_upgrade_creates_every_table(empty_db: Db) -> None:
    assert current_revision(empty_db.engine) is None
    upgrade(empty_db.engine)
    assert set(inspect(empty_db.engine).get_table_names()) == TABLES
    assert current_revision(empty_db.engine) == head_revision() == "0010_hot_views"


def test_migrated_schema_matches_the_models(db: Db) -> None:
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_money_columns_are_integers_and_instants_keep_their_zone(db: Db) -> None:
    columns = {c["name"]: c for c in inspect(db.engine).get_columns("invoices")}
    for name in ("subtotal", "discount", "tax", "total", "credit_applied", "amount_due", "credit_added"):
        assert columns[name]["type"].python_type is int
        assert columns[name]["nullable"] is False
    if db.backend == "postgresql":
        assert columns["issued_at"]["type"].timezone is True


def test_upgrade_is_idempotent_and_downgrade_reverses_it(db: Db) -> None:
    upgrade(db.engine)  # at head already: nothing to do
    config = migration_config()
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    assert set(inspect(db.engine).get_table_names()) == {"alembic_version"}
    upgrade(db.engine)
    assert set(inspect(db.engine).get_table_names()) == TABLES


def test_init_database_from_a_url(empty_db: Db) -> None:
    assert service.init_database(empty_db.url) == "0010_hot_views"
    service.check_schema(empty_db.engine)


def test_customer_parts_are_compressed_with_lz4_on_postgresql(db: Db) -> None:
    """A run rewrites every billed customer's part: LZ4 costs PostgreSQL about half pglz's time."""
    if db.backend != "postgresql":
        pytest.skip("SQLite does not compress values")
    with db.engine.connect() as conn:
        method = conn.execute(text(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'customer_books'::regclass "
            "AND attname = 'snapshot'")).scalar()
    assert method == "l"


def test_view_tables_leave_room_for_updates_in_place_on_postgresql(db: Db) -> None:
    """A run rewrites every billed subscription's view row: half-empty pages make those HOT updates."""
    if db.backend != "postgresql":
        pytest.skip("SQLite has no fillfactor")
    with db.engine.connect() as conn:
        options = dict(conn.execute(text(
            "SELECT relname, reloptions FROM pg_class WHERE relname IN ('subscriptions', 'customers')")).all())
    assert options == {"subscriptions": ["fillfactor=50"], "customers": ["fillfactor=50"]}


def test_a_sqlite_book_is_in_wal_mode_so_readers_do_not_block_a_run(db: Db) -> None:
    """`billing init` leaves a SQLite file in WAL mode with durable commits: a reader in the middle
    of a read transaction (a report during a run) does not keep a writer from committing, and
    keeps reading what it started with."""
    if db.backend != "sqlite":
        pytest.skip("a PostgreSQL reader never blocks a writer")
    import sqlite3

    path = str(db.engine.url.database)
    reader, writer = sqlite3.connect(path, isolation_level=None), sqlite3.connect(path, timeout=0.2)
    try:
        assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert reader.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: the log is synced at commit
        reader.execute("BEGIN")
        before = reader.execute("SELECT count(*) FROM number_sequences").fetchone()[0]
        writer.execute("INSERT INTO number_sequences (series, prefix, next) VALUES ('wal-check', '', 1)")
        writer.commit()  # a rollback journal would refuse: "database is locked" after 0.2 s
        assert reader.execute("SELECT count(*) FROM number_sequences").fetchone()[0] == before
        reader.execute("COMMIT")
        assert reader.execute("SELECT count(*) FROM number_sequences").fetchone()[0] == before + 1
    finally:
        reader.close()
        writer.close()


def test_a_sqlite_file_in_use_keeps_its_journal_until_the_next_init(tmp_path: Path) -> None:
    """Switching to WAL needs the file to itself: while another process writes, `billing init`
    leaves the rollback journal as it is (no error, nothing lost) and the next one switches."""
    import sqlite3

    path = tmp_path / "busy.sqlite"
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("CREATE TABLE kept (n INTEGER)")
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO kept VALUES (1)")
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
        write_ahead_log(engine)
        other.execute("COMMIT")
        assert _journal_mode(path) == "delete"
        write_ahead_log(engine)
        engine.dispose()
        assert _journal_mode(path) == "wal"
        assert other.execute("SELECT n FROM kept").fetchall() == [(1,)]
    finally:
        other.close()


def _journal_mode(path: Path) -> str:
    """The journal mode stored in the file, as a new connection finds it."""
    import sqlite3

    fresh = sqlite3.connect(path)
    try:
        return str(fresh.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        fresh.close()
