"""Archived invoices (billing.archive): the plain form gives back every invoice exactly — values,
their types, the fields left unset — and entries pickled as records (before the form) still
decode."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from billing.archive import FORMAT, INVOICE_FIELDS, LINE_FIELDS, decode_invoices, encode_invoices
from billing.records import Invoice, InvoiceLine, Record
from billing.replay import replay_in_memory
from billing.scenario import parse_scenario_text

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))


def same_record(before: Record, after: Record) -> None:
    """Equal field by field, with the same value types and the same fields set (lines too)."""
    assert type(after) is type(before)
    assert list(after.__dict__) == list(before.__dict__)
    for name, value in before.__dict__.items():
        got = after.__dict__[name]
        assert type(got) is type(value) and got == value, name
        if isinstance(value, datetime):
            assert got.tzinfo is value.tzinfo and got.fold == value.fold, name
        if isinstance(value, Decimal):
            assert got.as_tuple() == value.as_tuple(), name
    assert after.model_fields_set == before.model_fields_set
    if isinstance(before, Invoice):
        assert isinstance(after, Invoice)
        for line_before, line_after in zip(before.lines, after.lines, strict=True):
            same_record(line_before, line_after)


def form_of(data: bytes) -> str:
    value = pickle.loads(data)  # noqa: S301 - made by this test
    return "plain" if value[0] == FORMAT else "records"


def line(**changes: object) -> InvoiceLine:
    fields: dict[str, object] = dict(kind="plan", description="Pro", subscription="s1", quantity=Decimal("3"),
                                     unit_amount=Decimal("10.00"), amount=Decimal("30.00"),
                                     period_start=datetime(2026, 1, 1, tzinfo=UTC),
                                     period_end=datetime(2026, 2, 1, tzinfo=UTC))
    fields.update(changes)
    return InvoiceLine.model_validate(fields)


def invoice(*lines: InvoiceLine, **changes: object) -> Invoice:
    fields: dict[str, object] = dict(number="INV-0001", customer="c", currency="USD", status="finalized",
                                     issued_at=datetime(2026, 1, 1, tzinfo=UTC), billing_date="2026-01-01",
                                     lines=lines or (line(),), subtotal=Decimal("30.00"), discount=Decimal("0.00"),
                                     tax=Decimal("6.00"), total=Decimal("36.00"), credit_applied=Decimal("0.00"),
                                     amount_due=Decimal("36.00"))
    fields.update(changes)
    return Invoice.model_validate(fields)


def test_the_form_lists_every_field_of_the_models_in_order() -> None:
    """A new field on a model needs a new FORMAT version: this fails until the lists are updated."""
    assert INVOICE_FIELDS == tuple(Invoice.model_fields)
    assert LINE_FIELDS == tuple(InvoiceLine.model_fields)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_every_fixture_invoice_round_trips_in_the_plain_form(path: Path) -> None:
    invoices = replay_in_memory(parse_scenario_text(path.read_text())).invoices
    if not invoices:
        pytest.skip("no invoices")
    data = encode_invoices(invoices)
    assert form_of(data) == "plain"
    decoded = decode_invoices(data)
    assert len(decoded) == len(invoices)
    for before, after in zip(invoices, decoded, strict=True):
        same_record(before, after)


def test_fields_left_unset_stay_unset() -> None:
    bare = invoice(line(kind="discount", quantity=None, unit_amount=None, period_start=None, period_end=None))
    full = invoice(line(included=Decimal("1000")), credit_added=Decimal("-0.00"))
    assert "credit_added" not in bare.model_fields_set and "included" not in bare.lines[0].model_fields_set
    for before, after in zip((bare, full), decode_invoices(encode_invoices([bare, full])), strict=True):
        same_record(before, after)


@pytest.mark.parametrize("amount", ["0", "-0", "0.00", "1E+3", "2.8E+3", "12345678901234567890123.45", "-0.005"])
def test_amounts_keep_their_digits_and_exponent(amount: str) -> None:
    before = invoice(line(amount=Decimal(amount)), total=Decimal(amount))
    (after,) = decode_invoices(encode_invoices([before]))
    same_record(before, after)


@pytest.mark.parametrize("instant", [datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                                     datetime(2026, 3, 8, 7, 0, 0, 1, tzinfo=UTC),
                                     datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)])
def test_instants_keep_their_microseconds(instant: datetime) -> None:
    before = invoice(line(period_start=instant, period_end=instant + timedelta(0)), issued_at=instant)
    (after,) = decode_invoices(encode_invoices([before]))
    same_record(before, after)


@pytest.mark.parametrize("odd", ["zoneinfo", "fold", "int amount"])
def test_an_invoice_the_plain_form_would_change_is_archived_as_records(odd: str) -> None:
    if odd == "zoneinfo":
        before = invoice(issued_at=datetime(2026, 1, 1, tzinfo=ZoneInfo("America/New_York")))
    elif odd == "fold":
        before = invoice(line(period_end=datetime(2026, 2, 1, fold=1, tzinfo=UTC)))
    else:
        before = invoice().model_copy(update={"discount": 0})  # model_copy does not validate
    data = encode_invoices([invoice(number="INV-0000"), before])
    assert form_of(data) == "records"
    for expected, after in zip((invoice(number="INV-0000"), before), decode_invoices(data), strict=True):
        same_record(expected, after)


@pytest.mark.parametrize("field", ["quantity", "unit_amount", "amount", "included", "period_start", "period_end"])
@pytest.mark.parametrize("odd", ["zoneinfo", "fold", "int", "float"])
def test_any_line_value_the_plain_form_would_change_archives_the_entry_as_records(field: str, odd: str) -> None:
    """Each line value is checked where its row is built (inline, one check per field)."""
    instant = field.startswith("period")
    if instant and odd in ("int", "float") or not instant and odd in ("zoneinfo", "fold"):
        pytest.skip("not a value of this field")
    value: object = {"zoneinfo": datetime(2026, 1, 1, tzinfo=ZoneInfo("America/New_York")),
                     "fold": datetime(2026, 2, 1, fold=1, tzinfo=UTC), "int": 3, "float": 2.5}[odd]
    before = invoice(line().model_copy(update={field: value}))  # model_copy does not validate
    data = encode_invoices([invoice(number="INV-0000"), before])
    assert form_of(data) == "records"
    same_record(before, decode_invoices(data)[1])


def test_an_entry_pickled_as_records_still_decodes() -> None:
    """The form entries had before billing.archive: a pickle of the tuple of invoices."""
    invoices = replay_in_memory(parse_scenario_text(FIXTURES[0].read_text())).invoices
    data = pickle.dumps(tuple(invoices), protocol=pickle.HIGHEST_PROTOCOL)
    for before, after in zip(invoices, decode_invoices(data), strict=True):
        same_record(before, after)


def test_an_unknown_form_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown archive format"):
        decode_invoices(pickle.dumps(("invoices/99", ())))
    with pytest.raises(TypeError):
        decode_invoices(pickle.dumps((1, 2)))
