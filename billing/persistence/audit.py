"""Read-only queries for the audit trail, reconciliation and report (`expansion.trace`,
`expansion.report`).

Everything here reads the insert-only ledger — movements with the command that wrote them,
their invoice-line links, invoices, credit notes and commands — and returns the domain records
of `billing.records` (plus `StoredCommand`). Nothing writes: the session is rolled back when the
block ends. Queries are built with `select()`; filters on a command's JSON payload use
SQLAlchemy's JSON index operators (`json_extract` on SQLite, `->>` on PostgreSQL).

    with audit_reader(engine) as reader:
        [(movement, command_id)] = reader.movements(ids=[7])
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Select, exists, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from billing.persistence.repository import (
    LedgerRepository,
    StoredCommand,
    _command,
    _credit_note,
    _invoice,
)
from billing.persistence.tables import (
    CommandRow,
    CreditNoteLineRow,
    CreditNoteRow,
    CustomerRow,
    InvoiceLineRow,
    InvoiceRow,
    MovementLineRow,
    MovementRow,
)
from billing.records import CreditNote, Invoice, LineRef, MrrMovement

_CHUNK = 500  # ids per IN (...) list


@contextmanager
def audit_reader(engine: Engine) -> Iterator[AuditReader]:
    """A reader on its own session; nothing it does is ever committed."""
    session = Session(engine, autoflush=False)
    try:
        yield AuditReader(session)
    finally:
        session.rollback()
        session.close()


class AuditReader:
    def __init__(self, session: Session) -> None:
        self.session = session
        self._ledger = LedgerRepository(session)

    # -- movements -----------------------------------------------------------------------------

    def movements(
        self,
        *,
        ids: Collection[int] | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        customer: str | None = None,
        subscription: str | None = None,
    ) -> list[tuple[MrrMovement, int]]:
        """Movements (ascending id) with the id of the command whose transaction wrote them;
        `start`/`end` select `start <= at < end`."""

        def where(query: Select[Any]) -> Select[Any]:
            if ids is not None:
                query = query.where(MovementRow.id.in_(sorted(ids)))
            if start is not None:
                query = query.where(MovementRow.at >= start)
            if end is not None:
                query = query.where(MovementRow.at < end)
            if customer is not None:
                query = query.where(MovementRow.customer == customer)
            if subscription is not None:
                query = query.where(MovementRow.subscription == subscription)
            return query

        if ids is not None and len(ids) > _CHUNK:
            ordered = sorted(ids)
            out: list[tuple[MrrMovement, int]] = []
            for i in range(0, len(ordered), _CHUNK):
                out.extend(self.movements(ids=ordered[i : i + _CHUNK], start=start, end=end,
                                          customer=customer, subscription=subscription))
            return out
        return self._ledger.movements_where(where)

    def reversals_of(self, ids: Collection[int]) -> dict[int, int]:
        """The reversing entries of these movements: original id -> reversal id."""
        out: dict[int, int] = {}
        ordered = sorted(set(ids))
        for i in range(0, len(ordered), _CHUNK):
            query = select(MovementRow.reverses, MovementRow.id).where(
                MovementRow.reverses.in_(ordered[i : i + _CHUNK]))
            out.update((original, reversal) for original, reversal in self.session.execute(query)
                       if original is not None)
        return out

    # -- commands ------------------------------------------------------------------------------

    def commands(self, ids: Collection[int]) -> dict[int, StoredCommand]:
        out: dict[int, StoredCommand] = {}
        ordered = sorted(set(ids))
        for i in range(0, len(ordered), _CHUNK):
            query = select(CommandRow).where(CommandRow.id.in_(ordered[i : i + _CHUNK]))
            out.update((row.id, _command(row)) for row in self.session.scalars(query))
        return out

    def all_commands(self) -> list[StoredCommand]:
        return [_command(row) for row in self.session.scalars(select(CommandRow).order_by(CommandRow.id))]

    def commands_about(
        self,
        types: Collection[str],
        *,
        subscription: str | None = None,
        customer: str | None = None,
        up_to: int | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[StoredCommand]:
        """Commands of these types (ascending id) whose payload names the subscription or the
        customer (either matches), with id <= `up_to` and `start <= at < end` when given."""
        query = select(CommandRow).where(CommandRow.type.in_(sorted(types)))
        subjects = []
        if subscription is not None:
            subjects.append(CommandRow.payload["subscription"].as_string() == subscription)
        if customer is not None:
            subjects.append(CommandRow.payload["customer"].as_string() == customer)
        if subjects:
            query = query.where(or_(*subjects))
        if up_to is not None:
            query = query.where(CommandRow.id <= up_to)
        if start is not None:
            query = query.where(CommandRow.at >= start)
        if end is not None:
            query = query.where(CommandRow.at < end)
        return [_command(row) for row in self.session.scalars(query.order_by(CommandRow.id))]

    def command_span(self) -> tuple[datetime, datetime] | None:
        """The times of the first and last command (the book's clock); None for an empty book."""
        first, last = self.session.execute(select(func.min(CommandRow.at), func.max(CommandRow.at))).one()
        return None if first is None else (first, last)

    def last_invoice_run(self) -> StoredCommand | None:
        """The latest `invoice_run` command (highest id)."""
        row = self.session.scalars(
            select(CommandRow).where(CommandRow.type == "invoice_run").order_by(CommandRow.id.desc()).limit(1)
        ).first()
        return None if row is None else _command(row)

    # -- invoices, lines and credit notes ------------------------------------------------------

    def invoices(self, numbers: Collection[str] | None = None) -> dict[str, Invoice]:
        """Invoices with their lines, by number (all of them when `numbers` is None)."""
        if numbers is None:
            return {inv.number: inv for inv in self._ledger.invoices()}
        out: dict[str, Invoice] = {}
        ordered = sorted(set(numbers))
        for i in range(0, len(ordered), _CHUNK):
            chunk = ordered[i : i + _CHUNK]
            heads = list(self.session.scalars(select(InvoiceRow).where(InvoiceRow.number.in_(chunk))))
            lines: dict[str, list[InvoiceLineRow]] = {row.number: [] for row in heads}
            line_query = (
                select(InvoiceLineRow)
                .where(InvoiceLineRow.invoice_number.in_(chunk))
                .order_by(InvoiceLineRow.invoice_number, InvoiceLineRow.line_index)
            )
            for line in self.session.scalars(line_query):
                lines[line.invoice_number].append(line)
            out.update((row.number, _invoice(row, lines[row.number])) for row in heads)
        return out

    def credit_notes(self, invoices: Collection[str] | None = None) -> list[CreditNote]:
        """Credit notes (in issue order) against these invoices, or all of them."""
        if invoices is None:
            return self._ledger.credit_notes()
        out: list[CreditNote] = []
        ordered = sorted(set(invoices))
        for i in range(0, len(ordered), _CHUNK):
            chunk = ordered[i : i + _CHUNK]
            heads = list(self.session.scalars(
                select(CreditNoteRow).where(CreditNoteRow.invoice_number.in_(chunk)).order_by(CreditNoteRow.seq)
            ))
            lines: dict[str, list[CreditNoteLineRow]] = {row.number: [] for row in heads}
            line_query = (
                select(CreditNoteLineRow)
                .where(CreditNoteLineRow.invoice_number.in_(chunk))
                .order_by(CreditNoteLineRow.credit_note_number, CreditNoteLineRow.line_index)
            )
            for line in self.session.scalars(line_query):
                lines[line.credit_note_number].append(line)
            out.extend(_credit_note(row, lines[row.number]) for row in heads)
        return out

    def unlinked_lines(self, kind: str, start: datetime, end: datetime) -> list[LineRef]:
        """Lines of `kind` whose period starts in [start, end) and that no movement references."""
        linked = exists().where(
            MovementLineRow.invoice_number == InvoiceLineRow.invoice_number,
            MovementLineRow.line_index == InvoiceLineRow.line_index,
        )
        query = (
            select(InvoiceLineRow.invoice_number, InvoiceLineRow.line_index)
            .where(
                InvoiceLineRow.kind == kind,
                InvoiceLineRow.period_start >= start,
                InvoiceLineRow.period_start < end,
                ~linked,
            )
            .order_by(InvoiceLineRow.invoice_number, InvoiceLineRow.line_index)
        )
        return [LineRef(invoice=number, line=index) for number, index in self.session.execute(query)]

    # -- customers -----------------------------------------------------------------------------

    def customer_tags(self) -> dict[str, dict[str, str]]:
        """Every customer's free-form tags (the current view)."""
        return {
            cid: {str(k): str(v) for k, v in (tags or {}).items()}
            for cid, tags in self.session.execute(select(CustomerRow.id, CustomerRow.tags))
        }
