"""Repositories of the book in customer parts, the shared sequences, invoice runs and billed
periods (tables in `billing.persistence.run_tables`). Set-based: a batch is loaded in one query
per kind and written with executemany; nothing here commits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, String, bindparam, func, insert, literal, or_, select, update
from sqlalchemy.orm import Session

from billing.persistence.repository import Bulk
from billing.persistence.run_tables import (
    CustomerBookRow,
    InvoiceRunCustomerRow,
    InvoiceRunRow,
    NumberSequenceRow,
)
from billing.persistence.tables import BookStateRow, InvoiceRow, SubscriptionRow, UsageEventRow
from billing.records import Invoice
from billing.usage import Measured

_CHUNK = 500
PREFIXES = {"invoice": "INV-", "credit_note": "CN-"}
SUBSCRIPTION_VIEW_COLUMNS = (
    ("plan", "text"), ("quantity", "bigint"), ("addons", "json"), ("status", "text"),
    ("cancel_at_period_end", "boolean"), ("scheduled", "json"), ("trial_end", "timestamptz"),
    ("current_period_start", "timestamptz"), ("current_period_end", "timestamptz"), ("ended_at", "timestamptz"),
    ("updated_at", "timestamptz"))
BILLED_PERIOD_COLUMNS = (("subscription", "text"), ("kind", "text"), ("period_start", "timestamptz"),
                         ("period_end", "timestamptz"), ("invoice_number", "text"))


CustomerBalances = tuple[str, str, Decimal, Decimal]
"""A customer's view row as a run changes it: id, currency, MRR and credit balance (rounded)."""
SubscriptionState = tuple[Any, ...]
"""A subscription's view row as a run changes it: id, plan, quantity, add-ons (code, quantity)
pairs, status, cancel at period end, scheduled changes (each its (field, value) pairs, JSON
values), trial end, current period start and end, ended at."""


@dataclass(frozen=True)
class StoredPart:
    customer: str
    position: int
    snapshot: bytes
    version: int


@dataclass(frozen=True)
class PartWrite:
    customer: str
    position: int
    snapshot: bytes
    version: int | None  # the version loaded; None for a new customer
    transition_at: datetime | None
    due_at: datetime | None


