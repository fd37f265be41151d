"""billing.money fast paths: the same results, to the exponent and sign, as the Fraction path.

`reference` is the rounding as it was written before the fast paths (everything through
`Fraction`); each fast path must agree with it on every input.
"""

from __future__ import annotations

from decimal import Context, Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from billing.money import (
    MoneyError,
    RoundingMode,
    exact_product,
    round_quotient,
    round_to_places,
    to_fraction,
    to_minor,
)

_WIDE = Context(prec=200)
MODES: tuple[RoundingMode, ...] = ("half_up", "half_even")


def reference(value: Decimal | Fraction | int, places: int, mode: RoundingMode) -> Decimal:
    frac = to_fraction(value)
    scaled = frac * (10**places)
    sign = -1 if scaled < 0 else 1
    scaled = abs(scaled)
    whole, rest = divmod(scaled.numerator, scaled.denominator)
    twice = 2 * rest
    if twice > scaled.denominator or (twice == scaled.denominator and (mode == "half_up" or whole % 2 == 1)):
        whole += 1
    q = Decimal(sign * whole).scaleb(-places, context=_WIDE)
    return q.quantize(Decimal(1).scaleb(-places), context=_WIDE)


def same(a: Decimal, b: Decimal) -> bool:
    """Equal as values and as written (exponent and sign, so "-0.00" differs from "0.00")."""
    return a.as_tuple() == b.as_tuple()


decimals = st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("-1e16"),
                       max_value=Decimal("1e16"), places=None)
halves = st.builds(lambda n, places: Decimal(2 * n + 1).scaleb(-places - 1) * 5,
                   st.integers(-10**6, 10**6), st.integers(0, 4))
fractions = st.builds(Fraction, st.integers(-10**20, 10**20), st.integers(1, 10**9))


@given(value=st.one_of(decimals, halves), places=st.integers(0, 6), mode=st.sampled_from(MODES))
@example(value=Decimal("-0.001"), places=2, mode="half_up")
@example(value=Decimal("-0.005"), places=2, mode="half_even")
@example(value=Decimal("-0"), places=0, mode="half_up")
@example(value=Decimal("0.125"), places=2, mode="half_even")
@example(value=Decimal("-0.125"), places=2, mode="half_up")
@example(value=Decimal("1E+5"), places=2, mode="half_up")
@example(value=Decimal("1000000000000000000000000000.005"), places=2, mode="half_up")
def test_decimal_fast_path_equals_fraction_path(value: Decimal, places: int, mode: RoundingMode) -> None:
    assert same(round_to_places(value, places, mode), reference(value, places, mode))


@given(value=fractions, places=st.integers(0, 6), mode=st.sampled_from(MODES))
@example(value=Fraction(-1, 1000), places=2, mode="half_up")
@example(value=Fraction(5, 2), places=0, mode="half_even")
@example(value=Fraction(-5, 2), places=0, mode="half_even")
@example(value=Fraction(-7, 2), places=0, mode="half_up")
def test_fraction_fast_path_equals_fraction_path(value: Fraction, places: int, mode: RoundingMode) -> None:
    assert same(round_to_places(value, places, mode), reference(value, places, mode))


@given(value=st.integers(-10**18, 10**18), places=st.integers(0, 4), mode=st.sampled_from(MODES))
def test_integers_round_as_before(value: int, places: int, mode: RoundingMode) -> None:
    assert same(round_to_places(value, places, mode), reference(value, places, mode))


@pytest.mark.parametrize("value", [Decimal("1e195"), Decimal("-1.5e194"), Fraction(10**196, 3)])
def test_huge_values_take_the_exact_path(value: Decimal | Fraction) -> None:
    assert same(round_to_places(value, 2, "half_up"), reference(value, 2, "half_up"))


@given(numerator=st.integers(-10**30, 10**30), denominator=st.integers(1, 10**12), mode=st.sampled_from(MODES))
def test_round_quotient_is_round_to_zero_places(numerator: int, denominator: int, mode: RoundingMode) -> None:
    assert round_quotient(numerator, denominator, mode) == int(reference(Fraction(numerator, denominator), 0, mode))


@given(a=decimals, b=decimals)
def test_exact_product_is_exact(a: Decimal, b: Decimal) -> None:
    assert to_fraction(exact_product(a, b)) == to_fraction(a) * to_fraction(b)


def test_exact_product_falls_back_to_a_fraction_beyond_200_digits() -> None:
    a = Decimal("1." + "1" * 150)
    product = exact_product(a, a)
    assert isinstance(product, Fraction)
    assert product == to_fraction(a) ** 2


def reference_to_minor(amount: Decimal, places: int) -> int | None:
    scaled = amount.scaleb(places, context=_WIDE)
    return int(scaled) if scaled == scaled.to_integral_value(context=_WIDE) else None


@given(amount=st.one_of(decimals, halves), currency=st.sampled_from(["USD", "JPY", "KWD"]))
@example(amount=Decimal("-0.00"), currency="USD")
@example(amount=Decimal("1.230"), currency="USD")
@example(amount=Decimal("1E+3"), currency="JPY")
def test_to_minor_equals_the_scaled_path(amount: Decimal, currency: str) -> None:
    places = {"USD": 2, "JPY": 0, "KWD": 3}[currency]
    expected = reference_to_minor(amount, places)
    if expected is None:
        with pytest.raises(MoneyError):
            to_minor(amount, currency)
    else:
        assert to_minor(amount, currency) == expected
