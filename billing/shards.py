"""The book in parts: each customer's share of it, and the counters the whole book shares.

Everything in a `Book` belongs to one customer — its account (credit, MRR, pending prorations,
the tags that link its movements to its invoice lines), its subscriptions, coupons, invoices and
credit notes — except the counters that number across customers (invoices, credit notes,
movements, change and coupon ids, creation order) and the clock. So the database keeps one row
per customer (`CustomerPart`, pickled) and the counters in a sequence table, and a command
assembles a book from only the parts it touches (`assemble`), applies the event with the pure
core, and splits the result back (`split`). A book assembled from some customers' parts behaves
for them exactly as the whole book does, as long as it holds every customer with a transition
due by the event's time (those are the only others the event's `_advance` would touch): the
services load those too, so movement ids come out in the same order as in the pure replay.

`due_at` says when a customer next needs the clock or a run: the earlier of its next transition
and what it has unbilled; a run bills the customers due by its date, in batches.
"""

from __future__ import annotations

import io
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from functools import cache
from typing import Any

from billing.archive import encode_invoices
from billing.book import Account, Archived, Book, Outcome
from billing.catalog import Catalog
from billing.discounts import Coupon, Tag
from billing.records import CreditNote, Invoice, LineRef
from billing.scenario import Event, Settings
from billing.subscription import Subscription


@dataclass
class Counters:
    """The next value of every series the whole book shares (gap-free: a command that fails
    takes none)."""

    invoice: int = 1
    credit_note: int = 1
    movement: int = 1
    change: int = 1
    coupon: int = 1
    customer: int = 0
    subscription: int = 0

    @staticmethod
    def names() -> list[str]:
        return [f.name for f in fields(Counters)]

    @staticmethod
    def of(sequences: Mapping[str, int]) -> Counters:
        """The counters among `number_sequences` rows (series -> next); other series are ignored."""
        return Counters(**{k: v for k, v in sequences.items() if k in Counters.names()})


