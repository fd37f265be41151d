"""Catalog loads and usage ingests are recorded in the insert-only audit log with who and when,
and every ingested event names its ingest (migration 0007). On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from dbkit import Db
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from billing.cli import cli
from billing.persistence.audit_log import actions

CATALOG = {"plans": [{"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
                      "prices": {"USD": "10.00"}, "metrics": ["api"]}],
           "metrics": [{"code": "api", "name": "API calls", "aggregation": "sum", "pricing": "per_unit",
                        "prices": {"USD": "0.01"}}]}
EVENTS = {"events": [
    {"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "acme", "currency": "USD"},
    {"at": "2026-01-01T00:00:00Z", "type": "subscribe", "customer": "acme", "subscription": "acme-team",
     "plan": "team", "quantity": 1}]}


def test_loads_and_ingests_say_who_and_when(db: Db, tmp_path: Path) -> None:
    run = CliRunner().invoke
    catalog = tmp_path / "catalog.json"
    catalog.write_text(json.dumps(CATALOG), encoding="utf-8")
    assert run(cli, ["catalog", "load", str(catalog), "--actor", "finance@acme", "--db", db.url]).exit_code == 0
    assert run(cli, ["catalog", "load", str(catalog), "--actor", "someone-else", "--db", db.url]).exit_code == 0
    events = tmp_path / "events.json"
    events.write_text(json.dumps(EVENTS), encoding="utf-8")
    assert run(cli, ["apply", str(events), "--db", db.url]).exit_code == 0
    usage = tmp_path / "usage.jsonl"
    usage.write_text("\n".join(json.dumps({"subscription": "acme-team", "metric": "api", "value": "5",
                                           "at": f"2026-01-0{i}T00:00:00Z", "id": f"e{i}"}) for i in (2, 3)) + "\n",
                     encoding="utf-8")
    result = run(cli, ["usage", "ingest", str(usage), "--actor", "meter-relay", "--no-progress", "--db", db.url])
    assert result.exit_code == 0, result.output

    with db.engine.connect() as conn:
        log = actions(conn)
        stored = conn.execute(text("SELECT key, ingest_id FROM usage_events ORDER BY key")).all()
    # the second load changed nothing: not logged
    assert [(e["action"], e["actor"]) for e in log] == [("catalog_load", "finance@acme"),
                                                         ("usage_ingest", "meter-relay")]
    assert log[0]["detail"] == {"result": "created", "plans": ["team"], "addons": [], "metrics": ["api"]}
    assert log[1]["detail"] == {"source": str(usage)} and log[1]["recorded_at"] is not None
    assert stored == [("e2", log[1]["id"]), ("e3", log[1]["id"])]

    with pytest.raises(DBAPIError, match="insert-only"), db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'nobody'"))
