"""Hostile input to the scenario loader and the command line: wrong types, huge numbers, NaN
and Infinity, negative or absurd quantities, times out of order, unknown fields, invalid UTF-8,
a 10 MB line, truncated and deeply nested JSON. Every case ends in a one-line error naming the
problem and a non-zero exit (never a traceback), and a database the bad file was applied to is
exactly as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples
from sqlalchemy import func, inspect, select, table

from billing.book import BookError
from billing.cli import cli
from billing.persistence import create_engine
from billing.replay import replay_in_memory
from billing.scenario import ScenarioError, parse_scenario_text

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios" / "02-seat-expansion-with-addon.json"
BASE: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))

HOSTILE: list[Any] = [
    None, True, "", " ", "x" * 5000, "\u0000", "\u202e", "<script>alert(1)</script>", "=1+1",
    "'; DROP TABLE invoices;--",
    -1, 0, 10**30, -(10**30), 2**63, "1e400", "-0", "NaN", "Infinity", "9" * 400, "0.0000000000000000001",
    "2026-13-45T00:00:00Z", "2026-01-01", "yesterday", [], [[]], {}, {"nested": {"deeper": [1, 2, 3]}},
]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in the document a value sits (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "expect":
                out.extend(paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(paths(value, (*prefix, i)))
    return out


PATHS = paths(BASE)


def put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of `doc` with `value` at `path` (unchanged when an earlier mutation removed it)."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for depth, step in enumerate(path):
        if not isinstance(node, (dict, list)) or (isinstance(node, list) and not isinstance(step, int)) \
                or (isinstance(node, list) and step >= len(node)) or (isinstance(node, dict) and step not in node):
            return doc
        if depth == len(path) - 1:
            node[step] = value
        else:
            node = node[step]
    return doc


@st.composite
def hostile_documents(draw: st.DrawFn) -> str:
    doc: Any = {k: v for k, v in BASE.items() if k != "expect"}
    for _ in range(draw(st.integers(1, 3))):
        choice = draw(st.sampled_from(["replace", "replace", "unknown_key", "swap_events", "constant"]))
        if choice == "replace":
            doc = put(doc, draw(st.sampled_from(PATHS)), draw(st.sampled_from(HOSTILE)))
        elif choice == "unknown_key" and isinstance(doc.get("events"), list) and doc["events"] \
                and all(isinstance(e, dict) for e in doc["events"]):
            event = doc["events"][draw(st.integers(0, len(doc["events"]) - 1))]
            event[draw(st.sampled_from(["qty", "Type", "at "]))] = 1
        elif choice == "swap_events" and isinstance(doc.get("events"), list) and len(doc["events"]) > 2:
            i = draw(st.integers(1, len(doc["events"]) - 1))
            doc["events"][i - 1], doc["events"][i] = doc["events"][i], doc["events"][i - 1]
        elif choice == "constant":
            doc = put(doc, draw(st.sampled_from(PATHS)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    return json.dumps(doc)


@settings(max_examples=examples(300))
@given(hostile_documents())
def test_the_loader_and_the_book_refuse_with_a_named_error(text_: str) -> None:
    try:
        scenario = parse_scenario_text(text_)
        replay_in_memory(scenario)
    except (ScenarioError, BookError) as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        assert len(message) < 2000


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _assert_clean_failure(result: Any) -> None:
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("billing: "), result.stderr
    assert "Traceback" not in result.output


@settings(max_examples=examples(25))
@given(hostile_documents())
def test_billing_replay_exits_non_zero_with_one_line(tmp_path_factory: pytest.TempPathFactory, text_: str) -> None:
    path = tmp_path_factory.mktemp("hostile") / "scenario.json"
    path.write_text(text_, encoding="utf-8")
    result = _invoke("replay", str(path), "--json")
    if result.exit_code != 0:
        _assert_clean_failure(result)


@pytest.mark.parametrize(("content", "problem"), [
    (b'{"events": [{"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "c\xff", "currency": "USD"}]}',
     "not UTF-8 text"),
    (b'{"events": [', "not valid JSON"),
    (b'{"settings": {"reporting_currency": "USD"}, "events": [{"at": "2026-01-01T00:00:00Z", "type": "customer", '
     b'"customer": "c", "currency": "USD", "tax_rate": NaN}]}', "NaN is not a number this format accepts"),
    (b'{"events": [{"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "' + b"c" * 10_000_000 + b'", '
     b'"currency": "USD"}]}', "events[0].customer: String should have at most 200 characters"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"events": [{"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "c", "currency": "USD", '
     b'"tax_rate": 0.2}]}', 'events[0].tax_rate: must be a decimal string such as "12.50", not a JSON number'),
], ids=["invalid-utf8", "truncated", "nan", "ten-megabyte-line", "deep-nesting", "float-money"])
def test_files_that_are_not_scenarios(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = _invoke("replay", str(path))
    _assert_clean_failure(result)
    assert problem in result.stderr


def _table_counts(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {name: conn.execute(select(func.count()).select_from(table(name))).scalar_one()
                    for name in inspect(conn).get_table_names()}
    finally:
        engine.dispose()


@pytest.mark.parametrize("bad_event", [
    {"at": "2026-03-01T00:00:00Z", "type": "change_quantity", "subscription": "acme-team", "quantity": -5},
    {"at": "2026-03-01T00:00:00Z", "type": "change_quantity", "subscription": "acme-team", "quantity": 10**12},
    {"at": "2020-01-01T00:00:00Z", "type": "invoice_run"},
    {"at": "2026-03-01T00:00:00Z", "type": "subscribe", "customer": "acme", "subscription": "acme-team",
     "plan": "team", "quantity": 1},
    {"at": "2026-03-01T00:00:00Z", "type": "discount", "customer": "acme", "percent": "150"},
], ids=["negative-quantity", "absurd-quantity", "time-backwards", "duplicate-subscription", "percent-over-100"])
def test_a_rejected_command_leaves_the_database_exactly_as_it_was(tmp_path: Path, bad_event: dict[str, Any]) -> None:
    url = f"sqlite:///{tmp_path / 'book.sqlite'}"
    good = tmp_path / "good.json"
    good.write_text(FIXTURE.read_text(encoding="utf-8"), encoding="utf-8")
    assert _invoke("init", "--db", url).exit_code == 0
    assert _invoke("apply", str(good), "--db", url).exit_code == 0
    before = _table_counts(url)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"events": [bad_event]}), encoding="utf-8")
    result = _invoke("apply", str(bad), "--db", url)
    _assert_clean_failure(result)
    assert _table_counts(url) == before