class PartsRepository:
    """`customer_books`, `number_sequences` and the book's clock."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # sequences and clock

    def lock_sequences(self, names: Sequence[str]) -> dict[str, int]:
        """The next values, locked until the transaction ends: a no-op UPDATE of the rows takes
        their row locks on PostgreSQL and the write lock on SQLite at once, so two writers queue
        here instead of both reading and one failing later. A series not there yet starts at
        its default."""
        self.session.execute(update(NumberSequenceRow).values(next=NumberSequenceRow.next)
                             .execution_options(synchronize_session=False))
        rows = self.session.execute(
            select(NumberSequenceRow.series, NumberSequenceRow.next).order_by(NumberSequenceRow.series)
            .with_for_update()
        ).all()
        return {series: int(value) for series, value in rows}

    def sequences(self) -> dict[str, int]:
        rows = self.session.execute(select(NumberSequenceRow.series, NumberSequenceRow.next))
        return {series: int(value) for series, value in rows}

    def load_all(self) -> list[StoredPart]:
        rows = self.session.execute(select(CustomerBookRow.customer, CustomerBookRow.position,
                                           CustomerBookRow.snapshot, CustomerBookRow.version)
                                    .order_by(CustomerBookRow.position))
        return [StoredPart(r.customer, r.position, bytes(r.snapshot), r.version) for r in rows]

    def save_sequences(self, before: dict[str, int], after: dict[str, int]) -> None:
        for series, value in after.items():
            if series not in before:
                self.session.execute(insert(NumberSequenceRow).values(
                    series=series, prefix=PREFIXES.get(series, ""), next=value))
            elif before[series] != value:
                self.session.execute(
                    update(NumberSequenceRow).where(NumberSequenceRow.series == series).values(next=value)
                    .execution_options(synchronize_session=False))

    def clock(self) -> datetime | None:
        return self.session.scalar(select(BookStateRow.clock))

    def set_clock(self, at: datetime | None) -> None:
        """Move the book's clock forward to `at` (never back: a batch of a run dated before a
        command that came in while it ran leaves the clock at the command's time)."""
        if at is None:
            return
        self.session.execute(update(BookStateRow)
                             .where(BookStateRow.id == 1, or_(BookStateRow.clock.is_(None), BookStateRow.clock < at))
                             .values(clock=at).execution_options(synchronize_session=False))

    # parts

    @property
    def postgres(self) -> bool:
        return self.session.get_bind().dialect.name == "postgresql"

    def load(self, customers: Iterable[str] = (), *, transition_by: datetime | None = None,
             lock: bool = False) -> list[StoredPart]:
        """The named customers' parts and those with a transition due by `transition_by`.

        `lock` (PostgreSQL): the named customers' rows are locked until the transaction ends
        (`FOR UPDATE`, in key order, so two lockers cannot deadlock on them); a locker waits for
        whoever holds one and then reads it as committed."""
        names = sorted(set(customers))
        cols = (CustomerBookRow.customer, CustomerBookRow.position, CustomerBookRow.snapshot,
                CustomerBookRow.version)
        found: dict[str, StoredPart] = {}
        for start in range(0, len(names), _CHUNK):
            chunk = names[start:start + _CHUNK]
            query = select(*cols).where(CustomerBookRow.customer.in_(chunk))
            if lock:
                query = query.order_by(CustomerBookRow.customer).with_for_update()
            for row in self.session.execute(query):
                found[row.customer] = StoredPart(row.customer, row.position, bytes(row.snapshot), row.version)
        if transition_by is not None:
            for row in self.session.execute(select(*cols).where(CustomerBookRow.transition_at <= transition_by)):
                found[row.customer] = StoredPart(row.customer, row.position, bytes(row.snapshot), row.version)
        return sorted(found.values(), key=lambda p: p.position)

    def transitions_by(self, at: datetime) -> list[str]:
        """The customers with a transition due by `at`."""
        return list(self.session.scalars(select(CustomerBookRow.customer).where(CustomerBookRow.transition_at <= at)))

    def due_customers(self, as_of: datetime) -> list[str]:
        return list(self.session.scalars(select(CustomerBookRow.customer).where(CustomerBookRow.due_at <= as_of)
                                         .order_by(CustomerBookRow.position)))

    def count_due(self, *, transition_by: datetime) -> int:
        return self.session.scalar(select(func.count()).select_from(CustomerBookRow)
                                   .where(CustomerBookRow.transition_at <= transition_by)) or 0

    def save(self, writes: Sequence[PartWrite]) -> None:
        """Insert new customers' parts, update the others if their version is still the one
        loaded (else `ConcurrentModification`: another command changed one of them)."""
        new = [w for w in writes if w.version is None]
        if new:
            self.session.execute(insert(CustomerBookRow), [
                {"customer": w.customer, "position": w.position, "snapshot": w.snapshot, "version": 1,
                 "transition_at": w.transition_at, "due_at": w.due_at} for w in new])
        old = [w for w in writes if w.version is not None]
        if not old:
            return
        bulk = Bulk(self.session)
        bulk.update(
            "customer_books", (("customer", "text"),),
            (("snapshot", "bytea"), ("transition_at", "timestamptz"), ("due_at", "timestamptz")),
            [(w.customer, w.snapshot, bulk.instant(w.transition_at), bulk.instant(w.due_at), w.version)
             for w in old],
            extra="version = customer_books.version + 1", check="version",
            conflict="a customer changed since it was loaded (another command or run won); retry")

    def position_of(self, customer: str) -> int | None:
        return self.session.scalar(select(CustomerBookRow.position).where(CustomerBookRow.customer == customer))

    def subscription_owners(self, ids: Iterable[str]) -> dict[str, str]:
        names = sorted(set(ids))
        if not names:
            return {}
        rows = self.session.execute(
            select(SubscriptionRow.id, SubscriptionRow.customer).where(SubscriptionRow.id.in_(names)))
        return {row.id: row.customer for row in rows}

    def invoice_owner(self, number: str) -> str | None:
        return self.session.scalar(select(InvoiceRow.customer).where(InvoiceRow.number == number))

    # the current view, set-based (an invoice run changes periods, credit and MRR of many rows)

    def update_views(self, customers: Sequence[CustomerBalances], subscriptions: Sequence[SubscriptionState], *,
                     now: datetime) -> None:
        """Update existing customer and subscription view rows in one statement each (`Bulk`),
        bumping their versions (the rows exist: a run creates no customer or subscription). The
        JSON columns are stored as `json.dumps` of the mapping and of the list of mappings."""
        bulk = Bulk(self.session)
        stamp = bulk.instant(now)
        bulk.update("customers", (("id", "text"),), (("mrr", "bigint"), ("credit_balance", "bigint"),
                                                      ("updated_at", "timestamptz")),
                    [(id_, bulk.minor(currency)(mrr), bulk.minor(currency)(credit), stamp)
                     for id_, currency, mrr, credit in customers], extra="version = customers.version + 1")
        instant, flag, dumps = bulk.instant, bulk.flag, bulk.json
        bulk.update("subscriptions", (("id", "text"),), SUBSCRIPTION_VIEW_COLUMNS, [
            (id_, plan, quantity, dumps(dict(addons)) if addons else "{}", status, flag(cancel),
             dumps([dict(s) for s in scheduled]) if scheduled else "[]", instant(trial_end), instant(start),
             instant(end), instant(ended_at), stamp)
            for id_, plan, quantity, addons, status, cancel, scheduled, trial_end, start, end, ended_at
            in subscriptions], extra="version = subscriptions.version + 1")

    # never twice

    def add_billed_periods(self, invoices: Sequence[Invoice]) -> None:
        """One row per (subscription, licensed or usage, period) the invoices bill: the primary
        key refuses a second invoice for a period already billed (void ones included)."""
        rows: dict[tuple[str, str, datetime, datetime], str] = {}
        for invoice in invoices:
            for line in invoice.lines:
                kind = line.kind
                if (kind == "plan" or kind == "usage") and line.subscription is not None \
                        and line.period_start is not None and line.period_end is not None:
                    rows.setdefault((line.subscription, "usage" if kind == "usage" else "licensed", line.period_start,
                                     line.period_end), invoice.number)
        bulk = Bulk(self.session)
        instant = bulk.instant
        bulk.insert("billed_periods", BILLED_PERIOD_COLUMNS, [
            (s, k, instant(a), instant(b), n) for (s, k, a, b), n in rows.items()])


