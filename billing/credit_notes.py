"""Credit notes: corrections of issued invoices as documents of their own (Stripe's CreditNote,
Kill Bill's credit items).

An issued invoice never changes. To give back part of what it billed, a credit note references
the invoice lines it corrects, each with the amount credited before tax. The rules:

- Only a `finalized` or `paid` invoice can be credited (a void one bills nothing any more), and
  only its plan, add-on, usage and proration lines with a positive amount: discount lines and
  credit (negative) lines are not creditable.
- Over all of an invoice's credit notes a line is credited at most its own amount; an omitted
  amount takes all that is left of it. Amounts are given to the currency's minor unit.
- All of an invoice's credit notes together credit at most what the invoice charged before tax
  (subtotal − discount), as Stripe caps credit notes at the invoice total: crediting every line
  of a discounted invoice in full would otherwise give back more than was billed.
- tax = credited subtotal × the invoice's tax rate (the customer's, which the invoice was taxed
  at), rounded once with `billing.money.round_money`; total = subtotal + tax.

What the total does (it goes to the customer's credit balance, applied by later invoices) and the
`CN-0001` numbering are the book's business; this module only computes and checks one note.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from fractions import Fraction

from billing.money import RoundingMode, minor_units, money_str, round_money
from billing.records import CreditNote, CreditNoteLine, CreditNoteReason, Invoice, LineKind
from billing.scenario import CreditNoteLineRequest

CREDITABLE_KINDS: tuple[LineKind, ...] = ("plan", "addon", "usage", "proration")


class CreditNoteError(ValueError):
    """A credit note that cannot be issued; the message names the field (`lines[1].amount: …`)."""


def credited_lines(invoice: str, notes: Iterable[CreditNote]) -> dict[int, Decimal]:
    """How much the credit notes in `notes` credited on each line of `invoice`, by line index."""
    out: dict[int, Decimal] = {}
    for note in notes:
        if note.invoice == invoice:
            for line in note.lines:
                out[line.invoice_line] = out.get(line.invoice_line, Decimal(0)) + line.amount
    return out


def creditable_left(invoice: Invoice, notes: Iterable[CreditNote]) -> Decimal:
    """What is left to credit on the whole invoice before tax: what it charged (subtotal −
    discount) minus the subtotals of its credit notes in `notes`; never below zero."""
    charged = invoice.subtotal - invoice.discount
    already = sum((n.subtotal for n in notes if n.invoice == invoice.number), Decimal(0))
    return max(charged - already, Decimal(0))


def draft_credit_note(
    invoice: Invoice,
    requests: Sequence[CreditNoteLineRequest],
    *,
    earlier: Iterable[CreditNote],
    number: str,
    at: datetime,
    reason: CreditNoteReason,
    tax_rate: Decimal,
    mode: RoundingMode,
) -> CreditNote:
    """The credit note `number` crediting `requests` on `invoice`, given the `earlier` credit
    notes (of any invoice); raises CreditNoteError naming the field when the rules refuse it."""
    cur = invoice.currency
    if invoice.status == "void":
        raise CreditNoteError(f"invoice: {invoice.number} is void; only a finalized or paid invoice "
                              "can be credited")
    previous = [n for n in earlier if n.invoice == invoice.number]
    credited = credited_lines(invoice.number, previous)
    if not requests:
        raise CreditNoteError("lines: a credit note needs at least one line")
    seen: dict[int, int] = {}
    lines: list[CreditNoteLine] = []
    for i, request in enumerate(requests):
        where = f"lines[{i}]"
        index = request.line
        if index in seen:
            raise CreditNoteError(f"{where}.line: {invoice.number} line {index} is already credited by "
                                  f"lines[{seen[index]}] of this credit note")
        seen[index] = i
        if not 0 <= index < len(invoice.lines):
            raise CreditNoteError(f"{where}.line: {invoice.number} has no line {index} (its lines are "
                                  f"0 to {len(invoice.lines) - 1})")
        line = invoice.lines[index]
        if line.kind not in CREDITABLE_KINDS:
            raise CreditNoteError(f"{where}.line: {invoice.number} line {index} is a {line.kind} line; "
                                  "only plan, addon, usage and proration lines can be credited")
        if line.amount <= 0:
            raise CreditNoteError(f"{where}.line: {invoice.number} line {index} is "
                                  f"{money_str(line.amount, cur)}; only a line with a positive amount "
                                  "can be credited")
        left = line.amount - credited.get(index, Decimal(0))
        amount = request.amount
        if amount is None:
            if left <= 0:
                raise CreditNoteError(f"{where}.line: {invoice.number} line {index} is already "
                                      "fully credited")
            amount = left
        else:
            if round_money(amount, cur, mode) != amount:
                raise CreditNoteError(f"{where}.amount: {amount} has more decimals than {cur} allows "
                                      f"({minor_units(cur)})")
            if amount > left:
                raise CreditNoteError(f"{where}.amount: {money_str(amount, cur)} exceeds the "
                                      f"{money_str(left, cur)} left to credit on {invoice.number} line "
                                      f"{index}")
        lines.append(CreditNoteLine(invoice_line=index, kind=line.kind, description=line.description,
                                    amount=round_money(amount, cur, mode)))
    subtotal = sum((line.amount for line in lines), Decimal(0))
    left_on_invoice = creditable_left(invoice, previous)
    if subtotal > left_on_invoice:
        raise CreditNoteError(f"lines: {money_str(subtotal, cur)} in all exceeds the "
                              f"{money_str(left_on_invoice, cur)} left to credit on {invoice.number} "
                              f"(it charged {money_str(invoice.subtotal - invoice.discount, cur)} "
                              "before tax)")
    tax = round_money(Fraction(subtotal) * Fraction(tax_rate), cur, mode)
    return CreditNote(
        number=number,
        invoice=invoice.number,
        customer=invoice.customer,
        currency=cur,
        issued_at=at,
        reason=reason,
        lines=tuple(lines),
        subtotal=round_money(subtotal, cur, mode),
        tax=tax,
        total=round_money(subtotal + tax, cur, mode),
    )
