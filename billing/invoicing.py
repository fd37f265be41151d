"""Invoice amounts (SCENARIOS.md, "Invoices" → Amounts).

- subtotal = plan, add-on, usage and proration lines; discount = the discount lines as a positive
  amount; tax = (subtotal − discount) × the customer's rate, rounded once (exclusive tax);
  total = subtotal − discount + tax.
- credit_applied = min(credit balance, total) when total > 0, else 0; amount_due = total −
  credit_applied. A negative total is never paid out: it is added to the customer's credit.
- An invoice with nothing due is `paid` on issue; otherwise `finalized` until paid or voided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

from billing.money import RoundingMode, exact_product, round_money
from billing.records import InvoiceLine, InvoiceStatus


@dataclass(frozen=True)
class InvoiceTotals:
    subtotal: Decimal
    discount: Decimal
    tax: Decimal
    total: Decimal
    credit_applied: Decimal
    amount_due: Decimal
    credit_added: Decimal

    @property
    def status(self) -> InvoiceStatus:
        return "paid" if self.amount_due == 0 else "finalized"

    @property
    def credit_change(self) -> Decimal:
        """What the invoice does to the customer's credit balance."""
        return self.credit_added - self.credit_applied


def totals(lines: Sequence[InvoiceLine], tax_rate: Decimal, credit_balance: Decimal, currency: str,
           mode: RoundingMode) -> InvoiceTotals:
    """Amounts of an invoice from its (already rounded) lines and the customer's credit."""
    subtotal, discounted = Decimal(0), Decimal(0)
    for line in lines:  # one pass; each sum adds its lines in order, as sum() would
        if line.kind == "discount":
            discounted += line.amount
        else:
            subtotal += line.amount
    discount = -discounted
    tax = round_money(exact_product(subtotal - discount, tax_rate), currency, mode)
    total = subtotal - discount + tax
    credit_applied = min(credit_balance, total) if total > 0 else Decimal(0)
    amount_due = total - credit_applied if total > 0 else Decimal(0)
    credit_added = -total if total < 0 else Decimal(0)

    def q(value: Decimal) -> Decimal:
        return round_money(value, currency, mode)

    return InvoiceTotals(q(subtotal), q(discount), tax, q(total), q(credit_applied), q(amount_due),
                         q(credit_added))
