"""Customer parts as the code before billing.archive wrote them (main at 7428d51) still load:
`data/parts-7428d51.json` holds, for a few fixtures, every customer's part written by that code
through `replay_in_parts` below (the fixture replayed halfway in one book, then saved as parts and
reloaded before each further event, as the services do). The same replay with the current code
gives the same customers: accounts, subscriptions, coupons, credit notes and every invoice, with
the fields it left unset."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest

from billing.archive import decode_invoices
from billing.book import Book
from billing.records import Invoice
from billing.scenario import PayEvent, parse_scenario_text
from billing.shards import CustomerPart, assemble, counters_of, split

ROOT = Path(__file__).resolve().parents[2]
LEGACY: dict[str, dict[str, object]] = json.loads((Path(__file__).parent / "data" / "parts-7428d51.json").read_text())


def replay_in_parts(name: str) -> tuple[Book, dict[str, CustomerPart]]:
    """The fixture's book at its end and its parts, saved as the data file's were."""
    scenario = parse_scenario_text((ROOT / "fixtures" / "scenarios" / name).read_text())
    events = list(scenario.events)
    half = len(events) // 2
    book = Book(scenario.settings, scenario.catalog)
    for index, event in enumerate(events[:half]):
        book.apply(event, index)
    for index, event in enumerate(events[half:], half):
        parts = [CustomerPart.loads(part.dumps()) for part in split(book).values()]
        usage = book.usage
        book = assemble(Book(scenario.settings, scenario.catalog), parts, counters_of(book), book.clock)
        book.use_usage_source(usage)
        book.apply(event, index)
    return book, split(book)


def legacy_parts(name: str) -> dict[str, CustomerPart]:
    stored = LEGACY[name]["parts"]
    assert isinstance(stored, dict)
    return {customer: CustomerPart.loads(base64.b64decode(data)) for customer, data in stored.items()}


def invoices_of(part: CustomerPart) -> list[Invoice]:
    return [i for _, data in part.archived for i in decode_invoices(data)] + list(part.invoices.values())


def same_invoices(before: list[Invoice], after: list[Invoice]) -> None:
    assert after == before
    for old, new in zip(before, after, strict=True):
        assert list(new.__dict__.items()) == list(old.__dict__.items())
        assert new.model_fields_set == old.model_fields_set
        for old_line, new_line in zip(old.lines, new.lines, strict=True):
            assert list(new_line.__dict__.items()) == list(old_line.__dict__.items())
            assert new_line.model_fields_set == old_line.model_fields_set


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_a_legacy_part_loads_as_the_current_code_writes_it(name: str) -> None:
    _, parts = replay_in_parts(name)
    old = legacy_parts(name)
    assert sorted(old) == sorted(parts)
    for customer, part in parts.items():
        loaded = CustomerPart.loads(part.dumps())
        legacy = old[customer]
        assert legacy.archived and all(isinstance(pickle.loads(data)[0], Invoice)  # noqa: S301 - test data
                                       for _, data in legacy.archived)  # entries in the older form
        assert legacy.account == loaded.account
        assert legacy.subscriptions == loaded.subscriptions
        assert legacy.coupons == loaded.coupons
        assert legacy.credit_notes == loaded.credit_notes
        assert legacy.invoice_numbers() == loaded.invoice_numbers()
        same_invoices(invoices_of(loaded), invoices_of(legacy))


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_a_legacy_part_saved_again_keeps_its_old_entries_and_adds_new_ones(name: str) -> None:
    book, _ = replay_in_parts(name)
    old = legacy_parts(name)
    again = assemble(Book(book.settings, book.catalog), list(old.values()), counters_of(book), book.clock)
    invoice = again.issued_invoices()[-1]  # decodes every old entry
    same_invoices(book.issued_invoices(), again.issued_invoices())
    if invoice.status == "finalized":
        assert book.clock is not None
        again.apply(PayEvent(type="pay", at=book.clock, invoice=invoice.number), discard_on_error=True)
    for customer, part in split(again).items():
        reloaded = CustomerPart.loads(part.dumps())
        assert reloaded.invoice_numbers() == old[customer].invoice_numbers()
        expected = [again.invoices[n] for n in reloaded.invoice_numbers()]
        same_invoices(expected, invoices_of(reloaded))
    # an untouched legacy entry is written back as it was read
    for part in legacy_parts(name).values():
        assert CustomerPart.loads(part.dumps()).archived == part.archived


FORMAT2: dict[str, dict[str, str]] = json.loads((Path(__file__).parent / "data" / "parts-format2.json").read_text())


@pytest.mark.parametrize("name", sorted(FORMAT2))
def test_a_part_stored_in_format_2_loads_as_the_current_code_writes_it(name: str) -> None:
    """`data/parts-format2.json`: the same fixtures' parts, replayed as above and written in format
    2 by the code that introduced it (billing.shards.SHARED, append only: stored parts name its
    entries by position)."""
    _, parts = replay_in_parts(name)
    stored = {customer: CustomerPart.loads(base64.b64decode(data)) for customer, data in FORMAT2[name].items()}
    assert sorted(stored) == sorted(parts)
    for customer, part in parts.items():
        loaded, old = CustomerPart.loads(part.dumps()), stored[customer]
        assert old.account == loaded.account
        assert old.subscriptions == loaded.subscriptions
        assert old.coupons == loaded.coupons
        assert old.credit_notes == loaded.credit_notes
        assert old.archived == loaded.archived
        same_invoices(invoices_of(loaded), invoices_of(old))
