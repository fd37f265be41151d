"""Catalog: plans, add-ons and metrics with prices per currency, and the pricing models.

Pricing models (SCENARIOS.md, "Catalog"):
- `flat`: the price, whatever the quantity.
- `per_unit`: price × quantity (seats).
- `tiered` (graduated): each unit priced in the tier it falls in; a tier's `flat_amount` is added
  once when any unit falls in it. `up_to` is inclusive; the last tier has `up_to: null`.
- `volume`: every unit priced at the tier the whole quantity falls in, plus that tier's flat amount.
- `package`: the price per started block of `package_size` units.

Amounts returned here are exact (`Fraction`); rounding happens on the invoice line.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.money import check_currency, parse_decimal

PricingModel = Literal["flat", "per_unit", "tiered", "volume", "package"]
Aggregation = Literal["sum", "count", "max", "unique_count", "last", "weighted_sum"]


def _money_map(value: object, what: str) -> dict[str, Decimal]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object of currency → decimal string")
    out: dict[str, Decimal] = {}
    for currency, amount in value.items():
        check_currency(str(currency))
        parsed = parse_decimal(amount, what=f"{what}[{currency}]")
        if parsed < 0:
            raise ValueError(f"{what}[{currency}] must not be negative")
        out[str(currency)] = parsed
    return out


class Strict(BaseModel):
    """Boundary model: unknown fields are errors (a misspelt `quantity` must never bill one seat)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Tier(Strict):
    up_to: Annotated[int, Field(gt=0)] | None
    unit_amount: dict[str, Decimal]
    flat_amount: dict[str, Decimal] = Field(default_factory=dict)

    @field_validator("unit_amount", "flat_amount", mode="before")
    @classmethod
    def _money(cls, value: object) -> dict[str, Decimal]:
        return _money_map(value, "tier amount")


class Priced(Strict):
    """Fields shared by everything that has a price: plans, add-ons, metrics."""

    code: Annotated[str, Field(min_length=1, max_length=200)]
    name: Annotated[str, Field(max_length=500)] = ""
    pricing: PricingModel = "flat"
    prices: dict[str, Decimal] = Field(default_factory=dict)
    tiers: list[Tier] = Field(default_factory=list)
    package_size: Annotated[int, Field(gt=0)] | None = None

    @field_validator("prices", mode="before")
    @classmethod
    def _prices(cls, value: object) -> dict[str, Decimal]:
        return _money_map(value, "prices")

    @model_validator(mode="after")
    def _pricing_complete(self) -> Priced:
        if self.pricing in ("tiered", "volume"):
            if not self.tiers:
                raise ValueError(f"{self.code}: pricing {self.pricing!r} needs tiers")
            bounds = [t.up_to for t in self.tiers]
            if bounds[-1] is not None:
                raise ValueError(f"{self.code}: the last tier must have up_to null")
            finite = [b for b in bounds[:-1] if b is not None]
            if len(finite) != len(bounds) - 1 or finite != sorted(set(finite)):
                raise ValueError(f"{self.code}: tier up_to values must ascend, only the last null")
        elif self.pricing == "package":
            if self.package_size is None:
                raise ValueError(f"{self.code}: pricing 'package' needs package_size")
        return self

    def currencies(self) -> set[str]:
        if self.pricing in ("tiered", "volume"):
            sets = [set(t.unit_amount) for t in self.tiers]
            return set.intersection(*sets) if sets else set()
        return set(self.prices)

    def has_price(self, currency: str) -> bool:
        return currency in self.currencies()

    def unit_price(self, currency: str) -> Decimal | None:
        """The per-unit price shown on a line (flat, per_unit, package); None for tiers."""
        if self.pricing in ("tiered", "volume"):
            return None
        return self.prices[currency]

    def amount(self, quantity: Fraction | int, currency: str) -> Fraction:
        """Exact amount for `quantity` units under this item's pricing model."""
        return price_quantity(self, Fraction(quantity), currency)


