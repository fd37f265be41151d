"""Initial schema: engine state, current view, ledger and command log.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from billing.persistence.types import ExactDecimal, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = 200


def upgrade() -> None:
    op.create_table(
        "book_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("catalog", sa.JSON(), nullable=False),
        sa.Column("snapshot", sa.LargeBinary(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_book_state_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_book_state")),
    )
    op.create_table(
        "customers",
        sa.Column("id", sa.String(CODE), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("tax_rate", ExactDecimal(), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("locale", sa.String(64), nullable=False),
        sa.Column("name", sa.String(500), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("mrr", sa.BigInteger(), nullable=False),
        sa.Column("credit_balance", sa.BigInteger(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("id", sa.String(CODE), nullable=False),
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("plan", sa.String(CODE), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("addons", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        sa.Column("scheduled", sa.JSON(), nullable=False),
        sa.Column("trial_end", UTCDateTime(), nullable=True),
        sa.Column("current_period_start", UTCDateTime(), nullable=True),
        sa.Column("current_period_end", UTCDateTime(), nullable=True),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('trialing', 'active', 'cancelled')", name=op.f("ck_subscriptions_status")
        ),
        sa.ForeignKeyConstraint(
            ["customer"], ["customers.id"], name=op.f("fk_subscriptions_customer_customers")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subscriptions")),
    )
    op.create_index(op.f("ix_subscriptions_customer"), "subscriptions", ["customer"])
    op.create_table(
        "commands",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("event_index", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commands")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_commands_idempotency_key")),
    )
    op.create_table(
        "invoices",
        sa.Column("number", sa.String(CODE), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("billing_date", sa.Date(), nullable=False),
        sa.Column("subtotal", sa.BigInteger(), nullable=False),
        sa.Column("discount", sa.BigInteger(), nullable=False),
        sa.Column("tax", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("credit_applied", sa.BigInteger(), nullable=False),
        sa.Column("amount_due", sa.BigInteger(), nullable=False),
        sa.Column("credit_added", sa.BigInteger(), nullable=False),
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.CheckConstraint("status IN ('finalized', 'paid', 'void')", name=op.f("ck_invoices_status")),
        sa.ForeignKeyConstraint(
            ["command_id"], ["commands.id"], name=op.f("fk_invoices_command_id_commands")
        ),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_invoices")),
        sa.UniqueConstraint("seq", name=op.f("uq_invoices_seq")),
    )
    op.create_index(op.f("ix_invoices_customer"), "invoices", ["customer"])
    op.create_index(op.f("ix_invoices_command_id"), "invoices", ["command_id"])
    op.create_table(
        "invoice_lines",
        sa.Column("invoice_number", sa.String(CODE), nullable=False),
        sa.Column("line_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("subscription", sa.String(CODE), nullable=True),
        sa.Column("quantity", ExactDecimal(), nullable=True),
        sa.Column("unit_amount", ExactDecimal(), nullable=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("included", ExactDecimal(), nullable=True),
        sa.Column("period_start", UTCDateTime(), nullable=True),
        sa.Column("period_end", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["invoice_number"], ["invoices.number"], name=op.f("fk_invoice_lines_invoice_number_invoices")
        ),
        sa.PrimaryKeyConstraint("invoice_number", "line_index", name=op.f("pk_invoice_lines")),
    )
    op.create_table(
        "mrr_movements",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("subscription", sa.String(CODE), nullable=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("subtype", sa.String(16), nullable=True),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("mrr_before", sa.BigInteger(), nullable=False),
        sa.Column("mrr_after", sa.BigInteger(), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("reporting_currency", sa.String(3), nullable=False),
        sa.Column("reporting_delta", sa.BigInteger(), nullable=False),
        sa.Column("cause", sa.String(64), nullable=False),
        sa.Column("event_index", sa.Integer(), nullable=True),
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "type IN ('new', 'expansion', 'contraction', 'churn', 'reactivation')",
            name=op.f("ck_mrr_movements_type"),
        ),
        sa.ForeignKeyConstraint(
            ["command_id"], ["commands.id"], name=op.f("fk_mrr_movements_command_id_commands")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mrr_movements")),
    )
    op.create_index("ix_mrr_movements_customer_at", "mrr_movements", ["customer", "at"])
    op.create_index(op.f("ix_mrr_movements_command_id"), "mrr_movements", ["command_id"])
    op.create_table(
        "movement_invoice_lines",
        sa.Column("movement_id", sa.Integer(), nullable=False),
        sa.Column("invoice_number", sa.String(CODE), nullable=False),
        sa.Column("line_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["command_id"], ["commands.id"], name=op.f("fk_movement_invoice_lines_command_id_commands")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_number", "line_index"],
            ["invoice_lines.invoice_number", "invoice_lines.line_index"],
            name="fk_movement_invoice_lines_invoice_lines",
        ),
        sa.ForeignKeyConstraint(
            ["movement_id"],
            ["mrr_movements.id"],
            name=op.f("fk_movement_invoice_lines_movement_id_mrr_movements"),
        ),
        sa.PrimaryKeyConstraint(
            "movement_id", "invoice_number", "line_index", name=op.f("pk_movement_invoice_lines")
        ),
    )
    op.create_index(
        op.f("ix_movement_invoice_lines_command_id"), "movement_invoice_lines", ["command_id"]
    )


def downgrade() -> None:
    op.drop_table("movement_invoice_lines")
    op.drop_table("mrr_movements")
    op.drop_table("invoice_lines")
    op.drop_table("invoices")
    op.drop_table("commands")
    op.drop_table("subscriptions")
    op.drop_table("customers")
    op.drop_table("book_state")
