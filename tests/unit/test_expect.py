"""`billing.expect.compare`: the rules of a scenario's expect block, one row per rule."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from billing.expect import check, compare

OUTPUT: dict[str, Any] = {
    "invoices": [
        {
            "number": "INV-0001",
            "customer": "acme",
            "status": "paid",
            "issued_at": "2026-02-01T00:00:00Z",
            "lines": [
                {"kind": "plan", "quantity": 25, "unit_amount": "0.0015", "amount": "1250.00",
                 "subscription": "s1", "period_start": "2026-02-01T00:00:00Z"},
                {"kind": "discount", "quantity": None, "unit_amount": None, "amount": "-10.00",
                 "subscription": None, "period_start": None},
            ],
            "total": "1240.00",
        },
        {"number": "INV-0002", "currency": "JPY", "total": "1500"},
    ],
    "movements": [{"id": 1, "type": "new", "subtype": None, "delta": "1500.00",
                   "invoice_lines": [{"invoice": "INV-0001", "line": 0}]}],
    "metrics": {"month": [{"period": "2026-01", "nrr": "104.50", "quick_ratio": None,
                           "expansion_accounts": 2}]},
}


@pytest.mark.parametrize(
    ("expect", "differences"),
    [
        # amounts are decimals, rounded to the places of the output
        ({"invoices": [{"total": "1240"}, {"total": "1500.00"}]}, []),
        ({"invoices": [{"total": "1240.004"}, {"total": "1500.4"}]}, []),
        ({"invoices": [{"total": "1240.01"}, {}]}, ["invoices[0].total: expected 1240.01, got 1240.00"]),
        ({"invoices": [{"total": "10.00"}, {}]}, ["invoices[0].total: expected 10.00, got 1240.00"]),
        ({"invoices": [{"total": Decimal("1240.0")}, {}]}, []),
        # unit prices finer than the minor unit still compare exactly
        ({"invoices": [{"lines": [{"unit_amount": "0.00150"}, {}]}, {}]}, []),
        ({"invoices": [{"lines": [{"unit_amount": "0.002"}, {}]}, {}]},
         ["invoices[0].lines[0].unit_amount: expected 0.002, got 0.0015"]),
        # quantities are exact numbers
        ({"invoices": [{"lines": [{"quantity": "25.0"}, {}]}, {}]}, []),
        ({"invoices": [{"lines": [{"quantity": 24}, {}]}, {}]}, ["invoices[0].lines[0].quantity: expected 24, got 25"]),
        # rates to 2 decimals
        ({"metrics": {"month": [{"nrr": "104.5"}]}}, []),
        ({"metrics": {"month": [{"nrr": "104.499"}]}}, []),
        ({"metrics": {"month": [{"nrr": "104.4"}]}}, ["metrics.month[0].nrr: expected 104.4, got 104.50"]),
        ({"metrics": {"month": [{"expansion_accounts": 2, "period": "2026-01"}]}}, []),
        # null matches only null
        ({"metrics": {"month": [{"quick_ratio": None}]}}, []),
        ({"metrics": {"month": [{"quick_ratio": "0.00"}]}}, ["metrics.month[0].quick_ratio: expected 0.00, got null"]),
        ({"invoices": [{"lines": [{}, {"quantity": 0}]}, {}]}, ["invoices[0].lines[1].quantity: expected 0, got null"]),
        ({"movements": [{"subtype": None}]}, []),
        # times are instants
        ({"invoices": [{"issued_at": "2026-02-01"}, {}]}, []),
        ({"invoices": [{"issued_at": "2026-02-01T01:00:00+01:00"}, {}]}, []),
        ({"invoices": [{"lines": [{"period_start": "2026-02-01T00:00:00.000Z"}, {}]}, {}]}, []),
        ({"invoices": [{"issued_at": "2026-02-02"}, {}]},
         ["invoices[0].issued_at: expected 2026-02-02, got 2026-02-01T00:00:00Z"]),
        # identifiers are exact strings
        ({"invoices": [{"number": "INV-0001", "customer": "acme", "status": "paid"}, {}]}, []),
        ({"invoices": [{"number": "INV-1"}, {}]}, ["invoices[0].number: expected INV-1, got INV-0001"]),
        ({"movements": [{"type": "expansion"}]}, ["movements[0].type: expected expansion, got new"]),
        ({"movements": [{"invoice_lines": [{"invoice": "INV-0001", "line": 0}]}]}, []),
        # lists by position: any leading subset; a missing item is a difference; [] means none
        ({"invoices": [{}]}, []),
        ({"invoices": [{}, {}, {"total": "1"}]}, ["invoices: expected at least 3 items, got 2"]),
        ({"movements": [{"invoice_lines": []}]}, ["movements[0].invoice_lines: expected no items, got 1"]),
        # dicts by the keys present in expect; an unknown key is a difference
        ({"invoices": [{"totl": "1240.00"}, {}]}, ["invoices[0].totl: expected 1240.00, got nothing"]),
        ({"metrics": {"week": []}}, ["metrics.week: expected [], got nothing"]),
        ({"invoices": [{"lines": {"amount": "1"}}, {}]},
         ['invoices[0].lines: expected {"amount": "1"}, got [{"kind": "plan", "quantity": 25, "unit_amount": '
          '"0.0015", "amount": "1250.00", "subscription": "s1", "period_start": "2026-02-01T00:00:00Z"}, '
          '{"kind": "discount", "quantity": null, "unit_amount": null, "amount": "-10.00", "subscription": '
          'null, "period_start": null}]']),
        ({}, []),
    ],
)
def test_compare(expect: dict[str, Any], differences: list[str]) -> None:
    assert compare(expect, OUTPUT) == differences


def test_a_string_never_equals_a_number_or_a_bool() -> None:
    assert compare({"a": "abc"}, {"a": 1}) == ["a: expected abc, got 1"]
    assert compare({"a": True}, {"a": 1}) == ["a: expected true, got 1"]
    assert compare({"a": 1}, {"a": True}) == ["a: expected 1, got true"]
    assert compare({"a": False}, {"a": False}) == []


def test_checks_are_counted() -> None:
    report = check({"invoices": [{"total": "1240", "lines": [{}, {"amount": "-10"}]}, {}]}, OUTPUT)
    assert report.ok
    # invoices length, total, lines length, one amount
    assert report.checks == 4
