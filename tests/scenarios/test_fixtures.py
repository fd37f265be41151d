"""Every scenario in fixtures/scenarios replays through the database and matches its `expect`
block, checked by the same code as `billing replay FILE --check`; on PostgreSQL too when
BILLING_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import text

from billing import service
from billing.persistence import create_engine
from billing.replay import replay_in_memory
from billing.scenario import parse_scenario_text

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))
PG_URL = os.environ.get("BILLING_TEST_POSTGRES_URL")


def test_there_are_enough_fixtures() -> None:
    assert len(FIXTURES) >= 25


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_matches_its_expect_block(path: Path) -> None:
    scenario = parse_scenario_text(path.read_text())
    assert scenario.expect, f"{path.name} has no expect block"
    result, output, report = service.replay_and_check(scenario)
    assert report.differences == []
    assert report.checks > 10
    # our fixtures list every invoice and movement: nothing more may come out
    for key in ("invoices", "movements", "credit_notes"):
        if key in scenario.expect:
            assert len(output[key]) == len(scenario.expect[key]), key
    # the database round trip changes nothing: same output as the pure in-memory replay
    assert output == json.loads(json.dumps(replay_in_memory(scenario).to_json(), default=str))


@pytest.mark.skipif(PG_URL is None, reason="BILLING_TEST_POSTGRES_URL not set")
@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_on_postgresql(path: Path) -> None:
    assert PG_URL is not None
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    scenario = parse_scenario_text(path.read_text())
    _, _, report = service.replay_and_check(scenario, PG_URL)
    assert report.differences == []
