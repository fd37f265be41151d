"""The tables of the book in customer parts and of invoice runs (migration 0005_runs).

- `customer_books`: one row per customer holding its part of the book (`billing.shards`), with a
  `version` every save checks and bumps, its creation `position`, and when it next needs the clock
  (`transition_at`) or a run (`due_at`), both indexed: a command loads the customers it names plus
  those with a transition due by its time; a run selects `due_at <= as_of` in batches.
- `number_sequences`: the next value of each series the whole book shares (invoice and credit note
  numbers with their prefix, movement, change and coupon ids, creation order). A command bumps
  them in its own transaction, so a number is taken only by a command that commits: no gaps.
- `invoice_runs` and `invoice_run_customers`: a run as a record, its state and each due customer's
  progress (pending, done, failed with the reason).
- `billed_periods`: one row per (subscription, kind, period) an invoice bills; its primary key
  makes a second invoice for the same subscription period impossible whatever the code does.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from billing.persistence.tables import CODE, Base

RUN_STATES = ("planned", "drafting", "finalizing", "done", "failed")
RUN_CUSTOMER_STATES = ("pending", "done", "failed")


class CustomerBookRow(Base):
    __tablename__ = "customer_books"
    __table_args__ = (
        Index("ix_customer_books_transition_at", "transition_at"),
        Index("ix_customer_books_due_at", "due_at"),
    )

    customer: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, unique=True)  # creation order
    snapshot: Mapped[bytes] = mapped_column(LargeBinary)
    version: Mapped[int] = mapped_column(Integer)
    transition_at: Mapped[datetime | None]
    due_at: Mapped[datetime | None]


class NumberSequenceRow(Base):
    __tablename__ = "number_sequences"

    series: Mapped[str] = mapped_column(String(32), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32))
    next: Mapped[int] = mapped_column(BigInteger)


class InvoiceRunRow(Base):
    __tablename__ = "invoice_runs"
    __table_args__ = (
        CheckConstraint("state IN ('planned', 'drafting', 'finalizing', 'done', 'failed')", name="state"),
        Index("ix_invoice_runs_as_of", "as_of"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    as_of: Mapped[datetime]
    state: Mapped[str] = mapped_column(String(16))
    command_id: Mapped[int] = mapped_column(ForeignKey("commands.id"))
    actor: Mapped[str] = mapped_column(String(200))
    customers: Mapped[int] = mapped_column(Integer)  # due when planned
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    error: Mapped[str | None] = mapped_column(Text)


class InvoiceRunCustomerRow(Base):
    __tablename__ = "invoice_run_customers"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'done', 'failed')", name="state"),
        Index("ix_invoice_run_customers_run_state_position", "run_id", "state", "position"),
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("invoice_runs.id"), primary_key=True)
    customer: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    invoices: Mapped[int] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)


class BilledPeriodRow(Base):
    __tablename__ = "billed_periods"

    subscription: Mapped[str] = mapped_column(String(CODE), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # licensed | usage
    period_start: Mapped[datetime] = mapped_column(primary_key=True)
    period_end: Mapped[datetime] = mapped_column(primary_key=True)
    invoice_number: Mapped[str] = mapped_column(String(CODE), ForeignKey("invoices.number"))


class NumberClaimRow(Base):
    """A pipelined PostgreSQL batch's forecast of the numbers it will take (`billing.persistence.
    claims`): a hint so that concurrent workers number disjoint ranges, never the numbers
    themselves (those are taken from `number_sequences` at commit, gap-free as ever)."""

    __tablename__ = "number_claims"

    ticket: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    run_id: Mapped[int] = mapped_column(Integer)
    invoice_from: Mapped[int] = mapped_column(BigInteger)
    invoice_to: Mapped[int] = mapped_column(BigInteger)
    movement_from: Mapped[int] = mapped_column(BigInteger)
    movement_to: Mapped[int] = mapped_column(BigInteger)
    change_from: Mapped[int] = mapped_column(BigInteger)
    change_to: Mapped[int] = mapped_column(BigInteger)
