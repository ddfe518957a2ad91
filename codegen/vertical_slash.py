"""``vertical_slash``: MInference's vertical-and-slash attention, the PyTorch reference (docs/spec.md).

The rule is MInference's (microsoft/MInference at fb56c91:
``minference/modules/minference_forward.py`` ``minference_prefill_kernel``,
``minference/ops/pit_sparse_flash_attention_v2.py``
``vertical_slash_sparse_attention`` and ``csrc/vertical_slash_index.cu``
``convert_vertical_slash_indexes_kernel``), with a deterministic tie rule and
the positions of chunked prefill (``Sq < Sk``) written down:

1. **Selection** (:func:`vertical_slash_select_ref`): float32 softmax of the
   last ``min(last_q, Sq)`` rows, causal; column sums and diagonal sums; the
   first :data:`FORCED_COLUMNS` columns and the :data:`FORCED_DIAGONALS`
   nearest diagonals rank first; the top ``V = min(Sk, max(vertical,
   MIN_VERTICAL))`` columns and ``S = min(Sk, max(slash, MIN_SLASH))``
   diagonals are kept.
2. **Index** (:func:`vertical_slash_index_ref`): per (batch, head, query block
   of ``block`` rows) the kept diagonals become unaligned key ranges (merged
   as MInference's ``convert_vertical_slash_indexes`` merges them) and the
   kept columns outside those ranges stay single columns.
3. **Attention** (:func:`vertical_slash_attention_ref`): dense attention
   restricted to the ranges and columns, causal per element, then the model's
   mask token by token; a row with no key outputs zeros.

Conventions are those of ``block_attention.py``: q ``[B, H, Sq, D]``, k/v
``[B, Hkv, Sk, D]``, query head h reads kv head ``h // (H // Hkv)``, query row
``i`` has position ``i + Sk - Sq``. The rule is causal only; a non-causal call
runs dense attention (see :func:`vertical_slash_attention`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sparsecc.forms import VerticalSlash

__all__ = ["FORCED_COLUMNS", "FORCED_DIAGONALS", "MIN_VERTICAL", "MIN_SLASH", "VSIndex", "budgets",
           "vertical_slash_select_ref", "vertical_slash_index_ref", "vertical_slash_key_mask",
           "vertical_slash_attention_ref", "vertical_slash_kept_pairs",
           "vertical_slash_keep_ref", "vertical_slash_attention", "vertical_slash_index", "vertical_slash_density",
           "head_budgets", "vertical_slash_kernel_ok"]

# MInference's constants (minference_prefill_kernel): the first 30 columns and the 100 nearest diagonals rank
# above every score; the budgets are at least 30 columns and 50 diagonals.
FORCED_COLUMNS = 30
FORCED_DIAGONALS = 100
MIN_VERTICAL = 30
MIN_SLASH = 50
# Score elements per step of the reference attention (rows x keys x heads x batch), to bound its memory.
_SCORE_BUDGET = 1 << 24


class VSIndex(NamedTuple):
    """Per (batch, head, query block) lane: key ranges ``[start, end)`` and single columns.

    ``range_start``/``range_end`` are int64 ``[B, H, nQ, S]`` (entries at and past
    ``range_count`` are padding: start = end = a value past every key), ascending and
    disjoint, each ``end - start`` a multiple of ``block``; ``range_end`` may pass
    ``Sk`` (keys that do not exist) and the rows' positions (causality removes those).
    ``col_index`` is int64 ``[B, H, nQ, V]`` ascending (padding past ``col_count``).
    """

    range_count: Tensor
    range_start: Tensor
    range_end: Tensor
    col_count: Tensor
    col_index: Tensor
    block: int
    seq_q: int
    seq_k: int


def budgets(form: VerticalSlash, seq_k: int) -> tuple[int, int]:
    """``(V, S)``: how many columns and diagonals are kept, as MInference clamps them (docs/spec.md)."""
    return (min(seq_k, max(form.vertical, MIN_VERTICAL)), min(seq_k, max(form.slash, MIN_SLASH)))


def head_budgets(forms, seq_k: int) -> list[tuple[int, int]]:
    """``(V, S)`` of each head's form (one ``VerticalSlash`` per head)."""
    return [budgets(f, seq_k) for f in forms]


def _ranked_top(scores: Tensor, forced: Tensor, count: int) -> Tensor:
    """Indices of the ``count`` best entries: forced first (lower index first), then score desc, lower index."""
    from sparsecc.codegen.dynamic_attention import packed_rank_keys

    ranked = torch.where(forced, torch.full_like(scores, math.inf), scores)
    keys = packed_rank_keys(ranked, torch.ones_like(forced))
    # The packed keys are distinct, so the top-count set does not depend on topk's order for equal values.
    return torch.topk(keys, count, dim=-1).indices


