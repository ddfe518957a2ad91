"""Expected outputs of sparsecc's forms, computed from the text of docs/spec.md alone.

This module (with its FFN and linear half, oracle_weights.py) imports nothing from
sparsecc (nor from the other tests): every
rule below is read off docs/spec.md and computed element by element in
float64 (except the dynamic estimates, which the spec puts in float32; they
are computed in float64 here and every decision closer than a tolerance to
its boundary is reported as *undefined*, because a float32 computation may
legitimately fall on either side of it).

Conventions

* q is ``[B, H, Sq, D]``, k and v are ``[B, Hkv, Sk, D]``; query head ``h``
  uses kv head ``h // (H // Hkv)``.
* Query row ``i`` has position ``p = i + Sk - Sq`` (spec, "Attention forms").
* A keep mask is boolean ``[B, H, Sq, Sk]`` (True: the key takes part).
* The model's own mask is boolean (True takes part) or additive float (added
  to the logits, ``-inf`` removes the key); it broadcasts to ``[B, H, Sq, Sk]``.
* Functions that return ``valid`` mark the rows (or tokens, or output
  features) whose expected value the spec defines unambiguously: a row with
  no kept key (the spec does not say what it outputs), or a dynamic selection
  within a tolerance of a tie or of the cdf boundary, is not valid.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

F64 = torch.float64
# An additive mask value at or below this takes a key out for the purpose of deciding whether a row is empty
# (HF masks use finfo.min; anything this negative has no weight next to a key that is not masked).
EFFECTIVELY_MASKED = -1.0e4
# Relative tolerance of the float32 estimates of the dynamic forms (scores, block estimates, cdf masses).
ESTIMATE_RTOL = 1e-4

DYNAMIC_FORMS = ("block_topk", "vertical_slash")


# ---------------------------------------------------------------- which rule applies (spec: "How a site finds its rule")

def covers(rule: dict, path: str) -> bool:
    """A rule covers a site when its ``modules`` glob (default ``*``) matches the module path, case-sensitively."""
    return fnmatch.fnmatchcase(path, rule.get("modules", "*"))


def policy_of(spec: dict, rule: dict) -> str:
    """The rule's own policy wins; without one, ``defaults.policy`` (default ``auto``)."""
    return rule.get("policy", spec.get("defaults", {}).get("policy", "auto"))


@dataclass
class AttentionSiteRule:
    """Per-head forms of one attention site and the policy in force for the site."""

    forms: List[Optional[dict]]   # per head: the deciding sparse rule, or None (dense: no rule or a dense rule)
    policy: Optional[str]         # the policy of the last covering sparse rule; None without one

    @property
    def sparse(self) -> bool:
        """On the CPU only ``force`` applies a form (``auto`` keeps CPU sites dense, ``off`` never applies)."""
        return self.policy == "force" and any(f is not None for f in self.forms)


def attention_site_rule(spec: dict, path: str, heads: int) -> AttentionSiteRule:
    """Rule 3 (later rules override earlier ones) applied per head, plus the site's policy.

    "For an attention site whose heads are covered by several rules, the
    policy of the last covering sparse rule applies to the site."
    """
    covering = [r for r in spec.get("attention", []) if covers(r, path)]
    per_head: List[Optional[dict]] = [None] * heads
    for rule in covering:
        for h in rule.get("heads", range(heads)):
            if h < heads:
                per_head[h] = rule
    forms = [None if r is None or r["form"] == "dense" else r for r in per_head]
    sparse_rules = [r for r in covering if r["form"] != "dense"]
    return AttentionSiteRule(forms, policy_of(spec, sparse_rules[-1]) if sparse_rules else None)


def site_rule(spec: dict, kind: str, path: str) -> Tuple[Optional[dict], Optional[str]]:
    """(deciding rule, its policy) of an FFN or linear site: the last covering rule, or (None, None)."""
    covering = [r for r in spec.get(kind, []) if covers(r, path)]
    if not covering:
        return None, None
    return covering[-1], policy_of(spec, covering[-1])


