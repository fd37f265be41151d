"""Archived invoices (billing.archive) decode to exactly what was encoded, whatever the amounts'
digits and exponents, the instants' microseconds and timezones, and the fields left unset."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples

from billing.archive import FORMAT, decode_invoices, encode_invoices
from billing.records import Invoice, InvoiceLine, Record

AMOUNTS = st.decimals(allow_nan=False, allow_infinity=False)
ANY_UTC = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
UTC_INSTANTS = ANY_UTC.map(lambda t: t.replace(fold=0))  # what the engine issues
INSTANTS = st.one_of(ANY_UTC, ANY_UTC.map(lambda t: t.astimezone(ZoneInfo("America/New_York"))))
TEXT = st.text(max_size=12)


@st.composite
def lines(draw: st.DrawFn, instants: st.SearchStrategy[datetime]) -> InvoiceLine:
    fields: dict[str, Any] = dict(
        kind=draw(st.sampled_from(["plan", "addon", "usage", "proration", "discount"])), description=draw(TEXT),
        subscription=draw(st.none() | TEXT), quantity=draw(st.none() | AMOUNTS), unit_amount=draw(st.none() | AMOUNTS),
        amount=draw(AMOUNTS), period_start=draw(st.none() | instants), period_end=draw(st.none() | instants))
    if draw(st.booleans()):
        fields["included"] = draw(st.none() | AMOUNTS)
    return InvoiceLine(**fields)


@st.composite
def invoices(draw: st.DrawFn, instants: st.SearchStrategy[datetime]) -> Invoice:
    fields: dict[str, Any] = dict(
        number=draw(TEXT), customer=draw(TEXT), currency=draw(st.sampled_from(["USD", "JPY", "KWD"])),
        status=draw(st.sampled_from(["finalized", "paid", "void"])), issued_at=draw(instants),
        billing_date=draw(TEXT), lines=tuple(draw(st.lists(lines(instants), max_size=4))),
        **{name: draw(AMOUNTS) for name in ("subtotal", "discount", "tax", "total", "credit_applied", "amount_due")})
    if draw(st.booleans()):
        fields["credit_added"] = draw(AMOUNTS)
    return Invoice(**fields)


def exactly(record: Record) -> object:
    """Everything a decoded record must give back: each value with its type and exact digits or
    timezone, the fields set, and the same of its lines."""
    def value(v: object) -> object:
        if isinstance(v, Decimal):
            return (Decimal, v.as_tuple())
        if isinstance(v, datetime):
            return (datetime, v, v.tzinfo, v.fold)
        if isinstance(v, tuple):
            return tuple(exactly(item) if isinstance(item, Record) else value(item) for item in v)
        return (type(v), v)
    return (type(record), sorted(record.model_fields_set), [(k, value(v)) for k, v in record.__dict__.items()])


@settings(max_examples=examples(200))
@given(st.lists(invoices(UTC_INSTANTS), min_size=1, max_size=4))
def test_utc_invoices_round_trip_in_the_plain_form(issued: list[Invoice]) -> None:
    data = encode_invoices(issued)
    assert pickle.loads(data)[0] == FORMAT  # noqa: S301 - made by this test
    assert [exactly(i) for i in decode_invoices(data)] == [exactly(i) for i in issued]


@settings(max_examples=examples(200))
@given(st.lists(invoices(INSTANTS), min_size=1, max_size=4))
def test_any_invoices_round_trip(issued: list[Invoice]) -> None:
    assert [exactly(i) for i in decode_invoices(encode_invoices(issued))] == [exactly(i) for i in issued]
