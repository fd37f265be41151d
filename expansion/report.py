"""The expansion report: `billing report --out DIR` writes DIR/index.html and DIR/trail/*.html.

index.html is one self-contained page that opens offline: inline CSS, charts as inline SVG drawn
by matplotlib (its SVG backend, text kept as text), no script, no external font, image or style
sheet. It shows, per calendar month (UTC) of the book: the MRR bridge (a waterfall per month),
movements stacked by type and subtype, expansion by subtype, ARPEA and the expansion growth rate,
NRR and GRR, a cohort heat map of net MRR retention and an expansion-readiness list; then the
quarter and year tables.

Where the numbers come from:
- the metric set is `expansion.metrics.compute_metrics` over every movement in the ledger, from
  the first to the last command of the book (exactly what `billing replay --json` prints for a
  scenario);
- every amount links to its trail page, which lists the movements that make it up — the same
  `expansion.trace.metric_trail` that `billing trace metric` prints — with a total equal to the
  number; starting/ending MRR, FX impact, NRR, GRR, ARPA and the quick ratio link to the period's
  page, which lists every customer's MRR at the period's start and end (converted as the metric
  set converts it) and the sums the rates divide;
- each movement on a trail page links to its audit trail (`trail/movements.html#m-ID`, the data
  of `billing trace movement ID`): the command, MRR before and after, the invoice lines.

The cohort rows (from `expansion.cohorts`) and the readiness list are built in
`expansion.report_model`; the charts are drawn by `expansion.report_charts`; this module writes
the pages.

Every customer-supplied string (customer ids, names, tags, subscription ids, line descriptions,
command payloads and actors) is HTML-escaped by `el`/`esc`; charts carry no customer strings at
all.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from pathlib import Path

from billing.money import money_str
from billing.periods import iso
from billing.persistence import CustomerView, Engine, StoredCommand
from billing.records import EXPANSION_SUBTYPES
from expansion.metrics import CalendarPeriod
from expansion.report_charts import (
    CHART_MONTHS,
    arpea_chart,
    bridge_chart,
    cohort_chart,
    expansion_chart,
    movements_chart,
    retention_chart,
)
from expansion.report_model import (
    PERIOD_KINDS,
    READINESS_WINDOW_DAYS,
    TRAIL_METRICS,
    Cohort,
    ReportModel,
    build_model,
    cohort_url,
    customer_url,
    load_report_data,
    movement_url,
    period_url,
    trail_url,
)
from expansion.trace import BilledLine, MetricTrail, fx_rate_text, payload_text

# ---------------------------------------------------------------------------------------------
# Safe HTML: every string is escaped unless it is already `Html`
# ---------------------------------------------------------------------------------------------


class Html(str):
    """Markup that is safe to emit as is (built by `el`, `esc` or a trusted renderer)."""


def esc(value: object) -> Html:
    return Html(html.escape(str(value), quote=True))


def join(parts: Iterable[object], sep: str = "") -> Html:
    return Html(sep.join(p if isinstance(p, Html) else esc(p) for p in parts))


def el(tag: str, *children: object, **attrs: object) -> Html:
    """An element; `cls` becomes `class`, `None`/`False` attributes are left out, children that
    are not `Html` are escaped."""
    rendered = []
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        name = "class" if key == "cls" else key.rstrip("_").replace("_", "-")
        rendered.append(f' {name}="{esc(value)}"')
    return Html(f"<{tag}{''.join(rendered)}>{join(children)}</{tag}>")


def link(text: object, href: str | None) -> Html:
    return el("a", text, href=href) if href else esc(text)


# ---------------------------------------------------------------------------------------------
# Pages
# ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1d1d1f;
margin:0 auto;max-width:1180px;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta,.note{color:#555;font-size:13px}nav a{margin-right:12px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:12px}
th,td{padding:3px 7px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}td{white-space:nowrap}
th{background:#f6f6f6;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.total td{font-weight:600;border-top:2px solid #999}
a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
.chart svg{width:100%;height:auto;display:block}.chart{margin:6px 0 10px}
.cohort svg{max-width:900px}
pre{background:#f6f6f6;padding:6px 8px;white-space:pre-wrap;word-break:break-all;font-size:12px;margin:4px 0}
dl{display:grid;grid-template-columns:140px 1fr;gap:2px 12px;margin:4px 0}dt{color:#555}dd{margin:0}
.wide{overflow-x:auto;max-width:100%}
"""


