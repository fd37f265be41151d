"""Number claims: where concurrent PostgreSQL run workers expect their batches to number from.

Two workers used to draft their batches from the same counters, so nearly every batch found the
other's numbers taken when it was written and was renumbered while holding the sequence lock. A
batch now claims a range in `number_claims` once it is drafted, after every live claim, and is
written after the claim before it commits. The numbers themselves are still taken from
`number_sequences` in the batch's own transaction: a claim is only a forecast, and a batch whose
forecast turns out wrong is renumbered as before. Tickets come from the `number_claim_tickets`
sequence (PostgreSQL only: SQLite has one writer and never claims).

Revision ID: 0009_number_claims
Revises: 0008_lz4_parts
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_number_claims"
down_revision: str | None = "0008_lz4_parts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "number_claims",
        sa.Column("ticket", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        *(sa.Column(f"{series}_{end}", sa.BigInteger(), nullable=False)
          for series in ("invoice", "movement", "change") for end in ("from", "to")),
        sa.PrimaryKeyConstraint("ticket", name="pk_number_claims"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE number_claim_tickets")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP SEQUENCE number_claim_tickets")
    op.drop_table("number_claims")
