"""Many writers on one subscription at once — eight threads in this process and two other
processes — changing seats up and down, swapping plans, adding and removing an add-on, and
cancelling and reactivating, all through the public library calls (which run a command again
when it loses a race). Afterwards: every accepted command is recorded once, the customer's
movements chain (each starts where the last ended: no lost update), they sum to its MRR, that
MRR is what the final state costs, the next invoice bills the final state, and `billing verify`
is clean. On SQLite (one writer at a time) and on PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from dbkit import Db
from sqlalchemy import func, select

from billing import service
from billing.cli import cli
from billing.persistence import UnitOfWork
from billing.persistence.tables import CommandRow
from expansion.verify import verify

AT = "2026-01-15T00:00:00Z"
PRICES = {"team": Decimal("10.00"), "pro": Decimal("25.00")}
ADDON = Decimal("40.00")
THREADS = 8
PER_WORKER = 12

SETUP = {
    "settings": {"reporting_currency": "USD"},
    "catalog": {
        "plans": [{"code": code, "name": code, "interval": "month", "pricing": "per_unit",
                   "prices": {"USD": str(price)}} for code, price in PRICES.items()],
        "addons": [{"code": "sso", "name": "SSO", "interval": "month", "pricing": "flat",
                    "prices": {"USD": str(ADDON)}}]},
    "events": [
        {"at": "2026-01-01T00:00:00Z", "type": "customer", "customer": "acme", "currency": "USD"},
        {"at": "2026-01-01T00:00:00Z", "type": "subscribe", "customer": "acme", "subscription": "s",
         "plan": "team", "quantity": 10},
        {"at": "2026-01-01T00:00:00Z", "type": "invoice_run"},
    ],
}

WORKER = """
import random
from billing import service
from billing.book import BookError
from billing.cli import cli
from billing.persistence import create_engine
from billing.scenario import ScenarioError


def work(url, seed, count, at):
    engine = create_engine(url)
    rng = random.Random(seed)
    accepted = refused = 0
    try:
        for _ in range(count):
            kind = rng.choice(["qty", "qty", "qty", "plan", "addon", "remove", "cancel", "reactivate"])
            event = {"qty": {"type": "change_quantity", "subscription": "s", "quantity": rng.randint(1, 40)},
                     "plan": {"type": "change_plan", "subscription": "s", "plan": rng.choice(["team", "pro"])},
                     "addon": {"type": "add_addon", "subscription": "s", "addon": "sso", "quantity": 1},
                     "remove": {"type": "remove_addon", "subscription": "s", "addon": "sso"},
                     "cancel": {"type": "cancel", "subscription": "s", "effective": "immediately"},
                     "reactivate": {"type": "reactivate", "subscription": "s"}}[kind]
            try:
                service.apply_event(engine, {"at": at, **event}, actor=f"worker-{seed}")
                accepted += 1
            except (BookError, ScenarioError, service.ServiceError):
                refused += 1  # a change the state refuses (on a cancelled subscription, say)
    finally:
        engine.dispose()
    return {"accepted": accepted, "refused": refused}
"""
PROCESS_MAIN = WORKER + """
import json, sys
print(json.dumps(work(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
"""


def test_many_writers_on_one_subscription_lose_nothing(db: Db, tmp_path: Path) -> None:
    setup = tmp_path / "setup.json"
    setup.write_text(json.dumps(SETUP), encoding="utf-8")
    assert CliRunner().invoke(cli, ["apply", str(setup), "--db", db.url]).exit_code == 0
    with UnitOfWork(db.engine) as uow:
        commands_before = uow.session.scalar(select(func.count()).select_from(CommandRow)) or 0

    namespace: dict[str, Any] = {}
    exec(compile(WORKER, "worker", "exec"), namespace)  # noqa: S102 - the test's own code, shared with the processes
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS_MAIN, db.url, str(100 + p), str(PER_WORKER), AT],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in range(2)]
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def thread_main(seed: int) -> None:
        try:
            results.append(namespace["work"](db.url, seed, PER_WORKER, AT))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in processes:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert errors == []
    accepted = sum(r["accepted"] for r in results)
    assert sum(r["accepted"] + r["refused"] for r in results) == (THREADS + 2) * PER_WORKER
    assert accepted > 0

    with UnitOfWork(db.engine) as uow:
        commands_after = uow.session.scalar(select(func.count()).select_from(CommandRow)) or 0
    assert commands_after - commands_before == accepted  # every accepted command once, no refused one

    movements = [m for m in service.list_movements(db.engine, customer="acme")]
    movements.sort(key=lambda m: m.id)
    for before, after in zip(movements, movements[1:], strict=False):
        assert after.mrr_before == before.mrr_after, (before.id, after.id)
    [sub] = service.list_subscriptions(db.engine, customer="acme")
    expected = Decimal(0)
    if sub.status != "cancelled":
        expected = PRICES[sub.plan] * sub.quantity + (ADDON if "sso" in sub.addons else 0)
    customer = service.get_customer(db.engine, "acme")
    assert customer.mrr == expected == sum((m.delta for m in movements), Decimal(0))
    assert verify(db.engine).findings == []

    outcome = service.run_invoices(db.engine, "2026-02-01T00:00:00Z", actor="test")
    if sub.status != "cancelled":
        [invoice] = [i for i in outcome.issued if i.customer == "acme"]
        plan_line = next(line for line in invoice.lines if line.kind == "plan")
        assert plan_line.amount == PRICES[sub.plan] * sub.quantity