def _bind(name: str) -> Any:
    return bindparam(name)


# --- invoice runs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRun:
    id: int
    as_of: datetime
    state: str
    command_id: int
    actor: str
    customers: int
    created_at: datetime
    updated_at: datetime
    error: str | None


class RunRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def create(self, *, as_of: datetime, command_id: int, actor: str, now: datetime) -> int:
        result = self.session.execute(insert(InvoiceRunRow).values(
            as_of=as_of, state="planned", command_id=command_id, actor=actor, customers=0, created_at=now,
            updated_at=now).returning(InvoiceRunRow.id))
        return int(result.scalar_one())

    def plan(self, run_id: int, as_of: datetime) -> int:
        """Enter every customer due by `as_of` as pending (one INSERT … SELECT)."""
        chosen = select(
            literal(run_id, Integer), CustomerBookRow.customer, CustomerBookRow.position,
            literal("pending", String), literal(0, Integer), literal(0, Integer),
        ).where(CustomerBookRow.due_at <= as_of)
        self.session.execute(
            insert(InvoiceRunCustomerRow).from_select(
                ["run_id", "customer", "position", "state", "invoices", "attempts"], chosen)
        )
        count = self.session.scalar(select(func.count()).select_from(InvoiceRunCustomerRow)
                                    .where(InvoiceRunCustomerRow.run_id == run_id)) or 0
        self.session.execute(update(InvoiceRunRow).where(InvoiceRunRow.id == run_id).values(customers=count))
        return count

    def by_command(self, command_id: int) -> StoredRun | None:
        row = self.session.scalars(select(InvoiceRunRow).where(InvoiceRunRow.command_id == command_id)).first()
        return None if row is None else _run(row)

    def get(self, run_id: int) -> StoredRun | None:
        row = self.session.get(InvoiceRunRow, run_id)
        return None if row is None else _run(row)

    def unfinished(self, as_of: datetime) -> StoredRun | None:
        row = self.session.scalars(
            select(InvoiceRunRow).where(InvoiceRunRow.as_of == as_of,
                                        InvoiceRunRow.state.in_(("planned", "drafting", "finalizing", "failed")))
            .order_by(InvoiceRunRow.id).limit(1)).first()
        return None if row is None else _run(row)

    def latest(self) -> StoredRun | None:
        row = self.session.scalars(select(InvoiceRunRow).order_by(InvoiceRunRow.id.desc()).limit(1)).first()
        return None if row is None else _run(row)

    def set_state(self, run_id: int, state: str, *, now: datetime, error: str | None = None) -> None:
        self.session.execute(update(InvoiceRunRow).where(InvoiceRunRow.id == run_id)
                             .values(state=state, updated_at=now, error=error)
                             .execution_options(synchronize_session=False))

    def claim(self, run_id: int, limit: int, *, skip_locked: bool) -> list[str]:
        """The next pending customers in creation order, locked until the transaction ends; with
        `skip_locked` (PostgreSQL workers) rows another worker holds are passed over."""
        query = (select(InvoiceRunCustomerRow.customer)
                 .where(InvoiceRunCustomerRow.run_id == run_id, InvoiceRunCustomerRow.state == "pending")
                 .order_by(InvoiceRunCustomerRow.position).limit(limit))
        if skip_locked:
            query = query.with_for_update(skip_locked=True)
        return list(self.session.scalars(query))

    def finish(self, run_id: int, done: dict[str, int], failed: dict[str, str]) -> None:
        """Mark the batch's customers done (with their invoice counts) or failed (with the reason)."""
        bulk = Bulk(self.session)
        keys = (("run_id", "integer"), ("customer", "text"))
        bulk.update("invoice_run_customers", keys, (("state", "text"), ("invoices", "integer"), ("error", "text")),
                    [(run_id, c, "done", n, None) for c, n in done.items()],
                    extra="attempts = invoice_run_customers.attempts + 1")
        bulk.update("invoice_run_customers", keys, (("state", "text"), ("error", "text")),
                    [(run_id, c, "failed", e) for c, e in failed.items()],
                    extra="attempts = invoice_run_customers.attempts + 1")

    def progress(self, run_id: int) -> dict[str, int]:
        rows = self.session.execute(
            select(InvoiceRunCustomerRow.state, func.count()).where(InvoiceRunCustomerRow.run_id == run_id)
            .group_by(InvoiceRunCustomerRow.state))
        out = {"pending": 0, "done": 0, "failed": 0}
        out.update({state: int(count) for state, count in rows})
        return out

    def failures(self, run_id: int) -> list[tuple[str, str]]:
        rows = self.session.execute(
            select(InvoiceRunCustomerRow.customer, InvoiceRunCustomerRow.error)
            .where(InvoiceRunCustomerRow.run_id == run_id, InvoiceRunCustomerRow.state == "failed")
            .order_by(InvoiceRunCustomerRow.position))
        return [(customer, error or "") for customer, error in rows]

    def retry_failed(self, run_id: int) -> None:
        self.session.execute(update(InvoiceRunCustomerRow)
                             .where(InvoiceRunCustomerRow.run_id == run_id, InvoiceRunCustomerRow.state == "failed")
                             .values(state="pending").execution_options(synchronize_session=False))

    def totals_of(self, command_id: int) -> list[tuple[str, int, int, int, int]]:
        """(currency, invoices, total, credit_applied, amount_due) of a run's invoices, summed in
        SQL (minor units are exact integers), so a run of any size reads one row per currency."""
        rows = self.session.execute(
            select(InvoiceRow.currency, func.count(), func.sum(InvoiceRow.total), func.sum(InvoiceRow.credit_applied),
                   func.sum(InvoiceRow.amount_due)).where(InvoiceRow.command_id == command_id)
            .group_by(InvoiceRow.currency).order_by(InvoiceRow.currency))
        return [(cur, int(n), int(total), int(credit), int(due)) for cur, n, total, credit, due in rows]


