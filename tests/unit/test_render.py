"""billing.render: invoices as text and HTML, amounts formatted by babel in the customer's locale."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.records import Invoice, InvoiceLine
from billing.render import invoice_html, invoice_text, money

NBSP = "\u00a0"


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def line(
    amount: str,
    *,
    kind: str = "plan",
    description: str = "Team plan",
    quantity: str | None = "1",
    unit: str | None = None,
    start: str | None = "2026-02-01",
    end: str | None = "2026-03-01",
) -> InvoiceLine:
    return InvoiceLine.model_validate(
        {
            "kind": kind,
            "description": description,
            "subscription": "sub-1",
            "quantity": None if quantity is None else Decimal(quantity),
            "unit_amount": None if unit is None else Decimal(unit),
            "amount": Decimal(amount),
            "period_start": None if start is None else utc(start),
            "period_end": None if end is None else utc(end),
        }
    )


def invoice(
    currency: str,
    lines: list[InvoiceLine],
    *,
    subtotal: str,
    discount: str = "0",
    tax: str = "0",
    total: str,
    credit_applied: str = "0",
    amount_due: str,
    status: str = "finalized",
    customer: str = "acme",
    number: str = "INV-000001",
) -> Invoice:
    return Invoice.model_validate(
        {
            "number": number,
            "customer": customer,
            "currency": currency,
            "status": status,
            "issued_at": utc("2026-02-01"),
            "billing_date": "2026-02-01",
            "lines": tuple(lines),
            "subtotal": Decimal(subtotal),
            "discount": Decimal(discount),
            "tax": Decimal(tax),
            "total": Decimal(total),
            "credit_applied": Decimal(credit_applied),
            "amount_due": Decimal(amount_due),
        }
    )


# The seed example: 25 seats at $50 plus the $250 analytics add-on.
USD_INVOICE = invoice(
    "USD",
    [
        line("1250.00", description="Team (25 seats)", quantity="25", unit="50.00"),
        line("250.00", kind="addon", description="Analytics add-on", unit="250.00"),
        line("-150.00", kind="discount", description="10% off", quantity=None, start=None, end=None),
    ],
    subtotal="1500.00",
    discount="150.00",
    tax="270.00",
    total="1620.00",
    credit_applied="20.00",
    amount_due="1600.00",
)

EUR_INVOICE = invoice(
    "EUR",
    [line("1500.00", description="Team (30 seats)", quantity="30", unit="50.00")],
    subtotal="1500.00",
    tax="285.00",
    total="1785.00",
    amount_due="1785.00",
    status="paid",
)

JPY_INVOICE = invoice(
    "JPY",
    [line("1200", description="Starter", unit="1200")],
    subtotal="1200",
    tax="120",
    total="1320",
    amount_due="1320",
)

KWD_INVOICE = invoice(
    "KWD",
    [line("1.250", description="Starter", unit="1.250")],
    subtotal="1.250",
    total="1.250",
    amount_due="1.250",
)


@pytest.mark.parametrize(
    ("amount", "currency", "locale", "text"),
    [
        ("1500.00", "USD", "en_US", "$1,500.00"),
        ("-150.00", "USD", "en_US", "-$150.00"),
        ("1500.00", "EUR", "de_DE", f"1.500,00{NBSP}€"),
        ("-150.00", "EUR", "de_DE", f"-150,00{NBSP}€"),
        ("1500.00", "EUR", "en_US", "€1,500.00"),
        ("1200", "JPY", "en_US", "¥1,200"),
        ("1.250", "KWD", "en_US", f"KWD{NBSP}1.250"),
        ("-1.250", "KWD", "en_US", f"-KWD{NBSP}1.250"),
        ("1250.50", "GBP", "en_GB", "£1,250.50"),
        ("1500.00", "CHF", "en_US", f"CHF{NBSP}1,500.00"),
    ],
)
def test_money_formats_in_the_locale(amount: str, currency: str, locale: str, text: str) -> None:
    assert money(Decimal(amount), currency, locale) == text


def test_unit_amounts_keep_every_digit() -> None:
    assert money(Decimal("0.0015"), "USD", "en_US", exact=True) == "$0.0015"
    assert money(Decimal("50"), "USD", "en_US", exact=True) == "$50.00"


def _summary(text: str) -> dict[str, str]:
    """The label → value pairs at the foot of a text invoice."""
    out = {}
    for row in text.splitlines():
        m = re.fullmatch(r"\s*(Subtotal|Discount|Tax|Total|Credit applied|Amount due)\s+(\S.*)", row)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize(
    ("inv", "locale", "expected"),
    [
        (
            USD_INVOICE,
            "en_US",
            {
                "Subtotal": "$1,500.00",
                "Discount": "-$150.00",
                "Tax": "$270.00",
                "Total": "$1,620.00",
                "Credit applied": "-$20.00",
                "Amount due": "$1,600.00",
            },
        ),
        (
            EUR_INVOICE,
            "de_DE",
            {
                "Subtotal": f"1.500,00{NBSP}€",
                "Discount": f"0,00{NBSP}€",
                "Tax": f"285,00{NBSP}€",
                "Total": f"1.785,00{NBSP}€",
                "Credit applied": f"0,00{NBSP}€",
                "Amount due": f"1.785,00{NBSP}€",
            },
        ),
        (
            JPY_INVOICE,
            "en_US",
            {
                "Subtotal": "¥1,200",
                "Discount": "¥0",
                "Tax": "¥120",
                "Total": "¥1,320",
                "Credit applied": "¥0",
                "Amount due": "¥1,320",
            },
        ),
        (
            KWD_INVOICE,
            "en_US",
            {
                "Subtotal": f"KWD{NBSP}1.250",
                "Discount": f"KWD{NBSP}0.000",
                "Tax": f"KWD{NBSP}0.000",
                "Total": f"KWD{NBSP}1.250",
                "Credit applied": f"KWD{NBSP}0.000",
                "Amount due": f"KWD{NBSP}1.250",
            },
        ),
    ],
)
def test_text_totals(inv: Invoice, locale: str, expected: dict[str, str]) -> None:
    assert _summary(invoice_text(inv, locale)) == expected


def test_text_shows_header_and_every_line() -> None:
    text = invoice_text(USD_INVOICE)
    lines = text.splitlines()
    assert lines[0] == "INVOICE INV-000001"
    assert "Customer:  acme" in lines
    assert "Issued:    Feb 1, 2026" in lines
    assert "Status:    Open" in lines
    team = next(row for row in lines if "Team (25 seats)" in row)
    assert team.split() == ["Plan", "Team", "(25", "seats)", "Feb", "1,", "2026", "–", "Mar", "1,",
                            "2026", "25", "$50.00", "$1,250.00"]
    addon = next(row for row in lines if "Analytics" in row)
    assert addon.startswith("Add-on") and addon.endswith("$250.00")
    discount = next(row for row in lines if "10% off" in row)
    assert discount.startswith("Discount") and discount.endswith("-$150.00")


def test_text_columns_line_up() -> None:
    rows = [row for row in invoice_text(USD_INVOICE).splitlines() if row.startswith(("Plan", "Add-on"))]
    assert len({len(row) for row in rows}) == 1  # right-aligned amounts end in one column


def test_text_in_german() -> None:
    text = invoice_text(EUR_INVOICE, "de_DE")
    assert "Issued:    01.02.2026" in text
    assert "Status:    Paid" in text
    row = next(r for r in text.splitlines() if "Team (30 seats)" in r)
    # split on ordinary spaces only: the no-break space stays inside each amount
    assert row.split(" ")[-1:] == [f"1.500,00{NBSP}€"]
    assert [cell for cell in row.split(" ") if cell][-3:] == ["30", f"50,00{NBSP}€", f"1.500,00{NBSP}€"]


def test_local_dates_follow_the_timezone() -> None:
    tokyo = invoice(
        "JPY",
        [line("1200", description="Starter", unit="1200", start="2026-01-31T15:00", end="2026-02-28T15:00")],
        subtotal="1200",
        total="1200",
        amount_due="1200",
    )
    text = invoice_text(tokyo, "en_US", tz="Asia/Tokyo")
    assert "Feb 1, 2026 – Mar 1, 2026" in text


def test_void_and_credit_added() -> None:
    void = USD_INVOICE.with_status("void")
    assert invoice_text(void).splitlines()[0] == "INVOICE INV-000001  [VOID]"
    assert '<span class="void">VOID</span>' in invoice_html(void)
    credit = invoice(
        "USD",
        [line("-80.00", kind="proration", description="Unused time on Team", unit="50.00")],
        subtotal="-80.00",
        total="-80.00",
        amount_due="0.00",
    ).model_copy(update={"credit_added": Decimal("80.00")})
    assert re.search(r"Added to your credit balance +\$80\.00$", invoice_text(credit), re.MULTILINE)


def test_html_is_a_self_contained_page() -> None:
    page = invoice_html(USD_INVOICE)
    assert page.startswith("<!DOCTYPE html>\n")
    assert '<html lang="en">' in page
    assert "<style>" in page
    for external in ("<link", "<script", "src=", "@import", "url(", "http://", "https://"):
        assert external not in page
    assert "<td>Team (25 seats)</td>" in page
    assert '<td class="num">$1,250.00</td>' in page
    assert '<td colspan="5" class="num">Amount due</td><td class="num">$1,600.00</td>' in page
    assert page.rstrip().endswith("</html>")


def test_html_in_german() -> None:
    page = invoice_html(EUR_INVOICE, "de_DE")
    assert '<html lang="de">' in page
    assert f'<td class="num">1.785,00{NBSP}€</td>' in page


def test_html_escapes_every_customer_string() -> None:
    nasty = "<script>alert('x')</script>"
    inv = invoice(
        "USD",
        [line("10.00", description=nasty + ' & "more"', unit="10.00")],
        subtotal="10.00",
        total="10.00",
        amount_due="10.00",
        customer='<img src=x onerror="alert(1)">',
        number="<b>42</b>",
    )
    page = invoice_html(inv)
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>42" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;more&quot;" in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "<title>Invoice &lt;b&gt;42&lt;/b&gt;</title>" in page
    # the text rendering is for a terminal: it keeps the string as it is
    assert nasty in invoice_text(inv)


def test_an_invoice_without_lines_renders() -> None:
    empty = invoice("USD", [], subtotal="0", total="0", amount_due="0", status="paid")
    assert "(no lines)" in invoice_text(empty)
    assert "No lines" in invoice_html(empty)
