"""Repositories: the only code that reads and writes the tables, in terms of domain records.

Each repository works inside a session owned by a `UnitOfWork`; none commits. Money crosses
this boundary as `Decimal` already rounded to its currency and is stored as integer minor units
(`to_minor` refuses an unrounded amount rather than truncating it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import Select, and_, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from billing.catalog import Catalog
from billing.money import from_minor, to_minor
from billing.month_measures import Conversion, MonthRow, change
from billing.periods import month_index
from billing.persistence.tables import (
    BookStateRow,
    CommandRow,
    CreditNoteLineRow,
    CreditNoteRow,
    CustomerMonthRow,
    CustomerRow,
    InvoiceLineRow,
    InvoiceRow,
    MonthFlowRow,
    MonthMeasureRow,
    MovementLegRow,
    MovementLineRow,
    MovementRow,
    SubscriptionRow,
)
from billing.records import (
    CreditNote,
    CreditNoteLine,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    Leg,
    LineRef,
    MrrMovement,
)
from billing.scenario import Settings

MOVEMENT_ADAPTER: TypeAdapter[MrrMovement] = TypeAdapter(MrrMovement)

# column names and PostgreSQL types of the tables written with `Bulk`, in the order of its rows
INVOICE_COLUMNS = (
    ("number", "text"), ("seq", "integer"), ("customer", "text"), ("currency", "text"), ("status", "text"),
    ("issued_at", "timestamptz"), ("billing_date", "date"), ("subtotal", "bigint"), ("discount", "bigint"),
    ("tax", "bigint"), ("total", "bigint"), ("credit_applied", "bigint"), ("amount_due", "bigint"),
    ("credit_added", "bigint"), ("command_id", "integer"))
INVOICE_LINE_COLUMNS = (
    ("invoice_number", "text"), ("line_index", "integer"), ("kind", "text"), ("description", "text"),
    ("subscription", "text"), ("quantity", "numeric"), ("unit_amount", "numeric"), ("amount", "bigint"),
    ("included", "numeric"), ("period_start", "timestamptz"), ("period_end", "timestamptz"))
MOVEMENT_COLUMNS = (
    ("id", "integer"), ("at", "timestamptz"), ("customer", "text"), ("subscription", "text"), ("type", "text"),
    ("subtype", "text"), ("currency", "text"), ("mrr_before", "bigint"), ("mrr_after", "bigint"),
    ("delta", "bigint"), ("reporting_currency", "text"), ("reporting_delta", "bigint"), ("cause", "text"),
    ("event_index", "integer"), ("command_id", "integer"), ("idempotency_key", "text"), ("entry", "text"),
    ("reverses", "integer"), ("month", "integer"))
LEG_COLUMNS = (
    ("movement_id", "integer"), ("position", "integer"), ("subscription", "text"), ("plan", "text"),
    ("product", "text"), ("delta", "bigint"), ("reporting_delta", "bigint"))
MONTH_COLUMNS = (
    ("customer", "text"), ("month", "integer"), ("currency", "text"), ("mrr_start", "bigint"),
    ("mrr_end", "bigint"), ("expansions", "integer"), ("lost", "bigint"))
LINK_COLUMNS = (("movement_id", "integer"), ("invoice_number", "text"), ("line_index", "integer"),
                ("command_id", "integer"))


class PersistenceError(RuntimeError):
    """The database does not hold what a command expects (a broken invariant, not bad input)."""


class ConcurrentModification(PersistenceError):
    """The book changed since it was loaded: another command won; reload and retry."""


# --- bulk rows -------------------------------------------------------------------------------


class Bulk:
    """Many rows in one statement per table, in the session's transaction, without SQLAlchemy's
    per-row compile and bind: on SQLite one `executemany`, on PostgreSQL one `INSERT … SELECT` (or
    `UPDATE … FROM`) over `unnest` of one array per column. Values are given already converted
    with the methods below, which store exactly what the column types would
    (`billing.persistence.types`, SQLAlchemy's SQLite formats, `json.dumps`), so rows written here
    read back and compare as rows written through the ORM. Errors are SQLAlchemy's (DBAPIError).

    `columns` pair a column name with its PostgreSQL type (ignored on SQLite)."""

    def __init__(self, session: Session) -> None:
        self.connection: Connection = session.connection()
        self.postgres = self.connection.dialect.name == "postgresql"
        # the instants already converted, shared by the session's writers (a batch's invoices,
        # billed periods and views name the same few period bounds)
        self._instants: dict[datetime, Any] = session.info.setdefault(_INSTANTS, {})
        self._minors: dict[str, Callable[[Decimal], int]] = {}
        self._deferred = deferred_writes(session)

    def instant(self, value: datetime | None) -> Any:
        """A timezone-aware instant as `UTCDateTime` stores it: naive UTC text on SQLite, ISO 8601
        UTC text for an array literal on PostgreSQL."""
        if value is None:
            return None
        found = self._instants.get(value)
        if found is None:
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError(f"naive datetime {value.isoformat()} where an instant was expected")
            utc = value.astimezone(UTC)
            found = utc.isoformat() if self.postgres else (
                f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d} "
                f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}")
            self._instants[value] = found
        return found

    def minor(self, currency: str) -> Callable[[Decimal], int]:
        """`to_minor` in `currency`, remembered per amount (a batch's invoices repeat the same
        prices and totals): only an exact, finite Decimal is looked up, anything else goes to
        `to_minor` and fails there; equal amounts have the same minor units, whatever their
        exponent."""
        found = self._minors.get(currency)
        if found is None:
            known: dict[Decimal, int] = {}

            def found(amount: Decimal) -> int:
                if type(amount) is Decimal and amount.is_finite():
                    units = known.get(amount)
                    if units is None:
                        units = known[amount] = to_minor(amount, currency)
                    return units
                return to_minor(amount, currency)

            self._minors[currency] = found
        return found

    def day(self, value: date | None) -> Any:
        if value is None or self.postgres:
            return value
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"

    def decimal(self, value: Decimal | None) -> Any:
        """An exact decimal as `ExactDecimal` stores it (NUMERIC on PostgreSQL, its text elsewhere)."""
        if value is None:
            return None
        if not isinstance(value, Decimal) or not value.is_finite():
            raise ValueError(f"{value!r} is not a finite Decimal")
        return value if self.postgres else str(value)

    def flag(self, value: bool) -> Any:
        return value if self.postgres else int(value)

    @staticmethod
    def json(value: Any) -> str:
        return json.dumps(value)

    def insert(self, table: str, columns: Sequence[tuple[str, str]], rows: Sequence[tuple[Any, ...]], *,
               offset: tuple[str, str] | None = None) -> None:
        """Insert `rows` (tuples in `columns` order). `offset` (PostgreSQL only): a column whose
        values are added to the base a scalar query gives when the statement runs (a creation
        order continued from the table's maximum)."""
        if not rows:
            return
        names = ", ".join(name for name, _ in columns)
        if self.postgres:
            if offset is None:
                statement = f"INSERT INTO {table} ({names}) SELECT * FROM unnest({_arrays(columns)})"  # noqa: S608
            else:
                shifted, base = offset
                picked = ", ".join(f"v.{name} + b.base" if name == shifted else f"v.{name}" for name, _ in columns)
                statement = (f"INSERT INTO {table} ({names}) SELECT {picked} "  # noqa: S608 - this module's constants
                             f"FROM unnest({_arrays(columns)}) AS v({names}) CROSS JOIN ({base}) AS b(base)")
            self._send(statement, _transpose(rows, columns), table=table)
        else:
            if offset is not None:
                raise ValueError("an offset column is computed in SQL on PostgreSQL only")
            marks = ", ".join("?" for _ in columns)
            self._send(f"INSERT INTO {table} ({names}) VALUES ({marks})", list(rows), table=table)  # noqa: S608

    def update(self, table: str, keys: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str]],
               rows: Sequence[tuple[Any, ...]], *, extra: str = "", check: str = "", conflict: str = "") -> int:
        """Set `columns` of the rows matching `keys` (each row: key values, then column values);
        `extra` adds assignments (SQL over the table's own columns, e.g. `version = version + 1`),
        `check` one more `column` that must equal the row's last value (e.g. a version): a row
        that does not raises `ConcurrentModification(conflict)`. Returns how many rows changed
        (deferred: how many must, with `check`; else -1)."""
        if not rows:
            return 0
        width = len(keys) + len(columns)
        matched = [*keys, (check, "integer")] if check else list(keys)
        if self.postgres:
            # the check value is aliased `<name>_` so `extra` can still name the table's own column
            aliased = [*keys, *columns, *[(f"{name}_", kind) for name, kind in matched[len(keys):]]]
            sets = [f"{name} = v.{name}" for name, _ in columns] + ([extra] if extra else [])
            where = " AND ".join(f"{table}.{name} = v.{alias}"
                                 for (name, _), (alias, _) in zip(matched, [*keys, *aliased[width:]], strict=True))
            statement = (f"UPDATE {table} SET {', '.join(sets)} "  # noqa: S608 - names are this module's constants
                         f"FROM unnest({_arrays(aliased)}) AS v({', '.join(n for n, _ in aliased)}) WHERE {where}")
            return self._send(statement, _transpose(rows, aliased), len(rows) if check else None, conflict,
                              table=table)
        sets = [f"{name} = ?" for name, _ in columns] + ([extra] if extra else [])
        where = " AND ".join(f"{name} = ?" for name, _ in matched)
        params = [(*row[len(keys):width], *row[:len(keys)], *row[width:]) for row in rows]
        statement = f"UPDATE {table} SET {', '.join(sets)} WHERE {where}"  # noqa: S608 - as above
        return self._send(statement, params, len(rows) if check else None, conflict, table=table)

    def _send(self, statement: str, params: Any, expect: int | None = None, conflict: str = "", *,
              table: str = "") -> int:
        """Run the statement now, or, in a session whose writes are deferred (`defer_writes`),
        when they are sent; `expect`: the rows it must change."""
        connection = self.connection  # not `self`: a deferred write must not hold its list in a cycle

        def send() -> int:
            count = int(connection.exec_driver_sql(statement, params).rowcount)
            if expect is not None and count != expect:
                raise ConcurrentModification(conflict or "a row changed since it was read; retry")
            return count

        if self._deferred is None:
            return send()
        self._deferred.append(TableWrite(table, send))
        return expect if expect is not None else -1


