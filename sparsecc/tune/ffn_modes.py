"""Input or gate mode per FFN site, chosen on the two sensitivity tables (``sparsecc.tune(mode="mixed")``).

Both modes skip FFN weights, which is what a decode step saves: input mode (TEAL) skips the gate/up columns of the
dropped inputs and the down columns of the dropped intermediate entries, gate mode (CATS) the up rows and down
columns of the dropped neurons (the gate itself is always read). Measured in weights skipped, a site's options are
every pair (input level, down level) of the input-mode table and every gate level of the gate-mode table, each with
its modelled error: the sum of its projections' errors alone, as in the separable allocation.

:func:`choose_modes` picks one option per site with an exact multiple-choice knapsack
(:func:`sparsecc.tune.knapsack.allocate`): least summed error with at most ``1 - target`` of the FFN weights kept.
:func:`mixed_allocations` keeps the chosen modes and gives their projections levels with the separable allocation
(hull segments, the last one cut to land on the target), the average taken over every FFN weight. Sites without
a gate projection (ungated FFNs) have input-mode options only.
"""

from __future__ import annotations

import itertools
from typing import Dict, List, Sequence, Tuple

from sparsecc.tune.capture import Projection
from sparsecc.tune.ffn import Allocation, Sensitivity, separable_allocation

__all__ = ["choose_modes", "mixed_allocations", "site_weights"]


def site_weights(input_projections: Sequence[Projection]) -> Dict[str, int]:
    """Every FFN weight of each site: its input-mode projections' weights (gate and up, down)."""
    totals: Dict[str, int] = {}
    for p in input_projections:
        totals[p.site] = totals.get(p.site, 0) + p.weight_elements
    return totals


def _check(input_table: Sensitivity, gate_table: Sensitivity, input_projections: Sequence[Projection],
           gate_projections: Sequence[Projection]) -> None:
    if tuple(input_table.levels) != tuple(gate_table.levels):
        raise ValueError(f"the input-mode and gate-mode tables must share their levels; got {input_table.levels} "
                         f"and {gate_table.levels}")
    if any(p.mode != "input" for p in input_projections) or any(p.mode != "gate" for p in gate_projections):
        raise ValueError("input_projections must be input-mode projections and gate_projections gate-mode ones")
    sites = set(site_weights(input_projections))
    stray = sorted(p.site for p in gate_projections if p.site not in sites)
    if stray:
        raise ValueError(f"gate projections of sites with no input-mode projections: {stray}")
    missing = [str(p) for p in input_projections if p not in input_table.errors]
    missing += [str(p) for p in gate_projections if p not in gate_table.errors]
    if missing:
        raise ValueError(f"the sensitivity tables have no errors for {missing}")


def _site_options(input_table: Sensitivity, gate_table: Sensitivity, inputs: Sequence[Projection],
                  gate: Sequence[Projection], total: int, max_level: float) -> List[Tuple[float, float, str]]:
    """(kept share of the site's weights, modelled error, mode) of every option, dominated ones removed."""
    grid = [None] + [i for i, lv in enumerate(input_table.levels) if lv <= max_level + 1e-12]   # None: dense

    def option(chosen, table: Sensitivity, mode: str) -> Tuple[float, float, str]:
        chosen = [(p, i) for p, i in chosen if i is not None]
        skipped = sum(p.weight_elements * table.levels[i] for p, i in chosen)
        return 1.0 - skipped / total, sum(float(table.errors[p][i]) for p, i in chosen), mode

    options = [option(zip(inputs, levels), input_table, "input")
               for levels in itertools.product(grid, repeat=len(inputs))]
    options += [option([(p, i)], gate_table, "gate") for p in gate for i in grid[1:]]
    # Keep an option only if it has less error than every option keeping fewer weights.
    options.sort(key=lambda o: (o[0], o[1]))
    frontier, best = [], float("inf")
    for kept_share, error, mode in options:
        if error < best:
            frontier.append((kept_share, error, mode))
            best = error
    return frontier


