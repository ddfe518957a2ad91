"""Hypothesis budgets per test: a count for the ci profile, and the deep profile's multiple of it.

``tests/conftest.py`` loads the profile before any test module is imported, so :data:`DEEP` reads the one in force.
Tests whose every example is slow (the oracle's compiled models, the kernels under the Triton interpreter) set a
small ci count here instead of taking the profile's own: ci then stays within the suite's few minutes, and deep
still raises them, by :data:`DEEP_FACTOR`.
"""

from hypothesis import settings

DEEP = settings.default.max_examples >= 1000
"""True under the deep profile (``HYPOTHESIS_PROFILE=deep``)."""

DEEP_FACTOR = 20
"""How many times its ci count a test runs under the deep profile."""


def examples(ci: int) -> settings:
    """Per-test budget: ``ci`` examples under the ci profile (at most the profile's own count), ``ci`` times
    :data:`DEEP_FACTOR` under deep."""
    n = ci * DEEP_FACTOR if DEEP else min(ci, settings.default.max_examples)
    return settings(max_examples=max(1, n), deadline=None)
