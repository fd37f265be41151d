"""The metric set computed in SQL over the ledger (expansion.ledger), on SQLite and PostgreSQL:
equal to the replay's `metrics` on every fixture, segments that add up and bridge, transfers
between plan segments, reversals netting to zero, GRR from snapshots versus the event sum,
trailing-twelve-month retention and the worked ARPEA example."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from dbkit import Db

from billing import service
from billing.periods import month_index
from billing.scenario import Scenario, parse_scenario_text
from expansion.cohorts import cohort_table
from expansion.ledger import metric_set, scenario_view
from expansion.metrics import compute_metrics
from expansion.sqlkit import MONTHS_IN, period_label

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))
BY_NAME = {p.name[:2]: p for p in FIXTURES}
FLOW_KEYS = ("new", "expansion", "contraction", "churn", "reactivation")


def label_range(scenario: Scenario, kind: str) -> tuple[str, str]:
    k = MONTHS_IN[kind]
    return (period_label(kind, month_index(scenario.events[0].at) // k),
            period_label(kind, month_index(scenario.events[-1].at) // k))


def bridge(row: dict[str, Any]) -> Decimal:
    """ending − (starting + gains − losses + transfers + fx): 0 when the bridge holds."""
    d = {key: Decimal(str(row[key])) for key in ("starting_mrr", "ending_mrr", "fx_impact", "transfer_in",
                                                 "transfer_out", *FLOW_KEYS)}
    return d["ending_mrr"] - (d["starting_mrr"] + d["new"] + d["expansion"] + d["reactivation"] - d["contraction"]
                              - d["churn"] + d["transfer_in"] - d["transfer_out"] + d["fx_impact"])


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_sql_metric_set_equals_the_replay_and_segments_bridge(db: Db, path: Path) -> None:
    scenario = parse_scenario_text(path.read_text())
    result = service.replay(scenario, db.url)
    for kind in ("month", "quarter", "year"):
        first, last = label_range(scenario, kind)
        metrics = metric_set(db.engine, period=kind, first=first, last=last)
        assert [scenario_view(row) for row in metrics.rows] == result.metrics[kind], kind
        # the maintained monthly tables and the aggregation of the ledger agree on every figure
        assert metrics.rows == metric_set(db.engine, period=kind, first=first, last=last, fast=False).rows, kind
    first, last = label_range(scenario, "month")
    whole = {row["period"]: row for row in metric_set(db.engine, first=first, last=last).rows}
    assert cohort_table(db.engine).to_json() == cohort_table(db.engine, fast=False).to_json()
    single_currency = {m.currency for m in result.movements} <= {scenario.settings.reporting_currency}
    for by in ("plan", "product", "currency", "cohort", "tag:segment", "subtype"):
        rows = metric_set(db.engine, first=first, last=last, by=by, ttm=False).rows
        for period, total in whole.items():
            mine = [row for row in rows if row["period"] == period]
            for key in ("new", "expansion", "reactivation", "contraction", "churn"):
                assert sum(Decimal(str(row[key])) for row in mine) == Decimal(str(total[key])), (by, period, key)
            if by == "subtype":
                continue
            moved_in = sum(Decimal(str(r["transfer_in"])) for r in mine)
            assert moved_in == sum(Decimal(str(r["transfer_out"])) for r in mine)
            for row in mine:
                assert bridge(row) == 0, (by, row)
                if single_currency:
                    assert row["fx_impact"] == "0.00", (by, row)
            if single_currency:
                for key in ("starting_mrr", "ending_mrr"):
                    assert sum(Decimal(str(row[key])) for row in mine) == Decimal(str(total[key])), (by, key)


def test_plan_segments_show_mrr_moving_between_plans(db: Db) -> None:
    """basic $50 → pro $120 on Jan 10 (+70) and back on Jan 25 (−70): basic transfers 50 out and
    back in; pro receives 50, expands 70, contracts 70 and transfers 50 out."""
    service.replay(parse_scenario_text(BY_NAME["15"].read_text()), db.url)
    rows = {row["segment"]: row for row in metric_set(db.engine, by="plan", first="2026-01", last="2026-01").rows}
    keys = ("starting_mrr", "new", "expansion", "contraction", "transfer_in", "transfer_out", "ending_mrr",
            "expansion_accounts")
    assert {seg: tuple(row[k] for k in keys) for seg, row in rows.items()} == {
        "basic": ("0.00", "50.00", "0.00", "0.00", "50.00", "50.00", "50.00", 0),
        "pro": ("0.00", "0.00", "70.00", "70.00", "50.00", "50.00", "0.00", 1),
    }
    by_product = metric_set(db.engine, by="product", first="2026-01", last="2026-01").rows
    assert [(r["segment"], r["expansion"], r["transfer_in"], r["ending_mrr"]) for r in by_product] == [
        ("core", "70.00", "0.00", "50.00")]


def test_snapshot_and_event_sum_grr_differ_for_a_customer_who_churns_and_returns(db: Db) -> None:
    """Fixture 61: a churns on Feb 5 and is back on Feb 20. From snapshots (start vs end of
    February) nothing was lost: GRR 100.00; the event sum counts the churn: (300 − 100) / 300."""
    service.replay(parse_scenario_text(BY_NAME["61"].read_text()), db.url)
    feb = metric_set(db.engine, first="2026-02", last="2026-02").rows[0]
    assert (feb["grr"], feb["grr_event_sum"], feb["nrr"]) == ("100.00", "66.67", "100.00")
    smb = next(r for r in metric_set(db.engine, by="tag:segment", first="2026-02", last="2026-02").rows
               if r["segment"] == "smb")
    assert (smb["starting_mrr"], smb["churn"], smb["reactivation"], smb["grr"], smb["grr_event_sum"]) == (
        "100.00", "100.00", "100.00", "100.00", "0.00")
    quarter = metric_set(db.engine, period="quarter").rows[0]
    assert (quarter["period"], quarter["grr"], quarter["grr_event_sum"]) == ("2026-Q1", None, None)


def test_a_reversal_nets_to_zero_in_the_sql_metric_set(db: Db) -> None:
    scenario = parse_scenario_text(BY_NAME["38"].read_text())
    service.replay(scenario, db.url)
    movements = service.list_movements(db.engine)
    expansion = next(m for m in movements if m.type == "expansion")
    service.reverse_movement(db.engine, expansion.id, actor="finance", reason="duplicate")
    expected = compute_metrics([m for m in movements if m.id != expansion.id], scenario.settings,
                               scenario.events[0].at, scenario.events[-1].at)
    assert metric_set(db.engine).rows == metric_set(db.engine, fast=False).rows
    assert cohort_table(db.engine).to_json() == cohort_table(db.engine, fast=False).to_json()
    for kind in ("month", "quarter", "year"):
        first, last = label_range(scenario, kind)
        rows = metric_set(db.engine, period=kind, first=first, last=last).rows
        assert [scenario_view(row) for row in rows] == expected[kind]
    january = next(r for r in metric_set(db.engine, by="plan").rows if r["period"] == "2026-01"
                   and r["segment"] == "core")
    assert (january["expansion"], january["expansion_accounts"]) == ("0.00", 0)


def scenario_doc(events: list[dict[str, Any]], plans: list[dict[str, Any]]) -> Scenario:
    return Scenario.model_validate({"catalog": {"plans": plans}, "events": events})


FLAT = {"code": "flat", "name": "Flat", "interval": "month", "pricing": "flat", "prices": {"USD": "100.00"}}
SEAT = {"code": "seat", "name": "Seat", "interval": "month", "pricing": "per_unit", "prices": {"USD": "100.00"}}


def test_trailing_twelve_month_retention(db: Db) -> None:
    """a ($100) and b ($200) since January 2025; b churns in June; a grows to $200 in December;
    c ($50, March 2025) and d ($300, January 2026) were not customers when the windows start.
    Window Feb 2025 – Jan 2026: NRR 200 / 300 = 66.67, GRR (100 + 0) / 300 = 33.33."""
    def sub(at: str, c: str, plan: str = "seat", quantity: int = 1) -> list[dict[str, Any]]:
        return [{"at": at, "type": "customer", "customer": c, "currency": "USD"},
                {"at": at, "type": "subscribe", "customer": c, "subscription": f"{c}-s", "plan": plan,
                 "quantity": quantity}]
    events = [*sub("2025-01-10", "a"), *sub("2025-01-20", "b", quantity=2), *sub("2025-03-01", "c", "flat"),
              {"at": "2025-06-15", "type": "cancel", "subscription": "b-s", "effective": "immediately"},
              {"at": "2025-12-05", "type": "change_quantity", "subscription": "a-s", "quantity": 2},
              {"at": "2025-12-05", "type": "change_plan", "subscription": "c-s", "plan": "seat"},
              *sub("2026-01-02", "d", quantity=3),
              {"at": "2026-02-10", "type": "change_quantity", "subscription": "d-s", "quantity": 1}]
    plans = [SEAT, dict(FLAT, prices={"USD": "50.00"})]
    service.replay(scenario_doc(events, plans), db.url)
    rows = {r["period"]: r for r in metric_set(db.engine, first="2025-12", last="2026-02").rows}
    assert [(p, r["ttm_nrr"], r["ttm_grr"]) for p, r in rows.items()] == [
        ("2025-12", None, None),
        ("2026-01", "66.67", "33.33"),
        ("2026-02", "66.67", "33.33"),
    ]
    # c moved from flat ($50) to seat ($100) in December, after the window started: the seat
    # plan's retention is a's and b's, flat had nobody in January 2025
    by_plan = {(r["segment"], r["period"]): r for r in metric_set(db.engine, by="plan", first="2026-01",
                                                                      last="2026-01").rows}
    assert (by_plan[("seat", "2026-01")]["ttm_nrr"], by_plan[("flat", "2026-01")]["ttm_nrr"]) == ("66.67", None)
    quarter = metric_set(db.engine, period="quarter", first="2026-Q1", last="2026-Q1").rows[0]
    # the quarter's window ends in March 2026 and starts after March 2025, when c was in:
    # (200 + 0 + 100) / (100 + 200 + 50) = 85.71, (100 + 0 + 50) / 350 = 42.86
    assert (quarter["ttm_nrr"], quarter["ttm_grr"]) == ("85.71", "42.86")


def test_seventy_five_expansion_accounts_bringing_300000_give_an_arpea_of_4000(db: Db) -> None:
    """The issue's worked example on a generated ledger: 100 customers on $100 seats, 75 of them
    add i + 3 seats in February (from $300 to $7,700, $300,000 in all), 25 do not, and five of
    those drop a seat; expansion ÷ expansion accounts = 300,000 ÷ 75 = 4,000."""
    events: list[dict[str, Any]] = []
    for i in range(100):
        events += [{"at": "2026-01-05", "type": "customer", "customer": f"c{i:03d}", "currency": "USD"},
                   {"at": "2026-01-05", "type": "subscribe", "customer": f"c{i:03d}", "subscription": f"s{i:03d}",
                    "plan": "seat", "quantity": 10}]
    for i in range(75):
        events.append({"at": f"2026-02-{1 + i % 27:02d}", "type": "change_quantity", "subscription": f"s{i:03d}",
                       "quantity": 10 + i + 3})
    for i in range(75, 80):
        events.append({"at": "2026-02-28", "type": "change_quantity", "subscription": f"s{i:03d}", "quantity": 9})
    events.sort(key=lambda e: str(e["at"]))
    scenario = scenario_doc(events, [SEAT])
    result = service.replay(scenario, db.url)
    february = metric_set(db.engine, first="2026-02", last="2026-02").rows[0]
    assert (february["expansion"], february["expansion_accounts"], february["arpea"]) == ("300000.00", 75, "4000.00")
    assert (february["contraction"], february["expansion_arr"]) == ("500.00", "3600000.00")
    assert february["expansion_activation_rate"] == "75.00"
    assert result.metrics["month"][1]["arpea"] == "4000.00"


def test_a_reversal_that_would_take_mrr_below_zero_is_refused(db: Db) -> None:
    """gamma's $100 churns in January; reversing its `new` would leave the churn taking MRR
    from 0 to −100 in the ledger."""
    service.replay(parse_scenario_text(BY_NAME["38"].read_text()), db.url)
    gamma_new = next(m for m in service.list_movements(db.engine) if m.customer == "gamma" and m.type == "new")
    with pytest.raises(service.ServiceError, match="below zero"):
        service.reverse_movement(db.engine, gamma_new.id, actor="finance", reason="typo")
