"""The core's memoized and inlined paths agree with the plain computations they replace.

Each `reference_*` below is the code as it was before the fast path; after every command of
every fixture the book's answer must equal it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import cast
from zoneinfo import ZoneInfo

import pytest
from dateutil.relativedelta import relativedelta
from hypothesis import given
from hypothesis import strategies as st

from billing.book import Book, BookError, LegKey, LineTerms, _k, _local_day
from billing.catalog import Catalog, CatalogIndex, price_quantity
from billing.fx import MissingRate, rate_at
from billing.invoicing import totals
from billing.money import exact_product, round_money
from billing.periods import Grid, _step, instant_of, local_date, monthly_factor
from billing.proration import describe, item_of, shown_quantity
from billing.records import InvoiceLine, LineKind
from billing.scenario import Scenario, parse_scenario_text
from billing.subscription import Subscription
from billing.usage import rate

FIXTURES = sorted((Path(__file__).resolve().parents[2] / "fixtures" / "scenarios").glob("*.json"))
SCENARIOS = [parse_scenario_text(path.read_text()) for path in FIXTURES]
ZONES = ["UTC", "America/New_York", "Europe/Berlin", "Australia/Sydney", "Asia/Kolkata"]


def reference_boundary(grid: Grid, n: int) -> datetime:
    if grid.billing_day is None:
        wall = grid.anchor + _step(grid.interval, n * grid.count)
    else:
        months = n * grid.count * (12 if grid.interval == "year" else 1)
        wall = grid.anchor.replace(day=1) + relativedelta(months=months, day=grid.billing_day)
    return instant_of(wall, grid.tz)


def reference_next_transition(book: Book, sub: Subscription) -> tuple[datetime, int, int] | None:
    if sub.status == "trialing":
        assert sub.trial_end is not None
        return (sub.trial_end, 1 if (sub.scheduled or sub.cancel_at_period_end) else 2, sub.order)
    if sub.status != "active" or sub.current is None:
        return None
    b = sub.current.end
    for stage in range(sub.stage + 1, 6):
        if book._stage_relevant(sub, b, stage):
            return (b, stage, sub.order)
    return None


def reference_subscription_mrr(book: Book, sub: Subscription, currency: str) -> Fraction:
    if sub.status != "active":
        return Fraction(0)
    plan = book.catalog.plan(sub.items.plan)
    base = Fraction(0)
    for kind, code, qty in sub.items.priced():
        base += price_quantity(item_of(book.catalog, kind, code), Fraction(qty), currency)
    for cid in sub.active_coupons:
        coupon = book.coupons[cid]
        if coupon.percent is not None:
            base -= base * coupon.percent
        elif coupon.amount is not None:
            base -= min(Fraction(coupon.amount), base)
    recurring = base * monthly_factor(plan.interval, plan.interval_count)
    return recurring + (sub.usage_mrr if book.settings.usage_in_mrr else Fraction(0))


def reference_leg_levels(book: Book, customer: str) -> tuple[Decimal, dict[LegKey, Decimal]]:
    acct = book.accounts[customer]
    mode = book.settings.rounding
    exact: dict[LegKey, Fraction] = {}
    for sub_id in acct.subscriptions:
        sub = book.subscriptions[sub_id]
        amount = reference_subscription_mrr(book, sub, acct.currency)
        if amount:
            plan = book.catalog.plan(sub.items.plan)
            exact[(sub.id, plan.code, plan.product)] = amount
    total = round_money(sum(exact.values(), Fraction(0)), acct.currency, mode)
    levels = {key: round_money(amount, acct.currency, mode) for key, amount in exact.items()}
    residue = total - sum(levels.values(), Decimal(0))
    if residue and levels:
        largest = max(exact, key=lambda k: abs(exact[k]))
        levels[largest] += residue
    return total, {key: value for key, value in levels.items() if value}


def replay(book: Book, scenario: Scenario) -> Iterator[None]:
    """Apply the scenario's commands to `book`, pausing after each one it accepts."""
    for index, event in enumerate(scenario.events):
        try:
            book.apply(event, index)
        except BookError:
            continue
        yield


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in FIXTURES])
def test_the_book_answers_as_the_plain_computations_after_every_command(scenario: Scenario) -> None:
    book = Book(scenario.settings, scenario.catalog)
    for _ in replay(book, scenario):
        for sub in book.subscriptions.values():
            currency = book.accounts[sub.customer].currency
            assert book._next_transition(sub) == reference_next_transition(book, sub)
            assert book._subscription_mrr(sub, currency) == reference_subscription_mrr(book, sub, currency)
            if sub.grid is not None:
                for n in range(-2, 15):
                    assert sub.grid.boundary(n) == reference_boundary(sub.grid, n)
        for customer in book.accounts:
            assert book._leg_levels(book.accounts[customer]) == reference_leg_levels(book, customer)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in FIXTURES])
