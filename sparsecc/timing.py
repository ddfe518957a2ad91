"""Timing one call on a device: the one timer the cost model's calibration and the kernels' own searches share.

CUDA calls are timed with CUDA events on the current stream (the host does not
wait between the events, so launch gaps the device hides are not counted);
other devices with the wall clock.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def call_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA events on CUDA, synchronising after; wall clock else)."""
    if device.type == "cuda":
        with torch.cuda.device(device):   # the events go on that device's current stream
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The median of ``repeats`` timed calls of ``fn`` (:func:`call_seconds`; of an even count, the mean of the
    middle two); ValueError when repeats < 1."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed; expected an integer >= 1")
    return statistics.median(call_seconds(fn, device) for _ in range(repeats))
