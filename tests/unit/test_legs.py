"""Movement legs: how each MRR movement splits over (subscription, plan, product), computed by the
pure core at emission. Legs are what plan and product segments are built from."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from billing.records import MrrMovement
from billing.replay import ReplayResult, replay_in_memory
from billing.scenario import Scenario, parse_scenario_text

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))

A = {"code": "a", "name": "A", "interval": "month", "pricing": "flat", "prices": {"USD": "100.00", "EUR": "90.00"},
     "product": "core"}
B = {"code": "b", "name": "B", "interval": "month", "pricing": "flat", "prices": {"USD": "150.00"}, "product": "core"}
B_SAME = {"code": "b2", "name": "B2", "interval": "month", "pricing": "flat", "prices": {"USD": "100.00"},
          "product": "core"}
THIRD = {"code": "third", "name": "Third", "interval": "year", "pricing": "flat", "prices": {"USD": "100.00"},
         "product": "analytics"}
SEATS = {"code": "seats", "name": "Seats", "interval": "month", "pricing": "per_unit", "prices": {"USD": "10.00"},
         "product": "analytics"}


def run(events: list[dict[str, Any]], **settings: Any) -> ReplayResult:
    doc = {"settings": settings, "catalog": {"plans": [A, B, B_SAME, THIRD, SEATS]}, "events": events}
    return replay_in_memory(Scenario.model_validate(doc))


def legs(m: MrrMovement) -> list[tuple[str | None, str | None, str]]:
    return [(leg.subscription, leg.plan, str(leg.delta)) for leg in m.legs]


def start(*subs: tuple[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"at": "2026-01-01", "type": "customer", "customer": "c", "currency": "USD"}]
    events += [{"at": "2026-01-01", "type": "subscribe", "customer": "c", "subscription": sid, "plan": plan}
               for sid, plan in subs]
    return events


def test_an_upgrade_has_a_leg_leaving_the_old_plan_and_one_entering_the_new() -> None:
    r = run([*start(("s", "a")),
             {"at": "2026-01-10", "type": "change_plan", "subscription": "s", "plan": "b"}])
    new, upgrade = r.movements
    assert legs(new) == [("s", "a", "100.00")]
    assert (upgrade.type, upgrade.subtype, str(upgrade.delta)) == ("expansion", "upgrade", "50.00")
    assert legs(upgrade) == [("s", "a", "-100.00"), ("s", "b", "150.00")]
    assert [leg.product for leg in upgrade.legs] == ["core", "core"]


def test_a_cross_sell_has_one_leg_on_the_new_subscription() -> None:
    r = run([*start(("s", "a")),
             {"at": "2026-01-05", "type": "subscribe", "customer": "c", "subscription": "t", "plan": "third"}])
    assert legs(r.movements[1]) == [("t", "third", "8.33")]
    assert r.movements[1].legs[0].product == "analytics"


def test_a_plan_swap_at_the_same_price_moves_nothing_until_the_next_movement_carries_it() -> None:
    """A -> B2 at the same $100 emits no movement (the contract); the next movement's legs
    carry the reallocation, so cumulative legs always equal the customer's split."""
    r = run([*start(("s", "a")),
             {"at": "2026-01-10", "type": "change_plan", "subscription": "s", "plan": "b2"},
             {"at": "2026-01-20", "type": "subscribe", "customer": "c", "subscription": "t", "plan": "seats",
              "quantity": 2}])
    assert [m.type for m in r.movements] == ["new", "expansion"]
    assert legs(r.movements[1]) == [("s", "a", "-100.00"), ("s", "b2", "100.00"), ("t", "seats", "20.00")]


def test_churn_takes_every_leg_to_zero() -> None:
    r = run([*start(("s", "a"), ("t", "seats")),
             {"at": "2026-01-10", "type": "cancel", "subscription": "s", "effective": "immediately"},
             {"at": "2026-01-11", "type": "cancel", "subscription": "t", "effective": "immediately"}])
    assert [(m.type, legs(m)) for m in r.movements] == [
        ("new", [("s", "a", "100.00")]),
        ("expansion", [("t", "seats", "10.00")]),
        ("contraction", [("s", "a", "-100.00")]),
        ("churn", [("t", "seats", "-10.00")]),
    ]


def test_rounding_residue_goes_to_the_largest_leg() -> None:
    """Three yearly $100 subscriptions are 8.3333… each: the customer's MRR rounds to 25.00, the
    parts to 8.33 each, and the cent left over goes to the largest part (the first of equals),
    where it stays while the split does not change."""
    r = run([{"at": "2026-01-01", "type": "customer", "customer": "c", "currency": "USD"},
             *[{"at": "2026-01-01", "type": "subscribe", "customer": "c", "subscription": sid, "plan": "third"}
               for sid in ("x", "y", "z")]])
    assert [str(m.mrr_after) for m in r.movements] == ["8.33", "16.67", "25.00"]
    assert [legs(m) for m in r.movements] == [
        [("x", "third", "8.33")],
        [("x", "third", "0.01"), ("y", "third", "8.33")],
        [("z", "third", "8.33")],
    ]


def test_reporting_legs_sum_to_the_reporting_delta_in_another_currency() -> None:
    r = run([{"at": "2026-01-01", "type": "customer", "customer": "c", "currency": "EUR"},
             {"at": "2026-01-01", "type": "subscribe", "customer": "c", "subscription": "s", "plan": "a"}],
            fx_rates=[{"currency": "EUR", "rate": "1.0837", "from": "2026-01-01"}])
    [m] = r.movements
    assert str(m.reporting_delta) == "97.53"
    assert [(str(leg.delta), str(leg.reporting_delta)) for leg in m.legs] == [("90.00", "97.53")]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_legs_sum_to_every_movement_and_parts_never_go_negative(path: Path) -> None:
    result = replay_in_memory(parse_scenario_text(path.read_text()))
    parts: dict[tuple[str, str | None, str | None, str | None], Decimal] = {}
    for m in result.movements:
        assert m.legs, m
        assert sum((leg.delta for leg in m.legs), Decimal(0)) == m.delta
        assert sum((leg.reporting_delta for leg in m.legs), Decimal(0)) == m.reporting_delta
        for leg in m.legs:
            key = (m.customer, leg.subscription, leg.plan, leg.product)
            parts[key] = parts.get(key, Decimal(0)) + leg.delta
            assert parts[key] >= 0, (m.id, key)
        assert sum((v for k, v in parts.items() if k[0] == m.customer), Decimal(0)) == m.mrr_after


def test_a_snapshot_saved_before_legs_existed_starts_from_the_split_in_force() -> None:
    from billing.book import Book

    scenario = Scenario.model_validate({"catalog": {"plans": [A, SEATS]}, "events": start(("s", "a"), ("t", "seats"))})
    book = Book(scenario.settings, scenario.catalog)
    for index, event in enumerate(scenario.events):
        book.apply(event, index)
    del book.accounts["c"].__dict__["legs"]  # as pickled by the version before legs
    restored = Book.loads(book.dumps())
    assert restored.accounts["c"].legs == {("s", "a", "core"): Decimal("100.00"),
                                           ("t", "seats", "analytics"): Decimal("10.00")}
    change = restored.apply(Scenario.model_validate({"catalog": {"plans": [A, SEATS]}, "events": [
        {"at": "2026-02-01", "type": "change_quantity", "subscription": "t", "quantity": 3}]}).events[0])
    assert legs(change.movements[0]) == [("t", "seats", "20.00")]
