"""How many examples a property runs under the loaded hypothesis profile (tests/conftest.py)."""

from __future__ import annotations

from hypothesis import settings


def examples(ci_count: int) -> int:
    """`ci_count` under the `ci` profile, ten times that under `deep`."""
    return max(1, ci_count * settings.default.max_examples // 100)
