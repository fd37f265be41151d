"""Boundary models of the scenario format (SCENARIOS.md, version 1) and the commands it carries.

Every model forbids unknown fields, so a misspelt `quantity` is an error rather than one seat.
Money, rates and percentages are decimal strings; a JSON number there is rejected. Events are a
discriminated union on `type`; the same command models are what the library services accept.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from billing.catalog import Catalog
from billing.money import check_currency, parse_decimal
from billing.records import CreditNoteReason
from billing.usage import parse_value

Effective = Literal["immediately", "period_end"]


class ScenarioError(ValueError):
    """A scenario (or a command) that cannot be accepted; the message names the field."""


def parse_instant(value: object) -> datetime:
    """ISO 8601 with an offset; a bare date means midnight UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("time needs an offset, e.g. 2026-01-31T00:00:00Z")
        return value.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError("time must be an ISO 8601 string")
    text = value.strip()
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise ValueError(f"{value!r} needs an offset (e.g. Z)")
    return parsed.astimezone(UTC)


def _decimal_string(value: object, what: str) -> Decimal:
    if not isinstance(value, (str, Decimal)) or isinstance(value, bool):
        raise ValueError(f"{what} must be a decimal string such as \"12.50\", not a JSON number")
    if isinstance(value, Decimal):
        raise ValueError(f"{what} must be a decimal string such as \"12.50\", not a JSON number")
    return parse_decimal(value, what=what)


Instant = Annotated[datetime, Field(description="ISO 8601 instant")]
Code = Annotated[str, Field(min_length=1, max_length=200)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FxRate(Model):
    currency: str
    rate: Decimal
    from_: date = Field(alias="from")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, value: object) -> Decimal:
        rate = _decimal_string(value, "rate")
        if rate <= 0:
            raise ValueError("rate must be positive")
        return rate

    @field_validator("from_", mode="before")
    @classmethod
    def _from(cls, value: object) -> date:
        return parse_instant(value).date()


class InvoiceNumbering(Model):
    """How invoice and credit note numbers are made (an extension of SCENARIOS.md's settings;
    the defaults give `INV-0001` and `CN-0001`). `scope`: `book` is one gap-free series for every
    customer (Stripe's account-level numbering, Lago's entity-wide); `customer` is one gap-free
    series per customer, `INV-acme-0001` (Stripe's customer-level, Lago's per customer). Credit
    notes are always one series for the book."""

    prefix: str = "INV-"
    credit_note_prefix: str = "CN-"
    scope: Literal["book", "customer"] = "book"
    digits: int = Field(default=4, ge=1, le=12)

    @field_validator("prefix", "credit_note_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not 1 <= len(value) <= 20:
            raise ValueError("a number prefix has 1 to 20 characters")
        if not all(c.isascii() and (c.isalnum() or c in "-_/.#") for c in value):
            raise ValueError(f"a number prefix uses letters, digits and - _ / . # only, not {value[:20]!r}")
        if value[-1].isdigit():
            raise ValueError(f"a number prefix cannot end with a digit ({value!r}): the number "
                             "that follows would run into it")
        return value

    def invoice(self, value: int, customer: str) -> str:
        middle = f"{customer}-" if self.scope == "customer" else ""
        return f"{self.prefix}{middle}{value:0{self.digits}d}"

    def credit_note(self, value: int) -> str:
        return f"{self.credit_note_prefix}{value:0{self.digits}d}"


class Settings(Model):
    proration: Literal["day", "second", "none"] = "day"
    proration_invoicing: Literal["next_invoice", "immediate"] = "next_invoice"
    rounding: Literal["half_up", "half_even"] = "half_up"
    reporting_currency: str = "USD"
    usage_in_mrr: bool = True
    fx_rates: list[FxRate] = Field(default_factory=list)
    invoice_numbering: InvoiceNumbering = Field(default_factory=InvoiceNumbering)

    @field_validator("reporting_currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)


class EventBase(Model):
    at: datetime

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: object) -> datetime:
        return parse_instant(value)


class CustomerEvent(EventBase):
    type: Literal["customer"]
    customer: Code
    currency: str
    tax_rate: Decimal = Decimal(0)
    timezone: str = "UTC"
    tags: dict[str, str] = Field(default_factory=dict)
    locale: str = "en_US"
    name: str = ""

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        return check_currency(value)

    @field_validator("tax_rate", mode="before")
    @classmethod
    def _tax(cls, value: object) -> Decimal:
        rate = _decimal_string(value, "tax_rate")
        if rate < 0 or rate >= 10:
            raise ValueError("tax_rate must be between 0 and 10 (0.20 is 20 %)")
        return rate

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value)
        except (UnknownLocaleError, ValueError):
            raise ValueError(f"unknown locale {value!r}") from None
        return value


