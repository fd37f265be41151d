"""`billing verify`: check a live database against the engine's invariants.

Each check reads the stored rows with set-based SQL (bound parameters only, no SQL built from
data) and reports every violation with the rows involved; the database is clean when no check
finds anything. What is checked, and why it must hold:

- `invoice_totals`: subtotal = Σ non-discount lines; discount = −Σ discount lines; total =
  subtotal − discount + tax; tax within half a minor unit of (subtotal − discount) × the
  customer's rate; amount_due = total − credit_applied when total > 0, else 0 (SCENARIOS.md
  "Invoices").
- `invoice_numbering`: every series (`INV-`, `CN-`, …) runs 1, 2, … n, no gap, no number twice.
- `double_billing`: no subscription's plan or add-on period is on two invoices that are not void.
- `period_tiling`: a subscription's billed plan periods do not overlap (a gap is allowed: a
  trial, a cancellation), unless a proration credit on the subscription gives the overlapped
  time back (an immediate change of interval).
- `movement_mrr`: per customer, Σ deltas of the ledger's entries = its current MRR (reversing
  entries aside: they correct what the ledger reports, not the book).
- `ledger_snapshots`: per customer and month, the snapshot's end − start = Σ deltas of the
  month's entries, and each snapshot starts where the previous one ended.
- `ledger_bridge`: per month, the maintained whole-book figures equal those aggregated from the
  ledger itself, so the bridge `starting + new + expansion + reactivation − contraction − churn +
  fx_impact = ending` that the metrics report rests on the entries.

A movement → invoice line link always names a line that exists: a foreign key guarantees it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, Engine, text

from billing.periods import iso, month_start

FindingRow = dict[str, Any]

CHECKS = ("invoice_totals", "invoice_numbering", "double_billing", "period_tiling", "movement_mrr",
          "ledger_snapshots", "ledger_bridge")
BRIDGE_KEYS = ("starting_mrr", "new", "expansion", "reactivation", "contraction", "churn", "fx_impact", "ending_mrr")
NUMBER = re.compile(r"^(.*?)(\d+)$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}")


@dataclass(frozen=True)
class Finding:
    check: str
    message: str
    rows: tuple[FindingRow, ...] = ()


@dataclass
class Verification:
    checked: dict[str, int] = field(default_factory=dict)  # check -> rows (or groups) examined
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings

    def to_json(self) -> dict[str, object]:
        return {"clean": self.clean, "checked": self.checked,
                "findings": [{"check": f.check, "message": f.message, "rows": list(f.rows)} for f in self.findings]}


# --- checks -----------------------------------------------------------------------------------

INVOICE_SUMS = text("""
SELECT i.number, i.customer, i.subtotal, i.discount, i.tax, i.total, i.credit_applied, i.amount_due,
       c.tax_rate,
       COALESCE(SUM(CASE WHEN l.kind <> 'discount' THEN l.amount ELSE 0 END), 0) AS lines_subtotal,
       COALESCE(SUM(CASE WHEN l.kind = 'discount' THEN l.amount ELSE 0 END), 0) AS lines_discount
