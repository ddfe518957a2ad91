"""Shared test setup: hypothesis profiles, a clean Dynamo cache per test, and the gpu marker."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# ci: bounded, so the whole suite runs in minutes; deep: thousands of cases, on demand
# (HYPOTHESIS_PROFILE=deep pytest).
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The tests check what kernels compute, not how fast: every autotuner keeps its first config, so the GPU suite
# compiles one kernel per shape instead of timing every candidate (set SPARSECC_AUTOTUNE=all to tune anyway).
os.environ.setdefault("SPARSECC_AUTOTUNE", "first")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile limits carried over."""
    torch._dynamo.reset()
    from sparsecc.backend import reset_reports
    reset_reports()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _launch_guard():
    """In the interpreter children (tests/interpreter.py), every launch is checked by tests/launch_guard.py."""
    from tests.interpreter import CHILD

    if not CHILD:
        yield
        return
    from tests.launch_guard import guard_launches

    with guard_launches():
        yield


@pytest.fixture
def eager_lowering(monkeypatch):
    """Run rewritten graphs without Inductor (fast numeric checks of rewrites)."""
    monkeypatch.setenv("SPARSECC_LOWERING", "eager")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
