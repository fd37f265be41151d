"""Credit notes: the pure computation (billing.credit_notes) to the cent, the remaining-creditable
rule, the errors naming the field, and the book issuing them (CN- series, credit on the next
invoice, no MRR movement, invoices left as issued)."""

from __future__ import annotations

import json
import pickle
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from billing.book import Book, BookError
from billing.credit_notes import CreditNoteError, creditable_left, credited_lines, draft_credit_note
from billing.money import RoundingMode
from billing.records import CreditNote, Invoice, InvoiceLine, credit_note_json
from billing.replay import ReplayResult, replay_in_memory
from billing.scenario import (
    EVENT_ADAPTER,
    CreditNoteLineRequest,
    Scenario,
    ScenarioError,
    parse_scenario_text,
)

AT = datetime(2026, 2, 10, tzinfo=UTC)


def line(amount: str, kind: str = "plan", description: str = "Team × 10") -> InvoiceLine:
    return InvoiceLine(kind=kind, description=description, subscription="s", quantity=None,  # type: ignore[arg-type]
                       unit_amount=None, amount=Decimal(amount), period_start=None, period_end=None)


def invoice(*lines: InvoiceLine, currency: str = "USD", status: str = "paid", number: str = "INV-0003") -> Invoice:
    subtotal = sum((ln.amount for ln in lines if ln.kind != "discount"), Decimal(0))
    discount = -sum((ln.amount for ln in lines if ln.kind == "discount"), Decimal(0))
    return Invoice(number=number, customer="acme", currency=currency, status=status,  # type: ignore[arg-type]
                   issued_at=datetime(2026, 2, 1, tzinfo=UTC), billing_date="2026-02-01", lines=lines,
                   subtotal=subtotal, discount=discount, tax=Decimal(0), total=subtotal - discount,
                   credit_applied=Decimal(0), amount_due=subtotal - discount)


def req(index: int, amount: str | None = None) -> CreditNoteLineRequest:
    return CreditNoteLineRequest.model_validate({"line": index} | ({} if amount is None else {"amount": amount}))


def draft(inv: Invoice, *requests: CreditNoteLineRequest, earlier: list[CreditNote] | None = None,
          rate: str = "0.20", mode: RoundingMode = "half_up", number: str = "CN-0001") -> CreditNote:
    return draft_credit_note(inv, list(requests), earlier=earlier or [], number=number, at=AT,
                             reason="other", tax_rate=Decimal(rate), mode=mode)


# --- the computation, to the cent --------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "lines", "requests", "rate", "mode", "expected"),
    [
        # tax is the credited subtotal × rate, rounded once: 33.33 × 0.20 = 6.666 → 6.67
        ("USD", ["500.00"], [(0, "33.33")], "0.20", "half_up", ("33.33", "6.67", "40.00")),
        # two lines: 100.00 + 83.33 = 183.33; × 0.20 = 36.666 → 36.67 (not 20.00 + 16.67 per line)
        ("USD", ["500.00", "250.00"], [(0, "83.33"), (1, "100.00")], "0.20", "half_up",
         ("183.33", "36.67", "220.00")),
        # an omitted amount credits the whole line
        ("USD", ["500.00", "250.00"], [(1, None)], "0.20", "half_up", ("250.00", "50.00", "300.00")),
        # the tie 1.25 × 0.10 = 0.125 follows the book's rounding mode
        ("USD", ["10.00"], [(0, "1.25")], "0.10", "half_up", ("1.25", "0.13", "1.38")),
        ("USD", ["10.00"], [(0, "1.25")], "0.10", "half_even", ("1.25", "0.12", "1.37")),
        # JPY has no minor unit: 1005 × 0.10 = 100.5 → 101 (half_up) or 100 (half_even)
        ("JPY", ["5000"], [(0, "1005")], "0.10", "half_up", ("1005", "101", "1106")),
        ("JPY", ["5000"], [(0, "1005")], "0.10", "half_even", ("1005", "100", "1105")),
        # KWD has three: 10.005 × 0.05 = 0.50025 → 0.500
        ("KWD", ["15.000"], [(0, "10.005")], "0.05", "half_up", ("10.005", "0.500", "10.505")),
        # no tax
        ("USD", ["232.26"], [(0, None)], "0", "half_up", ("232.26", "0.00", "232.26")),
    ],
)
def test_amounts_to_the_cent(currency: str, lines: list[str], requests: list[tuple[int, str | None]], rate: str,
                             mode: RoundingMode, expected: tuple[str, str, str]) -> None:
    inv = invoice(*(line(a) for a in lines), currency=currency)
    note = draft(inv, *(req(i, a) for i, a in requests), rate=rate, mode=mode)
    assert (str(note.subtotal), str(note.tax), str(note.total)) == expected
    assert [line.invoice_line for line in note.lines] == [i for i, _ in requests]
    assert (note.number, note.invoice, note.customer, note.currency) == ("CN-0001", inv.number, "acme", currency)


