"""Aggregation in SQL agrees with the in-memory aggregation of the pure replay: on every usage
fixture (the whole replay output, byte for byte) and on generated event sets for every
aggregation, with filters, property fields, ties at one instant, carried-over levels and a
period cut short."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from dbkit import Db

from billing import service
from billing.catalog import Metric
from billing.persistence import UnitOfWork
from billing.persistence.usage_store import BatchedUsage, aggregate_all
from billing.replay import replay_in_memory
from billing.scenario import parse_scenario_text
from billing.usage import MemoryUsage, UsageRecord, micros

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
USAGE_FIXTURES = sorted(p for p in FIXTURES.glob("*.json") if '"type": "usage"' in p.read_text())


@pytest.mark.parametrize("path", USAGE_FIXTURES, ids=[p.stem for p in USAGE_FIXTURES])
def test_database_replay_equals_the_pure_replay(db: Db, path: Path) -> None:
    scenario = parse_scenario_text(path.read_text())
    pure = json.dumps(replay_in_memory(scenario).to_json(), default=str, sort_keys=True)
    stored = json.dumps(service.replay(scenario, db.url).to_json(), default=str, sort_keys=True)
    assert stored == pure


START = datetime(2026, 3, 1, tzinfo=UTC)
END = datetime(2026, 4, 1, tzinfo=UTC)
METRICS = [
    Metric(code="s", aggregation="sum", prices={"USD": "1"}),
    Metric(code="c", aggregation="count", filter={"region": "eu"}, prices={"USD": "1"}),
    Metric(code="m", aggregation="max", field="size", prices={"USD": "1"}),
    Metric(code="u", aggregation="unique_count", field="user", filter={"region": "eu"}, prices={"USD": "1"}),
    Metric(code="l", aggregation="last", prices={"USD": "1"}),
    Metric(code="w", aggregation="weighted_sum", field="size", prices={"USD": "1"}),
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sql_aggregates_equal_the_in_memory_ones(db: Db, seed: int) -> None:
    rnd = random.Random(seed)
    memory = MemoryUsage()
    by_code = {m.code: m for m in METRICS}
    with UnitOfWork(db.engine) as uow:
        for _ in range(400):
            metric = by_code[rnd.choice(list(by_code))]
            sub = rnd.choice(["a", "b"])
            # a few instants only, so ties at one instant are common; some before the period
            at = START + timedelta(days=rnd.choice([-3, 0, 0, 2, 9, 9, 17, 30]), hours=rnd.choice([0, 5]))
            value = Decimal(rnd.randint(-5, 500)) / rnd.choice([1, 4, 1000])
            props: dict[str, object] = {"region": rnd.choice(["eu", "us"]), "user": f"u{rnd.randint(1, 9)}"}
            if rnd.random() < 0.8:
                props["size"] = rnd.choice([3, "12.5", "7.125", "x"])
            record = UsageRecord(at, metric.code, value, f"k{rnd.randint(1, 350)}", props)
            assert uow.usage.record(sub, metric, record) == memory.record(sub, metric, record)
        batched = BatchedUsage(uow.session, ["a", "b", "c"])
        for metric in METRICS:
            for sub in ("a", "b", "c"):
                for start, end, held in ((START, END, None), (START, START + timedelta(days=9), END),
                                         (START + timedelta(days=2), END, None)):
                    expected = memory.aggregate(sub, metric, start, end, held_until=held)
                    assert uow.usage.aggregate(sub, metric, start, end, held_until=held) == expected, (metric, sub)
                    assert batched.aggregate(sub, metric, start, end, held_until=held) == expected, (metric, sub)
        everyone = aggregate_all(uow.session, METRICS, micros(START), micros(END))
        for (sub, code), value in everyone.items():
            assert value == memory.aggregate(sub, by_code[code], START, END)
        uow.commit()
