"""Shared test setup: the fakes plugin and the hypothesis profiles.

Two profiles, chosen with the environment variable `DEVICEKIT_HYPOTHESIS_PROFILE`:

- `ci` (the default): each property's own `max_examples` (100 where it sets none), so that the
  whole suite runs in minutes on 2 cores; derandomised when `CI` is set, so a failure on CI
  reproduces anywhere.
- `soak`: at least `SOAK_EXAMPLES` examples for every property, its own `max_examples`
  included, random: `DEVICEKIT_HYPOTHESIS_PROFILE=soak pytest tests` runs for hours.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fakes"]

PROFILE_VARIABLE = "DEVICEKIT_HYPOTHESIS_PROFILE"
SOAK_EXAMPLES = 5000

# Machines are 2 cores and noisy: no deadlines.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=100,
    derandomize=bool(os.environ.get("CI")),
)
settings.register_profile(
    "soak",
    parent=settings.get_profile("ci"),
    max_examples=SOAK_EXAMPLES,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get(PROFILE_VARIABLE, "ci") or "ci"
if PROFILE not in ("ci", "soak"):
    raise pytest.UsageError(
        f"{PROFILE_VARIABLE}={PROFILE!r}: expected 'ci' (the default) or 'soak'."
    )
settings.load_profile(PROFILE)
collect_ignore = ["typing"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `soak`, raise every property's own `max_examples` to at least `SOAK_EXAMPLES`.

    A test's `@settings(max_examples=...)` wins over the loaded profile, so the profile alone
    would soak only the properties that set no count. Hypothesis keeps a test's settings in
    `_hypothesis_internal_use_settings` and reads them when the test runs.
    """
    if PROFILE != "soak":
        return
    for item in items:
        test = getattr(getattr(item, "obj", None), "__func__", getattr(item, "obj", None))
        own = getattr(test, "_hypothesis_internal_use_settings", None)
        if isinstance(own, settings) and own.max_examples < SOAK_EXAMPLES:
            test._hypothesis_internal_use_settings = settings(own, max_examples=SOAK_EXAMPLES)