def page(title: str, body: Iterable[object]) -> str:
    head = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{esc(title)}</title><style>{CSS}</style></head>')
    return f"{head}<body>{join(body)}</body></html>\n"


def amount(value: object) -> str:
    """An amount string for display: thousands separated, same digits."""
    if value is None:
        return "—"
    return f"{Decimal(str(value)):,}"


def rate(value: object) -> str:
    return "—" if value is None else f"{value}%"


def num_cell(value: object, href: str | None, fmt: Callable[[object], str] = amount) -> Html:
    """A right-aligned number linking to its trail ("—" for a null rate, not linked)."""
    if value is None:
        return el("td", "—", cls="n")
    return el("td", link(fmt(value), href), cls="n")


def _is_cell(value: object) -> bool:
    """A `<td>` built by `el` or `num_cell` (anything else becomes a cell's escaped text)."""
    return isinstance(value, Html) and value.startswith("<td")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], numeric: Iterable[int] = ()) -> Html:
    right = set(numeric)
    head = el("tr", *(el("th", h, cls="n" if i in right else None) for i, h in enumerate(headers)))
    body = [el("tr", *(c if _is_cell(c) else el("td", c) for c in row)) for row in rows]
    # a wide table scrolls inside its box instead of widening the page
    return el("div", el("table", el("thead", head), el("tbody", *body)), cls="wide")


BRIDGE_HEADERS = ["period", "starting", "new", "expansion", "contraction", "churn", "reactivation", "fx impact",
                  "ending", "exp. accounts", "ARPEA", "exp. growth", "NRR", "GRR", "ARPA", "quick ratio"]


def bridge_rows(model: ReportModel, kind: str, prefix: str = "trail/") -> list[list[object]]:
    out: list[list[object]] = []
    for r in model.metrics[kind]:
        p = r["period"]
        out.append([
            el("td", link(p, period_url(p, prefix))),
            num_cell(r["starting_mrr"], period_url(p, prefix)),
            num_cell(r["new"], trail_url("new", p, prefix)),
            num_cell(r["expansion"], trail_url("expansion", p, prefix)),
            num_cell(r["contraction"], trail_url("contraction", p, prefix)),
            num_cell(r["churn"], trail_url("churn", p, prefix)),
            num_cell(r["reactivation"], trail_url("reactivation", p, prefix)),
            num_cell(r["fx_impact"], period_url(p, prefix)),
            num_cell(r["ending_mrr"], period_url(p, prefix)),
            num_cell(r["expansion_accounts"], trail_url("expansion", p, prefix), str),
            num_cell(r["arpea"], trail_url("expansion", p, prefix)),
            num_cell(r["expansion_growth_rate"], trail_url("expansion", p, prefix), rate),
            num_cell(r["nrr"], period_url(p, prefix), rate),
            num_cell(r["grr"], period_url(p, prefix), rate),
            num_cell(r["arpa"], period_url(p, prefix)),
            num_cell(r["quick_ratio"], period_url(p, prefix), str),
        ])
    return out


