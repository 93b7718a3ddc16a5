"""Hypothesis profiles: `fast` (default, CI: the whole suite well under 10 minutes on 2 cores)
and `thorough` (release: HYPOTHESIS_PROFILE=thorough). Both derandomized, so CI is repeatable."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("fast", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))
