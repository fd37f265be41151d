"""Compare a scenario's `expect` block with a replay's output (SCENARIOS.md, "Expectations").

The rules, applied recursively from the top of the `expect` block:
- A dict is compared on the keys present in `expect` only; a key the output lacks is a difference
  (so a misspelt key never passes silently).
- A list is compared position by position (invoices, movements, metric periods, lines, links)
  over the positions `expect` lists: `expect` holds any subset of the output, so items after
  the last one listed are not compared, while an expected item the output lacks is a difference;
  an empty list in `expect` means "none".
  Write `{}` at a position you do not care about.
- `null` matches only `null`.
- Amounts compare as decimals after rounding the expected value to the places of the output
  (the currency's minor unit; 2 for rates): "1500" equals "1500.00", "104.5" equals "104.50".
- Times compare as instants: "2026-02-01" equals "2026-02-01T00:00:00Z" and "…+01:00" forms.
- Identifiers (numbers of invoices, customers, codes, types, periods) compare as exact strings.

Each compared field and each list length is one check. A difference reads
`invoices[0].total: expected 10.00, got 12.00`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from billing.money import round_to_places
from billing.scenario import parse_instant

EXACT_KEYS = frozenset(
    {
        "number",
        "invoice",
        "customer",
        "subscription",
        "description",
        "currency",
        "reporting_currency",
        "status",
        "kind",
        "type",
        "subtype",
        "period",
        "cause",
        "name",
    }
)

_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


MISSING: Any = _Missing()


@dataclass
class Report:
    """The differences found and how many checks were made."""

    differences: list[str] = field(default_factory=list)
    checks: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences


def check(expected: Any, actual: Any) -> Report:
    """Compare `expected` (an `expect` block) with `actual` (the replay output as JSON data)."""
    report = Report()
    _walk("", expected, actual, None, report)
    return report


def compare(expected: Any, actual: Any) -> list[str]:
    """The differences between an `expect` block and the replay output; empty when they match."""
    return check(expected, actual).differences


def _walk(path: str, exp: Any, act: Any, key: str | None, report: Report) -> None:
    if isinstance(exp, dict):
        if not isinstance(act, dict):
            report.checks += 1
            report.differences.append(_difference(path, exp, act))
            return
        for name, value in exp.items():
            sub = f"{path}.{name}" if path else str(name)
            if name not in act:
                report.checks += 1
                report.differences.append(_difference(sub, value, MISSING))
                continue
            _walk(sub, value, act[name], str(name), report)
        return
    if isinstance(exp, list):
        report.checks += 1
        if not isinstance(act, list):
            report.differences.append(_difference(path, exp, act))
            return
        if len(act) < len(exp) or (not exp and act):
            wanted = "no items" if not exp else f"at least {len(exp)} items"
            report.differences.append(f"{path or 'output'}: expected {wanted}, got {len(act)}")
        for index, (e, a) in enumerate(zip(exp, act, strict=False)):
            _walk(f"{path}[{index}]", e, a, key, report)
        return
    report.checks += 1
    if not leaf_equal(exp, act, key):
        report.differences.append(_difference(path, exp, act))


def leaf_equal(exp: Any, act: Any, key: str | None = None) -> bool:
    """Whether one expected value matches one output value (see the module rules)."""
    if exp is None or act is None or act is MISSING:
        return exp is None and act is None
    if isinstance(exp, bool) or isinstance(act, bool):
        return isinstance(exp, bool) and isinstance(act, bool) and exp == act
    if isinstance(act, (dict, list)):
        return False
    if key in EXACT_KEYS:
        return _text(exp) == _text(act)
    exp_num, act_num = _decimal(exp), _decimal(act)
    if exp_num is not None and act_num is not None:
        if isinstance(act, str):
            places = max(0, -int(act_num.as_tuple().exponent))
            if -int(exp_num.as_tuple().exponent) > places:
                exp_num = round_to_places(exp_num, places, "half_up")
        return exp_num == act_num
    exp_time, act_time = _instant(exp), _instant(act)
    if exp_time is not None and act_time is not None:
        return exp_time == act_time
    return _text(exp) == _text(act) and type(exp) is type(act)


def _decimal(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, Decimal):
        return value if value.is_finite() else None
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str) and _DECIMAL.match(value.strip()):
        try:
            return Decimal(value.strip())
        except InvalidOperation:  # pragma: no cover - the pattern only admits valid decimals
            return None
    return None


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return parse_instant(value)
    except ValueError:
        return None


def _text(value: Any) -> str:
    if value is MISSING:
        return "nothing"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str, separators=(", ", ": "))
    return str(value)


def _difference(path: str, exp: Any, act: Any) -> str:
    return f"{path or 'output'}: expected {_text(exp)}, got {_text(act)}"
