"""The exact multiple-choice knapsack of the KL judge (:mod:`sparsecc.tune.attention_kl`, docs/tune.md)."""

from __future__ import annotations

from typing import List, Sequence

__all__ = ["allocate"]


def allocate(kl, density, weights: Sequence[float], budget: float) -> List[int]:
    """One option per group minimising sum kl[g, option] with sum w_g density[g, option] / sum w <= ``budget``.

    Exact: a dynamic programme over the Pareto frontier of (summed weighted density, summed KL), pruned of dominated
    and over-budget states. Among equal KL the lower density wins. A KL of ``+inf`` marks an option a group may not
    take (e.g. a per-layer form in a layer whose heads cannot all take it); every group needs one allowed option.
    ValueError when even the sparsest allowed options exceed the budget.
    """
    import numpy as np

    kl = np.asarray(kl, dtype=np.float64)
    density = np.asarray(density, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if kl.shape != density.shape or kl.ndim != 2 or kl.shape[0] != w.shape[0]:
        raise ValueError(f"kl {kl.shape}, density {density.shape} and weights {w.shape} do not describe one table")
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} is not allowed; expected a mean block density in (0, 1]")
    if np.isnan(kl).any() or (kl == -np.inf).any() or not np.isfinite(density).all():
        raise ValueError("kl and density must be finite (a table entry was not measured); +inf KL marks an option "
                         "that is not allowed")
    allowed = np.isfinite(kl)
    if not allowed.any(1).all():
        raise ValueError(f"groups {np.flatnonzero(~allowed.any(1)).tolist()} have no allowed option (every KL +inf)")
    # the sparsest allowed option of each group (not-allowed options never count as a way to meet the budget)
    sparsest = np.where(allowed, density, np.inf).min(1)
    cap = budget * w.sum() * (1 + 1e-12) + 1e-12
    lowest = float((sparsest * w).sum())
    if lowest > cap:
        raise ValueError(f"budget={budget!r} cannot be met: the sparsest candidates keep a mean block density of "
                         f"{lowest / w.sum():.4f}; raise the budget or give sparser candidates")
    d_sum, k_sum = np.zeros(1), np.zeros(1)
    backs = []
    for g in range(kl.shape[0]):
        n_opt = kl.shape[1]
        cd = (d_sum[:, None] + w[g] * density[g][None, :]).ravel()
        ck = (k_sum[:, None] + kl[g][None, :]).ravel()
        parent = np.repeat(np.arange(d_sum.shape[0]), n_opt)
        option = np.tile(np.arange(n_opt), d_sum.shape[0])
        # states that can still finish within the budget with the sparsest options of the remaining groups
        rest = float((sparsest[g + 1:] * w[g + 1:]).sum()) if g + 1 < kl.shape[0] else 0.0
        ok = (cd + rest <= cap) & np.isfinite(ck)
        cd, ck, parent, option = cd[ok], ck[ok], parent[ok], option[ok]
        order = np.lexsort((ck, cd))
        cd, ck, parent, option = cd[order], ck[order], parent[order], option[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(ck)[:-1]])
        keep = ck < best_before
        d_sum, k_sum = cd[keep], ck[keep]
        backs.append((parent[keep], option[keep]))
    state = int(np.argmin(k_sum))   # the frontier's KL falls as density rises: the last state is the best
    picks = []
    for parent, option in reversed(backs):
        picks.append(int(option[state]))
        state = int(parent[state])
    return picks[::-1]