_DEFERRED = "billing.deferred_writes"
_INSTANTS = "billing.bulk_instants"


def deferred_writes(session: Session) -> list[Callable[[], object]] | None:
    return session.info.get(_DEFERRED)


def write_now_or_deferred(session: Session, write: Callable[[], object]) -> None:
    """Run `write` now, or when the session's deferred writes are sent (`defer_writes`)."""
    deferred = deferred_writes(session)
    if deferred is None:
        write()
    else:
        deferred.append(write)


@contextmanager
def defer_writes(session: Session) -> Iterator[list[Callable[[], object]]]:
    """While open, the session's bulk writes (`Bulk`, `LedgerRepository._accumulate`) are
    prepared — statements and parameters built — but not sent: each is appended to the list
    given, to be called later in the same transaction (a run batch drafts its writes while the
    previous batch is written). Reads still run at once."""
    with _collecting(session, _DEFERRED) as writes:
        yield writes


@contextmanager
def _collecting(session: Session, key: str) -> Iterator[list[Callable[[], object]]]:
    """A list kept in `session.info[key]` while open, for the writes that go there instead of out."""
    collected: list[Callable[[], object]] = []
    session.info[key] = collected
    try:
        yield collected
    finally:
        del session.info[key]


class TableWrite:
    """A deferred bulk write and the table it writes."""

    __slots__ = ("send", "table")

    def __init__(self, table: str, send: Callable[[], object]) -> None:
        self.table, self.send = table, send

    def __call__(self) -> object:
        return self.send()


