"""Achieved fraction of the hardware ceilings, per kernel family and size class.

The table lives in ``efficiency.json`` beside this file, with its provenance
(device, date, how it was obtained). ``bench/costmodel.py`` refits it from
measured kernel times.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import sympy as sp

# Compute efficiency moves from compute_small to compute_large between these FLOP counts (log-linear),
# so predicted time never jumps at a size-class boundary.
SMALL_FLOPS, LARGE_FLOPS = 1e8, 1e10
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "efficiency.json")


@dataclass(frozen=True)
class Efficiency:
    """What a kernel family reaches: fractions (0, 1] of peak compute and bandwidth, and a per-call floor."""

    compute_small: float
    compute_large: float
    memory: float
    floor_s: float = 0.0

    def __post_init__(self):
        for name in ("compute_small", "compute_large", "memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"efficiency {name}={value!r} is not in (0, 1]")
        if self.floor_s < 0:
            raise ValueError(f"efficiency floor_s={self.floor_s!r} must be >= 0")

    def compute(self, flops) -> sp.Expr:
        """Compute efficiency at ``flops`` (a number or sympy expression)."""
        lo, hi = sp.log(SMALL_FLOPS, 10), sp.log(LARGE_FLOPS, 10)
        t = sp.Min(1, sp.Max(0, (sp.log(flops, 10) - lo) / (hi - lo)))
        return self.compute_small + (self.compute_large - self.compute_small) * t


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The whole efficiency table, with its provenance."""
    with open(TABLE_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def efficiency(family: str) -> Efficiency:
    """Efficiency of a kernel family ("attention_sparse", "gemm_dense", ...)."""
    families = table()["families"]
    if family not in families:
        raise KeyError(f"no efficiency for kernel family {family!r}; known: {sorted(families)}")
    return Efficiency(**families[family])


def provenance() -> dict:
    """Where the table's numbers come from."""
    return dict(table()["provenance"])
