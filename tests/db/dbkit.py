"""Helpers for the database tests: the `Db` handle, a scripted `FakeBook` standing in for
`billing.book.Book` (it snapshots itself as JSON), and small record builders."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import text

from billing.book import Outcome
from billing.catalog import Catalog
from billing.persistence import Engine, create_engine
from billing.records import Invoice, InvoiceLine
from billing.scenario import Event, Settings

PG_ENV = "BILLING_TEST_POSTGRES_URL"


@dataclass
class Db:
    backend: str
    url: str
    engine: Engine


def reset_postgres(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


# --- a scripted book --------------------------------------------------------------------------

Script = Callable[["FakeBook", Event, "int | None"], Outcome]


class FakeBook:
    """A book whose `apply` runs `FakeBook.script` (set per test); it counts applied events."""

    script: ClassVar[Script | None] = None

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.applied = 0
        self.accounts: dict[str, Any] = {}
        self.subscriptions: dict[str, Any] = {}
        # what billing.shards.assemble fills and split / counters_of read
        self.coupons: dict[int, Any] = {}
        self.invoices: dict[str, Any] = {}
        self.invoice_order: list[str] = []
        self.credit_notes: dict[str, Any] = {}
        self.clock: datetime | None = None
        self.next_invoice = self.next_credit_note = self.next_movement = self.next_change = self.next_coupon = 1
        self.next_customer_order = self.next_subscription_order = 0

    def _queue_all(self) -> None:
        pass

    def use_usage_source(self, source: object) -> None:
        pass

    def apply(self, event: Event, index: int | None = None, *, discard_on_error: bool = False) -> Outcome:
        outcome = FakeBook.script(self, event, index) if FakeBook.script is not None else Outcome()
        self.applied += 1
        return outcome

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "settings": self.settings.model_dump(mode="json", by_alias=True),
                "catalog": self.catalog.model_dump(mode="json"),
                "applied": self.applied,
            }
        ).encode()

    @staticmethod
    def loads(data: bytes) -> FakeBook:
        raw = json.loads(data)
        book = FakeBook(Settings.model_validate(raw["settings"]), Catalog.model_validate(raw["catalog"]))
        book.applied = raw["applied"]
        return book


def scripted_command(engine: Engine, at: str = "2026-02-01", *, actor: str = "test") -> Outcome:
    """A command that goes through `service.execute` whatever the (fake) book makes of it: a
    payment of an invoice no customer has, so no customer part is loaded."""
    from billing import service

    return service.apply_event(engine, {"type": "pay", "at": f"{at}T00:00:00Z", "invoice": "SCRIPTED"}, actor=actor)


# --- record builders --------------------------------------------------------------------------


def t(text_: str) -> datetime:
    return datetime.fromisoformat(text_.replace("Z", "+00:00")).astimezone(UTC)


def line(amount: str, *, kind: str = "plan", quantity: str | None = "1", unit: str | None = None,
         sub: str | None = "s1", start: str | None = "2026-01-01T00:00:00Z",
         end: str | None = "2026-02-01T00:00:00Z", included: str | None = None) -> InvoiceLine:
    return InvoiceLine(
        kind=kind,  # type: ignore[arg-type]
        description=f"{kind} line",
        subscription=sub,
        quantity=None if quantity is None else Decimal(quantity),
        unit_amount=Decimal(unit if unit is not None else amount) if quantity is not None else None,
        amount=Decimal(amount),
        period_start=None if start is None else t(start),
        period_end=None if end is None else t(end),
        included=None if included is None else Decimal(included),
    )


def invoice(number: str, currency: str, lines: list[InvoiceLine], *, customer: str = "c1",
            tax: str = "0", credit: str = "0", status: str = "finalized",
            at: str = "2026-01-01T00:00:00Z") -> Invoice:
    subtotal = sum((ln.amount for ln in lines if ln.kind != "discount"), Decimal(0))
    discount = -sum((ln.amount for ln in lines if ln.kind == "discount"), Decimal(0))
    total = subtotal - discount + Decimal(tax)
    return Invoice(
        number=number,
        customer=customer,
        currency=currency,
        status=status,  # type: ignore[arg-type]
        issued_at=t(at),
        billing_date=at[:10],
        lines=tuple(lines),
        subtotal=subtotal,
        discount=discount,
        tax=Decimal(tax),
        total=total,
        credit_applied=Decimal(credit),
        amount_due=total - Decimal(credit),
    )
