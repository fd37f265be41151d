"""Issued invoices and credit notes are immutable, enforced by the database.

Triggers on PostgreSQL and SQLite refuse:
- any UPDATE of `invoices` except moving `status` from `finalized` to `paid` or `void` with every
  other column as it was (the only changes an issued invoice ever sees);
- UPDATE of `invoice_lines`, `credit_notes` and `credit_note_lines`;
- DELETE (and TRUNCATE on PostgreSQL) of all four.
A correction is a credit note, never an edit (Stripe and Kill Bill likewise never edit a
finalized invoice).

Revision ID: 0006_immutable
Revises: 0005_runs
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_immutable"
down_revision: str | None = "0005_runs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FROZEN = ("invoice_lines", "credit_notes", "credit_note_lines")
ALL = ("invoices", *FROZEN)
INVOICE_RULE = "an issued invoice changes only its status, from finalized to paid or void"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        refuse = (f"RAISE EXCEPTION '% is immutable once issued: % refused ({INVOICE_RULE}; corrections are "
                  "credit notes)', TG_TABLE_NAME, TG_OP USING ERRCODE = 'raise_exception';")
        statements = [
            # PL/pgSQL does not short-circuit AND: the row test sits inside its own IF
            "CREATE FUNCTION billing_refuse_invoice_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF TG_OP = 'UPDATE' THEN IF OLD.status = 'finalized' AND NEW.status IN ('paid', 'void') "
            "AND (to_jsonb(NEW) - 'status') = (to_jsonb(OLD) - 'status') THEN RETURN NEW; END IF; END IF; "
            f"{refuse} END $$",
            f"CREATE FUNCTION billing_refuse_issued_change() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {refuse} "
            "END $$",
        ]
        for table in ALL:
            function = "billing_refuse_invoice_change" if table == "invoices" else "billing_refuse_issued_change"
            statements.append(f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
                              f"FOR EACH ROW EXECUTE FUNCTION {function}()")
            statements.append(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                              f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()")
    else:
        others = [c["name"] for c in sa.inspect(bind).get_columns("invoices") if c["name"] != "status"]
        same = " AND ".join(f'NEW."{c}" IS OLD."{c}"' for c in others)
        statements = [
            "CREATE TRIGGER invoices_immutable_update BEFORE UPDATE ON invoices "
            f"WHEN NOT (OLD.status = 'finalized' AND NEW.status IN ('paid', 'void') AND {same}) BEGIN "
            f"SELECT RAISE(ABORT, 'invoices is immutable once issued: UPDATE refused ({INVOICE_RULE}; "
            "corrections are credit notes)'); END",
        ]
        for table in ALL:
            verbs = ("DELETE",) if table == "invoices" else ("UPDATE", "DELETE")
            for verb in verbs:
                statements.append(
                    f"CREATE TRIGGER {table}_immutable_{verb.lower()} BEFORE {verb} ON {table} BEGIN "
                    f"SELECT RAISE(ABORT, '{table} is immutable once issued: {verb} refused "
                    "(corrections are credit notes)'); END")
    for statement in statements:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        for table in ALL:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS billing_refuse_invoice_change()")
        op.execute("DROP FUNCTION IF EXISTS billing_refuse_issued_change()")
        return
    for table in ALL:
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_immutable_{verb}")