def test_a_note_copies_the_kind_and_description_of_the_lines_it_credits() -> None:
    inv = invoice(line("500.00"), line("250.00", "addon", "Analytics"), line("-193.55", "proration", "Unused"),
                  line("232.26", "proration", "Remaining"), line("40.00", "usage", "API calls"))
    note = draft(inv, req(3), req(1, "0.01"), req(4))
    assert [(ln.invoice_line, ln.kind, ln.description, str(ln.amount)) for ln in note.lines] == [
        (3, "proration", "Remaining", "232.26"), (1, "addon", "Analytics", "0.01"), (4, "usage", "API calls", "40.00")]
    assert credit_note_json(note)["lines"] == [
        {"invoice_line": 3, "kind": "proration", "description": "Remaining", "amount": "232.26"},
        {"invoice_line": 1, "kind": "addon", "description": "Analytics", "amount": "0.01"},
        {"invoice_line": 4, "kind": "usage", "description": "API calls", "amount": "40.00"},
    ]


# --- what remains creditable -------------------------------------------------------------------


def test_each_line_is_credited_at_most_its_amount_over_all_notes() -> None:
    inv = invoice(line("500.00"), line("250.00", "addon"), line("10.00", "usage"))
    first = draft(inv, req(1, "100.00"))
    second = draft(inv, req(0, "33.33"), req(1), earlier=[first], number="CN-0002")
    assert [str(ln.amount) for ln in second.lines] == ["33.33", "150.00"]  # the 150.00 left on line 1
    assert credited_lines(inv.number, [first, second]) == {0: Decimal("33.33"), 1: Decimal("250.00")}
    assert creditable_left(inv, [first, second]) == Decimal("476.67")
    with pytest.raises(CreditNoteError, match=r"^lines\[0\]\.line: INV-0003 line 1 is already fully credited$"):
        draft(inv, req(1), earlier=[first, second])
    with pytest.raises(CreditNoteError, match=r"^lines\[1\]\.amount: 466\.68 exceeds the 466\.67 left to credit "
                                              r"on INV-0003 line 0$"):
        draft(inv, req(2, "1.00"), req(0, "466.68"), earlier=[first, second])
    with pytest.raises(CreditNoteError, match=r"^lines\[0\]\.amount: 0\.01 exceeds the 0\.00 left"):
        draft(inv, req(1, "0.01"), earlier=[first, second])
    # exactly what is left passes, given or omitted
    last = draft(inv, req(0, "466.67"), req(2), earlier=[first, second], number="CN-0003")
    assert str(last.subtotal) == "476.67"
    assert creditable_left(inv, [first, second, last]) == Decimal(0)
    # notes on another invoice do not count
    other = invoice(line("500.00"), number="INV-0009")
    assert str(draft(other, req(0), earlier=[first, second, last]).subtotal) == "500.00"


