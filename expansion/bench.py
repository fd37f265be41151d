"""`billing bench metrics`: a synthetic ledger of N movements, then the time the database takes
for the full monthly metric set, the cohort table and one metric trace, and peak memory.

The ledger is five years (2021-01 to 2025-12) of customers that start in a random month and
then, in about three months of ten, move: expansion 55 % (seat 35, usage 20, upgrade 15, add-on
12, cross-sell 10, discount end 8 of 100), contraction 35 % (seat, usage, downgrade, add-on,
cancel of the cross-sold subscription, discount), churn 10 %; a churned customer comes back
(reactivation) with 4 % a month. 85 % of customers pay in USD, 10 % in EUR, 5 % in GBP, at
yearly exchange rates. Six per-seat plans in three products; an upgrade or downgrade has two
legs, everything else one. About one customer per seven movements; customers carry `segment`
and `country` tags. Movements, legs and monthly snapshots are generated customer by customer
(memory flat in N) into tab-separated files and bulk-loaded (COPY on PostgreSQL, executemany on
SQLite) in a child process, so the parent's peak RSS is the metric computation's. The monthly
flows and measures (`billing.month_measures`) are computed per customer as the write path
does and loaded with the rest.

The trace is `billing trace metric expansion --period <last month>` (`expansion.trace`): every
movement that makes up that month's expansion; its total must equal the metric set's figure.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import resource
import tempfile
import time
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from queue import Empty
from typing import Any, TextIO

from billing.book import Book
from billing.catalog import Catalog
from billing.money import from_minor, round_to_places
from billing.month_measures import Conversion, MonthRow, differences
from billing.persistence import UnitOfWork, create_engine, upgrade
from billing.persistence.sql_reader import load_tsv
from billing.scenario import Settings
from expansion.cohorts import cohort_table
from expansion.ledger import metric_set
from expansion.trace import trace_metric

FIRST_MONTH = 2021 * 12
MONTHS = 60
START = datetime(2021, 1, 1, tzinfo=UTC)
PLANS = [  # code, product, USD cents per seat per month
    ("starter", "core", 1500), ("team", "core", 3000), ("business", "core", 6000),
    ("insights", "analytics", 2500), ("insights-pro", "analytics", 5000), ("chat", "support", 2000),
]
LADDER = {"core": ["starter", "team", "business"], "analytics": ["insights", "insights-pro"], "support": ["chat"]}
PRICE = {code: price for code, _, price in PLANS}
PRODUCT = {code: product for code, product, _ in PLANS}
LOCAL_PRICE = {"USD": Fraction(1), "EUR": Fraction(9, 10), "GBP": Fraction(4, 5)}
RATES = {"EUR": ["1.18", "1.05", "1.08", "1.09", "1.12"], "GBP": ["1.36", "1.20", "1.24", "1.27", "1.30"]}
SEGMENTS = ["smb", "mid", "enterprise"]
COUNTRIES = ["us", "de", "fr", "gb", "ca", "nl"]

MOVEMENT_COLUMNS = ("id", "at", "customer", "subscription", "type", "subtype", "currency", "mrr_before", "mrr_after",
                    "delta", "reporting_currency", "reporting_delta", "cause", "event_index", "command_id",
                    "idempotency_key", "entry", "reverses", "month")
LEG_COLUMNS = ("movement_id", "position", "subscription", "plan", "product", "delta", "reporting_delta")
MONTH_COLUMNS = ("customer", "month", "currency", "mrr_start", "mrr_end", "expansions", "lost")
CUSTOMER_COLUMNS = ("id", "currency", "tax_rate", "timezone", "locale", "name", "tags", "mrr", "credit_balance",
                    "created_at", "updated_at", "version")


def bench_settings() -> Settings:
    rates = [{"currency": cur, "rate": rate, "from": f"{2021 + year}-01-01"}
             for cur, values in RATES.items() for year, rate in enumerate(values)]
    return Settings.model_validate({"reporting_currency": "USD", "fx_rates": rates})


def bench_catalog() -> Catalog:
    return Catalog.model_validate({"plans": [
        {"code": code, "name": code.title(), "interval": "month", "pricing": "per_unit", "product": product,
         "prices": {cur: str(from_minor(int(price * factor), cur)) for cur, factor in LOCAL_PRICE.items()}}
        for code, product, price in PLANS]})


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


class _Customer:
    """One synthetic customer's subscriptions as (subscription, plan) -> monthly amount parts."""

    def __init__(self, cid: str, currency: str, rng: random.Random) -> None:
        self.id = cid
        self.currency = currency
        self.rng = rng
        self.plan: dict[str, str] = {}
        self.seats: dict[str, int] = {}
        self.extra: dict[str, int] = {}  # add-on, usage and discount amounts on a subscription
        self.had_mrr = False

    def price(self, plan: str) -> int:
        return int(PRICE[plan] * LOCAL_PRICE[self.currency])

    def parts(self) -> dict[tuple[str, str], int]:
        return {(sub, plan): max(0, self.price(plan) * self.seats[sub] + self.extra.get(sub, 0))
                for sub, plan in self.plan.items()}

    @property
    def level(self) -> int:
        return sum(self.parts().values())

    def start(self, sub: str, plans: list[str]) -> None:
        self.plan[sub] = self.rng.choice(plans)
        self.seats[sub] = self.rng.randint(1, 20)
        self.extra[sub] = 0

    def expand(self) -> tuple[str, str] | None:
        rng = self.rng
        main = f"{self.id}-1"
        pick = rng.randrange(100)
        if pick < 15:
            ladder = LADDER[PRODUCT[self.plan[main]]]
            i = ladder.index(self.plan[main])
            if i + 1 < len(ladder):
                self.plan[main] = ladder[i + 1]
                return main, "upgrade"
        elif pick < 27:
            self.extra[main] += rng.randint(10, 50) * 100
            return main, "add_on"
        elif pick < 47:
            self.extra[main] += rng.randint(5, 50) * 100
            return main, "usage"
        elif pick < 57 and f"{self.id}-2" not in self.plan:
            other = [p for p, product, _ in PLANS if product != PRODUCT[self.plan[main]]]
            self.start(f"{self.id}-2", other)
            return f"{self.id}-2", "cross_sell"
        elif pick < 65 and self.extra[main] < 0:
            self.extra[main] = 0
            return main, "discount_end"
        self.seats[main] += rng.randint(1, 5)
        return main, "seat"

    def contract(self) -> tuple[str, str] | None:
        rng = self.rng
        main = f"{self.id}-1"
        pick = rng.randrange(100)
        if pick < 15:
            ladder = LADDER[PRODUCT[self.plan[main]]]
            i = ladder.index(self.plan[main])
            if i > 0:
                self.plan[main] = ladder[i - 1]
                return main, "downgrade"
        elif pick < 35 and self.extra[main] > 0:
            self.extra[main] -= min(self.extra[main], rng.randint(5, 50) * 100)
            return main, "usage"
        elif pick < 45 and f"{self.id}-2" in self.plan:
            for table in (self.plan, self.seats, self.extra):
                table.pop(f"{self.id}-2", None)
            return f"{self.id}-2", "cancel"
        elif pick < 55:
            self.extra[main] -= self.price(self.plan[main]) * self.seats[main] // 10
            return main, "discount"
        if self.seats[main] > 1:
            self.seats[main] -= rng.randint(1, self.seats[main] - 1)
            return main, "seat"
        return None


