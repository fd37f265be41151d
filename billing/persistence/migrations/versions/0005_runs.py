"""The book in customer parts, shared number sequences, invoice runs as records, billed periods.

Before this revision the whole book was one pickled snapshot in `book_state`. The upgrade splits
it into one `customer_books` row per customer (`billing.shards`), moves the counters into
`number_sequences` and the clock into `book_state.clock`, and backfills `billed_periods` from
the invoices already issued (so the never-twice key covers history too). The downgrade puts the
parts back together into one snapshot.

Revision ID: 0005_runs
Revises: 0004_usage
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from billing.persistence.types import UTCDateTime

revision: str = "0005_runs"
down_revision: str | None = "0004_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = 200
PREFIXES = {"invoice": "INV-", "credit_note": "CN-"}


def upgrade() -> None:
    with op.batch_alter_table("book_state") as batch:
        batch.add_column(sa.Column("clock", UTCDateTime(), nullable=True))
    op.create_table(
        "customer_books",
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("snapshot", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("transition_at", UTCDateTime(), nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("customer", name="pk_customer_books"),
        sa.UniqueConstraint("position", name="uq_customer_books_position"),
    )
    op.create_index("ix_customer_books_transition_at", "customer_books", ["transition_at"])
    op.create_index("ix_customer_books_due_at", "customer_books", ["due_at"])
    op.create_table(
        "number_sequences",
        sa.Column("series", sa.String(32), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("next", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("series", name="pk_number_sequences"),
    )
    op.create_table(
        "invoice_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("as_of", UTCDateTime(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("customers", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('planned', 'drafting', 'finalizing', 'done', 'failed')",
                           name="ck_invoice_runs_state"),
        sa.ForeignKeyConstraint(["command_id"], ["commands.id"], name="fk_invoice_runs_command_id_commands"),
        sa.PrimaryKeyConstraint("id", name="pk_invoice_runs"),
    )
    op.create_index("ix_invoice_runs_as_of", "invoice_runs", ["as_of"])
    op.create_table(
        "invoice_run_customers",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("invoices", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'done', 'failed')", name="ck_invoice_run_customers_state"),
        sa.ForeignKeyConstraint(["run_id"], ["invoice_runs.id"], name="fk_invoice_run_customers_run_id_invoice_runs"),
        sa.PrimaryKeyConstraint("run_id", "customer", name="pk_invoice_run_customers"),
    )
    op.create_index("ix_invoice_run_customers_run_state_position", "invoice_run_customers",
                    ["run_id", "state", "position"])
    op.create_table(
        "billed_periods",
        sa.Column("subscription", sa.String(CODE), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("period_start", UTCDateTime(), nullable=False),
        sa.Column("period_end", UTCDateTime(), nullable=False),
        sa.Column("invoice_number", sa.String(CODE), nullable=False),
        sa.ForeignKeyConstraint(["invoice_number"], ["invoices.number"],
                                name="fk_billed_periods_invoice_number_invoices"),
        sa.PrimaryKeyConstraint("subscription", "kind", "period_start", "period_end", name="pk_billed_periods"),
    )
    _split_the_snapshot()


def downgrade() -> None:
    _join_the_parts()
    op.drop_table("billed_periods")
    op.drop_index("ix_invoice_run_customers_run_state_position", table_name="invoice_run_customers")
    op.drop_table("invoice_run_customers")
    op.drop_index("ix_invoice_runs_as_of", table_name="invoice_runs")
    op.drop_table("invoice_runs")
    op.drop_table("number_sequences")
    op.drop_index("ix_customer_books_due_at", table_name="customer_books")
    op.drop_index("ix_customer_books_transition_at", table_name="customer_books")
    op.drop_table("customer_books")
    with op.batch_alter_table("book_state") as batch:
        batch.drop_column("clock")


def _tables() -> dict[str, sa.Table]:
    meta = sa.MetaData()
    return {
        "book_state": sa.Table("book_state", meta, sa.Column("id"), sa.Column("snapshot", sa.LargeBinary()),
                               sa.Column("clock", UTCDateTime()), sa.Column("settings", sa.JSON()),
                               sa.Column("catalog", sa.JSON())),
        "customer_books": sa.Table("customer_books", meta, sa.Column("customer"), sa.Column("position"),
                                   sa.Column("snapshot", sa.LargeBinary()), sa.Column("version"),
                                   sa.Column("transition_at", UTCDateTime()), sa.Column("due_at", UTCDateTime())),
        "number_sequences": sa.Table("number_sequences", meta, sa.Column("series"), sa.Column("prefix"),
                                     sa.Column("next")),
        "billed_periods": sa.Table("billed_periods", meta, sa.Column("subscription"), sa.Column("kind"),
                                   sa.Column("period_start", UTCDateTime()), sa.Column("period_end", UTCDateTime()),
                                   sa.Column("invoice_number")),
        "invoice_lines": sa.Table("invoice_lines", meta, sa.Column("invoice_number"), sa.Column("kind"),
                                  sa.Column("subscription"), sa.Column("period_start", UTCDateTime()),
                                  sa.Column("period_end", UTCDateTime())),
    }


def _split_the_snapshot() -> None:
    from billing.book import Book  # the book module of this version reads older snapshots
    from billing.shards import Counters, counters_of, due_of, split

    bind = op.get_bind()
    t = _tables()
    row = bind.execute(sa.select(t["book_state"].c.snapshot)).first()
    counters = Counters()
    if row is not None and row.snapshot:
        book = Book.loads(bytes(row.snapshot))
        counters = counters_of(book)
        rows: list[dict[str, Any]] = []
        for customer, part in split(book).items():
            due = due_of(book, customer)
            rows.append({"customer": customer, "position": part.account.order, "snapshot": part.dumps(),
                         "version": 1, "transition_at": due.transition_at, "due_at": due.due_at})
        if rows:
            bind.execute(t["customer_books"].insert(), rows)
        bind.execute(t["book_state"].update().values(snapshot=b"", clock=book.clock))
    bind.execute(t["number_sequences"].insert(), [
        {"series": name, "prefix": PREFIXES.get(name, ""), "next": getattr(counters, name)}
        for name in Counters.names()
    ])
    lines = t["invoice_lines"]
    billed = sa.select(
        lines.c.subscription,
        sa.case((lines.c.kind == "usage", sa.literal("usage")), else_=sa.literal("licensed")),
        lines.c.period_start, lines.c.period_end, sa.func.min(lines.c.invoice_number),
    ).where(lines.c.kind.in_(("plan", "usage")), lines.c.subscription.is_not(None)).group_by(
        lines.c.subscription, lines.c.kind, lines.c.period_start, lines.c.period_end)
    bind.execute(t["billed_periods"].insert().from_select(
        ["subscription", "kind", "period_start", "period_end", "invoice_number"], billed))


def _join_the_parts() -> None:
    from billing.book import Book
    from billing.catalog import Catalog
    from billing.scenario import Settings
    from billing.shards import Counters, CustomerPart, assemble

    bind = op.get_bind()
    t = _tables()
    state = bind.execute(sa.select(t["book_state"].c.settings, t["book_state"].c.catalog,
                                   t["book_state"].c.clock)).first()
    if state is None:
        return
    counters = Counters(**{r.series: r.next for r in bind.execute(sa.select(t["number_sequences"]))})
    parts = [CustomerPart.loads(bytes(r.snapshot)) for r in bind.execute(sa.select(t["customer_books"].c.snapshot))]
    book = assemble(Book(Settings.model_validate(state.settings), Catalog.model_validate(state.catalog)), parts,
                    counters, state.clock)
    bind.execute(t["book_state"].update().values(snapshot=book.dumps()))
