"""Expected keys of the dynamic attention forms (block_topk, vertical_slash), from docs/spec.md alone.

Part of the oracle (``oracle.py`` re-exports the two selections), under its rules: nothing imported
from sparsecc. The spec computes these selections from float32 estimates; they are computed in float64
here, and a decision closer than ``ESTIMATE_RTOL`` to its boundary is reported as undefined (a key in
``keep_max`` but not in ``keep_min``), because a float32 computation may fall on either side of it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from tests.oracle.oracle_positions import F64, causal_keep

# Relative tolerance of the float32 estimates of the dynamic forms (scores, block estimates, cdf masses).
ESTIMATE_RTOL = 1e-4


def _rank_bounds(scores: torch.Tensor, cand: torch.Tensor, tol: torch.Tensor):
    """Pairwise ranking relations for "highest first, equal scores to the lower index".

    ``scores``/``cand``/``tol`` are ``[..., n]``. Returns two bool tensors
    ``[..., n(x), n(y)]``: y ranks before x for sure, and y may rank before x
    (a difference within ``tol`` may go either way in float32; an exact float64
    tie is a tie and goes to the lower index, as the spec says).
    """
    n = scores.shape[-1]
    sx, sy = scores[..., :, None], scores[..., None, :]
    tx = tol[..., :, None]
    idx = torch.arange(n)
    y_lower = idx[None, :] < idx[:, None]          # [x, y]: y has the lower index
    exact = sy == sx
    cy = cand[..., None, :]
    surely = cy & ((sy > sx + tx) | (exact & y_lower))
    maybe = cy & ((sy >= sx - tx) & ~(exact & ~y_lower))   # excludes y == x and exact ties won by x
    return surely, maybe


def _select_budget(scores, cand, budget: int, tol):
    """The ``budget`` highest-ranked candidates (all when fewer): (surely kept, maybe kept)."""
    surely, maybe = _rank_bounds(scores, cand, tol)
    sure = cand & (maybe.sum(-1) < budget)
    could = cand & (surely.sum(-1) < budget)
    return sure, could


def _select_cdf(scores, allowed, always, cdf: float, tol):
    """cdf selection: ranked block kept iff mass(always) + mass(ranked before it) < cdf. (sure, maybe)."""
    ranked = allowed & ~always
    logits = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    base = (p * always).sum(-1, keepdim=True)
    surely, maybe = _rank_bounds(scores, ranked, tol)
    py = p[..., None, :]
    min_before = base + (py * surely).sum(-1)
    max_before = base + (py * maybe).sum(-1)
    mtol = ESTIMATE_RTOL
    sure = ranked & (max_before < cdf - mtol)
    could = ranked & (min_before < cdf + mtol)
    return sure, could


def _select_min_mass(scores, allowed, always, min_mass: float):
    """min_mass selection: a ranked block is kept iff its p (softmax over the allowed blocks) >= min_mass."""
    ranked = allowed & ~always
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    return ranked & (p >= min_mass + ESTIMATE_RTOL * min_mass), ranked & (p >= min_mass - ESTIMATE_RTOL * min_mass)


def _tol(scores):
    return ESTIMATE_RTOL * (1.0 + scores.abs())


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def block_topk_keep(q, k, *, scale: float, causal: bool, block: int = 64, topk: Optional[int] = None,
                    cdf: Optional[float] = None, min_mass: Optional[float] = None, sink_blocks: int = 1,
                    local_blocks: int = 1,
                    pool: str = "mean", rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``form = "block_topk"``: (keep_min, keep_max), each ``[B, H, Sq, Sk]``, causality included.

    keep_min holds the blocks kept whichever way float32 rounding goes,
    keep_max those that may be kept; where they agree the layout is defined.
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    off = sk - sq
    nq, nk = math.ceil(sq / block), math.ceil(sk / block)
    qd, kd = q.to(F64), _expand_kv(k.to(F64), h_)

    def pooled(x, n):
        parts = [x[:, :, i * block:(i + 1) * block] for i in range(n)]   # the last block may be shorter
        if pool == "mean":
            return torch.stack([t.mean(2) for t in parts], 2)
        return torch.stack([t.amax(2) for t in parts], 2)

    if pool == "rows":
        est = _sampled_row_estimate(qd, kd, scale=scale, causal=causal, block=block, rows=rows or 4)
    else:
        est = scale * pooled(qd, nq) @ pooled(kd, nk).transpose(-1, -2)        # [B, H, nq, nk]
    a = torch.arange(nq)
    first = a * block + off
    last = torch.clamp((a + 1) * block, max=sq) - 1 + off
    c = torch.arange(nk)
    if causal:
        allowed = c[None, :] * block <= last[:, None]     # a pair whose first key is after the last position is out
    else:
        allowed = torch.ones(nq, nk, dtype=torch.bool)
    lo, hi = first // block, last // block
    band = (c[None, :] >= lo[:, None] - local_blocks + 1) & (c[None, :] <= hi[:, None]) if local_blocks > 0 \
        else torch.zeros(nq, nk, dtype=torch.bool)
    always = allowed & ((c[None, :] < sink_blocks) | band)
    allowed = allowed.expand(b_, h_, nq, nk)
    always = always.expand(b_, h_, nq, nk)
    ranked = allowed & ~always
    if topk is not None:
        sure, could = _select_budget(est, ranked, topk, _tol(est))
    elif min_mass is not None:
        sure, could = _select_min_mass(est, allowed, always, min_mass)
    else:
        sure, could = _select_cdf(est, allowed, always, cdf, _tol(est))
    table_min, table_max = always | sure, always | could
    return _blocks_to_keep(table_min, sq, sk, block, causal), _blocks_to_keep(table_max, sq, sk, block, causal)


def _sampled_row_estimate(qd, kd, *, scale: float, causal: bool, block: int, rows: int) -> torch.Tensor:
    """Spec, block_topk step 1 with ``pool = "rows"``, float64, one query block at a time: the sampled rows are the
    block's last real row and every ``block // rows``-th row before it that is still in the block; each one's
    softmax over the keys it may see; the estimate is the log of their mean probability on each key block."""
    b_, h_, sq, _ = qd.shape
    sk = kd.shape[2]
    nq, nk = math.ceil(sq / block), math.ceil(sk / block)
    est = torch.full((b_, h_, nq, nk), float("-inf"), dtype=F64)
    for a in range(nq):
        first, last = a * block, min((a + 1) * block, sq) - 1
        sampled = [r for r in range(last, first - 1, -(block // rows))][:rows]
        mass = torch.zeros(b_, h_, nk, dtype=F64)
        for r in sampled:
            logits = scale * torch.einsum("bhd,bhjd->bhj", qd[:, :, r], kd)
            if causal:
                logits[..., r + sk - sq + 1:] = float("-inf")
            p = torch.softmax(logits, -1)
            for kb in range(nk):
                mass[..., kb] += p[..., kb * block:(kb + 1) * block].sum(-1)
        est[:, :, a] = torch.log(mass / len(sampled))
    return est


def _blocks_to_keep(table: torch.Tensor, sq: int, sk: int, block: int, causal: bool) -> torch.Tensor:
    """Block table ``[B, H, nq, nk]`` (query blocks over rows, key blocks over positions) -> ``[B, H, Sq, Sk]``."""
    rows = torch.arange(sq) // block
    cols = torch.arange(sk) // block
    keep = table[:, :, rows][:, :, :, cols]
    if causal:
        keep = keep & causal_keep(sq, sk)
    return keep


# spec, vertical_slash: the constants it names
VS_FORCED_COLUMNS, VS_FORCED_DIAGONALS, VS_MIN_VERTICAL, VS_MIN_SLASH = 30, 100, 30, 50
# A score above every probability sum: the forced columns / diagonals rank first (equal among themselves, so the
# spec's "lower index first" decides, as the exact-tie rule of _rank_bounds does).
_VS_FORCED_SCORE = 1.0e9


def _vs_merge(kept_t_desc: List[int], kept_cols: List[int], end: int, block: int) -> set:
    """spec, vertical_slash step 4, for one query block: the set of keys of its ranges and single columns."""
    ranges, cur = [], None
    for t in kept_t_desc:
        if t >= end:
            continue
        e = max(end - t, block)
        if cur is None:
            cur = [e - block, e]
        elif e > cur[1] + block:
            ranges.append(cur)
            cur = [e - block, e]
        elif e > cur[1]:
            cur[1] += block
    ranges.append(cur)
    keys = set()
    for lo, hi in ranges:
        keys.update(range(lo, hi))
    keys.update(c for c in kept_cols if c < cur[1])     # a column inside a range is already there
    return keys


def vertical_slash_keep(q, k, *, scale: float, causal: bool, last_q: int, vertical: int, slash: int,
                        block: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``form = "vertical_slash"``: (keep_min, keep_max), each ``[B, H, Sq, Sk]``, causality included.

    Not causal: the call attends densely. A (batch, head) whose column or
    diagonal selection lies within the float32 tolerance of a tie is undefined
    as a whole (keep_min all False, keep_max all True): the key ranges do not
    grow monotonically with the diagonal set, so no narrower bound is sure.
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    if not causal:
        ones = torch.ones(b_, h_, sq, sk, dtype=torch.bool)
        return ones, ones
    off = sk - sq
    n = min(last_q, sq)
    n_v, n_s = min(sk, max(vertical, VS_MIN_VERTICAL)), min(sk, max(slash, VS_MIN_SLASH))
    qd, kd = q.to(F64), _expand_kv(k.to(F64), h_)
    keep_min = torch.zeros(b_, h_, sq, sk, dtype=torch.bool)
    keep_max = torch.zeros(b_, h_, sq, sk, dtype=torch.bool)
    idx = torch.arange(sk)
    for bi in range(b_):
        for hi in range(h_):
            col = torch.zeros(sk, dtype=F64)
            diag = torch.zeros(sk, dtype=F64)                      # diag[t], t = 0 .. Sk-1
            for i in range(sq - n, sq):
                p = i + off
                logits = scale * (kd[bi, hi, :p + 1] @ qd[bi, hi, i])
                probs = torch.softmax(logits, 0)                   # over keys j = 0 .. p
                col[:p + 1] += probs
                diag.index_add_(0, p - torch.arange(p + 1), probs)  # key j lies on diagonal p - j
            col_s = torch.where(idx < VS_FORCED_COLUMNS, _VS_FORCED_SCORE, col)
            diag_s = torch.where(idx < VS_FORCED_DIAGONALS, _VS_FORCED_SCORE, diag)
            every = torch.ones(sk, dtype=torch.bool)
            c_sure, c_could = _select_budget(col_s, every, n_v, _tol(col))
            d_sure, d_could = _select_budget(diag_s, every, n_s, _tol(diag))
            if not (torch.equal(c_sure, c_could) and torch.equal(d_sure, d_could)):
                keep_max[bi, hi] = True
                continue
            cols = sorted(int(j) for j in torch.nonzero(c_sure).flatten())
            ts = sorted((int(t) for t in torch.nonzero(d_sure).flatten()), reverse=True)
            for a in range(math.ceil(sq / block)):
                end = a * block + off + block
                keys = torch.zeros(sk, dtype=torch.bool)
                keys[[j for j in _vs_merge(ts, cols, end, block) if j < sk]] = True
                for i in range(a * block, min(sq, a * block + block)):
                    keep_min[bi, hi, i] = keys & (idx <= i + off)
            keep_max[bi, hi] = keep_min[bi, hi]
    return keep_min, keep_max


