"""Subscription state: what it bills for, its periods, what is billed, what is scheduled.

- `Items` is the plan with its seat quantity and the add-ons with theirs.
- A licensed period is registered when it opens (with the items in force at its start, after any
  period-end change) and stays unbilled until a run bills it; a change at exactly the start of an
  unbilled period replaces its items (SCENARIOS.md: "that period is billed in the new state").
- A usage period is registered when it closes and billed in arrears by the next run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Literal

from billing.periods import Grid, Period


@dataclass
class Items:
    """What a subscription bills for: its plan with a seat quantity, and add-ons with theirs."""

    plan: str
    quantity: int
    addons: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Items:
        return Items(self.plan, self.quantity, dict(self.addons))

    def priced(self) -> list[tuple[str, str, int]]:
        """(kind, code, quantity) for the plan and each add-on, plan first."""
        return [("plan", self.plan, self.quantity)] + [("addon", c, q) for c, q in self.addons.items()]


@dataclass
class LicensedPeriod:
    period: Period
    items: Items


@dataclass
class UsagePeriod:
    start: datetime
    end: datetime
    plan: str
    full_end: datetime | None = None  # the period's natural end when a cancel cut it short


@dataclass
class Scheduled:
    cause: str
    index: int | None
    plan: str | None = None
    quantity: int | None = None
    addon: str | None = None
    addon_quantity: int | None = None


@dataclass
class Subscription:
    id: str
    customer: str
    order: int
    billing_day: int | None
    status: Literal["trialing", "active", "cancelled"]
    items: Items
    trial_end: datetime | None = None
    grid: Grid | None = None
    current: Period | None = None
    stage: int = -1
    unbilled: list[LicensedPeriod] = field(default_factory=list)
    usage_open: datetime | None = None
    started_at: datetime | None = None  # when it was subscribed (None in older snapshots)
    usage_unbilled: list[UsagePeriod] = field(default_factory=list)
    usage_mrr: Fraction = Fraction(0)
    scheduled: list[Scheduled] = field(default_factory=list)
    cancel_at_period_end: bool = False
    cancel_index: int | None = None
    ended_at: datetime | None = None
    active_coupons: list[int] = field(default_factory=list)

    @property
    def next_boundary(self) -> datetime | None:
        return self.current.end if self.current is not None and self.status == "active" else None