def index_page(model: ReportModel) -> str:
    data = model.data
    rep = model.rep
    body: list[object] = [
        el("h1", "Expansion report"),
        el("p", f"Database {data.source} · book from {iso(data.first_at) if data.first_at else '—'} to "
                f"{iso(data.last_at) if data.last_at else '—'} · reporting currency {rep} · "
                f"{len(data.movements)} MRR movement(s), {len(data.customers)} customer(s)", cls="meta"),
        el("p", "Every number links to its trail: the movements that make it up, each with the command that "
                "caused it and the invoice lines that billed it. Amounts are in the reporting currency; "
                "periods are calendar months, quarters and years in UTC.", cls="note"),
    ]
    if not model.metrics["month"]:
        body.append(el("p", "No MRR movements yet: nothing to report."))
        return page("Expansion report", body)
    body.append(el("nav", *(el("a", text, href=f"#{anchor}") for anchor, text in (
        ("bridge", "MRR bridge"), ("movements", "Movements"), ("expansion", "Expansion by subtype"),
        ("arpea", "ARPEA"), ("retention", "NRR / GRR"), ("cohorts", "Cohorts"), ("readiness", "Readiness"),
        ("quarters", "Quarters and years"), ("sources", "Sources")))))
    shown = f" (charts: the latest {CHART_MONTHS} months)" if len(model.metrics["month"]) > CHART_MONTHS else ""
    body += [
        el("h2", f"MRR bridge per month{shown}", id="bridge"),
        el("p", "starting + new + expansion + reactivation − contraction − churn + fx impact = ending. "
                "Click a bar or a number for the movements behind it.", cls="note"),
        el("div", Html(bridge_chart(model)), cls="chart"),
        table(BRIDGE_HEADERS, bridge_rows(model, "month"), numeric=range(1, 16)),
        el("h2", "Movements by type and subtype", id="movements"),
        el("div", Html(movements_chart(model)), cls="chart"),
        el("h2", "Expansion by subtype", id="expansion"),
        el("div", Html(expansion_chart(model)), cls="chart"),
        table(["period", *EXPANSION_SUBTYPES, "expansion"],
              ([el("td", r["period"]),
                *(num_cell(r["expansion_by_subtype"][s], trail_url(f"expansion.{s}", r["period"]))
                  for s in EXPANSION_SUBTYPES),
                num_cell(r["expansion"], trail_url("expansion", r["period"]))] for r in model.metrics["month"]),
              numeric=range(1, len(EXPANSION_SUBTYPES) + 2)),
        el("h2", "ARPEA and expansion growth rate", id="arpea"),
        el("p", "ARPEA = expansion ÷ expansion accounts; growth = (expansion − previous expansion) ÷ previous "
                "expansion × 100.", cls="note"),
        el("div", Html(arpea_chart(model)), cls="chart"),
        el("h2", "Net and gross revenue retention", id="retention"),
        el("p", "Over the customers paying when the period starts: NRR = their MRR at the end ÷ at the start; "
                "GRR counts each at most at its starting MRR.", cls="note"),
        el("div", Html(retention_chart(model)), cls="chart"),
        el("h2", "Cohorts: net MRR retention", id="cohorts"),
        el("p", "Signup month (the month of a customer's first movement) × months since: the cohort's MRR at the "
                "end of that month ÷ its MRR at the end of the signup month (net; gross counts each customer at "
                "most at its base), currencies valued at the rate at the end of the last month. From the cohort "
                "table (expansion/cohorts.py).", cls="note"),
        el("div", Html(cohort_chart(model)), cls="chart cohort"),
        cohort_table_html(model),
        el("h2", "Expansion readiness", id="readiness"),
        el("p", f"Customers paying at the book's last command ({iso(data.last_at) if data.last_at else '—'}) that "
                f"expanded in the trailing {READINESS_WINDOW_DAYS} days, most expansion movements first, then the "
                "largest expansion, then the most recent: an account that keeps adding seats, add-ons or usage is "
                "the likeliest to expand again. Seats are those in force on its active subscriptions.",
           cls="note"),
        readiness_html(model),
        el("h2", "Quarters and years", id="quarters"),
        table(BRIDGE_HEADERS, bridge_rows(model, "quarter"), numeric=range(1, 16)),
        table(BRIDGE_HEADERS, bridge_rows(model, "year"), numeric=range(1, 16)),
        el("h2", "Where the numbers come from", id="sources"),
        el("p", "The metric set is computed from the MRR movements in the ledger (expansion/metrics.py, the same "
                "code as `billing replay --json`), from the book's first to its last command. An amount links to "
                "the list of movements that sum to it (`billing trace metric NAME --period P`); starting and "
                "ending MRR, FX impact, NRR, GRR, ARPA and the quick ratio link to the period's page, which lists "
                "every customer's MRR at the period's start and end. Each movement links to its audit trail "
                "(`billing trace movement ID`): the command that caused it, MRR before and after, and the invoice "
                "lines that billed it. `billing reconcile --period P` ties the movements to the invoices.",
           cls="note"),
    ]
    return page("Expansion report", body)


