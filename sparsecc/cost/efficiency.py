"""Achieved fraction of the hardware ceilings, per kernel family and size class.

The table lives in ``efficiency.json`` beside this file, with its provenance
(device, date, commit, how it was obtained). ``bench/costmodel.py`` refits it
from measured kernel times (``--write`` on the GPU, ``--refit-from`` offline).

One kernel's predicted time, defined once, on plain numbers (``kernel_seconds``:
``predict`` at a site's sizes, the crossover search along a symbolic length and
the refit all call it)::

    compute = FLOPs * (1 + tile_overhead / steps) / (peak * eff_compute(FLOPs) * occupancy)
    memory  = bytes / (bandwidth * memory * occupancy)
    t       = max(max(compute, memory) + fixed_s, floor_s) + launches * launch_overhead

``steps`` is the inner-loop trip count of one output tile (kept key blocks per
query block, kept weight blocks per block row); ``tile_overhead`` is the
tile's fixed work (operand prologue, softmax finalisation, output store) in
units of one step, so short rows run at a lower rate. ``occupancy`` is
``min(1, programs / SMs)`` for kernels that launch one program per output
tile; fewer programs than SMs leave part of the GPU idle. ``floor_s`` is the
host-side time per call (Python wrapper, argument checks, library planning):
a call never takes less in eager mode, and it disappears under CUDA-graph
replay. ``fixed_s`` is device time per call outside the streaming of bytes
and FLOPs: a kernel's dependent chain that no size hides (the decode
kernel's query load, partial store, ticket and merge, bench/RESULTS.md).
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

# Compute efficiency moves from compute_small to compute_large between these FLOP counts (log-linear),
# so predicted time never jumps at a size-class boundary.
SMALL_FLOPS, LARGE_FLOPS = 1e8, 1e10
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "efficiency.json")


@dataclass(frozen=True)
class Efficiency:
    """What a kernel family reaches: fractions (0, 1] of peak compute and bandwidth, a per-call host floor,
    the fixed per-tile work in inner-loop steps and a fixed device time per call (0: none modelled)."""

    compute_small: float
    compute_large: float
    memory: float
    floor_s: float = 0.0
    tile_overhead: float = 0.0
    fixed_s: float = 0.0

    def __post_init__(self):
        for name in ("compute_small", "compute_large", "memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"efficiency {name}={value!r} is not in (0, 1]")
        if self.floor_s < 0:
            raise ValueError(f"efficiency floor_s={self.floor_s!r} must be >= 0")
        if self.fixed_s < 0:
            raise ValueError(f"efficiency fixed_s={self.fixed_s!r} must be >= 0")
        if self.tile_overhead < 0:
            raise ValueError(f"efficiency tile_overhead={self.tile_overhead!r} must be >= 0")

    def compute(self, flops: float) -> float:
        """Compute efficiency at ``flops``: log-linear from ``compute_small`` at SMALL_FLOPS to ``compute_large``
        at LARGE_FLOPS, constant outside."""
        lo, hi = math.log10(SMALL_FLOPS), math.log10(LARGE_FLOPS)
        t = min(1.0, max(0.0, (math.log10(max(flops, 1.0)) - lo) / (hi - lo)))
        return self.compute_small + (self.compute_large - self.compute_small) * t


def kernel_seconds(eff: Efficiency, *, flops: float, nbytes: float, launches: int, peak: float, bandwidth: float,
                   launch_overhead_s: float, sm_count: int, steps: Optional[float] = None,
                   programs: Optional[float] = None, host: bool = True) -> float:
    """Predicted seconds of one kernel from plain numbers: the one definition of a kernel's time.

    ``host`` False drops the per-call floor (a call replayed from a CUDA graph).
    """
    occupancy = 1.0 if programs is None else min(1.0, programs / sm_count)
    stretch = 1.0 if steps is None or steps <= 0 else 1.0 + eff.tile_overhead / steps
    compute = flops * stretch / (peak * eff.compute(flops) * occupancy) if flops > 0 else 0.0
    memory = nbytes / (bandwidth * eff.memory * occupancy)
    return max(max(compute, memory) + eff.fixed_s, eff.floor_s if host else 0.0) + launches * launch_overhead_s


def side_seconds(kernels, eff_of, *, peak: float, bandwidth: float, launch_overhead_s: float, sm_count: int,
                 host: bool = True) -> float:
    """Predicted seconds of a list of kernels (``Cost.kernels`` dicts), ``eff_of(family)`` giving each one's table."""
    return sum(kernel_seconds(eff_of(k["family"]), flops=k["flops"], nbytes=k["nbytes"], launches=k["launches"],
                              peak=peak, bandwidth=bandwidth, launch_overhead_s=launch_overhead_s,
                              sm_count=sm_count, steps=k["steps"], programs=k["programs"], host=host)
               for k in kernels)


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The whole efficiency table, with its provenance."""
    with open(TABLE_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def efficiency(family: str) -> Efficiency:
    """Efficiency of a kernel family ("attention_sparse", "gemm_dense", ...)."""
    families = table()["families"]
    if family not in families:
        raise KeyError(f"no efficiency for kernel family {family!r} in {TABLE_PATH}; known: {sorted(families)}")
    return Efficiency(**families[family])


def provenance() -> dict:
    """Where the table's numbers come from."""
    return dict(table()["provenance"])
