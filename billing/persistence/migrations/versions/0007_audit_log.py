"""Who changed billing state outside the command ledger: catalog loads and usage ingests.

- `audit_log`: one row per catalog load that changed something and per usage ingest — action
  (`catalog_load`, `usage_ingest`), actor, when (`recorded_at`), the idempotency key when one was
  given (unique), and a JSON detail (the load's result and codes; the ingest's source). Insert-only,
  enforced by triggers on SQLite and PostgreSQL like the ledger.
- `usage_events.ingest_id`: the ingest that stored the event (NULL for a scenario `usage`
  command, which the `commands` table already records with its actor).

Revision ID: 0007_audit
Revises: 0006_immutable
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from billing.persistence.types import UTCDateTime

revision: str = "0007_audit"
down_revision: str | None = "0006_immutable"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("recorded_at", UTCDateTime(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sa.UniqueConstraint("idempotency_key", name="uq_audit_log_idempotency_key"),
    )
    op.execute("ALTER TABLE usage_events ADD COLUMN ingest_id INTEGER")
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("CREATE FUNCTION billing_refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                   "RAISE EXCEPTION 'audit_log is insert-only: % refused', TG_OP USING ERRCODE = 'raise_exception'; "
                   "END $$")
        op.execute("CREATE TRIGGER audit_log_insert_only BEFORE UPDATE OR DELETE ON audit_log "
                   "FOR EACH ROW EXECUTE FUNCTION billing_refuse_audit_change()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_audit_change()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER audit_log_no_{verb.lower()} BEFORE {verb} ON audit_log BEGIN "
                       f"SELECT RAISE(ABORT, 'audit_log is insert-only: {verb} refused'); END")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_insert_only ON audit_log")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_truncate ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS billing_refuse_audit_change()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    with op.batch_alter_table("usage_events") as batch:
        batch.drop_column("ingest_id")
    op.drop_table("audit_log")
