"""Account-level expansion figures, computed in SQL over the ledger.

- **Time to first expansion**: for accounts whose first `new` falls in the range, the days from
  that `new` to the account's first expansion; median and mean over the accounts that expanded,
  with how many they are out of how many started (`covers` / `accounts`).
- **Contraction after expansion**: of the expansion movements in the range, the share of
  expanding accounts with an expansion followed by a contraction or churn within N days
  (default 90), and the share of expansion MRR those followed expansions brought.
- **Expansion readiness**: active subscriptions likely to expand next, from what the book knows
  (it has no seat limits or usage quotas of its own): on a `tiered` or `volume` plan, a quantity
  at or above 80 % of the current tier's upper bound (`near_tier_boundary`, with the saturation
  quantity ÷ bound) or in the open-ended top tier (`top_tier`); and seats that grew in the last
  N days (`seats_grew`, with the MRR those seat expansions added); and seat saturation
  (`seats_saturated`): active seats — the period-to-date aggregate of a metric declared
  `active_seats` (billing.metering.seat_saturation) — at or above 80 % of the seats bought, with
  `seat_saturation` the ratio as a percentage on every row that has one.

Reversed entries and their reversals are left out of all three.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from billing.catalog import Catalog
from billing.money import from_minor, round_to_places
from billing.periods import month_index
from billing.persistence import Engine
from billing.persistence.sql_reader import SqlReader, read_ledger
from expansion.sqlkit import compose, epoch_seconds, load_book, parse_period

LIVE = "m.entry = 'movement' AND NOT EXISTS (SELECT 1 FROM mrr_movements r WHERE r.reverses = m.id)"

FIRST_EXPANSION = """
WITH n AS (
  SELECT m.customer, MIN(m.at) AS first_new, MIN(m.month) AS first_month FROM mrr_movements m
  WHERE m.type = 'new' AND {live} GROUP BY m.customer
), x AS (
  SELECT m.customer, MIN(m.at) AS first_expansion FROM mrr_movements m JOIN n ON n.customer = m.customer
  WHERE m.type = 'expansion' AND m.at >= n.first_new AND {live} GROUP BY m.customer
), d AS (
  SELECT {x_epoch} - {n_epoch} AS secs FROM n JOIN x ON x.customer = n.customer
  WHERE n.first_month >= :m_lo AND n.first_month < :m_hi
), o AS (
  SELECT secs, ROW_NUMBER() OVER (ORDER BY secs) AS rn, COUNT(*) OVER () AS cnt FROM d
)
SELECT (SELECT COUNT(*) FROM n WHERE first_month >= :m_lo AND first_month < :m_hi),
  COUNT(*), SUM(secs),
  SUM(CASE WHEN rn = (cnt + 1) / 2 OR rn = (cnt + 2) / 2 THEN secs ELSE 0 END),
  SUM(CASE WHEN rn = (cnt + 1) / 2 OR rn = (cnt + 2) / 2 THEN 1 ELSE 0 END)
FROM o
"""

AFTER_EXPANSION = """
WITH e AS (
  SELECT m.id, m.customer, m.at, m.reporting_delta AS amount, {m_epoch} AS t FROM mrr_movements m
  WHERE m.type = 'expansion' AND m.month >= :m_lo AND m.month < :m_hi AND {live}
), f AS (
  SELECT e.customer, e.amount, CASE WHEN EXISTS (
    SELECT 1 FROM mrr_movements c WHERE c.customer = e.customer AND c.type IN ('contraction', 'churn')
      AND c.at > e.at AND c.entry = 'movement' AND {c_epoch} <= e.t + :window
      AND NOT EXISTS (SELECT 1 FROM mrr_movements r2 WHERE r2.reverses = c.id)
  ) THEN 1 ELSE 0 END AS followed FROM e
)
SELECT COUNT(DISTINCT customer), COUNT(DISTINCT CASE WHEN followed = 1 THEN customer END),
  COALESCE(SUM(amount), 0), COALESCE(SUM(CASE WHEN followed = 1 THEN amount ELSE 0 END), 0), COUNT(*)
