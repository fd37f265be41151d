"""Invariants over randomly generated catalogs (every pricing model and interval, random prices,
trials) and histories (seats, plan and add-on changes, discounts, cancellations, reactivations,
runs), several customers in one currency, replayed through the pure book:

- every invoice's total is its lines' sum (after discount and tax), amounts in minor units;
- per customer, the movement deltas sum to the customer's current MRR, and chain;
- per month, quarter and year, the bridge holds with no FX impact in a one-currency book:
  starting + new + expansion + reactivation − contraction − churn = ending;
- a second invoice run at the same instant adds nothing;
- replaying the same scenario twice gives byte-identical output.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples, replay_tolerant

from billing.book import Book
from billing.money import minor_units
from billing.replay import ReplayResult
from billing.scenario import EVENT_ADAPTER

START = datetime(2026, 1, 1, tzinfo=UTC)
PLACES = {"USD": 2, "JPY": 0, "KWD": 3}


def amounts(currency: str) -> st.SearchStrategy[str]:
    places = PLACES[currency]
    return st.integers(0, 500_000 * 10**places // 100).map(lambda n: str(Decimal(n).scaleb(-places)))


@st.composite
def priced(draw: st.DrawFn, code: str, currency: str, *, plan: bool, interval: tuple[str, int]) -> dict[str, Any]:
    pricing = draw(st.sampled_from(["flat", "per_unit", "tiered", "volume", "package"]))
    item: dict[str, Any] = {"code": code, "name": code.title(), "pricing": pricing,
                            "interval": interval[0], "interval_count": interval[1]}
    if pricing in ("tiered", "volume"):
        bounds = sorted(draw(st.sets(st.integers(1, 40), min_size=0, max_size=3)))
        item["tiers"] = [{"up_to": b, "unit_amount": {currency: draw(amounts(currency))},
                          **({"flat_amount": {currency: draw(amounts(currency))}} if draw(st.booleans()) else {})}
                         for b in [*bounds, None]]
    else:
        item["prices"] = {currency: draw(amounts(currency))}
        if pricing == "package":
            item["package_size"] = draw(st.integers(1, 10))
    if plan:
        item["trial_days"] = draw(st.sampled_from([0, 0, 0, 7, 14]))
        item["product"] = draw(st.sampled_from(["core", "analytics"]))
    return item


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    currency = draw(st.sampled_from(sorted(PLACES)))
    base = draw(st.sampled_from([("month", 1), ("month", 3), ("year", 1), ("week", 2), ("day", 10)]))
    plans = [draw(priced(f"p{i}", currency, plan=True,
                         interval=base if i or draw(st.booleans()) else ("month", 1)))
             for i in range(draw(st.integers(1, 4)))]
    addons = [draw(priced(f"a{i}", currency, plan=False, interval=base)) for i in range(draw(st.integers(0, 2)))]
    policy = draw(st.sampled_from(["day", "second", "none"]))
    customers = [f"c{i}" for i in range(draw(st.integers(1, 3)))]
    events: list[dict[str, Any]] = []
    for c in customers:
        events.append({"at": START.isoformat(), "type": "customer", "customer": c, "currency": currency,
                       "tax_rate": draw(st.sampled_from(["0", "0.20", "0.075"])),
                       "timezone": draw(st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"]))})
    at = START
    subs: list[str] = []
    plan_codes = [p["code"] for p in plans]
    addon_codes = [a["code"] for a in addons]
    for i in range(draw(st.integers(1, 16))):
        at += timedelta(hours=draw(st.integers(0, 24 * 45)))
        stamp = at.isoformat()
        kind = draw(st.sampled_from(["subscribe", "qty", "plan", "addon", "remove", "discount", "cancel",
                                     "reactivate", "run", "run"]))
        when = draw(st.sampled_from(["immediately", "period_end"]))
        if kind == "subscribe" or not subs:
            sid = f"s{i}"
            subs.append(sid)
            events.append({"at": stamp, "type": "subscribe", "customer": draw(st.sampled_from(customers)),
                           "subscription": sid, "plan": draw(st.sampled_from(plan_codes)),
                           "quantity": draw(st.integers(0, 60))})
            continue
        sub = draw(st.sampled_from(subs))
        if kind == "qty":
            events.append({"at": stamp, "type": "change_quantity", "subscription": sub,
                           "quantity": draw(st.integers(0, 60)), "effective": when})
        elif kind == "plan":
            events.append({"at": stamp, "type": "change_plan", "subscription": sub,
                           "plan": draw(st.sampled_from(plan_codes)), "effective": when})
        elif kind in ("addon", "remove") and addon_codes:
            addon = draw(st.sampled_from(addon_codes))
            if kind == "addon":
                events.append({"at": stamp, "type": "add_addon", "subscription": sub, "addon": addon,
                               "quantity": draw(st.integers(1, 5)), "effective": when})
            else:
                events.append({"at": stamp, "type": "remove_addon", "subscription": sub, "addon": addon,
                               "effective": when})
        elif kind == "discount":
            off = ({"percent": draw(st.sampled_from(["10", "25", "100"]))} if draw(st.booleans())
                   else {"amount": draw(amounts(currency).filter(lambda a: Decimal(a) > 0))})
            events.append({"at": stamp, "type": "discount", "subscription": sub, **off,
                           "duration": draw(st.sampled_from(["once", "forever", {"periods": 2}]))})
        elif kind == "cancel":
            events.append({"at": stamp, "type": "cancel", "subscription": sub, "effective": when})
        elif kind == "reactivate":
            events.append({"at": stamp, "type": "reactivate", "subscription": sub})
        else:
            events.append({"at": stamp, "type": "invoice_run"})
    events.append({"at": (at + timedelta(days=400)).isoformat(), "type": "invoice_run"})
    return {"settings": {"proration": policy, "reporting_currency": currency, "rounding": draw(
        st.sampled_from(["half_up", "half_even"]))},
            "catalog": {"plans": plans, "addons": addons}, "events": events}


def replay(doc: dict[str, Any]) -> tuple[Book, ReplayResult]:
    return replay_tolerant(doc)


@settings(max_examples=examples(150))
@given(scenarios())
def test_totals_movements_and_the_bridge_hold(doc: dict[str, Any]) -> None:
    book, result = replay(doc)
    for inv in result.invoices:
        places = minor_units(inv.currency)
        assert all(line.amount == line.amount.quantize(Decimal(1).scaleb(-places)) for line in inv.lines)
        assert inv.subtotal == sum((line.amount for line in inv.lines if line.kind != "discount"), Decimal(0))
        assert inv.discount == -sum((line.amount for line in inv.lines if line.kind == "discount"), Decimal(0))
        assert inv.total == inv.subtotal - inv.discount + inv.tax
        assert inv.amount_due == (inv.total - inv.credit_applied if inv.total > 0 else 0) >= 0
    for customer in book.accounts:
        own = [m for m in result.movements if m.customer == customer]
        assert sum((m.delta for m in own), Decimal(0)) == book.customer_mrr(customer)
        for before, after in zip(own, own[1:], strict=False):
            assert after.mrr_before == before.mrr_after
    for rows in result.metrics.values():
        for row in rows:
            flows = (Decimal(str(row["starting_mrr"])) + Decimal(str(row["new"])) + Decimal(str(row["expansion"]))
                     + Decimal(str(row["reactivation"])) - Decimal(str(row["contraction"]))
                     - Decimal(str(row["churn"])))
            assert Decimal(str(row["fx_impact"])) == 0, row["period"]
            assert flows == Decimal(str(row["ending_mrr"])), row["period"]


@settings(max_examples=examples(100))
@given(scenarios())
def test_a_second_run_adds_nothing_and_replay_is_byte_identical(doc: dict[str, Any]) -> None:
    book, first = replay(doc)
    again = book.apply(EVENT_ADAPTER.validate_python({"at": doc["events"][-1]["at"], "type": "invoice_run"}))
    assert again.issued == [] and again.movements == []
    _, second = replay(json.loads(json.dumps(doc)))
    assert json.dumps(first.to_json(), sort_keys=True) == json.dumps(second.to_json(), sort_keys=True)