def test_the_transition_queue_left_stale_by_a_run_is_rebuilt_before_it_is_read(scenario: Scenario) -> None:
    """After an invoice run the queue is rebuilt only when next needed (the next `_advance`, a
    snapshot): a book that rebuilds it at once after every command must replay identically."""
    lazy, eager = Book(scenario.settings, scenario.catalog), Book(scenario.settings, scenario.catalog)
    for index, event in enumerate(scenario.events):
        try:
            lazy_out = lazy.apply(event, index)
        except BookError:
            with pytest.raises(BookError):
                eager.apply(event, index)
            continue
        eager_out = eager.apply(event, index)
        if eager.__dict__.pop("_due_stale", False):
            eager._queue_all()
        assert lazy_out == eager_out
        snapshot = Book.loads(lazy.dumps())  # a snapshot holds the queue rebuilt
        assert "_due_stale" not in snapshot.__dict__ and sorted(snapshot._due) == sorted(eager._due)
    assert lazy.dumps() == eager.dumps()


def reference_licensed_terms(book: Book, kind: str, code: str, currency: str, qty: int,
                             share: Fraction) -> LineTerms:
    item = item_of(book.catalog, kind, code)
    amount = round_money(price_quantity(item, Fraction(qty), currency) * share, currency, book.settings.rounding)
    return describe(item, qty), Decimal(shown_quantity(item, qty)), item.unit_price(currency), amount


def reference_usage_terms(book: Book, code: str, currency: str, quantity: Fraction) -> LineTerms:
    metric = book.catalog.metric(code)
    amount = round_money(rate(metric, quantity, currency), currency, book.settings.rounding)
    description = (f"{metric.name or metric.code} (aggregate {metric.aggregation}, "
                   f"{format(metric.included.normalize(), 'f')} included)")
    quantity_shown = (Decimal(quantity.numerator) if quantity.denominator == 1 else
                      (Decimal(quantity.numerator) / Decimal(quantity.denominator)).quantize(Decimal("0.000001")))
    return description, quantity_shown, metric.unit_price(currency), amount


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in FIXTURES])
def test_memoized_line_terms_are_what_their_keys_compute(scenario: Scenario) -> None:
    book = Book(scenario.settings, scenario.catalog)
    for _ in replay(book, scenario):
        pass
    for key, terms in book._cat.line_terms.items():
        assert key[-1] == book.settings.rounding
        if key[0] == "usage":
            code, currency, numerator, denominator = cast(tuple[str, str, int, int], key[1:5])
            expected = reference_usage_terms(book, code, currency, Fraction(numerator, denominator))
        else:
            kind, code, currency, qty, share = cast(tuple[str, str, str, int, tuple[int, int] | None], key[:5])
            whole = Fraction(*share) if share is not None else Fraction(1)
            expected = reference_licensed_terms(book, kind, code, currency, qty, whole)
        assert repr(terms) == repr(expected)  # the same values with the same exponents


@pytest.mark.parametrize("scenario", SCENARIOS[:20], ids=[p.stem for p in FIXTURES[:20]])
def test_the_catalog_index_prices_as_price_quantity(scenario: Scenario) -> None:
    catalog = scenario.catalog
    for index in (CatalogIndex(catalog), CatalogIndex.of(catalog)):
        check_index(catalog, index)


def check_index(catalog: Catalog, index: CatalogIndex) -> None:
    items = [("plan", p) for p in catalog.plans] + [("addon", a) for a in catalog.addons]
    for kind, item in items:
        assert index.item(kind, item.code) is item
        for currency in sorted(item.currencies()):
            for quantity in range(0, 40):
                assert index.price(kind, item.code, currency, quantity) == price_quantity(
                    item, Fraction(quantity), currency)
    for plan in catalog.plans:
        assert list(index.plan_metrics(plan.code)) == catalog.plan_metrics(plan)
    with pytest.raises(KeyError) as expected:
        catalog.plan("no-such-plan")
    with pytest.raises(KeyError) as found:
        index.plan("no-such-plan")
    assert found.value.args == expected.value.args


@given(
    tz=st.sampled_from(ZONES),
    interval=st.sampled_from(["day", "week", "month", "year"]),
    count=st.integers(1, 3),
    anchor=st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31)),
    fold=st.integers(0, 1),
    billing_day=st.none() | st.integers(1, 31),
    n=st.integers(-30, 60),
)
def test_memoized_boundaries_equal_the_relativedelta_formula(tz: str, interval: str, count: int, anchor: datetime,
                                                             fold: int, billing_day: int | None, n: int) -> None:
    if interval in ("day", "week"):
        billing_day = None
    wall = anchor.replace(fold=fold)
    grid = Grid(tz, interval, count, wall, instant_of(wall, tz), billing_day)  # type: ignore[arg-type]
    assert grid.boundary(n) == reference_boundary(grid, n)
    other = Grid(tz, interval, count, anchor.replace(fold=1 - fold), instant_of(wall, tz), billing_day)  # type: ignore[arg-type]
    assert other.boundary(n) == reference_boundary(other, n)  # a fold apart: never the other's memo


ZONE_INFOS = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)),
              *(ZoneInfo(zone) for zone in ZONES)]


