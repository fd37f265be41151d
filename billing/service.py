"""Application services: one function per verb, each one database transaction.

Every command follows the same steps inside a single unit of work: load the book's snapshot,
apply the event to the pure core (`billing.book.Book`), save the new snapshot with a version
check, append what the event produced (invoices and lines, invoice status changes, credit notes and
their lines, MRR movements and their invoice-line links, the command itself), refresh the
customers/subscriptions view and commit. Any error — bad input, a rule the book refuses, a
concurrent writer — rolls the whole transaction back, so the database is exactly as it was.

- A command with an `idempotency_key` already recorded returns the recorded result and writes
  nothing (the same key with a different command is an error).
- Two commands racing on one book cannot both win: the loser's save raises
  `ConcurrentModification` (nothing of it is written) and may simply be retried.
- Reads return `billing.records` models rebuilt from the database, never from the snapshot.

Engines are created by the caller (`billing.persistence.create_engine`); nothing happens at import.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from billing.book import Book, BookError, Outcome
from billing.catalog import Catalog
from billing.expect import Report
from billing.expect import check as check_expect
from billing.money import RoundingMode, round_money
from billing.persistence import (
    ConcurrentModification,
    CustomerBalances,
    CustomerView,
    Engine,
    PartWrite,
    StoredBook,
    StoredCommand,
    SubscriptionState,
    SubscriptionView,
    UnitOfWork,
    create_engine,
    current_revision,
    display_url,
    head_revision,
    upgrade,
    utc_now,
)
from billing.persistence.audit_log import record_action
from billing.records import CreditNote, Invoice, InvoiceStatus, MrrMovement, reversing_entry
from billing.replay import ReplayResult, metrics_for
from billing.retry import retrying
from billing.scenario import (
    EVENT_ADAPTER,
    AddAddonEvent,
    CancelEvent,
    ChangePlanEvent,
    ChangeQuantityEvent,
    CreditNoteEvent,
    CustomerEvent,
    DiscountEvent,
    Event,
    InvoiceRunEvent,
    PayEvent,
    ReactivateEvent,
    RemoveAddonEvent,
    Scenario,
    ScenarioError,
    Settings,
    SubscribeEvent,
    UsageEvent,
    VoidEvent,
    describe_validation_error,
    parse_instant,
)
from billing.shards import Counters, CustomerPart, assemble, counters_of, customers_of, due_of, split

__all__ = [
    "Applied",
    "BookError",
    "ConcurrentModification",
    "NotFound",
    "Outcome",
    "ProgressCallback",
    "ReplayResult",
    "ServiceError",
    "add_addon",
    "add_discount",
    "apply_event",
    "apply_events",
    "book_config",
    "cancel",
    "change_plan",
    "change_quantity",
    "check_schema",
    "create_customer",
    "execute",
    "issue_credit_note",
    "get_customer",
    "get_invoice",
    "init_database",
    "list_credit_notes",
    "list_customers",
    "list_invoices",
    "list_movements",
    "list_subscriptions",
    "load_catalog",
    "pay",
    "reactivate",
    "record_usage",
    "remove_addon",
    "replay",
    "reverse_movement",
    "run_invoices",
    "subscribe",
    "void",
]

Clock = Callable[[], datetime]
ProgressCallback = Callable[[int, int], None]
"""Called as `(done, total)` while an invoice run's invoices are written."""

AtLike = datetime | date | str | None
_INVOICE_CHUNK = 200


class ServiceError(ValueError):
    """A request refused before the book sees it: no catalog loaded, a reused idempotency key,
    a database that is not initialised or not empty."""


class NotFound(ServiceError):
    """The invoice, customer or subscription asked for does not exist."""


@dataclass(frozen=True)
class Applied:
    """The result of one command: what it produced, its command id, and whether it was a retry
    of an already recorded idempotency key (then nothing was written)."""

    outcome: Outcome
    command_id: int
    duplicate: bool = False


# --- schema and catalog -----------------------------------------------------------------------


def init_database(url: str | None = None) -> str | None:
    """Create or migrate the schema at `url` (default: `BILLING_DATABASE_URL` or the SQLite
    file) to the newest revision; return that revision."""
    engine = create_engine(url)
    try:
        upgrade(engine)
        return current_revision(engine)
    finally:
        engine.dispose()


def check_schema(engine: Engine) -> None:
    """Raise ServiceError unless the database is migrated to the newest revision."""
    revision = current_revision(engine)
    head = head_revision()
    if revision is None:
        raise ServiceError(f"{display_url(engine.url)} has no billing schema; run `billing init` first")
    if revision != head:
        raise ServiceError(
            f"{display_url(engine.url)} is at schema revision {revision}, this version needs {head}; "
            "run `billing init` to migrate"
        )


LoadResult = Literal["created", "replaced", "extended", "unchanged"]


