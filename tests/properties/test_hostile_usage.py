"""Hostile usage lines to the ingester (hypothesis): random JSON values in every field, unknown
fields, non-objects, broken JSON, invalid UTF-8 and long lines, mixed with good rows. Every line
is accounted for — accepted, duplicated or rejected with its line number and a short reason —
nothing raises, and the table holds exactly the rows accepted."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples
from sqlalchemy import text

from billing import service
from billing.catalog import Catalog
from billing.metering import ingest, read_jsonl
from billing.persistence import Engine, create_engine
from billing.scenario import Settings

CATALOG = Catalog.model_validate({
    "plans": [{"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
               "prices": {"USD": "10.00"}, "metrics": ["api"]}],
    "metrics": [{"code": "api", "name": "API calls", "aggregation": "sum", "pricing": "per_unit",
                 "prices": {"USD": "0.01"}}],
})
GOOD = {"subscription": "acme-team", "metric": "api", "at": "2026-01-05T10:00:00Z", "value": "5"}
NASTY: list[Any] = [None, True, "", "x" * 3000, "\u0000", -1, 10**30, "NaN", "Infinity", "1e400", "1.0000001",
                    "2026-13-45", "yesterday", [], {}, {"a": [1, {"b": None}]}, "'; DROP TABLE usage_events;--"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    url = f"sqlite:///{Path(tmp_path_factory.mktemp('hostile-usage')) / 'book.sqlite'}"
    service.init_database(url)
    engine = create_engine(url)
    service.load_catalog(engine, CATALOG, Settings())
    for i, ev in enumerate([
        {"type": "customer", "at": "2026-01-01", "customer": "acme", "currency": "USD"},
        {"type": "subscribe", "at": "2026-01-01", "customer": "acme", "subscription": "acme-team",
         "plan": "team", "quantity": 1},
    ]):
        service.apply_event(engine, ev, actor="test", index=i)
    yield engine
    engine.dispose()


@st.composite
def lines(draw: st.DrawFn) -> bytes:
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["good", "field", "unknown", "not_object", "broken", "bytes"]))
        row: dict[str, Any] = {**GOOD, "id": draw(st.text(min_size=1, max_size=8))}
        if kind == "field":
            row[draw(st.sampled_from(sorted(row)))] = draw(st.sampled_from(NASTY))
        elif kind == "unknown":
            row[draw(st.sampled_from(["qty", "Value", "extra"]))] = 1
        if kind == "not_object":
            out.append(json.dumps(draw(st.sampled_from([[1, 2], "row", 3, None]))).encode())
        elif kind == "broken":
            out.append(json.dumps(row).encode()[: draw(st.integers(1, 20))])
        elif kind == "bytes":
            out.append(draw(st.binary(min_size=1, max_size=40)).replace(b"\n", b" "))
        else:
            out.append(json.dumps(row).encode())
    return b"\n".join(out) + b"\n"


def _stored(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM usage_events")).scalar_one())


@settings(max_examples=examples(100))
@given(data=lines())
def test_every_line_is_accounted_for(engine: Engine, data: bytes) -> None:
    before = _stored(engine)
    counted = sum(1 for line in data.split(b"\n") if line.strip())
    summary = ingest(engine, read_jsonl(io.BytesIO(data)), clock=lambda: datetime(2026, 1, 20, tzinfo=UTC))
    assert summary.rows == counted
    assert [r.line for r in summary.rejections] == sorted(r.line for r in summary.rejections)
    for rejection in summary.rejections:
        assert 1 <= rejection.line and rejection.reason and "\n" not in rejection.reason
        assert len(rejection.reason) < 400, rejection.reason
    assert _stored(engine) - before == summary.accepted
