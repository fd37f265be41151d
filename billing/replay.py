"""Replay a scenario through the book in memory and shape the output (SCENARIOS.md, "Output").

`billing replay` runs scenarios through the database (billing.service.replay); this module is
the pure part both use: run the events, collect invoices (in their final status), credit notes
and movements (with the invoice lines that billed them), and compute the metric set.

The output keeps the contract's keys `invoices`, `movements` and `metrics` as they are; a
scenario that issued credit notes gets a fourth key, `credit_notes`, and only then.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from billing.book import Book, Outcome
from billing.records import CreditNote, Invoice, LineRef, MrrMovement, credit_note_json, invoice_json, movement_json
from billing.scenario import Scenario
from expansion.metrics import compute_metrics


@dataclass
class ReplayResult:
    invoices: list[Invoice]
    movements: list[MrrMovement]
    metrics: dict[str, list[dict[str, object]]] = field(default_factory=dict)
    credit_notes: list[CreditNote] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "invoices": [invoice_json(i) for i in self.invoices],
            "movements": [movement_json(m) for m in self.movements],
            "metrics": self.metrics,
        }
        if self.credit_notes:
            out["credit_notes"] = [credit_note_json(n) for n in self.credit_notes]
        return out


def collect(outcomes: list[Outcome]) -> tuple[list[Invoice], list[MrrMovement]]:
    """Fold outcomes into final invoices (status changes applied) and linked movements."""
    invoices: dict[str, Invoice] = {}
    movements: dict[int, MrrMovement] = {}
    links: dict[int, list[LineRef]] = {}
    for out in outcomes:
        for invoice in out.issued:
            invoices[invoice.number] = invoice
        for number, status in out.status_changes:
            invoices[number] = invoices[number].with_status(status)
        for movement in out.movements:
            movements[movement.id] = movement
        for movement_id, ref in out.links:
            links.setdefault(movement_id, []).append(ref)
    linked = [
        m.model_copy(update={"invoice_lines": tuple(sorted(set(links.get(m.id, [])),
                                                           key=lambda r: (r.invoice, r.line)))})
        for m in movements.values()
    ]
    return list(invoices.values()), linked


def collect_credit_notes(outcomes: list[Outcome]) -> list[CreditNote]:
    """The credit notes the outcomes issued, in issue order."""
    return [note for out in outcomes for note in out.credit_notes]


def metrics_for(scenario: Scenario, movements: list[MrrMovement]) -> dict[str, list[dict[str, object]]]:
    if not scenario.events:
        return {"month": [], "quarter": [], "year": []}
    return compute_metrics(movements, scenario.settings, scenario.events[0].at, scenario.events[-1].at)


def replay_in_memory(scenario: Scenario) -> ReplayResult:
    """Run every event of a scenario through a fresh book (no database)."""
    book = Book(scenario.settings, scenario.catalog)
    outcomes = [book.apply(event, index) for index, event in enumerate(scenario.events)]
    invoices, movements = collect(outcomes)
    return ReplayResult(invoices, movements, metrics_for(scenario, movements), collect_credit_notes(outcomes))
