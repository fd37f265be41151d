"""The audit log: who changed billing state outside the command ledger, and when (catalog loads,
usage ingests). Insert-only in the database (migration 0007)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from billing.persistence.tables import AuditLogRow


def record_action(db: Session | Connection, *, action: str, actor: str, at: datetime, detail: dict[str, Any],
                  idempotency_key: str | None = None) -> int:
    """Append one entry and return its id."""
    result = db.execute(insert(AuditLogRow).values(action=action, actor=actor, recorded_at=at, detail=detail,
                                                   idempotency_key=idempotency_key).returning(AuditLogRow.id))
    return int(result.scalar_one())


def actions(db: Session | Connection, action: str | None = None) -> list[dict[str, Any]]:
    """The entries (ascending id), optionally of one action."""
    table = AuditLogRow.__table__
    query = select(table).order_by(table.c.id)
    if action is not None:
        query = query.where(table.c.action == action)
    return [dict(row) for row in db.execute(query).mappings()]
