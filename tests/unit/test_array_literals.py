"""PostgreSQL array literals of `Bulk` (billing.persistence.repository): the text fast path that
escapes a whole column at once spells every column exactly as escaping each value alone does."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given
from hypothesis import strategies as st

from billing.persistence.repository import _array_literal


def one_by_one(values: Sequence[str | None]) -> str:
    """The literal as escaping each value alone spells it (the form before the fast path)."""
    return "{" + ",".join(["NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                           for v in values]) + "}"


def test_text_columns_are_quoted_and_escaped() -> None:
    assert _array_literal(("a", 'q"uo\\te, {x}', "", "NULL"), "text") == '{"a","q\\"uo\\\\te, {x}","","NULL"}'
    assert _array_literal(("a", None, "b"), "text") == '{"a",NULL,"b"}'
    assert _array_literal((), "text") == "{}"
    assert _array_literal(("",), "json") == '{""}'


def test_a_value_holding_a_nul_is_not_split_into_two() -> None:
    """NUL is the fast path's separator: a value holding one (which PostgreSQL refuses) keeps the
    column its length, for the driver to refuse as before."""
    assert _array_literal(("a\x00b", "c"), "text") == '{"a\x00b","c"}'
    assert _array_literal(("a\x00", "\x00b"), "text") == one_by_one(("a\x00", "\x00b"))


@given(st.lists(st.none() | st.text(alphabet=st.sampled_from('ab"\\,{} \x00\x01\né')), max_size=8))
def test_the_fast_path_spells_every_column_as_each_value_alone(values: list[str | None]) -> None:
    assert _array_literal(tuple(values), "text") == one_by_one(values)
