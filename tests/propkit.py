"""Shared by the property tests: example counts under the loaded hypothesis profile
(tests/conftest.py) and a replay that skips the commands the book refuses."""

from __future__ import annotations

from typing import Any

from hypothesis import settings

from billing.book import Book, BookError
from billing.replay import ReplayResult, collect, metrics_for
from billing.scenario import Scenario


def examples(ci_count: int) -> int:
    """`ci_count` under the `ci` profile, ten times that under `deep`."""
    return max(1, ci_count * settings.default.max_examples // 100)


def replay_tolerant(doc: dict[str, Any]) -> tuple[Book, ReplayResult]:
    """Replay a generated history through a fresh book; a command the book refuses (a change on
    a cancelled subscription, say) is skipped and leaves the book as it was."""
    scenario = Scenario.model_validate(doc)
    book = Book(scenario.settings, scenario.catalog)
    outcomes = []
    for index, event in enumerate(scenario.events):
        try:
            outcomes.append(book.apply(event, index))
        except BookError:
            continue
    invoices, movements = collect(outcomes)
    return book, ReplayResult(invoices, movements, metrics_for(scenario, movements))