class Plan(Priced):
    interval: Literal["day", "week", "month", "year"]
    interval_count: Annotated[int, Field(gt=0, le=1000)] = 1
    trial_days: Annotated[int, Field(ge=0, le=3650)] = 0
    product: str = "core"
    metrics: list[str] | None = None


class AddOn(Priced):
    interval: Literal["day", "week", "month", "year"]
    interval_count: Annotated[int, Field(gt=0, le=1000)] = 1


class Metric(Priced):
    aggregation: Aggregation
    field: str = "value"
    filter: dict[str, str] = Field(default_factory=dict)
    included: Decimal = Decimal(0)
    minimum: dict[str, Decimal] = Field(default_factory=dict)
    pricing: PricingModel = "per_unit"
    # the metric counts the subscription's active seats: its period-to-date aggregate ÷ the
    # seats bought is the seat-saturation signal (billing.metering.seat_saturation)
    active_seats: bool = False

    @field_validator("included", mode="before")
    @classmethod
    def _included(cls, value: object) -> Decimal:
        parsed = parse_decimal(value, what="included")
        if parsed < 0:
            raise ValueError("included must not be negative")
        return parsed

    @field_validator("minimum", mode="before")
    @classmethod
    def _minimum(cls, value: object) -> dict[str, Decimal]:
        return _money_map(value, "minimum")


class Catalog(Strict):
    plans: list[Plan] = Field(default_factory=list)
    addons: list[AddOn] = Field(default_factory=list)
    metrics: list[Metric] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_codes(self) -> Catalog:
        for kind, items in (("plan", self.plans), ("addon", self.addons), ("metric", self.metrics)):
            seen: set[str] = set()
            for item in items:
                if item.code in seen:
                    raise ValueError(f"duplicate {kind} code {item.code!r}")
                seen.add(item.code)
        metric_codes = {m.code for m in self.metrics}
        for plan in self.plans:
            for code in plan.metrics or []:
                if code not in metric_codes:
                    raise ValueError(f"plan {plan.code!r} lists unknown metric {code!r}")
        return self

    def plan(self, code: str) -> Plan:
        for plan in self.plans:
            if plan.code == code:
                return plan
        raise KeyError(f"unknown plan {code!r}")

    def addon(self, code: str) -> AddOn:
        for addon in self.addons:
            if addon.code == code:
                return addon
        raise KeyError(f"unknown addon {code!r}")

    def metric(self, code: str) -> Metric:
        for metric in self.metrics:
            if metric.code == code:
                return metric
        raise KeyError(f"unknown metric {code!r}")

    def plan_metrics(self, plan: Plan) -> list[Metric]:
        """Metrics billed on a plan's subscriptions: its list, or every metric in the catalog."""
        if plan.metrics is None:
            return list(self.metrics)
        return [self.metric(code) for code in plan.metrics]