FROM invoices i
LEFT JOIN invoice_lines l ON l.invoice_number = i.number
LEFT JOIN customers c ON c.id = i.customer
GROUP BY i.number, i.customer, i.subtotal, i.discount, i.tax, i.total, i.credit_applied, i.amount_due, c.tax_rate
""")


def check_invoice_totals(conn: Connection) -> tuple[int, list[Finding]]:
    findings = []
    count = 0
    for r in conn.execute(INVOICE_SUMS).mappings():
        count += 1
        problems = []
        if r["subtotal"] != r["lines_subtotal"]:
            problems.append(f"subtotal {r['subtotal']} ≠ Σ lines {r['lines_subtotal']}")
        if r["discount"] != -r["lines_discount"]:
            problems.append(f"discount {r['discount']} ≠ −Σ discount lines {-r['lines_discount']}")
        if r["total"] != r["subtotal"] - r["discount"] + r["tax"]:
            problems.append(f"total {r['total']} ≠ subtotal − discount + tax "
                            f"{r['subtotal'] - r['discount'] + r['tax']}")
        if r["tax_rate"] is not None:
            exact = Decimal(r["subtotal"] - r["discount"]) * Decimal(str(r["tax_rate"]))
            if abs(Decimal(r["tax"]) - exact) > Decimal("0.5"):
                problems.append(f"tax {r['tax']} is not (subtotal − discount) × {r['tax_rate']} = {exact}")
        due = r["total"] - r["credit_applied"] if r["total"] > 0 else 0
        if r["amount_due"] != due:
            problems.append(f"amount_due {r['amount_due']} ≠ {due}")
        if problems:
            row = {k: _plain(v) for k, v in r.items()}
            findings.append(Finding("invoice_totals", f"invoice {r['number']}: " + "; ".join(problems)
                                    + " (minor units)", (row,)))
    return count, findings


def check_numbering(conn: Connection) -> tuple[int, list[Finding]]:
    findings = []
    count = 0
    for table in ("invoices", "credit_notes"):
        series: dict[str, list[int]] = defaultdict(list)
        query = text("SELECT number FROM invoices") if table == "invoices" else text("SELECT number FROM credit_notes")
        for (number,) in conn.execute(query):
            count += 1
            m = NUMBER.match(number)
            if m is None:
                findings.append(Finding("invoice_numbering", f"{table}: {number!r} has no sequence number",
                                        ({"table": table, "number": number},)))
                continue
            series[m.group(1)].append(int(m.group(2)))
        for prefix, numbers in sorted(series.items()):
            uses = Counter(numbers)
            seen = set(uses)
            twice = sorted(n for n, times in uses.items() if times > 1)
            missing = sorted(set(range(1, max(numbers) + 1)) - seen)
            if missing:
                shown = ", ".join(str(n) for n in missing[:20]) + (" …" if len(missing) > 20 else "")
                findings.append(Finding("invoice_numbering", f"series {prefix!r} ({table}): {len(missing)} number(s) "
                                        f"missing: {shown}",
                                        tuple({"table": table, "series": prefix, "missing": n} for n in missing[:100])))
            if twice:
                findings.append(Finding("invoice_numbering", f"series {prefix!r} ({table}): used twice: "
                                        + ", ".join(str(n) for n in twice),
                                        tuple({"table": table, "series": prefix, "number": n} for n in twice)))
    return count, findings


BILLED_TWICE = text("""
SELECT l.subscription, l.kind, l.period_start, COUNT(*) AS times
FROM invoice_lines l JOIN invoices i ON i.number = l.invoice_number
WHERE i.status <> 'void' AND l.kind IN ('plan', 'addon') AND l.subscription IS NOT NULL
GROUP BY l.subscription, l.kind, l.description, l.period_start
HAVING COUNT(*) > 1
""")
BILLED_TWICE_LINES = text("""
SELECT l.invoice_number, l.line_index, l.subscription, l.kind, l.description, l.period_start, l.period_end, l.amount
FROM invoice_lines l JOIN invoices i ON i.number = l.invoice_number
WHERE i.status <> 'void' AND l.subscription = :sub AND l.kind = :kind AND l.period_start = :start
ORDER BY l.invoice_number, l.line_index
""")


def check_double_billing(conn: Connection) -> tuple[int, list[Finding]]:
    findings = []
    for sub, kind, start, times in conn.execute(BILLED_TWICE):
        rows = tuple({k: _plain(v) for k, v in r.items()}
                     for r in conn.execute(BILLED_TWICE_LINES, {"sub": sub, "kind": kind, "start": start}).mappings())
        findings.append(Finding("double_billing", f"subscription {sub}: the {kind} period starting {_plain(start)} "
                                f"is billed {times} times", rows))
    counted = conn.execute(text("SELECT COUNT(*) FROM invoice_lines WHERE kind IN ('plan', 'addon')")).scalar_one()
    return int(counted), findings


OVERLAPS = text("""
SELECT * FROM (
  SELECT l.invoice_number, l.line_index, l.subscription, l.period_start, l.period_end,
         LAG(l.period_end) OVER w AS previous_end, LAG(l.invoice_number) OVER w AS previous_invoice
  FROM invoice_lines l JOIN invoices i ON i.number = l.invoice_number
  WHERE i.status <> 'void' AND l.kind = 'plan' AND l.subscription IS NOT NULL
  WINDOW w AS (PARTITION BY l.subscription ORDER BY l.period_start, l.period_end)
) t
WHERE t.previous_end > t.period_start AND NOT EXISTS (
  SELECT 1 FROM invoice_lines x JOIN invoices xi ON xi.number = x.invoice_number
  WHERE xi.status <> 'void' AND x.subscription = t.subscription AND x.kind = 'proration' AND x.amount < 0
    AND x.period_start <= t.period_start AND x.period_end >= t.previous_end)
""")


def check_tiling(conn: Connection) -> tuple[int, list[Finding]]:
    findings = []
    for r in conn.execute(OVERLAPS).mappings():
        row = {k: _plain(v) for k, v in r.items()}
        findings.append(Finding("period_tiling", f"subscription {r['subscription']}: the period "
                                f"{_plain(r['period_start'])} – {_plain(r['period_end'])} on {r['invoice_number']} "
                                f"overlaps the previous one (ending {_plain(r['previous_end'])} on "
                                f"{r['previous_invoice']})", (row,)))
    counted = conn.execute(text("SELECT COUNT(*) FROM invoice_lines WHERE kind = 'plan'")).scalar_one()
    return int(counted), findings


MOVEMENT_MRR = text("""
SELECT c.id AS customer, c.currency, c.mrr, COALESCE(m.total, 0) AS ledger_mrr, COALESCE(m.entries, 0) AS entries
FROM customers c
LEFT JOIN (SELECT customer, SUM(delta) AS total, COUNT(*) AS entries FROM mrr_movements
           WHERE entry <> 'reversal' GROUP BY customer) m ON m.customer = c.id
