"""Number claims: where concurrent PostgreSQL run workers expect their batches to number from.

Two workers used to draft their batches from the same counters, so nearly every batch found the
other's numbers taken when it was written and was renumbered while holding the sequence lock. A
batch now claims a range in `number_claims` once it is drafted, after every live claim, and is
written after the claim before it commits. The numbers themselves are still taken from
`number_sequences` in the batch's own transaction: a claim is only a forecast, and a batch whose
forecast turns out wrong is renumbered as before. Tickets come from the `number_claim_tickets`
sequence and a claim is made by the `number_claim` function (PostgreSQL only: SQLite has one
writer and never claims).

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

# One round trip per claim (`billing.persistence.claims.claim`): serialise the claimers, drop the
# claims whose batch has ended (its advisory lock is free), and claim the range past the sequences
# and every live claim. A claim is a hint that dies with its batch: its commit need not wait for
# the disk.
CLAIM_FUNCTION = """
CREATE FUNCTION number_claim(p_ticket bigint, p_run integer, p_invoices bigint, p_movements bigint,
                             p_changes bigint, p_ns integer)
RETURNS TABLE (invoice_from bigint, movement_from bigint, change_from bigint, after bigint)
LANGUAGE plpgsql AS $$
DECLARE
  b_invoice bigint; b_movement bigint; b_change bigint; prev bigint; r record;
BEGIN
  PERFORM set_config('synchronous_commit', 'off', true);
  PERFORM pg_advisory_xact_lock(p_ns, 0);
  SELECT coalesce(max(s.next) FILTER (WHERE s.series = 'invoice'), 1),
         coalesce(max(s.next) FILTER (WHERE s.series = 'movement'), 1),
         coalesce(max(s.next) FILTER (WHERE s.series = 'change'), 1)
    INTO b_invoice, b_movement, b_change FROM number_sequences s;
  FOR r IN SELECT * FROM number_claims c ORDER BY c.ticket LOOP
    IF pg_try_advisory_xact_lock_shared(p_ns, (r.ticket % 2147483647 + 1)::int) THEN
      DELETE FROM number_claims c WHERE c.ticket = r.ticket;
    ELSE
      prev := r.ticket;
      b_invoice := greatest(b_invoice, r.invoice_to);
      b_movement := greatest(b_movement, r.movement_to);
      b_change := greatest(b_change, r.change_to);
    END IF;
  END LOOP;
  INSERT INTO number_claims VALUES (p_ticket, p_run, b_invoice, b_invoice + p_invoices, b_movement,
                                    b_movement + p_movements, b_change, b_change + p_changes);
  RETURN QUERY SELECT b_invoice, b_movement, b_change, prev;
END $$
"""


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
        op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION number_claim(bigint, integer, bigint, bigint, bigint, integer)")
        op.execute("DROP SEQUENCE number_claim_tickets")
    op.drop_table("number_claims")
