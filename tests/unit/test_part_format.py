"""How a customer part and the records in it are pickled (billing.shards, billing.records): past
invoices stay archived until read, records pickle as their field values, and both older forms
still load."""

from __future__ import annotations

import copy
import copyreg
import dataclasses
import io
import pickle
import sys
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from billing.book import Book
from billing.records import InvoiceLine, LineRef, Record
from billing.replay import replay_in_memory
from billing.scenario import PayEvent, parse_scenario_text
from billing.shards import PART_FORMAT, SHARED, Counters, CustomerPart, _shared, assemble, counters_of, split

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))


def _book_with_history() -> Book:
    """The book of the first fixture where a customer has two invoices or more."""
    for path in FIXTURES:
        scenario = parse_scenario_text(path.read_text())
        book = Book(scenario.settings, scenario.catalog)
        for index, event in enumerate(scenario.events):
            book.apply(event, index)
        owners = [invoice.customer for invoice in book.issued_invoices()]
        if any(owners.count(customer) > 1 for customer in owners):
            return book
    raise AssertionError("no fixture has a customer with two invoices")


def _reloaded(book: Book) -> Book:
    parts = [CustomerPart.loads(part.dumps()) for part in split(book).values()]
    return assemble(Book(book.settings, book.catalog), parts, counters_of(book), book.clock)


def test_a_loaded_part_keeps_its_invoices_archived_in_issue_order() -> None:
    book = _book_with_history()
    for customer, part in split(book).items():
        loaded = CustomerPart.loads(part.dumps())
        assert loaded.invoices == {}
        assert loaded.invoice_numbers() == [i.number for i in book.issued_invoices() if i.customer == customer]


def test_an_assembled_book_reads_archived_invoices_as_issued() -> None:
    book = _book_with_history()
    again = _reloaded(book)
    order = {c: a.order for c, a in book.accounts.items()}
    by_customer = sorted(book.issued_invoices(), key=lambda i: order[i.customer])  # stable: issue order within
    assert again.invoice_order == [i.number for i in by_customer]
    assert all(again.is_archived(number) for number in book.invoice_order)
    assert again.issued_invoices() == by_customer
    assert not any(again.is_archived(number) for number in book.invoice_order)


def test_an_untouched_archive_is_saved_as_it_was_loaded() -> None:
    book = _book_with_history()
    again = _reloaded(book)
    for customer, part in split(again).items():
        assert part.invoices == {}
        assert part.archived == again.archived_invoices(customer)
        assert CustomerPart.loads(part.dumps()).archived == part.archived


def test_paying_an_archived_invoice_decodes_only_its_customer() -> None:
    book = _book_with_history()
    invoice = next(i for i in book.issued_invoices() if i.status == "finalized")
    again = _reloaded(book)
    assert book.clock is not None
    again.apply(PayEvent(type="pay", at=book.clock, invoice=invoice.number), discard_on_error=True)
    others = [i.number for i in book.issued_invoices() if i.customer != invoice.customer]
    assert not again.is_archived(invoice.number) and all(again.is_archived(n) for n in others)
    parts = split(again)
    assert parts[invoice.customer].archived == []
    assert list(parts[invoice.customer].invoices) == [i.number for i in book.issued_invoices()
                                                      if i.customer == invoice.customer]
    assert parts[invoice.customer].invoices[invoice.number].status == "paid"
    reloaded = {i.number: i.status for i in _reloaded(again).issued_invoices()}
    assert reloaded == {i.number: "paid" if i.number == invoice.number else i.status for i in book.issued_invoices()}


def test_a_part_saved_before_archiving_still_loads() -> None:
    book = _book_with_history()
    for part in split(book).values():
        state = dict(part.__dict__)
        del state["archived"]
        old = CustomerPart.__new__(CustomerPart)
        old.__setstate__(state)
        assert old.archived == [] and old.invoices == part.invoices


def test_a_whole_book_snapshot_holds_every_invoice() -> None:
    book = _book_with_history()
    again = _reloaded(book)
    copy = Book.loads(again.dumps())
    assert copy.invoices == {i.number: i for i in book.issued_invoices()}
    assert not any(copy.is_archived(number) for number in copy.invoice_order)


