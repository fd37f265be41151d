"""The expansion ledger enforced by the database: insert-only triggers, idempotency keys,
reversing entries, movement legs and per-customer monthly MRR snapshots.

- `mrr_movements` gains `idempotency_key` (unique: the command's idempotency key, or
  `command:<id>`, then `#<position>` of the entry in the command), `entry` (`movement` or
  `reversal`), `reverses` (the entry a reversal negates; unique, so an entry is reversed at most
  once) and `month` (UTC calendar month of `at`, `year * 12 + month - 1`, for grouping).
- `mrr_movement_legs`: each movement's change per (subscription, plan, product).
- `customer_mrr_months`: each customer's MRR at the start and end of every month it moved, with
  the month's expansion entries and MRR lost to contraction and churn.
- `mrr_month_flows` and `mrr_month_measures`: the book's monthly flows per type and subtype and
  the difference arrays of its monthly measures (`billing.month_measures`), for fast metrics.
- Triggers on `mrr_movements`, `mrr_movement_legs` and `movement_invoice_lines` refuse UPDATE and
  DELETE (and TRUNCATE on PostgreSQL): corrections are new reversing entries.

Existing movements are backfilled: keys from their command, one leg each on their subscription
with the plan that subscription is on now (the plan at the time was not recorded before this
revision), and the monthly snapshots from their deltas.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from billing.month_measures import Conversion, MonthRow, differences
from billing.periods import month_index
from billing.scenario import Settings

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = 200
LEDGER = ("mrr_movements", "mrr_movement_legs", "movement_invoice_lines")


def upgrade() -> None:
    bind = op.get_bind()
    # Plain ADD COLUMN on both databases (SQLite cannot add constraints to an existing table any
    # other way without copying it); the constraints ride on the column definitions.
    for ddl in (
        "ALTER TABLE mrr_movements ADD COLUMN idempotency_key VARCHAR(250) DEFAULT '' NOT NULL",
        "ALTER TABLE mrr_movements ADD COLUMN entry VARCHAR(16) DEFAULT 'movement' NOT NULL "
        "CONSTRAINT ck_mrr_movements_entry CHECK (entry IN ('movement', 'reversal'))",
        "ALTER TABLE mrr_movements ADD COLUMN reverses INTEGER "
        "CONSTRAINT fk_mrr_movements_reverses_mrr_movements REFERENCES mrr_movements (id) "
        "CONSTRAINT ck_mrr_movements_reversal_reference CHECK ((entry = 'reversal') = (reverses IS NOT NULL))",
        "ALTER TABLE mrr_movements ADD COLUMN month INTEGER DEFAULT 0 NOT NULL",
    ):
        op.execute(ddl)
    _backfill_movements(bind)
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE mrr_movements ALTER COLUMN idempotency_key DROP DEFAULT")
        op.execute("ALTER TABLE mrr_movements ALTER COLUMN month DROP DEFAULT")
    op.create_index("ix_mrr_movements_idempotency_key", "mrr_movements", ["idempotency_key"], unique=True)
    op.create_index("ix_mrr_movements_reverses", "mrr_movements", ["reverses"], unique=True)
    op.create_index("ix_mrr_movements_month", "mrr_movements", ["month"])
    op.create_index("ix_mrr_movements_at", "mrr_movements", ["at"])  # time ranges (trace, reconcile)

    op.create_table(
        "mrr_movement_legs",
        sa.Column("movement_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("subscription", sa.String(CODE), nullable=True),
        sa.Column("plan", sa.String(CODE), nullable=True),
        sa.Column("product", sa.String(CODE), nullable=True),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("reporting_delta", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["movement_id"], ["mrr_movements.id"], name=op.f("fk_mrr_movement_legs_movement_id_mrr_movements")
        ),
        sa.PrimaryKeyConstraint("movement_id", "position", name=op.f("pk_mrr_movement_legs")),
    )
    op.create_table(
        "customer_mrr_months",
        sa.Column("customer", sa.String(CODE), nullable=False),
        sa.Column("month", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("mrr_start", sa.BigInteger(), nullable=False),
        sa.Column("mrr_end", sa.BigInteger(), nullable=False),
        sa.Column("expansions", sa.Integer(), nullable=False),
        sa.Column("lost", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("customer", "month", name=op.f("pk_customer_mrr_months")),
    )
    op.create_index("ix_customer_mrr_months_month", "customer_mrr_months", ["month"])
    op.create_table(
        "mrr_month_flows",
        sa.Column("month", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("subtype", sa.String(16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("month", "type", "subtype", name=op.f("pk_mrr_month_flows")),
    )
    op.create_table(
        "mrr_month_measures",
        sa.Column("measure", sa.String(40), nullable=False),
        sa.Column("month", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("measure", "month", name=op.f("pk_mrr_month_measures")),
    )
    _backfill_legs_and_snapshots(bind)
    for statement in trigger_ddl(bind.dialect.name):
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in drop_trigger_ddl(bind.dialect.name):
        op.execute(statement)
    op.drop_table("mrr_month_measures")
    op.drop_table("mrr_month_flows")
    op.drop_index("ix_customer_mrr_months_month", table_name="customer_mrr_months")
    op.drop_table("customer_mrr_months")
    op.drop_table("mrr_movement_legs")
    op.drop_index("ix_mrr_movements_at", table_name="mrr_movements")
    op.drop_index("ix_mrr_movements_month", table_name="mrr_movements")
    op.drop_index("ix_mrr_movements_reverses", table_name="mrr_movements")
    op.drop_index("ix_mrr_movements_idempotency_key", table_name="mrr_movements")
    sqlite = bind.dialect.name == "sqlite"
    if sqlite:
        # SQLite drops a column with a foreign key only by copying the table, and dropping the
        # old copy would trip the references from movement_invoice_lines (pysqlite runs DDL
        # outside a transaction, so the pragma takes effect); the ids are the same afterwards.
        # When a later revision was downgraded first, its alembic_version update has opened a
        # transaction, where the pragma would do nothing: end it first (SQLite's DDL does not
        # roll back with the rest anyway).
        driver = bind.connection.driver_connection
        if driver is not None and driver.in_transaction:
            driver.commit()
        op.execute("PRAGMA foreign_keys = OFF")
    with op.batch_alter_table("mrr_movements") as batch:
        batch.drop_constraint(op.f("ck_mrr_movements_reversal_reference"), type_="check")
        batch.drop_constraint(op.f("ck_mrr_movements_entry"), type_="check")
        batch.drop_column("month")
        batch.drop_column("reverses")
        batch.drop_column("entry")
        batch.drop_column("idempotency_key")
    if sqlite:
        op.execute("PRAGMA foreign_keys = ON")


def trigger_ddl(dialect: str) -> list[str]:
    """The statements that make the expansion ledger insert-only."""
    if dialect == "postgresql":
        out = [
            "CREATE FUNCTION billing_refuse_ledger_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION '% is insert-only: % refused (corrections are reversing entries)', "
            "TG_TABLE_NAME, TG_OP USING ERRCODE = 'raise_exception'; END $$"
        ]
        for table in LEDGER:
            out.append(f"CREATE TRIGGER {table}_insert_only BEFORE UPDATE OR DELETE ON {table} "
                       "FOR EACH ROW EXECUTE FUNCTION billing_refuse_ledger_change()")
            out.append(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION billing_refuse_ledger_change()")
        return out
    out = []
    for table in LEDGER:
        for verb in ("UPDATE", "DELETE"):
            out.append(f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} BEGIN "
                       f"SELECT RAISE(ABORT, '{table} is insert-only: {verb} refused "
                       "(corrections are reversing entries)'); END")
    return out


def drop_trigger_ddl(dialect: str) -> list[str]:
    if dialect == "postgresql":
        out = []
        for table in LEDGER:
            out.append(f"DROP TRIGGER IF EXISTS {table}_insert_only ON {table}")
            out.append(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        out.append("DROP FUNCTION IF EXISTS billing_refuse_ledger_change()")
        return out
    return [f"DROP TRIGGER IF EXISTS {table}_no_{verb} " for table in LEDGER for verb in ("update", "delete")]


def _instant(value: Any) -> datetime:
    """A stored `at` read through a plain connection (a string on SQLite)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _backfill_movements(bind: sa.engine.Connection) -> None:
    rows = bind.execute(sa.text(
        "SELECT m.id, m.at, m.command_id, c.idempotency_key FROM mrr_movements m "
        "JOIN commands c ON c.id = m.command_id ORDER BY m.command_id, m.id"
    )).all()
    updates = []
    position = 0
    previous_command = None
    for movement_id, at, command_id, command_key in rows:
        position = position + 1 if command_id == previous_command else 0
        previous_command = command_id
        key = f"{command_key or f'command:{command_id}'}#{position}"
        updates.append({"id": movement_id, "key": key, "month": month_index(_instant(at))})
    if updates:
        bind.execute(sa.text("UPDATE mrr_movements SET idempotency_key = :key, month = :month WHERE id = :id"),
                     updates)


