from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.fakes"]

# Machines are 2 cores and noisy: no deadlines. CI runs derandomised so a failure reproduces.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile("ci", parent=settings.get_profile("default"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
collect_ignore = ["typing"]
