"""The book: every customer's subscriptions, what is billed and what is owed, as one pure state
machine driven by commands (SCENARIOS.md events).

`Book.apply(event)` first applies the transitions due at or before the event's time — usage
periods closing, period-end changes and cancellations, trial ends, discount ends and starts,
new periods opening — then the event itself, and returns an `Outcome`: the invoices it issued,
invoice status changes, the credit notes it issued, the MRR movements it emitted and the
movement → invoice line links it discovered. It does no I/O and reads no clock; a failing command
raises `BookError` and leaves the book exactly as it was (the command works on a copy).

Billing rules (SCENARIOS.md "Changes and proration", "Invoices"; Kill Bill's invoice module):
- Licensed items are billed in advance for the period starting on the billing date, at the state
  in force at the period's start; usage in arrears for the period that ended on it.
- An immediate change prorates against the period that contains it, at the state that period is
  (or will be) billed at: a credit for the old item's unused part and a charge for the new item's
  remaining part, each rounded on its own. A change at exactly the start of a period that is not
  billed yet prorates nothing: that period is billed in the new state.
- A run bills every billing date that has come and is not billed yet, so running twice adds
  nothing; voided invoices' periods are not billed again.
- Issued invoices never change except their status. Corrections are credit notes
  (billing.credit_notes) in their own series `CN-0001`, …: their total goes to the customer's
  credit balance and they move no MRR. An invoice with credit notes can no longer be voided.
"""

from __future__ import annotations

import heapq
import pickle
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal

from billing.archive import decode_invoices
from billing.catalog import AddOn, Catalog, CatalogIndex, Metric, Plan, Priced
from billing.credit_notes import CreditNoteError, draft_credit_note
from billing.discounts import Coupon, Tag, covers, discount_lines
from billing.fx import MissingRate, rate_at
from billing.invoicing import totals
from billing.money import round_money
from billing.periods import (
    Grid,
    Period,
    day_fraction,
    fraction_left,
    instant_of,
    local_date,
    local_wall,
    midnight,
    monthly_factor,
    second_fraction,
)
from billing.proration import describe, proration_lines, shown_quantity
from billing.records import (
    Churn,
    Contraction,
    ContractionSubtype,
    CreditNote,
    Expansion,
    ExpansionSubtype,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Leg,
    LineKind,
    LineRef,
    MrrMovement,
    New,
    Reactivation,
)
from billing.scenario import (
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
    Periods,
    ReactivateEvent,
    RemoveAddonEvent,
    Settings,
    SubscribeEvent,
    UsageEvent,
    VoidEvent,
)
from billing.subscription import Items, LicensedPeriod, Scheduled, Subscription, UsagePeriod
from billing.usage import MemoryUsage, UsageRecord, UsageSource, UsageWindow, micros, rate

LegKey = tuple[str, str, str]
"""(subscription, plan, product): the finest segment a movement's legs are recorded on."""

LineTerms = tuple[str, Decimal, Decimal | None, Decimal]
"""What an invoice line's item and quantity decide: its description, shown quantity, unit price
and rounded amount (memoized per catalog: many lines share them)."""

LineAt = tuple[str, int]
"""(invoice number, line index): an invoice line a tag links to (a plain tuple: a part holds one
per billed line, and tuples pickle far cheaper than records)."""

Archived = tuple[tuple[str, ...], bytes]
"""Invoices kept encoded until something reads them: their numbers and their encoding
(billing.archive), in issue order (billing.shards keeps a customer's past invoices so)."""


class BookError(ValueError):
    """A command the book cannot accept; the message names the event and the field."""


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass
class PendingLine:
    line: InvoiceLine
    coverage_start: datetime  # start of the billing period the line belongs to (for coupons)
    tags: list[Tag]


@dataclass
class Account:
    """A customer with its currency, tax, timezone, credit balance and current MRR."""

    id: str
    order: int
    currency: str
    tax_rate: Decimal
    tz: str
    tags: dict[str, str]
    locale: str
    name: str
    created_at: datetime
    subscriptions: list[str] = field(default_factory=list)
    credit: Decimal = Decimal(0)
    mrr: Decimal = Decimal(0)
    had_mrr: bool = False
    pending: list[PendingLine] = field(default_factory=list)
    coupons: list[int] = field(default_factory=list)
    # MRR per (subscription, plan, product) as of the last movement, rounded so it sums to `mrr`
    legs: dict[LegKey, Decimal] = field(default_factory=dict)
    # what links this customer's movements to its invoice lines: a tag names a period, a change
    # or a coupon start of one of its subscriptions, so links never cross customers
    movement_tags: dict[Tag, list[int]] = field(default_factory=dict)
    line_tags: dict[Tag, list[LineAt]] = field(default_factory=dict)
    next_invoice: int = 1  # its own series, with settings invoice_numbering.scope "customer"

    def __setstate__(self, state: dict[str, Any]) -> None:
        line_tags = state.get("line_tags") or {}
        for ats in line_tags.values():  # the first list tells: every load passes here, and the tags grow
            if ats:
                if isinstance(ats[0], LineRef):  # saved when the lines were LineRef records (all of them then)
                    state["line_tags"] = {tag: [_line_at(at) for at in refs] for tag, refs in line_tags.items()}
                break
        # interned names, as pickle's own BUILD sets them: a part's next pickle refers to them (billing.shards)
        self.__dict__.update((sys.intern(name), value) for name, value in state.items())


@dataclass
class Outcome:
    """What one command produced."""

    issued: list[Invoice] = field(default_factory=list)
    status_changes: list[tuple[str, InvoiceStatus]] = field(default_factory=list)
    credit_notes: list[CreditNote] = field(default_factory=list)
    movements: list[MrrMovement] = field(default_factory=list)
    links: list[tuple[int, LineRef]] = field(default_factory=list)