# what a batch writes that another batch writing at the same time could collide with: the
# invoices' issue order (`seq`, continued from the table's maximum when the rows are sent) and
# the rows that reference the invoices
ORDERED_TABLES = frozenset({"invoices", "invoice_lines", "billed_periods", "movement_invoice_lines"})


def ordered(write: Callable[[], object]) -> bool:
    """Whether a deferred write must wait until the batches before it have committed."""
    return isinstance(write, TableWrite) and write.table in ORDERED_TABLES


_HELD = "billing.held_accumulations"


@contextmanager
def hold_accumulations(session: Session) -> Iterator[list[Callable[[], object]]]:
    """While open, the additions to rows every batch shares (`LedgerRepository._accumulate`: the
    monthly flows and measures) are kept in the list given instead of sent: a pipelined batch
    sends its other writes while the batch before it is still being written, and adds to the
    shared rows only once that one has committed, so the two never wait on each other's rows."""
    with _collecting(session, _HELD) as held:
        yield held


def _arrays(columns: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"%b::{kind}[]" if kind == "bytea" else f"%s::{kind}[]" for _, kind in columns)


def _transpose(rows: Sequence[tuple[Any, ...]], columns: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
    """One parameter per column: an array literal in PostgreSQL's text form (built here, several
    times faster than the driver adapting a list element by element), except bytes: a list sent
    in binary (`%b`), which spares the hex text both here and in the server — for 500 customer
    parts 1.2 ms of client CPU against 5.6-8.2 ms, and 10-12 ms of statement time against 24-30."""
    return tuple(list(values) if kind == "bytea" else _array_literal(values, kind)
                 for values, (_, kind) in zip(zip(*rows, strict=True), columns, strict=True))


def _array_literal(values: Sequence[Any], kind: str) -> str:
    """`{…}` of the values: strings double-quoted with `\\` and `"` escaped; other values
    (numbers, booleans, ISO dates and instants: no spaces, commas, quotes or braces) bare, so
    `str(None)` is the only way to spell `None` there and becomes NULL."""
    if kind in ("text", "json"):
        return _text_array(values)
    return "{" + ",".join(map(str, values)).replace("None", "NULL") + "}"


def _text_array(values: Sequence[str | None]) -> str:
    """The strings joined by NUL and escaped all at once (no value holds a NUL: PostgreSQL text
    cannot), when exactly the len - 1 separators are there; otherwise (a None, which becomes NULL,
    or a NUL, which the driver refuses as before) each value escaped alone."""
    joined: str | None = None
    with suppress(TypeError):  # a None among them
        joined = "\0".join(values)  # type: ignore[arg-type]
    if values and joined is not None and joined.count("\0") == len(values) - 1:
        return '{"' + joined.replace("\\", "\\\\").replace('"', '\\"').replace("\0", '","') + '"}'
    return "{" + ",".join(["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


# --- engine state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredBook:
    settings: Settings
    catalog: Catalog
    snapshot: bytes
    version: int


def settings_json(settings: Settings) -> dict[str, Any]:
    return settings.model_dump(mode="json", by_alias=True)


def catalog_json(catalog: Catalog) -> dict[str, Any]:
    return catalog.model_dump(mode="json", by_alias=True, exclude_defaults=True)


class BookStateRepository:
    """The single `book_state` row; every save checks and bumps its version."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def load(self) -> StoredBook | None:
        row = self.session.execute(
            select(BookStateRow.settings, BookStateRow.catalog, BookStateRow.snapshot, BookStateRow.version)
        ).one_or_none()
        if row is None:
            return None
        return StoredBook(
            settings=Settings.model_validate(row.settings),
            catalog=Catalog.model_validate(row.catalog),
            snapshot=bytes(row.snapshot),
            version=row.version,
        )

    def create(self, settings: Settings, catalog: Catalog, snapshot: bytes, *, now: datetime) -> int:
        """Insert the row (version 1). Two concurrent creators collide on the primary key."""
        self.session.add(
            BookStateRow(
                id=1,
                settings=settings_json(settings),
                catalog=catalog_json(catalog),
                snapshot=snapshot,
                version=1,
                updated_at=now,
            )
        )
        self.session.flush()
        return 1

    def save(
        self,
        snapshot: bytes,
        *,
        expected_version: int,
        now: datetime,
        settings: Settings | None = None,
        catalog: Catalog | None = None,
    ) -> int:
        """Write a new snapshot if the version is still `expected_version`; return the new one.

        A conditional UPDATE: on PostgreSQL a concurrent writer waits on the row lock and then
        finds the version moved; on SQLite the writers are serialised by the database lock.
        """
        values: dict[str, Any] = {
            "snapshot": snapshot,
            "version": expected_version + 1,
            "updated_at": now,
        }
        if settings is not None:
            values["settings"] = settings_json(settings)
        if catalog is not None:
            values["catalog"] = catalog_json(catalog)
        result = self.session.execute(
            update(BookStateRow)
            .where(BookStateRow.id == 1, BookStateRow.version == expected_version)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise ConcurrentModification(
                f"the book changed since it was loaded (version {expected_version}); retry the command"
            )
        return expected_version + 1


# --- commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredCommand:
    id: int
    recorded_at: datetime
    at: datetime
    type: str
    payload: dict[str, Any]
    actor: str
    idempotency_key: str | None
    event_index: int | None


class CommandRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        recorded_at: datetime,
        at: datetime,
        type: str,
        payload: dict[str, Any],
        actor: str,
        idempotency_key: str | None,
        event_index: int | None,
    ) -> int:
        row = CommandRow(
            recorded_at=recorded_at,
            at=at,
            type=type,
            payload=payload,
            actor=actor,
            idempotency_key=idempotency_key,
            event_index=event_index,
        )
        self.session.add(row)
        self.session.flush()
        return row.id

    def by_key(self, idempotency_key: str) -> StoredCommand | None:
        row = self.session.scalars(
            select(CommandRow).where(CommandRow.idempotency_key == idempotency_key)
        ).one_or_none()
        return None if row is None else _command(row)

    def count(self) -> int:
        return self.session.scalar(select(func.count()).select_from(CommandRow)) or 0

    def list(self) -> list[StoredCommand]:
        return [_command(row) for row in self.session.scalars(select(CommandRow).order_by(CommandRow.id))]


def _command(row: CommandRow) -> StoredCommand:
    return StoredCommand(
        id=row.id,
        recorded_at=row.recorded_at,
        at=row.at,
        type=row.type,
        payload=dict(row.payload),
        actor=row.actor,
        idempotency_key=row.idempotency_key,
        event_index=row.event_index,
    )


# --- ledger: invoices, credit notes, movements, links ------------------------------------------


class LedgerRepository:
    """Invoices with their lines, credit notes with theirs, MRR movements and their invoice-line
    links. Insert-only, except an invoice's status."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # writes

    def add_invoices(self, invoices: Sequence[Invoice], command_id: int) -> None:
        """Append invoices and their lines: one statement per table (`Bulk`), lines after invoices."""
        if not invoices:
            return
        bulk = Bulk(self.session)
        # PostgreSQL continues the creation order from the table's maximum when the rows are
        # sent (which may be later: `defer_writes`); SQLite reads it first (its writers queue)
        seq = 0 if bulk.postgres else self.session.scalar(select(func.max(InvoiceRow.seq))) or 0
        instant, decimal = bulk.instant, bulk.decimal
        days: dict[str, Any] = {}
        heads: list[tuple[Any, ...]] = []
        rows: list[tuple[Any, ...]] = []
        for invoice in invoices:
            seq += 1
            cur = invoice.currency
            minor = bulk.minor(cur)
            number = invoice.number
            day = days.get(invoice.billing_date)
            if day is None:
                day = days[invoice.billing_date] = bulk.day(date.fromisoformat(invoice.billing_date))
            heads.append((
                number, seq, invoice.customer, cur, invoice.status, instant(invoice.issued_at), day,
                minor(invoice.subtotal), minor(invoice.discount), minor(invoice.tax), minor(invoice.total),
                minor(invoice.credit_applied), minor(invoice.amount_due), minor(invoice.credit_added), command_id))
            for index, line in enumerate(invoice.lines):
                quantity, unit, included = line.quantity, line.unit_amount, line.included
                rows.append((
                    number, index, line.kind, line.description, line.subscription,
                    None if quantity is None else decimal(quantity), None if unit is None else decimal(unit),
                    minor(line.amount), None if included is None else decimal(included),
                    instant(line.period_start), instant(line.period_end)))
        bulk.insert("invoices", INVOICE_COLUMNS, heads,
                    offset=("seq", "SELECT coalesce(max(seq), 0) FROM invoices") if bulk.postgres else None)
        bulk.insert("invoice_lines", INVOICE_LINE_COLUMNS, rows)

    def set_status(self, number: str, status: InvoiceStatus) -> None:
        result = self.session.execute(
            update(InvoiceRow)
            .where(InvoiceRow.number == number)
            .values(status=status)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) != 1:
            raise PersistenceError(f"invoice {number!r} is not in the database")

    def add_credit_notes(self, notes: Sequence[CreditNote], command_id: int) -> None:
        """Append credit notes and their lines; each line's invoice line must exist (a foreign
        key), so a note can only reference what was invoiced."""
        if not notes:
            return
        seq = self.session.scalar(select(func.max(CreditNoteRow.seq))) or 0
        for note in notes:
            seq += 1
            cur = note.currency
            self.session.add(
                CreditNoteRow(
                    number=note.number,
                    seq=seq,
                    invoice_number=note.invoice,
                    customer=note.customer,
                    currency=cur,
                    issued_at=note.issued_at,
                    reason=note.reason,
                    subtotal=to_minor(note.subtotal, cur),
                    tax=to_minor(note.tax, cur),
                    total=to_minor(note.total, cur),
                    command_id=command_id,
                )
            )
        self.session.flush()
        for note in notes:
            for index, line in enumerate(note.lines):
                self.session.add(
                    CreditNoteLineRow(
                        credit_note_number=note.number,
                        line_index=index,
                        invoice_number=note.invoice,
                        invoice_line_index=line.invoice_line,
                        kind=line.kind,
                        description=line.description,
                        amount=to_minor(line.amount, note.currency),
                    )
                )
        self.session.flush()

    def add_movements(
        self, movements: Sequence[MrrMovement], command_id: int, *, command_key: str | None = None
    ) -> None:
        """Append ledger entries with their legs, and bring the monthly MRR snapshots up to date.

        Each entry's idempotency key is the command's key (or `command:<id>`) and its position in
        the command, unique in the table: the same command can never be counted twice."""
        if not movements:
            return
        base = command_key if command_key is not None else f"command:{command_id}"
        bulk = Bulk(self.session)
        rows: list[dict[str, Any]] = []
        heads: list[tuple[Any, ...]] = []
        legs: list[tuple[Any, ...]] = []
        for position, movement in enumerate(movements):
            cur = movement.currency
            rep = movement.reporting_currency
            minor, reporting_minor = bulk.minor(cur), bulk.minor(rep)
            row = {
                "customer": movement.customer, "type": movement.type, "subtype": movement.subtype,
                "currency": cur, "delta": minor(movement.delta),
                "reporting_delta": reporting_minor(movement.reporting_delta), "entry": movement.entry,
                "month": month_index(movement.at),
            }
            rows.append(row)
            heads.append((
                movement.id, bulk.instant(movement.at), movement.customer, movement.subscription, movement.type,
                movement.subtype, cur, minor(movement.mrr_before), minor(movement.mrr_after),
                row["delta"], rep, row["reporting_delta"], movement.cause, movement.event_index, command_id,
                f"{base}#{position}", movement.entry, movement.reverses, row["month"]))
            legs.extend((
                movement.id, index, leg.subscription, leg.plan, leg.product, minor(leg.delta),
                reporting_minor(leg.reporting_delta),
            ) for index, leg in enumerate(movement.legs))
        bulk.insert("mrr_movements", MOVEMENT_COLUMNS, heads)
        bulk.insert("mrr_movement_legs", LEG_COLUMNS, legs)
        # deferred, the months are read, computed and written when the writes are sent (they
        # depend on no number a batch takes late)
        write_now_or_deferred(self.session, lambda: self._record_months(rows))

    def _record_months(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bring the derived tables up to date with new entries, in the same transaction:

        - `customer_mrr_months`: an entry adds its delta to its month's end and to the start and
          end of every later month of the customer (only a reversal, dated at the entry it
          negates, lands before a customer's latest month), and counts in the month's
          expansions and lost MRR;
        - `mrr_month_flows`: the month's sum per type and subtype;
        - `mrr_month_measures`: the change of every monthly measure (`billing.month_measures`)
          that the customers' new rows make from the first month they touch.
        """
        by_customer: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_customer.setdefault(row["customer"], []).append(row)
        cut = min(row["month"] for row in rows) - 13
        names = sorted(by_customer)
        stored: dict[str, list[MonthRow]] = {name: [] for name in names}
        before: dict[str, int] = {}
        firsts: dict[str, MonthRow] = {}
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            month_columns = (CustomerMonthRow.customer, CustomerMonthRow.month, CustomerMonthRow.mrr_start,
                             CustomerMonthRow.mrr_end, CustomerMonthRow.expansions, CustomerMonthRow.lost)
            query = (
                select(*month_columns)
                .where(CustomerMonthRow.customer.in_(chunk), CustomerMonthRow.month >= cut)
                .order_by(CustomerMonthRow.customer, CustomerMonthRow.month)
            )
            for found in self.session.execute(query):
                stored[found.customer].append(
                    MonthRow(found.month, found.mrr_start, found.mrr_end, found.expansions, found.lost))
            newest = (
                select(CustomerMonthRow.customer, func.max(CustomerMonthRow.month).label("month"))
                .where(CustomerMonthRow.customer.in_(chunk), CustomerMonthRow.month < cut)
                .group_by(CustomerMonthRow.customer)
                .subquery()
            )
            same = and_(newest.c.customer == CustomerMonthRow.customer, newest.c.month == CustomerMonthRow.month)
            older: list[str] = []
            for customer, level in self.session.execute(
                select(CustomerMonthRow.customer, CustomerMonthRow.mrr_end).join(newest, same)
            ):
                before[customer] = level
                older.append(customer)
            if not older:  # every customer's rows start at or after the cut: the first is among them
                continue
            oldest = (
                select(CustomerMonthRow.customer, func.min(CustomerMonthRow.month).label("month"))
                .where(CustomerMonthRow.customer.in_(older))
                .group_by(CustomerMonthRow.customer)
                .subquery()
            )
            same = and_(oldest.c.customer == CustomerMonthRow.customer, oldest.c.month == CustomerMonthRow.month)
            for found in self.session.execute(select(*month_columns).join(oldest, same)):
                firsts[found.customer] = MonthRow(found.month, found.mrr_start, found.mrr_end, found.expansions,
                                                  found.lost)
        settings = self.session.scalar(select(BookStateRow.settings))
        conversion = Conversion(Settings.model_validate(settings) if settings is not None else Settings(),
                                strict=False)
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        measures: dict[tuple[str, int], int] = {}
        for customer, entries in by_customer.items():
            currency = entries[0]["currency"]
            old = stored[customer]
            new = list(old)
            for entry in entries:
                new = _apply_entry(new, entry, before.get(customer, 0))
            known = {month_row.month: month_row for month_row in old}
            for month_row in new:
                if month_row.month not in known:
                    inserts.append((customer, month_row.month, currency, month_row.mrr_start, month_row.mrr_end,
                                    month_row.expansions, month_row.lost))
                elif known[month_row.month] != month_row:
                    updates.append((customer, month_row.month, month_row.mrr_start, month_row.mrr_end,
                                    month_row.expansions, month_row.lost))
            since = min(entry["month"] for entry in entries)
            moved = change(old, new, currency, since, conversion, before.get(customer, 0), firsts.get(customer))
            for key, value in moved.items():
                measures[key] = measures.get(key, 0) + value
        bulk = Bulk(self.session)
        bulk.insert("customer_mrr_months", MONTH_COLUMNS, inserts)
        bulk.update("customer_mrr_months", MONTH_COLUMNS[:2], MONTH_COLUMNS[3:], updates)
        flows: dict[tuple[int, str, str], list[int]] = {}
        for row in rows:
            cell = flows.setdefault((row["month"], row["type"], row["subtype"] or ""), [0, 0])
            cell[0] += row["reporting_delta"]
            cell[1] += -1 if row["entry"] == "reversal" else 1
        self._accumulate(MonthFlowRow, ("month", "type", "subtype"), [
            {"month": m, "type": t, "subtype": st, "amount": a, "entries": n} for (m, t, st), (a, n) in flows.items()
        ], ("amount", "entries"))
        self._accumulate(MonthMeasureRow, ("measure", "month"), [
            {"measure": measure, "month": month, "amount": amount} for (measure, month), amount in measures.items()
        ], ("amount",))

    def _accumulate(self, model: Any, keys: tuple[str, ...], values: list[dict[str, Any]],
                    sums: tuple[str, ...]) -> None:
        """Add `values` to the rows with the same keys (INSERT … ON CONFLICT DO UPDATE)."""
        if not values:
            return
        values = sorted(values, key=lambda row: tuple(row[k] for k in keys))  # one lock order for every writer
        dialect = self.session.get_bind().dialect.name
        statement = (postgresql_insert if dialect == "postgresql" else sqlite_insert)(model)
        statement = statement.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: getattr(model, name) + getattr(statement.excluded, name) for name in sums},
        )
        held = self.session.info.get(_HELD)
        if held is not None:
            held.append(lambda: self.session.execute(statement, values))
        else:
            write_now_or_deferred(self.session, lambda: self.session.execute(statement, values))

    def add_links(self, links: Iterable[tuple[int, LineRef]], command_id: int, *,
                  new_movements: Collection[int] = (), new_invoices: Collection[str] = ()) -> int:
        """Link movements to invoice lines; a link already stored is skipped (one of a movement
        or to an invoice this command writes, `new_movements` and `new_invoices`, cannot be).
        Returns how many were added."""
        wanted: dict[tuple[int, str, int], None] = {}
        fresh_movements, fresh_invoices = set(new_movements), set(new_invoices)
        maybe_stored: set[int] = set()
        for movement_id, ref in links:
            wanted[(movement_id, ref.invoice, ref.line)] = None
            if movement_id not in fresh_movements and ref.invoice not in fresh_invoices:
                maybe_stored.add(movement_id)
        if not wanted:
            return 0
        ids = sorted(maybe_stored)
        existing = {
            (row.movement_id, row.invoice_number, row.line_index)
            for row in self.session.execute(
                select(
                    MovementLineRow.movement_id, MovementLineRow.invoice_number, MovementLineRow.line_index
                ).where(MovementLineRow.movement_id.in_(ids))
            )
        } if ids else set()
        new = [(movement_id, number, line, command_id)
               for movement_id, number, line in wanted if (movement_id, number, line) not in existing]
        Bulk(self.session).insert("movement_invoice_lines", LINK_COLUMNS, new)
        return len(new)

    # reads

    def invoices(
        self,
        *,
        customer: str | None = None,
        status: str | None = None,
        number: str | None = None,
        command_id: int | None = None,
    ) -> list[Invoice]:
        """Invoices in the order issued, with their lines."""

        def where(query: Select[Any]) -> Select[Any]:
            if customer is not None:
                query = query.where(InvoiceRow.customer == customer)
            if status is not None:
                query = query.where(InvoiceRow.status == status)
            if number is not None:
                query = query.where(InvoiceRow.number == number)
            if command_id is not None:
                query = query.where(InvoiceRow.command_id == command_id)
            return query

        heads = list(self.session.scalars(where(select(InvoiceRow)).order_by(InvoiceRow.seq)))
        lines: dict[str, list[InvoiceLineRow]] = {row.number: [] for row in heads}
        line_query = where(
            select(InvoiceLineRow).join(InvoiceRow, InvoiceRow.number == InvoiceLineRow.invoice_number)
        ).order_by(InvoiceLineRow.invoice_number, InvoiceLineRow.line_index)
        for line in self.session.scalars(line_query):
            lines[line.invoice_number].append(line)
        return [_invoice(row, lines[row.number]) for row in heads]

    def invoice(self, number: str) -> Invoice | None:
        found = self.invoices(number=number)
        return found[0] if found else None

    def credit_notes(
        self,
        *,
        invoice: str | None = None,
        customer: str | None = None,
        command_id: int | None = None,
    ) -> list[CreditNote]:
        """Credit notes in the order issued, with their lines."""

        def where(query: Select[Any]) -> Select[Any]:
            if invoice is not None:
                query = query.where(CreditNoteRow.invoice_number == invoice)
            if customer is not None:
                query = query.where(CreditNoteRow.customer == customer)
            if command_id is not None:
                query = query.where(CreditNoteRow.command_id == command_id)
            return query

        heads = list(self.session.scalars(where(select(CreditNoteRow)).order_by(CreditNoteRow.seq)))
        lines: dict[str, list[CreditNoteLineRow]] = {row.number: [] for row in heads}
        line_query = where(
            select(CreditNoteLineRow).join(
                CreditNoteRow, CreditNoteRow.number == CreditNoteLineRow.credit_note_number
            )
        ).order_by(CreditNoteLineRow.credit_note_number, CreditNoteLineRow.line_index)
        for line in self.session.scalars(line_query):
            lines[line.credit_note_number].append(line)
        return [_credit_note(row, lines[row.number]) for row in heads]

    def movements(self, *, customer: str | None = None, command_id: int | None = None) -> list[MrrMovement]:
        """Movements in application order (ascending id), each with the invoice lines that billed
        it, ordered by (invoice number, line index)."""

        def where(query: Select[Any]) -> Select[Any]:
            if customer is not None:
                query = query.where(MovementRow.customer == customer)
            if command_id is not None:
                query = query.where(MovementRow.command_id == command_id)
            return query

        return [movement for movement, _ in self.movements_where(where)]

    def movements_where(self, where: Callable[[Select[Any]], Select[Any]]) -> list[tuple[MrrMovement, int]]:
        """The movements a `where` filter on MovementRow selects (ascending id), each with its
        invoice lines (by invoice number, line index) and legs, and the id of its command."""
        rows = list(self.session.scalars(where(select(MovementRow)).order_by(MovementRow.id)))
        refs: dict[int, list[LineRef]] = {row.id: [] for row in rows}
        link_query = where(
            select(MovementLineRow).join(MovementRow, MovementRow.id == MovementLineRow.movement_id)
        ).order_by(MovementLineRow.movement_id, MovementLineRow.invoice_number, MovementLineRow.line_index)
        for link in self.session.scalars(link_query):
            refs[link.movement_id].append(LineRef(invoice=link.invoice_number, line=link.line_index))
        legs = self.legs_of(where)
        return [(_movement(row, refs[row.id], legs.get(row.id, ())), row.command_id) for row in rows]

    def legs_of(self, where: Any = None) -> dict[int, list[Leg]]:
        """The legs of the movements a `where` filter on MovementRow selects (all without one),
        by movement id, in position order."""
        query = select(MovementLegRow, MovementRow.currency, MovementRow.reporting_currency).join(
            MovementRow, MovementRow.id == MovementLegRow.movement_id
        )
        if where is not None:
            query = where(query)
        out: dict[int, list[Leg]] = {}
        for leg, cur, rep in self.session.execute(
            query.order_by(MovementLegRow.movement_id, MovementLegRow.position)
        ):
            out.setdefault(leg.movement_id, []).append(
                Leg(
                    subscription=leg.subscription,
                    plan=leg.plan,
                    product=leg.product,
                    delta=from_minor(leg.delta, cur),
                    reporting_delta=from_minor(leg.reporting_delta, rep),
                )
            )
        return out

    def movement_row(self, movement_id: int) -> MrrMovement | None:
        """One ledger entry with its legs (not its invoice-line links)."""
        row = self.session.get(MovementRow, movement_id)
        if row is None:
            return None
        legs = self.legs_of(lambda q: q.where(MovementRow.id == movement_id))
        return _movement(row, (), legs.get(movement_id, ()))

    def lowest_mrr_from(self, customer: str, at: datetime) -> Decimal | None:
        """The customer's lowest month-end MRR from the month of `at` on (None without rows)."""
        row = self.session.execute(
            select(func.min(CustomerMonthRow.mrr_end), func.max(CustomerMonthRow.currency)).where(
                CustomerMonthRow.customer == customer, CustomerMonthRow.month >= month_index(at))
        ).one()
        return None if row[0] is None else from_minor(int(row[0]), str(row[1]))

    def reversal_of(self, movement_id: int) -> int | None:
        """The id of the entry that reverses `movement_id`, if any."""
        return self.session.scalar(select(MovementRow.id).where(MovementRow.reverses == movement_id))

    def links_of_command(self, command_id: int) -> list[tuple[int, LineRef]]:
        query = (
            select(MovementLineRow)
            .where(MovementLineRow.command_id == command_id)
            .order_by(MovementLineRow.movement_id, MovementLineRow.invoice_number, MovementLineRow.line_index)
        )
        return [
            (row.movement_id, LineRef(invoice=row.invoice_number, line=row.line_index))
            for row in self.session.scalars(query)
        ]

    def counts(self) -> dict[str, int]:
        """Row counts of the ledger tables (for summaries and tests)."""
        out: dict[str, int] = {}
        for name, table in (
            ("invoices", InvoiceRow),
            ("invoice_lines", InvoiceLineRow),
            ("credit_notes", CreditNoteRow),
            ("credit_note_lines", CreditNoteLineRow),
            ("mrr_movements", MovementRow),
            ("mrr_movement_legs", MovementLegRow),
            ("movement_invoice_lines", MovementLineRow),
        ):
            out[name] = self.session.scalar(select(func.count()).select_from(table)) or 0
        return out


def _apply_entry(rows: list[MonthRow], entry: dict[str, Any], before: int) -> list[MonthRow]:
    """A customer's month rows after one ledger entry: its month's end moves by the delta (the
    row is created, starting at the previous month's end, if it was not there), later months
    move with it; a reversal takes its expansion count and lost MRR back."""
    month, delta = entry["month"], entry["delta"]
    sign = -1 if entry["entry"] == "reversal" else 1
    expansions = sign if entry["type"] == "expansion" else 0
    lost = -entry["reporting_delta"] if entry["type"] in ("contraction", "churn") else 0
    out: list[MonthRow] = []
    level = before
    placed = False
    for row in rows:
        if row.month < month:
            out.append(row)
            level = row.mrr_end
            continue
        if not placed:
            if row.month == month:
                out.append(MonthRow(month, row.mrr_start, row.mrr_end + delta, row.expansions + expansions,
                                    row.lost + lost))
                placed = True
                continue
            out.append(MonthRow(month, level, level + delta, expansions, lost))
            placed = True
        out.append(MonthRow(row.month, row.mrr_start + delta, row.mrr_end + delta, row.expansions, row.lost))
    if not placed:
        out.append(MonthRow(month, level, level + delta, expansions, lost))
    return out


def _invoice(row: InvoiceRow, lines: Sequence[InvoiceLineRow]) -> Invoice:
    cur = row.currency
    return Invoice(
        number=row.number,
        customer=row.customer,
        currency=cur,
        status=row.status,  # constrained by a CHECK
        issued_at=row.issued_at,
        billing_date=row.billing_date.isoformat(),
        lines=tuple(
            InvoiceLine(
                kind=line.kind,  # written from LineKind
                description=line.description,
                subscription=line.subscription,
                quantity=line.quantity,
                unit_amount=line.unit_amount,
                amount=from_minor(line.amount, cur),
                period_start=line.period_start,
                period_end=line.period_end,
                included=line.included,
            )
            for line in lines
        ),
        subtotal=from_minor(row.subtotal, cur),
        discount=from_minor(row.discount, cur),
        tax=from_minor(row.tax, cur),
        total=from_minor(row.total, cur),
        credit_applied=from_minor(row.credit_applied, cur),
        amount_due=from_minor(row.amount_due, cur),
        credit_added=from_minor(row.credit_added, cur),
    )


def _credit_note(row: CreditNoteRow, lines: Sequence[CreditNoteLineRow]) -> CreditNote:
    cur = row.currency
    return CreditNote(
        number=row.number,
        invoice=row.invoice_number,
        customer=row.customer,
        currency=cur,
        issued_at=row.issued_at,
        reason=row.reason,  # constrained by a CHECK
        lines=tuple(
            CreditNoteLine(
                invoice_line=line.invoice_line_index,
                kind=line.kind,  # written from LineKind
                description=line.description,
                amount=from_minor(line.amount, cur),
            )
            for line in lines
        ),
        subtotal=from_minor(row.subtotal, cur),
        tax=from_minor(row.tax, cur),
        total=from_minor(row.total, cur),
    )


def _movement(row: MovementRow, refs: Sequence[LineRef], legs: Sequence[Leg] = ()) -> MrrMovement:
    cur = row.currency
    return MOVEMENT_ADAPTER.validate_python(
        {
            "id": row.id,
            "at": row.at,
            "customer": row.customer,
            "subscription": row.subscription,
            "type": row.type,
            "subtype": row.subtype,
            "currency": cur,
            "mrr_before": from_minor(row.mrr_before, cur),
            "mrr_after": from_minor(row.mrr_after, cur),
            "delta": from_minor(row.delta, cur),
            "reporting_currency": row.reporting_currency,
            "reporting_delta": from_minor(row.reporting_delta, row.reporting_currency),
            "cause": row.cause,
            "event_index": row.event_index,
            "invoice_lines": tuple(refs),
            "legs": tuple(legs),
            "entry": row.entry,
            "reverses": row.reverses,
        }
    )


# --- current view: customers and subscriptions ------------------------------------------------


@dataclass(frozen=True)
class CustomerView:
    id: str
    currency: str
    tax_rate: Decimal
    timezone: str
    locale: str
    name: str
    tags: dict[str, str]
    mrr: Decimal
    credit_balance: Decimal
    created_at: datetime


@dataclass(frozen=True)
class SubscriptionView:
    id: str
    customer: str
    plan: str
    quantity: int
    addons: dict[str, int]
    status: str  # trialing | active | cancelled
    cancel_at_period_end: bool
    scheduled: list[dict[str, Any]]  # period-end changes not yet in force
    trial_end: datetime | None
    current_period_start: datetime | None
    current_period_end: datetime | None
    ended_at: datetime | None
    created_at: datetime | None = None  # set from `now` when the row is first written


class ViewRepository:
    """Upserts of the current view; each changed row's `version` is bumped and checked by the
    ORM (`version_id_col`), so a stale concurrent update fails instead of overwriting."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def put_customer(self, view: CustomerView, *, now: datetime) -> None:
        row = self.session.get(CustomerRow, view.id)
        if row is None:
            row = CustomerRow(id=view.id)
            self.session.add(row)
        row.currency = view.currency
        row.tax_rate = view.tax_rate
        row.timezone = view.timezone
        row.locale = view.locale
        row.name = view.name
        row.tags = dict(view.tags)
        row.mrr = to_minor(view.mrr, view.currency)
        row.credit_balance = to_minor(view.credit_balance, view.currency)
        row.created_at = view.created_at
        row.updated_at = now
        self.session.flush()

    def put_subscription(self, view: SubscriptionView, *, now: datetime) -> None:
        row = self.session.get(SubscriptionRow, view.id)
        if row is None:
            row = SubscriptionRow(id=view.id)
            self.session.add(row)
        row.customer = view.customer
        row.plan = view.plan
        row.quantity = view.quantity
        row.addons = dict(view.addons)
        row.status = view.status
        row.cancel_at_period_end = view.cancel_at_period_end
        row.scheduled = list(view.scheduled)
        row.trial_end = view.trial_end
        row.current_period_start = view.current_period_start
        row.current_period_end = view.current_period_end
        row.ended_at = view.ended_at
        if row.created_at is None:
            row.created_at = view.created_at or now
        row.updated_at = now
        self.session.flush()

    def customer(self, customer_id: str) -> CustomerView | None:
        row = self.session.get(CustomerRow, customer_id)
        return None if row is None else _customer(row)

    def customers(self) -> list[CustomerView]:
        query = select(CustomerRow).order_by(CustomerRow.created_at, CustomerRow.id)
        return [_customer(row) for row in self.session.scalars(query)]

    def subscription(self, subscription_id: str) -> SubscriptionView | None:
        row = self.session.get(SubscriptionRow, subscription_id)
        return None if row is None else _subscription(row)

    def subscriptions(self, *, customer: str | None = None) -> list[SubscriptionView]:
        query = select(SubscriptionRow).order_by(SubscriptionRow.created_at, SubscriptionRow.id)
        if customer is not None:
            query = query.where(SubscriptionRow.customer == customer)
        return [_subscription(row) for row in self.session.scalars(query)]

    def version_of(self, kind: str, key: str) -> int | None:
        """The row version of a customer or subscription (None when absent)."""
        table = CustomerRow if kind == "customer" else SubscriptionRow
        return self.session.scalar(select(table.version).where(table.id == key))


def _customer(row: CustomerRow) -> CustomerView:
    return CustomerView(
        id=row.id,
        currency=row.currency,
        tax_rate=row.tax_rate,
        timezone=row.timezone,
        locale=row.locale,
        name=row.name,
        tags={str(k): str(v) for k, v in row.tags.items()},
        mrr=from_minor(row.mrr, row.currency),
        credit_balance=from_minor(row.credit_balance, row.currency),
        created_at=row.created_at,
    )


def _subscription(row: SubscriptionRow) -> SubscriptionView:
    return SubscriptionView(
        id=row.id,
        customer=row.customer,
        plan=row.plan,
        quantity=row.quantity,
        addons={str(k): int(v) for k, v in row.addons.items()},
        status=row.status,
        cancel_at_period_end=row.cancel_at_period_end,
        scheduled=[dict(item) for item in row.scheduled],
        trial_end=row.trial_end,
        current_period_start=row.current_period_start,
        current_period_end=row.current_period_end,
        ended_at=row.ended_at,
        created_at=row.created_at,
    )
