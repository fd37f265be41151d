"""Credit notes: `credit_notes` and their `credit_note_lines`, each line referencing the invoice
line it corrects.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from billing.persistence.types import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = 200


def upgrade() -> None:
    op.create_table(
        "credit_notes",
        sa.Column("number", sa.String(CODE), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("invoice_number", sa.String(CODE), nullable=False),
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("issued_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("subtotal", sa.BigInteger(), nullable=False),
        sa.Column("tax", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("command_id", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "reason IN ('duplicate', 'product_unsatisfactory', 'order_change', 'other')",
            name=op.f("ck_credit_notes_reason"),
        ),
        sa.ForeignKeyConstraint(
            ["command_id"], ["commands.id"], name=op.f("fk_credit_notes_command_id_commands")
        ),
        sa.ForeignKeyConstraint(
            ["invoice_number"], ["invoices.number"], name=op.f("fk_credit_notes_invoice_number_invoices")
        ),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_credit_notes")),
        sa.UniqueConstraint("seq", name=op.f("uq_credit_notes_seq")),
    )
    op.create_index(op.f("ix_credit_notes_invoice_number"), "credit_notes", ["invoice_number"])
    op.create_index(op.f("ix_credit_notes_customer"), "credit_notes", ["customer"])
    op.create_index(op.f("ix_credit_notes_command_id"), "credit_notes", ["command_id"])
    op.create_table(
        "credit_note_lines",
        sa.Column("credit_note_number", sa.String(CODE), nullable=False),
        sa.Column("line_index", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("invoice_number", sa.String(CODE), nullable=False),
        sa.Column("invoice_line_index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_credit_note_lines_amount_positive")),
        sa.ForeignKeyConstraint(
            ["credit_note_number"],
            ["credit_notes.number"],
            name=op.f("fk_credit_note_lines_credit_note_number_credit_notes"),
        ),
        sa.ForeignKeyConstraint(
            ["invoice_number", "invoice_line_index"],
            ["invoice_lines.invoice_number", "invoice_lines.line_index"],
            name="fk_credit_note_lines_invoice_lines",
        ),
        sa.PrimaryKeyConstraint("credit_note_number", "line_index", name=op.f("pk_credit_note_lines")),
    )
    op.create_index(
        "ix_credit_note_lines_invoice_line", "credit_note_lines", ["invoice_number", "invoice_line_index"]
    )


def downgrade() -> None:
    op.drop_index("ix_credit_note_lines_invoice_line", table_name="credit_note_lines")
    op.drop_table("credit_note_lines")
    op.drop_index(op.f("ix_credit_notes_command_id"), table_name="credit_notes")
    op.drop_index(op.f("ix_credit_notes_customer"), table_name="credit_notes")
    op.drop_index(op.f("ix_credit_notes_invoice_number"), table_name="credit_notes")
    op.drop_table("credit_notes")
