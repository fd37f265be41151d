"""Hostile usage lines to the ingester (hypothesis): random JSON values in every field, unknown
fields, non-objects, broken JSON, invalid UTF-8 and long lines, mixed with good rows. Every line
is accounted for — accepted, duplicated or rejected with its line number and a short reason —
nothing raises, and the table holds exactly the rows accepted."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
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


# -- the fast paths give what the plain ones give -------------------------------------------------

_REFERENCE_DECODER = json.JSONDecoder(parse_float=Decimal)


def _reference_read(data: bytes) -> list[tuple[int, Any]]:
    """`read_jsonl` as it was before orjson: the standard decoder, decimals exact."""
    out: list[tuple[int, Any]] = []
    for number, line in enumerate(io.BytesIO(data), start=1):
        try:
            value = _REFERENCE_DECODER.decode(line.decode())
        except UnicodeDecodeError:
            out.append((number, "not UTF-8 text"))
            continue
        except ValueError as exc:
            if not line.strip():
                continue
            out.append((number, f"not valid JSON ({exc.args[0].split(':')[0]})"))
            continue
        out.append((number, value) if isinstance(value, dict) else (number, "not a JSON object"))
    return out


NUMBERS = ["0", "-0", "7", "-12", "1.5", "12.50", "1e5", "2E-3", "-1E+2", "0.0000001", str(2**63),
           str(2**64), str(-(2**63) - 1), "1" * 19, "1" * 30, "NaN", "Infinity", "-Infinity", "1.", "01", ".5"]
STRINGS = ['"plain"', '"é"', '"\\u00e9"', '"\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', '"a\\tb\\nc"', '"\\\\"',
           '"\\""', '"\x7f"', '"1.5"', '"e1"', '"\\/"']
SCALARS = NUMBERS + STRINGS + ["true", "false", "null"]


@st.composite
def json_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON-ish text, valid or not: the numbers and strings where decoders differ."""
    kind = draw(st.sampled_from(["scalar", "scalar", "object", "array"] if depth < 3 else ["scalar"]))
    if kind == "scalar":
        return draw(st.sampled_from(SCALARS))
    items = [draw(json_texts(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
    if kind == "array":
        return "[" + ",".join(items) + "]"
    keys = [draw(st.sampled_from(['"value"', '"at"', '"id"', '"properties"', '"k"', '"é"', '"k"'])) for _ in items]
    return "{" + ",".join(f"{k}:{v}" for k, v in zip(keys, items, strict=True)) + "}"


@settings(max_examples=examples(300))
@given(texts=st.lists(json_texts(), min_size=1, max_size=6), noise=st.binary(max_size=6), spaces=st.booleans())
@example(texts=["0"], noise=b"\x1c", spaces=False)  # a line of U+001C is not blank: str.strip() took it
@example(texts=["0"], noise=b"\x0c\x0b", spaces=True)
def test_reading_json_lines_is_exact_as_ever(texts: list[str], noise: bytes, spaces: bool) -> None:
    """orjson reads the lines it can give exactly; whatever it reads, the result — decimals,
    integers, strings, key order, reasons — is what the standard decoder gives."""
    lines = [(" " + t + " " if spaces else t).encode() for t in texts] + [noise.replace(b"\n", b" ")]
    data = b"\n".join(lines) + b"\n"
    got = list(read_jsonl(io.BytesIO(data)))
    assert repr(got) == repr(_reference_read(data))
    assert repr(list(read_jsonl(io.StringIO(data.decode(errors="replace"))))) == repr(
        _reference_read(data.decode(errors="replace").encode()))


PROPERTY_VALUES = st.one_of(
    st.text(max_size=6), st.integers(-(2**70), 2**70), st.booleans(), st.none(),
    st.decimals(allow_nan=True, allow_infinity=True, places=3), st.sampled_from([float("nan"), 1.5, 1e16]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


@settings(max_examples=examples(300))
@given(props=st.dictionaries(st.text(max_size=6), PROPERTY_VALUES, max_size=4))
def test_properties_text_is_what_json_dumps_gives(props: dict[str, Any]) -> None:
    from billing.metering import _props_text

    assert _props_text(props) == json.dumps(props, separators=(",", ":"), default=str)


@settings(max_examples=examples(300))
@given(field=st.sampled_from(["value", "gb", "user"]), aggregation=st.sampled_from(["sum", "unique_count", "max"]),
       filters=st.dictionaries(st.sampled_from(["region", "tier"]), st.sampled_from(["eu", "1", "True"]), max_size=2),
       value=st.one_of(st.integers(-(10**11), 10**11), st.decimals(-(10**6), 10**6, places=6)),
       props=st.dictionaries(st.sampled_from(["region", "tier", "gb", "user"]),
                             st.one_of(st.sampled_from(["eu", "1", "True", "u12", "Inf", "nan", "sNaN", " 3", "x",
                                                        "٣", "²", "", "1_000", "-2.5", "e5", "ab"]),
                                       st.integers(), st.booleans(), st.none(), st.decimals(places=2)),
                             max_size=4))
def test_measuring_is_what_billing_usage_measure_gives(field: str, aggregation: str, filters: dict[str, str],
                                                        value: int | Decimal, props: dict[str, Any]) -> None:
    from billing.catalog import Metric
    from billing.metering import _measurer
    from billing.usage import measure, scaled

    metric = Metric.model_validate({"code": "m", "name": "M", "aggregation": aggregation, "field": field,
                                    "filter": filters, "pricing": "per_unit", "prices": {"USD": "1"}})
    assert _measurer(metric)(value, scaled(Decimal(value)), props) == measure(metric, Decimal(value), props)


@settings(max_examples=examples(300))
@given(started=st.none() | st.integers(0, 100), ends=st.none() | st.integers(0, 100),
       trial_end=st.none() | st.integers(0, 100), invoiced_until=st.none() | st.integers(0, 100),
       closed=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=3),
       now=st.integers(0, 200), grace=st.none() | st.integers(0, 50), at=st.integers(-10, 110))
def test_the_accepting_span_only_holds_accepted_instants(
        started: int | None, ends: int | None, trial_end: int | None, invoiced_until: int | None,
        closed: list[tuple[int, int]], now: int, grace: int | None, at: int) -> None:
    from billing.metering import _accepting
    from billing.usage import UsageWindow

    window = UsageWindow("s", started, ends, trial_end, invoiced_until, tuple(closed))
    lo, hi = _accepting(window, now, grace)
    if lo <= at < hi:
        assert window.reject(at, now=now, grace=grace) is None
