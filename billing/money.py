"""Money: exact amounts, currency minor units, and the one rounding function.

Rules (SCENARIOS.md, "Conventions"):
- Money is never a float. Amounts are `Decimal` (exact) or `Fraction` (exact intermediates).
- A currency's minor unit comes from babel's currency precision (USD 2, JPY 0, KWD 3).
- Rounding happens in exactly one function, `round_money`, with a named mode
  (`half_up` default, or `half_even`), at each invoice line, each invoice's tax, each
  customer's MRR and each conversion to the reporting currency.
- Storage uses integer minor units, converted only from an already rounded amount.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Context, Decimal, Inexact, InvalidOperation
from fractions import Fraction
from functools import cache
from typing import Literal

from babel.numbers import format_currency, get_currency_precision, list_currencies

RoundingMode = Literal["half_up", "half_even"]

_DECIMAL_MODES: dict[str, str] = {"half_up": ROUND_HALF_UP, "half_even": ROUND_HALF_EVEN}


class MoneyError(ValueError):
    """A malformed amount or an unknown currency."""


@cache
def _known_currencies() -> frozenset[str]:
    return frozenset(list_currencies())


def check_currency(code: str) -> str:
    """Return the ISO 4217 code if babel knows it, else raise MoneyError."""
    if code not in _known_currencies():
        raise MoneyError(f"unknown currency {code!r}")
    return code


@cache
def minor_units(currency: str) -> int:
    """Digits after the decimal point for `currency` (babel): USD 2, JPY 0, KWD 3."""
    check_currency(currency)
    return int(get_currency_precision(currency))


def shown(value: object, limit: int = 40) -> str:
    """A value quoted in an error message, cut to `limit` characters (input may be hostile)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def parse_decimal(text: object, *, what: str = "amount") -> Decimal:
    """Parse a decimal string (or int). Floats, NaN and infinities are rejected."""
    if isinstance(text, bool) or isinstance(text, float):
        raise MoneyError(f"{what} must be a decimal string, not {type(text).__name__}")
    if isinstance(text, int):
        if abs(text) >= 10**15:
            raise MoneyError(f"{what} {text} is too large")
        return Decimal(text)
    if isinstance(text, Decimal):
        value = text
    elif isinstance(text, str):
        try:
            value = Decimal(text.strip())
        except InvalidOperation:
            raise MoneyError(f"{what} {shown(text)} is not a decimal number") from None
    else:
        raise MoneyError(f"{what} must be a decimal string, not {type(text).__name__}")
    if not value.is_finite():
        raise MoneyError(f"{what} {shown(text)} is not a finite number")
    if abs(value) >= Decimal(10) ** 15:
        raise MoneyError(f"{what} {shown(text)} is too large")
    return value


def to_fraction(value: Decimal | Fraction | int) -> Fraction:
    """Exact conversion; floats and booleans are refused (money is never a float)."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        raise MoneyError(f"amount must be Decimal, Fraction or int, not {type(value).__name__}")
    if isinstance(value, Decimal) and not value.is_finite():
        raise MoneyError(f"amount {value} is not finite")
    return Fraction(value)


_WIDE = Context(prec=200)
_EXACT = Context(prec=200, traps=[Inexact, InvalidOperation])  # exact or raises
_FAST_DIGITS = 190  # results with fewer digits fit the 200-digit contexts exactly
_FAST_LIMIT = 10**_FAST_DIGITS


@cache
def _quantum(places: int) -> Decimal:
    return Decimal(1).scaleb(-places)


def round_money(
    value: Decimal | Fraction | int, currency: str, mode: RoundingMode = "half_up"
) -> Decimal:
    """Round an exact amount to the currency's minor unit with the named mode.

    The only place an amount is rounded. Fractions are rounded exactly (no float, no
    intermediate truncation): the fraction is scaled to minor units and rounded as an
    integer division.
    """
    return round_to_places(value, minor_units(currency), mode)


def round_to_places(value: Decimal | Fraction | int, places: int, mode: RoundingMode = "half_up") -> Decimal:
    """Round exactly to `places` decimals (used for money and for 2-decimal rates).

    A Decimal is quantized with the mode in a 200-digit context (exact up to there); a Fraction
    is rounded by integer division; a zero result is always +0.
    """
    if isinstance(value, Decimal) and value.is_finite() and value.adjusted() + places < _FAST_DIGITS:
        rounded = value.quantize(_quantum(places), rounding=_DECIMAL_MODES[mode], context=_WIDE)
        return rounded if rounded else rounded.copy_abs()
    frac = value if type(value) is Fraction else to_fraction(value)  # a Fraction needs no checks
    whole = round_quotient(frac.numerator * 10**places, frac.denominator, mode)
    if abs(whole) < _FAST_LIMIT:
        return Decimal(whole).scaleb(-places, context=_WIDE)
    q = Decimal(whole).scaleb(-places, context=_WIDE)
    return q.quantize(Decimal(1).scaleb(-places), context=_WIDE)


def round_quotient(numerator: int, denominator: int, mode: RoundingMode = "half_up") -> int:
    """The integer nearest `numerator / denominator` (denominator > 0); a tie goes away from
    zero under `half_up`, to the even neighbour under `half_even`."""
    whole, rest = divmod(abs(numerator), denominator)
    twice = 2 * rest
    if twice > denominator or (twice == denominator and (mode == "half_up" or whole % 2 == 1)):
        whole += 1
    return -whole if numerator < 0 else whole


def exact_product(a: Decimal, b: Decimal) -> Decimal | Fraction:
    """`a × b` exactly: a Decimal when 200 digits hold it, else a Fraction."""
    try:
        return _EXACT.multiply(a, b)
    except (Inexact, InvalidOperation):
        return to_fraction(a) * to_fraction(b)


def to_minor(amount: Decimal, currency: str) -> int:
    """Integer minor units of an amount that is already rounded to the currency."""
    places = minor_units(currency)
    if not amount.is_finite():
        raise MoneyError(f"{amount} {currency} is not a finite amount")
    numerator, denominator = amount.as_integer_ratio()
    scale: int = 10**places
    minor, rest = divmod(numerator * scale, denominator)
    if rest:
        raise MoneyError(f"{amount} {currency} is not rounded to {places} decimals")
    return minor


def from_minor(minor: int, currency: str) -> Decimal:
    places = minor_units(currency)
    return Decimal(minor).scaleb(-places).quantize(Decimal(1).scaleb(-places))


def money_str(amount: Decimal | Fraction | int, currency: str, mode: RoundingMode = "half_up") -> str:
    """The canonical decimal string of an amount in `currency` ("12.50", "1200", "1.250")."""
    return str(round_money(amount, currency, mode))


def format_money(amount: Decimal, currency: str, locale: str = "en_US") -> str:
    """Human formatting in a locale (babel), e.g. "$1,500.00" or "1.500,00 €"."""
    return str(format_currency(amount, currency, locale=locale))
