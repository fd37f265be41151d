"""Metered usage in its own table: `usage_events` (billing.usage, billing.persistence.usage_store).

Before this revision the book's snapshot held every usage record inside its subscriptions. The
upgrade moves them into `usage_events` (in the order they were recorded, measured by their
metric) and takes them out of the snapshot; the downgrade puts them back.

Revision ID: 0004_usage
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004_usage"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CODE = 200


def upgrade() -> None:
    op.create_table(
        "usage_events",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("subscription", sa.String(CODE), nullable=False),
        sa.Column("metric", sa.String(CODE), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("matched", sa.Boolean(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=True),
        sa.Column("dim", sa.Text(), nullable=True),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("properties", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_usage_events"),
        sa.UniqueConstraint("subscription", "key", name="uq_usage_events_subscription_key"),
    )
    op.create_index("ix_usage_events_subscription_metric_at", "usage_events",
                    ["subscription", "metric", "at"])
    _move_records_out_of_the_snapshot()


def downgrade() -> None:
    _put_records_back_into_the_snapshot()
    op.drop_index("ix_usage_events_subscription_metric_at", table_name="usage_events")
    op.drop_table("usage_events")


def _snapshot() -> tuple[Any, Any] | None:
    from billing.book import Book  # the book module of this version reads older snapshots

    bind = op.get_bind()
    row = bind.execute(sa.text("SELECT snapshot FROM book_state WHERE id = 1")).first()
    if row is None:
        return None
    return bind, Book.loads(bytes(row[0]))


def _save(bind: Any, book: Any) -> None:
    bind.execute(sa.text("UPDATE book_state SET snapshot = :s WHERE id = 1"), {"s": book.dumps()})


def _move_records_out_of_the_snapshot() -> None:
    from billing.usage import measure, micros, scaled

    loaded = _snapshot()
    if loaded is None:
        return
    bind, book = loaded
    rows: list[dict[str, Any]] = []
    for sub in book.subscriptions.values():
        records = sub.__dict__.pop("usage", None) or []
        sub.__dict__.pop("usage_keys", None)
        for record in records:
            metric = book.catalog.metric(record.metric)
            matched, quantity, dim = measure(metric, record.value, record.properties)
            rows.append({"subscription": sub.id, "metric": record.metric, "at": micros(record.at),
                         "value": scaled(record.value), "matched": matched, "quantity": quantity,
                         "dim": dim, "key": record.key,
                         "properties": json.dumps(dict(record.properties), default=str)})
    if rows:
        bind.execute(sa.text(
            "INSERT INTO usage_events (subscription, metric, at, value, matched, quantity, dim, key, "
            "properties) VALUES (:subscription, :metric, :at, :value, :matched, :quantity, :dim, :key, "
            ":properties)"), rows)
    _save(bind, book)


def _put_records_back_into_the_snapshot() -> None:
    from billing.usage import DECIMALS, UsageRecord, instant

    loaded = _snapshot()
    if loaded is None:
        return
    bind, book = loaded
    for sub in book.subscriptions.values():
        sub.__dict__["usage"] = []
        sub.__dict__["usage_keys"] = set()
    result = bind.execute(sa.text(
        "SELECT subscription, metric, at, value, key, properties FROM usage_events ORDER BY seq"))
    for sub_id, metric, at, value, key, properties in result:
        sub = book.subscriptions.get(sub_id)
        if sub is None:
            continue
        sub.__dict__["usage"].append(UsageRecord(instant(at), metric, Decimal(value).scaleb(-DECIMALS), key,
                                                 json.loads(properties)))
        sub.__dict__["usage_keys"].add(key)
    _save(bind, book)
