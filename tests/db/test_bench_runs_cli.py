"""`billing bench invoice-run` end to end on SQLite and PostgreSQL: a small book built and run in
one go prints every figure the issue names; built and run in two steps it bills the same, and a
book already run is refused rather than timed again."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from dbkit import Db

from billing.cli import cli
from billing.run_bench import backend_cpu

KEYS = ("subscriptions", "invoices", "seconds", "subscriptions_per_second", "invoices_per_second",
        "baseline_rows_per_second", "fraction_of_baseline", "peak_rss_mb", "workers")


def test_bench_invoice_run_prints_its_figures(db: Db) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", "invoice-run", "--subscriptions", "120", "--batch", "25", "--json",
                                 "--db", db.url])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert all(key in figures for key in KEYS)
    assert figures["subscriptions"] == 120 and figures["workers"] == 1 and figures["failed"] == 0
    # every monthly subscription renews on 2026-02-01, one invoice per customer with one due
    assert 0 < figures["invoices"] <= figures["customers"] and figures["invoice_lines"] >= 108
    assert figures["seconds"] > 0 and 0 < figures["fraction_of_baseline"] < 10
    # the CPU it took: the worker's own; a local PostgreSQL server's backends too (SQLite works
    # inside the worker, so it has none of its own)
    assert 0 < figures["worker_cpu_seconds"]
    if db.backend == "postgresql":
        assert figures["server_cpu_seconds"] >= 0  # read (a small run may take under one clock tick)
    else:
        assert figures["server_cpu_seconds"] is None
    busy = (figures["worker_cpu_seconds"] + (figures["server_cpu_seconds"] or 0)) / figures["seconds"]
    assert figures["cores_busy"] == pytest.approx(busy, abs=0.011)  # computed before its parts were rounded


def test_bench_invoice_run_in_two_steps(db: Db) -> None:
    runner = CliRunner()
    built = runner.invoke(cli, ["bench", "invoice-run", "--subscriptions", "60", "--step", "build",
                                "--db", db.url])
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["subscriptions"] == 60
    timed = runner.invoke(cli, ["bench", "invoice-run", "--subscriptions", "1", "--step", "run", "--json",
                                "--db", db.url])
    assert timed.exit_code == 0, timed.output
    figures = json.loads(timed.stdout)
    assert figures["subscriptions"] == 60 and figures["invoices"] > 0 and figures["failed"] == 0
    again = runner.invoke(cli, ["bench", "invoice-run", "--subscriptions", "1", "--step", "run", "--db", db.url])
    assert again.exit_code == 2 and "already run" in again.output
    nowhere = runner.invoke(cli, ["bench", "invoice-run", "--subscriptions", "5", "--step", "build"])
    assert nowhere.exit_code == 2 and "--step build needs --db" in nowhere.output


def test_backend_cpu_is_read_only_from_a_local_postgres_process(db: Db) -> None:
    """The server's CPU is read from /proc for a backend on this machine; any other process (or
    none) is not taken for one."""
    import os

    assert backend_cpu(os.getpid()) is None  # this is python, not a postgres backend
    assert backend_cpu(2**22 + 7) is None  # beyond pid_max: no such process
    if db.backend == "postgresql":
        from sqlalchemy import create_engine, text

        engine = create_engine(db.url)
        try:
            with engine.connect() as conn:
                pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
                conn.execute(text("SELECT count(*) FROM generate_series(1, 3000000)")).scalar_one()
                used = backend_cpu(pid)
        finally:
            engine.dispose()
        assert used is not None and used > 0
