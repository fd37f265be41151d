"""Property-based invariants over random catalogs and event histories (hypothesis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples, replay_tolerant

from billing.book import Book
from billing.money import minor_units
from billing.periods import Grid, local_wall
from billing.scenario import EVENT_ADAPTER

PLANS = [
    {"code": "seat", "interval": "month", "pricing": "per_unit", "prices": {"USD": "49.99", "JPY": "4999"}},
    {"code": "flat", "interval": "month", "pricing": "flat", "prices": {"USD": "300.00", "JPY": "30000"}},
    {"code": "tier", "interval": "month", "pricing": "tiered", "tiers": [
        {"up_to": 5, "unit_amount": {"USD": "10.00", "JPY": "1000"}},
        {"up_to": None, "unit_amount": {"USD": "7.50", "JPY": "750"}, "flat_amount": {"USD": "5", "JPY": "500"}}]},
    {"code": "year", "interval": "year", "pricing": "per_unit", "prices": {"USD": "499.00", "JPY": "49900"}},
]
ADDONS = [{"code": "extra", "interval": "month", "pricing": "per_unit", "prices": {"USD": "12.34", "JPY": "1234"}}]

START = datetime(2026, 1, 1, tzinfo=UTC)


@st.composite
def histories(draw: st.DrawFn) -> dict[str, Any]:
    currency = draw(st.sampled_from(["USD", "JPY"]))
    policy = draw(st.sampled_from(["day", "second", "none"]))
    tz = draw(st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"]))
    events: list[dict[str, Any]] = [
        {"at": START.isoformat(), "type": "customer", "customer": "c", "currency": currency, "timezone": tz,
         "tax_rate": draw(st.sampled_from(["0", "0.20", "0.075"]))}]
    at = START
    subs: list[str] = []
    for i in range(draw(st.integers(1, 14))):
        at += timedelta(hours=draw(st.integers(1, 24 * 40)))
        kind = draw(st.sampled_from(["subscribe", "qty", "plan", "addon", "run", "run", "cancel"]))
        stamp = at.isoformat()
        if kind == "subscribe" or not subs:
            sid = f"s{i}"
            plan = draw(st.sampled_from(["seat", "flat", "tier"]))
            event = {"at": stamp, "type": "subscribe", "customer": "c", "subscription": sid, "plan": plan,
                     "quantity": draw(st.integers(0, 30))}
            if draw(st.booleans()) and policy != "second":
                event["billing_day"] = draw(st.integers(1, 31))
            events.append(event)
            subs.append(sid)
        elif kind == "qty":
            events.append({"at": stamp, "type": "change_quantity", "subscription": draw(st.sampled_from(subs)),
                           "quantity": draw(st.integers(0, 30)),
                           "effective": draw(st.sampled_from(["immediately", "period_end"]))})
        elif kind == "plan":
            events.append({"at": stamp, "type": "change_plan", "subscription": draw(st.sampled_from(subs)),
                           "plan": draw(st.sampled_from(["seat", "flat", "tier"]))})
        elif kind == "addon":
            events.append({"at": stamp, "type": "add_addon", "subscription": draw(st.sampled_from(subs)),
                           "addon": "extra", "quantity": draw(st.integers(1, 5))})
        elif kind == "cancel":
            events.append({"at": stamp, "type": "cancel", "subscription": draw(st.sampled_from(subs)),
                           "effective": draw(st.sampled_from(["immediately", "period_end"]))})
        else:
            events.append({"at": stamp, "type": "invoice_run"})
    events.append({"at": (at + timedelta(days=40)).isoformat(), "type": "invoice_run"})
    return {"settings": {"proration": policy, "reporting_currency": currency},
            "catalog": {"plans": PLANS, "addons": ADDONS}, "events": events}


def replay(doc: dict[str, Any]) -> tuple[Book, list[Any], list[Any]]:
    book, result = replay_tolerant(doc)
    return book, result.invoices, result.movements


@settings(max_examples=examples(150))
@given(histories())
def test_invoice_totals_add_up(doc: dict[str, Any]) -> None:
    _, invoices, _ = replay(doc)
    for inv in invoices:
        lines = sum((line.amount for line in inv.lines if line.kind != "discount"), Decimal(0))
        assert inv.subtotal == lines
        assert inv.total == inv.subtotal - inv.discount + inv.tax
        assert inv.amount_due == (inv.total - inv.credit_applied if inv.total > 0 else 0)
        assert inv.amount_due >= 0
        places = minor_units(inv.currency)
        for line in inv.lines:
            assert line.amount == line.amount.quantize(Decimal(1).scaleb(-places))


@settings(max_examples=examples(150))
@given(histories())
def test_movement_deltas_sum_to_current_mrr(doc: dict[str, Any]) -> None:
    book, _, movements = replay(doc)
    total = sum((m.delta for m in movements), Decimal(0))
    assert total == book.customer_mrr("c")
    for before, after in zip(movements, movements[1:], strict=False):
        assert after.mrr_before == before.mrr_after
        assert after.at >= before.at


@settings(max_examples=examples(100))
@given(histories())
def test_rerunning_an_invoice_run_adds_nothing(doc: dict[str, Any]) -> None:
    book, invoices, _ = replay(doc)
    last = doc["events"][-1]["at"]
    again = book.apply(EVENT_ADAPTER.validate_python({"at": last, "type": "invoice_run"}))
    assert again.issued == [] and again.movements == []
    assert len(invoices) == len(book.issued_invoices())


@settings(max_examples=examples(100))
@given(histories())
def test_replaying_twice_is_identical(doc: dict[str, Any]) -> None:
    _, inv1, mov1 = replay(doc)
    _, inv2, mov2 = replay(doc)
    assert [i.model_dump() for i in inv1] == [i.model_dump() for i in inv2]
    assert [m.model_dump() for m in mov1] == [m.model_dump() for m in mov2]


@settings(max_examples=examples(300))
@given(
    anchor_day=st.integers(1, 28 * 4),
    interval=st.sampled_from(["day", "week", "month", "year"]),
    count=st.integers(1, 3),
    tz=st.sampled_from(["UTC", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe"]),
    billing_day=st.one_of(st.none(), st.integers(1, 31)),
)
def test_periods_tile_without_gap_or_overlap(anchor_day: int, interval: str, count: int, tz: str,
                                             billing_day: int | None) -> None:
    origin = datetime(2027, 12, 1, 5, tzinfo=UTC) + timedelta(days=anchor_day)
    if interval not in ("month", "year"):
        billing_day = None
    grid = Grid(tz=tz, interval=interval, count=count, anchor=local_wall(origin, tz), origin=origin,  # type: ignore[arg-type]
                billing_day=billing_day)
    period = grid.period_containing(origin)
    assert period.start == origin
    for _ in range(15):
        following = grid.period_containing(period.end)
        assert following.start == period.end and following.end > following.start
        period = following


@settings(max_examples=examples(200))
@given(old=st.integers(0, 50), new=st.integers(0, 50), day=st.integers(1, 30))
def test_proration_credit_and_charge_add_up_to_the_difference(old: int, new: int, day: int) -> None:
    doc = {"catalog": {"plans": PLANS, "addons": ADDONS}, "events": [
        {"at": "2026-04-01", "type": "customer", "customer": "c", "currency": "USD"},
        {"at": "2026-04-01", "type": "subscribe", "customer": "c", "subscription": "s", "plan": "seat",
         "quantity": old},
        {"at": "2026-04-01", "type": "invoice_run"},
        {"at": f"2026-04-{day:02d}T12:00:00Z", "type": "change_quantity", "subscription": "s", "quantity": new},
        {"at": "2026-05-01", "type": "invoice_run"}]}
    _, invoices, _ = replay(doc)
    prorations = [line.amount for line in invoices[-1].lines if line.kind == "proration"]
    exact = Fraction(new - old) * Fraction("49.99") * Fraction(31 - day, 30)
    # each line is rounded once: within half a cent per line of the exact difference
    assert abs(Fraction(sum(prorations, Decimal(0))) - exact) <= Fraction(len(prorations), 200)
