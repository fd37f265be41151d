"""The expansion ledger is insert-only by the database itself; corrections are reversing entries;
every entry has a unique idempotency key; legs and monthly MRR snapshots are written with the
movements. On SQLite and PostgreSQL."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from alembic import command
from dbkit import Db
from sqlalchemy import text

from billing import service
from billing.persistence import DatabaseError, UnitOfWork, upgrade
from billing.persistence.engine import migration_config
from billing.replay import replay_in_memory
from billing.scenario import parse_scenario_text
from expansion.metrics import compute_metrics

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "scenarios"
SEATS = FIXTURES / "02-seat-expansion-with-addon.json"
QUARTERS = FIXTURES / "38-metrics-quarters-and-years.json"
UPGRADES = FIXTURES / "15-upgrade-then-downgrade.json"


def replayed(db: Db, path: Path) -> None:
    service.replay(parse_scenario_text(path.read_text()), db.url)


@pytest.mark.parametrize("statement", [
    "UPDATE mrr_movements SET delta = delta + 1",
    "UPDATE mrr_movements SET type = 'expansion' WHERE id = 1",
    "DELETE FROM mrr_movements",
    "DELETE FROM mrr_movements WHERE id = (SELECT MAX(id) FROM mrr_movements)",
    "UPDATE mrr_movement_legs SET delta = 0",
    "DELETE FROM mrr_movement_legs",
    "UPDATE movement_invoice_lines SET line_index = line_index + 1",
    "DELETE FROM movement_invoice_lines",
])
def test_the_database_refuses_to_change_the_ledger(db: Db, statement: str) -> None:
    replayed(db, SEATS)
    with db.engine.connect() as conn:
        before = conn.execute(text("SELECT COUNT(*), SUM(delta) FROM mrr_movements")).one()
    with pytest.raises(DatabaseError, match="insert-only"), db.engine.begin() as conn:
        conn.execute(text(statement))
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*), SUM(delta) FROM mrr_movements")).one() == before
        assert before[0] == 3


def test_truncate_is_refused_on_postgresql(db: Db) -> None:
    if db.backend != "postgresql":
        pytest.skip("SQLite has no TRUNCATE")
    replayed(db, SEATS)
    with pytest.raises(DatabaseError, match="insert-only"), db.engine.begin() as conn:
        conn.execute(text("TRUNCATE mrr_movements CASCADE"))


def test_every_entry_has_a_unique_idempotency_key_from_its_command(db: Db) -> None:
    replayed(db, QUARTERS)
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT m.id, m.idempotency_key, m.command_id, m.entry, m.reverses, m.month FROM mrr_movements m "
            "ORDER BY m.id")).all()
    assert [(r.idempotency_key, r.entry, r.reverses) for r in rows][:2] == [
        (f"command:{rows[0].command_id}#0", "movement", None),
        (f"command:{rows[1].command_id}#0", "movement", None),
    ]
    assert len({r.idempotency_key for r in rows}) == len(rows) == 6
    assert [r.month for r in rows] == [2025 * 12 + 10, 2025 * 12 + 10, 2025 * 12 + 11, 2026 * 12, 2026 * 12,
                                       2026 * 12 + 1]
    with pytest.raises(DatabaseError), db.engine.begin() as conn:  # the same key twice
        conn.execute(text(
            "INSERT INTO mrr_movements (id, at, customer, subscription, type, subtype, currency, mrr_before, "
            "mrr_after, delta, reporting_currency, reporting_delta, cause, event_index, command_id, "
            "idempotency_key, entry, reverses, month) SELECT 99, at, customer, subscription, type, subtype, "
            "currency, mrr_before, mrr_after, delta, reporting_currency, reporting_delta, cause, event_index, "
            "command_id, idempotency_key, entry, reverses, month FROM mrr_movements WHERE id = 1"))


def test_a_retried_command_writes_its_movements_once_with_keys_from_its_key(db: Db) -> None:
    replayed(db, SEATS)
    first = service.execute(db.engine, {"at": "2026-03-01T00:00:00Z", "type": "change_quantity",
                                        "subscription": "acme-team", "quantity": 30},
                            actor="t", idempotency_key="req-7")
    again = service.execute(db.engine, {"at": "2026-03-01T00:00:00Z", "type": "change_quantity",
                                        "subscription": "acme-team", "quantity": 30},
                            actor="t", idempotency_key="req-7")
    assert again.duplicate and [m.id for m in again.outcome.movements] == [m.id for m in first.outcome.movements]
    with db.engine.connect() as conn:
        keys = conn.execute(text("SELECT idempotency_key FROM mrr_movements WHERE idempotency_key LIKE 'req-7%'"))
        assert [k for (k,) in keys] == ["req-7#0"]


def test_a_reversal_negates_its_entry_and_every_metric_nets_to_zero(db: Db) -> None:
    scenario = parse_scenario_text(QUARTERS.read_text())
    service.replay(scenario, db.url)
    before = service.list_movements(db.engine)
    expansion = next(m for m in before if m.type == "expansion")
    entry = service.reverse_movement(db.engine, expansion.id, actor="finance", reason="duplicate import")
    assert (entry.id, entry.type, entry.subtype, entry.entry, entry.reverses) == (
        7, "expansion", "add_on", "reversal", expansion.id)
    assert (entry.delta, entry.reporting_delta) == (-expansion.delta, -expansion.reporting_delta)
    assert (entry.mrr_before, entry.mrr_after, entry.at) == (expansion.mrr_after, expansion.mrr_before, expansion.at)
    assert [(leg.plan, leg.delta) for leg in entry.legs] == [("core", Decimal("-50.00"))]
    after = service.list_movements(db.engine)
    assert after[:-1] == before and after[-1] == entry
    # the pure metric set counts neither: January has no expansion any more, the rest is unchanged
    metrics = compute_metrics(after, scenario.settings, scenario.events[0].at, scenario.events[-1].at)
    without = compute_metrics([m for m in before if m.id != expansion.id], scenario.settings,
                              scenario.events[0].at, scenario.events[-1].at)
    assert metrics == without
    january = next(row for row in metrics["month"] if row["period"] == "2026-01")
    assert (january["expansion"], january["expansion_accounts"], january["ending_mrr"]) == ("0.00", 0, "150.00")
    # the snapshots follow: alpha's January ends at 100.00 again
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT month, mrr_start, mrr_end FROM customer_mrr_months WHERE customer = 'alpha' ORDER BY month"))
        assert [tuple(r) for r in rows] == [(2025 * 12 + 10, 0, 10000), (2026 * 12, 10000, 10000)]


def test_a_reversal_is_recorded_once_and_never_reversed(db: Db) -> None:
    replayed(db, SEATS)
    entry = service.reverse_movement(db.engine, 2, actor="finance", reason="wrong seats", idempotency_key="fix-2")
    assert service.reverse_movement(db.engine, 2, actor="finance", reason="wrong seats",
                                    idempotency_key="fix-2") == entry
    with pytest.raises(service.ServiceError, match="already reversed by movement 4"):
        service.reverse_movement(db.engine, 2, actor="finance", reason="again")
    with pytest.raises(service.ServiceError, match="is a reversal of movement 2"):
        service.reverse_movement(db.engine, entry.id, actor="finance", reason="undo")
    with pytest.raises(service.NotFound):
        service.reverse_movement(db.engine, 99, actor="finance", reason="typo")
    with pytest.raises(service.ScenarioError, match="reason"):
        service.reverse_movement(db.engine, 1, actor="finance", reason=" ")
    with UnitOfWork(db.engine) as uow:
        [cmd] = [c for c in uow.commands.list() if c.type == "reverse_movement"]
        assert (cmd.actor, cmd.payload, cmd.idempotency_key) == (
            "finance", {"type": "reverse_movement", "movement": 2, "reason": "wrong seats"}, "fix-2")
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT idempotency_key FROM mrr_movements WHERE id = 4")).scalar() == "fix-2#0"
    # the book's next movement takes the next id after the reversal
    outcome = service.change_quantity(db.engine, subscription="acme-team", quantity=2, actor="t", at="2026-03-01")
    assert [m.id for m in outcome.movements] == [5]


def test_legs_and_monthly_snapshots_are_stored_with_the_movements(db: Db) -> None:
    scenario = parse_scenario_text(UPGRADES.read_text())
    service.replay(scenario, db.url)
    stored = service.list_movements(db.engine)
    assert [m.legs for m in stored] == [m.legs for m in replay_in_memory(scenario).movements]
    upgrade_ = next(m for m in stored if m.subtype == "upgrade")
    assert len(upgrade_.legs) == 2 and sum(leg.delta for leg in upgrade_.legs) == upgrade_.delta
    with db.engine.connect() as conn:
        snapshot = dict(conn.execute(text(
            "SELECT customer, SUM(mrr_end - mrr_start) FROM customer_mrr_months GROUP BY customer")).all())
        totals = dict(conn.execute(text("SELECT customer, SUM(delta) FROM mrr_movements GROUP BY customer")).all())
        chained = conn.execute(text(
            "SELECT COUNT(*) FROM customer_mrr_months a JOIN customer_mrr_months b ON b.customer = a.customer "
            "AND b.month = (SELECT MIN(month) FROM customer_mrr_months c WHERE c.customer = a.customer "
            "AND c.month > a.month) WHERE b.mrr_start <> a.mrr_end")).scalar()
    assert snapshot == totals and chained == 0


def test_the_migration_backfills_a_ledger_written_before_it(db: Db) -> None:
    """Down to 0002 (the triggers go first), then up again: keys, months, one leg per movement,
    the monthly snapshots, flows and measures are rebuilt from the rows that were there."""
    replayed(db, QUARTERS)
    derived = ("SELECT * FROM customer_mrr_months ORDER BY customer, month",
               "SELECT * FROM mrr_month_flows WHERE entries <> 0 ORDER BY month, type, subtype",
               "SELECT * FROM mrr_month_measures WHERE amount <> 0 ORDER BY measure, month")
    with db.engine.connect() as conn:
        keys = conn.execute(text("SELECT id, idempotency_key, month FROM mrr_movements ORDER BY id")).all()
        tables = [conn.execute(text(sql)).all() for sql in derived]
    config = migration_config()
    with db.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
    upgrade(db.engine)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT id, idempotency_key, month FROM mrr_movements ORDER BY id")).all() == keys
        # what the writes maintained one entry at a time equals what the backfill computes at once
        assert [conn.execute(text(sql)).all() for sql in derived] == tables
        assert len(tables[2]) > 10
        legs = conn.execute(text("SELECT movement_id, position, plan, product, delta FROM mrr_movement_legs "
                                 "ORDER BY movement_id")).all()
    assert [tuple(r) for r in legs][:2] == [(1, 0, "core", "core", 10000), (2, 0, "core", "core", 10000)]
    with pytest.raises(DatabaseError, match="insert-only"), db.engine.begin() as conn:
        conn.execute(text("DELETE FROM mrr_movements"))