def site_applies(spec: dict, kind: str, path: str) -> bool:
    """Whether an FFN / linear site gets its form on the CPU: a non-dense deciding rule under ``force``."""
    rule, policy = site_rule(spec, kind, path)
    return rule is not None and rule["form"] != "dense" and policy == "force"


# ---------------------------------------------------------------- attention: static layouts

def query_positions(sq: int, sk: int) -> torch.Tensor:
    """``p = i + Sk - Sq``: the queries are the last Sq positions."""
    return torch.arange(sq) + (sk - sq)


def mask_positions(mask, b: int, h: int, sq: int, sk: int) -> torch.Tensor:
    """``[B, H, Sq]`` positions of a site that is not causal and has a mask, with Sq < Sk (spec, "Attention
    forms"): ``p = min(i + Sk - Sq, m_i)``, ``m_i`` the last key row i's mask keeps (bool True, or an additive
    value above -1e4); ``i + Sk - Sq`` for a row that keeps none."""
    m = torch.broadcast_to(mask, (b, h, sq, sk))
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    out = torch.empty(b, h, sq, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                kept = torch.nonzero(keeps[bi, hi, i]).flatten()
                default = i + sk - sq
                out[bi, hi, i] = min(default, int(kept[-1])) if kept.numel() else default
    return out


def streaming_keep_at(p: torch.Tensor, sk: int, sink: int, window: int) -> torch.Tensor:
    """Bidirectional streaming at explicit query positions ``p`` (``[..., Sq]``): ``[..., Sq, Sk]``."""
    j = torch.arange(sk)
    p = p[..., None]
    return (j < sink) | (p < sink) | ((p - j).abs() < window)


def causal_keep(sq: int, sk: int) -> torch.Tensor:
    """``j <= p`` as a ``[Sq, Sk]`` mask."""
    return torch.arange(sk)[None, :] <= query_positions(sq, sk)[:, None]


def streaming_keep(sq: int, sk: int, sink: int, window: int, causal: bool) -> torch.Tensor:
    """``form = "streaming"``, ``[Sq, Sk]``.

    Causal: ``j <= p`` and (``j < sink`` or ``p - j < window``).
    Bidirectional: ``j < sink``, or ``p < sink``, or ``|p - j| < window``.
    """
    p = query_positions(sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    if causal:
        return (j <= p) & ((j < sink) | (p - j < window))
    return (j < sink) | (p < sink) | ((p - j).abs() < window)


def block_sparse_keep(sq: int, sk: int, block: int, local_blocks: int = 1, global_blocks: int = 0,
                      causal: bool = False, extra_blocks: Sequence[int] = ()) -> torch.Tensor:
    """``form = "block_sparse"`` without random blocks, ``[Sq, Sk]``.

    Query block ``a`` is the block of the query *position* ``p`` (positions are
    what the section's preamble defines; ``|a - b|`` is "a band around the
    diagonal"), key block ``b`` the block of key position ``j``. Kept iff
    ``|a - b| < local_blocks`` or ``a < global_blocks`` or ``b < global_blocks``
    (or ``b`` in ``extra_blocks``: a given set of drawn random blocks, for every query block);
    then causality (and, in ``attention``, the model's mask) token by token.
    """
    p = query_positions(sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    a, b = p // block, j // block
    keep = ((a - b).abs() < local_blocks) | (a < global_blocks) | (b < global_blocks) | _in_blocks(b, extra_blocks)
    if causal:
        keep = keep & (j <= p)
    return keep


def block_sparse_keep_at(p: torch.Tensor, sk: int, block: int, local_blocks: int = 1,
                         global_blocks: int = 0, extra_blocks: Sequence[int] = ()) -> torch.Tensor:
    """Bidirectional ``block_sparse`` at explicit query positions ``p`` (``[..., Sq]``): query block
    ``p // block``; ``extra_blocks`` as in :func:`block_sparse_keep`; ``[..., Sq, Sk]``."""
    j = torch.arange(sk)
    a, b = (p // block)[..., None], j // block
    return ((a - b).abs() < local_blocks) | (a < global_blocks) | (b < global_blocks) | _in_blocks(b, extra_blocks)


def _in_blocks(b: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """Whether each key block index of ``b`` is one of ``blocks``."""
    keep = torch.zeros_like(b, dtype=torch.bool)
    for x in blocks:
        keep |= b == x
    return keep


def static_keep(form: Optional[dict], sq: int, sk: int, causal: bool) -> torch.Tensor:
    """The ``[Sq, Sk]`` keep mask of one head under a static form (None: dense), causality included."""
    if form is None or form["form"] == "dense":
        return causal_keep(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
    if form["form"] == "streaming":
        return streaming_keep(sq, sk, form["sink"], form["window"], causal)
    if form["form"] == "block_sparse":
        if form.get("random_blocks", 0):
            raise ValueError("random blocks are drawn by sparsecc; the oracle has no layout for them")
        return block_sparse_keep(sq, sk, form.get("block", 64), form.get("local_blocks", 1),
                                 form.get("global_blocks", 0), causal, form.get("extra_blocks", ()))
    raise ValueError(f"{form['form']} is not a static attention form")


# ---------------------------------------------------------------- attention: dynamic layouts

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


# ---------------------------------------------------------------- attention: the whole site

def head_keep(q, k, forms: Sequence[Optional[dict]], *, scale: float, causal: bool,
              dynamic_causal: Optional[bool] = None):
    """(keep_min, keep_max) ``[B, H, Sq, Sk]`` for per-head forms (None: dense head).

    Spec, "Heads with different forms": each head keeps what a site of its form alone keeps, so a dynamic
    head's keys come from that form's selection (made for every head, then read at this head).
    ``dynamic_causal`` overrides ``causal`` for the dynamic heads (their estimate is causal when the mask
    removes every later key; the static heads follow is_causal).
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    keep_min = torch.zeros(b_, h_, sq, sk, dtype=torch.bool)
    keep_max = torch.zeros_like(keep_min)
    selections = {}
    for hi, form in enumerate(forms):
        if form is not None and form["form"] in DYNAMIC_FORMS:
            args = {key: val for key, val in form.items() if key not in ("form", "modules", "heads", "policy",
                                                                          "phase")}
            key = (form["form"], tuple(sorted(args.items())))
            if key not in selections:
                fn = block_topk_keep if form["form"] == "block_topk" else vertical_slash_keep
                selections[key] = fn(q, k, scale=scale, causal=causal if dynamic_causal is None else dynamic_causal,
                                     **args)
            keep_min[:, hi], keep_max[:, hi] = selections[key][0][:, hi], selections[key][1][:, hi]
        else:
            keep_min[:, hi] = keep_max[:, hi] = static_keep(form, sq, sk, causal)
    return keep_min, keep_max


def positions_from_mask(causal: bool, mask, sq: int, sk: int) -> bool:
    """Whether the spec's mask rule places the queries (not causal, a mask, fewer queries than keys)."""
    return not causal and mask is not None and sq < sk


def attend(q, k, v, keep_min, keep_max=None, *, scale: float, mask=None):
    """Dense float64 softmax attention over the kept keys (and the model's mask).

    Returns ``(out [B, H, Sq, Dv], valid [B, H, Sq])``; a row is valid when its
    kept set is defined (keep_min == keep_max after the mask) and it keeps at
    least one key that the mask does not (effectively) remove.
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    keep_max = keep_min if keep_max is None else keep_max
    qd, kd, vd = q.to(F64), _expand_kv(k.to(F64), h_), _expand_kv(v.to(F64), h_)
    logits = scale * qd @ kd.transpose(-1, -2)
    takes_part = torch.ones(b_, h_, sq, sk, dtype=torch.bool)   # not (effectively) removed by the mask
    if mask is not None:
        m = torch.broadcast_to(mask, (b_, h_, sq, sk))
        if m.dtype == torch.bool:
            takes_part = hard = m
        else:
            m = m.to(F64)
            logits = logits + m
            takes_part, hard = m > EFFECTIVELY_MASKED, m > float("-inf")
        keep_min, keep_max = keep_min & hard, keep_max & hard
    probs = torch.softmax(logits.masked_fill(~keep_min, float("-inf")), -1).nan_to_num(0.0)
    out = probs @ vd
    defined = (keep_min == keep_max).all(-1)
    nonempty = (keep_min & takes_part).any(-1)
    return out, defined & nonempty


def _keep_at(form: Optional[dict], p: torch.Tensor, sk: int) -> torch.Tensor:
    """One head's bidirectional keep mask at explicit positions ``p`` (``[B, Sq]``) -> ``[B, Sq, Sk]``."""
    if form is None or form["form"] == "dense":
        return torch.ones(*p.shape, sk, dtype=torch.bool)
    if form["form"] == "streaming":
        return streaming_keep_at(p, sk, form["sink"], form["window"])
    if form.get("random_blocks", 0):
        raise ValueError("random blocks are drawn by sparsecc; the oracle has no layout for them")
    return block_sparse_keep_at(p, sk, form.get("block", 64), form.get("local_blocks", 1),
                                form.get("global_blocks", 0), form.get("extra_blocks", ()))


def _shown_keys(mask, b: int, sq: int, sk: int) -> torch.Tensor:
    """``[Sk]``: the keys batch element ``b``'s mask shows to some query row of some head (bool True, or additive
    above -1e4)."""
    m = mask
    while m.dim() < 4:
        m = m[None]
    m = m[b if m.shape[0] > 1 else 0]                                   # [H|1, Sq|1, Sk|1]
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    return torch.broadcast_to(keeps, (keeps.shape[0], sq, sk)).any(0).any(0)


def left_padding(mask, b: int, sq: int, sk: int) -> int:
    """Spec, "Left padding": how many leading keys batch element ``b``'s mask hides from every query row and head
    (bool False, or additive at or below -1e4); ``sk`` when it hides every key."""
    shown = _shown_keys(mask, b, sq, sk)
    for j in range(sk):
        if shown[j]:
            return j
    return sk


def right_padding(mask, b: int, sq: int, sk: int) -> int:
    """Spec, "Right padding": how many trailing keys batch element ``b``'s mask hides from every query row and head
    (``sk`` when it hides every key)."""
    shown = _shown_keys(mask, b, sq, sk)
    for j in range(sk - 1, -1, -1):
        if shown[j]:
            return sk - 1 - j
    return sk


def _leading_rows(keeps, o: int, end: int, sq: int) -> int:
    """Spec, "Left padding": the leading rows that sit before key ``o`` (at ``i``, or ``i + end - Sq`` with fewer
    queries than keys) or keep no key."""
    rows = min(sq, max(0, o - (end - sq if sq < keeps.shape[-1] else 0)))
    while rows < sq and not keeps[0, :, rows].any():
        rows += 1
    return rows


def _element_mask(mask, b: int):
    m = mask
    while m.dim() < 4:
        m = m[None]
    return m[b:b + 1] if m.shape[0] > 1 else m


def _padding_segments(mask, b_: int, sq: int, sk: int):
    """Spec, "Left padding" and "Right padding": per batch element, ``(m, o, end, rows, end_rows)``: its mask
    ``m`` (4-D), its first shown key ``o``, the end ``end`` of the keys the form sees, its leading padding rows
    ``[0, rows)`` (dense) and the rows the form places ``[rows, end_rows)`` (after them, with as many queries as
    keys, the rows of its right padding: unspecified). None when no element is padded."""
    pads = [(left_padding(mask, b, sq, sk), right_padding(mask, b, sq, sk)) for b in range(b_)]
    if not any(o or r for o, r in pads):
        return None
    segments = []
    for b, (o, r) in enumerate(pads):
        m = _element_mask(mask, b)
        keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
        keeps = torch.broadcast_to(keeps, (1, keeps.shape[1], sq, sk))
        end = max(sk - r, o)
        rows = _leading_rows(keeps, o, end, sq)
        if sq < sk and end < sk:   # cut only if each row after the padding rows then sits where its mask ends
            index = torch.arange(sk)
            last = [int(torch.where(keeps[0, :, i], index, -1).max()) for i in range(sq)]
            if any(last[i] != i + end - sq for i in range(rows, sq)):
                end = sk
                rows = _leading_rows(keeps, o, end, sq)
        end_rows = max(end, rows) if sq == sk else sq  # with Sq == Sk the rows of the right padding's keys follow
        segments.append((m, o, end, rows, end_rows))
    return segments


def _segment_mask(m, o: int, end: int, rows: int, end_rows: int):
    """The part of an element's mask ``m`` over its placed rows and the keys the form sees."""
    m_rest = m if m.shape[2] == 1 else m[:, :, rows:end_rows]
    return m_rest if m_rest.shape[3] == 1 else m_rest[..., o:end]


def _by_padding(q, k, v, forms, *, causal: bool, mask, scale: float, flag: bool):
    """Spec, "Left padding" and "Right padding": per batch element, the form sees its keys from its first shown key
    ``o`` to its right padding (and, with as many queries as keys, the rows of those keys); its left padding rows
    (the leading rows that sit before ``o`` or keep no key) attend densely (every key their mask keeps); the rows of
    its right padding are unspecified (invalid here). Returns None when no element is padded."""
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    segments = _padding_segments(mask, b_, sq, sk)
    if segments is None:
        return None
    out = torch.zeros(b_, h_, sq, v.shape[-1], dtype=F64)
    valid = torch.zeros(b_, h_, sq, dtype=torch.bool)
    for b, (m, o, end, rows, end_rows) in enumerate(segments):
        if rows:
            keep_all = torch.ones(1, h_, rows, sk, dtype=torch.bool)
            m_rows = m if m.shape[2] == 1 else m[:, :, :rows]
            out[b:b + 1, :, :rows], valid[b:b + 1, :, :rows] = attend(
                q[b:b + 1, :, :rows], k[b:b + 1], v[b:b + 1], keep_all, scale=scale, mask=m_rows)
        # the rows of the right padding (from end_rows on) are unspecified: left invalid
        if rows < end_rows:
            out[b:b + 1, :, rows:end_rows], valid[b:b + 1, :, rows:end_rows] = expected_attention(
                q[b:b + 1, :, rows:end_rows], k[b:b + 1, :, o:end], v[b:b + 1, :, o:end], forms, causal=causal,
                mask=_segment_mask(m, o, end, rows, end_rows), scale=scale, is_causal_flag=flag, padding_cut=True)
    return out, valid


def row_positions(mask, b_: int, h_: int, sq: int, sk: int, *, is_causal_flag: bool,
                  padding_cut: bool = False) -> torch.Tensor:
    """``[B, H, Sq]``: the query position at which a positional form places each row, among the keys the form sees
    (spec, "Attention forms", "Left padding", "Right padding"), as :func:`expected_attention` places them; -1 for
    the rows no form places (an element's left padding rows, which attend densely, and its right padding's rows)."""
    if mask is not None and not is_causal_flag and not padding_cut:
        segments = _padding_segments(mask, b_, sq, sk)
        if segments is not None:
            out = torch.full((b_, h_, sq), -1, dtype=torch.long)
            for b, (m, o, end, rows, end_rows) in enumerate(segments):
                if rows < end_rows:
                    out[b:b + 1, :, rows:end_rows] = row_positions(
                        _segment_mask(m, o, end, rows, end_rows), 1, h_, end_rows - rows, end - o,
                        is_causal_flag=is_causal_flag, padding_cut=True)
            return out
    if positions_from_mask(is_causal_flag, mask, sq, sk):
        return mask_positions(mask, b_, h_, sq, sk)
    return query_positions(sq, sk).expand(b_, h_, sq).clone()


def key_ranges(mask, b_: int, sq: int, sk: int, *, is_causal_flag: bool) -> List[Tuple[int, int]]:
    """Per batch element, ``(o, end)``: the keys ``[o, end)`` its forms see after the spec's padding rules (where
    its blocks are cut from, and what its random blocks are drawn among); ``(0, sk)`` where no rule applies."""
    segments = None if mask is None or is_causal_flag else _padding_segments(mask, b_, sq, sk)
    return [(0, sk)] * b_ if segments is None else [(o, end) for _, o, end, _, _ in segments]


def expected_attention(q, k, v, forms: Sequence[Optional[dict]], *, causal: bool, mask=None,
                       scale: Optional[float] = None, is_causal_flag: Optional[bool] = None,
                       padding_cut: bool = False):
    """The output of an attention site whose heads use ``forms`` (None: dense). Returns (out, valid rows).

    ``is_causal_flag``: whether causality comes from SDPA's ``is_causal`` (default: ``causal``); a site made
    causal by a mask tensor is "not causal" for the spec's position rule. ``padding_cut``: the spec's
    padding rules were already applied (the keys given start at the element's first shown key and end at its
    right padding).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    flag = causal if is_causal_flag is None else is_causal_flag
    if mask is not None and not flag and not padding_cut:
        padded = _by_padding(q, k, v, forms, causal=causal, mask=mask, scale=scale, flag=flag)
        if padded is not None:
            return padded
    if positions_from_mask(flag, mask, sq, sk):
        p = mask_positions(mask, b_, h_, sq, sk)
        # static heads apply at the mask's positions; dynamic heads select as if every row sat at
        # i + Sk - Sq, and a row the mask moves attends densely
        dynamic = [f is not None and f["form"] in DYNAMIC_FORMS for f in forms]
        keep_min, keep_max = _dynamic_keep(q, k, forms, scale=scale, causal=causal, mask=mask)
        moved = (p != query_positions(sq, sk))[..., None]
        for hi, f in enumerate(forms):
            if dynamic[hi]:
                keep_min[:, hi] |= moved[:, hi]
                keep_max[:, hi] |= moved[:, hi]
            else:
                keep_min[:, hi] = keep_max[:, hi] = _keep_at(f, p[:, hi], sk)
        return attend(q, k, v, keep_min, keep_max, scale=scale, mask=mask)
    keep_min, keep_max = _dynamic_keep(q, k, forms, scale=scale, causal=causal, mask=mask)
    return attend(q, k, v, keep_min, keep_max, scale=scale, mask=mask)


def removes_later_keys(mask, b: int, sq: int, sk: int) -> bool:
    """Spec, block_topk step 1: batch element ``b``'s mask removes every key after each query's position
    ``p = i + Sk - Sq`` (bool False, or additive at or below -1e4), for every head."""
    m = mask
    while m.dim() < 4:
        m = m[None]
    m = m[b if m.shape[0] > 1 else 0]                                   # [H|1, Sq|1, Sk]
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    keeps = torch.broadcast_to(keeps, (keeps.shape[0], sq, sk))
    for i in range(sq):
        if keeps[..., i, i + sk - sq + 1:].any():
            return False
    return True


def _dynamic_keep(q, k, forms, *, scale: float, causal: bool, mask):
    """head_keep, with the spec's rules that a mask removing every later key makes a dynamic estimate causal,
    decided per batch element, and that one query row without a mask is causal (no key lies after it)."""
    sq, sk = q.shape[2], k.shape[2]
    if causal or not {f["form"] for f in forms if f is not None} & set(DYNAMIC_FORMS):
        return head_keep(q, k, forms, scale=scale, causal=causal)
    if mask is None:
        return head_keep(q, k, forms, scale=scale, causal=causal, dynamic_causal=sq == 1)
    parts = [head_keep(q[b:b + 1], k[b:b + 1], forms, scale=scale, causal=causal,
                       dynamic_causal=sq <= sk and removes_later_keys(mask, b, sq, sk)) for b in range(q.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# The FFN and linear forms live in their own module; every oracle is reachable as ``oracle.<name>``.
from tests.oracle.oracle_weights import (ACTIVATIONS, Ffn, expected_ffn, expected_linear,  # noqa: E402,F401
                                         prune_2_4, prune_block_weights, threshold)
