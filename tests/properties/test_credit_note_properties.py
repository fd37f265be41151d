"""Property-based invariants of credit notes (hypothesis): whatever is asked, accepted notes never
credit a line beyond its amount nor an invoice beyond what it charged, each note's tax is its
subtotal at the rate rounded once, and a refused note is refused whole."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from billing.credit_notes import CreditNoteError, credited_lines, draft_credit_note
from billing.money import round_money
from billing.records import CreditNote, Invoice, InvoiceLine
from billing.scenario import CreditNoteLineRequest

AT = datetime(2026, 2, 1, tzinfo=UTC)
KINDS = ["plan", "plan", "addon", "usage", "proration", "discount"]


@st.composite
def invoices(draw: st.DrawFn) -> Invoice:
    currency = draw(st.sampled_from(["USD", "JPY", "KWD"]))
    places = {"USD": 2, "JPY": 0, "KWD": 3}[currency]
    lines = []
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(KINDS))
        minor = draw(st.integers(-20_000, 200_000))
        if kind == "discount":
            minor = -abs(minor)
        lines.append(InvoiceLine(kind=kind, description=kind, subscription="s", quantity=None, unit_amount=None,
                                 amount=Decimal(minor).scaleb(-places), period_start=None, period_end=None))
    subtotal = sum((ln.amount for ln in lines if ln.kind != "discount"), Decimal(0))
    discount = -sum((ln.amount for ln in lines if ln.kind == "discount"), Decimal(0))
    return Invoice(number="INV-0001", customer="c", currency=currency, status="paid", issued_at=AT,
                   billing_date="2026-02-01", lines=tuple(lines), subtotal=subtotal, discount=discount,
                   tax=Decimal(0), total=subtotal - discount, credit_applied=Decimal(0),
                   amount_due=subtotal - discount)


@st.composite
def attempts(draw: st.DrawFn, invoice: Invoice) -> list[list[tuple[int, int | None]]]:
    """Credit notes to try: line indices (sometimes one past the end) with an amount in minor
    units (None: all that is left of the line)."""
    line = st.tuples(st.integers(0, len(invoice.lines)), st.none() | st.integers(1, 60_000))
    return draw(st.lists(st.lists(line, min_size=1, max_size=2), max_size=8))


@given(st.data(), invoices(), st.sampled_from(["0", "0.20", "0.075"]))
def test_accepted_notes_stay_within_what_was_billed(data: st.DataObject, invoice: Invoice, rate: str) -> None:
    places = {"USD": 2, "JPY": 0, "KWD": 3}[invoice.currency]
    notes: list[CreditNote] = []
    for attempt in data.draw(attempts(invoice)):
        requests = [CreditNoteLineRequest.model_validate(
            {"line": i} | ({} if m is None else {"amount": str(Decimal(m).scaleb(-places))})) for i, m in attempt]
        try:
            note = draft_credit_note(invoice, requests, earlier=notes, number=f"CN-{len(notes) + 1:04d}", at=AT,
                                     reason="other", tax_rate=Decimal(rate), mode="half_up")
        except CreditNoteError:
            continue
        assert note.tax == round_money(Fraction(note.subtotal) * Fraction(Decimal(rate)), invoice.currency)
        assert note.total == note.subtotal + note.tax and note.subtotal > 0
        assert all(ln.amount > 0 and invoice.lines[ln.invoice_line].kind != "discount" for ln in note.lines)
        notes.append(note)
    for index, credited in credited_lines(invoice.number, notes).items():
        assert credited <= invoice.lines[index].amount
    assert sum((n.subtotal for n in notes), Decimal(0)) <= max(invoice.subtotal - invoice.discount, Decimal(0))
