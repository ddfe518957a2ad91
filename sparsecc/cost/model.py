"""Predictions and crossovers: evaluate the formulas for a site, or solve where sparse starts to pay.

``predict`` substitutes a site's sizes into the dense and sparse cost
formulas and times them with ``kernel_seconds``. ``crossover`` keeps one size
free (the sequence length, for a site compiled with dynamic shapes) and
searches the smallest value from which the sparse form is predicted to win by
the margin, timing each candidate with the same ``kernel_seconds``, so the
report can say "sparse when seq_k >= 3712" and the compiled op can branch on it
at run time (``dense_below``).
"""

from __future__ import annotations

from typing import Dict

import sympy as sp
import torch

from sparsecc.cost.estimate import Crossover, Estimate
from sparsecc.cost.formulas import ELEM, Cost, kernels_seconds
from sparsecc.cost.hardware import HardwareProfile

# Crossovers are searched over [1, 2**24]: 16M tokens is past any sequence we compile for.
CROSSOVER_SEARCH_MAX = 2 ** 24


def predict(dense: Cost, sparse: Cost, hw: HardwareProfile, dtype: torch.dtype,
            values: Dict[sp.Symbol, float], host: bool = True) -> Estimate:
    """Evaluate both costs with every symbol in ``values`` substituted (no crossover, no worst count).

    ``host`` False drops each kernel's per-call host floor on both sides (calls replayed from a CUDA graph).
    """
    values = {**values, ELEM: torch.tensor([], dtype=dtype).element_size()}
    dense_k, sparse_k = dense.kernels(values), sparse.kernels(values)
    return Estimate(sum(k["flops"] for k in dense_k), sum(k["flops"] for k in sparse_k),
                    sum(k["nbytes"] for k in dense_k), sum(k["nbytes"] for k in sparse_k),
                    kernels_seconds(dense_k, hw, dtype, host), kernels_seconds(sparse_k, hw, dtype, host))


def crossover(dense: Cost, sparse: Cost, hw: HardwareProfile, dtype: torch.dtype, values: Dict[sp.Symbol, float],
              symbol: sp.Symbol, margin: float, tied: tuple = (), host: bool = True) -> Crossover:
    """Smallest integer value of ``symbol`` from which ``sparse_time <= dense_time / margin``.

    ``values`` fixes the other symbols; symbols in ``tied`` take the same
    value as ``symbol`` (seq_q = seq_k in prefill). Both times come from the
    one kernel-time definition (``kernel_seconds``) at integer sizes, the same
    numbers ``predict`` gives there. They are monotone in the sequence length
    for every form here, so the search is a bisection on integers between a
    losing and a winning size. ``host`` as in :func:`predict`.
    """
    fixed = {**values, ELEM: torch.tensor([], dtype=dtype).element_size()}
    along = (symbol, *tied)
    dense_at, sparse_at = dense.kernels_along(fixed, along), sparse.kernels_along(fixed, along)

    def wins(v: int) -> bool:
        return kernels_seconds(sparse_at(v), hw, dtype, host) <= kernels_seconds(dense_at(v), hw, dtype, host) / margin

    if wins(1):
        return Crossover(symbol.name, 1)
    if not wins(CROSSOVER_SEARCH_MAX):
        return Crossover(symbol.name, None)
    lo, hi = 1, CROSSOVER_SEARCH_MAX   # wins(lo) is False, wins(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wins(mid):
            hi = mid
        else:
            lo = mid
    return Crossover(symbol.name, hi)