def cohort_table_html(model: ReportModel) -> Html:
    width = max((len(c.net) for c in model.cohorts), default=0)
    rows = []
    for cohort in model.cohorts:
        href = cohort_url(cohort.month.label)
        for kind, values in (("net", cohort.net), ("gross", cohort.gross)):
            cells: list[object] = [el("td", link(cohort.month.label, href) if kind == "net" else ""),
                                   el("td", kind),
                                   num_cell(len(cohort.customers), href, str) if kind == "net" else el("td", ""),
                                   num_cell(money_str(cohort.base, model.rep), href) if kind == "net" else el("td", "")]
            cells += [num_cell(v, href, rate) for v in values]
            cells += [el("td", "") for _ in range(width - len(values))]
            rows.append(cells)
    return table(["signup month", "retention", "customers", f"base MRR ({model.rep})", *(str(k) for k in range(width))],
                 rows, numeric=range(2, width + 4))


def readiness_html(model: ReportModel) -> Html:
    if not model.ready:
        return el("p", f"No customer expanded in the last {READINESS_WINDOW_DAYS} days.")
    rows = []
    for r in model.ready:
        href = customer_url(model, r.customer)
        rows.append([
            el("td", link(r.customer, href)),
            el("td", r.name),
            el("td", ", ".join(f"{k}={v}" for k, v in sorted(r.tags.items()))),
            el("td", link(f"{amount(money_str(r.mrr, r.currency))} {r.currency}", href), cls="n"),
            num_cell(r.seats, href, str),
            num_cell(r.expansions, href, str),
            num_cell(r.seat_expansions, href, str),
            num_cell(money_str(r.amount, model.rep), href),
            el("td", f"{iso(r.last_at)} ({r.last_subtype})"),
        ])
    return table(["customer", "name", "tags", "MRR", "seats", "expansions", "seat expansions",
                  f"expanded ({model.rep})", "last expansion"], rows, numeric=range(3, 8))


def _back() -> Html:
    return el("p", el("a", "← report", href="../index.html"), " · ", el("a", "all movements", href="movements.html"),
              cls="meta")


def metric_trail_page(model: ReportModel, kind: str, trail: MetricTrail) -> str:
    rep = model.rep
    p = trail.period.label
    row = model.row(kind, p)
    body: list[object] = [
        _back(),
        el("h1", f"{trail.metric.label} — {p}"),
        el("p", f"[{iso(trail.period.start)}, {iso(trail.period.end)}) · reporting currency {rep} · the movements "
                f"of `billing trace metric {trail.metric.label} --period {p}`", cls="meta"),
        _trail_table(model, trail),
    ]
    for m, reversal in trail.reversed:
        body.append(el("p", "not counted: ", link(f"#{m.id}", movement_url(m.id)), f" ({m.customer}, "
                            f"{money_str(m.reporting_delta, rep)} {rep}), reversed by ",
                       link(f"#{reversal}", movement_url(reversal)), cls="note"))
    if trail.metric.type == "expansion" and trail.metric.subtype is None:
        body.append(el("p", f"expansion accounts {row['expansion_accounts']} · ARPEA {amount(row['arpea'])} · "
                            f"expansion growth rate {rate(row['expansion_growth_rate'])}", cls="note"))
    return page(f"{trail.metric.label} {p}", body)


def _trail_table(model: ReportModel, trail: MetricTrail) -> Html:
    rep = model.rep
    rows: list[list[object]] = []
    for r in trail.rows:
        m = r.movement
        rows.append([
            el("td", link(f"#{m.id}", movement_url(m.id))),
            el("td", iso(m.at)),
            el("td", link(m.customer, customer_url(model, m.customer, ""))),
            el("td", m.subscription or ""),
            el("td", f"{m.type}/{m.subtype}" if m.subtype else m.type),
            el("td", m.cause),
            el("td", f"{money_str(m.delta, m.currency)} {m.currency}", cls="n"),
            el("td", money_str(r.amount, rep), cls="n"),
        ])
    total = Html(f'<td colspan="7">total ({len(trail.rows)} movement(s), {trail.accounts} account(s))</td>'
                 f'<td class="n">{esc(amount(trail.total_str))}</td>')
    headers = ["movement", "at", "customer", "subscription", "type", "cause", "delta", f"amount ({rep})"]
    return Html(table(headers, rows, numeric=(6, 7)).replace("</tbody>", f'<tr class="total">{total}</tr></tbody>'))


