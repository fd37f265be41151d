"""The book in customer parts (billing.shards): every fixture replayed by assembling, per event,
only the customers it names and those with a transition due, gives exactly the pure replay."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from billing.book import Book, Outcome
from billing.replay import ReplayResult, collect, collect_credit_notes, metrics_for, replay_in_memory
from billing.scenario import InvoiceRunEvent, Scenario, parse_scenario_text
from billing.shards import (
    Counters,
    CustomerPart,
    assemble,
    counters_of,
    customers_of,
    due_of,
    provisional,
    renumber,
    split,
)
from billing.usage import MemoryUsage

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))


class PartStore:
    """What the database keeps: pickled parts with their due times, the counters, the clock."""

    def __init__(self, scenario: Scenario, *, renumber_runs: bool = False) -> None:
        self.scenario = scenario
        self.renumber_runs = renumber_runs
        self.parts: dict[str, bytes] = {}
        self.due: dict[str, tuple[datetime | None, datetime | None]] = {}
        self.counters = Counters()
        self.clock: datetime | None = None
        self.sub_owner: dict[str, str] = {}
        self.invoice_owner: dict[str, str] = {}
        self.loaded: list[int] = []
        self.usage = MemoryUsage()  # usage events live outside the book (the database's usage_events)

    def apply(self, event: object, index: int) -> Outcome:
        assert not isinstance(event, str)
        named = customers_of(event, subscription_owner=self.sub_owner.get,  # type: ignore[arg-type]
                             invoice_owner=self.invoice_owner.get)
        at = event.at  # type: ignore[attr-defined]
        run = isinstance(event, InvoiceRunEvent)
        wanted = {c for c in named if c in self.parts}
        for customer, (transition, due) in self.due.items():
            moment = due if run else transition
            if moment is not None and moment <= at:
                wanted.add(customer)
        self.loaded.append(len(wanted))
        parts = [CustomerPart.loads(self.parts[c]) for c in sorted(wanted)]
        late = run and self.renumber_runs  # a worker computes first and takes the numbers at the end
        counters = provisional(self.counters) if late else self.counters
        book = assemble(Book(self.scenario.settings, self.scenario.catalog), parts, counters, self.clock)
        book.use_usage_source(self.usage)
        outcome = book.apply(event, index, discard_on_error=True)  # type: ignore[arg-type]
        if late:
            outcome = renumber(book, outcome, self.counters)
        for customer, part in split(book).items():
            self.parts[customer] = part.dumps()
            due = due_of(book, customer)
            self.due[customer] = (due.transition_at, due.due_at)
            for sub in part.subscriptions:
                self.sub_owner[sub] = customer
            for number in part.invoice_numbers():
                self.invoice_owner[number] = customer
        self.counters = counters_of(book)
        self.clock = book.clock
        return outcome


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
@pytest.mark.parametrize("late_numbers", [False, True], ids=["numbered", "renumbered"])
def test_replay_by_customer_parts_equals_the_pure_replay(path: Path, late_numbers: bool) -> None:
    scenario = parse_scenario_text(path.read_text())
    store = PartStore(scenario, renumber_runs=late_numbers)
    outcomes = [store.apply(event, index) for index, event in enumerate(scenario.events)]
    invoices, movements = collect(outcomes)
    result = ReplayResult(invoices, movements, metrics_for(scenario, movements), collect_credit_notes(outcomes))
    expected = replay_in_memory(scenario).to_json()
    assert json.loads(json.dumps(result.to_json(), default=str)) == json.loads(json.dumps(expected, default=str))