def _run(row: InvoiceRunRow) -> StoredRun:
    return StoredRun(id=row.id, as_of=row.as_of, state=row.state, command_id=row.command_id, actor=row.actor,
                     customers=row.customers, created_at=row.created_at, updated_at=row.updated_at, error=row.error)



def usage_rows(session: Session, subscriptions: Sequence[str], lo: int,
               hi: int) -> dict[tuple[str, str], list[Measured]]:
    """The usage events of these subscriptions in `[lo, hi)` (UTC µs), by (subscription, metric),
    in one query per 500 subscriptions."""
    out: dict[tuple[str, str], list[Measured]] = {}
    for start in range(0, len(subscriptions), _CHUNK):
        chunk = list(subscriptions[start:start + _CHUNK])
        rows = session.execute(
            select(UsageEventRow.subscription, UsageEventRow.metric, UsageEventRow.at, UsageEventRow.seq,
                   UsageEventRow.matched, UsageEventRow.quantity, UsageEventRow.dim)
            .where(UsageEventRow.subscription.in_(chunk), UsageEventRow.at >= lo, UsageEventRow.at < hi))
        for r in rows:
            out.setdefault((r.subscription, r.metric), []).append(
                Measured(at=int(r.at), seq=int(r.seq), matched=bool(r.matched),
                         quantity=None if r.quantity is None else int(r.quantity), dim=r.dim))
    return out
