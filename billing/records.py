"""What the engine produces: invoices with their lines, credit notes and MRR movements.

These are the records persistence stores, the CLI prints and `billing replay --json` emits
(SCENARIOS.md, "Output"). Amounts are exact `Decimal`s already rounded to the currency's minor
unit. MRR movements are a pydantic discriminated union on `type`
(`New | Expansion | Contraction | Churn | Reactivation`); consumers `match` on them. A credit note
is its own document (`CN-0001`, …) that references the invoice lines it corrects; the invoice
itself never changes.

Each movement carries its **legs**: the change of the customer's MRR per (subscription, plan,
product), in the customer's currency and in the reporting currency. Legs sum exactly to the
movement's `delta` and `reporting_delta` (the rounding residue goes to the largest leg), so an
upgrade A($100) -> B($150) has legs A -100 and B +150 and plan segments see MRR leave A and
enter B. A movement's `entry` is `movement`, or `reversal` for a correcting entry that negates
the movement it `reverses` (the ledger is insert-only). Neither legs nor entry kind are part of
the replay output (`movement_json`).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from billing.money import money_str
from billing.periods import iso

LineKind = Literal["plan", "addon", "usage", "proration", "discount"]
InvoiceStatus = Literal["finalized", "paid", "void"]
CreditNoteReason = Literal["duplicate", "product_unsatisfactory", "order_change", "other"]
CREDIT_NOTE_REASONS: tuple[str, ...] = ("duplicate", "product_unsatisfactory", "order_change", "other")
ExpansionSubtype = Literal["seat", "upgrade", "add_on", "usage", "cross_sell", "discount_end"]
ContractionSubtype = Literal["seat", "downgrade", "add_on", "usage", "cancel", "discount"]
EXPANSION_SUBTYPES: tuple[str, ...] = ("seat", "upgrade", "add_on", "usage", "cross_sell", "discount_end")
CONTRACTION_SUBTYPES: tuple[str, ...] = ("seat", "downgrade", "add_on", "usage", "cancel", "discount")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the field values in declaration order plus a bit mask of the fields left
        unset: the state pydantic pickles, without a dict and a set per record (customer parts
        hold many records). Pickles in pydantic's own form still load."""
        cls = type(self)
        names = _field_names(cls)
        fields_set = self.__pydantic_fields_set__
        unset = 0
        if len(fields_set) != len(names):
            for bit, name in enumerate(names):
                if name not in fields_set:
                    unset |= 1 << bit
        return (_restore_record, (cls, tuple(map(self.__dict__.__getitem__, names)), unset))


@cache
def _field_names(cls: type[Record]) -> tuple[str, ...]:
    return tuple(cls.model_fields)


@cache
def _fields_set(cls: type[Record], unset: int) -> frozenset[str]:
    return frozenset(name for bit, name in enumerate(_field_names(cls)) if not unset >> bit & 1)


def _restore_record(cls: type[Record], values: tuple[Any, ...], unset: int) -> Record:
    """A record from `Record.__reduce__`'s state, set as pydantic's own `__setstate__` sets it."""
    record = cls.__new__(cls)
    _set(record, "__dict__", dict(zip(_field_names(cls), values, strict=True)))
    _set(record, "__pydantic_fields_set__", set(_fields_set(cls, unset)))
    _set(record, "__pydantic_extra__", None)
    _set(record, "__pydantic_private__", None)
    return record


_set = object.__setattr__


class InvoiceLine(Record):
    kind: LineKind
    description: str
    subscription: str | None
    quantity: Decimal | None
    unit_amount: Decimal | None
    amount: Decimal
    period_start: datetime | None
    period_end: datetime | None
    included: Decimal | None = None  # usage lines: units included before billing


class Invoice(Record):
    number: str
    customer: str
    currency: str
    status: InvoiceStatus
    issued_at: datetime
    billing_date: str  # local date the invoice bills (YYYY-MM-DD)
    lines: tuple[InvoiceLine, ...]
    subtotal: Decimal
    discount: Decimal
    tax: Decimal
    total: Decimal
    credit_applied: Decimal
    amount_due: Decimal
    credit_added: Decimal = Decimal(0)  # a negative total moved to the customer's credit balance

    def with_status(self, status: InvoiceStatus) -> Invoice:
        return self.model_copy(update={"status": status})


class CreditNoteLine(Record):
    """What one credit note line credits: part or all of one invoice line (by its index)."""

    invoice_line: int
    kind: LineKind
    description: str
    amount: Decimal  # positive: the amount credited, before tax


class CreditNote(Record):
    """A correction of a finalized or paid invoice, numbered in its own series. Its total goes to
    the customer's credit balance; the invoice stays as issued."""

    number: str
    invoice: str
    customer: str
    currency: str
    issued_at: datetime
    reason: CreditNoteReason
    lines: tuple[CreditNoteLine, ...]
    subtotal: Decimal
    tax: Decimal
    total: Decimal


class LineRef(Record):
    invoice: str
    line: int


