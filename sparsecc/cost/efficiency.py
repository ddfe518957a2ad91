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

SIZE_CLASSES = ("small", "large")
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "efficiency.json")


@dataclass(frozen=True)
class Efficiency:
    """Fractions (0, 1] of peak compute and of memory bandwidth a kernel family reaches."""

    compute: float
    memory: float

    def __post_init__(self):
        for name in ("compute", "memory"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"efficiency {name}={value!r} is not in (0, 1]")


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """The whole efficiency table, with its provenance."""
    with open(TABLE_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def efficiency(family: str, size: str) -> Efficiency:
    """Efficiency of a kernel family ("attention_sparse", "gemm_dense", ...) in a size class."""
    families = table()["families"]
    if family not in families:
        raise KeyError(f"no efficiency for kernel family {family!r}; known: {sorted(families)}")
    if size not in SIZE_CLASSES:
        raise KeyError(f"size class {size!r} is not one of {SIZE_CLASSES}")
    return Efficiency(**families[family][size])


def provenance() -> dict:
    """Where the table's numbers come from."""
    return dict(table()["provenance"])