FROM f
"""

READINESS = """
WITH g AS (
  SELECT m.subscription, SUM(m.delta) AS grown, COUNT(*) AS changes FROM mrr_movements m
  WHERE m.type = 'expansion' AND m.subtype = 'seat' AND m.month >= :since_month
    AND {m_epoch} > :since AND {m_epoch} <= :until AND {live}
  GROUP BY m.subscription
), s AS (
  SELECT s.id, s.customer, s.plan, s.quantity, c.mrr, c.currency, g.grown, g.changes,
    {bound} AS bound, {tiered} AS tiered
  FROM subscriptions s JOIN customers c ON c.id = s.customer LEFT JOIN g ON g.subscription = s.id
  WHERE s.status = 'active'
)
SELECT id, customer, plan, quantity, mrr, currency, grown, changes, bound, tiered FROM s
WHERE grown IS NOT NULL OR (tiered = 1 AND (bound IS NULL OR 10 * quantity >= 8 * bound)) OR {saturated}
ORDER BY customer, id
"""


@dataclass(frozen=True)
class FirstExpansion:
    accounts: int  # accounts whose first `new` is in the range
    covers: int  # of them, those that expanded
    median_days: str | None
    mean_days: str | None

    def to_json(self) -> dict[str, object]:
        return {"accounts": self.accounts, "covers": self.covers, "median_days": self.median_days,
                "mean_days": self.mean_days}


@dataclass(frozen=True)
class AfterExpansion:
    days: int
    expanding_accounts: int
    accounts_contracting: int
    account_share: str | None  # percent
    expansion_mrr: str
    expansion_mrr_contracting: str
    mrr_share: str | None  # percent

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _days(seconds: Fraction) -> str:
    return str(round_to_places(seconds / 86400, 2, "half_up"))


def _months(reader: SqlReader, first: str | None, last: str | None) -> tuple[int, int]:
    book = load_book(reader)
    lo = parse_period("month", first) if first is not None else (book.first_month or 0)
    hi = parse_period("month", last) if last is not None else (book.last_month or 0)
    return lo, hi + 1


def time_to_first_expansion(engine: Engine, *, first: str | None = None, last: str | None = None) -> FirstExpansion:
    """Days from each account's first `new` (in months `first`..`last`) to its first expansion."""
    with read_ledger(engine) as reader:
        m_lo, m_hi = _months(reader, first, last)
        sql = compose(FIRST_EXPANSION, live=LIVE, x_epoch=epoch_seconds(reader, "x.first_expansion"),
                      n_epoch=epoch_seconds(reader, "n.first_new"))
        accounts, covers, total, middle, middles = reader.rows(sql, {"m_lo": m_lo, "m_hi": m_hi})[0]
    covers = int(covers or 0)
    if not covers:
        return FirstExpansion(int(accounts or 0), 0, None, None)
    return FirstExpansion(int(accounts), covers, _days(Fraction(int(middle), int(middles))),
                          _days(Fraction(int(total), covers)))


def contraction_after_expansion(engine: Engine, *, first: str | None = None, last: str | None = None,
                                days: int = 90) -> AfterExpansion:
    """Expansions in months `first`..`last` followed within `days` by a contraction or churn of
    the same account."""
    if days < 0:
        raise ValueError("days must not be negative")
    with read_ledger(engine) as reader:
        book = load_book(reader)
        m_lo, m_hi = _months(reader, first, last)
        sql = compose(AFTER_EXPANSION, live=LIVE, m_epoch=epoch_seconds(reader, "m.at"),
                      c_epoch=epoch_seconds(reader, "c.at"))
        accounts, contracting, amount, followed, _ = reader.rows(
            sql, {"m_lo": m_lo, "m_hi": m_hi, "window": days * 86400})[0]
    return AfterExpansion(
        days=days, expanding_accounts=int(accounts), accounts_contracting=int(contracting),
        account_share=book.rate(int(contracting), int(accounts)),
        expansion_mrr=book.money(int(amount)), expansion_mrr_contracting=book.money(int(followed)),
        mrr_share=book.rate(int(followed), int(amount)),
    )


