"""Archived invoices: a customer's issued invoices kept encoded until something reads them.

A customer part (billing.shards) keeps its past invoices as entries `(numbers, data)`
(`billing.book.Archived`); every run that issues invoices writes one more entry, and an entry is
decoded only when a command or a reader needs one of its invoices. So writing an entry is on the
hot path of every run and reading one is rare: an entry is the invoices' field values as plain
values, pickled with no class or function reference in it (a pickle of records names the record
classes, `datetime`, `timezone`, `timedelta` and `Decimal`, and looking those up is most of its
cost). Amounts are the `Decimal`'s string (exact: sign, digits and exponent come back as they
were), instants are integer microseconds since the Unix epoch in UTC, and each record carries the
bit mask of its fields left unset, so a decoded invoice equals the issued one field by field,
`model_fields_set` included.

The form is versioned (`FORMAT`, the first item of the pickled tuple) and its field lists are
written here, not derived from the models: a new field on `Invoice` or `InvoiceLine` needs a new
format version (tests/unit/test_archive.py checks the lists against the models). Entries written
before this form — a pickle of the tuple of `Invoice` records — still decode. An invoice holding
a value this form does not carry exactly (an instant not in `datetime.UTC`, an amount that is not
a `Decimal`) is archived in that older form instead, so encoding never loses anything.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

from billing.records import Invoice, InvoiceLine, Record, _field_names, _restore_record

FORMAT = "invoices/1"
"""The first item of an entry in this form (an older entry is a tuple of `Invoice` records)."""

INVOICE_FIELDS = ("number", "customer", "currency", "status", "issued_at", "billing_date", "lines", "subtotal",
                  "discount", "tax", "total", "credit_applied", "amount_due", "credit_added")
LINE_FIELDS = ("kind", "description", "subscription", "quantity", "unit_amount", "amount", "period_start",
               "period_end", "included")

_INVOICE_SET = frozenset(INVOICE_FIELDS)
_LINE_SET = frozenset(LINE_FIELDS)
_PROTOCOL = 5
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class _Inexact(Exception):
    """A value this form would not give back exactly."""


def encode_invoices(invoices: Iterable[Invoice]) -> bytes:
    """One archive entry's data for these invoices (in issue order)."""
    invoices = tuple(invoices)
    try:
        rows = tuple(map(_invoice_row, invoices))
    except _Inexact:
        return pickle.dumps(invoices, protocol=_PROTOCOL)
    return pickle.dumps((FORMAT, rows), protocol=_PROTOCOL)


def decode_invoices(data: bytes) -> tuple[Invoice, ...]:
    """The invoices of an archive entry, in either form."""
    value = pickle.loads(data)  # noqa: S301 - our own snapshot from our own database
    if value and type(value[0]) is str:
        if value[0] != FORMAT:
            raise ValueError(f"unknown archive format {value[0]!r}")
        return tuple(map(_invoice_of, value[1]))
    if not all(type(invoice) is Invoice for invoice in value):
        raise TypeError("not an archive entry")
    return tuple(value)


# -- encoding ----------------------------------------------------------------------------------


def _unset(record: Record, every: frozenset[str]) -> int:
    """The bit mask of the record's fields left unset (as `Record.__reduce__` keeps it); `every`
    is the set of all its fields."""
    fields_set = record.__pydantic_fields_set__
    if len(fields_set) == len(every):  # every field set (a record sets only its own fields)
        return 0
    return _mask(type(record), every - fields_set)


@cache
def _mask(cls: type[Record], unset: frozenset[str]) -> int:
    return sum(1 << bit for bit, name in enumerate(_field_names(cls)) if name in unset)


def _amount(value: Any) -> str:
    if type(value) is not Decimal:
        raise _Inexact
    return str(value)


def _instant(value: Any) -> int:
    if type(value) is not datetime or value.tzinfo is not UTC or value.fold:
        raise _Inexact
    return (value - _EPOCH) // _MICROSECOND


# The rows are built inline, without a call per value (a line has nine, most of them optional):
# each value goes through the same check and conversion as `_amount` or `_instant`.


def _line_row(line: InvoiceLine) -> tuple[Any, ...]:
    if type(line) is not InvoiceLine:
        raise _Inexact
    v = line.__dict__
    quantity, unit_amount, amount, included = v["quantity"], v["unit_amount"], v["amount"], v["included"]
    start, end = v["period_start"], v["period_end"]
    if (type(amount) is not Decimal or (quantity is not None and type(quantity) is not Decimal)
            or (unit_amount is not None and type(unit_amount) is not Decimal)
            or (included is not None and type(included) is not Decimal)):
        raise _Inexact
    if start is not None:
        if type(start) is not datetime or start.tzinfo is not UTC or start.fold:
            raise _Inexact
        start = (start - _EPOCH) // _MICROSECOND
    if end is not None:
        if type(end) is not datetime or end.tzinfo is not UTC or end.fold:
            raise _Inexact
        end = (end - _EPOCH) // _MICROSECOND
    return (v["kind"], v["description"], v["subscription"], None if quantity is None else str(quantity),
            None if unit_amount is None else str(unit_amount), str(amount), start, end,
            None if included is None else str(included), _unset(line, _LINE_SET))


def _invoice_row(invoice: Invoice) -> tuple[Any, ...]:
    if type(invoice) is not Invoice or type(invoice.lines) is not tuple:
        raise _Inexact
    v = invoice.__dict__
    return (v["number"], v["customer"], v["currency"], v["status"], _instant(v["issued_at"]), v["billing_date"],
            tuple(map(_line_row, v["lines"])), _amount(v["subtotal"]), _amount(v["discount"]), _amount(v["tax"]),
            _amount(v["total"]), _amount(v["credit_applied"]), _amount(v["amount_due"]),
            _amount(v["credit_added"]), _unset(invoice, _INVOICE_SET))


# -- decoding ----------------------------------------------------------------------------------


def _optional_decimal(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _optional_datetime(micros: int | None) -> datetime | None:
    return None if micros is None else _EPOCH + micros * _MICROSECOND


def _line_of(row: tuple[Any, ...]) -> InvoiceLine:
    kind, description, subscription, quantity, unit_amount, amount, start, end, included, unset = row
    values = (kind, description, subscription, _optional_decimal(quantity), _optional_decimal(unit_amount),
              Decimal(amount), _optional_datetime(start), _optional_datetime(end), _optional_decimal(included))
    line = _restore_record(InvoiceLine, values, unset)
    assert isinstance(line, InvoiceLine)
    return line


def _invoice_of(row: tuple[Any, ...]) -> Invoice:
    (number, customer, currency, status, issued_at, billing_date, lines, subtotal, discount, tax, total,
     credit_applied, amount_due, credit_added, unset) = row
    values = (number, customer, currency, status, _EPOCH + issued_at * _MICROSECOND, billing_date,
              tuple(map(_line_of, lines)), Decimal(subtotal), Decimal(discount), Decimal(tax), Decimal(total),
              Decimal(credit_applied), Decimal(amount_due), Decimal(credit_added))
    invoice = _restore_record(Invoice, values, unset)
    assert isinstance(invoice, Invoice)
    return invoice