def _options_by_site(input_table: Sensitivity, gate_table: Sensitivity, input_projections: Sequence[Projection],
                     gate_projections: Sequence[Projection], max_level: float):
    """(sites, their weights, their option lists): what the knapsack chooses from, the same for every target."""
    _check(input_table, gate_table, input_projections, gate_projections)
    totals = site_weights(input_projections)
    sites = list(totals)
    tables = [_site_options(input_table, gate_table, [p for p in input_projections if p.site == site],
                            [p for p in gate_projections if p.site == site], totals[site], max_level)
              for site in sites]
    return sites, [totals[s] for s in sites], tables


def _knapsack_modes(sites, weights, tables, target: float, max_level: float) -> Dict[str, str]:
    import numpy as np

    from sparsecc.tune.knapsack import allocate

    if not 0 < target < 1:
        raise ValueError(f"target={target!r} is not allowed; expected a share of the FFN weights in (0, 1)")
    width = max(len(t) for t in tables)
    padded = [t + [t[-1]] * (width - len(t)) for t in tables]   # repeats of an option change no optimum
    density = np.array([[o[0] for o in t] for t in padded])
    error = np.array([[o[1] for o in t] for t in padded])
    try:
        picks = allocate(error, density, weights, 1.0 - target)
    except ValueError:
        reachable = 1.0 - float((density.min(1) * np.array(weights)).sum()) / sum(weights)
        raise ValueError(f"target={target!r} cannot be reached with levels up to max_level={max_level}: the "
                         f"sparsest options skip {reachable:.4f} of the FFN weights") from None
    return {site: padded[g][picks[g]][2] for g, site in enumerate(sites)}


def choose_modes(input_table: Sensitivity, gate_table: Sensitivity, input_projections: Sequence[Projection],
                 gate_projections: Sequence[Projection], target: float, max_level: float = 0.95) -> Dict[str, str]:
    """The mode of each site ("input" or "gate") that the knapsack's least-error option at ``target`` uses.

    ``target`` is the share of every FFN weight to skip. The tables are used at
    their own levels (refine them first for a finer grid); levels above
    ``max_level`` are not used. A site whose best option keeps it dense is
    given "input". ValueError when even the sparsest options miss the target.
    """
    options = _options_by_site(input_table, gate_table, input_projections, gate_projections, max_level)
    return _knapsack_modes(*options, target, max_level)


def mixed_allocations(input_table: Sensitivity, gate_table: Sensitivity, input_projections: Sequence[Projection],
                      gate_projections: Sequence[Projection], scores, targets: Sequence[float],
                      max_level: float = 0.95) -> List[Allocation]:
    """Per target: the allocation over both modes' projections (the unchosen mode's at level 0), modes in ``.modes``.

    Modes by :func:`choose_modes`; levels by
    :func:`~sparsecc.tune.ffn.separable_allocation` over the chosen
    projections, the average a share of every FFN weight, so it lands on the
    target exactly. ``Allocation.error`` is the modelled error.
    """
    options = _options_by_site(input_table, gate_table, input_projections, gate_projections, max_level)
    total = sum(options[1])
    everything = list(input_projections) + list(gate_projections)
    out = []
    for target in sorted(targets):
        modes = _knapsack_modes(*options, target, max_level)
        chosen = [p for p in everything if modes[p.site] == p.mode]
        errors = {p: (gate_table if p.mode == "gate" else input_table).errors[p] for p in chosen}
        (alloc,) = separable_allocation(Sensitivity(input_table.levels, errors), chosen, scores, [target],
                                        max_level, total_elements=total)
        alloc.levels = {p: alloc.levels.get(p, 0.0) for p in everything}
        alloc.taus = {p: alloc.taus.get(p) for p in everything}
        alloc.modes = modes
        out.append(alloc)
    return out
