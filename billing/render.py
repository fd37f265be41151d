"""Invoices for people: plain text and a self-contained HTML page.

An issued invoice is immutable; rendering only reads it. Amounts are formatted by babel in the
customer's locale ("$1,500.00", "1.500,00 €", "¥1,200", "KWD 1.250"); totals are shown exactly as
stored (already rounded to the currency's minor unit), and a line's unit amount is shown with every
digit it has, so a usage price of $0.0015 is never displayed as $0.00.

Dates are the customer's local calendar dates (`tz`, UTC by default). Periods are shown as the
engine keeps them, half-open: "Feb 1, 2026 – Mar 1, 2026" is the month of February.

The HTML page needs nothing from outside (inline CSS, no scripts, no fonts, no images) and every
string that came from a customer or an operator (number, customer, descriptions, codes) goes
through `html.escape`.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from decimal import Decimal

from babel import Locale
from babel.dates import format_date
from babel.numbers import format_currency, format_decimal

from billing.periods import local_date
from billing.records import Invoice, InvoiceLine

KIND_LABELS: dict[str, str] = {
    "plan": "Plan",
    "addon": "Add-on",
    "usage": "Usage",
    "proration": "Proration",
    "discount": "Discount",
}

STATUS_LABELS: dict[str, str] = {"finalized": "Open", "paid": "Paid", "void": "Void"}

# CLDR "currencySpacing": a currency symbol made of letters ("KWD", "CHF") is set apart from the
# digits by a no-break space. babel does not apply the rule, so "KWD1.250" would come out.
_LETTER_THEN_DIGIT = re.compile(r"([^\W\d_])(\d)")
_DIGIT_THEN_LETTER = re.compile(r"(\d)([^\W\d_])")


def money(amount: Decimal, currency: str, locale: str, *, exact: bool = False) -> str:
    """An amount as the customer reads it. `exact` keeps digits beyond the minor unit (unit
    prices); otherwise the amount is shown at the currency's precision (it is already rounded)."""
    text = str(format_currency(amount, currency, locale=locale, decimal_quantization=not exact))
    text = _LETTER_THEN_DIGIT.sub("\\1\u00a0\\2", text)
    return _DIGIT_THEN_LETTER.sub("\\1\u00a0\\2", text)


def _negated(amount: Decimal, currency: str, locale: str) -> str:
    """A reduction shown as negative ("-$150.00"), and a plain zero when there is none."""
    return money(-amount if amount else amount, currency, locale)


def _quantity(value: Decimal | None, locale: str) -> str:
    if value is None:
        return ""
    return str(format_decimal(value, locale=locale, decimal_quantization=False))


def _date(instant: datetime, locale: str, tz: str) -> str:
    return str(format_date(local_date(instant, tz), format="medium", locale=locale))


def _period(line: InvoiceLine, locale: str, tz: str) -> str:
    if line.period_start is None or line.period_end is None:
        return ""
    return f"{_date(line.period_start, locale, tz)} – {_date(line.period_end, locale, tz)}"


def _line_cells(line: InvoiceLine, currency: str, locale: str, tz: str) -> tuple[str, ...]:
    unit = "" if line.unit_amount is None else money(line.unit_amount, currency, locale, exact=True)
    return (
        KIND_LABELS.get(line.kind, line.kind),
        line.description,
        _period(line, locale, tz),
        _quantity(line.quantity, locale),
        unit,
        money(line.amount, currency, locale),
    )


def _summary(invoice: Invoice, locale: str) -> list[tuple[str, str]]:
    cur = invoice.currency
    rows = [
        ("Subtotal", money(invoice.subtotal, cur, locale)),
        ("Discount", _negated(invoice.discount, cur, locale)),
        ("Tax", money(invoice.tax, cur, locale)),
        ("Total", money(invoice.total, cur, locale)),
        ("Credit applied", _negated(invoice.credit_applied, cur, locale)),
        ("Amount due", money(invoice.amount_due, cur, locale)),
    ]
    if invoice.credit_added:
        rows.append(("Added to your credit balance", money(invoice.credit_added, cur, locale)))
    return rows


def _header(invoice: Invoice, locale: str, tz: str) -> list[tuple[str, str]]:
    return [
        ("Customer", invoice.customer),
        ("Issued", _date(invoice.issued_at, locale, tz)),
        ("Status", STATUS_LABELS.get(invoice.status, invoice.status)),
        ("Currency", invoice.currency),
    ]


_COLUMNS = ("Kind", "Description", "Period", "Qty", "Unit amount", "Amount")
_RIGHT = (False, False, False, True, True, True)


