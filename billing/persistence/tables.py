"""The schema: one SQLAlchemy 2 declarative model per table.

- `book_state` is a single row holding the engine's settings, catalog and state snapshot, with a
  `version` that every save checks and bumps (optimistic concurrency: a save whose version moved
  since it was loaded fails, so two concurrent commands cannot both win).
- `invoices`, `invoice_lines`, `credit_notes`, `credit_note_lines`, `mrr_movements`,
  `mrr_movement_legs`, `movement_invoice_lines` and `commands` are the insert-only ledger written
  in the same transaction as the snapshot. Only an invoice's `status` ever changes (pay, void); a
  credit note references the invoice lines it corrects and never changes them. The expansion
  ledger (`mrr_movements`, `mrr_movement_legs`, `movement_invoice_lines`) is insert-only by the
  database itself: triggers refuse UPDATE and DELETE (migration 0003). A correction is a new
  `reversal` entry that references the entry it negates; every entry has a unique idempotency key.
- `customer_mrr_months` holds each customer's MRR at the start and end of every month it moved,
  maintained in the same transaction as the movements; the SQL metric set reads levels from it.
- `customers` and `subscriptions` are a current view for queries, refreshed after each command.
- Money is integer minor units of the row's currency (`billing.money.to_minor`); unit prices,
  quantities and rates are exact decimals; instants are UTC.

Migrations (`migrations/versions`) create this schema; a test checks they match these models.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from billing.persistence.types import ExactDecimal, UTCDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CODE = 200  # length of customer, subscription, plan and invoice identifiers


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), Decimal: ExactDecimal(), date: Date()}


class BookStateRow(Base):
    """The one row of engine state: settings, catalog, snapshot and its version."""

    __tablename__ = "book_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    catalog: Mapped[dict[str, Any]] = mapped_column(JSON)
    snapshot: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]
    clock: Mapped[datetime | None]  # the latest command's time (0005_runs; the parts hold the rest)


class CustomerRow(Base):
    """Current view of a customer, with its MRR and credit balance in minor units."""

    __tablename__ = "customers"
    __table_args__ = ({"postgresql_with": {"fillfactor": 50}},)  # HOT updates (migration 0010_hot_views)

    id: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3))
    tax_rate: Mapped[Decimal]
    timezone: Mapped[str] = mapped_column(String(64))
    locale: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(500))
    tags: Mapped[dict[str, Any]] = mapped_column(JSON)
    mrr: Mapped[int] = mapped_column(BigInteger)
    credit_balance: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    version: Mapped[int] = mapped_column(Integer)

    __mapper_args__ = {"version_id_col": version}


class SubscriptionRow(Base):
    """Current view of a subscription: items in force, status, current period, pending changes."""

    __tablename__ = "subscriptions"
    __table_args__ = (
        CheckConstraint("status IN ('trialing', 'active', 'cancelled')", name="status"),
        {"postgresql_with": {"fillfactor": 50}},  # HOT updates (migration 0010_hot_views)
    )

    id: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    customer: Mapped[str] = mapped_column(String(CODE), ForeignKey("customers.id"), index=True)
    plan: Mapped[str] = mapped_column(String(CODE))
    quantity: Mapped[int] = mapped_column(BigInteger)
    addons: Mapped[dict[str, Any]] = mapped_column(JSON)  # add-on code -> quantity
    status: Mapped[str] = mapped_column(String(20))
    cancel_at_period_end: Mapped[bool] = mapped_column(Boolean)
    scheduled: Mapped[list[Any]] = mapped_column(JSON)  # period-end changes not yet in force
    trial_end: Mapped[datetime | None]
    current_period_start: Mapped[datetime | None]
    current_period_end: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    version: Mapped[int] = mapped_column(Integer)

    __mapper_args__ = {"version_id_col": version}


class CommandRow(Base):
    """Every accepted command, in order; `idempotency_key` makes a retried command a no-op."""

    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    recorded_at: Mapped[datetime]
    at: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    event_index: Mapped[int | None] = mapped_column(Integer)


class InvoiceRow(Base):
    __tablename__ = "invoices"
    __table_args__ = (
        CheckConstraint("status IN ('finalized', 'paid', 'void')", name="status"),
    )

    number: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # issue order
    customer: Mapped[str] = mapped_column(String(CODE), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    issued_at: Mapped[datetime]
    billing_date: Mapped[date]
    subtotal: Mapped[int] = mapped_column(BigInteger)
    discount: Mapped[int] = mapped_column(BigInteger)
    tax: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)
    credit_applied: Mapped[int] = mapped_column(BigInteger)
    amount_due: Mapped[int] = mapped_column(BigInteger)
    credit_added: Mapped[int] = mapped_column(BigInteger)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"), index=True)

    lines: Mapped[list[InvoiceLineRow]] = relationship(
        order_by="InvoiceLineRow.line_index", lazy="raise"
    )


class InvoiceLineRow(Base):
    __tablename__ = "invoice_lines"

    invoice_number: Mapped[str] = mapped_column(
        String(CODE), ForeignKey("invoices.number"), primary_key=True
    )
    line_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text)
    subscription: Mapped[str | None] = mapped_column(String(CODE))
    quantity: Mapped[Decimal | None]
    unit_amount: Mapped[Decimal | None]  # exact: a unit price may be finer than the minor unit
    amount: Mapped[int] = mapped_column(BigInteger)
    included: Mapped[Decimal | None]
    period_start: Mapped[datetime | None]
    period_end: Mapped[datetime | None]


class CreditNoteRow(Base):
    """A credit note against an invoice, in its own gap-free series (`CN-0001`, …)."""

    __tablename__ = "credit_notes"
    __table_args__ = (
        CheckConstraint(
            "reason IN ('duplicate', 'product_unsatisfactory', 'order_change', 'other')", name="reason"
        ),
    )

    number: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, unique=True)  # issue order
    invoice_number: Mapped[str] = mapped_column(String(CODE), ForeignKey("invoices.number"), index=True)
    customer: Mapped[str] = mapped_column(String(CODE), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    issued_at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(String(32))
    subtotal: Mapped[int] = mapped_column(BigInteger)
    tax: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[int] = mapped_column(BigInteger)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"), index=True)


class CreditNoteLineRow(Base):
    """One credited invoice line; `invoice_number` repeats the note's so the reference to the
    invoice line is a real foreign key."""

    __tablename__ = "credit_note_lines"
    __table_args__ = (
        ForeignKeyConstraint(
            ["invoice_number", "invoice_line_index"],
            ["invoice_lines.invoice_number", "invoice_lines.line_index"],
            name="fk_credit_note_lines_invoice_lines",
        ),
        CheckConstraint("amount > 0", name="amount_positive"),
        Index("ix_credit_note_lines_invoice_line", "invoice_number", "invoice_line_index"),
    )

    credit_note_number: Mapped[str] = mapped_column(
        String(CODE), ForeignKey("credit_notes.number"), primary_key=True
    )
    line_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    invoice_number: Mapped[str] = mapped_column(String(CODE))
    invoice_line_index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text)
    amount: Mapped[int] = mapped_column(BigInteger)


class MovementRow(Base):
    """One expansion-ledger entry. `entry` is `movement`, or `reversal` for a correcting entry
    that negates the movement it `reverses` (same type and subtype, opposite deltas, same `at`)."""

    __tablename__ = "mrr_movements"
    __table_args__ = (
        CheckConstraint(
            "type IN ('new', 'expansion', 'contraction', 'churn', 'reactivation')", name="type"
        ),
        CheckConstraint("entry IN ('movement', 'reversal')", name="entry"),
        CheckConstraint("(entry = 'reversal') = (reverses IS NOT NULL)", name="reversal_reference"),
        Index("ix_mrr_movements_customer_at", "customer", "at"),
        Index("ix_mrr_movements_idempotency_key", "idempotency_key", unique=True),
        Index("ix_mrr_movements_reverses", "reverses", unique=True),
        Index("ix_mrr_movements_month", "month"),
        Index("ix_mrr_movements_at", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    customer: Mapped[str] = mapped_column(String(CODE))
    subscription: Mapped[str | None] = mapped_column(String(CODE))
    type: Mapped[str] = mapped_column(String(16))
    subtype: Mapped[str | None] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    mrr_before: Mapped[int] = mapped_column(BigInteger)
    mrr_after: Mapped[int] = mapped_column(BigInteger)
    delta: Mapped[int] = mapped_column(BigInteger)
    reporting_currency: Mapped[str] = mapped_column(String(3))
    reporting_delta: Mapped[int] = mapped_column(BigInteger)
    cause: Mapped[str] = mapped_column(String(64))
    event_index: Mapped[int | None] = mapped_column(Integer)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(250))  # the command's key or id, and the position
    entry: Mapped[str] = mapped_column(String(16))
    reverses: Mapped[int | None] = mapped_column(ForeignKey("mrr_movements.id"))
    month: Mapped[int] = mapped_column(Integer)  # UTC calendar month of `at`: year * 12 + month - 1


class MovementLegRow(Base):
    """A movement's change of MRR on one (subscription, plan, product); a movement's legs sum to
    its delta and its reporting delta."""

    __tablename__ = "mrr_movement_legs"

    movement_id: Mapped[int] = mapped_column(ForeignKey("mrr_movements.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    subscription: Mapped[str | None] = mapped_column(String(CODE))
    plan: Mapped[str | None] = mapped_column(String(CODE))
    product: Mapped[str | None] = mapped_column(String(CODE))
    delta: Mapped[int] = mapped_column(BigInteger)
    reporting_delta: Mapped[int] = mapped_column(BigInteger)


class CustomerMonthRow(Base):
    """A customer's MRR (minor units of its currency) at the start and at the end of a month in
    which it moved; a month without a row keeps the previous row's end. Rows chain: a row's
    `mrr_start` is the previous row's `mrr_end`. Also the month's number of expansion entries and
    the MRR lost to contraction and churn (reporting currency minor units, positive), net of
    reversals. Maintained with the movements (a reversal adjusts its month and every later one),
    so it is a snapshot, not part of the ledger."""

    __tablename__ = "customer_mrr_months"
    __table_args__ = (Index("ix_customer_mrr_months_month", "month"),)

    customer: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    month: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    currency: Mapped[str] = mapped_column(String(3))
    mrr_start: Mapped[int] = mapped_column(BigInteger)
    mrr_end: Mapped[int] = mapped_column(BigInteger)
    expansions: Mapped[int] = mapped_column(Integer)
    lost: Mapped[int] = mapped_column(BigInteger)


class MonthFlowRow(Base):
    """The ledger's flows per calendar month, type and subtype ('' for none): the sum of the
    entries' reporting deltas and how many there are (a reversal counts -1). Maintained with the
    movements; the monthly metric set reads it instead of the movements."""

    __tablename__ = "mrr_month_flows"

    month: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    type: Mapped[str] = mapped_column(String(16), primary_key=True)
    subtype: Mapped[str] = mapped_column(String(16), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[int] = mapped_column(Integer)


class MonthMeasureRow(Base):
    """Difference arrays of the book's monthly measures (`billing.month_measures`): a measure's
    value in month m is the sum of its amounts up to m. Maintained with the movements."""

    __tablename__ = "mrr_month_measures"

    measure: Mapped[str] = mapped_column(String(40), primary_key=True)
    month: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    amount: Mapped[int] = mapped_column(BigInteger)


class MovementLineRow(Base):
    """A movement's reference to an invoice line that billed it."""

    __tablename__ = "movement_invoice_lines"
    __table_args__ = (
        ForeignKeyConstraint(
            ["invoice_number", "line_index"],
            ["invoice_lines.invoice_number", "invoice_lines.line_index"],
            name="fk_movement_invoice_lines_invoice_lines",
        ),
    )

    movement_id: Mapped[int] = mapped_column(ForeignKey("mrr_movements.id"), primary_key=True)
    invoice_number: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    line_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"), index=True)