def load_catalog(
    engine: Engine, catalog: Catalog, settings: Settings | None = None, *, clock: Clock = utc_now,
    actor: str = "library",
) -> LoadResult:
    """Install the catalog (and settings) the book prices with.

    An empty database gets a new book ("created"). Before any command has been applied both may
    be replaced ("replaced"). Afterwards the catalog may only grow: every existing plan, add-on
    and metric must be kept unchanged ("extended"), and the settings cannot change — history
    already billed must never be re-priced. Loading what is already there is "unchanged".
    A load that changes something is written to the audit log with `actor` and the time.
    """
    with UnitOfWork(engine, clock=clock) as uow:
        stored = uow.book.load()
        now = uow.now()
        if stored is None:
            new_settings = settings if settings is not None else Settings()
            uow.book.create(new_settings, catalog, Book(new_settings, catalog).dumps(), now=now)
            _audit_catalog(uow, "created", catalog, actor, now)
            uow.commit()
            return "created"
        settings_same = settings is None or settings == stored.settings
        if catalog == stored.catalog and settings_same:
            return "unchanged"
        commands = uow.commands.count()
        if commands == 0:
            new_settings = settings if settings is not None else stored.settings
            uow.book.save(
                Book(new_settings, catalog).dumps(),
                expected_version=stored.version,
                now=now,
                settings=new_settings,
                catalog=catalog,
            )
            _audit_catalog(uow, "replaced", catalog, actor, now)
            uow.commit()
            return "replaced"
        if not settings_same:
            raise ServiceError(
                f"the book already holds {commands} command(s); its settings can no longer change"
            )
        _check_additive(stored.catalog, catalog)
        # the customers' parts hold no catalog: the book prices with the one stored here
        uow.book.save(stored.snapshot, expected_version=stored.version, now=now, catalog=catalog)
        _audit_catalog(uow, "extended", catalog, actor, now)
        uow.commit()
        return "extended"


def _audit_catalog(uow: UnitOfWork, result: str, catalog: Catalog, actor: str, now: datetime) -> None:
    record_action(uow.session, action="catalog_load", actor=actor, at=now,
                  detail={"result": result, "plans": [p.code for p in catalog.plans],
                          "addons": [a.code for a in catalog.addons], "metrics": [m.code for m in catalog.metrics]})


def _check_additive(old: Catalog, new: Catalog) -> None:
    for kind, before, after in (
        ("plan", old.plans, new.plans),
        ("addon", old.addons, new.addons),
        ("metric", old.metrics, new.metrics),
    ):
        by_code = {item.code: item for item in after}
        for item in before:
            if item.code not in by_code:
                raise ServiceError(f"catalog: {kind} {item.code!r} is in use by the book and cannot be removed")
            if by_code[item.code] != item:
                raise ServiceError(
                    f"catalog: {kind} {item.code!r} is in use by the book and cannot change; "
                    "add a new code instead"
                )


# --- commands ---------------------------------------------------------------------------------


def execute(
    engine: Engine,
    event: Event | Mapping[str, Any],
    *,
    actor: str,
    idempotency_key: str | None = None,
    index: int | None = None,
    clock: Clock = utc_now,
    progress: ProgressCallback | None = None,
) -> Applied:
    """Apply one event in one transaction and say what happened (see `Applied`). A command that
    loses a race to another writer runs again on fresh state (billing.retry)."""
    ev = _as_event(event)
    if isinstance(ev, InvoiceRunEvent):
        from billing.runs import run_invoices_event

        return run_invoices_event(engine, ev, actor=actor, idempotency_key=idempotency_key, index=index,
                                  clock=clock, progress=progress)
    payload = ev.model_dump(mode="json", by_alias=True)
    return retrying(lambda: _execute_once(engine, ev, payload, actor=actor, idempotency_key=idempotency_key,
                                          index=index, clock=clock, progress=progress))


