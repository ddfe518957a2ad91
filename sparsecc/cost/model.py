"""Predictions and crossovers: evaluate the formulas for a site, or solve where sparse starts to pay.

``predict`` substitutes a site's sizes into the dense and sparse cost
formulas. ``crossover`` keeps one size symbolic (the sequence length, for a
site compiled with dynamic shapes) and finds the smallest value from which
the sparse form is predicted to win by the margin, so the report can say
"sparse when seq_k >= 3712" and the compiled op can branch on it at run time.
"""

from __future__ import annotations

from typing import Dict

import sympy as sp
import torch

from sparsecc.cost.estimate import Crossover, Estimate
from sparsecc.cost.formulas import ELEM, Cost
from sparsecc.cost.hardware import HardwareProfile

# Crossovers are searched over [1, 2**24]: 16M tokens is past any sequence we compile for.
CROSSOVER_SEARCH_MAX = 2 ** 24


def _subs(expr, values: Dict[sp.Symbol, float]):
    return expr.subs(values) if hasattr(expr, "subs") else expr


def predict(dense: Cost, sparse: Cost, hw: HardwareProfile, dtype: torch.dtype,
            values: Dict[sp.Symbol, float]) -> Estimate:
    """Evaluate both costs with every symbol in ``values`` substituted (no crossover, no worst count)."""
    values = {**values, ELEM: torch.tensor([], dtype=dtype).element_size()}
    numbers = [float(_subs(e, values)) for e in (dense.total_flops, sparse.total_flops, dense.total_bytes,
                                                 sparse.total_bytes)]
    return Estimate(*numbers, dense.seconds(hw, dtype, values), sparse.seconds(hw, dtype, values))


def crossover(dense: Cost, sparse: Cost, hw: HardwareProfile, dtype: torch.dtype, values: Dict[sp.Symbol, float],
              symbol: sp.Symbol, margin: float, tied: tuple = ()) -> Crossover:
    """Smallest integer value of ``symbol`` from which ``sparse_time <= dense_time / margin``.

    ``values`` fixes the other symbols; symbols in ``tied`` take the same
    value as ``symbol`` (seq_q = seq_k in prefill). The predicted times are
    monotone in the sequence length for every form here, so the search is a
    bisection on integers; the result is checked at the bracketing points.
    """
    fixed = {**values, ELEM: torch.tensor([], dtype=dtype).element_size()}
    fixed = {k: v for k, v in fixed.items() if k != symbol and k not in tied}
    x = sp.Symbol(symbol.name, positive=True, integer=True)
    subs = {symbol: x, **{t: x for t in tied}}
    gap = (dense.time(hw, dtype) / margin - sparse.time(hw, dtype)).subs(fixed).subs(subs)
    fn = sp.lambdify(x, gap, modules=["math", {"ceiling": _ceil, "Max": max, "Min": min}])

    def wins(v: int) -> bool:
        return fn(v) >= 0

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


def _ceil(value) -> int:
    import math
    return math.ceil(value)