class Leg(Record):
    """One movement's change of MRR on one (subscription, plan, product)."""

    subscription: str | None
    plan: str | None
    product: str | None
    delta: Decimal  # customer currency
    reporting_delta: Decimal


EntryKind = Literal["movement", "reversal"]


class MovementBase(Record):
    id: int
    at: datetime
    customer: str
    subscription: str | None
    currency: str
    mrr_before: Decimal
    mrr_after: Decimal
    delta: Decimal
    reporting_currency: str
    reporting_delta: Decimal
    cause: str  # the command or transition that moved MRR, e.g. "change_quantity" or "trial_end"
    event_index: int | None  # the scenario event (or command) that caused it; None for a transition
    invoice_lines: tuple[LineRef, ...] = ()
    legs: tuple[Leg, ...] = ()
    entry: EntryKind = "movement"
    reverses: int | None = None  # the movement a reversal negates


class New(MovementBase):
    type: Literal["new"] = "new"
    subtype: None = None


class Expansion(MovementBase):
    type: Literal["expansion"] = "expansion"
    subtype: ExpansionSubtype


class Contraction(MovementBase):
    type: Literal["contraction"] = "contraction"
    subtype: ContractionSubtype


class Churn(MovementBase):
    type: Literal["churn"] = "churn"
    subtype: None = None


class Reactivation(MovementBase):
    type: Literal["reactivation"] = "reactivation"
    subtype: None = None


MrrMovement = Annotated[New | Expansion | Contraction | Churn | Reactivation, Field(discriminator="type")]


def reversing_entry(movement: MrrMovement, entry_id: int) -> MrrMovement:
    """The entry that corrects `movement`: same type, subtype, customer and instant, negated
    deltas and legs, MRR before and after swapped, no invoice lines; `reverses` the original."""
    return movement.model_copy(update={
        "id": entry_id,
        "mrr_before": movement.mrr_after,
        "mrr_after": movement.mrr_before,
        "delta": -movement.delta,
        "reporting_delta": -movement.reporting_delta,
        "cause": "reversal",
        "event_index": None,
        "invoice_lines": (),
        "legs": tuple(leg.model_copy(update={"delta": -leg.delta, "reporting_delta": -leg.reporting_delta})
                      for leg in movement.legs),
        "entry": "reversal",
        "reverses": movement.id,
    })


def _num(value: Decimal | None) -> int | str | None:
    if value is None:
        return None
    if value == value.to_integral_value():
        return int(value)
    return str(value.normalize())


def line_json(line: InvoiceLine, currency: str) -> dict[str, object]:
    return {
        "kind": line.kind,
        "description": line.description,
        "subscription": line.subscription,
        "quantity": _num(line.quantity),
        "unit_amount": None if line.unit_amount is None else str(line.unit_amount),
        "amount": money_str(line.amount, currency),
        "period_start": None if line.period_start is None else iso(line.period_start),
        "period_end": None if line.period_end is None else iso(line.period_end),
    }


def invoice_json(invoice: Invoice) -> dict[str, object]:
    """An invoice in the replay output form (SCENARIOS.md)."""
    cur = invoice.currency
    return {
        "number": invoice.number,
        "customer": invoice.customer,
        "currency": cur,
        "status": invoice.status,
        "issued_at": iso(invoice.issued_at),
        "lines": [line_json(line, cur) for line in invoice.lines],
        "subtotal": money_str(invoice.subtotal, cur),
        "discount": money_str(invoice.discount, cur),
        "tax": money_str(invoice.tax, cur),
        "total": money_str(invoice.total, cur),
        "credit_applied": money_str(invoice.credit_applied, cur),
        "amount_due": money_str(invoice.amount_due, cur),
    }


def credit_note_json(note: CreditNote) -> dict[str, object]:
    """A credit note in the replay output form (`credit_notes`, beside `invoices`)."""
    cur = note.currency
    return {
        "number": note.number,
        "invoice": note.invoice,
        "customer": note.customer,
        "currency": cur,
        "issued_at": iso(note.issued_at),
        "reason": note.reason,
        "lines": [
            {
                "invoice_line": line.invoice_line,
                "kind": line.kind,
                "description": line.description,
                "amount": money_str(line.amount, cur),
            }
            for line in note.lines
        ],
        "subtotal": money_str(note.subtotal, cur),
        "tax": money_str(note.tax, cur),
        "total": money_str(note.total, cur),
    }


def movement_json(movement: New | Expansion | Contraction | Churn | Reactivation) -> dict[str, object]:
    """A movement in the replay output form (SCENARIOS.md)."""
    cur = movement.currency
    return {
        "id": movement.id,
        "at": iso(movement.at),
        "customer": movement.customer,
        "subscription": movement.subscription,
        "type": movement.type,
        "subtype": movement.subtype,
        "currency": cur,
        "mrr_before": money_str(movement.mrr_before, cur),
        "mrr_after": money_str(movement.mrr_after, cur),
        "delta": money_str(movement.delta, cur),
        "reporting_delta": money_str(movement.reporting_delta, movement.reporting_currency),
        "invoice_lines": [{"invoice": ref.invoice, "line": ref.line} for ref in movement.invoice_lines],
    }