def _execute_once(engine: Engine, ev: Event, payload: dict[str, Any], *, actor: str, idempotency_key: str | None,
                  index: int | None, clock: Clock, progress: ProgressCallback | None) -> Applied:
    """One attempt: one transaction that commits whole or writes nothing (a lost race is retried
    by `execute`, billing.retry)."""
    with UnitOfWork(engine, clock=clock) as uow:
        if idempotency_key is not None:
            previous = uow.commands.by_key(idempotency_key)
            if previous is not None:
                if previous.payload != payload:
                    raise ServiceError(
                        f"idempotency key {idempotency_key!r} was already used for a different "
                        f"{previous.type} command (#{previous.id})"
                    )
                return Applied(_recorded_outcome(uow, previous), previous.id, duplicate=True)
        stored = _require_book(uow)
        book, loaded, sequences = load_parts(uow, stored, ev)
        book.use_usage_source(uow.usage)
        before = _view_of(book)
        outcome = book.apply(ev, index, discard_on_error=True)
        now = uow.now()
        save_parts(uow, book, loaded, sequences)
        command_id = uow.commands.add(
            recorded_at=now,
            at=ev.at,
            type=ev.type,
            payload=payload,
            actor=actor,
            idempotency_key=idempotency_key,
            event_index=index,
        )
        total = len(outcome.issued)
        for start in range(0, total, _INVOICE_CHUNK):
            uow.ledger.add_invoices(outcome.issued[start : start + _INVOICE_CHUNK], command_id)
            if progress is not None:
                progress(min(start + _INVOICE_CHUNK, total), total)
        for number, status in outcome.status_changes:
            uow.ledger.set_status(number, status)
        uow.ledger.add_credit_notes(outcome.credit_notes, command_id)
        uow.ledger.add_movements(outcome.movements, command_id, command_key=idempotency_key)
        own_links = [(m.id, ref) for m in outcome.movements for ref in m.invoice_lines]
        uow.ledger.add_links([*own_links, *outcome.links], command_id,
                             new_movements={m.id for m in outcome.movements},
                             new_invoices={i.number for i in outcome.issued})
        _refresh_view(uow, before, _view_of(book), at=ev.at, now=now)
        uow.commit()
    return Applied(outcome, command_id)


def load_parts(uow: UnitOfWork, stored: StoredBook, ev: Event, customers: Sequence[str] | None = None,
               *, lock: bool = True) -> tuple[Book, dict[str, int], dict[str, int]]:
    """A book of the customers `ev` names (or exactly `customers`) and of every customer with a
    transition due by its time (billing.shards); also the versions loaded and the counters as
    they were.

    Locks, in one order for every writer so that none waits for another in a cycle: on
    PostgreSQL first the loaded customers' `customer_books` rows (`FOR UPDATE`, in key order:
    a run batch holds its customers for its whole transaction, and a command on one of them
    waits until the batch commits, then reads what it wrote), then the shared counters; on
    SQLite the counters, whose write lock serialises every writer. `lock` false leaves the
    counters unlocked (a run batch on PostgreSQL computes first and takes them at the end)."""
    postgres = uow.parts.postgres
    sequences = uow.parts.lock_sequences(Counters.names()) if lock and not postgres else {}
    if customers is None:
        named = customers_of(ev, subscription_owner=lambda s: uow.parts.subscription_owners([s]).get(s),
                             invoice_owner=uow.parts.invoice_owner)
        if postgres:
            stored_parts = uow.parts.load({*named, *uow.parts.transitions_by(ev.at)}, lock=True)
        else:
            stored_parts = uow.parts.load(named, transition_by=ev.at)
    else:
        stored_parts = uow.parts.load(customers, lock=postgres)
    if postgres or not lock:
        sequences = uow.parts.lock_sequences(Counters.names()) if lock else uow.parts.sequences()
    if postgres and customers is None and lock:
        loaded = {p.customer for p in stored_parts}
        if any(c not in loaded for c in uow.parts.transitions_by(ev.at)):
            raise ConcurrentModification("a customer's transition came due while the command loaded; retry")
    counters = Counters.of(sequences)
    book = assemble(Book(stored.settings, stored.catalog), [CustomerPart.loads(p.snapshot) for p in stored_parts],
                    counters, uow.parts.clock())
    return book, {p.customer: p.version for p in stored_parts}, sequences


def whole_book(uow: UnitOfWork, stored: StoredBook) -> Book:
    """Every customer's part in one book, for reading (nothing locked, nothing saved)."""
    counters = Counters.of(uow.parts.sequences())
    parts = [CustomerPart.loads(p.snapshot) for p in uow.parts.load_all()]
    return assemble(Book(stored.settings, stored.catalog), parts, counters, uow.parts.clock())


def save_parts(uow: UnitOfWork, book: Book, loaded: Mapping[str, int], sequences: dict[str, int]) -> None:
    """Write back every customer part of `book` (version-checked), the counters and the clock."""
    write_parts(uow, book, loaded)
    save_counters(uow, book, sequences)


def write_parts(uow: UnitOfWork, book: Book, loaded: Mapping[str, int]) -> None:
    """Write back every customer part of `book`, each checked against the version loaded."""
    writes = []
    for customer, part in split(book).items():
        due = due_of(book, customer)
        writes.append(PartWrite(customer, part.account.order, part.dumps(), loaded.get(customer),
                                due.transition_at, due.due_at))
    uow.parts.save(writes)


def save_counters(uow: UnitOfWork, book: Book, sequences: dict[str, int]) -> None:
    """The shared counters as `book` left them (from `sequences`, as locked) and the clock."""
    uow.parts.save_sequences(sequences, vars(counters_of(book)))
    uow.parts.set_clock(book.clock)