SATURATED = Decimal("0.8")  # active ÷ bought seats from which a subscription is ready to add seats


def expansion_readiness(engine: Engine, *, as_of: datetime | None = None, days: int = 90) -> list[dict[str, Any]]:
    """Active subscriptions near a tier boundary, in the top tier, whose seats grew in the
    `days` before `as_of` (default: the time of the book's latest command), or whose active
    seats reach 80 % of the seats bought."""
    from billing.metering import seat_saturation

    with read_ledger(engine) as reader:
        raw = reader.scalar("SELECT catalog FROM book_state")
        if raw is None:
            return []
        catalog = Catalog.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
        if as_of is None:
            latest = reader.scalar("SELECT MAX(at) FROM commands")
            as_of = _instant(latest) if latest is not None else datetime.now(UTC)
        saturation_of = {s.subscription: s.ratio for s in seat_saturation(engine, as_of=as_of)
                          if s.ratio is not None}
        saturated = sorted(sub for sub, ratio in saturation_of.items() if ratio >= SATURATED)
        since = as_of - timedelta(days=days)
        params: dict[str, object] = {"since": int(since.timestamp()), "until": int(as_of.timestamp()),
                                     "since_month": month_index(since)}
        bound_cases: list[str] = []
        tiered_plans: list[str] = []
        for i, plan in enumerate(catalog.plans):
            if plan.pricing not in ("tiered", "volume") or not plan.tiers:
                continue
            params[f"plan_{i}"] = plan.code
            tiered_plans.append(f":plan_{i}")
            steps = " ".join(f"WHEN s.quantity <= {int(t.up_to)} THEN {int(t.up_to)}"
                             for t in plan.tiers if t.up_to is not None)
            bound_cases.append(f"WHEN s.plan = :plan_{i} THEN (CASE {steps} ELSE NULL END)" if steps
                               else f"WHEN s.plan = :plan_{i} THEN NULL")
        bound = f"(CASE {' '.join(bound_cases)} ELSE NULL END)" if bound_cases else "CAST(NULL AS INTEGER)"
        tiered = f"(CASE WHEN s.plan IN ({', '.join(tiered_plans)}) THEN 1 ELSE 0 END)" if tiered_plans else "0"
        for i, sub in enumerate(saturated):
            params[f"sat_{i}"] = sub
        in_saturated = (f"s.id IN ({', '.join(f':sat_{i}' for i in range(len(saturated)))})" if saturated
                        else "1 = 0")
        sql = compose(READINESS, live=LIVE, m_epoch=epoch_seconds(reader, "m.at"), bound=bound, tiered=tiered,
                      saturated=in_saturated)
        rows = reader.rows(sql, params)
    ready: list[dict[str, Any]] = []
    for sub, customer, plan, quantity, mrr, currency, grown, changes, tier_bound, is_tiered in rows:
        signals = []
        saturation = None
        if is_tiered:
            if tier_bound is None:
                signals.append("top_tier")
            else:
                signals.append("near_tier_boundary")
                saturation = str(round_to_places(Fraction(int(quantity) * 100, int(tier_bound)), 2, "half_up"))
        if grown is not None:
            signals.append("seats_grew")
        seat_ratio = saturation_of.get(sub)
        if seat_ratio is not None and seat_ratio >= SATURATED:
            signals.append("seats_saturated")
        ready.append({
            "customer": customer, "subscription": sub, "plan": plan, "quantity": int(quantity),
            "tier_up_to": None if tier_bound is None else int(tier_bound), "saturation": saturation,
            "seat_expansions": int(changes or 0),
            "seat_expansion_mrr": None if grown is None else str(from_minor(int(grown), currency)),
            "customer_mrr": str(from_minor(int(mrr), currency)), "currency": currency, "signals": signals,
            "seat_saturation": None if seat_ratio is None else str(round_to_places(seat_ratio * 100, 2, "half_up")),
        })
    ready.sort(key=lambda r: (-len(r["signals"]), r["customer"], r["subscription"]))
    return ready


def _instant(value: object) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value

