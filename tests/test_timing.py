"""sparsecc.timing: the one call timer (wall clock on CPU here; CUDA events are exercised by the GPU benches)."""

import pytest
import torch

from sparsecc import timing


def test_median_of_timed_calls(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])   # three calls lasting 5, 1 and 3 seconds
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.median_seconds(lambda: calls.append(1), torch.device("cpu"), 3) == 3.0
    assert len(calls) == 3


def test_call_seconds_times_the_call(monkeypatch):
    """The elapsed time spans the call: the clock is read once before and once after it, around the call."""
    events = []
    clock = iter([2.0, 9.5])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: events.append("clock") or next(clock))
    assert timing.call_seconds(lambda: events.append("call"), torch.device("cpu")) == 7.5
    assert events == ["clock", "call", "clock"]


def test_call_seconds_measures_real_time():
    import time
    assert timing.call_seconds(lambda: time.sleep(0.02), torch.device("cpu")) >= 0.02


def test_repeats_below_one_are_refused():
    with pytest.raises(ValueError, match="repeats=0"):
        timing.median_seconds(lambda: None, torch.device("cpu"), 0)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two(monkeypatch):
    """Four calls lasting 5, 1, 3 and 2 seconds: the median is 2.5, not the upper middle value (3)."""
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0, 30.0, 32.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.median_seconds(lambda: None, torch.device("cpu"), 4) == 2.5