def price_quantity(item: Priced, quantity: Fraction, currency: str) -> Fraction:
    """Exact price of `quantity` units of `item` in `currency` (no rounding)."""
    if quantity < 0:
        raise ValueError("quantity must not be negative")
    if item.pricing == "flat":
        return exact(item.prices[currency])
    if item.pricing == "per_unit":
        return exact(item.prices[currency]) * quantity
    if item.pricing == "package":
        size = item.package_size or 1
        blocks = -((-quantity) // size)  # ceiling: per started block
        return exact(item.prices[currency]) * blocks
    if item.pricing == "tiered":
        total = Fraction(0)
        lower = Fraction(0)
        for tier in item.tiers:
            upper = Fraction(tier.up_to) if tier.up_to is not None else None
            if quantity <= lower:
                break
            units = quantity - lower if upper is None else min(quantity, upper) - lower
            if units > 0:
                total += units * exact(tier.unit_amount[currency])
                total += exact(tier.flat_amount.get(currency, Decimal(0)))
            if upper is None:
                break
            lower = upper
        return total
    if item.pricing == "volume":
        if quantity == 0:
            return Fraction(0)
        for tier in item.tiers:
            if tier.up_to is None or quantity <= tier.up_to:
                return quantity * exact(tier.unit_amount[currency]) + exact(
                    tier.flat_amount.get(currency, Decimal(0))
                )
        raise AssertionError("volume tiers end with up_to null")
    raise ValueError(f"unknown pricing {item.pricing!r}")


@lru_cache(maxsize=4096)
def exact(amount: Decimal) -> Fraction:
    """A catalog amount as a Fraction (memoized: a catalog holds few distinct amounts)."""
    return Fraction(amount)


class CatalogIndex:
    """Lookups by code and exact prices of one catalog, memoized: a catalog is frozen, so a code
    always names the same item and `price` is a pure function of (kind, code, currency, quantity).
    Unknown codes raise the catalog's own KeyError."""

    # The `price` and `recurring` memos of the last index made by `of`, with its catalog's JSON.
    _shared: ClassVar[tuple[str, dict[tuple[str, str, str, int], Fraction], dict[tuple[object, ...], Fraction]]
                      | None] = None
    _SHARED_LIMIT: ClassVar[int] = 100_000  # entries past which `of` starts afresh (memory stays bounded)

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._plans = {plan.code: plan for plan in catalog.plans}
        self._addons = {addon.code: addon for addon in catalog.addons}
        self._plan_metrics: dict[str, tuple[Metric, ...]] = {}
        self._prices: dict[tuple[str, str, str, int], Fraction] = {}
        # the book's memo of a subscription's recurring monthly amount, by (currency, plan,
        # quantity, add-ons, coupon terms): a pure function of those and this catalog
        self.recurring: dict[tuple[object, ...], Fraction] = {}
        # the book's memo of invoice line terms (billing.book.LineTerms): by (kind, code, currency,
        # quantity, share as (numerator, denominator) or None for a whole period, mode) for licensed
        # lines, by ("usage", metric, currency, aggregate numerator, aggregate denominator, mode)
        self.line_terms: dict[tuple[object, ...], tuple[str, Decimal, Decimal | None, Decimal]] = {}

    @classmethod
    def of(cls, catalog: Catalog) -> CatalogIndex:
        """A new index of `catalog` that shares its `price` and `recurring` memos with the last one
        made here when their catalogs have the same JSON (a run loads the catalog afresh for each
        batch of customers). Those memos hold values that are only computed with, never stored in
        a book, so no object passes from one book to another; JSON tells apart amounts that
        compare equal but print differently (10.0, 10.00)."""
        text = catalog.model_dump_json()
        index = cls(catalog)
        shared = cls._shared
        if shared is not None and shared[0] == text and len(shared[1]) + len(shared[2]) < cls._SHARED_LIMIT:
            index._prices, index.recurring = shared[1], shared[2]
        else:
            cls._shared = (text, index._prices, index.recurring)
        return index

    def plan(self, code: str) -> Plan:
        plan = self._plans.get(code)
        return plan if plan is not None else self.catalog.plan(code)

    def item(self, kind: str, code: str) -> Priced:
        """A plan (`kind` "plan") or an add-on."""
        if kind == "plan":
            return self.plan(code)
        addon = self._addons.get(code)
        return addon if addon is not None else self.catalog.addon(code)

    def plan_metrics(self, code: str) -> tuple[Metric, ...]:
        """`Catalog.plan_metrics` of the plan `code`."""
        metrics = self._plan_metrics.get(code)
        if metrics is None:
            metrics = self._plan_metrics[code] = tuple(self.catalog.plan_metrics(self.plan(code)))
        return metrics

    def price(self, kind: str, code: str, currency: str, quantity: int) -> Fraction:
        """`price_quantity` of `quantity` whole units of the item."""
        key = (kind, code, currency, quantity)
        amount = self._prices.get(key)
        if amount is None:
            amount = self._prices[key] = price_quantity(self.item(kind, code), Fraction(quantity), currency)
        return amount