WHERE c.mrr <> COALESCE(m.total, 0)
""")


def check_movement_mrr(conn: Connection) -> tuple[int, list[Finding]]:
    findings = [
        Finding("movement_mrr", f"customer {r['customer']}: MRR {r['mrr']} but its {r['entries']} ledger entries sum "
                f"to {r['ledger_mrr']} (minor units of {r['currency']})", ({k: _plain(v) for k, v in r.items()},))
        for r in conn.execute(MOVEMENT_MRR).mappings()
    ]
    return int(conn.execute(text("SELECT COUNT(*) FROM customers")).scalar_one()), findings


SNAPSHOTS = text("""
SELECT * FROM (
  SELECT s.customer, s.month, s.mrr_start, s.mrr_end, COALESCE(m.total, 0) AS moved,
         COALESCE(LAG(s.mrr_end) OVER (PARTITION BY s.customer ORDER BY s.month), 0) AS previous_end
  FROM customer_mrr_months s
  LEFT JOIN (SELECT customer, month, SUM(delta) AS total FROM mrr_movements GROUP BY customer, month) m
    ON m.customer = s.customer AND m.month = s.month
) t
WHERE t.mrr_end - t.mrr_start <> t.moved OR t.mrr_start <> t.previous_end
""")


def check_snapshots(conn: Connection) -> tuple[int, list[Finding]]:
    findings = []
    for r in conn.execute(SNAPSHOTS).mappings():
        label = _month_label(r["month"])
        problems = []
        if r["mrr_end"] - r["mrr_start"] != r["moved"]:
            problems.append(f"moved {r['mrr_end'] - r['mrr_start']} but its entries sum to {r['moved']}")
        if r["mrr_start"] != r["previous_end"]:
            problems.append(f"starts at {r['mrr_start']}, the previous snapshot ended at {r['previous_end']}")
        findings.append(Finding("ledger_snapshots", f"customer {r['customer']}, {label}: " + "; ".join(problems),
                                ({**{k: _plain(v) for k, v in r.items()}, "month": label},)))
    return int(conn.execute(text("SELECT COUNT(*) FROM customer_mrr_months")).scalar_one()), findings


def check_bridge(engine: Engine) -> tuple[int, list[Finding]]:
    from expansion.ledger import metric_set

    with engine.connect() as conn:
        if conn.execute(text("SELECT COUNT(*) FROM mrr_movements")).scalar_one() == 0:
            return 0, []
    maintained = {str(r["period"]): r for r in metric_set(engine, ttm=False).rows}
    aggregated = {str(r["period"]): r for r in metric_set(engine, ttm=False, fast=False).rows}
    findings = []
    for period in sorted(set(maintained) | set(aggregated)):
        kept, summed = maintained.get(period, {}), aggregated.get(period, {})
        differ = {k: {"maintained": kept.get(k), "ledger": summed.get(k)}
                  for k in BRIDGE_KEYS if kept.get(k) != summed.get(k)}
        if differ:
            shown = "; ".join(f"{k} {v['maintained']} maintained, {v['ledger']} from the ledger"
                              for k, v in differ.items())
            findings.append(Finding("ledger_bridge", f"{period}: {shown}",
                                    tuple({"period": period, "figure": k, **v} for k, v in differ.items())))
    return len(aggregated), findings


# --- the command --------------------------------------------------------------------------------


def verify(engine: Engine) -> Verification:
    """Run every check (see the module docstring) in one read-only transaction per group."""
    result = Verification()
    row_checks: list[tuple[str, Callable[[Connection], tuple[int, list[Finding]]]]] = [
        ("invoice_totals", check_invoice_totals), ("invoice_numbering", check_numbering),
        ("double_billing", check_double_billing), ("period_tiling", check_tiling),
        ("movement_mrr", check_movement_mrr), ("ledger_snapshots", check_snapshots),
    ]
    with engine.connect() as conn:
        for name, check in row_checks:
            count, found = check(conn)
            result.checked[name] = count
            result.findings.extend(found)
        conn.rollback()
    count, found = check_bridge(engine)
    result.checked["ledger_bridge"] = count
    result.findings.extend(found)
    order = {name: i for i, name in enumerate(CHECKS)}
    result.findings.sort(key=lambda f: order[f.check])
    result.checked = {name: result.checked[name] for name in CHECKS}
    return result


def verification_lines(result: Verification) -> Iterator[str]:
    for name, count in result.checked.items():
        found = sum(1 for f in result.findings if f.check == name)
        yield f"{'FAIL' if found else 'ok  '} {name:<18} {count:>10,} checked  {found} finding(s)"
    for f in result.findings:
        yield ""
        yield f"{f.check}: {f.message}"
        for row in f.rows[:20]:
            yield "    " + ", ".join(f"{k}={v}" for k, v in row.items())
        if len(f.rows) > 20:
            yield f"    … {len(f.rows) - 20} more row(s)"
    yield ""
    yield "clean" if result.clean else f"{len(result.findings)} finding(s)"


def _plain(value: Any) -> Any:
    """A JSON-ready value; timestamps (strings on SQLite) as ISO 8601."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, str) and TIMESTAMP.match(value):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return iso(value if value.tzinfo else value.replace(tzinfo=UTC))  # stored instants are UTC
    return value


def _month_label(month: int) -> str:
    return month_start(month).strftime("%Y-%m")
