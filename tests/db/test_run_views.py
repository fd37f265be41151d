"""An invoice run rewrites the view rows (`customers`, `subscriptions`) of exactly what it changed.

A run compares only what it can change (a customer's MRR and credit balance, a subscription's
items, status, schedule and periods: `service._run_view_of`) and writes only those columns
(`PartsRepository.update_views`), so a view it failed to notice would stay stale. After every
run of scenarios whose runs end trials, apply period-end changes and cancellations, bill usage,
apply credit and convert currencies, every view row must equal what the book then holds."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dbkit import Db

from billing import service
from billing.persistence import UnitOfWork
from billing.scenario import parse_scenario_text
from billing.subscription import Items, Scheduled

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
RUN_CHANGES = (
    "07-trial-spanning-months", "23-fx-eur-reporting-usd", "27-usage-not-in-mrr",
    "31-cancel-period-end-and-reactivate", "32-cancel-immediately-credit-void-pay", "36-addons-remove-and-requantify",
    "37-period-end-changes", "39-credit-note", "47-trial-with-changes-scheduled", "48-trials-cancelled",
    "57-catch-up-run-three-periods",
)


def _views_from_book(db: Db) -> tuple[dict[str, Any], dict[str, Any]]:
    with UnitOfWork(db.engine) as uow:
        stored = uow.book.load()
        assert stored is not None
        book = service.whole_book(uow, stored)
    view = service._view_of(book)
    return ({key: service._customer_view(row, view.rounding) for key, row in view.customers.items()},
            {key: service._subscription_view(row) for key, row in view.subscriptions.items()})


def _views_stored(db: Db) -> tuple[dict[str, Any], dict[str, Any]]:
    with UnitOfWork(db.engine) as uow:
        return ({c.id: c for c in uow.view.customers()},
                {s.id: replace(s, created_at=None) for s in uow.view.subscriptions()})


@pytest.mark.parametrize("name", RUN_CHANGES)
def test_every_view_a_run_changes_is_rewritten(db: Db, name: str) -> None:
    scenario = parse_scenario_text((FIXTURES / f"{name}.json").read_text())
    service.load_catalog(db.engine, scenario.catalog, scenario.settings)
    runs = 0
    for index, event in enumerate(scenario.events):
        service.apply_event(db.engine, event, actor="test", index=index)
        if event.type != "invoice_run":
            continue
        runs += 1
        expected_customers, expected_subscriptions = _views_from_book(db)
        stored_customers, stored_subscriptions = _views_stored(db)
        assert stored_customers == expected_customers, f"events[{index}]"
        assert stored_subscriptions == expected_subscriptions, f"events[{index}]"
    assert runs > 0


def _views(mrr: str = "100.00", credit: str = "0", **state: Any) -> service._RunView:
    fields: dict[str, Any] = {"plan": "team", "quantity": 3, "addons": (("analytics", 1), ("modules", 2)),
                              "status": "active", "cancel": False, "scheduled": (), "trial_end": None,
                              "start": datetime(2026, 1, 1, tzinfo=UTC), "end": datetime(2026, 2, 1, tzinfo=UTC),
                              "ended_at": None}
    fields.update(state)
    return service._RunView("half_up", {"acme": ("USD", Decimal(mrr), Decimal(credit))},
                            {"acme-1": tuple(fields.values())})


@pytest.mark.parametrize("change", [
    {"mrr": "120.00"}, {"credit": "-15.00"}, {"plan": "scale"}, {"quantity": 4}, {"addons": (("analytics", 1),)},
    {"addons": (("analytics", 1), ("modules", 3))}, {"status": "cancelled"}, {"cancel": True},
    {"scheduled": ((("cause", "change_plan"), ("plan", "scale")),)}, {"trial_end": datetime(2026, 1, 15, tzinfo=UTC)},
    {"start": datetime(2026, 2, 1, tzinfo=UTC), "end": datetime(2026, 3, 1, tzinfo=UTC)},
    {"ended_at": datetime(2026, 2, 1, tzinfo=UTC)},
], ids=lambda change: "+".join(change))
def test_a_run_notices_each_column_it_can_change(change: dict[str, Any]) -> None:
    customers, subscriptions = service._run_changes(_views(), _views(**change))
    if "mrr" in change or "credit" in change:
        assert customers == [("acme", "USD", Decimal(change.get("mrr", "100.00")), Decimal(change.get("credit", "0")))]
        assert subscriptions == []
    else:
        assert customers == []
        [row] = subscriptions
        assert row[0] == "acme-1" and row[1:] == tuple(_views(**change).subscriptions["acme-1"])


def test_a_run_rewrites_no_row_that_would_be_stored_the_same() -> None:
    before = _views(mrr="100.00", scheduled=((("cause", "change_plan"), ("plan", "scale")),))
    # the same amounts at another exponent, the same add-ons and schedule in another order
    after = _views(mrr="100.0", addons=(("modules", 2), ("analytics", 1)),
                   scheduled=((("plan", "scale"), ("cause", "change_plan")),))
    assert service._run_changes(before, after) == ([], [])
    assert service._run_changes(before, before) == ([], [])


def test_the_run_view_holds_what_the_book_holds() -> None:
    """`_run_view_of` reads every field a run can move (a missing one would never be written)."""
    from billing.book import Book
    from billing.catalog import Catalog
    from billing.scenario import Settings
    from billing.subscription import Subscription

    book = Book(Settings(), Catalog.model_validate({"plans": [
        {"code": "team", "name": "Team", "interval": "month", "prices": {"USD": "10.00"}}]}))
    sub = Subscription("s1", "c1", 0, None, "active", Items("team", 2, {"modules": 1}),
                       scheduled=[Scheduled("change_plan", 3, plan="pro")], cancel_at_period_end=True)
    book.subscriptions["s1"] = sub
    [state] = service._run_view_of(book).subscriptions.values()
    assert state == ("team", 2, (("modules", 1),), "active", True, ((("cause", "change_plan"), ("plan", "pro")),),
                     None, None, None, None)
