"""Choosing ``block_topk``'s shared ``min_mass`` threshold for a block budget, on calibration text.

A ``min_mass`` rule keeps as many blocks as the input puts that much attention mass on (docs/spec.md), so its
density is known only on text. :func:`calibrate_min_mass` runs the calibration batches through the recording graph
of :func:`sparsecc.tune.attention.record_attention` (dense attention feeds every layer) with one ``block_topk``
candidate per threshold of a grid, and returns the smallest threshold (the most blocks kept) whose block density
over every attention site, head and query block is at most the budget. On SmolLM2-135M at 8K the held-out text kept
more blocks than the calibration text at the same threshold (0.2396 against about 0.222 at 0.0045; docs/quality.md),
so give the budget a margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from sparsecc.forms import BlockTopK

__all__ = ["DEFAULT_MIN_MASS_GRID", "MinMassCalibration", "calibrate_min_mass", "candidate_densities"]

# Thresholds tried by default: on SmolLM2-135M at 8K (16 sampled rows, 64-blocks) they span block densities of
# about 0.38 down to 0.15 (bench/RESULTS.md, "One shared threshold").
DEFAULT_MIN_MASS_GRID = (0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01)


@dataclass(frozen=True)
class MinMassCalibration:
    """``min_mass``: the chosen threshold (None when even the largest keeps more than the budget); ``densities``:
    (threshold, block density on the calibration batches) for every threshold tried, ascending; ``form``: the
    chosen rule (None with ``min_mass``)."""

    min_mass: Optional[float]
    densities: Tuple[Tuple[float, float], ...]
    form: Optional[BlockTopK]


def candidate_densities(stats) -> torch.Tensor:
    """float64 ``[C]``: each candidate's kept blocks over the causally allowed blocks, summed over every recorded
    site and head (recorded with ``density_block`` equal to the candidates' block)."""
    kept, allowed = None, 0.0
    for entry in stats.sites.values():
        if "kept_blocks" not in entry:
            raise ValueError("candidate_densities needs statistics recorded with density_block > 1")
        site_kept = entry["kept_blocks"].sum(0)
        kept = site_kept if kept is None else kept + site_kept
        allowed += float(entry["allowed_blocks"].sum())
    if kept is None:
        raise ValueError("no attention site was recorded: the calibration batches reached no attention call")
    return kept / max(allowed, 1.0)


def calibrate_min_mass(model, batches, budget: float, *, block: int = 64, rows: int = 16, sink_blocks: int = 1,
                       local_blocks: int = 1, grid: Sequence[float] = DEFAULT_MIN_MASS_GRID) -> MinMassCalibration:
    """The smallest threshold of ``grid`` whose ``block_topk`` rule (``pool = "rows"``, ``rows`` sampled rows,
    ``block``, ``sink_blocks``, ``local_blocks``) keeps at most ``budget`` of the causal blocks on ``batches``.

    ``batches`` are what :func:`~sparsecc.tune.attention.record_attention` takes (model inputs). Raises ValueError
    for a budget outside (0, 1] or a threshold outside (0, 1] (naming it).
    """
    from sparsecc.tune.attention import record_attention

    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget!r} is not allowed; expected a number in (0, 1]")
    thresholds = sorted(float(t) for t in grid)
    if not thresholds:
        raise ValueError("grid is empty; expected at least one min_mass threshold in (0, 1]")
    forms = [BlockTopK(block=block, min_mass=t, sink_blocks=sink_blocks, local_blocks=local_blocks, pool="rows",
                       rows=rows) for t in thresholds]   # BlockTopK names a bad threshold, block or rows
    stats = record_attention(model, batches, candidates=forms, density_block=block)
    density = candidate_densities(stats)
    pairs = tuple((t, float(d)) for t, d in zip(thresholds, density))
    fitting = [i for i, (_, d) in enumerate(pairs) if d <= budget]
    if not fitting:
        return MinMassCalibration(None, pairs, None)
    return MinMassCalibration(thresholds[fitting[0]], pairs, forms[fitting[0]])