@dataclass
class _Draft:
    account: Account
    key: str  # local billing date
    lines: list[tuple[InvoiceLine, list[Tag]]]
    coverage: dict[int, datetime] = field(default_factory=dict)  # id(line) -> its period start
    discount_lines: list[tuple[InvoiceLine, list[Tag]]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The book
# ---------------------------------------------------------------------------------------------


class Book:
    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.accounts: dict[str, Account] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.coupons: dict[int, Coupon] = {}
        self.invoices: dict[str, Invoice] = {}  # what is not archived (see `archive_invoices`)
        self.invoice_order: list[str] = []
        self._archive: dict[str, list[Archived]] = {}  # customer -> its archived invoices
        self._archived: dict[str, str] = {}  # archived invoice number -> customer
        self.credit_notes: dict[str, CreditNote] = {}  # by number, in issue order
        self.clock: datetime | None = None
        self.next_invoice = 1
        self.next_credit_note = 1
        self.next_movement = 1
        self.next_change = 1
        self.next_coupon = 1
        # creation order of customers and subscriptions (a counter, not len(): a book assembled
        # from some customers' parts, billing.shards, continues the whole book's order)
        self.next_customer_order = 0
        self.next_subscription_order = 0
        self._out = Outcome()
        self._index: int | None = None
        # pending transitions: (due, stage, subscription order, subscription id), lazily
        # invalidated — an entry counts only while it equals the subscription's next transition
        self._due: list[tuple[datetime, int, int, str]] = []

    # -- persistence of the pure state ---------------------------------------------------------

    def dumps(self) -> bytes:
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    def __getstate__(self) -> dict[str, Any]:
        self._unarchive_all()  # a snapshot of the whole book holds every invoice as before
        if self.__dict__.pop("_due_stale", False):
            self._queue_all()
        state = dict(self.__dict__)
        state.pop("_archive", None)
        state.pop("_archived", None)
        state.pop("_usage_source", None)  # usage events live in their source, never in a snapshot
        state.pop("_catalog_index", None)  # derived from the catalog
        state.pop("_rated", None)  # usage lines rated during one command
        state.pop("_fx", None)  # memoized exchange rates
        return state

    @property
    def usage(self) -> UsageSource:
        """Where this book's usage events are recorded and aggregated (billing.usage): the SQL
        store in the services, an in-memory one otherwise."""
        source: UsageSource | None = self.__dict__.get("_usage_source")
        if source is None:
            source = self.__dict__["_usage_source"] = MemoryUsage()
        return source

    @property
    def _cat(self) -> CatalogIndex:
        """The catalog's lookups and memoized prices (never pickled; rebuilt for a new catalog, its
        exact prices shared with an identical one's: CatalogIndex.of)."""
        index: CatalogIndex | None = self.__dict__.get("_catalog_index")
        if index is None or index.catalog is not self.catalog:
            index = self.__dict__["_catalog_index"] = CatalogIndex.of(self.catalog)
        return index

    def use_usage_source(self, source: UsageSource) -> None:
        self.__dict__["_usage_source"] = source
        self.__dict__["_rated"] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a snapshot saved before credit notes existed has no credit note series yet
        state.setdefault("credit_notes", {})
        state.setdefault("next_credit_note", 1)
        state.setdefault("next_customer_order", len(state["accounts"]))
        state.setdefault("_archive", {})
        state.setdefault("_archived", {})
        state.setdefault("next_subscription_order", len(state["subscriptions"]))
        movement_tags = state.pop("movement_tags", None)
        line_tags = state.pop("line_tags", None)
        self.__dict__.update(state)
        if movement_tags is not None or line_tags is not None:
            self._own_tags(movement_tags or {}, line_tags or {})
        if "_due" not in state:  # a snapshot saved before the transition queue existed
            self._due = []
            self._queue_all()
        # a snapshot saved before movements had legs: start from the MRR composition in force
        for acct in self.accounts.values():
            if "legs" not in acct.__dict__:
                acct.legs = self._leg_levels(acct)[1] if acct.mrr else {}

    def _own_tags(self, movement_tags: dict[Tag, list[int]], line_tags: dict[Tag, list[LineRef]]) -> None:
        """A snapshot saved when the link tags were the whole book's: give each customer its own.
        A period, usage or coupon tag names a subscription; a change tag belongs to the customer
        whose lines carry it (a change that wrote no line can no longer link to anything)."""
        self._unarchive_all()
        for acct in self.accounts.values():
            acct.__dict__.setdefault("movement_tags", {})
            acct.__dict__.setdefault("line_tags", {})
        owners: dict[Tag, set[str]] = {}
        for tag, refs in line_tags.items():
            for ref in refs:
                customer = self.invoices[ref.invoice].customer
                owners.setdefault(tag, set()).add(customer)
                self.accounts[customer].line_tags.setdefault(tag, []).append((ref.invoice, ref.line))
        for acct in self.accounts.values():
            for pending in acct.pending:
                for tag in pending.tags:
                    owners.setdefault(tag, set()).add(acct.id)
        for tag, ids in movement_tags.items():
            found = owners.get(tag, set())
            if tag[0] in ("per", "use") and tag[1] in self.subscriptions:
                found = {self.subscriptions[tag[1]].customer}
            elif tag[0] == "cpn" and len(tag) > 2 and tag[2] in self.subscriptions:
                found = {self.subscriptions[tag[2]].customer}
            for customer in found:
                self.accounts[customer].movement_tags[tag] = list(ids)

    @staticmethod
    def loads(data: bytes) -> Book:
        book = pickle.loads(data)  # noqa: S301 - our own snapshot from our own database
        if not isinstance(book, Book):
            raise TypeError("not a Book snapshot")
        return book

    # -- entry point ---------------------------------------------------------------------------

    def apply(self, event: Event, index: int | None = None, *, discard_on_error: bool = False) -> Outcome:
        """Apply due transitions, then the event. On error the book is left unchanged — unless
        the caller throws the book away on error anyway (`discard_on_error`, as the services do
        with the copy they loaded), which spares the copy."""
        work = self if discard_on_error else Book.loads(self.dumps())
        work.use_usage_source(self.usage)
        work._out = Outcome()
        work._index = index
        try:
            if work.clock is not None and event.at < work.clock:
                raise BookError(f"at: time goes backwards ({event.at.isoformat()} is before "
                                f"{work.clock.isoformat()})")
            work.clock = event.at
            work._advance(event.at)
            work._dispatch(event)
            work._requeue_after(event)
        except BookError as exc:
            raise BookError(f"{_where(index, event.type)}{exc}") from None
        except KeyError as exc:
            raise BookError(f"{_where(index, event.type)}{exc.args[0]}") from None
        out = work._out
        work._out = Outcome()
        work._index = None
        self.__dict__.update(work.__dict__)
        return out

    def _dispatch(self, event: Event) -> None:
        match event:
            case CustomerEvent():
                self._customer(event)
            case SubscribeEvent():
                self._subscribe(event)
            case ChangeQuantityEvent():
                self._change(event.at, event.subscription, "change_quantity", event.effective,
                             quantity=event.quantity)
            case ChangePlanEvent():
                self._change(event.at, event.subscription, "change_plan", event.effective,
                             plan=event.plan, quantity=event.quantity)
            case AddAddonEvent():
                self._change(event.at, event.subscription, "add_addon", event.effective,
                             addon=event.addon, addon_quantity=event.quantity)
            case RemoveAddonEvent():
                self._change(event.at, event.subscription, "remove_addon", event.effective,
                             addon=event.addon)
            case UsageEvent():
                self._usage(event)
            case DiscountEvent():
                self._discount(event)
            case CancelEvent():
                self._cancel(event)
            case ReactivateEvent():
                self._reactivate(event)
            case InvoiceRunEvent():
                self._invoice_run(event.at)
            case PayEvent():
                self._pay(event)
            case VoidEvent():
                self._void(event)
            case CreditNoteEvent():
                self._credit_note(event)

    # -- lookups -------------------------------------------------------------------------------

    def _account(self, customer: str) -> Account:
        try:
            return self.accounts[customer]
        except KeyError:
            raise BookError(f"customer: unknown customer {customer!r}") from None

    def _subscription(self, sub_id: str) -> Subscription:
        try:
            return self.subscriptions[sub_id]
        except KeyError:
            raise BookError(f"subscription: unknown subscription {sub_id!r}") from None

    def _plan(self, code: str, currency: str, what: str = "plan") -> Plan:
        try:
            plan = self.catalog.plan(code)
        except KeyError:
            raise BookError(f"{what}: unknown plan {code!r}") from None
        if not plan.has_price(currency):
            raise BookError(f"{what}: plan {code!r} has no price in {currency}")
        return plan

    def _addon(self, code: str, currency: str, plan: Plan, what: str = "addon") -> AddOn:
        try:
            addon = self.catalog.addon(code)
        except KeyError:
            raise BookError(f"{what}: unknown addon {code!r}") from None
        if not addon.has_price(currency):
            raise BookError(f"{what}: addon {code!r} has no price in {currency}")
        if (addon.interval, addon.interval_count) != (plan.interval, plan.interval_count):
            raise BookError(f"{what}: addon {code!r} bills every {addon.interval_count} {addon.interval}, "
                            f"plan {plan.code!r} every {plan.interval_count} {plan.interval}")
        return addon

    def _item(self, kind: str, code: str) -> Priced:
        return self._cat.item(kind, code)

    @property
    def _policy(self) -> Literal["day", "second", "none"]:
        return self.settings.proration

    def _origin(self, at: datetime, tz: str) -> datetime:
        """Where billing starts for something starting at `at`: local midnight, or the instant."""
        return at if self._policy == "second" else midnight(local_date(at, tz), tz)

    def _grid(self, sub: Subscription, plan: Plan, origin: datetime, tz: str) -> Grid:
        return Grid(tz=tz, interval=plan.interval, count=plan.interval_count,
                    anchor=local_wall(origin, tz), origin=origin, billing_day=sub.billing_day)

    # -- commands ------------------------------------------------------------------------------

    def _customer(self, ev: CustomerEvent) -> None:
        if ev.customer in self.accounts:
            raise BookError(f"customer: customer {ev.customer!r} already exists")
        cur = ev.currency
        rep = self.settings.reporting_currency
        if cur != rep and not any(r.currency == cur for r in self.settings.fx_rates):
            raise BookError(f"currency: no fx rate for {cur} in {rep} (settings.fx_rates)")
        self.accounts[ev.customer] = Account(
            id=ev.customer, order=self.next_customer_order, currency=cur, tax_rate=ev.tax_rate,
            tz=ev.timezone, tags=dict(ev.tags), locale=ev.locale, name=ev.name or ev.customer,
            created_at=ev.at)
        self.next_customer_order += 1

    def _subscribe(self, ev: SubscribeEvent) -> None:
        acct = self._account(ev.customer)
        if ev.subscription in self.subscriptions:
            raise BookError(f"subscription: subscription {ev.subscription!r} already exists")
        plan = self._plan(ev.plan, acct.currency)
        if ev.billing_day is not None and plan.interval not in ("month", "year"):
            raise BookError("billing_day: only month- and year-based plans take a billing_day")
        addons: dict[str, int] = {}
        for i, entry in enumerate(ev.addons):
            self._addon(entry.addon, acct.currency, plan, what=f"addons[{i}].addon")
            if entry.addon in addons:
                raise BookError(f"addons[{i}].addon: addon {entry.addon!r} listed twice")
            addons[entry.addon] = entry.quantity
        trial_days = plan.trial_days if ev.trial_days is None else ev.trial_days
        sub = Subscription(id=ev.subscription, customer=acct.id, order=self.next_subscription_order,
                           billing_day=ev.billing_day, status="active",
                           items=Items(plan.code, ev.quantity, addons))
        self.next_subscription_order += 1
        sub.started_at = ev.at
        self.subscriptions[sub.id] = sub
        acct.subscriptions.append(sub.id)
        if trial_days > 0:
            sub.status = "trialing"
            if self._policy == "second":
                wall = local_wall(ev.at, acct.tz) + timedelta(days=trial_days)
                sub.trial_end = instant_of(wall, acct.tz)
            else:
                sub.trial_end = midnight(local_date(ev.at, acct.tz) + timedelta(days=trial_days), acct.tz)
            self._attach_customer_coupons(acct, sub)
            return
        self._start(sub, acct, self._origin(ev.at, acct.tz), ev.at, "subscribe")

    def _start(self, sub: Subscription, acct: Account, origin: datetime, at: datetime, cause: str) -> None:
        """Open the subscription's first period at `origin` and move MRR (new / cross-sell)."""
        plan = self.catalog.plan(sub.items.plan)
        sub.status = "active"
        sub.grid = self._grid(sub, plan, origin, acct.tz)
        first = sub.grid.period_containing(origin)
        sub.current = first
        sub.stage = -1
        sub.unbilled.append(LicensedPeriod(first, sub.items.copy()))
        sub.usage_open = first.start
        self._attach_customer_coupons(acct, sub)
        for coupon in self._coupons_of(sub):
            window = coupon.windows.get(sub.id)
            if coupon.recurring and window is not None and window[0] == first.start:
                sub.active_coupons.append(coupon.id)
        self._emit(acct, at, cause, sub, [("per", sub.id, _k(first.start))])

    def _change(self, at: datetime, sub_id: str, cause: str, effective: str, *, plan: str | None = None,
                quantity: int | None = None, addon: str | None = None,
                addon_quantity: int | None = None) -> None:
        sub = self._subscription(sub_id)
        acct = self.accounts[sub.customer]
        if sub.status == "cancelled":
            raise BookError(f"subscription: subscription {sub_id!r} is cancelled")
        change = Scheduled(cause=cause, index=self._index, plan=plan, quantity=quantity, addon=addon,
                           addon_quantity=addon_quantity)
        new_items = self._changed_items(sub, acct, change)  # validates
        if effective == "period_end":
            self._check_schedule(sub, acct, sub.items, [*sub.scheduled, change])
            sub.scheduled.append(change)
            return
        self._check_schedule(sub, acct, new_items, sub.scheduled)
        if sub.status == "trialing":
            sub.items = new_items
            return
        self._apply_change(sub, acct, at, new_items, cause, at_boundary=False)

    def _check_schedule(self, sub: Subscription, acct: Account, items: Items, changes: list[Scheduled]) -> None:
        """Changes scheduled for the period end must still apply, in order, when it comes: a
        command that would make one fail then (an add-on added before a scheduled change of
        interval, an add-on removed twice) is refused now, so no later command finds the book
        stuck on a transition it cannot make."""
        for change in changes:
            try:
                items = self._changed_items(sub, acct, change, items)
            except BookError as exc:
                where = "" if change.index is None else f"events[{change.index}] "
                raise BookError(f"the change scheduled for the period end ({where}{change.cause}) would no longer "
                                f"apply: {exc}") from None

    def _changed_items(self, sub: Subscription, acct: Account, change: Scheduled,
                       items: Items | None = None) -> Items:
        items = (sub.items if items is None else items).copy()
        current_plan = self.catalog.plan(items.plan)
        if change.cause == "change_quantity":
            assert change.quantity is not None
            items.quantity = change.quantity
        elif change.cause == "change_plan":
            assert change.plan is not None
            new_plan = self._plan(change.plan, acct.currency)
            interval_changes = (new_plan.interval, new_plan.interval_count) != (
                current_plan.interval, current_plan.interval_count)
            if interval_changes and items.addons:
                raise BookError(f"plan: changing the interval of {sub.id!r} needs its add-ons removed first")
            if new_plan.interval not in ("month", "year") and sub.billing_day is not None:
                raise BookError(f"plan: {new_plan.code!r} is not month- or year-based and "
                                f"{sub.id!r} has a billing_day")
            items.plan = new_plan.code
            if change.quantity is not None:
                items.quantity = change.quantity
        elif change.cause == "add_addon":
            assert change.addon is not None and change.addon_quantity is not None
            self._addon(change.addon, acct.currency, current_plan)
            items.addons[change.addon] = change.addon_quantity
        elif change.cause == "remove_addon":
            assert change.addon is not None
            if change.addon not in items.addons:
                raise BookError(f"addon: subscription {sub.id!r} has no addon {change.addon!r}")
            del items.addons[change.addon]
        return items

    def _apply_change(self, sub: Subscription, acct: Account, at: datetime, new_items: Items, cause: str,
                      *, at_boundary: bool) -> None:
        """Apply an item change effective at `at` (an immediate change, or a scheduled one at a
        period boundary before the new period opens), with its prorations and movement."""
        assert sub.current is not None and sub.grid is not None
        old = sub.items
        old_plan = self.catalog.plan(old.plan)
        new_plan = self.catalog.plan(new_items.plan)
        period = sub.current
        cid = self._new_change_id()
        tags: list[Tag] = [("chg", str(cid))]
        regrid = (old_plan.interval, old_plan.interval_count) != (new_plan.interval, new_plan.interval_count)
        open_period = self._unbilled_at(sub, period.start)
        if at_boundary:
            # the period starting here is not open yet; it will be billed in the new state
            tags.append(("per", sub.id, _k(at)))
        elif open_period is not None and at == period.start:
            if regrid:
                sub.unbilled.remove(open_period)
            else:
                open_period.items = new_items.copy()
                tags.append(("per", sub.id, _k(at)))
        elif self._policy != "none":
            frac = fraction_left(at, period, acct.tz, self._policy)
            self._prorate(sub, acct, old, new_items if not regrid else None, at, period, frac, cid)
        sub.items = new_items
        if regrid:
            grid = Grid(tz=acct.tz, interval=new_plan.interval, count=new_plan.interval_count,
                        anchor=sub.grid.anchor, origin=sub.grid.origin, billing_day=sub.billing_day)
            sub.grid = grid
            own = grid.period_containing(at)
            if own.start == at:
                sub.current = own
                if not at_boundary:
                    sub.unbilled.append(LicensedPeriod(own, new_items.copy()))
                    tags.append(("per", sub.id, _k(at)))
            else:
                frac = second_fraction(at, own) if self._policy == "second" else day_fraction(at, own, acct.tz)
                self._prorate(sub, acct, None, new_items, at, own, frac, cid)
                sub.current = own
                sub.stage = -1
        self._flush_immediate(acct, cid)
        self._emit(acct, at, cause, sub, tags)

    def _prorate(self, sub: Subscription, acct: Account, old: Items | None, new: Items | None,
                 at: datetime, period: Period, frac: Fraction, cid: int) -> None:
        """Queue the credit and charge lines of a change (billing.proration)."""
        start = at if self._policy == "second" else midnight(local_date(at, acct.tz), acct.tz)
        for line in proration_lines(old, new, catalog=self.catalog, subscription=sub.id, currency=acct.currency,
                                    mode=self.settings.rounding, start=start, period=period, fraction=frac):
            acct.pending.append(PendingLine(line, period.start, [("chg", str(cid))]))

    def _flush_immediate(self, acct: Account, cid: int) -> None:
        """With `proration_invoicing: immediate`, issue this change's lines on an invoice now."""
        if self.settings.proration_invoicing != "immediate":
            return
        mine = [p for p in acct.pending if ("chg", str(cid)) in p.tags]
        if not mine:
            return
        acct.pending = [p for p in acct.pending if p not in mine]
        assert self.clock is not None
        draft = _Draft(acct, local_date(self.clock, acct.tz).isoformat(),
                       [(p.line, p.tags) for p in mine], {id(p.line): p.coverage_start for p in mine})
        self._apply_coupons(draft, proration_only=True)
        self._finalize([draft], self.clock)

    def _unbilled_at(self, sub: Subscription, start: datetime) -> LicensedPeriod | None:
        for lp in sub.unbilled:
            if lp.period.start == start:
                return lp
        return None

    def _usage(self, ev: UsageEvent) -> None:
        window = self.usage_window(ev.subscription, ev.metric)
        reason = window.reject(micros(ev.at))
        if reason is not None:
            raise BookError(reason)
        # a repeated id is ignored by the source, never billed twice
        self.usage.record(ev.subscription, self.catalog.metric(ev.metric),
                          UsageRecord(ev.at, ev.metric, ev.value, ev.id, dict(ev.properties)))
        self.__dict__["_rated"] = {}

    def usage_window(self, sub_id: str, metric_code: str) -> UsageWindow:
        """When `sub_id` accepts events of `metric_code` (billing.usage.UsageWindow); BookError
        for an unknown subscription or metric, or a metric its plan does not bill."""
        sub = self._subscription(sub_id)
        try:
            metric = self.catalog.metric(metric_code)
        except KeyError:
            raise BookError(f"metric: unknown metric {metric_code!r}") from None
        plan = self.catalog.plan(sub.items.plan)
        if metric.code not in {m.code for m in self.catalog.plan_metrics(plan)}:
            raise BookError(f"metric: metric {metric_code!r} is not billed on plan {plan.code!r}")
        ends: datetime | None = None
        if sub.status == "cancelled":
            ends = sub.ended_at
        elif sub.cancel_at_period_end and sub.current is not None:
            ends = sub.current.end
        open_starts = [up.start for up in sub.usage_unbilled]
        if sub.usage_open is not None:
            open_starts.append(sub.usage_open)
        invoiced_until = min(open_starts) if open_starts else (ends if sub.status == "cancelled" else None)
        started = sub.started_at
        return UsageWindow(
            subscription=sub.id,
            started=None if started is None else micros(started),
            ends=None if ends is None else micros(ends),
            trial_end=None if sub.trial_end is None else micros(sub.trial_end),
            invoiced_until=None if invoiced_until is None else micros(invoiced_until),
            closed=tuple((micros(up.start), micros(up.end)) for up in sub.usage_unbilled),
        )

    def _discount(self, ev: DiscountEvent) -> None:
        if ev.subscription is not None:
            sub = self._subscription(ev.subscription)
            if sub.status == "cancelled":
                raise BookError(f"subscription: subscription {sub.id!r} is cancelled")
            acct = self.accounts[sub.customer]
            targets = [sub]
        else:
            assert ev.customer is not None
            acct = self._account(ev.customer)
            targets = [self.subscriptions[s] for s in acct.subscriptions
                       if self.subscriptions[s].status != "cancelled"]
        duration: Literal["forever", "once"] | int
        duration = ev.duration.periods if isinstance(ev.duration, Periods) else ev.duration
        coupon = Coupon(id=self.next_coupon, customer=acct.id, subscription=ev.subscription,
                        percent=Fraction(ev.percent) / 100 if ev.percent is not None else None,
                        amount=ev.amount, duration=duration, at=ev.at)
        self.next_coupon += 1
        self.coupons[coupon.id] = coupon
        acct.coupons.append(coupon.id)
        if not coupon.recurring:
            return
        for sub in targets:
            self._add_window(coupon, sub, acct)
        ends = [end for _, end in coupon.windows.values()]
        coupon.lasts_until = None if duration == "forever" or not ends else max(e for e in ends if e)
        for sub in sorted(targets, key=lambda s: s.order):
            window = coupon.windows.get(sub.id)
            if sub.status == "active" and window is not None and window[0] == ev.at:
                sub.active_coupons.append(coupon.id)
                self._emit(acct, ev.at, "discount", sub, [("cpn", str(coupon.id), sub.id, _k(ev.at))])

    def _add_window(self, coupon: Coupon, sub: Subscription, acct: Account, *, starting: bool = False) -> None:
        """The periods a recurring coupon covers on `sub`: those starting at or after the coupon,
        N of them for `{"periods": N}`."""
        if sub.status == "trialing":
            assert sub.trial_end is not None
            plan = self.catalog.plan(sub.items.plan)
            grid = self._grid(sub, plan, sub.trial_end, acct.tz)
            first = grid.period_containing(sub.trial_end)
        else:
            assert sub.grid is not None and sub.current is not None
            grid = sub.grid
            starts_now = starting or sub.current.start >= coupon.at
            first = sub.current if starts_now else grid.period_containing(sub.current.end)
        end: datetime | None = None
        if isinstance(coupon.duration, int):
            period = first
            for _ in range(coupon.duration - 1):
                period = grid.period_containing(period.end)
            end = period.end
        coupon.windows[sub.id] = (first.start, end)

    def _attach_customer_coupons(self, acct: Account, sub: Subscription) -> None:
        """A customer coupon covers subscriptions that start while it lasts."""
        for cid in acct.coupons:
            coupon = self.coupons[cid]
            if coupon.subscription is not None or not coupon.recurring or sub.id in coupon.windows:
                continue
            assert self.clock is not None
            if coupon.duration == "forever" or coupon.lasts_until is None or self.clock < coupon.lasts_until:
                if sub.status == "trialing" or sub.current is not None:
                    self._add_window(coupon, sub, acct, starting=True)

    def _coupons_of(self, sub: Subscription) -> list[Coupon]:
        acct = self.accounts[sub.customer]
        return [self.coupons[c] for c in acct.coupons
                if self.coupons[c].subscription in (None, sub.id)]

    def _cancel(self, ev: CancelEvent) -> None:
        sub = self._subscription(ev.subscription)
        acct = self.accounts[sub.customer]
        if sub.status == "cancelled":
            raise BookError(f"subscription: subscription {sub.id!r} is already cancelled")
        if ev.effective == "period_end":
            sub.cancel_at_period_end = True
            sub.cancel_index = self._index
            return
        if sub.status == "trialing":
            sub.status = "cancelled"
            sub.ended_at = ev.at
            return
        self._end(sub, acct, ev.at, immediate=True)

    def _end(self, sub: Subscription, acct: Account, at: datetime, *, immediate: bool) -> None:
        assert sub.current is not None
        cid = self._new_change_id()
        tags: list[Tag] = []
        if immediate:
            period = sub.current
            open_period = self._unbilled_at(sub, period.start)
            if open_period is not None and at == period.start:
                sub.unbilled.remove(open_period)
            elif self._policy != "none":
                frac = fraction_left(at, period, acct.tz, self._policy)
                self._prorate(sub, acct, sub.items, None, at, period, frac, cid)
                tags.append(("chg", str(cid)))
            if sub.usage_open is not None and sub.usage_open < at and self._metrics_of(sub):
                sub.usage_unbilled.append(UsagePeriod(sub.usage_open, at, sub.items.plan, full_end=period.end))
        sub.usage_open = None
        sub.status = "cancelled"
        sub.ended_at = at
        sub.scheduled.clear()
        sub.cancel_at_period_end = False
        sub.active_coupons.clear()
        sub.usage_mrr = Fraction(0)
        self._flush_immediate(acct, cid)
        self._emit(acct, at, "cancel", sub, tags)

    def _reactivate(self, ev: ReactivateEvent) -> None:
        sub = self._subscription(ev.subscription)
        acct = self.accounts[sub.customer]
        if sub.status != "cancelled":
            if not sub.cancel_at_period_end:
                raise BookError(f"subscription: subscription {sub.id!r} has no cancellation to undo")
            sub.cancel_at_period_end = False
            sub.cancel_index = None
            return
        sub.usage_mrr = Fraction(0)
        sub.ended_at = None
        self._start(sub, acct, self._origin(ev.at, acct.tz), ev.at, "reactivate")

    def _pay(self, ev: PayEvent) -> None:
        invoice = self._invoice(ev.invoice)
        if invoice.status != "finalized":
            raise BookError(f"invoice: invoice {ev.invoice!r} is {invoice.status}, not awaiting payment")
        self.invoices[ev.invoice] = invoice.with_status("paid")
        self._out.status_changes.append((ev.invoice, "paid"))

    def _void(self, ev: VoidEvent) -> None:
        invoice = self._invoice(ev.invoice)
        if invoice.status != "finalized":
            raise BookError(f"invoice: only a finalized unpaid invoice can be voided; {ev.invoice!r} is "
                            f"{invoice.status}")
        notes = [n.number for n in self.credit_notes.values() if n.invoice == ev.invoice]
        if notes:
            raise BookError(f"invoice: {ev.invoice!r} has credit note(s) {', '.join(notes)} and can no "
                            "longer be voided")
        self.accounts[invoice.customer].credit += invoice.credit_applied
        self.invoices[ev.invoice] = invoice.with_status("void")
        self._out.status_changes.append((ev.invoice, "void"))

    def _credit_note(self, ev: CreditNoteEvent) -> None:
        """Issue the next CN- number against a finalized or paid invoice; its total becomes
        customer credit (the invoice and MRR are untouched)."""
        invoice = self._invoice(ev.invoice)
        acct = self._account(invoice.customer)
        try:
            note = draft_credit_note(
                invoice, ev.lines, earlier=self.credit_notes.values(),
                number=self.settings.invoice_numbering.credit_note(self.next_credit_note), at=ev.at, reason=ev.reason,
                tax_rate=acct.tax_rate, mode=self.settings.rounding)
        except CreditNoteError as exc:
            raise BookError(str(exc)) from None
        self.next_credit_note += 1
        self.credit_notes[note.number] = note
        acct.credit += note.total
        self._out.credit_notes.append(note)

    def _invoice(self, number: str) -> Invoice:
        if number in self._archived:
            self._unarchive(self._archived[number])
        try:
            return self.invoices[number]
        except KeyError:
            raise BookError(f"invoice: unknown invoice {number!r}") from None

    def _new_change_id(self) -> int:
        cid = self.next_change
        self.next_change += 1
        return cid

    def _metrics_of(self, sub: Subscription) -> list[str]:
        return [m.code for m in self._cat.plan_metrics(sub.items.plan)]

    # -- transitions ---------------------------------------------------------------------------

    def _advance(self, until: datetime) -> None:
        """Apply every transition due at or before `until`, in time order; at one instant:
        usage periods close, period-end changes and cancellations, trial ends, discount ends,
        discount starts, then the new period opens; subscriptions in creation order.

        The queue holds every subscription's next transition (plus stale entries, skipped when
        popped), so each step costs O(log N) instead of a scan of the book."""
        if self.__dict__.pop("_due_stale", False):
            self._queue_all()
        due = self._due
        while due and due[0][0] <= until:
            at, stage, order, sub_id = heapq.heappop(due)
            sub = self.subscriptions[sub_id]
            if self._next_transition(sub) != (at, stage, order):
                continue
            self._transition(sub, at, stage)
            if self.accounts[sub.customer].coupons:
                self._queue_customer(sub.customer)
            else:  # only a customer coupon links one subscription's transitions to another's
                self._queue(sub)

    def _queue(self, sub: Subscription) -> None:
        nxt = self._next_transition(sub)
        if nxt is not None:
            heapq.heappush(self._due, (*nxt, sub.id))

    def _queue_customer(self, customer: str) -> None:
        """A transition or command may change the next transition of any subscription of its
        customer (customer coupons), never of another customer's."""
        for sub_id in self.accounts[customer].subscriptions:
            self._queue(self.subscriptions[sub_id])

    def _queue_all(self) -> None:
        self._due = []
        for sub in self.subscriptions.values():
            self._queue(sub)

    def _requeue_after(self, event: Event) -> None:
        if isinstance(event, InvoiceRunEvent):
            # a run may end coupon windows of any customer: the queue is rebuilt when next
            # needed (the next `_advance`, a snapshot), which a batch's book never is
            self.__dict__["_due_stale"] = True
            return
        sub_id = getattr(event, "subscription", None)
        customer = getattr(event, "customer", None)
        if isinstance(sub_id, str) and sub_id in self.subscriptions:
            customer = self.subscriptions[sub_id].customer
        if isinstance(customer, str) and customer in self.accounts:
            self._queue_customer(customer)

    def _next_transition(self, sub: Subscription) -> tuple[datetime, int, int] | None:
        if sub.status == "trialing":
            assert sub.trial_end is not None
            stage = 1 if (sub.scheduled or sub.cancel_at_period_end) else 2
            return (sub.trial_end, stage, sub.order)
        if sub.status != "active" or sub.current is None:
            return None
        b = sub.current.end
        first = sub.stage + 1
        if first > 5:
            return None
        # stages 0 and 1 inline (the common case); stage 5, the new period, always comes
        if first == 0 and sub.usage_open is not None and self._cat.plan_metrics(sub.items.plan):
            return (b, 0, sub.order)
        if first <= 1 and (sub.scheduled or sub.cancel_at_period_end):
            return (b, 1, sub.order)
        # stage 2 is never relevant; 3 needs an active coupon, 4 a customer coupon
        if first <= 3 and sub.active_coupons and self._stage_relevant(sub, b, 3):
            return (b, 3, sub.order)
        if first <= 4 and self._stage_relevant(sub, b, 4):
            return (b, 4, sub.order)
        return (b, 5, sub.order)

    def _stage_relevant(self, sub: Subscription, b: datetime, stage: int) -> bool:
        if stage == 0:
            return sub.usage_open is not None and bool(self._cat.plan_metrics(sub.items.plan))
        if stage == 1:
            return bool(sub.scheduled) or sub.cancel_at_period_end
        if stage == 3:
            return any(self.coupons[c].windows.get(sub.id, (b, None))[1] == b for c in sub.active_coupons)
        if stage == 4:
            if not self.accounts[sub.customer].coupons:
                return False
            return any(c.recurring and c.id not in sub.active_coupons and c.windows.get(sub.id, (None,))[0] == b
                       for c in self._coupons_of(sub))
        return stage == 5

    def _transition(self, sub: Subscription, at: datetime, stage: int) -> None:
        acct = self.accounts[sub.customer]
        saved_index = self._index
        self._index = None
        try:
            if sub.status == "trialing":
                self._trial_transition(sub, acct, at, stage)
                return
            sub.stage = stage
            if stage == 0:
                self._close_usage(sub, acct, at)
            elif stage == 1:
                self._period_end_changes(sub, acct, at)
            elif stage == 3:
                ending = [c for c in sub.active_coupons if self.coupons[c].windows[sub.id][1] == at]
                for cid in ending:
                    sub.active_coupons.remove(cid)
                self._emit(acct, at, "discount_end", sub, [("per", sub.id, _k(at))])
            elif stage == 4:
                for coupon in self._coupons_of(sub):
                    window = coupon.windows.get(sub.id)
                    if coupon.recurring and window is not None and window[0] == at \
                            and coupon.id not in sub.active_coupons:
                        sub.active_coupons.append(coupon.id)
                        self._emit(acct, at, "discount", sub, [("cpn", str(coupon.id), sub.id, _k(at))])
            elif stage == 5:
                assert sub.grid is not None
                period = sub.grid.period_containing(at)
                sub.current = period
                sub.stage = -1
                sub.unbilled.append(LicensedPeriod(period, sub.items.copy()))
        finally:
            self._index = saved_index

    def _trial_transition(self, sub: Subscription, acct: Account, at: datetime, stage: int) -> None:
        if stage == 1:
            for change in sub.scheduled:
                sub.items = self._changed_items(sub, acct, change)
            sub.scheduled.clear()
            if sub.cancel_at_period_end:
                sub.status = "cancelled"
                sub.ended_at = at
                sub.cancel_at_period_end = False
            return
        self._start(sub, acct, at, at, "trial_end")

    def _period_end_changes(self, sub: Subscription, acct: Account, at: datetime) -> None:
        changes, sub.scheduled = sub.scheduled, []
        for change in changes:
            self._index = change.index
            new_items = self._changed_items(sub, acct, change)
            self._apply_change(sub, acct, at, new_items, change.cause, at_boundary=True)
        if sub.cancel_at_period_end:
            self._index = sub.cancel_index
            self._end(sub, acct, at, immediate=False)

    def _close_usage(self, sub: Subscription, acct: Account, at: datetime) -> None:
        """A usage period closes: bill it at the next run; its rated amount becomes the usage
        part of MRR (net of percent coupons), one movement for all its metrics."""
        assert sub.usage_open is not None
        period = UsagePeriod(sub.usage_open, at, sub.items.plan)
        sub.usage_unbilled.append(period)
        sub.usage_open = at
        if not self.settings.usage_in_mrr:
            return
        if not sub.usage_mrr and not self._cat.plan_metrics(period.plan):
            return  # nothing metered now or before: the usage part of MRR stays 0, nothing moves
        self._move_usage_mrr(sub, acct, period, self._usage_lines(sub, acct, period), at)

    def _move_usage_mrr(self, sub: Subscription, acct: Account, period: UsagePeriod, lines: list[InvoiceLine],
                        at: datetime) -> None:
        """The usage part of MRR becomes what `lines` charge for `period` (net of percent coupons,
        per month); a change is one movement, linked to the period's usage lines."""
        if not sub.usage_mrr and not any(line.amount for line in lines):
            return  # nothing charged now or before: the usage part of MRR stays 0, nothing moves
        # one line (one metric) is the common case: its amount is the sum
        amount = Fraction(lines[0].amount) if len(lines) == 1 else sum(
            (Fraction(line.amount) for line in lines), Fraction(0))
        if acct.coupons:
            for coupon in self._coupons_of(sub):
                window = coupon.windows.get(sub.id)
                if coupon.percent is not None and window is not None and covers(window, period.start):
                    amount *= 1 - coupon.percent
        plan = self._cat.plan(period.plan)
        factor = monthly_factor(plan.interval, plan.interval_count)
        usage_mrr = amount if factor == 1 else amount * factor
        if usage_mrr == sub.usage_mrr:
            return  # the usage part is what it was: the customer's MRR did not move
        sub.usage_mrr = usage_mrr
        self._emit(acct, at, "usage", sub, [("use", sub.id, _k(period.end))])

    # -- MRR -----------------------------------------------------------------------------------

    def _subscription_mrr(self, sub: Subscription, currency: str) -> Fraction:
        """Monthly recurring amount of one subscription: plan + seats + add-ons net of recurring
        coupons, plus the usage part; nothing while trialing or after it ended."""
        if sub.status != "active":
            return Fraction(0)
        items = sub.items
        terms = (tuple((c.percent, c.amount) for c in map(self.coupons.__getitem__, sub.active_coupons))
                 if sub.active_coupons else ())
        key = (currency, items.plan, items.quantity, tuple(items.addons.items()), terms)
        cat = self._cat
        recurring = cat.recurring.get(key)
        if recurring is None:
            plan = cat.plan(items.plan)
            base = Fraction(0)
            for kind, code, qty in items.priced():
                base += cat.price(kind, code, currency, qty)
            for percent, amount in terms:
                if percent is not None:
                    base -= base * percent
                elif amount is not None:
                    base -= min(Fraction(amount), base)
            recurring = cat.recurring[key] = base * monthly_factor(plan.interval, plan.interval_count)
        if sub.usage_mrr and self.settings.usage_in_mrr:
            return recurring + sub.usage_mrr
        return recurring

    def customer_mrr(self, customer: str) -> Decimal:
        acct = self.accounts[customer]
        exact = sum((self._subscription_mrr(self.subscriptions[s], acct.currency)
                     for s in acct.subscriptions), Fraction(0))
        return round_money(exact, acct.currency, self.settings.rounding)

    def _leg_levels(self, acct: Account) -> tuple[Decimal, dict[LegKey, Decimal]]:
        """The customer's rounded MRR and its split per (subscription, plan, product): each part
        rounded on its own, the residue that makes the parts sum to the rounded total given to
        the largest part (the first of equals, in subscription order)."""
        mode = self.settings.rounding
        cat = self._cat
        exact: dict[LegKey, Fraction] = {}
        for sub_id in acct.subscriptions:
            sub = self.subscriptions[sub_id]
            amount = self._subscription_mrr(sub, acct.currency)
            if amount:
                plan = cat.plan(sub.items.plan)
                exact[(sub.id, plan.code, plan.product)] = amount
        if len(exact) == 1:  # one part: it is the total, rounded the same way
            (key, amount), = exact.items()
            total = round_money(amount, acct.currency, mode)
            return total, ({key: total} if total else {})
        total = round_money(sum(exact.values(), Fraction(0)), acct.currency, mode)
        levels = {key: round_money(amount, acct.currency, mode) for key, amount in exact.items()}
        residue = total - sum(levels.values(), Decimal(0))
        if residue and levels:
            largest = max(exact, key=lambda k: abs(exact[k]))
            levels[largest] += residue
        return total, {key: value for key, value in levels.items() if value}

    def _legs(self, before: dict[LegKey, Decimal], after: dict[LegKey, Decimal], reporting: Decimal,
              rate: Fraction) -> tuple[Leg, ...]:
        """A movement's legs: the change per (subscription, plan, product) from `before` to
        `after` (old parts first), each converted on its own, the reporting residue on the
        largest leg so the legs sum to the movement's reporting delta."""
        rep = self.settings.reporting_currency
        mode = self.settings.rounding
        changes = [(key, after.get(key, Decimal(0)) - before.get(key, Decimal(0)))
                   for key in [*before, *(k for k in after if k not in before)]]
        changes = [(key, change) for key, change in changes if change]
        converted = [round_money(Fraction(change) * rate, rep, mode) for _, change in changes]
        residue = reporting - sum(converted, Decimal(0))
        if residue and changes:
            largest = max(range(len(changes)), key=lambda i: abs(changes[i][1]))
            converted[largest] += residue
        return tuple(Leg(subscription=key[0], plan=key[1], product=key[2], delta=change,
                                         reporting_delta=conv)
                     for (key, change), conv in zip(changes, converted, strict=True))

    def _emit(self, acct: Account, at: datetime, cause: str, sub: Subscription | None, tags: list[Tag]) -> None:
        """Emit one movement when the customer's rounded MRR changed (SCENARIOS.md, movements),
        with its legs: how the change splits over the customer's (subscription, plan, product)
        parts since the previous movement."""
        before = acct.mrr
        after, levels = self._leg_levels(acct)
        if after == before:
            return
        delta = after - before
        rep = self.settings.reporting_currency
        rate = self.fx_rate(acct.currency, at)
        reporting = round_money(Fraction(delta) * rate, rep, self.settings.rounding)
        legs = self._legs(acct.legs, levels, reporting, rate)
        common: dict[str, Any] = dict(
            id=self.next_movement, at=at, customer=acct.id, subscription=sub.id if sub is not None else None,
            currency=acct.currency, mrr_before=before, mrr_after=after, delta=delta, reporting_currency=rep,
            reporting_delta=reporting, cause=cause, event_index=self._index, legs=legs)
        movement: MrrMovement
        if before == 0:
            movement = Reactivation(**common) if acct.had_mrr else New(**common)
        elif after == 0:
            movement = Churn(**common)
        elif after > before:
            movement = Expansion(subtype=_EXPANSION_SUBTYPE.get(cause, "cross_sell"), **common)
        else:
            movement = Contraction(subtype=_CONTRACTION_SUBTYPE.get(cause, "cancel"), **common)
        self.next_movement += 1
        acct.mrr = after
        acct.legs = levels
        if after > 0:
            acct.had_mrr = True
        self._out.movements.append(movement)
        for tag in tags:
            acct.movement_tags.setdefault(tag, []).append(movement.id)
            for number, line in acct.line_tags.get(tag, ()):
                self._out.links.append((movement.id, LineRef(invoice=number, line=line)))

    def fx_rate(self, currency: str, at: datetime) -> Fraction:
        """Value of one unit of `currency` in the reporting currency at `at` (billing.fx), memoized
        per (currency, date) for these settings: `rate_at` reads only the date of `at`."""
        held: tuple[Settings, dict[tuple[str, date], Fraction]] | None = self.__dict__.get("_fx")
        if held is None or held[0] is not self.settings:
            held = self.__dict__["_fx"] = (self.settings, {})
        key = (currency, at.date())
        rate = held[1].get(key)
        if rate is None:
            try:
                rate = held[1][key] = rate_at(self.settings, currency, at)
            except MissingRate as exc:
                raise BookError(str(exc)) from None
        return rate

    # -- invoicing -----------------------------------------------------------------------------

    def _invoice_run(self, at: datetime) -> None:
        """Bill every billing date that has come by `at` and is not billed yet: per customer one
        invoice per date, oldest first; pending prorations on the customer's first invoice."""
        drafts: list[_Draft] = []
        for acct in sorted(self.accounts.values(), key=lambda a: a.order):
            drafts.extend(self._draft_customer(acct, at))
        drafts.sort(key=lambda d: (d.key, d.account.order))
        self._finalize(drafts, at)

    def _draft_customer(self, acct: Account, at: datetime) -> list[_Draft]:
        groups: dict[str, list[tuple[Subscription, LicensedPeriod | UsagePeriod]]] = {}
        for sub_id in acct.subscriptions:
            sub = self.subscriptions[sub_id]
            for lp in list(sub.unbilled):
                if lp.period.start <= at:
                    groups.setdefault(_local_day(lp.period.start, acct.tz), []).append((sub, lp))
                    sub.unbilled.remove(lp)
            for up in list(sub.usage_unbilled):
                if up.end <= at:
                    groups.setdefault(_local_day(up.end, acct.tz), []).append((sub, up))
                    sub.usage_unbilled.remove(up)
        drafts: list[_Draft] = []
        for key in sorted(groups):
            coverage: dict[int, datetime] = {}
            plan_lines: list[tuple[InvoiceLine, list[Tag]]] = []
            addon_lines: list[tuple[InvoiceLine, list[Tag]]] = []
            usage_lines: list[tuple[InvoiceLine, list[Tag]]] = []
            for sub, billed in groups[key]:
                if isinstance(billed, LicensedPeriod):
                    for line in self._licensed_lines(sub, acct, billed):
                        target = plan_lines if line.kind == "plan" else addon_lines
                        target.append((line, [("per", sub.id, _k(billed.period.start))]))
                        coverage[id(line)] = billed.period.start
                else:
                    rated = self._usage_lines(sub, acct, billed)
                    if self.settings.usage_in_mrr and billed.end == sub.usage_open:
                        # usage that came in after the period closed (within the grace) is billed:
                        # the usage part of MRR moves to the amount billed for the period
                        self._move_usage_mrr(sub, acct, billed, rated, at)
                    for line in rated:
                        usage_lines.append((line, [("use", sub.id, _k(billed.end))]))
                        coverage[id(line)] = billed.start
            for lines in (plan_lines, addon_lines, usage_lines):
                if len(lines) > 1:  # (one line is in order)
                    lines.sort(key=lambda pair: self.subscriptions[pair[0].subscription or ""].order)
            drafts.append(_Draft(acct, key, plan_lines + addon_lines + usage_lines, coverage))
        if acct.pending:
            if not drafts:
                drafts.append(_Draft(acct, _local_day(at, acct.tz), []))
            first = drafts[0]
            for pending in acct.pending:
                first.lines.append((pending.line, pending.tags))
                first.coverage[id(pending.line)] = pending.coverage_start
            acct.pending = []
        if acct.coupons:  # without coupons there is no discount line (a draft's list stays empty)
            for draft in drafts:
                prorations_only = all(line.kind == "proration" for line, _ in draft.lines)
                self._apply_coupons(draft, proration_only=prorations_only)
        return drafts

    def _licensed_lines(self, sub: Subscription, acct: Account, lp: LicensedPeriod) -> list[InvoiceLine]:
        period = lp.period
        share: Fraction | None = None  # the whole period
        share_key: tuple[int, int] | None = None  # a Fraction hashes slowly
        if period.partial:
            share = (second_fraction(period.start, period) if self._policy == "second"
                     else day_fraction(period.start, period, acct.tz))
            share_key = (share.numerator, share.denominator)
        memo = self._cat.line_terms
        mode = self.settings.rounding
        lines = []
        for kind, code, qty in lp.items.priced():
            key = (kind, code, acct.currency, qty, share_key, mode)
            terms = memo.get(key)
            if terms is None:
                terms = memo[key] = self._licensed_terms(kind, code, acct.currency, qty, share)
            description, quantity, unit_amount, amount = terms
            lines.append(InvoiceLine(
                kind="plan" if kind == "plan" else "addon",
                description=description,
                subscription=sub.id,
                quantity=quantity,
                unit_amount=unit_amount,
                amount=amount,
                period_start=period.start,
                period_end=period.end,
            ))
        return lines

    def _licensed_terms(self, kind: str, code: str, currency: str, qty: int, share: Fraction | None) -> LineTerms:
        """A licensed line's terms for `share` of a period (None: the whole period): a pure function
        of these, the rounding mode and the catalog (memoized in `_cat.line_terms`)."""
        item = self._item(kind, code)
        price = self._cat.price(kind, code, currency, qty)
        amount = round_money(price if share is None else price * share, currency, self.settings.rounding)
        return describe(item, qty), Decimal(shown_quantity(item, qty)), item.unit_price(currency), amount

    def _usage_lines(self, sub: Subscription, acct: Account, up: UsagePeriod) -> list[InvoiceLine]:
        """The usage lines of a closed period. Rated once per command (a run closes a period and
        bills it): the memo is emptied whenever usage is recorded or the source changes."""
        rated: dict[tuple[Any, ...], list[InvoiceLine]] = self.__dict__.setdefault("_rated", {})
        key = (sub.id, up.start, up.end, up.full_end, up.plan, acct.currency)
        lines = rated.get(key)
        if lines is None:
            lines = rated[key] = self._rate_usage(sub, acct, up)
        return list(lines)

    def _rate_usage(self, sub: Subscription, acct: Account, up: UsagePeriod) -> list[InvoiceLine]:
        cat = self._cat
        memo = cat.line_terms
        mode = self.settings.rounding
        usage = self.usage
        lines = []
        for metric in cat.plan_metrics(up.plan):
            quantity = usage.aggregate(sub.id, metric, up.start, up.end, held_until=up.full_end)
            key = ("usage", metric.code, acct.currency, quantity.numerator, quantity.denominator, mode)
            terms = memo.get(key)
            if terms is None:
                terms = memo[key] = self._usage_terms(metric, acct.currency, quantity)
            description, shown, unit_amount, amount = terms
            lines.append(InvoiceLine(
                kind="usage",
                description=description,
                subscription=sub.id,
                quantity=shown,
                unit_amount=unit_amount,
                amount=amount,
                period_start=up.start,
                period_end=up.end,
                included=metric.included,
            ))
        return lines

    def _usage_terms(self, metric: Metric, currency: str, quantity: Fraction) -> LineTerms:
        """A usage line's terms for an aggregate: a pure function of these, the rounding mode and
        the catalog (memoized in `_cat.line_terms`)."""
        amount = round_money(rate(metric, quantity, currency), currency, self.settings.rounding)
        description = (f"{metric.name or metric.code} (aggregate {metric.aggregation}, "
                       f"{_plain(metric.included)} included)")
        return description, _fraction_decimal(quantity), metric.unit_price(currency), amount

    def _apply_coupons(self, draft: _Draft, *, proration_only: bool) -> None:
        acct = draft.account
        draft.discount_lines = discount_lines(
            [line for line, _ in draft.lines], draft.coverage, [self.coupons[c] for c in acct.coupons],
            subscription_order=lambda s: self.subscriptions[s].order, currency=acct.currency,
            mode=self.settings.rounding, proration_only=proration_only)

    def _finalize(self, drafts: list[_Draft], at: datetime) -> None:
        """Number the drafts in order and compute totals, tax and credit (SCENARIOS.md, Amounts)."""
        mode = self.settings.rounding
        for draft in drafts:
            acct = draft.account
            cur = acct.currency
            pairs = draft.lines + draft.discount_lines
            lines = tuple(line for line, _ in pairs)
            amounts = totals(lines, acct.tax_rate, acct.credit, cur, mode)
            acct.credit += amounts.credit_change
            number = self._invoice_number(acct)
            invoice = Invoice(
                number=number, customer=acct.id, currency=cur, status=amounts.status,
                issued_at=at, billing_date=draft.key, lines=lines,
                subtotal=amounts.subtotal, discount=amounts.discount, tax=amounts.tax, total=amounts.total,
                credit_applied=amounts.credit_applied, amount_due=amounts.amount_due,
                credit_added=amounts.credit_added)
            self.invoices[number] = invoice
            self.invoice_order.append(number)
            self._out.issued.append(invoice)
            for index, (_, tags) in enumerate(pairs):
                ref: LineRef | None = None
                for tag in tags:
                    acct.line_tags.setdefault(tag, []).append((number, index))
                    for movement_id in acct.movement_tags.get(tag, ()):
                        ref = ref or LineRef(invoice=number, line=index)
                        self._out.links.append((movement_id, ref))

    def _invoice_number(self, acct: Account) -> str:
        """The next number of the invoice's series (settings `invoice_numbering`): the book's
        counter, or the customer's own with `scope: customer`."""
        numbering = self.settings.invoice_numbering
        if numbering.scope == "customer":
            acct.next_invoice += 1
            return numbering.invoice(acct.next_invoice - 1, acct.id)
        self.next_invoice += 1
        return numbering.invoice(self.next_invoice - 1, acct.id)

    # -- read side -----------------------------------------------------------------------------

    def next_transition_at(self, customer: str) -> datetime | None:
        """When the clock next changes something of this customer's (a period opening, a usage
        period closing, a scheduled change, a trial or coupon ending); None when nothing is due."""
        times = [nxt[0] for s in self.accounts[customer].subscriptions
                 if (nxt := self._next_transition(self.subscriptions[s])) is not None]
        return min(times, default=None)

    def billable_at(self, customer: str) -> datetime | None:
        """From when a run has something to bill for this customer without any transition:
        an unbilled period's start, an unbilled usage period's end, or pending prorations."""
        acct = self.accounts[customer]
        times = [acct.created_at] if acct.pending else []
        for sub_id in acct.subscriptions:
            sub = self.subscriptions[sub_id]
            times.extend(lp.period.start for lp in sub.unbilled)
            times.extend(up.end for up in sub.usage_unbilled)
        return min(times, default=None)

    def issued_invoices(self) -> list[Invoice]:
        self._unarchive_all()
        return [self.invoices[n] for n in self.invoice_order]

    # -- archived invoices ---------------------------------------------------------------------

    def archive_invoices(self, customer: str, archived: list[Archived]) -> None:
        """Take a customer's past invoices still encoded (billing.shards): they are numbered in
        `invoice_order` now and decoded only when a command or a reader needs one. Call before
        the customer's decoded invoices are added (the archived ones were issued first)."""
        if not archived:
            return
        self._archive.setdefault(customer, []).extend(archived)
        for numbers, _ in archived:
            self.invoice_order.extend(numbers)
            self._archived.update(dict.fromkeys(numbers, customer))

    def archived_invoices(self, customer: str) -> list[Archived]:
        """The customer's invoices that are still archived (nothing has read them)."""
        return self._archive.get(customer, [])

    def is_archived(self, number: str) -> bool:
        return number in self._archived

    def _unarchive(self, customer: str) -> None:
        for numbers, data in self._archive.pop(customer, []):
            for number, invoice in zip(numbers, decode_invoices(data), strict=True):
                self.invoices[number] = invoice
                del self._archived[number]

    def _unarchive_all(self) -> None:
        for customer in list(self.__dict__.get("_archive", ())):
            self._unarchive(customer)

    def issued_credit_notes(self) -> list[CreditNote]:
        return list(self.credit_notes.values())

    def current_mrr(self) -> dict[str, Decimal]:
        return {c: a.mrr for c, a in self.accounts.items()}

    def allocate_movement_id(self) -> int:
        """The next movement id, for a ledger entry written outside `apply` (a reversal), so
        ids stay unique and ascending in the order entries are written."""
        movement_id = self.next_movement
        self.next_movement += 1
        return movement_id


_EXPANSION_SUBTYPE: dict[str, ExpansionSubtype] = {
    "change_quantity": "seat",
    "change_plan": "upgrade",
    "add_addon": "add_on",
    "remove_addon": "add_on",
    "usage": "usage",
    "subscribe": "cross_sell",
    "trial_end": "cross_sell",
    "reactivate": "cross_sell",
    "discount_end": "discount_end",
}
_CONTRACTION_SUBTYPE: dict[str, ContractionSubtype] = {
    "change_quantity": "seat",
    "change_plan": "downgrade",
    "add_addon": "add_on",
    "remove_addon": "add_on",
    "usage": "usage",
    "cancel": "cancel",
    "discount": "discount",
}

LINE_KINDS: tuple[LineKind, ...] = ("plan", "addon", "usage", "proration", "discount")


def _k(instant: datetime) -> str:
    """An instant in a link tag."""
    return _utc_iso(instant) if instant.tzinfo is UTC else instant.isoformat()


def _local_day(instant: datetime, tz: str) -> str:
    """The local date (YYYY-MM-DD) of an instant in `tz`: an invoice's billing date."""
    return _utc_local_day(instant, tz) if instant.tzinfo is UTC else local_date(instant, tz).isoformat()


# Memoized for UTC instants only (every instant the book makes is one; a run meets the same period
# starts and ends again and again): equal UTC instants are written alike, whereas equal instants
# with other offsets, or a wall time twice in a zone (fold), are not.
@lru_cache(maxsize=4096)
def _utc_iso(instant: datetime) -> str:
    return instant.isoformat()


@lru_cache(maxsize=4096)
def _utc_local_day(instant: datetime, tz: str) -> str:
    return local_date(instant, tz).isoformat()


def _line_at(at: LineRef | LineAt) -> LineAt:
    return (at.invoice, at.line) if isinstance(at, LineRef) else at


def _where(index: int | None, kind: str) -> str:
    return f"events[{index}] ({kind}): " if index is not None else f"{kind}: "


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text


def _fraction_decimal(value: Fraction) -> Decimal:
    if value.denominator == 1:
        return Decimal(value.numerator)
    return (Decimal(value.numerator) / Decimal(value.denominator)).quantize(Decimal("0.000001"))