def period_page(model: ReportModel, kind: str, period: CalendarPeriod) -> str:
    rep = model.rep
    p = period.label
    row = model.row(kind, p)
    snap = model.snapshots[p]
    bridge = [
        ("starting MRR", row["starting_mrr"], None), ("new", row["new"], trail_url("new", p, "")),
        ("expansion", row["expansion"], trail_url("expansion", p, "")),
        ("reactivation", row["reactivation"], trail_url("reactivation", p, "")),
        ("contraction", row["contraction"], trail_url("contraction", p, "")),
        ("churn", row["churn"], trail_url("churn", p, "")), ("fx impact", row["fx_impact"], None),
        ("ending MRR", row["ending_mrr"], None),
    ]
    customers = []
    for c in sorted(snap.customers, key=lambda c: (-c.end_rep, c.customer)):
        if not (c.start or c.end):
            continue
        customers.append([
            el("td", link(c.customer, customer_url(model, c.customer, ""))),
            el("td", c.currency),
            el("td", money_str(c.start, c.currency), cls="n"), el("td", money_str(c.end, c.currency), cls="n"),
            el("td", money_str(c.start_rep, rep), cls="n"), el("td", money_str(c.end_rep, rep), cls="n"),
            el("td", "yes" if c.active else ""),
            el("td", money_str(min(c.start_rep, c.end_rep), rep) if c.active else "", cls="n"),
        ])
    sums = Html(
        f'<td colspan="4">Σ (starting MRR, ending MRR)</td><td class="n">{esc(amount(money_str(snap.starting, rep)))}'
        f'</td><td class="n">{esc(amount(money_str(snap.ending, rep)))}</td><td></td><td></td>'
    )
    body: list[object] = [
        _back(),
        el("h1", f"Period {p}"),
        el("p", f"[{iso(period.start)}, {iso(period.end)}) · reporting currency {rep} · each customer's MRR is "
                "converted at the rate in force at the period's first (start) and last (end) instant and rounded",
           cls="meta"),
        el("h2", "Bridge"),
        table(["", f"amount ({rep})"], ([el("td", name), num_cell(value, href)] for name, value, href in bridge),
              numeric=(1,)),
        el("p", "starting + new + expansion + reactivation − contraction − churn + fx impact = ending; "
                "fx impact is what closes the identity.", cls="note"),
        el("h2", "Customers"),
        Html(table(["customer", "currency", "MRR at start", "MRR at end", f"start ({rep})", f"end ({rep})",
                    "in A (paying at start)", f"min(start, end) ({rep})"], customers, numeric=(2, 3, 4, 5, 7))
             .replace("</tbody>", f'<tr class="total">{sums}</tr></tbody>')),
        el("h2", "Rates"),
        el("dl",
           el("dt", "NRR"), el("dd", f"Σ_A end {money_str(snap.active_end, rep)} ÷ Σ_A start "
                                    f"{money_str(snap.active_start, rep)} × 100 = {rate(row['nrr'])}"),
           el("dt", "GRR"), el("dd", f"Σ_A min(start, end) {money_str(snap.kept, rep)} ÷ Σ_A start "
                                    f"{money_str(snap.active_start, rep)} × 100 = {rate(row['grr'])}"),
           el("dt", "ARPA"), el("dd", f"ending {money_str(snap.ending, rep)} ÷ {snap.payers_at_end} paying "
                                     f"customer(s) = {amount(row['arpa'])}"),
           el("dt", "quick ratio"), el("dd", f"(new + expansion + reactivation) ÷ (contraction + churn) = "
                                            f"{row['quick_ratio'] if row['quick_ratio'] is not None else '—'}"),
           el("dt", "ARPEA"), el("dd", f"expansion {amount(row['expansion'])} ÷ {row['expansion_accounts']} "
                                      f"account(s) = {amount(row['arpea'])}")),
    ]
    return page(f"Period {p}", body)