class UsageEventRow(Base):
    """One accepted usage event (billing.usage): insert-only, unique per (subscription, key).

    `at` is integer UTC microseconds; `value` and `quantity` are exact decimals scaled by
    `billing.usage.SCALE`. `matched`, `quantity` and `dim` are the event's metric's filter, field
    and distinct-count text resolved once on arrival, so aggregation is plain SQL over columns.
    `seq` is the arrival order (ties at one instant)."""

    __tablename__ = "usage_events"
    __table_args__ = (
        UniqueConstraint("subscription", "key", name="uq_usage_events_subscription_key"),
        Index("ix_usage_events_subscription_metric_at", "subscription", "metric", "at"),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    subscription: Mapped[str] = mapped_column(String(CODE))
    metric: Mapped[str] = mapped_column(String(CODE))
    at: Mapped[int] = mapped_column(BigInteger)
    value: Mapped[int] = mapped_column(BigInteger)
    matched: Mapped[bool] = mapped_column(Boolean)
    quantity: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    dim: Mapped[str | None] = mapped_column(Text, nullable=True)
    key: Mapped[str] = mapped_column(String(500))
    properties: Mapped[str] = mapped_column(Text)
    ingest_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # audit_log row of the ingest


class AuditLogRow(Base):
    """Who changed billing state outside the command ledger, and when: catalog loads and usage
    ingests (migration 0007). Insert-only (triggers)."""

    __tablename__ = "audit_log"
    __table_args__ = (UniqueConstraint("idempotency_key", name="uq_audit_log_idempotency_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(200))
    recorded_at: Mapped[datetime]
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