def test_all_notes_together_credit_at_most_what_the_invoice_charged() -> None:
    """A 50 % discount: the invoice charged 250.00 before tax, so that is all it can give back,
    although its plan line alone is 500.00 (Stripe caps credit notes at the invoice total)."""
    inv = invoice(line("500.00"), line("-250.00", "discount", "Discount: 50 % off"))
    first = draft(inv, req(0, "200.00"))
    with pytest.raises(CreditNoteError, match=r"^lines: 50\.01 in all exceeds the 50\.00 left to credit on "
                                              r"INV-0003 \(it charged 250\.00 before tax\)$"):
        draft(inv, req(0, "50.01"), earlier=[first])
    assert str(draft(inv, req(0, "50.00"), earlier=[first]).total) == "60.00"
    # a credit line on the invoice lowers what it charged too
    prorated = invoice(line("100.00"), line("-60.00", "proration"))
    with pytest.raises(CreditNoteError, match="exceeds the 40.00 left to credit on INV-0003"):
        draft(prorated, req(0))


# --- what cannot be credited -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inv", "requests", "message"),
    [
        (invoice(line("500.00"), status="void"), [req(0)],
         "invoice: INV-0003 is void; only a finalized or paid invoice can be credited"),
        (invoice(line("500.00")), [req(1)], "lines[0].line: INV-0003 has no line 1 (its lines are 0 to 0)"),
        (invoice(line("500.00"), line("-50.00", "discount")), [req(1)],
         "lines[0].line: INV-0003 line 1 is a discount line; only plan, addon, usage and proration lines"),
        (invoice(line("500.00"), line("-21.29", "proration")), [req(0, "1.00"), req(1)],
         "lines[1].line: INV-0003 line 1 is -21.29; only a line with a positive amount can be credited"),
        (invoice(line("0.00")), [req(0)], "lines[0].line: INV-0003 line 0 is 0.00; only a line with a positive"),
        (invoice(line("500.00")), [req(0, "1.00"), req(0, "2.00")],
         "lines[1].line: INV-0003 line 0 is already credited by lines[0] of this credit note"),
        (invoice(line("500.00")), [req(0, "1.005")], "lines[0].amount: 1.005 has more decimals than USD allows (2)"),
        (invoice(line("5000"), currency="JPY"), [req(0, "10.5")],
         "lines[0].amount: 10.5 has more decimals than JPY allows (0)"),
        (invoice(line("500.00")), [req(0, "500.01")],
         "lines[0].amount: 500.01 exceeds the 500.00 left to credit on INV-0003 line 0"),
        (invoice(line("500.00")), [], "lines: a credit note needs at least one line"),
    ],
)
def test_refusals_name_the_field(inv: Invoice, requests: list[CreditNoteLineRequest], message: str) -> None:
    with pytest.raises(CreditNoteError) as raised:
        draft(inv, *requests)
    assert str(raised.value).startswith(message)


def test_a_finalized_unpaid_invoice_can_be_credited() -> None:
    assert str(draft(invoice(line("500.00"), status="finalized"), req(0)).total) == "600.00"


# --- the book ----------------------------------------------------------------------------------

TEAM = {"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit", "prices": {"USD": "50.00"}}
ANALYTICS = {"code": "analytics", "name": "Analytics", "interval": "month", "pricing": "flat",
             "prices": {"USD": "250.00"}}
START = [
    {"at": "2026-01-01", "type": "customer", "customer": "acme", "currency": "USD", "tax_rate": "0.20"},
    {"at": "2026-01-01", "type": "subscribe", "customer": "acme", "subscription": "s", "plan": "team",
     "quantity": 10, "addons": [{"addon": "analytics"}]},
    {"at": "2026-01-01", "type": "invoice_run"},  # INV-0001: 500.00 + 250.00, tax 150.00, total 900.00
]


def credit_note(at: str, invoice: str, lines: list[dict[str, Any]], reason: str = "other") -> dict[str, Any]:
    return {"at": at, "type": "credit_note", "invoice": invoice, "lines": lines, "reason": reason}


def run(*events: dict[str, Any]) -> ReplayResult:
    doc = {"catalog": {"plans": [TEAM], "addons": [ANALYTICS]}, "events": [*START, *events]}
    return replay_in_memory(Scenario.model_validate(doc))