def _pydantic_pickle(obj: object) -> bytes:
    """`obj` pickled with pydantic's own form for records (as parts were written before)."""

    class Legacy(pickle.Pickler):
        def reducer_override(self, value: Any) -> Any:
            if isinstance(value, Record):
                return copyreg.__newobj__, (type(value),), value.__getstate__()
            return NotImplemented

    out = io.BytesIO()
    Legacy(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return out.getvalue()


@pytest.mark.parametrize("form", ["compact", "pydantic"])
def test_records_round_trip_with_their_set_fields(form: str) -> None:
    result = replay_in_memory(parse_scenario_text(FIXTURES[0].read_text()))
    records: list[Record] = [*result.invoices, *result.movements]
    records += [line for invoice in result.invoices for line in invoice.lines]
    data = pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL) if form == "compact" else _pydantic_pickle(records)
    loaded = pickle.loads(data)  # noqa: S301 - made by this test
    assert loaded == records
    for before, after in zip(records, loaded, strict=True):
        assert type(after) is type(before)
        assert list(after.__dict__.items()) == list(before.__dict__.items())
        assert after.__pydantic_fields_set__ == before.__pydantic_fields_set__


def test_a_record_pickles_which_fields_were_left_unset() -> None:
    line = InvoiceLine(kind="discount", description="d", subscription=None, quantity=None, unit_amount=None,
                       amount=0, period_start=None, period_end=None)
    loaded = pickle.loads(pickle.dumps(line))  # noqa: S301 - made by this test
    assert "included" not in loaded.__pydantic_fields_set__
    assert loaded.model_dump(exclude_unset=True) == line.model_dump(exclude_unset=True)


def test_counters_are_untouched_by_archiving() -> None:
    book = _book_with_history()
    assert counters_of(_reloaded(book)) == counters_of(book) != Counters()


def test_an_account_saved_with_line_ref_records_loads_as_tuples() -> None:
    book = _book_with_history()
    checked = 0
    for part in split(book).values():
        account = part.account
        if not account.line_tags:
            continue
        checked += 1
        old = copy.copy(account)
        old.line_tags = {tag: [LineRef(invoice=n, line=i) for n, i in ats] for tag, ats in account.line_tags.items()}
        loaded = CustomerPart.loads(dataclasses.replace(part, account=old).dumps()).account
        assert loaded.line_tags == account.line_tags
        assert all(type(at) is tuple for ats in loaded.line_tags.values() for at in ats)
        assert loaded == account
    assert checked


def test_parts_load_alike_through_the_class_cache() -> None:
    """`CustomerPart.loads` looks classes up once per process; a part in format 2 loads as the
    same part pickled plainly (format 1) does."""
    book = _book_with_history()
    for part in split(book).values():
        data = part.dumps()
        first, second = CustomerPart.loads(data), CustomerPart.loads(data)
        plain = CustomerPart.loads(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL))
        assert first == second == plain
        assert type(first.account.created_at.tzinfo) is type(plain.account.created_at.tzinfo)


def test_a_part_names_its_classes_and_attributes_by_reference() -> None:
    """Format 2: what `SHARED` lists is written as a memo reference, not spelled out."""
    book = _book_with_history()
    for part in split(book).values():
        data = part.dumps()
        assert data.startswith(PART_FORMAT)
        for spelled in (b"billing.shards", b"CustomerPart", b"Account", b"datetime", b"subscriptions", b"created_at"):
            assert spelled not in data
        assert len(data) < len(pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL))


def test_attribute_names_load_interned() -> None:
    """Loaded attribute names are the interned strings, so the part's next `dumps` finds them in
    the shared memo again (by identity) and writes the same bytes."""
    book = _book_with_history()
    for part in split(book).values():
        loaded = CustomerPart.loads(part.dumps())
        assert all(name is sys.intern(name) for name in vars(loaded.account))
        assert CustomerPart.loads(part.dumps()).dumps() == loaded.dumps()


def test_shared_entries_resolve_to_what_they_name() -> None:
    objects = _shared().objects
    assert len(objects) == len(SHARED)
    assert objects[0] is CustomerPart and objects[SHARED.index(("=", "utc"))] is UTC
    assert all(isinstance(obj, str) for (module, _), obj in zip(SHARED, objects, strict=True) if module == "@")