class AddOnQuantity(Model):
    addon: Code
    quantity: Annotated[StrictInt, Field(ge=0, le=10**9)] = 1


Quantity = Annotated[StrictInt, Field(ge=0, le=10**9)]


class SubscribeEvent(EventBase):
    type: Literal["subscribe"]
    customer: Code
    subscription: Code
    plan: Code
    quantity: Quantity = 1
    addons: list[AddOnQuantity] = Field(default_factory=list)
    billing_day: Annotated[StrictInt, Field(ge=1, le=31)] | None = None
    trial_days: Annotated[StrictInt, Field(ge=0, le=3650)] | None = None


class ChangeQuantityEvent(EventBase):
    type: Literal["change_quantity"]
    subscription: Code
    quantity: Quantity
    effective: Effective = "immediately"


class ChangePlanEvent(EventBase):
    type: Literal["change_plan"]
    subscription: Code
    plan: Code
    quantity: Quantity | None = None
    effective: Effective = "immediately"


class AddAddonEvent(EventBase):
    type: Literal["add_addon"]
    subscription: Code
    addon: Code
    quantity: Quantity = 1
    effective: Effective = "immediately"


class RemoveAddonEvent(EventBase):
    type: Literal["remove_addon"]
    subscription: Code
    addon: Code
    effective: Effective = "immediately"


class UsageEvent(EventBase):
    type: Literal["usage"]
    subscription: Code
    metric: Code
    value: Decimal
    id: Annotated[str, Field(min_length=1, max_length=500)]
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("value", mode="before")
    @classmethod
    def _value(cls, value: object) -> Decimal:
        # the ingester's rule (billing.usage): exact, at most 6 decimal places, below 10^12
        return parse_value(parse_decimal(value, what="value"))

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: object) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError("id must be a string")
        return str(value)


class Periods(Model):
    periods: Annotated[StrictInt, Field(ge=1, le=10_000)]