@given(st.lists(st.tuples(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31),
                                       timezones=st.sampled_from(ZONE_INFOS)),
                          st.sampled_from(ZONES)), min_size=1, max_size=8))
def test_memoized_tag_instants_and_local_days_are_what_they_memoize(instants: list[tuple[datetime, str]]) -> None:
    """Whatever was memoized before (equal instants written with other offsets or folds among
    them), a tag instant is the instant's isoformat() and a billing day its local date's."""
    for instant, tz in instants:
        for same in (instant, instant.astimezone(UTC), instant.replace(fold=1 - instant.fold)):
            assert _k(same) == same.isoformat()
            assert _local_day(same, tz) == local_date(same, tz).isoformat()


def test_an_instant_written_with_another_offset_keeps_its_offset() -> None:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    assert _k(at) == "2026-03-01T00:00:00+00:00"
    assert _k(at.astimezone(timezone(timedelta(hours=2)))) == "2026-03-01T02:00:00+02:00"
    assert _local_day(at, "Asia/Kolkata") == "2026-03-01" and _local_day(at, "America/New_York") == "2026-02-28"


def test_indexes_of_catalogs_alike_share_exact_prices_and_nothing_a_book_stores(
        monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = SCENARIOS[0].catalog
    first = CatalogIndex.of(catalog)
    again = CatalogIndex.of(catalog.model_copy(deep=True))  # a batch loads an equal catalog afresh
    assert again._prices is first._prices and again.recurring is first.recurring
    assert again.line_terms is not first.line_terms  # line terms end up in invoices: never shared
    plan = catalog.plans[0]
    assert again.plan(plan.code) is again.catalog.plans[0] is not plan
    # equal amounts written otherwise (10.00 -> 10.0000) make another catalog: nothing shared
    wider = plan.model_copy(update={"prices": {c: a.quantize(Decimal("0.0001")) for c, a in plan.prices.items()}})
    other = CatalogIndex.of(catalog.model_copy(update={"plans": [wider, *catalog.plans[1:]]}))
    assert other._prices is not first._prices and other.recurring is not first.recurring
    monkeypatch.setattr(CatalogIndex, "_SHARED_LIMIT", 1)  # a full memo is not shared either
    full = CatalogIndex.of(catalog)
    full.price("plan", plan.code, sorted(plan.currencies())[0], 1)
    assert CatalogIndex.of(catalog)._prices is not full._prices


@given(st.lists(st.tuples(st.sampled_from(["plan", "addon", "usage", "proration", "discount"]),
                          st.decimals(min_value=-10**6, max_value=10**6, places=2)), max_size=12),
       st.decimals(min_value=0, max_value=1, places=4), st.decimals(min_value=0, max_value=10**4, places=2))
def test_invoice_totals_sum_as_the_two_filtered_sums(kinds: list[tuple[str, Decimal]], tax_rate: Decimal,
                                                     credit: Decimal) -> None:
    lines = [InvoiceLine(kind=cast(LineKind, kind), description="x", subscription="s", quantity=None,
                         unit_amount=None, amount=amount, period_start=None, period_end=None)
             for kind, amount in kinds]
    subtotal = sum((line.amount for line in lines if line.kind != "discount"), Decimal(0))
    discount = -sum((line.amount for line in lines if line.kind == "discount"), Decimal(0))
    for mode in ("half_up", "half_even"):
        found = totals(lines, tax_rate, credit, "USD", mode)
        tax = round_money(exact_product(subtotal - discount, tax_rate), "USD", mode)
        assert repr((found.subtotal, found.discount, found.tax)) == repr(
            (round_money(subtotal, "USD", mode), round_money(discount, "USD", mode), tax))
        assert repr(found.total) == repr(round_money(subtotal - discount + tax, "USD", mode))


FX_SCENARIOS = [s for s in SCENARIOS if s.settings.fx_rates]


@given(st.sampled_from(FX_SCENARIOS),
       st.lists(st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2031, 12, 31),
                             timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5))])), max_size=20))
def test_memoized_fx_rates_are_rate_at(scenario: Scenario, instants: list[datetime]) -> None:
    book = Book(scenario.settings, scenario.catalog)
    currencies = sorted({r.currency for r in scenario.settings.fx_rates} | {scenario.settings.reporting_currency})
    for at in [i for instant in instants for i in (instant, instant.replace(hour=0, minute=0), instant)]:
        for currency in currencies:  # (the same date again: a memoized rate)
            try:
                expected = rate_at(scenario.settings, currency, at)
            except MissingRate:
                with pytest.raises(BookError):
                    book.fx_rate(currency, at)
                continue
            assert book.fx_rate(currency, at) == expected
    book.settings = scenario.settings.model_copy(update={"fx_rates": []})  # other settings: memo not reused
    for at in instants:
        assert book.fx_rate(book.settings.reporting_currency, at) == 1
        with pytest.raises(BookError):
            book.fx_rate(next(c for c in currencies if c != book.settings.reporting_currency), at)
    assert "_fx" not in Book.loads(book.dumps()).__dict__
