"""The audit trail's pure functions: periods, metric names and segments, where a movement comes
from (direct command or scheduled transition), the metric trail, and how reconciliation classifies
a movement without a line and a proration line without a movement."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from billing.persistence import StoredCommand
from billing.records import Churn, Contraction, Expansion, InvoiceLine, LineRef, MrrMovement, New
from billing.scenario import Settings
from expansion.trace import (
    BilledLine,
    MetricName,
    OrphanLine,
    Segment,
    TraceError,
    check_movement,
    check_orphan_line,
    metric_trail,
    origin_of,
    parse_metric,
    parse_period,
    parse_segment,
    reconcile,
)


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC) if "+" not in text else datetime.fromisoformat(text)


def command(id_: int, type_: str, at: str, index: int | None = None, **payload: Any) -> StoredCommand:
    return StoredCommand(id=id_, recorded_at=t(at), at=t(at), type=type_, payload={"type": type_, **payload},
                         actor="test", idempotency_key=None, event_index=index)


def movement(kind: str, id_: int = 1, *, at: str = "2026-01-15", cause: str = "change_quantity",
             delta: str = "50.00", index: int | None = 3, subtype: str | None = None, customer: str = "acme",
             subscription: str | None = "acme-team", currency: str = "USD", reporting: str | None = None,
             lines: tuple[LineRef, ...] = ()) -> MrrMovement:
    before = Decimal("100.00")
    common: dict[str, Any] = dict(
        id=id_, at=t(at), customer=customer, subscription=subscription, currency=currency, mrr_before=before,
        mrr_after=before + Decimal(delta), delta=Decimal(delta), reporting_currency="USD",
        reporting_delta=Decimal(reporting or delta), cause=cause, event_index=index, invoice_lines=lines,
    )
    if kind == "expansion":
        return Expansion(subtype=subtype or "seat", **common)  # type: ignore[arg-type]
    if kind == "contraction":
        return Contraction(subtype=subtype or "seat", **common)  # type: ignore[arg-type]
    if kind == "churn":
        return Churn(**common)
    return New(**common)


def billed(amount: str, *, kind: str = "proration", invoice: str = "INV-0002", index: int = 0,
           customer: str = "acme", subscription: str | None = "acme-team", status: str = "finalized",
           start: str = "2026-01-15", end: str = "2026-02-01", credited: str = "0") -> BilledLine:
    line = InvoiceLine(kind=kind, description=f"{kind} line", subscription=subscription,  # type: ignore[arg-type]
                       quantity=None, unit_amount=None, amount=Decimal(amount), period_start=t(start),
                       period_end=t(end))
    return BilledLine(LineRef(invoice=invoice, line=index), customer, "USD", status, t("2026-02-01"), line,
                      Decimal(credited), ("CN-0001",) if Decimal(credited) else ())


DAY = Settings()
NONE = Settings(proration="none")
IMMEDIATE = Settings(proration_invoicing="immediate")


# --- periods, names, segments -----------------------------------------------------------------


@pytest.mark.parametrize(("text", "label", "start", "end"), [
    ("2026-03", "2026-03", "2026-03-01", "2026-04-01"),
    ("2026-12", "2026-12", "2026-12-01", "2027-01-01"),
    ("2026-Q1", "2026-Q1", "2026-01-01", "2026-04-01"),
    ("2026-Q4", "2026-Q4", "2026-10-01", "2027-01-01"),
    ("2026", "2026", "2026-01-01", "2027-01-01"),
])
def test_parse_period(text: str, label: str, start: str, end: str) -> None:
    period = parse_period(text)
    assert (period.label, period.start, period.end) == (label, t(start), t(end))


@pytest.mark.parametrize("text", ["2026-13", "2026-Q5", "26-03", "2026-3", "march", ""])
def test_parse_period_rejects(text: str) -> None:
    with pytest.raises(TraceError, match="expected YYYY-MM, YYYY-Qn or YYYY"):
        parse_period(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("expansion", MetricName("expansion")),
    ("churn", MetricName("churn")),
    ("expansion.seat", MetricName("expansion", "seat")),
    ("expansion.discount_end", MetricName("expansion", "discount_end")),
    ("contraction.downgrade", MetricName("contraction", "downgrade")),
])
def test_parse_metric(text: str, expected: MetricName) -> None:
    assert parse_metric(text) == expected


@pytest.mark.parametrize("text", ["expansions", "expansion.downgrade", "new.seat", "churn.cancel", "nrr"])
def test_parse_metric_rejects(text: str) -> None:
    with pytest.raises(TraceError, match="expected one of new, expansion"):
        parse_metric(text)


def test_parse_segment() -> None:
    assert parse_segment("currency=EUR") == Segment("currency", "EUR")
    assert parse_segment("tag:segment=smb") == Segment("tag:segment", "smb")
    assert parse_segment("customer=a=b") == Segment("customer", "a=b")
    for bad, message in (("plan=team", "unknown key 'plan'"), ("currency", "expected KEY=VALUE"),
                         ("tag:=x", "unknown key 'tag:'")):
        with pytest.raises(TraceError, match=message):
            parse_segment(bad)


# --- the metric trail -------------------------------------------------------------------------


def test_metric_trail_sums_reporting_deltas_and_counts_losses_positive() -> None:
    movements = [
        movement("expansion", 1, at="2026-03-01", delta="50.00", reporting="55.00", currency="EUR"),
        movement("expansion", 2, at="2026-03-31T23:59:59", delta="20.00", subtype="add_on", customer="beta"),
        movement("expansion", 3, at="2026-04-01", delta="99.00"),  # the next month
        movement("contraction", 4, at="2026-03-10", delta="-30.00"),
        movement("churn", 5, at="2026-03-11", delta="-100.00", customer="beta"),
    ]
    march = parse_period("2026-03")
    expansion = metric_trail(movements, MetricName("expansion"), march, DAY)
    assert [r.movement.id for r in expansion.rows] == [1, 2]
    assert (expansion.total_str, expansion.accounts, expansion.per_account) == ("75.00", 2, "37.50")
    seat = metric_trail(movements, MetricName("expansion", "seat"), march, DAY)
    assert [r.movement.id for r in seat.rows] == [1] and seat.total_str == "55.00"
    lost = metric_trail(movements, MetricName("contraction"), march, DAY)
    assert lost.total_str == "30.00" and lost.rows[0].amount == Decimal("30.00")
    assert metric_trail(movements, MetricName("churn"), march, DAY).total_str == "100.00"
    eur = metric_trail(movements, MetricName("expansion"), march, DAY, segments=[Segment("currency", "eur")])
    assert [r.movement.id for r in eur.rows] == [1]
    tagged = metric_trail(movements, MetricName("expansion"), march, DAY, segments=[Segment("tag:segment", "smb")],
                          tags={"beta": {"segment": "smb"}})
    assert [r.movement.id for r in tagged.rows] == [2] and tagged.total_str == "20.00"
    assert metric_trail(movements, MetricName("new"), march, DAY).total_str == "0.00"


# --- origins ----------------------------------------------------------------------------------


def test_an_immediate_change_is_caused_by_its_own_command() -> None:
    change = command(4, "change_quantity", "2026-01-15", 3, subscription="acme-team", quantity=25,
                     effective="immediately")
    origin = origin_of(movement("expansion", at="2026-01-15", index=3), change)
    assert (origin.direct, origin.description, origin.command) == (True, "change_quantity command", change)


def test_a_period_end_change_names_the_command_that_scheduled_it() -> None:
    scheduled = command(4, "change_quantity", "2026-01-20", 3, subscription="acme-team", quantity=5,
                        effective="period_end")
    other = command(6, "change_quantity", "2026-01-25", 5, subscription="other-sub", quantity=1,
                    effective="period_end")
    run = command(7, "invoice_run", "2026-02-01", 6)
    m = movement("contraction", at="2026-02-01", index=3, delta="-45.00")
    origin = origin_of(m, run, [scheduled, other])
    assert not origin.direct
    assert origin.description == "period-end change_quantity"
    assert origin.command == scheduled and origin.applied_during == run


def test_a_usage_close_names_the_subscribe_that_set_its_grid() -> None:
    subscribe = command(2, "subscribe", "2026-01-01", 1, customer="acme", subscription="acme-team", plan="base")
    usage = command(5, "usage", "2026-01-20", 4, subscription="acme-team", metric="api", value="10", id="u1")
    run = command(9, "invoice_run", "2026-02-01", 8)
    m = movement("expansion", at="2026-02-01", cause="usage", subtype="usage", index=None)
    origin = origin_of(m, run, [subscribe, usage])
    assert (origin.description, origin.command) == ("usage period close", subscribe)


def test_a_coupon_start_lists_every_recurring_coupon_that_may_have_scheduled_it() -> None:
    first = command(3, "discount", "2026-01-10", 2, customer="acme", subscription=None, percent="10",
                    duration="forever")
    once = command(4, "discount", "2026-01-11", 3, customer=None, subscription="acme-team", amount="5",
                   duration="once")
    second = command(5, "discount", "2026-01-12", 4, customer=None, subscription="acme-team", percent="5",
                     duration={"periods": 2})
    run = command(6, "invoice_run", "2026-02-01", 5)
    m = movement("contraction", at="2026-02-01", cause="discount", subtype="discount", index=None, delta="-15.00")
    origin = origin_of(m, run, [first, once, second])
    assert origin.command == second and origin.others == (first,)
    end = movement("expansion", at="2026-04-01", cause="discount_end", subtype="discount_end", index=None)
    assert origin_of(end, run, [first, once, second]).command == second


# --- reconciliation ---------------------------------------------------------------------------

CHANGE = command(4, "change_quantity", "2026-01-15", 3, subscription="acme-team", effective="immediately")
RUN_AFTER = 9


@pytest.mark.parametrize(("case", "m", "applied", "lines", "settings", "last_run", "status", "reason"), [
    ("prorated change", movement("expansion"), CHANGE, [billed("-274.19"), billed("685.48", index=1)], DAY,
     RUN_AFTER, "billed", "billed"),
    ("credit only for a removal", movement("contraction", delta="-50.00", cause="change_quantity"), CHANGE,
     [billed("-33.87")], DAY, RUN_AFTER, "billed", "billed"),
    ("lines net the wrong way", movement("expansion"), CHANGE, [billed("-100.00"), billed("20.00", index=1)], DAY,
     RUN_AFTER, "exception", "amount_sign"),
    ("another customer's line", movement("expansion"), CHANGE, [billed("10.00", customer="beta")], DAY, RUN_AFTER,
     "exception", "foreign_line"),
    ("another subscription's line", movement("expansion"), CHANGE, [billed("10.00", subscription="x")], DAY,
     RUN_AFTER, "exception", "wrong_subscription"),
    ("only on a void invoice", movement("expansion"), CHANGE, [billed("10.00", status="void")], DAY, RUN_AFTER,
     "exception", "void_only"),
    ("period-end cancellation", movement("churn", at="2026-03-01", cause="cancel", delta="-100.00"),
     command(8, "invoice_run", "2026-03-01", 7), [], DAY, RUN_AFTER, "explained", "period_end_cancel"),
    ("proration none", movement("expansion"), CHANGE, [], NONE, RUN_AFTER, "explained", "proration_none"),
    ("usage close before any later run", movement("expansion", at="2026-03-01", cause="usage", index=None),
     command(12, "usage", "2026-03-01", 11, subscription="acme-team"), [], DAY, RUN_AFTER, "explained",
     "not_invoiced_yet"),
    ("pending prorations, no run yet", movement("expansion"), CHANGE, [], DAY, None, "explained",
     "not_invoiced_yet"),
    ("immediate invoicing writes lines at once", movement("expansion"), CHANGE, [], IMMEDIATE, None, "exception",
     "unbilled"),
    ("a run came and billed nothing", movement("expansion"), CHANGE, [], DAY, RUN_AFTER, "exception", "unbilled"),
])
def test_check_movement(case: str, m: MrrMovement, applied: StoredCommand, lines: list[BilledLine],
                        settings: Settings, last_run: int | None, status: str, reason: str) -> None:
    check = check_movement(m, applied, lines, settings, last_run)
    assert (check.status, check.reason) == (status, reason), case


def test_credit_notes_on_billing_lines_are_notes_not_exceptions() -> None:
    check = check_movement(movement("expansion"), CHANGE,
                           [billed("-193.55"), billed("232.26", index=3, credited="232.26")], DAY, RUN_AFTER)
    assert check.status == "billed"
    assert check.notes == ("INV-0002#3 credited 232.26 USD by CN-0001 (fully)",)


def test_orphan_proration_lines() -> None:
    line = billed("685.48", index=3)
    near = movement("expansion", 2, at="2026-01-15T10:00:00")
    broken = check_orphan_line(OrphanLine(line, (near,), CHANGE))
    assert (broken.status, broken.reason, broken.at) == ("exception", "unlinked_line", near.at)
    assert "movement #2 does not link it" in broken.explanation
    same_mrr = command(7, "change_plan", "2026-01-15T09:00:00", 6, subscription="acme-team", plan="yearly",
                       effective="immediately")
    explained = check_orphan_line(OrphanLine(line, (), same_mrr))
    assert (explained.status, explained.reason, explained.at) == ("explained", "no_mrr_change", same_mrr.at)
    beside = check_orphan_line(OrphanLine(line, (near,), CHANGE, (same_mrr,)))
    assert (beside.status, beside.reason) == ("explained", "no_mrr_change")
    assert beside.explanation.startswith("command #7 change_plan")
    alone = check_orphan_line(OrphanLine(line))
    assert (alone.status, alone.reason) == ("exception", "no_movement")


def test_reconcile_keeps_orphans_of_its_period_and_flags_missing_lines() -> None:
    march = parse_period("2026-03")
    m = movement("expansion", 7, at="2026-03-05", lines=(LineRef(invoice="INV-0009", line=4),))
    in_march = OrphanLine(billed("10.00", start="2026-03-31", end="2026-04-01"))
    in_april = OrphanLine(billed("10.00", start="2026-04-01", end="2026-05-01"))
    rec = reconcile(march, [(m, CHANGE)], {}, [in_march, in_april], DAY, RUN_AFTER)
    assert [(c.movement.id, c.reason) for c in rec.movements] == [(7, "missing_line")]
    assert [c.line.line.period_start for c in rec.lines] == [t("2026-03-31")]
    assert len(rec.exceptions) == 2
