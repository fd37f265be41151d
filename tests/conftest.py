"""Hypothesis profiles: `ci` (the default, a few hundred examples per property) and `deep`
(`pytest --hypothesis-profile=deep`, ten times as many). Property tests size their example
counts with `propkit.examples(n)`, n being the `ci` count."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")