def test_the_credit_is_applied_on_the_next_invoice_and_moves_no_mrr() -> None:
    r = run(credit_note("2026-01-10", "INV-0001", [{"line": 1, "amount": "100.00"}], "product_unsatisfactory"),
            credit_note("2026-01-12", "INV-0001", [{"line": 0, "amount": "33.33"}, {"line": 1}], "duplicate"),
            {"at": "2026-02-01", "type": "invoice_run"},
            {"at": "2026-03-01", "type": "invoice_run"})
    assert [(n.number, str(n.subtotal), str(n.tax), str(n.total), n.reason) for n in r.credit_notes] == [
        ("CN-0001", "100.00", "20.00", "120.00", "product_unsatisfactory"),
        ("CN-0002", "183.33", "36.67", "220.00", "duplicate"),
    ]
    first, february, march = r.invoices
    # INV-0001 stays exactly as issued
    assert (first.status, str(first.total), str(first.amount_due)) == ("finalized", "900.00", "900.00")
    # 120.00 + 220.00 of credit: February's 900.00 is due 560.00, March owes everything again
    assert (str(february.total), str(february.credit_applied), str(february.amount_due)) == ("900.00", "340.00",
                                                                                             "560.00")
    assert (str(march.credit_applied), str(march.amount_due)) == ("0.00", "900.00")
    assert [(m.type, str(m.delta)) for m in r.movements] == [("new", "750.00")]
    assert r.to_json()["credit_notes"] == [credit_note_json(n) for n in r.credit_notes]


def test_the_credit_balance_carries_over_several_invoices() -> None:
    r = run(credit_note("2026-01-10", "INV-0001", [{"line": 0}, {"line": 1}]),  # 750.00 + 150.00 = 900.00
            {"at": "2026-01-15", "type": "change_quantity", "subscription": "s", "quantity": 1},
            {"at": "2026-02-01", "type": "invoice_run"}, {"at": "2026-03-01", "type": "invoice_run"})
    [note] = r.credit_notes
    assert str(note.total) == "900.00"
    # February: 50 + 250 − 274.19 (10 × 50 × 17/31 back) + 27.42 (1 × 50 × 17/31) = 53.23 + 10.65 tax = 63.88,
    # all from the credit; March: 300.00 + 60.00 tax, from what is left (836.12), leaving 476.12
    _, february, march = r.invoices
    assert (str(february.total), str(february.credit_applied), february.status) == ("63.88", "63.88", "paid")
    assert (str(march.total), str(march.credit_applied), str(march.amount_due)) == ("360.00", "360.00", "0.00")


