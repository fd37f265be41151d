"""The monthly measures' difference arrays (billing.month_measures): a customer's contribution to
every measure month by month, and the entries that add up to it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from propkit import examples

from billing.month_measures import (
    Conversion,
    MonthRow,
    change,
    contribution,
    differences,
    period_contribution,
)
from billing.scenario import Settings

JAN = 2026 * 12
USD = Conversion(Settings())
EUR = Conversion(Settings.model_validate({"fx_rates": [
    {"currency": "EUR", "rate": "1.10", "from": "2026-01-01"},
    {"currency": "EUR", "rate": "1.20", "from": "2026-03-15"},
]}))


def accumulated(entries: dict[tuple[str, int], int], measure: str, month: int) -> int:
    return sum(v for (name, m), v in entries.items() if name == measure and m <= month)


def test_a_customer_who_starts_grows_and_churns() -> None:
    """$100 from January, $150 from March (an expansion), gone in May."""
    rows = [MonthRow(JAN, 0, 10000), MonthRow(JAN + 2, 10000, 15000, expansions=1),
            MonthRow(JAN + 4, 15000, 0, lost=15000)]
    entries = differences(rows, "USD", JAN, USD)
    table = {m - JAN: {k: accumulated(entries, k, m) for k in ("starting", "ending", "a_end", "a_min", "accounts",
                                                                "activated", "lost_a", "payers_end")}
             for m in range(JAN, JAN + 6)}
    assert table[0] == {"starting": 0, "ending": 10000, "a_end": 0, "a_min": 0, "accounts": 0, "activated": 0,
                        "lost_a": 0, "payers_end": 1}
    assert table[1] == {"starting": 10000, "ending": 10000, "a_end": 10000, "a_min": 10000, "accounts": 0,
                        "activated": 0, "lost_a": 0, "payers_end": 1}
    assert table[2] == {"starting": 10000, "ending": 15000, "a_end": 15000, "a_min": 10000, "accounts": 1,
                        "activated": 1, "lost_a": 0, "payers_end": 1}
    assert table[4] == {"starting": 15000, "ending": 0, "a_end": 0, "a_min": 0, "accounts": 0, "activated": 0,
                        "lost_a": 15000, "payers_end": 0}
    assert table[5]["starting"] == 0
    # twelve months on, the customer counts in the trailing-twelve-month base from January's end
    assert accumulated(entries, "ttm_h:USD", JAN + 12) == 10000
    assert accumulated(entries, "ttm_f:USD", JAN + 12) == 0  # churned by then


def test_quarters_take_their_start_and_end_and_count_what_moved_inside() -> None:
    rows = [MonthRow(JAN, 0, 10000), MonthRow(JAN + 2, 10000, 15000, expansions=1),
            MonthRow(JAN + 4, 15000, 12000, lost=3000)]
    entries = differences(rows, "USD", JAN, USD)
    q1, q2 = JAN // 3, JAN // 3 + 1
    assert {k: accumulated(entries, f"quarter:{k}", q1 * 3) for k in ("starting", "ending", "accounts")} == {
        "starting": 0, "ending": 15000, "accounts": 1}
    assert {k: accumulated(entries, f"quarter:{k}", q2 * 3) for k in ("starting", "ending", "a_min", "lost_a",
                                                                      "accounts")} == {
        "starting": 15000, "ending": 12000, "a_min": 12000, "lost_a": 3000, "accounts": 0}
    assert accumulated(entries, "year:ending", JAN) == 12000


def test_conversions_follow_the_rates_each_month_at_its_first_and_last_instant() -> None:
    rows = [MonthRow(JAN, 0, 9999)]
    entries = differences(rows, "EUR", JAN, EUR)
    # January ends at 1.10; March starts at 1.10 and ends at 1.20 (the rate from the 15th)
    assert [accumulated(entries, "ending", JAN + k) for k in range(4)] == [10999, 10999, 11999, 11999]
    assert [accumulated(entries, "starting", JAN + k) for k in range(1, 5)] == [10999, 10999, 11999, 11999]
    assert contribution(rows, "EUR", JAN + 2, EUR)["a_min"] == 10999


@settings(max_examples=examples(200))
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(-5000, 5000)), min_size=1, max_size=12),
       st.integers(0, 30))
def test_the_difference_arrays_add_up_to_the_contributions(changes: list[tuple[int, int]], since: int) -> None:
    """Random histories: the entries from any month on, accumulated, give the contribution of
    every later month, and `change` between two histories is the difference of their entries."""
    rows: list[MonthRow] = []
    level = 0
    for offset, delta in sorted(changes):
        month = JAN + offset
        delta = max(delta, -level)
        if rows and rows[-1].month == month:
            rows[-1] = MonthRow(month, rows[-1].mrr_start, level + delta)
        else:
            rows.append(MonthRow(month, level, level + delta, expansions=int(delta > 0)))
        level += delta
    full = differences(rows, "EUR", JAN - 1, EUR)
    for month in range(JAN - 1, JAN + 45):
        expected = contribution(rows, "EUR", month, EUR)
        assert {k: accumulated(full, k, month) for k in expected} == expected
    for period, k in (("quarter", 3), ("year", 12)):
        for p in range((JAN - 1) // k, (JAN + 45) // k):
            expected = period_contribution(rows, "EUR", p, k, EUR)
            assert {key: accumulated(full, f"{period}:{key}", p * k) for key in expected} == expected
    start = JAN + since
    tail = differences(rows, "EUR", start, EUR)  # from `start` on only
    for month in range(start, JAN + 45):
        expected = contribution(rows, "EUR", month, EUR)
        assert {k: accumulated(tail, k, month) for k in expected} == expected
    for p in range(start // 3, (JAN + 45) // 3):
        expected = period_contribution(rows, "EUR", p, 3, EUR)
        assert {key: accumulated(tail, f"quarter:{key}", p * 3) for key in expected} == expected
    grown = [*rows[:-1], MonthRow(rows[-1].month, rows[-1].mrr_start, rows[-1].mrr_end + 700)]
    moved = change(rows, grown, "EUR", rows[-1].month, EUR)
    for month in range(rows[-1].month, JAN + 45):
        for measure, value in contribution(grown, "EUR", month, EUR).items():
            assert accumulated(full, measure, month) + accumulated(moved, measure, month) == value


def _history(moves: list[tuple[int, int, int]], level: int) -> list[MonthRow]:
    rows: list[MonthRow] = []
    for offset, delta, expansions in moves:
        delta = max(delta, -level)
        rows.append(MonthRow(JAN + offset, level, level + delta, expansions, max(-delta, 0)))
        level += delta
    return rows


# the write path's conversion (an amount without a rate counts 0), rates changing mid-month, at a
# quarter's start and a year later
_LOOSE = Conversion(Settings.model_validate({"fx_rates": [
    {"currency": "EUR", "rate": "1.10", "from": "2026-01-01"},
    {"currency": "EUR", "rate": "1.20", "from": "2026-03-15"},
    {"currency": "EUR", "rate": "1.05", "from": "2026-10-01"},
    {"currency": "EUR", "rate": "1.15", "from": "2027-02-10"},
]}), strict=False)
_MOVES = st.lists(st.tuples(st.integers(-14, 40), st.integers(-5000, 9000), st.integers(0, 2)), max_size=8,
                  unique_by=lambda move: move[0]).map(sorted)


@settings(max_examples=examples(300))
@given(_MOVES, _MOVES, st.integers(-14, 40), st.sampled_from(["USD", "EUR"]), st.sampled_from([0, 0, 4000]),
       st.none() | st.tuples(st.integers(-30, 0), st.integers(0, 9000)))
def test_a_change_is_the_new_entries_less_the_old_in_their_order(
        old_moves: list[tuple[int, int, int]], new_moves: list[tuple[int, int, int]], since: int, currency: str,
        before: int, first: tuple[int, int] | None) -> None:
    """`change` walks both histories at once and skips the quarters and years that read as the
    one before (every row before them, same rates): it must give exactly `differences(new) −
    differences(old)` without zeros, in that order (new entries, then those only the old has),
    for histories that share their rows before `since`, start from nothing or from a level, and
    measure the same cohort or not."""
    old = _history(old_moves, before)
    kept = [row for row in old if row.month < JAN + since]
    level = kept[-1].mrr_end if kept else before
    new = [*kept, *_history([m for m in new_moves if m[0] >= since], level)]
    first_row = None if first is None else MonthRow(JAN + first[0], 0, first[1])
    conversion = _LOOSE
    expected = differences(new, currency, JAN + since, conversion, before, first_row)
    for key, value in differences(old, currency, JAN + since, conversion, before, first_row).items():
        expected[key] = expected.get(key, 0) - value
    got = change(old, new, currency, JAN + since, conversion, before, first_row)
    assert list(got.items()) == [(key, value) for key, value in expected.items() if value]
