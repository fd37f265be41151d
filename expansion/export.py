"""The ledger as rows for export: one row per entry, with the invoice lines that billed it.

Streamed from the database in id order (one pass, memory flat in the ledger's size); amounts
are decimal strings in the entry's currency (the reporting delta in the reporting currency),
instants ISO 8601 in UTC, invoice references `INV-0003#1` (invoice number and 0-based line).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

from billing.money import from_minor
from billing.periods import iso
from billing.persistence import Engine
from billing.persistence.sql_reader import read_ledger

MOVEMENTS = """
SELECT m.id, m.at, m.customer, m.subscription, m.type, m.subtype, m.entry, m.reverses, m.currency, m.mrr_before,
  m.mrr_after, m.delta, m.reporting_currency, m.reporting_delta, m.cause, m.command_id, l.invoice_number, l.line_index
FROM mrr_movements m LEFT JOIN movement_invoice_lines l ON l.movement_id = m.id
ORDER BY m.id, l.invoice_number, l.line_index
"""


def _instant(value: object) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return iso(value.replace(tzinfo=UTC) if value.tzinfo is None else value)


def movement_rows(engine: Engine) -> Iterator[list[object]]:
    """id, at, customer, subscription, type, subtype, entry, reverses, currency, mrr_before,
    mrr_after, delta, reporting_currency, reporting_delta, cause, command, invoices,
    invoice_lines — one list per ledger entry."""
    with read_ledger(engine) as reader:
        current: list[object] | None = None
        lines: list[tuple[str, int]] = []
        for row in reader.stream(MOVEMENTS):
            if current is None or current[0] != row[0]:
                if current is not None:
                    yield _finish(current, lines)
                cur, rep = str(row[8]), str(row[12])
                current = [row[0], _instant(row[1]), row[2], row[3], row[4], row[5], row[6], row[7], cur,
                           from_minor(int(row[9]), cur), from_minor(int(row[10]), cur), from_minor(int(row[11]), cur),
                           rep, from_minor(int(row[13]), rep), row[14], row[15]]
                lines = []
            if row[16] is not None:
                lines.append((str(row[16]), int(row[17])))
        if current is not None:
            yield _finish(current, lines)


def _finish(row: list[object], lines: list[tuple[str, int]]) -> list[object]:
    invoices = list(dict.fromkeys(number for number, _ in lines))
    return [*row, ";".join(invoices), ";".join(f"{number}#{index}" for number, index in lines)]