def vertical_slash_select_ref(q: Tensor, k: Tensor, form: VerticalSlash, scale: float,
                              col: Optional[Tensor] = None, diag: Optional[Tensor] = None,
                              per_head: Optional[list] = None) -> tuple[Tensor, Tensor]:
    """Kept columns (int64 ``[B, H, V]``, ascending) and kept diagonals ``t = p - j`` (``[B, H, S]``, descending).

    ``col``/``diag`` (float32 ``[B, H, Sk]``, diagonal t at index t) may be passed
    in (the GPU score kernels); otherwise the reference scores are computed.
    ``per_head`` (one ``(V, S)`` per head, see :func:`head_budgets`) gives each
    head its own budgets; ``form`` then only supplies ``last_q`` and ``block``.
    """
    from sparsecc.codegen.dynamic_attention import vertical_slash_scores_ref

    sk = k.shape[2]
    if col is None or diag is None:
        col, diag, t_min = vertical_slash_scores_ref(q, k, last_q=form.last_q, causal=True, scale=scale)
        assert t_min == 0
    idx = torch.arange(sk, device=q.device)
    if per_head is None:
        n_v, n_s = budgets(form, sk)
        cols = _ranked_top(col, (idx < FORCED_COLUMNS).expand_as(col), n_v)
        offs = _ranked_top(diag, (idx < FORCED_DIAGONALS).expand_as(diag), n_s)
        return cols.sort(-1).values, offs.sort(-1, descending=True).values
    # Per-head budgets: rank to the largest budget; a head's own top n are the first n of its ranking (topk
    # returns them in rank order). Beyond its budget a head's columns become a key past every range end and
    # its diagonals repeat its smallest kept one; the index merge skips both (docs/spec.md, mixed heads).
    n_v = torch.tensor([nv for nv, _ in per_head], device=q.device)[:, None]
    n_s = torch.tensor([ns for _, ns in per_head], device=q.device)[:, None]
    ranked_cols = _ranked_top(col, (idx < FORCED_COLUMNS).expand_as(col), int(n_v.max()))
    ranked_offs = _ranked_top(diag, (idx < FORCED_DIAGONALS).expand_as(diag), int(n_s.max()))
    past = sk + form.block
    cols = torch.where(torch.arange(ranked_cols.shape[-1], device=q.device) < n_v, ranked_cols, past)
    in_budget = torch.arange(ranked_offs.shape[-1], device=q.device) < n_s
    smallest = torch.where(in_budget, ranked_offs, sk).min(-1, keepdim=True).values
    offs = torch.where(in_budget, ranked_offs, smallest)
    return cols.sort(-1).values, offs.sort(-1, descending=True).values


