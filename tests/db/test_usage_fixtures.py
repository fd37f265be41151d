"""Ingest fixtures (fixtures/usage): a book replayed from scenario events, batches of usage lines
ingested at a given clock and grace, then more events; each batch's summary (accepted,
duplicated, rejected, the rejected lines and why) and the usage lines billed afterwards are
checked against the fixture's expect blocks. Late, duplicate and out-of-life events cannot sit in
a scenario (a refused event stops a replay), so they live here. On SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dbkit import Db

from billing import service
from billing.metering import ingest, read_jsonl
from billing.scenario import parse_scenario_text

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "usage").glob("*.json"))


def test_there_are_usage_fixtures() -> None:
    assert FIXTURES


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_usage_fixture(db: Db, path: Path) -> None:
    spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    book = {k: spec[k] for k in ("settings", "catalog", "events")}
    service.replay(parse_scenario_text(json.dumps(book)), db.url)
    for number, batch in enumerate(spec["ingest"]):
        lines = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in batch["lines"])
        clock = datetime.fromisoformat(batch["clock"])
        grace = None if batch.get("grace_hours") is None else timedelta(hours=batch["grace_hours"])
        summary = ingest(db.engine, read_jsonl(io.BytesIO(lines.encode() + b"\n")), grace=grace,
                         clock=lambda clock=clock: clock)
        want = batch["expect"]
        where = f"{path.stem}: ingest[{number}]"
        assert (summary.accepted, summary.duplicated, summary.rejected) == (
            want["accepted"], want["duplicated"], want["rejected"]), where
        assert [r.line for r in summary.rejections] == [r["line"] for r in want["rejections"]], where
        for got, expected in zip(summary.rejections, want["rejections"], strict=True):
            assert expected["reason_contains"] in got.reason, f"{where} line {got.line}: {got.reason}"
    for offset, event in enumerate(spec.get("after", [])):
        service.apply_event(db.engine, event, actor="fixture", index=len(spec["events"]) + offset)
    usage = [(inv.number, line.subscription, line.quantity, line.amount)
             for inv in service.list_invoices(db.engine) for line in inv.lines if line.kind == "usage"]
    expected_lines = [(u["invoice"], u["subscription"], Decimal(u["quantity"]), Decimal(u["amount"]))
                      for u in spec["expect"]["usage_lines"]]
    assert usage == expected_lines, f"{path.stem}: {usage}"
