"""billing.money: minor units from babel, the one rounding function, and the boundary parser."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest

from billing.money import (
    MoneyError,
    check_currency,
    from_minor,
    minor_units,
    money_str,
    parse_decimal,
    round_money,
    round_to_places,
    to_minor,
)


def D(text: str) -> Decimal:
    return Decimal(text)


@pytest.mark.parametrize(
    ("currency", "places"),
    [("USD", 2), ("EUR", 2), ("GBP", 2), ("JPY", 0), ("KRW", 0), ("KWD", 3), ("BHD", 3), ("TND", 3)],
)
def test_minor_units_come_from_babel(currency: str, places: int) -> None:
    assert minor_units(currency) == places


@pytest.mark.parametrize("code", ["XXQ", "usd", "", "DOLLAR"])
def test_unknown_currency_is_rejected(code: str) -> None:
    with pytest.raises(MoneyError):
        check_currency(code)
    with pytest.raises(MoneyError):
        minor_units(code)


# value, currency, half_up, half_even
ROUNDING = [
    ("2.5", "JPY", "3", "2"),
    ("3.5", "JPY", "4", "4"),
    ("-2.5", "JPY", "-3", "-2"),
    ("-3.5", "JPY", "-4", "-4"),
    ("0.5", "JPY", "1", "0"),
    ("2.4999", "JPY", "2", "2"),
    ("2.5001", "JPY", "3", "3"),
    ("0.125", "USD", "0.13", "0.12"),
    ("0.135", "USD", "0.14", "0.14"),
    ("-0.125", "USD", "-0.13", "-0.12"),
    ("0.004", "USD", "0.00", "0.00"),
    ("-0.004", "USD", "0.00", "0.00"),
    ("1.0005", "KWD", "1.001", "1.000"),
    ("1.0015", "KWD", "1.002", "1.002"),
    ("1.2345", "BHD", "1.235", "1.234"),
    ("12", "USD", "12.00", "12.00"),
    ("1200", "JPY", "1200", "1200"),
]


@pytest.mark.parametrize(("value", "currency", "half_up", "half_even"), ROUNDING)
def test_round_money_modes(value: str, currency: str, half_up: str, half_even: str) -> None:
    up = round_money(D(value), currency, "half_up")
    even = round_money(D(value), currency, "half_even")
    # compare the strings: the exponent (number of places) is part of the contract
    assert str(up) == half_up
    assert str(even) == half_even


def test_half_up_is_the_default() -> None:
    assert round_money(D("0.125"), "USD") == D("0.13")


@pytest.mark.parametrize(
    ("value", "currency", "expected"),
    [
        (Fraction(1, 3) * 100, "USD", "33.33"),
        (Fraction(2, 3) * 100, "USD", "66.67"),
        (Fraction(9, 31) * 50, "USD", "14.52"),  # 14.516129…
        (Fraction(1, 8), "USD", "0.13"),  # an exact tie in a fraction
        (Fraction(-1, 8), "USD", "-0.13"),
        (Fraction(2500, 3), "JPY", "833"),
        (Fraction(1, 2000), "KWD", "0.001"),  # 0.0005 → half up
        (7, "KWD", "7.000"),
    ],
)
def test_round_money_of_exact_fractions(value: Fraction | int, currency: str, expected: str) -> None:
    assert str(round_money(value, currency)) == expected


def test_fraction_ties_follow_the_mode() -> None:
    assert round_money(Fraction(5, 2), "JPY", "half_even") == D("2")
    assert round_money(Fraction(7, 2), "JPY", "half_even") == D("4")


@pytest.mark.parametrize(
    ("value", "places", "mode", "expected"),
    [
        ("104.505", 2, "half_up", "104.51"),
        ("104.505", 2, "half_even", "104.50"),
        ("99.995", 2, "half_up", "100.00"),
        ("1.5", 0, "half_up", "2"),
    ],
)
def test_round_to_places(value: str, places: int, mode: str, expected: str) -> None:
    assert str(round_to_places(D(value), places, mode)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("1500.00", "USD", 150000),
        ("1500", "USD", 150000),
        ("-30.50", "USD", -3050),
        ("0.01", "EUR", 1),
        ("1200", "JPY", 1200),
        ("1.250", "KWD", 1250),
        ("0.005", "BHD", 5),
        ("1E+2", "USD", 10000),
    ],
)
def test_to_minor_and_back(amount: str, currency: str, minor: int) -> None:
    assert to_minor(D(amount), currency) == minor
    # from_minor gives the canonical form: exactly the currency's places
    assert str(from_minor(minor, currency)) == money_str(D(amount), currency)


@pytest.mark.parametrize(
    ("amount", "currency"),
    [("0.125", "USD"), ("1.5", "JPY"), ("1.0005", "KWD"), ("0.001", "EUR"), ("NaN", "USD")],
)
def test_to_minor_rejects_unrounded_amounts(amount: str, currency: str) -> None:
    with pytest.raises(MoneyError):
        to_minor(D(amount), currency)


def test_to_minor_rejects_infinity_as_money_error() -> None:
    with pytest.raises(MoneyError):
        to_minor(D("Infinity"), "USD")


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (D("12.5"), "USD", "12.50"),
        (1200, "JPY", "1200"),
        (D("1.25"), "KWD", "1.250"),
        (Fraction(1, 3), "USD", "0.33"),
    ],
)
def test_money_str(amount: Decimal | int | Fraction, currency: str, text: str) -> None:
    assert money_str(amount, currency) == text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12.50", D("12.50")),
        (" 12.50 ", D("12.50")),
        ("-3", D("-3")),
        ("0", D("0")),
        ("1e3", D("1000")),
        (42, D("42")),
        (D("0.0015"), D("0.0015")),
        ("999999999999999.99", D("999999999999999.99")),
    ],
)
def test_parse_decimal_accepts(raw: object, expected: Decimal) -> None:
    assert parse_decimal(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        1.5,
        0.1,
        float("nan"),
        True,
        None,
        [],
        "",
        "abc",
        "12,50",
        "1.2.3",
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        D("NaN"),
        D("Infinity"),
        "1e15",
        "1000000000000000",
        "-1000000000000000",
        "1e1000000000000000000",
    ],
)
def test_parse_decimal_rejects(raw: object) -> None:
    with pytest.raises(MoneyError):
        parse_decimal(raw)


def test_parse_decimal_names_what_it_parses() -> None:
    with pytest.raises(MoneyError, match="tax_rate"):
        parse_decimal(0.2, what="tax_rate")


def test_parse_decimal_rejects_huge_ints() -> None:
    with pytest.raises(MoneyError):
        parse_decimal(10**20)


@pytest.mark.parametrize("value", [0.1, True])
def test_round_money_rejects_floats(value: object) -> None:
    with pytest.raises((MoneyError, TypeError)):
        round_money(value, "USD")  # type: ignore[arg-type]


def test_very_large_amounts_round_exactly() -> None:
    assert str(round_money(Decimal("1000000000000000000000000000.005"), "USD")) == "1000000000000000000000000000.01"