def _block_ends(seq_q: int, seq_k: int, block: int, device) -> Tensor:
    """``end_m`` of each query block: one past the last position a full block would hold (row blocks)."""
    n_q = -(-seq_q // block)
    return torch.arange(n_q, device=device) * block + (seq_k - seq_q) + block


def vertical_slash_index_ref(cols: Tensor, offs: Tensor, *, block: int, seq_q: int, seq_k: int) -> VSIndex:
    """Ranges and columns of every (batch, head, query block) lane (docs/spec.md, step 3).

    Vectorised over lanes; one Python step per kept diagonal (in descending ``t``),
    each exactly one step of the sequential merge the spec describes.
    """
    b, h, n_s = offs.shape
    dev = offs.device
    end_m = _block_ends(seq_q, seq_k, block, dev)                     # [nQ]
    n_q = end_m.numel()
    lead = (b, h, n_q)
    past = seq_k + 2 * block + int(end_m[-1])                       # past every key and range end
    starts = torch.full((*lead, n_s + 1), past, dtype=torch.int64, device=dev)   # last slot: writes that do not count
    ends = starts.clone()
    count = torch.zeros(lead, dtype=torch.int64, device=dev)
    rs = torch.zeros(lead, dtype=torch.int64, device=dev)
    re = torch.zeros(lead, dtype=torch.int64, device=dev)
    open_ = torch.zeros(lead, dtype=torch.bool, device=dev)
    dump = torch.full(lead, n_s, dtype=torch.int64, device=dev)
    for s in range(n_s):
        t = offs[:, :, s, None]                                      # [B, H, 1]
        used = t < end_m                                             # offsets at or past end_m do not reach the block
        e = torch.clamp(end_m - t, min=block)
        first = used & ~open_
        cont = used & open_
        emit = cont & (e > re + block)
        grow = cont & ~emit & (e > re)
        slot = torch.where(emit, count, dump)[..., None]
        starts.scatter_(-1, slot, rs[..., None])
        ends.scatter_(-1, slot, re[..., None])
        count = count + emit.to(torch.int64)
        rs = torch.where(first | emit, e - block, rs)
        re = torch.where(first | emit, e, torch.where(grow, re + block, re))
        open_ = open_ | first
    slot = torch.where(open_, count, dump)[..., None]
    starts.scatter_(-1, slot, rs[..., None])
    ends.scatter_(-1, slot, re[..., None])
    count = count + open_.to(torch.int64)
    starts, ends = starts[..., :n_s].contiguous(), ends[..., :n_s].contiguous()
    # Columns: kept when below the last range's end and inside no range.
    c = cols[:, :, None, :].expand(*lead, cols.shape[-1]).contiguous()
    pos = torch.searchsorted(starts, c, right=True) - 1
    covered = (pos >= 0) & (c < torch.gather(ends, -1, pos.clamp(min=0)))
    last_end = torch.gather(ends, -1, (count - 1).clamp(min=0)[..., None])
    kept = ~covered & (c < last_end) & (count[..., None] > 0)
    col_index = torch.where(kept, c, torch.full_like(c, past)).sort(-1).values
    return VSIndex(count, starts, ends, kept.sum(-1), col_index, block, seq_q, seq_k)


def vertical_slash_key_mask(index: VSIndex, a0: int, a1: int) -> Tensor:
    """Bool ``[B, H, a1 - a0, Sk]``: the keys of query blocks ``a0:a1`` (ranges and columns, before causality)."""
    sk = index.seq_k
    # int64: scatter indices must be (the kernel's index is int32).
    starts, ends = index.range_start[:, :, a0:a1].long(), index.range_end[:, :, a0:a1].long()
    n_s = starts.shape[-1]
    valid = torch.arange(n_s, device=starts.device) < index.range_count[:, :, a0:a1, None]
    # A difference array over keys: +1 at each range start, -1 at its end (both clipped to Sk; slot Sk is a sink).
    diff = torch.zeros(*starts.shape[:-1], sk + 1, dtype=torch.int32, device=starts.device)
    one = torch.ones_like(starts, dtype=torch.int32)
    diff.scatter_add_(-1, torch.where(valid, starts.clamp(max=sk), sk), one)
    diff.scatter_add_(-1, torch.where(valid, ends.clamp(max=sk), sk), -one)
    keep = diff.cumsum(-1)[..., :sk] > 0
    cols = index.col_index[:, :, a0:a1].long()
    cvalid = torch.arange(cols.shape[-1], device=cols.device) < index.col_count[:, :, a0:a1, None]
    hit = torch.zeros(*cols.shape[:-1], sk + 1, dtype=torch.bool, device=cols.device)
    hit.scatter_(-1, torch.where(cvalid, cols.clamp(max=sk), sk), True)
    return keep | hit[..., :sk]


def _row_chunks(index: VSIndex, per_row: int):
    """Query-block runs ``(a0, a1, r0, r1)`` whose rows times ``per_row`` stay within the score budget."""
    block, sq = index.block, index.seq_q
    n_q = -(-sq // block)
    step = max(1, _SCORE_BUDGET // max(1, per_row * block))
    for a0 in range(0, n_q, step):
        a1 = min(n_q, a0 + step)
        yield a0, a1, a0 * block, min(sq, a1 * block)


def _row_keep(index: VSIndex, a0: int, a1: int, r0: int, r1: int) -> Tensor:
    """Bool ``[B, H, r1 - r0, Sk]``: the lane's keys for each row, causal per element."""
    lanes = vertical_slash_key_mask(index, a0, a1)
    rows = torch.arange(r0, r1, device=lanes.device)
    keep = lanes[:, :, rows // index.block - a0]
    pos = rows + (index.seq_k - index.seq_q)
    return keep & (torch.arange(index.seq_k, device=lanes.device)[None, :] <= pos[:, None])


def vertical_slash_kept_pairs(index: VSIndex) -> Tensor:
    """int64 ``[B, H]``: kept (query, key) pairs, causal and existing (the model's mask not applied)."""
    b, h = index.range_count.shape[:2]
    total = torch.zeros(b, h, dtype=torch.int64, device=index.range_count.device)
    for a0, a1, r0, r1 in _row_chunks(index, b * h * index.seq_k):
        total += _row_keep(index, a0, a1, r0, r1).sum((-1, -2))
    return total


def vertical_slash_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, form: VerticalSlash, scale: Optional[float] = None,
                                 mask: Optional[Tensor] = None, index: Optional[VSIndex] = None) -> Tensor:
    """Causal ``vertical_slash`` attention (docs/spec.md) in float32 (float64 for float64 inputs).

    Dense attention restricted to the kept pairs of ``index`` (built here unless
    given), causality per element, then ``mask`` (bool or additive) token by
    token; a row left with no key outputs zeros.
    """
    from sparsecc.codegen.block_attention import attend_kept, check_mask, check_qkv, compute_dtype, split_mask

    b, h, sq, sk, group = check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if index is None:
        cols, offs = vertical_slash_select_ref(q, k, form, scale)
        index = vertical_slash_index_ref(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    m4 = check_mask(mask, b, h, sq, sk)
    dtype = compute_dtype(q)
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=dtype, device=q.device)
    kk = k.to(dtype).repeat_interleave(group, dim=1)
    vv = v.to(dtype).repeat_interleave(group, dim=1)
    for a0, a1, r0, r1 in _row_chunks(index, b * h * sk):
        keep = _row_keep(index, a0, a1, r0, r1)
        add = None
        if m4 is not None:
            tile = m4[:, :, r0:r1] if m4.shape[2] != 1 else m4
            bool_m, add = split_mask(tile, dtype)
            if bool_m is not None:
                keep = keep & bool_m
        o, _ = attend_kept(q[:, :, r0:r1].to(dtype), kk, vv, keep, add, scale)
        out[:, :, r0:r1] = o
    return out.to(q.dtype)


def vertical_slash_keep_ref(q: Tensor, k: Tensor, form: VerticalSlash, scale: float) -> Tensor:
    """Bool ``[B, H, Sq, Sk]``: the kept pairs (causal), for tests and calibration at small sizes."""
    sq, sk = q.shape[2], k.shape[2]
    cols, offs = vertical_slash_select_ref(q, k, form, scale)
    index = vertical_slash_index_ref(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    return _row_keep(index, 0, index.range_count.shape[2], 0, sq)


def vertical_slash_kernel_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """The attention kernel's input contract: CUDA, fp16/bf16 everywhere, equal q/v head dims up to 256."""
    return (q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and v.dtype == q.dtype and q.shape[-1] == v.shape[-1] and q.shape[-1] <= 256)


def vertical_slash_attention(q: Tensor, k: Tensor, v: Tensor, *, form: VerticalSlash, causal: bool, scale: float,
                             mask: Optional[Tensor] = None) -> Tensor:
    """``vertical_slash`` attention: Triton on CUDA for fp16/bf16, the reference elsewhere; dense when not causal.

    MInference's rule is defined for causal attention only (docs/spec.md), so a
    call that is not causal (no ``is_causal``, and a mask that keeps some later
    key) attends densely.
    """
    from sparsecc.codegen.block_attention import dense_attention_ref

    if not causal:
        if q.device.type == "cuda":
            from sparsecc.codegen.ops import dense_attention
            return dense_attention(q, k, v, mask, scale, False)
        return dense_attention_ref(q, k, v, scale=scale, causal=False, mask=mask).to(q.dtype)
    if not vertical_slash_kernel_ok(q, k, v):
        return vertical_slash_attention_ref(q, k, v, form=form, scale=scale, mask=mask)
    from sparsecc.codegen import vertical_slash_kernels as vk

    return vk.vertical_slash_attention_kernel(q, k, v, vertical_slash_index(q, k, form, scale), scale, mask)


def vertical_slash_index(q: Tensor, k: Tensor, form: VerticalSlash, scale: float,
                         per_head: Optional[list] = None) -> VSIndex:
    """Selection and index of these inputs (causal): score and index kernels on CUDA, the reference elsewhere.

    ``per_head`` gives each head its own budgets, as in :func:`vertical_slash_select_ref`.
    """
    from sparsecc.codegen.dynamic_attention import _check_inputs

    # Both paths refuse what the reference refuses (Sq > Sk among them): the index kernel's search assumes
    # every query block ends after key 0.
    _check_inputs(q, k)
    sq, sk = q.shape[2], k.shape[2]
    if q.device.type != "cuda":
        cols, offs = vertical_slash_select_ref(q, k, form, scale, per_head=per_head)
        return vertical_slash_index_ref(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    from sparsecc.codegen import dynamic_attention_kernels as dk
    from sparsecc.codegen import vertical_slash_kernels as vk

    col, diag, _ = dk.vertical_slash_scores(q, k, form.last_q, True, scale)
    cols, offs = vertical_slash_select_ref(q, k, form, scale, col=col, diag=diag, per_head=per_head)
    return vk.vertical_slash_index(cols, offs, block=form.block, seq_q=sq, seq_k=sk)


def vertical_slash_density(index: VSIndex) -> float:
    """Kept pairs over causal pairs, averaged over (batch, head): the measured density of a call."""
    sq, sk = index.seq_q, index.seq_k
    causal_pairs = sq * (sk - sq) + sq * (sq + 1) // 2
    return float(vertical_slash_kept_pairs(index).double().mean()) / causal_pairs