def test_a_replay_without_credit_notes_keeps_the_contract_keys() -> None:
    assert list(run({"at": "2026-02-01", "type": "invoice_run"}).to_json()) == ["invoices", "movements", "metrics"]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([credit_note("2026-01-10", "INV-0001", [{"line": 1}, {"line": 0, "amount": "500.01"}])],
         "events[3] (credit_note): lines[1].amount: 500.01 exceeds the 500.00 left to credit on INV-0001 line 0"),
        ([credit_note("2026-01-10", "INV-0001", [{"line": 0, "amount": "400.00"}]),
          credit_note("2026-01-11", "INV-0001", [{"line": 0, "amount": "100.01"}])],
         "events[4] (credit_note): lines[0].amount: 100.01 exceeds the 100.00 left to credit on INV-0001 line 0"),
        ([credit_note("2026-01-10", "INV-0404", [{"line": 0}])],
         "events[3] (credit_note): invoice: unknown invoice 'INV-0404'"),
        ([credit_note("2026-01-10", "INV-0001", [{"line": 2}])],
         "events[3] (credit_note): lines[0].line: INV-0001 has no line 2 (its lines are 0 to 1)"),
        ([{"at": "2026-01-10", "type": "void", "invoice": "INV-0001"},
          credit_note("2026-01-11", "INV-0001", [{"line": 0}])],
         "events[4] (credit_note): invoice: INV-0001 is void; only a finalized or paid invoice can be credited"),
        ([credit_note("2026-01-10", "INV-0001", [{"line": 0, "amount": "1.00"}]),
          {"at": "2026-01-11", "type": "void", "invoice": "INV-0001"}],
         "events[4] (void): invoice: 'INV-0001' has credit note(s) CN-0001 and can no longer be voided"),
    ],
)
def test_book_refusals_name_the_event_and_field(events: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(BookError) as raised:
        run(*events)
    assert str(raised.value) == message


def test_a_refused_note_leaves_the_book_unchanged_and_the_series_without_gaps() -> None:
    scenario = Scenario.model_validate({"catalog": {"plans": [TEAM], "addons": [ANALYTICS]}, "events": START})
    book = Book(scenario.settings, scenario.catalog)
    for index, event in enumerate(scenario.events):
        book.apply(event, index)
    before = book.dumps()
    with pytest.raises(BookError):
        book.apply(EVENT_ADAPTER.validate_python(credit_note("2026-01-10", "INV-0001", [{"line": 0},
                                                                                        {"line": 0}])), 3)
    assert book.dumps() == before
    out = book.apply(EVENT_ADAPTER.validate_python(credit_note("2026-01-10", "INV-0001", [{"line": 0}])), 3)
    assert [n.number for n in out.credit_notes] == ["CN-0001"]
    assert (out.issued, out.movements, out.status_changes) == ([], [], [])
    assert book.accounts["acme"].credit == Decimal("600.00")
    assert book.issued_credit_notes() == out.credit_notes
    assert book.invoices["INV-0001"] == book.issued_invoices()[0] and book.invoices["INV-0001"].total == 900


def test_a_snapshot_from_before_credit_notes_loads_with_an_empty_series() -> None:
    scenario = Scenario.model_validate({"catalog": {"plans": [TEAM], "addons": [ANALYTICS]}, "events": START})
    book = Book(scenario.settings, scenario.catalog)
    for event in scenario.events:
        book.apply(event)
    state = dict(book.__dict__)
    del state["credit_notes"], state["next_credit_note"]
    old = Book.__new__(Book)
    old.__dict__.update(state)  # what an older version pickled: no credit note attributes
    data = pickle.dumps(old, protocol=pickle.HIGHEST_PROTOCOL)
    loaded = Book.loads(data)
    assert (loaded.credit_notes, loaded.next_credit_note) == ({}, 1)
    out = loaded.apply(EVENT_ADAPTER.validate_python(credit_note("2026-01-10", "INV-0001", [{"line": 1}])))
    assert [(n.number, str(n.total)) for n in out.credit_notes] == [("CN-0001", "300.00")]


# --- the command format ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"lines": [{"line": 0, "amount": 10}]}, "events[3].lines[0].amount: must be a decimal string"),
        ({"lines": [{"line": 0, "amount": "0"}]}, "events[3].lines[0].amount: Value error, amount must be positive"),
        ({"lines": [{"line": 0, "amount": "-1.00"}]}, "events[3].lines[0].amount: Value error, amount must be"),
        ({"lines": [{"line": -1}]}, "events[3].lines[0].line: "),
        ({"lines": [{"line": "0"}]}, "events[3].lines[0].line: "),
        ({"lines": [{"line": 0, "amout": "1.00"}]}, "events[3].lines[0].amout: unknown field"),
        ({"lines": []}, "events[3].lines: "),
        ({"reason": "fraud"}, "events[3].reason: "),
        ({"reason": None}, "events[3].reason: "),
        ({"note": "x"}, "events[3].note: unknown field"),
    ],
)
def test_the_command_is_validated_at_the_boundary(patch: dict[str, Any], message: str) -> None:
    event = credit_note("2026-01-10", "INV-0001", [{"line": 0}], "duplicate") | patch
    doc = {"catalog": {"plans": [TEAM], "addons": [ANALYTICS]}, "events": [*START, event]}
    with pytest.raises(ScenarioError) as raised:
        parse_scenario_text(json.dumps(doc))
    assert str(raised.value).startswith(message)