def invoice_text(invoice: Invoice, locale: str = "en_US", *, tz: str = "UTC") -> str:
    """The invoice as fixed-width plain text (for a terminal or an e-mail body)."""
    out = [f"INVOICE {invoice.number}" + ("  [VOID]" if invoice.status == "void" else "")]
    out += [f"{label + ':':<10} {value}" for label, value in _header(invoice, locale, tz)]
    out.append("")

    rows = [_COLUMNS] + [_line_cells(line, invoice.currency, locale, tz) for line in invoice.lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, _RIGHT, strict=True)
        ]
        return "  ".join(cells).rstrip()

    table_width = sum(widths) + 2 * (len(widths) - 1)
    out.append(fmt(rows[0]))
    out.append("-" * table_width)
    out += [fmt(row) for row in rows[1:]]
    if not invoice.lines:
        out.append("(no lines)")
    out.append("-" * table_width)

    summary = _summary(invoice, locale)
    label_width = max(len(label) for label, _ in summary)
    value_width = max(len(value) for _, value in summary)
    for label, value in summary:
        text = f"{label:<{label_width}}  {value:>{value_width}}"
        out.append(text.rjust(max(table_width, len(text))))
    return "\n".join(out) + "\n"


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d2330;
       margin: 2rem auto; max-width: 60rem; padding: 0 1rem; }
h1 { font-size: 1.5rem; margin-bottom: 0.25rem; }
.void { color: #b42318; border: 2px solid #b42318; padding: 0 0.4rem; font-size: 1rem;
        vertical-align: middle; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dl.meta dt { color: #5b6475; }
dl.meta dd { margin: 0; }
table { border-collapse: collapse; width: 100%; margin-top: 1.5rem; }
th, td { padding: 0.45rem 0.6rem; border-bottom: 1px solid #e3e6ec; text-align: left;
         vertical-align: top; }
th { background: #f5f6f8; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.period { white-space: nowrap; color: #5b6475; }
tfoot td { border-bottom: none; }
tfoot tr.total td, tfoot tr.due td { font-weight: 700; }
tfoot tr.due td { border-top: 2px solid #1d2330; }
""".strip()


def invoice_html(invoice: Invoice, locale: str = "en_US", *, tz: str = "UTC") -> str:
    """The invoice as a self-contained HTML page (inline CSS, no external resources)."""
    e = html.escape
    lang = e(Locale.parse(locale).language)
    title = f"Invoice {e(invoice.number)}"
    badge = ' <span class="void">VOID</span>' if invoice.status == "void" else ""
    meta = "\n".join(
        f"    <dt>{e(label)}</dt><dd>{e(value)}</dd>" for label, value in _header(invoice, locale, tz)
    )
    head = "".join(
        f'<th class="num">{e(c)}</th>' if right else f"<th>{e(c)}</th>"
        for c, right in zip(_COLUMNS, _RIGHT, strict=True)
    )
    body_rows = []
    for line in invoice.lines:
        kind, description, period, qty, unit, amount = _line_cells(line, invoice.currency, locale, tz)
        body_rows.append(
            f'      <tr class="{e(line.kind)}"><td>{e(kind)}</td><td>{e(description)}</td>'
            f'<td class="period">{e(period)}</td><td class="num">{e(qty)}</td>'
            f'<td class="num">{e(unit)}</td><td class="num">{e(amount)}</td></tr>'
        )
    if not body_rows:
        body_rows.append('      <tr><td colspan="6">No lines</td></tr>')
    css_class = {"Total": "total", "Amount due": "due"}
    foot_rows = [
        f'      <tr class="{css_class.get(label, "")}"><td colspan="5" class="num">{e(label)}</td>'
        f'<td class="num">{e(value)}</td></tr>'
        for label, value in _summary(invoice, locale)
    ]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            f'<html lang="{lang}">',
            "<head>",
            '  <meta charset="utf-8">',
            '  <meta name="viewport" content="width=device-width, initial-scale=1">',
            f"  <title>{title}</title>",
            f"  <style>\n{_CSS}\n  </style>",
            "</head>",
            "<body>",
            f"  <h1>{title}{badge}</h1>",
            '  <dl class="meta">',
            meta,
            "  </dl>",
            "  <table>",
            f"    <thead><tr>{head}</tr></thead>",
            "    <tbody>",
            *body_rows,
            "    </tbody>",
            "    <tfoot>",
            *foot_rows,
            "    </tfoot>",
            "  </table>",
            "</body>",
            "</html>",
            "",
        ]
    )
