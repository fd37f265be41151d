"""What the SQL metric modules share: calendar periods as integers, the book's settings, exact
currency conversion and rounding written as SQL, and segment expressions.

- A month is one integer, `year * 12 + month - 1` (the `month` column of `mrr_movements` and
  `customer_mrr_months`); a period of `k` months (1 month, 3 quarter, 12 year) is `month // k`.
- Money in SQL is integer minor units. Converting to the reporting currency multiplies by the
  rate as an exact fraction `num / den` (with the minor-unit scales folded in) and rounds the
  integer quotient with the book's rounding mode (`half_up` or `half_even`), exactly as
  `billing.money.round_money` does — no floating point anywhere, on SQLite or PostgreSQL.
- SQL text is assembled from fragments written in this package (never from user input) with
  `compose`; every value a user gives (dates, tag keys, currencies) travels as a bind parameter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Literal

from billing.fx import MissingRate, rate_at
from billing.money import RoundingMode, from_minor, minor_units, money_str, round_to_places
from billing.periods import month_index, month_start
from billing.persistence.sql_reader import SqlReader
from billing.scenario import Settings

PeriodKind = Literal["month", "quarter", "year"]
MONTHS_IN: dict[str, int] = {"month": 1, "quarter": 3, "year": 12}


def compose(template: str, **fragments: object) -> str:
    """SQL text from a template in this package and fragments built by this package."""
    return template.format(**fragments)


# --- periods ----------------------------------------------------------------------------------


def period_label(kind: str, p: int) -> str:
    """`2026-01`, `2026-Q1` or `2026` for period index `p` of `kind`."""
    if kind == "month":
        return f"{p // 12}-{p % 12 + 1:02d}"
    if kind == "quarter":
        return f"{p // 4}-Q{p % 4 + 1}"
    return str(p)


_PERIOD = {
    "month": re.compile(r"^(\d{4})-(\d{2})$"),
    "quarter": re.compile(r"^(\d{4})-Q([1-4])$"),
    "year": re.compile(r"^(\d{4})$"),
}


def parse_period(kind: str, text: str) -> int:
    """The index of a period written as its label; a month or quarter also accepts the other
    forms (`2026-Q2` as a month means its first month `2026-04`, `2026` its first period)."""
    text = text.strip()
    k = MONTHS_IN[kind]
    for form, pattern in _PERIOD.items():
        found = pattern.match(text)
        if found is None:
            continue
        year = int(found.group(1))
        if form == "month":
            month = int(found.group(2))
            if not 1 <= month <= 12:
                break
            first_month = year * 12 + month - 1
        elif form == "quarter":
            first_month = year * 12 + (int(found.group(2)) - 1) * 3
        else:
            first_month = year * 12
        return first_month // k
    raise ValueError(f"{text!r} is not a period (2026-01, 2026-Q1 or 2026)")


def period_bounds(kind: str, p: int) -> tuple[datetime, datetime]:
    """[start, end) of period `p` in UTC."""
    k = MONTHS_IN[kind]
    return month_start(p * k), month_start((p + 1) * k)


# --- the book's settings ----------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerBook:
    """What the SQL needs to know about the book: its settings and the time span of its ledger."""

    settings: Settings
    first_month: int | None  # the first and last month with a command or a movement
    last_month: int | None

    @property
    def reporting_currency(self) -> str:
        return self.settings.reporting_currency

    @property
    def rounding(self) -> RoundingMode:
        return self.settings.rounding

    def money(self, minor: int | Fraction, currency: str | None = None) -> str:
        """Minor units (or an exact fraction of them) as the canonical decimal string."""
        cur = currency or self.reporting_currency
        if isinstance(minor, int):
            return str(from_minor(minor, cur))
        return money_str(minor / 10 ** minor_units(cur), cur, self.rounding)

    def fraction(self, minor: int) -> Fraction:
        return Fraction(minor, 10 ** minor_units(self.reporting_currency))

    def rate(self, numerator: Fraction | int, denominator: Fraction | int, *, scale: int = 100) -> str | None:
        """numerator ÷ denominator × scale with two decimals; None when the denominator is 0."""
        if not denominator:
            return None
        return str(round_to_places(Fraction(numerator) / Fraction(denominator) * scale, 2, self.rounding))


def load_book(reader: SqlReader) -> LedgerBook:
    raw = reader.scalar("SELECT settings FROM book_state")
    if raw is None:
        raise LookupError("the database holds no book (load a catalog and apply commands first)")
    settings = Settings.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
    # one MIN or MAX per subquery, so each is a single index lookup (SQLite scans the whole index
    # for a MIN and a MAX in one select)
    first_at, last_at = reader.rows("SELECT (SELECT MIN(at) FROM commands), (SELECT MAX(at) FROM commands)")[0]
    lo, hi = reader.rows("SELECT (SELECT MIN(month) FROM mrr_movements), (SELECT MAX(month) FROM mrr_movements)")[0]
    months = [m for m in (lo, hi) if m is not None]
    months += [month_index(_instant(at)) for at in (first_at, last_at) if at is not None]
    return LedgerBook(settings, min(months) if months else None, max(months) if months else None)


def _instant(value: object) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# --- exact conversion in SQL ------------------------------------------------------------------


def round_div(a: str, b: int, mode: RoundingMode) -> str:
    """SQL for the integer a ÷ b (b > 0) rounded with `mode`; integer division truncates toward
    zero on both databases, so the sign is handled explicitly."""
    if b == 1:
        return f"({a})"
    if mode == "half_up":
        return f"(CASE WHEN ({a}) >= 0 THEN (2 * ({a}) + {b}) / {2 * b} ELSE -((-2 * ({a}) + {b}) / {2 * b}) END)"

    def positive(x: str) -> str:
        return (f"(({x}) / {b} + CASE WHEN 2 * (({x}) % {b}) > {b} OR (2 * (({x}) % {b}) = {b} "
                f"AND (({x}) / {b}) % 2 = 1) THEN 1 ELSE 0 END)")

    return f"(CASE WHEN ({a}) >= 0 THEN {positive(a)} ELSE -{positive(f'-({a})')} END)"


def factor(settings: Settings, currency: str, at: datetime) -> Fraction | None:
    """Reporting minor units per minor unit of `currency` at `at` (None without a rate)."""
    try:
        rate = rate_at(settings, currency, at)
    except MissingRate:
        return None
    return rate * Fraction(10) ** (minor_units(settings.reporting_currency) - minor_units(currency))


def conversion(book: LedgerBook, currencies: list[str], kind: str, p_lo: int, p_hi: int,
               *, level: str, currency: str, period: str, at: Literal["start", "end"],
               params: dict[str, object]) -> str:
    """SQL converting `level` (minor units of the row's `currency`) to reporting minor units at
    the rate in force at the first (`start`) or last (`end`) instant of the row's `period`, for
    periods p_lo..p_hi; NULL where no rate is in force. Bind parameters go into `params`."""
    mode = book.rounding
    branches: list[str] = []
    for i, cur in enumerate(currencies):
        name = f"cur_{at}_{i}"
        params[name] = cur
        runs: list[tuple[int, Fraction | None]] = []
        for p in range(p_lo, p_hi + 1):
            start, end = period_bounds(kind, p)
            value = factor(book.settings, cur, start if at == "start" else end - timedelta(microseconds=1))
            if not runs or runs[-1][1] != value:
                runs.append((p, value))
        for first, value in reversed(runs):
            target = "NULL" if value is None else round_div(f"({level}) * {value.numerator}", value.denominator, mode)
            branches.append(f"WHEN {currency} = :{name} AND {period} >= {first} THEN {target}")
    if not branches:
        return "NULL"
    return "(CASE " + " ".join(branches) + " END)"


def convert_minor(book: LedgerBook, currency: str, at: datetime, minor: int) -> int:
    """Python counterpart of `conversion` for a handful of aggregates (raises without a rate)."""
    value = factor(book.settings, currency, at)
    if value is None:
        raise MissingRate(f"no fx rate for {currency} in {book.reporting_currency} at {at.isoformat()}")
    return int(round_to_places(Fraction(minor) * value, 0, book.rounding))


# --- segments ---------------------------------------------------------------------------------

SEGMENT_KINDS = ("plan", "product", "subtype", "currency", "cohort", "tag")
COHORT_JOIN = """LEFT JOIN (SELECT customer, MIN(month) AS cohort FROM customer_mrr_months GROUP BY customer) co
ON co.customer = {alias}.customer"""


@dataclass(frozen=True)
class Segmentation:
    """How a metric is split: None (the whole book) or plan, product, subtype, currency, cohort
    or tag:KEY."""

    kind: str | None = None
    key: str | None = None

    @property
    def label(self) -> str | None:
        if self.kind is None:
            return None
        return f"tag:{self.key}" if self.kind == "tag" else self.kind

    @property
    def by_legs(self) -> bool:
        return self.kind in ("plan", "product")

    def segment_label(self, value: object) -> str | None:
        if self.kind is None:
            return None
        if self.kind == "cohort":
            return period_label("month", int(str(value))) if value not in (None, "") else "(none)"
        return str(value) if value not in (None, "") else "(none)"


def parse_segmentation(text: str | None) -> Segmentation:
    if text is None or text.strip() in ("", "none"):
        return Segmentation()
    text = text.strip()
    if text.startswith("tag:"):
        key = text[4:]
        if not key:
            raise ValueError("--by tag:KEY needs a tag key, e.g. tag:segment")
        return Segmentation("tag", key)
    if text not in SEGMENT_KINDS or text == "tag":
        raise ValueError(f"unknown segment {text!r}: plan, product, subtype, currency, cohort or tag:KEY")
    return Segmentation(text)


def customer_segment(seg: Segmentation, reader: SqlReader, alias: str,
                     params: dict[str, object]) -> tuple[str, str]:
    """(SQL expression, join) of a per-customer segment for rows of table `alias` (which has the
    columns `customer` and `currency`); `''` for the whole book."""
    if seg.kind is None:
        return "''", ""
    if seg.kind == "currency":
        return f"{alias}.currency", ""
    if seg.kind == "cohort":
        # the month of a customer's first movement, which is its first `new`
        join = compose(COHORT_JOIN, alias=alias)
        return "COALESCE(CAST(co.cohort AS TEXT), '')", join
    if seg.kind == "tag":
        join = f"LEFT JOIN customers sc ON sc.id = {alias}.customer"
        if reader.dialect == "postgresql":
            params["tag_key"] = seg.key
            return "COALESCE(sc.tags ->> :tag_key, '')", join
        params["tag_path"] = '$."' + str(seg.key).replace('"', '\\"') + '"'
        return "COALESCE(json_extract(sc.tags, :tag_path), '')", join
    raise ValueError(f"{seg.kind} is not a per-customer segment")


def epoch_seconds(reader: SqlReader, column: str) -> str:
    """SQL for an instant column as whole seconds since 1970 (UTC)."""
    if reader.dialect == "postgresql":
        return f"CAST(EXTRACT(EPOCH FROM {column}) AS BIGINT)"
    return f"CAST(strftime('%s', {column}) AS INTEGER)"