@dataclass
class CustomerPart:
    """One customer's share of the book.

    Its past invoices stay encoded (`archived`, issue order, before `invoices`; billing.archive):
    a run or a command that does not read them neither decodes nor encodes them again, so a
    part's cost does not grow with its history. Pickling a part archives its decoded invoices as
    one more entry."""

    account: Account
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    coupons: dict[int, Coupon] = field(default_factory=dict)
    invoices: dict[str, Invoice] = field(default_factory=dict)  # in issue order
    credit_notes: dict[str, CreditNote] = field(default_factory=dict)  # in issue order
    archived: list[Archived] = field(default_factory=list)  # issued before `invoices`

    def dumps(self) -> bytes:
        """The part in format 2 (`PART_FORMAT` then a protocol-3 pickle whose classes and field
        names are references into `SHARED`; see `_Shared`)."""
        buffer = io.BytesIO()
        buffer.write(PART_FORMAT)
        pickler = pickle.Pickler(buffer, protocol=3)
        pickler.memo = _shared().pickler_memo
        pickler.dump(self)
        return buffer.getvalue()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.invoices:
            entry = (tuple(self.invoices), encode_invoices(self.invoices.values()))
            state["archived"] = [*self.archived, entry]
            state["invoices"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("archived", [])  # a part saved before invoices were archived
        self.__dict__.update((sys.intern(name), value) for name, value in state.items())  # as in Account

    def invoice_numbers(self) -> list[str]:
        """Every invoice of the customer, archived or not, in issue order."""
        return [number for numbers, _ in self.archived for number in numbers] + list(self.invoices)

    @staticmethod
    def loads(data: bytes) -> CustomerPart:
        """A part from `dumps`, or a plain pickle of one (the format before 2)."""
        if data[:len(PART_FORMAT)] == PART_FORMAT:
            # a buffered reader: the unpickler peeks ahead in it instead of calling read per opcode
            unpickler = _PartUnpickler(io.BufferedReader(io.BytesIO(memoryview(data)[len(PART_FORMAT):])))
            unpickler.memo = _shared().unpickler_memo
        else:
            unpickler = _PartUnpickler(io.BytesIO(data))
        part = unpickler.load()
        if not isinstance(part, CustomerPart):
            raise TypeError("not a customer part")
        return part


class _PartUnpickler(pickle.Unpickler):  # our own snapshots from our own database
    """Looks each class a part names up once per process, not once per part: `find_class`
    imports the module and walks the name every time (about 7 % of decoding a part)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CLASSES[module, name]
        except KeyError:
            if module == _NAME:
                found = sys.intern(name)
            elif module == _VALUE:
                found = _VALUES[name]
            else:
                found = super().find_class(module, name)
            _CLASSES[module, name] = found
            return found


_CLASSES: dict[tuple[str, str], Any] = {}

PART_FORMAT = b"part2:"
"""The prefix of a part in format 2; a part without it is a plain pickle (format 1)."""

SHARED: tuple[tuple[str, str], ...] = (
    # classes and functions: (module, name)
    ("billing.shards", "CustomerPart"), ("billing.book", "Account"), ("billing.book", "PendingLine"),
    ("billing.subscription", "Subscription"), ("billing.subscription", "Items"),
    ("billing.subscription", "LicensedPeriod"), ("billing.subscription", "UsagePeriod"),
    ("billing.subscription", "Scheduled"), ("billing.periods", "Grid"), ("billing.periods", "Period"),
    ("billing.discounts", "Coupon"), ("billing.records", "_restore_record"), ("billing.records", "InvoiceLine"),
    ("billing.records", "CreditNote"), ("billing.records", "CreditNoteLine"), ("decimal", "Decimal"),
    ("fractions", "Fraction"), ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timezone"),
    ("datetime", "timedelta"),
    # values
    ("=", "utc"),
    # attribute names of the classes above
    *(("@", name) for name in (
        "account", "subscriptions", "coupons", "invoices", "credit_notes", "archived", "id", "order", "currency",
        "tax_rate", "tz", "tags", "locale", "name", "created_at", "credit", "mrr", "had_mrr", "pending", "legs",
        "movement_tags", "line_tags", "next_invoice", "line", "coverage_start", "customer", "billing_day",
        "status", "items", "trial_end", "grid", "current", "stage", "unbilled", "usage_open", "started_at",
        "usage_unbilled", "usage_mrr", "scheduled", "cancel_at_period_end", "cancel_index", "ended_at",
        "active_coupons", "plan", "quantity", "addons", "period", "start", "end", "full_end", "cause", "index",
        "addon", "addon_quantity", "interval", "count", "anchor", "origin", "full_start", "subscription",
        "percent", "amount", "duration", "at", "windows", "used", "lasts_until")),
)
"""What every part in format 2 names by its position here instead of spelling it out: a class by
module and name, a value (module `=`), an attribute name (module `@`). Append only: a stored
part refers to these by position."""

_NAME, _VALUE = "@", "="
_VALUES: dict[str, Any] = {"utc": UTC}


@dataclass(frozen=True)
class _Shared:
    """`SHARED` as the first entries of a pickler's and an unpickler's memo, copied into each
    part's (pickle's memo holds what an object already written is, so each of these is written
    as a 2-byte reference). A plain pickle spells out each class a part holds (module and name,
    looked up again by the pickler: about a third of pickling a part) and each attribute name.
    Protocol 3 puts each memo entry at an explicit index; protocol 4's implicit one would start
    over at 0 in an unpickler whose memo was copied in."""

    objects: list[Any]  # kept alive: the pickler's memo is keyed by their ids
    pickler_memo: Any
    unpickler_memo: Any


@cache
def _shared() -> _Shared:
    template = bytearray(b"\x80\x03")  # each entry: GLOBAL module name, LONG_BINPUT index, POP
    for index, (module, name) in enumerate(SHARED):
        template += b"c%s\n%s\n" % (module.encode(), name.encode()) + b"r" + index.to_bytes(4, "little") + b"0"
    template += b"N."
    unpickler = _PartUnpickler(io.BytesIO(bytes(template)))
    unpickler.load()
    memo = unpickler.memo.copy()
    objects = [memo[index] for index in range(len(SHARED))]
    pickler = pickle.Pickler(io.BytesIO(), protocol=3)
    pickler.memo = {id(obj): (index, obj) for index, obj in enumerate(objects)}
    return _Shared(objects, pickler.memo, unpickler.memo)


@dataclass(frozen=True)
class Due:
    """When a customer next needs the clock (`transition_at`) or a run (`due_at`)."""

    transition_at: datetime | None
    due_at: datetime | None


def counters_of(book: Book) -> Counters:
    return Counters(invoice=book.next_invoice, credit_note=book.next_credit_note, movement=book.next_movement,
                    change=book.next_change, coupon=book.next_coupon, customer=book.next_customer_order,
                    subscription=book.next_subscription_order)


def assemble(book: Book, parts: list[CustomerPart], counters: Counters, clock: datetime | None) -> Book:
    """Fill an empty book (settings and catalog only) with these customers' parts, the shared
    counters and the clock; the parts are taken over, not copied."""
    for part in sorted(parts, key=lambda p: p.account.order):
        book.accounts[part.account.id] = part.account
        book.subscriptions.update(part.subscriptions)
        book.coupons.update(part.coupons)
        book.archive_invoices(part.account.id, part.archived)
        book.invoices.update(part.invoices)
        book.invoice_order.extend(part.invoices)
        book.credit_notes.update(part.credit_notes)
    book.next_invoice = counters.invoice
    book.next_credit_note = counters.credit_note
    book.next_movement = counters.movement
    book.next_change = counters.change
    book.next_coupon = counters.coupon
    book.next_customer_order = counters.customer
    book.next_subscription_order = counters.subscription
    book.clock = clock
    book._queue_all()
    return book


def split(book: Book) -> dict[str, CustomerPart]:
    """The book's customers' parts (sharing the book's objects)."""
    parts = {customer: CustomerPart(account, archived=list(book.archived_invoices(customer)))
             for customer, account in book.accounts.items()}
    for sub in book.subscriptions.values():
        parts[sub.customer].subscriptions[sub.id] = sub
    for coupon in book.coupons.values():
        parts[coupon.customer].coupons[coupon.id] = coupon
    for number in book.invoice_order:
        if book.is_archived(number):
            continue
        invoice = book.invoices[number]
        parts[invoice.customer].invoices[number] = invoice
    for number, note in book.credit_notes.items():
        parts[note.customer].credit_notes[number] = note
    return parts


def due_of(book: Book, customer: str) -> Due:
    transition = book.next_transition_at(customer)
    billable = book.billable_at(customer)
    found = [t for t in (transition, billable) if t is not None]
    return Due(transition, min(found, default=None))


def empty_book(settings: Settings, catalog: Catalog) -> Book:
    return Book(settings, catalog)


def customers_of(event: Event, *, subscription_owner: Callable[[str], str | None],
                 invoice_owner: Callable[[str], str | None]) -> set[str]:
    """The customers an event names (directly, or through its subscription or invoice); the
    customers with a transition due by its time come on top of these (see the module)."""
    found: set[str] = set()
    customer = getattr(event, "customer", None)
    if isinstance(customer, str):
        found.add(customer)
    subscription = getattr(event, "subscription", None)
    if isinstance(subscription, str) and (owner := subscription_owner(subscription)) is not None:
        found.add(owner)
    invoice = getattr(event, "invoice", None)
    if isinstance(invoice, str) and (owner := invoice_owner(invoice)) is not None:
        found.add(owner)
    return found


PROVISIONAL = 10**12
"""Where a batch computed before it holds the sequences numbers from (far above any real number)."""


def provisional(counters: Counters) -> Counters:
    """Counters for computing a run batch before taking the real numbers: invoices, movements and
    changes start at PROVISIONAL (a run issues no credit note and creates no coupon or customer)."""
    return Counters(invoice=PROVISIONAL, credit_note=counters.credit_note, movement=PROVISIONAL, change=PROVISIONAL,
                    coupon=counters.coupon, customer=counters.customer, subscription=counters.subscription)


def renumber(book: Book, outcome: Outcome, real: Counters, base: Counters | None = None) -> Outcome:
    """Give what a batch computed from `base` counters (default `provisional`: numbers from
    PROVISIONAL) the numbers the sequences hold now (taken at finalization): its invoices,
    movements and change ids, wherever they appear — the outcome, the invoices and links in the
    book, the customers' link tags and pending lines. The book's counters become the real ones.
    Every number the batch's customers held before it is below `base`, so a number at or above
    it is the batch's own."""

    numbering = book.settings.invoice_numbering
    first = base or Counters(invoice=PROVISIONAL, movement=PROVISIONAL, change=PROVISIONAL)

    def invoice_no(number: str) -> str:
        digits = number[len(numbering.prefix):]
        if number.startswith(numbering.prefix) and digits.isdigit() and int(digits) >= first.invoice:
            return numbering.invoice(int(digits) - first.invoice + real.invoice, "")
        return number

    def movement_id(value: int) -> int:
        return value - first.movement + real.movement if value >= first.movement else value

    def tag(t: Tag) -> Tag:
        if t[0] == "chg" and t[1].isdigit() and int(t[1]) >= first.change:
            return ("chg", str(int(t[1]) - first.change + real.change), *t[2:])
        return t

    def ref(r: LineRef) -> LineRef:
        number = invoice_no(r.invoice)
        return r if number == r.invoice else LineRef(invoice=number, line=r.line)

    issued = [i.model_copy(update={"number": invoice_no(i.number)}) for i in outcome.issued]
    renamed = {old.number: new for old, new in zip(outcome.issued, issued, strict=True)}
    if renamed:
        book.invoices = {renamed[n].number if n in renamed else n: renamed.get(n, inv)
                         for n, inv in book.invoices.items()}
        book.invoice_order = [renamed[n].number if n in renamed else n for n in book.invoice_order]
    for acct in book.accounts.values():
        acct.movement_tags = {tag(t): [movement_id(m) for m in ids] for t, ids in acct.movement_tags.items()}
        acct.line_tags = {tag(t): [(invoice_no(n), i) for n, i in ats] for t, ats in acct.line_tags.items()}
        for pending in acct.pending:
            pending.tags = [tag(t) for t in pending.tags]
    movements = [m.model_copy(update={"id": movement_id(m.id)}) for m in outcome.movements]
    book.next_invoice = book.next_invoice - first.invoice + real.invoice
    book.next_movement = book.next_movement - first.movement + real.movement
    book.next_change = book.next_change - first.change + real.change
    return Outcome(issued=issued, status_changes=list(outcome.status_changes), credit_notes=list(outcome.credit_notes),
                   movements=movements, links=[(movement_id(m), ref(r)) for m, r in outcome.links])