def cohort_page(model: ReportModel, cohort: Cohort) -> str:
    rep = model.rep
    labels = [m.label for m in cohort.months]
    rows: list[list[object]] = []
    for customer in cohort.customers:
        cur = cohort.currency[customer]
        rows.append([el("td", link(customer, customer_url(model, customer, ""))), el("td", cur),
                     *(el("td", money_str(v, cur), cls="n") for v in cohort.native[customer])])
    rows.append([el("td", f"cohort MRR ({rep})"), el("td", ""),
                 *(el("td", amount(money_str(v, rep)), cls="n") for v in cohort.valued)])
    rows.append([el("td", "net MRR retention"), el("td", ""), *(el("td", rate(v), cls="n") for v in cohort.net)])
    rows.append([el("td", f"Σ min(MRR, base) ({rep})"), el("td", ""),
                 *(el("td", amount(money_str(v, rep)), cls="n") for v in cohort.kept)])
    rows.append([el("td", "gross MRR retention"), el("td", ""), *(el("td", rate(v), cls="n") for v in cohort.gross)])
    rows.append([el("td", "paying customers"), el("td", ""), *(el("td", str(v), cls="n") for v in cohort.paying)])
    valued_at = iso(cohort.months[-1].end)
    body: list[object] = [
        _back(),
        el("h1", f"Cohort {cohort.month.label}"),
        el("p", f"{len(cohort.customers)} customer(s) whose first movement fell in {cohort.month.label}; each "
                "one's MRR at the end of every month since, in its currency. Each currency's sum is valued in "
                f"{rep} at the rate in force just before {valued_at} (constant currency, as the cohort table "
                "values it); retention = cohort MRR ÷ its MRR at the end of the signup month × 100 (net), or "
                "Σ min(MRR, base) ÷ base × 100 (gross).", cls="meta"),
        table(["customer", "currency", *(f"{k} ({label})" for k, label in enumerate(labels))], rows,
              numeric=range(2, len(labels) + 2)),
    ]
    return page(f"Cohort {cohort.month.label}", body)


def customer_page(model: ReportModel, view: CustomerView | None, customer: str) -> str:
    movements = [m for m in model.data.movements if m.customer == customer]
    subs = [s for s in model.data.subscriptions if s.customer == customer]
    body: list[object] = [_back(), el("h1", f"Customer {customer}")]
    if view is not None:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(view.tags.items())) or "—"
        body.append(el("dl", el("dt", "name"), el("dd", view.name or "—"),
                       el("dt", "currency"), el("dd", view.currency), el("dt", "tags"), el("dd", tags),
                       el("dt", "MRR now"), el("dd", f"{money_str(view.mrr, view.currency)} {view.currency}")))
    body.append(el("h2", "Subscriptions"))
    body.append(table(["subscription", "plan", "seats", "add-ons", "status"],
                      ([s.id, s.plan, el("td", str(s.quantity), cls="n"),
                        ", ".join(f"{k} × {v}" for k, v in sorted(s.addons.items())), s.status] for s in subs),
                      numeric=(2,)))
    body.append(el("h2", "MRR movements"))
    body.append(table(["movement", "at", "subscription", "type", "cause", "MRR before", "MRR after", "delta"],
                      ([el("td", link(f"#{m.id}", movement_url(m.id))), iso(m.at), m.subscription or "",
                        f"{m.type}/{m.subtype}" if m.subtype else m.type, m.cause,
                        el("td", money_str(m.mrr_before, m.currency), cls="n"),
                        el("td", money_str(m.mrr_after, m.currency), cls="n"),
                        el("td", f"{money_str(m.delta, m.currency)} {m.currency}", cls="n")] for m in movements),
                      numeric=(5, 6, 7)))
    return page(f"Customer {customer}", body)


def _command_html(command: StoredCommand) -> Html:
    event = f" (event {command.event_index})" if command.event_index is not None else ""
    return esc(f"command #{command.id} {command.type}{event} by {command.actor} at {iso(command.at)}")


def _lines_html(lines: Sequence[BilledLine]) -> Html:
    rows = []
    for bl in lines:
        line = bl.line
        period = f"{iso(line.period_start)} .. {iso(line.period_end)}" \
            if line.period_start is not None and line.period_end is not None else ""
        credited = f"{money_str(bl.credited, bl.currency)} ({', '.join(bl.credit_notes)})" if bl.credited else ""
        rows.append([bl.ref.invoice, el("td", str(bl.ref.line), cls="n"), bl.status, line.kind,
                     el("td", f"{money_str(line.amount, bl.currency)} {bl.currency}", cls="n"), period, credited,
                     line.description])
    return table(["invoice", "line", "status", "kind", "amount", "period", "credited", "description"], rows,
                 numeric=(1, 4))