def apply_event(
    engine: Engine,
    event: Event | Mapping[str, Any],
    *,
    actor: str,
    idempotency_key: str | None = None,
    index: int | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """Apply one event (a command model or its JSON-like mapping) in one transaction.

    `index` names the event in error messages (`events[3] (...)`) and on its movements. A
    repeated `idempotency_key` returns the recorded outcome without changing anything.
    """
    return execute(engine, event, actor=actor, idempotency_key=idempotency_key, index=index,
                   clock=clock).outcome


def apply_events(
    engine: Engine,
    events: Iterable[Event | Mapping[str, Any]],
    *,
    actor: str,
    start_index: int = 0,
    idempotency_prefix: str | None = None,
    clock: Clock = utc_now,
) -> list[Outcome]:
    """Apply events in order, each in its own transaction; stop at the first error (the events
    before it stay applied). With `idempotency_prefix`, event i gets the key `prefix:i`, so
    re-running the same batch applies only what is missing."""
    outcomes: list[Outcome] = []
    for offset, event in enumerate(events):
        index = start_index + offset
        key = None if idempotency_prefix is None else f"{idempotency_prefix}:{index}"
        outcomes.append(
            apply_event(engine, event, actor=actor, idempotency_key=key, index=index, clock=clock)
        )
    return outcomes


def run_invoices(
    engine: Engine,
    as_of: AtLike,
    *,
    actor: str,
    idempotency_key: str | None = None,
    progress: ProgressCallback | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """Bill everything due at `as_of` (an instant, or a date meaning midnight UTC; default now).
    Running again at the same time issues nothing new."""
    event = _build("invoice_run", clock, at=as_of)
    return execute(engine, event, actor=actor, idempotency_key=idempotency_key, clock=clock,
                   progress=progress).outcome


# --- convenience verbs: keyword arguments in, validated command models -------------------------


def create_customer(
    engine: Engine,
    *,
    customer: str,
    currency: str,
    actor: str,
    tax_rate: Decimal | str | None = None,
    timezone: str | None = None,
    locale: str | None = None,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "customer", actor, idempotency_key, clock, at=at, customer=customer,
                 currency=currency, tax_rate=tax_rate, timezone=timezone, locale=locale, name=name,
                 tags=None if tags is None else dict(tags))


def subscribe(
    engine: Engine,
    *,
    customer: str,
    subscription: str,
    plan: str,
    actor: str,
    quantity: int | None = None,
    addons: Mapping[str, int] | None = None,
    billing_day: int | None = None,
    trial_days: int | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """Start a subscription; `addons` maps add-on codes to quantities."""
    addon_list = None if addons is None else [{"addon": c, "quantity": q} for c, q in addons.items()]
    return _verb(engine, "subscribe", actor, idempotency_key, clock, at=at, customer=customer,
                 subscription=subscription, plan=plan, quantity=quantity, addons=addon_list,
                 billing_day=billing_day, trial_days=trial_days)


def change_quantity(
    engine: Engine,
    *,
    subscription: str,
    quantity: int,
    actor: str,
    effective: str | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "change_quantity", actor, idempotency_key, clock, at=at,
                 subscription=subscription, quantity=quantity, effective=effective)


def change_plan(
    engine: Engine,
    *,
    subscription: str,
    plan: str,
    actor: str,
    quantity: int | None = None,
    effective: str | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "change_plan", actor, idempotency_key, clock, at=at,
                 subscription=subscription, plan=plan, quantity=quantity, effective=effective)


def add_addon(
    engine: Engine,
    *,
    subscription: str,
    addon: str,
    actor: str,
    quantity: int | None = None,
    effective: str | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "add_addon", actor, idempotency_key, clock, at=at,
                 subscription=subscription, addon=addon, quantity=quantity, effective=effective)


def remove_addon(
    engine: Engine,
    *,
    subscription: str,
    addon: str,
    actor: str,
    effective: str | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "remove_addon", actor, idempotency_key, clock, at=at,
                 subscription=subscription, addon=addon, effective=effective)


def add_discount(
    engine: Engine,
    *,
    actor: str,
    customer: str | None = None,
    subscription: str | None = None,
    percent: Decimal | str | None = None,
    amount: Decimal | str | None = None,
    duration: str | Mapping[str, int] | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """A coupon on a customer or one subscription: `percent` or `amount`, for `duration`
    "forever" (default), "once" or {"periods": N}."""
    return _verb(engine, "discount", actor, idempotency_key, clock, at=at, customer=customer,
                 subscription=subscription, percent=percent, amount=amount,
                 duration=None if duration is None or isinstance(duration, str) else dict(duration))


def cancel(
    engine: Engine,
    *,
    subscription: str,
    actor: str,
    effective: str | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """End a subscription at its period end (default) or "immediately"."""
    return _verb(engine, "cancel", actor, idempotency_key, clock, at=at, subscription=subscription,
                 effective=effective)


def reactivate(
    engine: Engine,
    *,
    subscription: str,
    actor: str,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "reactivate", actor, idempotency_key, clock, at=at, subscription=subscription)


def record_usage(
    engine: Engine,
    *,
    subscription: str,
    metric: str,
    value: Decimal | int | str,
    id: str,
    actor: str,
    properties: Mapping[str, Any] | None = None,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    """One usage event; a repeated `id` for the subscription is ignored by the book."""
    return _verb(engine, "usage", actor, idempotency_key, clock, at=at, subscription=subscription,
                 metric=metric, value=value, id=id,
                 properties=None if properties is None else dict(properties))


def pay(
    engine: Engine,
    *,
    invoice: str,
    actor: str,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "pay", actor, idempotency_key, clock, at=at, invoice=invoice)


def void(
    engine: Engine,
    *,
    invoice: str,
    actor: str,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> Outcome:
    return _verb(engine, "void", actor, idempotency_key, clock, at=at, invoice=invoice)


CreditLineSpec = int | tuple[int, Decimal | str | None] | Mapping[str, Any]
"""One line to credit: an invoice line index (all that is left of it), `(index, amount)`, or
`{"line": index, "amount": "10.00"}`; an amount of None means all that is left."""


def issue_credit_note(
    engine: Engine,
    *,
    invoice: str,
    lines: Sequence[CreditLineSpec],
    reason: str,
    actor: str,
    at: AtLike = None,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> CreditNote:
    """Issue a credit note against a finalized or paid invoice and return it.

    `reason` is one of duplicate, product_unsatisfactory, order_change, other. Amounts are before
    tax; the note's tax is its subtotal at the customer's rate and its total goes to the
    customer's credit balance, applied by later invoices. The invoice itself does not change.
    """
    requested: list[dict[str, Any]] = []
    for i, spec in enumerate(lines):
        if isinstance(spec, Mapping):
            item = dict(spec)
        elif isinstance(spec, tuple) and len(spec) == 2:
            item = {"line": spec[0], "amount": spec[1]}
        elif isinstance(spec, int) and not isinstance(spec, bool):
            item = {"line": spec}
        else:
            raise ScenarioError(f"credit_note: lines[{i}]: give a line index, (index, amount) or "
                                "{\"line\": index, \"amount\": \"10.00\"}")
        if item.get("amount") is None:
            item.pop("amount", None)
        elif isinstance(item["amount"], Decimal):
            item["amount"] = str(item["amount"])
        requested.append(item)
    event = _build("credit_note", clock, at=at, invoice=invoice, lines=requested, reason=reason)
    outcome = execute(engine, event, actor=actor, idempotency_key=idempotency_key, clock=clock).outcome
    [note] = outcome.credit_notes
    return note


# --- ledger corrections -----------------------------------------------------------------------


def reverse_movement(
    engine: Engine,
    movement_id: int,
    *,
    actor: str,
    reason: str,
    idempotency_key: str | None = None,
    clock: Clock = utc_now,
) -> MrrMovement:
    """Correct the expansion ledger: append a reversing entry for movement `movement_id` and
    return it.

    The ledger is insert-only (the database refuses UPDATE and DELETE), so a wrong entry is never
    edited: its reversal has the same type and subtype, negated deltas and legs, `mrr_before` and
    `mrr_after` swapped, the same `at` (so the pair nets to zero in the period it belongs to) and
    `reverses` = the original's id. An entry is reversed at most once and a reversal is never
    reversed. The book's own state is not changed: this corrects what the ledger reports. The
    command (with `reason` and `actor`) is recorded like any other; a retried call with the same
    `idempotency_key` returns the first reversal.
    """
    if not reason.strip():
        raise ScenarioError("reason: say why the movement is reversed")
    payload = {"type": "reverse_movement", "movement": movement_id, "reason": reason}
    with UnitOfWork(engine, clock=clock) as uow:
        if idempotency_key is not None:
            previous = uow.commands.by_key(idempotency_key)
            if previous is not None:
                if previous.payload != payload:
                    raise ServiceError(
                        f"idempotency key {idempotency_key!r} was already used for a different "
                        f"{previous.type} command (#{previous.id})"
                    )
                [entry] = uow.ledger.movements(command_id=previous.id)
                return entry
        _require_book(uow)
        original = uow.ledger.movement_row(movement_id)
        if original is None:
            raise NotFound(f"movement {movement_id} not found")
        if original.entry == "reversal":
            raise ServiceError(f"movement {movement_id} is a reversal of movement {original.reverses}; "
                               "reversals are not reversed")
        existing = uow.ledger.reversal_of(movement_id)
        if existing is not None:
            raise ServiceError(f"movement {movement_id} is already reversed by movement {existing}")
        lowest = uow.ledger.lowest_mrr_from(original.customer, original.at)
        if lowest is not None and lowest - original.delta < 0:
            raise ServiceError(f"reversing movement {movement_id} would take {original.customer}'s MRR below zero "
                               "in the ledger; reverse the later entries that build on it first")
        sequences = uow.parts.lock_sequences(Counters.names())
        movement_id = sequences.get("movement", 1)
        entry = reversing_entry(original, movement_id)
        now = uow.now()
        uow.parts.save_sequences(sequences, {**sequences, "movement": movement_id + 1})
        command_id = uow.commands.add(recorded_at=now, at=original.at, type="reverse_movement", payload=payload,
                                      actor=actor, idempotency_key=idempotency_key, event_index=None)
        uow.ledger.add_movements([entry], command_id, command_key=idempotency_key)
        uow.commit()
    return entry


# --- reads ------------------------------------------------------------------------------------


def list_invoices(engine: Engine, *, customer: str | None = None, status: str | None = None) -> list[Invoice]:
    """Invoices in the order issued, with their lines, optionally filtered."""
    with UnitOfWork(engine) as uow:
        return uow.ledger.invoices(customer=customer, status=status)


def get_invoice(engine: Engine, number: str) -> Invoice:
    with UnitOfWork(engine) as uow:
        invoice = uow.ledger.invoice(number)
    if invoice is None:
        raise NotFound(f"invoice {number!r} not found")
    return invoice


def list_credit_notes(
    engine: Engine, *, invoice: str | None = None, customer: str | None = None
) -> list[CreditNote]:
    """Credit notes in the order issued, with their lines, optionally filtered."""
    with UnitOfWork(engine) as uow:
        return uow.ledger.credit_notes(invoice=invoice, customer=customer)


def list_movements(engine: Engine, *, customer: str | None = None) -> list[MrrMovement]:
    """MRR movements in application order, each with the invoice lines that billed it."""
    with UnitOfWork(engine) as uow:
        return uow.ledger.movements(customer=customer)


def book_config(engine: Engine) -> tuple[Settings, Catalog] | None:
    """The settings and catalog of the book in the database; None before a catalog is loaded."""
    with UnitOfWork(engine) as uow:
        stored = uow.book.load()
    return None if stored is None else (stored.settings, stored.catalog)


def get_customer(engine: Engine, customer: str) -> CustomerView:
    with UnitOfWork(engine) as uow:
        found = uow.view.customer(customer)
    if found is None:
        raise NotFound(f"customer {customer!r} not found")
    return found


def list_customers(engine: Engine) -> list[CustomerView]:
    with UnitOfWork(engine) as uow:
        return uow.view.customers()


def list_subscriptions(engine: Engine, *, customer: str | None = None) -> list[SubscriptionView]:
    with UnitOfWork(engine) as uow:
        return uow.view.subscriptions(customer=customer)


# --- replay -----------------------------------------------------------------------------------


def replay(scenario: Scenario, url: str | None = None, *, clock: Clock = utc_now) -> ReplayResult:
    """Replay a scenario through the database and read the result back from it.

    Without `url` the database is a temporary SQLite file, removed afterwards. With `url` the
    database is migrated and kept for inspection; it must not already hold a book. Every event
    goes through `apply_event` with its position as index, so errors name `events[i]`.
    """
    if url is not None:
        return _replay_into(scenario, url, durable=True, clock=clock)
    with tempfile.TemporaryDirectory(prefix="billing-replay-") as tmp:
        path = Path(tmp) / "replay.sqlite"
        return _replay_into(scenario, f"sqlite:///{path}", durable=False, clock=clock)


def replay_and_check(scenario: Scenario, url: str | None = None, *,
                     clock: Clock = utc_now) -> tuple[ReplayResult, dict[str, Any], Report]:
    """`billing replay --check`: replay through the database, shape the JSON output, and compare
    it with the scenario's `expect` block (billing.expect)."""
    result = replay(scenario, url, clock=clock)
    output = json.loads(json.dumps(result.to_json(), default=str))
    return result, output, check_expect(scenario.expect or {}, output)


def _replay_into(scenario: Scenario, url: str, *, durable: bool, clock: Clock) -> ReplayResult:
    engine = create_engine(url, durable=durable)
    try:
        upgrade(engine)
        with UnitOfWork(engine) as uow:
            if uow.book.load() is not None or uow.commands.count() > 0:
                raise ServiceError(
                    f"{display_url(url)} already holds a book; replay needs an empty database"
                )
        load_catalog(engine, scenario.catalog, scenario.settings, clock=clock)
        for index, event in enumerate(scenario.events):
            apply_event(engine, event, actor="replay", index=index, clock=clock)
        invoices = list_invoices(engine)
        movements = list_movements(engine)
        return ReplayResult(invoices, movements, metrics_for(scenario, movements), list_credit_notes(engine))
    finally:
        engine.dispose()


# --- helpers ----------------------------------------------------------------------------------


def _require_book(uow: UnitOfWork) -> StoredBook:
    stored = uow.book.load()
    if stored is None:
        raise ServiceError("no catalog loaded; run `billing catalog load FILE` first")
    return stored


_EVENT_MODELS: dict[str, type[Event]] = {
    "customer": CustomerEvent,
    "subscribe": SubscribeEvent,
    "change_quantity": ChangeQuantityEvent,
    "change_plan": ChangePlanEvent,
    "add_addon": AddAddonEvent,
    "remove_addon": RemoveAddonEvent,
    "usage": UsageEvent,
    "discount": DiscountEvent,
    "cancel": CancelEvent,
    "reactivate": ReactivateEvent,
    "invoice_run": InvoiceRunEvent,
    "pay": PayEvent,
    "void": VoidEvent,
    "credit_note": CreditNoteEvent,
}
_EVENT_CLASSES = tuple(_EVENT_MODELS.values())


def _as_event(event: Event | Mapping[str, Any]) -> Event:
    """The command model for an event given as a model or as its JSON-like mapping."""
    if isinstance(event, _EVENT_CLASSES):
        return event
    if isinstance(event, BaseModel) or not isinstance(event, Mapping):
        raise ScenarioError(f"not a billing command: {type(event).__name__}")
    try:
        return EVENT_ADAPTER.validate_python(dict(event))
    except ValidationError as exc:
        raise ScenarioError(describe_validation_error(exc)) from None


def _build(type_: str, clock: Clock, **fields: Any) -> Event:
    """A command model from keyword arguments; None means "the default". Decimals travel as
    strings, as in the scenario format. Validation errors name the command and the field."""
    at = fields.pop("at", None)
    data: dict[str, Any] = {"type": type_, "at": _instant(at if at is not None else clock())}
    for key, value in fields.items():
        if value is not None:
            data[key] = str(value) if isinstance(value, Decimal) else value
    try:
        return _EVENT_MODELS[type_].model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{type_}: {describe_validation_error(exc)}") from None


def _verb(
    engine: Engine, type_: str, actor: str, idempotency_key: str | None, clock: Clock, **fields: Any
) -> Outcome:
    event = _build(type_, clock, **fields)
    return execute(engine, event, actor=actor, idempotency_key=idempotency_key, clock=clock).outcome


def _instant(value: datetime | date | str) -> datetime:
    try:
        return parse_instant(value)
    except ValueError as exc:
        raise ScenarioError(f"at: {exc}") from None


def _recorded_outcome(uow: UnitOfWork, command: StoredCommand) -> Outcome:
    """The outcome of an already applied command, rebuilt from what it wrote."""
    changes: list[tuple[str, InvoiceStatus]] = []
    if command.type == "pay":
        changes.append((str(command.payload["invoice"]), "paid"))
    elif command.type == "void":
        changes.append((str(command.payload["invoice"]), "void"))
    return Outcome(
        issued=uow.ledger.invoices(command_id=command.id),
        status_changes=changes,
        credit_notes=uow.ledger.credit_notes(command_id=command.id),
        movements=uow.ledger.movements(command_id=command.id),
        links=uow.ledger.links_of_command(command.id),
    )


@dataclass
class _View:
    """What the view rows of the book's customers and subscriptions are made of, as plain tuples
    (cheap to take and compare, and not changed by later changes to the book); a row is built
    from them only where they differ (`_changed`), and written only if the row differs too."""

    rounding: RoundingMode = "half_up"
    customers: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    subscriptions: dict[str, tuple[Any, ...]] = field(default_factory=dict)


def _view_of(book: Book) -> _View:
    """The customers and subscriptions as the book holds them now."""
    return _View(
        book.settings.rounding,
        {acct.id: (acct.id, acct.currency, acct.tax_rate, acct.tz, acct.locale, acct.name, tuple(acct.tags.items()),
                   acct.mrr, acct.credit, acct.created_at) for acct in book.accounts.values()},
        {sub.id: (sub.id, sub.customer, sub.items.plan, sub.items.quantity, tuple(sub.items.addons.items()),
                  sub.status, sub.cancel_at_period_end,
                  tuple(tuple(_plain(s).items()) for s in sub.scheduled) if sub.scheduled else (),
                  sub.trial_end, None if sub.current is None else sub.current.start,
                  None if sub.current is None else sub.current.end, sub.ended_at)
         for sub in book.subscriptions.values()})


@dataclass
class _RunView:
    """What an invoice run can change in the view rows of a batch's customers and subscriptions,
    as plain tuples: exactly the columns `PartsRepository.update_views` writes. A run creates no
    customer or subscription and changes no customer's name, currency, tax, timezone, locale or
    tags (only commands do, and they write whole rows: `_View`), so a customer is its currency,
    MRR and credit balance; a subscription everything of its row but its id and owner."""

    rounding: RoundingMode
    customers: dict[str, tuple[str, Decimal, Decimal]]
    subscriptions: dict[str, tuple[Any, ...]]


def _run_view_of(book: Book) -> _RunView:
    """The customers and subscriptions of a run's batch as the book holds them now."""
    return _RunView(
        book.settings.rounding,
        {acct.id: (acct.currency, acct.mrr, acct.credit) for acct in book.accounts.values()},
        {sub.id: (sub.items.plan, sub.items.quantity, tuple(sub.items.addons.items()) if sub.items.addons else (),
                  sub.status, sub.cancel_at_period_end,
                  tuple(tuple(_plain(s).items()) for s in sub.scheduled) if sub.scheduled else (),
                  sub.trial_end, None if (current := sub.current) is None else current.start,
                  None if current is None else current.end, sub.ended_at)
         for sub in book.subscriptions.values()})


def _run_changes(before: _RunView, after: _RunView) -> tuple[list[CustomerBalances], list[SubscriptionState]]:
    """The view rows of a run's batch that differ between two views, in the book's order, as
    `PartsRepository.update_views` takes them: a customer whose rounded MRR or credit balance
    moved, a subscription whose state moved (its add-ons and scheduled changes compared as the
    mappings stored, so only an order that differs is no change)."""
    mode = after.rounding
    customers: list[CustomerBalances] = []
    for key, now in after.customers.items():
        was = before.customers.get(key)
        if was != now:
            currency, mrr, credit = now
            row = (key, currency, round_money(mrr, currency, mode), round_money(credit, currency, mode))
            if was is None or was[0] != currency or round_money(was[1], currency, before.rounding) != row[2] \
                    or round_money(was[2], currency, before.rounding) != row[3]:
                customers.append(row)
    subscriptions: list[SubscriptionState] = []
    for key, state in after.subscriptions.items():
        old = before.subscriptions.get(key)
        if old != state and (old is None or not _same_state(old, state)):
            subscriptions.append((key, *state))
    return customers, subscriptions


def _same_state(was: tuple[Any, ...], now: tuple[Any, ...]) -> bool:
    """Two unequal subscription states of `_run_view_of` that store the same row: their add-ons
    or scheduled changes hold the same items in another order (periods, the usual difference,
    are compared first)."""
    return (was[6:] == now[6:] and was[:2] == now[:2] and was[3:5] == now[3:5] and dict(was[2]) == dict(now[2])
            and [dict(s) for s in was[5]] == [dict(s) for s in now[5]])


def _customer_view(key: tuple[Any, ...], mode: RoundingMode) -> CustomerView:
    id_, currency, tax_rate, tz, locale, name, tags, mrr, credit, created_at = key
    return CustomerView(id=id_, currency=currency, tax_rate=tax_rate, timezone=tz, locale=locale, name=name,
                        tags=dict(tags), mrr=round_money(mrr, currency, mode),
                        credit_balance=round_money(credit, currency, mode), created_at=created_at)


def _subscription_view(key: tuple[Any, ...]) -> SubscriptionView:
    id_, customer, plan, quantity, addons, status, cancel, scheduled, trial_end, start, end, ended_at = key
    return SubscriptionView(id=id_, customer=customer, plan=plan, quantity=quantity, addons=dict(addons),
                            status=status, cancel_at_period_end=cancel, scheduled=[dict(s) for s in scheduled],
                            trial_end=trial_end, current_period_start=start, current_period_end=end,
                            ended_at=ended_at)


def _changed(before: _View, after: _View) -> tuple[list[CustomerView], list[tuple[SubscriptionView, bool]]]:
    """The customer rows and the subscription rows (with whether each is new) that differ
    between two views, in the book's order."""
    mode = after.rounding
    customers: list[CustomerView] = []
    for key, now in after.customers.items():
        was = before.customers.get(key)
        if was != now:
            view = _customer_view(now, mode)
            if was is None or _customer_view(was, before.rounding) != view:
                customers.append(view)
    subscriptions: list[tuple[SubscriptionView, bool]] = []
    for key, now in after.subscriptions.items():
        was = before.subscriptions.get(key)
        if was != now:
            sub = _subscription_view(now)
            if was is None or _subscription_view(was) != sub:
                subscriptions.append((sub, was is None))
    return customers, subscriptions


def _plain(change: Any) -> dict[str, Any]:
    """A scheduled change as JSON-safe data (its set fields, without the event index)."""
    fields = asdict(change) if is_dataclass(change) and not isinstance(change, type) else dict(vars(change))
    return {
        key: value if isinstance(value, (str, int, float, bool)) else str(value)
        for key, value in fields.items()
        if value is not None and key != "index"
    }


def _refresh_view(uow: UnitOfWork, before: _View, after: _View, *, at: datetime, now: datetime) -> None:
    """Write the customers and subscriptions whose view changed (customers first: the
    subscriptions reference them). New subscriptions are dated at the command's time."""
    customers, subscriptions = _changed(before, after)
    for customer in customers:
        uow.view.put_customer(customer, now=now)
    for sub, new in subscriptions:
        uow.view.put_subscription(replace(sub, created_at=at) if new else sub, now=now)