def _backfill_legs_and_snapshots(bind: sa.engine.Connection) -> None:
    catalog, raw_settings = bind.execute(sa.text("SELECT catalog, settings FROM book_state")).one_or_none() or (
        None, None)
    if isinstance(catalog, str):
        catalog = json.loads(catalog)
    if isinstance(raw_settings, str):
        raw_settings = json.loads(raw_settings)
    conversion = Conversion(Settings.model_validate(raw_settings) if raw_settings else Settings(), strict=False)
    products = {plan["code"]: plan.get("product", "core") for plan in (catalog or {}).get("plans", [])}
    plans: dict[str, str] = {sid: plan for sid, plan in bind.execute(sa.text("SELECT id, plan FROM subscriptions"))}
    rows = bind.execute(sa.text(
        "SELECT id, customer, subscription, currency, delta, reporting_delta, month, type, subtype "
        "FROM mrr_movements ORDER BY customer, at, id"
    )).all()
    legs = []
    months: dict[tuple[str, int], dict[str, Any]] = {}
    level: dict[str, int] = {}
    flows: dict[tuple[int, str, str], list[int]] = {}
    for movement_id, customer, subscription, currency, delta, reporting_delta, month, type_, subtype in rows:
        cell = flows.setdefault((month, type_, subtype or ""), [0, 0])
        cell[0] += reporting_delta
        cell[1] += 1
        plan = plans.get(subscription)
        legs.append({"movement_id": movement_id, "position": 0, "subscription": subscription, "plan": plan,
                     "product": products.get(plan) if plan is not None else None, "delta": delta,
                     "reporting_delta": reporting_delta})
        start = level.get(customer, 0)
        level[customer] = start + delta
        row = months.setdefault((customer, month), {"customer": customer, "month": month, "currency": currency,
                                                     "mrr_start": start, "expansions": 0, "lost": 0})
        row["mrr_end"] = level[customer]
        row["expansions"] += 1 if type_ == "expansion" else 0
        row["lost"] -= reporting_delta if type_ in ("contraction", "churn") else 0
    if legs:
        bind.execute(sa.table("mrr_movement_legs", *(sa.column(c) for c in legs[0])).insert(), legs)
    if months:
        snapshot = sa.table("customer_mrr_months", sa.column("customer"), sa.column("month"), sa.column("currency"),
                            sa.column("mrr_start"), sa.column("mrr_end"), sa.column("expansions"), sa.column("lost"))
        bind.execute(snapshot.insert(), list(months.values()))
    measures: dict[tuple[str, int], int] = {}
    per_customer: dict[str, list[MonthRow]] = {}
    currencies: dict[str, str] = {}
    for (customer, _), row in sorted(months.items()):
        currencies[customer] = row["currency"]
        per_customer.setdefault(customer, []).append(
            MonthRow(row["month"], row["mrr_start"], row["mrr_end"], row["expansions"], row["lost"]))
    for customer, customer_rows in per_customer.items():
        since = customer_rows[0].month
        for key, value in differences(customer_rows, currencies[customer], since, conversion).items():
            measures[key] = measures.get(key, 0) + value
    if flows:
        bind.execute(sa.table("mrr_month_flows", *(sa.column(c) for c in ("month", "type", "subtype", "amount",
                                                                          "entries"))).insert(),
                     [{"month": m, "type": t, "subtype": st, "amount": a, "entries": n}
                      for (m, t, st), (a, n) in flows.items()])
    if measures:
        bind.execute(sa.table("mrr_month_measures", sa.column("measure"), sa.column("month"),
                              sa.column("amount")).insert(),
                     [{"measure": k, "month": m, "amount": a} for (k, m), a in measures.items() if a])