def movements_page(model: ReportModel) -> str:
    body: list[object] = [
        el("p", el("a", "← report", href="../index.html"), cls="meta"),
        el("h1", "MRR movements and their audit trail"),
        el("p", "For each movement (as `billing trace movement ID` prints it): the command that caused it — or, for a "
                "transition, the command that scheduled it and the one during which it was applied — MRR before and "
                "after, and the invoice lines that billed it.", cls="meta"),
    ]
    for m in model.data.movements:
        t = model.traces[m.id]
        origin = t.origin
        kind = f"{m.type}/{m.subtype}" if m.subtype else m.type
        items: list[object] = []
        if origin.direct and origin.command is not None:
            items += [el("dt", "cause"), el("dd", _command_html(origin.command))]
        else:
            cause: list[object] = [origin.description]
            if origin.command is not None:
                cause += [", scheduled by ", _command_html(origin.command)]
            for other in origin.others:
                cause += [" or by ", _command_html(other)]
            items += [el("dt", "cause"), el("dd", *cause),
                      el("dt", "applied"), el("dd", "during ", _command_html(origin.applied_during))]
        if origin.command is not None:
            items += [el("dt", "payload"), el("dd", el("pre", payload_text(origin.command)))]
        rate_note = "" if t.fx_rate is None else f" (rate {fx_rate_text(t.fx_rate)})"
        items += [
            el("dt", "MRR"), el("dd", f"{money_str(m.mrr_before, m.currency)} → {money_str(m.mrr_after, m.currency)} "
                                      f"{m.currency}"),
            el("dt", "delta"), el("dd", f"{money_str(m.delta, m.currency)} {m.currency} = "
                                        f"{money_str(m.reporting_delta, m.reporting_currency)} "
                                        f"{m.reporting_currency}{rate_note}"),
        ]
        if m.entry == "reversal":
            items += [el("dt", "reverses"), el("dd", link(f"#{m.reverses}", f"#m-{m.reverses}"),
                                              " (the pair nets to zero in every metric)")]
        if t.reversed_by is not None:
            items += [el("dt", "reversed by"), el("dd", link(f"#{t.reversed_by}", f"#m-{t.reversed_by}"),
                                                 " (no metric counts this entry)")]
        if t.usage_events:
            items += [el("dt", "usage"), el("dd", f"{len(t.usage_events)} usage event(s) in the closed period")]
        items += [el("dt", "billed by"),
                  el("dd", f"{len(t.lines)} line(s), net {money_str(t.billed, m.currency)} {m.currency}"
                     if t.lines else "no invoice line (see `billing reconcile`)")]
        body += [
            el("h3", f"#{m.id} {kind} — ", link(m.customer, customer_url(model, m.customer, "")),
               f" — {m.subscription or ''} — {iso(m.at)}", id=f"m-{m.id}"),
            el("dl", *items),
        ]
        if t.lines:
            body.append(_lines_html(t.lines))
    return page("MRR movements", body)


def render_pages(model: ReportModel) -> dict[str, str]:
    """Every file of the report, by relative path."""
    pages = {"index.html": index_page(model)}
    if not model.metrics["month"]:
        return pages
    pages["trail/movements.html"] = movements_page(model)
    for kind in PERIOD_KINDS:
        for period in model.periods[kind]:
            pages[period_url(period.label)] = period_page(model, kind, period)
            for metric in TRAIL_METRICS:
                trail = model.trails[(metric.label, period.label)]
                pages[trail_url(metric.label, period.label)] = metric_trail_page(model, kind, trail)
    for cohort in model.cohorts:
        pages[cohort_url(cohort.month.label)] = cohort_page(model, cohort)
    views = {c.id: c for c in model.data.customers}
    for customer in model.slugs:
        pages[customer_url(model, customer)] = customer_page(model, views.get(customer), customer)
    return pages


def write_report(engine: Engine, out: Path) -> Path:
    """Write the report into `out` (created if missing; stale trail pages removed) and return the
    path of index.html."""
    model = build_model(load_report_data(engine))
    pages = render_pages(model)
    out.mkdir(parents=True, exist_ok=True)
    trail = out / "trail"
    trail.mkdir(exist_ok=True)
    for stale in trail.glob("*.html"):
        if f"trail/{stale.name}" not in pages:
            stale.unlink()
    for name, text in pages.items():
        (out / name).write_text(text, encoding="utf-8")
    return (out / "index.html").resolve()