class DiscountEvent(EventBase):
    type: Literal["discount"]
    customer: Code | None = None
    subscription: Code | None = None
    percent: Decimal | None = None
    amount: Decimal | None = None
    duration: Literal["forever", "once"] | Periods = "forever"

    @field_validator("percent", mode="before")
    @classmethod
    def _percent(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        pct = _decimal_string(value, "percent")
        if pct <= 0 or pct > 100:
            raise ValueError("percent must be above 0 and at most 100")
        return pct

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        amount = _decimal_string(value, "amount")
        if amount <= 0:
            raise ValueError("amount must be positive")
        return amount

    @model_validator(mode="after")
    def _one_of(self) -> DiscountEvent:
        if (self.customer is None) == (self.subscription is None):
            raise ValueError("give exactly one of customer or subscription")
        if (self.percent is None) == (self.amount is None):
            raise ValueError("give exactly one of percent or amount")
        return self


class CancelEvent(EventBase):
    type: Literal["cancel"]
    subscription: Code
    effective: Effective = "period_end"


class ReactivateEvent(EventBase):
    type: Literal["reactivate"]
    subscription: Code


class InvoiceRunEvent(EventBase):
    type: Literal["invoice_run"]


class PayEvent(EventBase):
    type: Literal["pay"]
    invoice: Annotated[str, Field(min_length=1)]


class VoidEvent(EventBase):
    type: Literal["void"]
    invoice: Annotated[str, Field(min_length=1)]


class CreditNoteLineRequest(Model):
    """One invoice line to credit: its index on the invoice and the amount before tax (omitted:
    all that is left to credit on that line)."""

    line: Annotated[StrictInt, Field(ge=0, le=10**6)]
    amount: Decimal | None = None

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        amount = _decimal_string(value, "amount")
        if amount <= 0:
            raise ValueError("amount must be positive")
        return amount


class CreditNoteEvent(EventBase):
    """A credit note against a finalized or paid invoice (its number as printed)."""

    type: Literal["credit_note"]
    invoice: Annotated[str, Field(min_length=1)]
    lines: Annotated[list[CreditNoteLineRequest], Field(min_length=1, max_length=10_000)]
    reason: CreditNoteReason


Event = Annotated[
    CustomerEvent
    | SubscribeEvent
    | ChangeQuantityEvent
    | ChangePlanEvent
    | AddAddonEvent
    | RemoveAddonEvent
    | UsageEvent
    | DiscountEvent
    | CancelEvent
    | ReactivateEvent
    | InvoiceRunEvent
    | PayEvent
    | VoidEvent
    | CreditNoteEvent,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


class Scenario(Model):
    name: str = ""
    description: str = ""
    settings: Settings = Field(default_factory=Settings)
    catalog: Catalog = Field(default_factory=Catalog)
    events: list[Event]
    expect: dict[str, Any] | None = None


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    parts = list(loc)
    i = 0
    while i < len(parts):
        part = parts[i]
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # pydantic puts the discriminator value (the event type) into the location
            if i >= 2 and parts[0] == "events" and i == 2 and part in _EVENT_TYPES:
                i += 1
                continue
            out += ("." if out else "") + part
        i += 1
    return out or "scenario"


_EVENT_TYPES = {
    "customer", "subscribe", "change_quantity", "change_plan", "add_addon", "remove_addon",
    "usage", "discount", "cancel", "reactivate", "invoice_run", "pay", "void", "credit_note",
}


MAX_PROBLEMS = 10
MAX_PROBLEM_LENGTH = 300


def describe_validation_error(error: ValidationError) -> str:
    """The problems (the first ten, then how many more), each naming the field path (with the
    event index) and cut to 300 characters: hostile input never makes a huge message."""
    lines = []
    problems = error.errors()
    for item in problems[:MAX_PROBLEMS]:
        where = _format_loc(tuple(item["loc"]))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field"
        elif item["type"] == "missing":
            msg = "required field is missing"
        line = f"{where}: {msg}"
        lines.append(line if len(line) <= MAX_PROBLEM_LENGTH else line[:MAX_PROBLEM_LENGTH] + "…")
    if len(problems) > MAX_PROBLEMS:
        lines.append(f"and {len(problems) - MAX_PROBLEMS} more problem(s)")
    return "; ".join(lines)


def parse_scenario_text(text: str) -> Scenario:
    """Parse and validate a scenario. Numbers are read as exact decimals, never floats."""
    try:
        raw = json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None
    except RecursionError:
        raise ScenarioError("not a scenario: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise ScenarioError("a scenario must be a JSON object")
    try:
        _reject_json_numbers(raw, "")
    except RecursionError:
        raise ScenarioError("not a scenario: JSON nested too deeply") from None
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(describe_validation_error(exc)) from None
    previous: datetime | None = None
    for index, event in enumerate(scenario.events):
        if previous is not None and event.at < previous:
            raise ScenarioError(f"events[{index}].at: time goes backwards ({event.at.isoformat()} is "
                                f"before the previous event's {previous.isoformat()})")
        previous = event.at
    return scenario


_MONEY_KEYS = {"tax_rate", "percent", "amount", "rate", "included"}
_MONEY_MAPS = {"prices", "unit_amount", "flat_amount", "minimum"}


def _reject_json_numbers(node: Any, path: str) -> None:
    """Money, rates and percentages are decimal strings in the format, never JSON numbers."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _reject_json_numbers(item, f"{path}[{i}]")
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key in _MONEY_KEYS and isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
            raise ScenarioError(f"{where}: must be a decimal string such as \"12.50\", not a JSON number")
        if key in _MONEY_MAPS and isinstance(value, dict):
            for cur, amount in value.items():
                if isinstance(amount, (int, float, Decimal)) and not isinstance(amount, bool):
                    raise ScenarioError(f"{where}.{cur}: must be a decimal string such as \"12.50\", "
                                        "not a JSON number")
        if key not in ("properties", "expect"):
            _reject_json_numbers(value, where)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number this format accepts")