class Writer:
    """Generates the synthetic ledger into tab-separated files, one customer at a time."""

    def __init__(self, directory: Path, movements: int, seed: int) -> None:
        self.directory = directory
        self.target = movements
        self.rng = random.Random(seed)
        self.next_id = 1
        self.customers = 0
        self.legs = 0
        self.months = 0
        self.rates = {cur: [Fraction(r) for r in values] for cur, values in RATES.items()}
        self.conversion = Conversion(bench_settings())
        self.customer_rows: list[MonthRow] = []
        self.flows: dict[tuple[int, str, str], list[int]] = {}
        self.measures: dict[tuple[str, int], int] = {}

    def rate(self, currency: str, month: int) -> Fraction:
        if currency == "USD":
            return Fraction(1)
        return self.rates[currency][(month - FIRST_MONTH) // 12]

    def run(self) -> dict[str, int]:
        files: dict[str, TextIO] = {name: (self.directory / f"{name}.tsv").open("w", encoding="utf-8")
                 for name in ("movements", "legs", "months", "customers", "flows", "measures")}
        try:
            while self.next_id <= self.target:
                self.customer(files)
            for (month, kind, subtype), (amount, entries) in sorted(self.flows.items()):
                files["flows"].write(f"{month}\t{kind}\t{subtype}\t{amount}\t{entries}\n")
            for (measure, month), amount in sorted(self.measures.items()):
                if amount:
                    files["measures"].write(f"{measure}\t{month}\t{amount}\n")
        finally:
            for handle in files.values():
                handle.close()
        return {"movements": self.next_id - 1, "legs": self.legs, "customer_months": self.months,
                "customers": self.customers}

    def customer(self, files: dict[str, TextIO]) -> None:
        rng = self.rng
        self.customers += 1
        roll = rng.random()
        currency = "USD" if roll < 0.85 else "EUR" if roll < 0.95 else "GBP"
        c = _Customer(f"cus{self.customers:08d}", currency, rng)
        first = FIRST_MONTH + rng.randrange(MONTHS)
        created = _instant(first, rng)
        active = False
        for month in range(first, FIRST_MONTH + MONTHS):
            if self.next_id > self.target:
                break
            if month == first:
                c.start(f"{c.id}-1", ["starter", "team", "business", "insights", "chat"])
                self.movement(files, c, month, created, "new", None, f"{c.id}-1", {})
                active = True
                continue
            if active and rng.random() < 0.3:
                before = c.parts()
                pick = rng.random()
                if pick < 0.10:
                    subs = list(c.plan)
                    c.plan.clear()
                    c.seats.clear()
                    c.extra.clear()
                    self.movement(files, c, month, _instant(month, rng), "churn", None, subs[0], before)
                    active = False
                    continue
                change = c.expand() if pick < 0.65 else c.contract()
                if change is None or c.parts() == before:
                    continue
                sub, subtype = change
                level = sum(before.values())
                kind = "expansion" if c.level > level else "contraction"
                if kind == "expansion" and subtype in ("downgrade", "cancel", "discount"):
                    subtype = "discount_end"
                if kind == "contraction" and subtype in ("upgrade", "cross_sell", "add_on"):
                    subtype = "seat"
                self.movement(files, c, month, _instant(month, rng), kind, subtype, sub, before)
            elif not active and rng.random() < 0.04:
                c.start(f"{c.id}-1", ["starter", "team"])
                self.movement(files, c, month, _instant(month, rng), "reactivation", None, f"{c.id}-1", {})
                active = True
        tags = json.dumps({"segment": rng.choice(SEGMENTS), "country": rng.choice(COUNTRIES)})
        stamp = _stamp(created)
        files["customers"].write("\t".join((c.id, currency, "0", "UTC", "en_US", c.id, tags, str(c.level), "0",
                                           stamp, stamp, "1")) + "\n")
        self.flush_month(files)
        if self.customer_rows:
            entries = differences(self.customer_rows, currency, self.customer_rows[0].month, self.conversion)
            for key, value in entries.items():
                self.measures[key] = self.measures.get(key, 0) + value
            self.customer_rows = []

    _open_month: list[Any] | None = None

    def movement(self, files: dict[str, TextIO], c: _Customer, month: int, at: datetime, kind: str,
                 subtype: str | None, sub: str, before: dict[tuple[str, str], int]) -> None:
        after = c.parts()
        keys = [*before, *(k for k in after if k not in before)]
        legs = [(k, after.get(k, 0) - before.get(k, 0)) for k in keys if after.get(k, 0) != before.get(k, 0)]
        delta = sum(change for _, change in legs)
        level_before = sum(before.values())
        rate = self.rate(c.currency, month)
        reporting = _round(Fraction(delta) * rate)
        converted = [_round(Fraction(change) * rate) for _, change in legs]
        if converted:
            largest = max(range(len(legs)), key=lambda i: abs(legs[i][1]))
            converted[largest] += reporting - sum(converted)
        mid = self.next_id
        self.next_id += 1
        files["movements"].write("\t".join((
            str(mid), _stamp(at), c.id, sub, kind, subtype or "\\N", c.currency, str(level_before),
            str(level_before + delta), str(delta), "USD", str(reporting), kind if subtype is None else subtype,
            "\\N", "1", f"bench#{mid}", "movement", "\\N", str(month))) + "\n")
        for position, ((leg_sub, plan), change) in enumerate(legs):
            files["legs"].write("\t".join((str(mid), str(position), leg_sub, plan, PRODUCT[plan], str(change),
                                           str(converted[position]))) + "\n")
        self.legs += len(legs)
        row = self._open_month
        if row is None or row[0] != c.id or row[1] != month:
            self.flush_month(files)
            row = self._open_month = [c.id, month, c.currency, level_before, level_before, 0, 0]
        row[4] += delta
        row[5] += 1 if kind == "expansion" else 0
        row[6] += -reporting if kind in ("contraction", "churn") else 0
        flow = self.flows.setdefault((month, kind, subtype or ""), [0, 0])
        flow[0] += reporting
        flow[1] += 1

    def flush_month(self, files: dict[str, TextIO]) -> None:
        if self._open_month is not None:
            files["months"].write("\t".join(str(v) for v in self._open_month) + "\n")
            _, month, _, start, end, expansions, lost = self._open_month
            self.customer_rows.append(MonthRow(month, start, end, expansions, lost))
            self.months += 1
            self._open_month = None


def _instant(month: int, rng: random.Random) -> datetime:
    day = datetime(month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return day + timedelta(days=rng.randrange(28), seconds=rng.randrange(86400))


def _round(value: Fraction) -> int:
    return int(round_to_places(value, 0, "half_up"))


def build(url: str, movements: int, seed: int = 7) -> dict[str, Any]:
    """Create the synthetic ledger in the (empty) database at `url`; return counts and timings."""
    engine = create_engine(url)
    try:
        upgrade(engine)
        settings, catalog = bench_settings(), bench_catalog()
        with UnitOfWork(engine) as uow:
            if uow.book.load() is not None:
                raise ValueError("the bench needs an empty database (it writes a synthetic book)")
            uow.book.create(settings, catalog, Book(settings, catalog).dumps(), now=START)
            uow.commands.add(recorded_at=START, at=START, type="bench", payload={"movements": movements},
                             actor="bench", idempotency_key=None, event_index=None)
            uow.commit()
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="billing-bench-") as tmp:
            directory = Path(tmp)
            counts = Writer(directory, movements, seed).run()
            generated = time.perf_counter()
            load_tsv(engine, "customers", CUSTOMER_COLUMNS, directory / "customers.tsv")
            load_tsv(engine, "mrr_movements", MOVEMENT_COLUMNS, directory / "movements.tsv")
            load_tsv(engine, "mrr_movement_legs", LEG_COLUMNS, directory / "legs.tsv")
            load_tsv(engine, "customer_mrr_months", MONTH_COLUMNS, directory / "months.tsv")
            load_tsv(engine, "mrr_month_flows", ("month", "type", "subtype", "amount", "entries"),
                     directory / "flows.tsv")
            load_tsv(engine, "mrr_month_measures", ("measure", "month", "amount"), directory / "measures.tsv")
        loaded = time.perf_counter()
        return {**counts, "generate_seconds": round(generated - started, 2),
                "load_seconds": round(loaded - generated, 2)}
    finally:
        engine.dispose()


def _build_in_child(url: str, movements: int, seed: int, queue: Any) -> None:
    try:
        queue.put(("ok", build(url, movements, seed)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run(url: str, movements: int, *, seed: int = 7) -> dict[str, Any]:
    """Build the ledger (in a child process), then time the metric queries in this one."""
    queue: multiprocessing.Queue[tuple[str, Any]] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_build_in_child, args=(url, movements, seed, queue))
    child.start()
    while True:
        try:
            status, built = queue.get(timeout=1)
            break
        except Empty:
            if not child.is_alive():
                raise RuntimeError(f"building the synthetic ledger failed (exit code {child.exitcode})") from None
    child.join()
    if status != "ok":
        raise RuntimeError(f"building the synthetic ledger failed: {built}")
    build_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    engine = create_engine(url)
    try:
        started = time.perf_counter()
        metrics = metric_set(engine, period="month")
        metrics_done = time.perf_counter()
        metrics_rss = _peak_rss_mb()
        cohorts = cohort_table(engine)
        cohorts_done = time.perf_counter()
        cohorts_rss = _peak_rss_mb()
        trail = trace_metric(engine, "expansion", str(metrics.rows[-1]["period"]))
        trace_done = time.perf_counter()
    finally:
        engine.dispose()
    if str(trail.total) != metrics.rows[-1]["expansion"]:
        raise AssertionError(f"the trace sums to {trail.total}, the metric set says {metrics.rows[-1]['expansion']}")
    return {
        "database": engine.dialect.name,
        "movements": built["movements"],
        "customers": built["customers"],
        "legs": built["legs"],
        "customer_months": built["customer_months"],
        "periods": len(metrics.rows),
        "cohorts": len(cohorts.cohorts),
        "traced_movements": len(trail.rows),
        "generate_seconds": built["generate_seconds"],
        "load_seconds": built["load_seconds"],
        "metrics_seconds": round(metrics_done - started, 3),
        "cohorts_seconds": round(cohorts_done - metrics_done, 3),
        "trace_seconds": round(trace_done - cohorts_done, 3),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_mb_after_metrics": metrics_rss,
        "peak_rss_mb_after_cohorts": cohorts_rss,
        "build_peak_rss_mb": round(build_rss, 1),
    }


def _peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
