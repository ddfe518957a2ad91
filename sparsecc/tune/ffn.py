"""FFN thresholds by greedy allocation: raise sparsity where the model output suffers least.

Every projection p (the ``input`` or ``down`` threshold of one FFN site) has a
sparsity level s_p, turned into tau_p by the s_p-quantile of its scores on the
dense calibration run. The average sparsity is weighted by the weights each
threshold can skip: ``S = sum_p w_p s_p / sum_p w_p``. Starting from all zero,
each step raises one s_p by ``step``; the chosen p minimises the measured
increase of the output error per unit of S gained,
``(E(s + step e_p) - E(s)) / (w_p step / sum w)``, where E is the error of the
whole model's output on the search batches with every current threshold
applied. Steps stop at the target (the last one is cut to hit it exactly).

Measuring every candidate at every step costs one forward per candidate, so the
search is lazy: a candidate's last measured increase is kept, the best one is
re-measured under the current levels and accepted if it is still no worse than
every other candidate's last measurement; otherwise its new value is stored and
the next-best is tried. Every ``refresh_every`` accepted steps all candidates
are re-measured, so a stale value cannot hide a candidate for long.

The separable allocation (:func:`separable_allocation`) needs no search: it
takes a :class:`Sensitivity` table (each projection's error alone, per level)
and minimises the summed errors at the target, the optimum when errors add up.
On a model whose projections cost about the same it shows how little any
allocation can gain over uniform levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sparsecc.tune.capture import ErrorFn, Projection, ThresholdHooks, quantile_tau, run

# Ties in measured error increases are broken towards the projection listed first; below this an increase
# counts as zero (float noise of the error sum).
_ERROR_EPS = 1e-12


@dataclass
class Allocation:
    """Per-projection sparsity levels at one average sparsity, with the error measured there.

    ``modes`` maps each site to its mode when the allocation comes from a per-site
    mode choice (``sparsecc.tune(mode="mixed")``); empty otherwise.
    """

    target: float
    levels: Dict[Projection, float]
    taus: Dict[Projection, Optional[float]]
    error: float
    evaluations: int
    modes: Dict[str, str] = field(default_factory=dict)

    def average(self, projections: Sequence[Projection]) -> float:
        """The weighted average sparsity of these levels (:func:`weighted_share`)."""
        return weighted_share(projections, self.levels)


def weighted_share(projections: Sequence[Projection], levels: Dict[Projection, float]) -> float:
    """The share of the projections' weights that ``levels`` skip: ``sum_p w_p s_p / total``.

    ``total`` is the projections' summed weights when they are of one mode. When
    both modes are present (the per-site choice of ``sparsecc.tune(mode="mixed")``)
    it is every FFN weight, which the input-mode projections cover (input: gate
    and up, down: down); a gate-mode projection's weights (up and down) are part
    of that total, not added to it.
    """
    mixed = len({p.mode for p in projections}) > 1
    total = sum(p.weight_elements for p in projections if not mixed or p.mode == "input")
    return sum(p.weight_elements * levels.get(p, 0.0) for p in projections) / total


@dataclass
class GreedySearch:
    """The greedy allocation over ``projections`` (see the module docstring).

    ``scores`` are the sorted calibration scores per projection, ``dense`` the
    dense outputs of ``batches``, ``error_fn(dense, sparse, batch)`` the error
    of one batch (averaged over batches).
    """

    model: object
    batches: Sequence
    dense: Sequence
    projections: Sequence[Projection]
    scores: Dict[Projection, object]
    hooks: ThresholdHooks
    error_fn: ErrorFn
    step: float = 0.05
    max_level: float = 0.95
    refresh_every: int = 16
    on_step: Optional[Callable[[float, float, int], None]] = None
    evaluations: int = field(default=0, init=False)

    def __post_init__(self):
        if not 0 < self.step < 1:
            raise ValueError(f"step={self.step!r} is not allowed; expected a number in (0, 1)")
        if not 0 < self.max_level < 1:
            raise ValueError(f"max_level={self.max_level!r} is not allowed; expected a number in (0, 1)")
        total = sum(p.weight_elements for p in self.projections)
        self.share = {p: p.weight_elements / total for p in self.projections}

    def taus(self, levels: Dict[Projection, float]) -> Dict[Projection, Optional[float]]:
        """The thresholds that give ``levels`` on the calibration scores."""
        return {p: quantile_tau(self.scores[p], levels.get(p, 0.0)) for p in self.projections}

    def error(self, levels: Dict[Projection, float]) -> float:
        """Measured output error with ``levels`` applied (one forward per search batch)."""
        self.hooks.taus = self.taus(levels)
        total = 0.0
        for batch, dense in zip(self.batches, self.dense):
            total += self.error_fn(dense, run(self.model, batch), batch)
        self.hooks.taus = {}
        self.evaluations += 1
        return total / len(self.batches)

    def run(self, targets: Sequence[float]) -> List[Allocation]:
        """Allocations at each average sparsity in ``targets`` (one greedy path, snapshots on the way)."""
        for t in targets:
            if not 0 < t <= self.max_level:
                raise ValueError(f"target={t!r} is not allowed; expected a number in (0, max_level={self.max_level}]")
        levels = {p: 0.0 for p in self.projections}
        current, version, accepted = 0.0, 0, 0
        # p -> (error increase per unit of S, levels version it was measured at, error of that trial)
        measured: Dict[Projection, Tuple[float, int, float]] = {}
        out: List[Allocation] = []
        for target in sorted(targets):
            while self._average(levels) < target - 1e-9:
                if accepted and accepted % self.refresh_every == 0:
                    measured.clear()
                open_ = [p for p in self.projections if levels[p] < self.max_level - 1e-9]
                if not open_:
                    raise ValueError(f"target {target} cannot be reached with every projection at "
                                     f"max_level={self.max_level}")
                need = target - self._average(levels)
                while True:
                    for p in open_:
                        if p not in measured:
                            measured[p] = self._rate(levels, p, current, need) + (version,)
                    best = min(open_, key=lambda p: measured[p][0])
                    if measured[best][2] == version:
                        break
                    measured[best] = self._rate(levels, best, current, need) + (version,)
                    others = [measured[p][0] for p in open_ if p is not best]
                    if not others or measured[best][0] <= min(others):
                        break
                # The accepted trial was measured under the current levels: its error is the new current one.
                levels[best] = min(self.max_level, levels[best] + self._increment(levels, best, need))
                current = measured[best][1]
                version, accepted = version + 1, accepted + 1
                del measured[best]
                if self.on_step is not None:
                    self.on_step(self._average(levels), current, self.evaluations)
            out.append(Allocation(target, dict(levels), self.taus(levels), current, self.evaluations))
        return out

    def _average(self, levels: Dict[Projection, float]) -> float:
        return sum(self.share[p] * levels[p] for p in self.projections)

    def _increment(self, levels, p: Projection, need: float) -> float:
        return min(self.step, self.max_level - levels[p], need / self.share[p])

    def _rate(self, levels, p: Projection, current: float, need: float) -> Tuple[float, float]:
        """(error increase per unit of average sparsity, error) of raising ``p`` one step from ``levels``."""
        inc = self._increment(levels, p, need)
        trial = dict(levels)
        trial[p] = min(self.max_level, levels[p] + inc)
        error = self.error(trial)
        delta = max(0.0, error - current)
        return (0.0 if delta < _ERROR_EPS else delta) / (self.share[p] * inc), error


def uniform_allocation(projections: Sequence[Projection], scores, sparsity: float) -> Dict[Projection, Optional[float]]:
    """Taus that give every projection the same ``sparsity`` (the baseline greedy is compared with)."""
    return {p: quantile_tau(scores[p], sparsity) for p in projections}


@dataclass
class Sensitivity:
    """The output error with one projection thresholded alone, at each sparsity level of a grid.

    ``errors[p][i]`` is the error (averaged over the batches it was measured on)
    with only ``p`` at sparsity ``levels[i]`` and every other projection dense.
    """

    levels: Tuple[float, ...]
    errors: Dict[Projection, Tuple[float, ...]]

    def __post_init__(self):
        levels = tuple(float(v) for v in self.levels)
        if not levels or any(not 0 < v < 1 for v in levels) or list(levels) != sorted(set(levels)):
            raise ValueError(f"levels={self.levels!r} is not allowed; expected strictly increasing numbers in (0, 1)")
        for p, row in self.errors.items():
            if len(row) != len(levels):
                raise ValueError(f"errors[{p}] has {len(row)} entries; expected one per level ({len(levels)})")
        self.levels = levels

    def refined(self, step: float = 0.05) -> "Sensitivity":
        """The table on a grid of ``step`` (up to the last level), each curve interpolated log-linearly.

        Error curves of thresholds grow about exponentially with the level
        (each 15% of sparsity multiplies SmolLM2's per-projection KL by 2-14),
        so a straight line between two measured levels overstates every error
        in between and the separable allocation would stop on grid levels only.
        Between measured levels log(error) is interpolated linearly; below the
        first one the curve is the power law through the first two (0 at 0).
        A segment touching an error <= 0 is interpolated linearly instead.
        """
        if not 0 < step < 1:
            raise ValueError(f"step={step!r} is not allowed; expected a number in (0, 1)")
        grid = []
        level = step
        while level < self.levels[-1] + 1e-9:
            grid.append(round(level, 6))
            level += step
        grid = sorted(set(grid) | set(self.levels))
        return Sensitivity(tuple(grid), {p: tuple(_log_interpolate(self.levels, row, x) for x in grid)
                                         for p, row in self.errors.items()})

    def __str__(self) -> str:
        head = "projection".ljust(28) + "".join(f"{v:>9.0%}" for v in self.levels)
        rows = [str(p).ljust(28) + "".join(f"{e:9.2e}" for e in row) for p, row in self.errors.items()]
        return "\n".join([head] + rows)


def _log_interpolate(levels: Sequence[float], errors: Sequence[float], x: float) -> float:
    """The error at level ``x`` between measured ``(levels, errors)``; see :meth:`Sensitivity.refined`."""
    if x <= levels[0]:
        if len(levels) > 1 and errors[0] > 0 and errors[1] > 0:
            power = math.log(errors[1] / errors[0]) / math.log(levels[1] / levels[0])
            return errors[0] * (x / levels[0]) ** power
        return errors[0] * x / levels[0]
    for x0, x1, y0, y1 in zip(levels, levels[1:], errors, errors[1:]):
        if x <= x1 + 1e-12:
            f = (x - x0) / (x1 - x0)
            if y0 > 0 and y1 > 0:
                return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
            return y0 + f * (y1 - y0)
    return errors[-1]


def _lower_hull(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The lower convex hull of (level, error) points sorted by level: its slopes increase."""
    hull: List[Tuple[float, float]] = []
    for x, y in points:
        # Pop the last point while it lies on or above the segment from its predecessor to (x, y).
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (x - x0) >= (y - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append((x, y))
    return hull


def separable_allocation(sensitivity: Sensitivity, projections: Sequence[Projection], scores,
                         targets: Sequence[float], max_level: float = 0.95,
                         total_elements: Optional[int] = None) -> List[Allocation]:
    """Levels that minimise the summed single-projection errors at each average sparsity in ``targets``.

    The error of the whole model is modelled as the sum over projections of
    their errors alone (``sensitivity``), each interpolated linearly between
    its grid levels (0 at level 0) on its lower convex hull; grid levels above
    ``max_level`` are not used. Under that model the optimum takes hull segments
    in increasing order of error per unit of average sparsity, the last one cut
    to land on the target: no model runs, and one ordering serves every target.
    ``Allocation.error`` is the modelled (summed) error and ``evaluations`` 0;
    measure the result with :func:`sparsecc.tune.measure`. ``total_elements``
    (default: the projections' summed weights) is what the average is a share
    of: every FFN weight when the projections are a per-site mix of modes.
    """
    total = sum(p.weight_elements for p in projections) if total_elements is None else total_elements
    missing = [str(p) for p in projections if p not in sensitivity.errors]
    if missing:
        raise ValueError(f"sensitivity has no errors for {missing}")
    segments = []   # (error per unit of average sparsity, projection index, level from, level to, error from, to)
    for index, p in enumerate(projections):
        points = [(0.0, 0.0)] + [(lv, float(e)) for lv, e in zip(sensitivity.levels, sensitivity.errors[p])
                                 if lv <= max_level + 1e-12]
        hull = _lower_hull(points)
        share = p.weight_elements / total
        for (l0, e0), (l1, e1) in zip(hull, hull[1:]):
            segments.append(((e1 - e0) / (share * (l1 - l0)), index, l0, l1, e0, e1))
    # Hull slopes increase along each projection, so the sorted order takes its segments in level order.
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    reachable = sum(p.weight_elements * max((s[3] for s in segments if s[1] == i), default=0.0)
                    for i, p in enumerate(projections)) / total
    out = []
    for target in sorted(targets):
        if not 0 < target <= reachable + 1e-9:
            raise ValueError(f"target={target!r} is not allowed; expected a number in (0, {reachable:.3f}] "
                             f"(every projection at its highest usable level, max_level={max_level})")
        levels = {p: 0.0 for p in projections}
        error, average = 0.0, 0.0
        for _rate, index, l0, l1, e0, e1 in segments:
            p = projections[index]
            share = p.weight_elements / total
            gain = share * (l1 - l0)
            fraction = min(1.0, (target - average) / gain)
            levels[p] = l0 + fraction * (l1 - l0)
            error += fraction * (e1 - e0)
            average += fraction * gain
            if fraction < 1.0 or average >= target - 1e-12:
                break
        taus = {p: quantile_tau(scores[p], levels[p]) for p in projections}
        out.append(Allocation(target, levels, taus, error, 0))
    return out
