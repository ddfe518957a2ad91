"""Decision-aware refit of the efficiency table from measured rows, with cross-validated metrics.

``bench/costmodel.py`` measures grid points on a GPU and turns every measured
row (its own grid, older grids, ``bench/crossover_*.json``) into a
``FitRow``: the site's dense and sparse kernels as plain numbers (FLOPs,
bytes, steps, programs, family; from the package's own cost formulas), the
measured times, and whether the call was timed eagerly (``host`` True: the
per-call floor applies) or replayed from a CUDA graph.

``fit`` searches the table (per family: compute_small, compute_large,
memory, floor_s, tile_overhead, fixed_s) by coordinate descent on multiplicative
steps, first on the accuracy terms alone, then minimising

    mean(min(|predicted - measured| / measured speedup, ERROR_CAP))
      + REGRET_WEIGHT * mean(chosen / best - 1)
      + WORST_WEIGHT * max(0, worst chosen / dense - WORST_LIMIT)
      + TIME_WEIGHT * mean(|log(predicted / measured)|) over every measured kernel time,

so a table that predicts speedups well but flips decisions at the wrong
places scores worse than one that decides right. The decision terms are
piecewise constant in the parameters, hence a derivative-free search.
``cross_validate`` refits with one group of shapes held out at a time and
scores the held-out rows, so published figures are not scored on the points
they were fitted on.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from sparsecc.cost.efficiency import Efficiency
from sparsecc.cost.efficiency import side_seconds as efficiency_side_seconds

# The decision rule the package applies (the spec's default margin).
MARGIN = 1.05
# Loss weights. A relative error is capped so that one wild point (a host hiccup) cannot dominate the mean.
ERROR_CAP = 2.0
# Regret of a wrong decision weighs 4x a relative error: a 10% slowdown chosen costs as much as a 40% miss.
REGRET_WEIGHT = 4.0
# The worst-case target: the chosen variant never more than 2% slower than dense.
WORST_LIMIT = 1.02
WORST_WEIGHT = 1.0
# Speedups do not fix the absolute time scale (dense and sparse rates could drift together), and the report shows
# seconds: every measured kernel time also enters, by its log error, at this weight.
TIME_WEIGHT = 0.25
# Search bounds: efficiencies are fractions of the ceilings; a floor above 2 ms or a per-tile overhead of
# more than 32 inner-loop steps would describe a broken kernel, not a slow one.
EFF_BOUNDS = (0.01, 1.0)
FLOOR_MAX_S = 2e-3
TILE_OVERHEAD_MAX = 32.0
# Multiplicative steps tried per parameter and sweep (coarse to fine), and values tried from zero.
STEPS = (0.25, 0.5, 0.7, 0.85, 0.95, 1.05, 1.18, 1.4, 2.0, 4.0)
# Floors from zero span host costs of a few microseconds (one launch) to a millisecond (cuSPARSELt planning).
FROM_ZERO = {"floor_s": (5e-6, 2e-5, 5e-5, 1e-4, 3e-4, 1e-3), "tile_overhead": (0.5, 1.0, 2.0, 4.0),
             "fixed_s": (1e-6, 3e-6, 1e-5, 3e-5)}
MAX_SWEEPS = 12
PARAMS = ("compute_small", "compute_large", "memory", "floor_s", "tile_overhead", "fixed_s")
# Fitted only where a refit names them (``free``): a full refit leaves them as they are. A fixed device time per call
# describes a kernel with a measured dependent chain (the decode kernel); freed for every family it bought small
# error reductions by moving other families' efficiencies (a full H100 refit moved gemm_block_sparse's memory share
# from 0.41 to 0.63 and gave gemm_dense 3 us).
NAMED_ONLY = ("fixed_s",)
# Where every fit starts, for every family: a generic kernel (30% -> 70% of peak, 70% of bandwidth, no floor, no
# per-tile overhead). A fixed start keeps refits reproducible, and keeps cross-validation honest: starting from
# the shipped table would carry the held-out rows' information into each fold (coordinate descent is local).
PRIOR = dict(compute_small=0.3, compute_large=0.7, memory=0.7, floor_s=0.0, tile_overhead=0.0, fixed_s=0.0)


def prior(families) -> Dict[str, dict]:
    """The starting table: ``PRIOR`` for each of ``families`` (names)."""
    return {fam: dict(PRIOR) for fam in families}


@dataclass
class Hardware:
    """The ceilings the refit divides by (a ``HardwareProfile``'s numbers for one dtype)."""

    peak: float
    bandwidth: float
    launch_overhead_s: float
    sm_count: int


@dataclass
class FitRow:
    """One measured point: dense and sparse kernels, times in seconds, the shape group it belongs to.

    ``dense_s`` None marks a time-only row (one kernel's time, e.g. a dynamic
    form's estimate pass): it enters the loss by its log error, not the
    decision metrics.
    """

    label: str
    group: str
    source: str
    dense: List[dict]
    sparse: List[dict]
    dense_s: Optional[float]
    sparse_s: float
    host: bool = True
    predicted: float = field(default=float("nan"))

    @property
    def measured(self) -> float:
        """Measured dense / sparse time."""
        return self.dense_s / self.sparse_s


def _eff(families: Dict[str, dict], family: str) -> Efficiency:
    return Efficiency(**families[family])


def side_seconds(kernels: Sequence[dict], families: Dict[str, dict], hw: Hardware, host: bool) -> float:
    """Predicted seconds of one side (a list of kernels) with the table ``families``."""
    return efficiency_side_seconds(kernels, lambda family: _eff(families, family), peak=hw.peak,
                                   bandwidth=hw.bandwidth, launch_overhead_s=hw.launch_overhead_s,
                                   sm_count=hw.sm_count, host=host)


def predict_times(rows: Sequence[FitRow], families: Dict[str, dict], hw: Hardware) -> List[tuple]:
    """Predicted (dense seconds or None, sparse seconds) per row."""
    return [(None if r.dense_s is None else side_seconds(r.dense, families, hw, r.host),
             side_seconds(r.sparse, families, hw, r.host)) for r in rows]


def predict_rows(rows: Sequence[FitRow], families: Dict[str, dict], hw: Hardware) -> List[float]:
    """Predicted speedup (dense / sparse) per row; for time-only rows, the predicted sparse seconds."""
    return [sparse if dense is None else dense / sparse for dense, sparse in predict_times(rows, families, hw)]


def metrics(rows: Sequence[FitRow], predicted: Sequence[float]) -> dict:
    """The issue's three figures (and the mean regret) over the speedup rows."""
    errors, regrets, within, worst, n = [], [], 0, 0.0, 0
    for r, p in zip(rows, predicted):
        if r.dense_s is None:
            continue
        n += 1
        errors.append(abs(p - r.measured) / r.measured)
        chosen = r.sparse_s if p >= MARGIN else r.dense_s
        best = min(r.sparse_s, r.dense_s)
        regrets.append(chosen / best - 1)
        within += chosen <= 1.05 * best
        worst = max(worst, chosen / r.dense_s)
    if not n:
        return dict(points=0)
    return dict(points=n, median_abs_error=statistics.median(errors), share_within_5pct=within / n,
                worst_vs_dense=worst, mean_regret=statistics.fmean(regrets))


def _time_error(rows: Sequence[FitRow], times: Sequence[tuple]) -> float:
    """Mean |log(predicted / measured)| over every measured kernel time (both sides of speedup rows too)."""
    errors = []
    for r, (dense, sparse) in zip(rows, times):
        errors.append(abs(math.log(sparse / r.sparse_s)))
        if r.dense_s is not None:
            errors.append(abs(math.log(dense / r.dense_s)))
    return statistics.fmean(errors) if errors else 0.0


def error_loss(rows: Sequence[FitRow], times: Sequence[tuple]) -> float:
    """The accuracy part of ``loss`` alone (the first stage of ``fit``)."""
    errors = [min(ERROR_CAP, abs(d / s - r.measured) / r.measured) for r, (d, s) in zip(rows, times) if r.dense_s]
    return (statistics.fmean(errors) if errors else 0.0) + TIME_WEIGHT * _time_error(rows, times)


def loss(rows: Sequence[FitRow], times: Sequence[tuple]) -> float:
    """The refit's objective (module docstring), from ``predict_times``."""
    regrets, worst = [], 1.0
    for r, (dense, sparse) in zip(rows, times):
        if r.dense_s is None:
            continue
        chosen = r.sparse_s if dense / sparse >= MARGIN else r.dense_s
        regrets.append(chosen / min(r.sparse_s, r.dense_s) - 1)
        worst = max(worst, chosen / r.dense_s)
    total = error_loss(rows, times)
    if regrets:
        total += REGRET_WEIGHT * statistics.fmean(regrets)
    return total + WORST_WEIGHT * max(0.0, worst - WORST_LIMIT)


def _clamp(name: str, value: float) -> float:
    if name in ("floor_s", "fixed_s"):
        return min(FLOOR_MAX_S, max(0.0, value))
    if name == "tile_overhead":
        return min(TILE_OVERHEAD_MAX, max(0.0, value))
    return min(EFF_BOUNDS[1], max(EFF_BOUNDS[0], value))


def _free_params(rows: Sequence[FitRow], families: Dict[str, dict], free: Optional[dict] = None) -> List[tuple]:
    """(family, parameter) pairs the rows can inform: tile_overhead only where kernels report steps. ``free``
    (family -> parameter names) restricts the search to those pairs; every other value stays as given."""
    used, with_steps = set(), set()
    for r in rows:
        for k in r.dense + r.sparse:
            used.add(k["family"])
            if k["steps"] is not None:
                with_steps.add(k["family"])
    pairs = []
    for fam in sorted(used):
        for name in PARAMS:
            if name == "tile_overhead" and fam not in with_steps:
                continue
            if free is not None and name not in free.get(fam, ()):
                continue
            if free is None and name in NAMED_ONLY:
                continue
            pairs.append((fam, name))
    return pairs


def dense_family_of(family: str) -> str:
    """The dense counterpart whose host floor bounds ``family``'s from below: SDPA at a decode step for the decode
    attention families, SDPA for the other attention families, cuBLAS for the rest."""
    if family.startswith("attention"):
        return "attention_dense_decode" if family.endswith("_decode") else "attention_dense"
    return "gemm_dense"


def _floors_ordered(families: Dict[str, dict]) -> bool:
    """True when no sparse family's floor is below its dense counterpart's.

    A sparse op is a custom op around Triton launches, so an eager call of it
    costs at least the host time of the aten call it replaces. Without this
    bound the fit may explain slow small calls by low efficiencies and a zero
    floor, which extrapolates to sparse wins below the measured sizes (a
    streaming site "faster" than SDPA at 64 tokens).
    """
    for fam, entry in families.items():
        dense_name = dense_family_of(fam)
        dense = families.get(dense_name)
        if dense is not None and fam != dense_name and entry["floor_s"] < dense["floor_s"]:
            return False
    return True


def _descend(rows, families, hw, pairs, objective, max_sweeps: int) -> None:
    """Coordinate descent on ``objective`` over ``pairs``, in place."""
    best = objective(rows, predict_times(rows, families, hw))
    for _ in range(max_sweeps):
        improved = False
        for fam, name in pairs:
            entry = families[fam]
            current = entry[name]
            candidates = [current * s for s in STEPS] if current > 0 else list(FROM_ZERO.get(name, ()))
            if name in FROM_ZERO and current > 0:
                candidates.append(0.0)
            for value in candidates:
                value = _clamp(name, value)
                if value == entry[name]:
                    continue
                old = entry[name]
                entry[name] = value
                if entry["compute_small"] > entry["compute_large"] or \
                        (name == "floor_s" and not _floors_ordered(families)):
                    entry[name] = old   # compute efficiency never falls with size; floors stay ordered
                    continue
                trial = objective(rows, predict_times(rows, families, hw))
                if trial < best - 1e-12:
                    best, improved = trial, True
                else:
                    entry[name] = old
        if not improved:
            break


def fit(rows: Sequence[FitRow], start: Dict[str, dict], hw: Hardware, max_sweeps: int = MAX_SWEEPS,
        free: Optional[dict] = None) -> dict:
    """Fit the table to ``rows`` from ``start`` (a ``families`` mapping); returns the fitted ``families``.

    Two stages of coordinate descent: first on the accuracy terms alone (a
    smoother landscape that moves every family near its measured rates), then
    on the full decision-aware ``loss`` from there. ``free`` (family ->
    parameter names) fits only those parameters (a partial refit: new rows of
    one kernel, the rest of the table as shipped); None frees every parameter
    the rows inform.
    """
    families = copy.deepcopy(start)
    for entry in families.values():
        entry.setdefault("floor_s", 0.0)
        entry.setdefault("tile_overhead", 0.0)
        entry.setdefault("fixed_s", 0.0)
    pairs = _free_params(rows, families, free)
    _descend(rows, families, hw, pairs, error_loss, max_sweeps)
    _descend(rows, families, hw, pairs, loss, max_sweeps)
    for entry in families.values():
        for name in PARAMS:
            entry[name] = float(f"{entry[name]:.4g}")
    return families


def cross_validate(rows: Sequence[FitRow], start: Dict[str, dict], hw: Hardware, folds: int = 8,
                   max_sweeps: int = MAX_SWEEPS, free: Optional[dict] = None) -> List[float]:
    """Out-of-fold predictions: shape groups dealt round-robin into ``folds`` folds, each predicted by a table
    fitted on the other folds (``free`` as in :func:`fit`)."""
    groups = sorted({r.group for r in rows})
    fold_of = {g: i % folds for i, g in enumerate(groups)}
    predicted = [float("nan")] * len(rows)
    for f in range(folds):
        train = [r for r in rows if fold_of[r.group] != f]
        test = [i for i, r in enumerate(rows) if fold_of[r.group] == f]
        if not test:
            continue
        fitted = fit(train, start, hw, max_sweeps, free)
        for i, p in zip(test, predict_rows([rows[i] for i in test], fitted, hw)):
            predicted[i] = p
    return predicted
