"""Sparse attention: streaming (sink + window) and block-table attention.

Layout of this file: module notes, then the **reference** section (plain
PyTorch, chunked, the ground truth for the kernels); the Triton kernel section
(configs, jit kernel, wrapper) goes after it.

Conventions shared by every function here:

* ``q`` is ``[B, H, Sq, D]``, ``k`` is ``[B, Hkv, Sk, D]`` and ``v`` is
  ``[B, Hkv, Sk, Dv]``; ``Hkv`` divides ``H`` and query head ``h`` reads kv head
  ``h // (H // Hkv)`` (``repeat_interleave`` GQA).
* Query row ``i`` has position ``p = i + Sk - Sq`` (queries are the last ``Sq``
  positions); causal attention keeps key ``j`` iff ``j <= p`` (bottom-right
  alignment, as ``F.scaled_dot_product_attention`` does with ``is_causal`` and
  a KV cache).
* ``mask`` is the model's own mask, broadcastable to ``[B, H, Sq, Sk]``: bool
  (True = takes part, as in SDPA) or float (added to the scores). It is
  intersected with the sparse pattern.
* Scores are computed in float32 (float64 inputs stay float64) and the output
  is cast back to ``q.dtype``. A row that keeps no key outputs zeros and has
  ``lse = -inf``. ``lse`` is the natural-log logsumexp of ``scale * q.k`` (plus
  the float mask) over the kept keys, in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sparsecc.layouts import FULL_WINDOW, BlockTable

__all__ = ["FULL_WINDOW", "streaming_attention_ref", "block_sparse_attention_ref", "dense_attention_ref"]

# Upper bound on the elements of one score tile (batch x heads x rows x keys): with the
# exp, mask and product temporaries this keeps a reference step under ~1 GiB.
_SCORE_BUDGET = 1 << 25

AttentionOut = Union[Tensor, tuple[Tensor, Tensor]]

# ============================================================== reference


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    """Validate the shapes; returns ``(B, H, Sq, Sk, group)`` with ``group = H // Hkv``."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if bk != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {v.shape[0]}")
    if dk != d:
        raise ValueError(f"q head dim {d} differs from k head dim {dk}")
    if v.shape[1] != hkv or v.shape[2] != sk:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)} in heads and length")
    if hkv < 1 or h % hkv:
        raise ValueError(f"kv heads {hkv} must divide query heads {h}")
    return b, h, sq, sk, h // hkv


def _check_mask(mask: Optional[Tensor], b: int, h: int, sq: int, sk: int) -> Optional[Tensor]:
    """Return ``mask`` viewed as 4-d (size-1 dims kept for broadcasting), after checking it broadcasts."""
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"mask has {mask.dim()} dims; expected at most 4")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for size, want, name in zip(m.shape, (b, h, sq, sk), ("batch", "heads", "Sq", "Sk")):
        if size not in (1, want):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to [B, H, Sq, Sk] "
                             f"= [{b}, {h}, {sq}, {sk}] ({name})")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise ValueError(f"mask dtype {m.dtype} is not allowed; expected bool or floating point")
    return m


def _mask_tile(m: Tensor, heads: Tensor, r0: int, r1: int, keys: Tensor) -> Tensor:
    """The ``[B|1, Hg|1, R|1, L|1]`` tile of a 4-d broadcastable mask; slices rows first so nothing is O(Sq*Sk)."""
    if m.shape[2] != 1:
        m = m[:, :, r0:r1]
    if m.shape[3] != 1:
        m = m.index_select(3, keys.to(m.device))
    if m.shape[1] != 1:
        m = m.index_select(1, heads.to(m.device))
    return m


def _attend(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, add: Optional[Tensor], scale: float
            ) -> tuple[Tensor, Tensor]:
    """Softmax attention of one tile over its kept keys; returns ``(out, lse)``.

    Rows with no kept key (or only ``-inf`` scores) give zeros and ``lse = -inf``
    rather than the NaN a plain softmax would.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if add is not None:
        s = s + add
    s = s.masked_fill(~keep, -math.inf)
    row_max = s.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)
    den = e.sum(dim=-1, keepdim=True)
    out = torch.matmul(e, v)
    out = torch.where(den > 0, out / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(out))
    lse = (torch.log(den) + row_max).squeeze(-1)
    return out, lse


def _head_batches(n_heads: int, per_head_elems: int) -> list[tuple[int, int]]:
    """Split heads into ``[start, end)`` runs whose score tiles stay within the budget."""
    step = max(1, _SCORE_BUDGET // max(1, per_head_elems))
    return [(h0, min(n_heads, h0 + step)) for h0 in range(0, n_heads, step)]


def _tile_inputs(q: Tensor, k: Tensor, v: Tensor, heads: Tensor, group: int, r0: int, r1: int, keys: Tensor,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``r0:r1`` of the query heads ``heads`` and their GQA kv heads at ``keys``, upcast."""
    kv_heads = heads // group
    q_t = q.index_select(1, heads)[:, :, r0:r1].to(dtype)
    k_t = k.index_select(2, keys).index_select(1, kv_heads).to(dtype)
    v_t = v.index_select(2, keys).index_select(1, kv_heads).to(dtype)
    return q_t, k_t, v_t


def _split_mask(m: Optional[Tensor], dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(bool_part, additive_part)`` of a mask tile."""
    if m is None:
        return None, None
    if m.dtype == torch.bool:
        return m, None
    return None, m.to(dtype)


def _finish(out: Tensor, lse: Tensor, q: Tensor, return_lse: bool) -> AttentionOut:
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _per_head(values: Union[int, Sequence[int]], n_heads: int, name: str) -> list[int]:
    vals = [values] if isinstance(values, int) else [int(x) for x in values]
    if len(vals) == 1:
        vals = vals * n_heads
    if len(vals) != n_heads:
        raise ValueError(f"{name} has {len(vals)} entries; expected 1 or H = {n_heads}")
    return vals


def _streaming_keys(p0: int, p1: int, sink: int, window: int, seq_k: int, causal: bool,
                    device: torch.device) -> Tensor:
    """Ascending key positions that some query position in ``[p0, p1]`` can keep (sink range + window range)."""
    full = window == FULL_WINDOW
    if causal:
        hi = min(p1 + 1, seq_k)
        if hi <= 0:
            return torch.empty(0, dtype=torch.long, device=device)
        sink_end = min(sink, hi)
        win_start, win_end = (0 if full else max(0, p0 - window + 1)), hi
    else:
        if p0 < sink or full:
            return torch.arange(seq_k, device=device)
        sink_end = min(sink, seq_k)
        # |p - j| < window reaches from p0 - window + 1 to p1 + window - 1.
        win_start, win_end = max(0, p0 - window + 1), min(seq_k, p1 + window)
    if win_start >= win_end:
        return torch.arange(sink_end, device=device)
    if win_start <= sink_end:
        return torch.arange(max(sink_end, win_end), device=device)
    return torch.cat([torch.arange(sink_end, device=device), torch.arange(win_start, win_end, device=device)])


def _streaming_keep(p: Tensor, j: Tensor, sink: int, window: int, causal: bool) -> Tensor:
    """The element rule of ``Streaming`` (see ``sparsecc.forms``) for positions ``p`` x keys ``j``."""
    if causal:
        keep = j <= p
        if window != FULL_WINDOW:
            keep = keep & ((j < sink) | (p - j < window))
        return keep
    if window == FULL_WINDOW:
        return torch.ones(torch.broadcast_shapes(p.shape, j.shape), dtype=torch.bool, device=p.device)
    return (j < sink) | (p < sink) | ((p - j).abs() < window)


def streaming_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, sink: Sequence[int], window: Sequence[int],
                            scale: float, causal: bool, mask: Optional[Tensor] = None, return_lse: bool = False,
                            chunk: int = 1024) -> AttentionOut:
    """Reference streaming attention (attention sink + sliding window), one rule per head.

    ``sink``/``window`` have one entry per query head (or one for all); a window
    of :data:`FULL_WINDOW` (-1) means no window limit, i.e. a dense head. With
    query position ``p`` and key ``j``, causal attention keeps ``(p, j)`` iff
    ``j <= p and (j < sink or p - j < window)``; bidirectional attention keeps it
    iff ``j < sink or p < sink or |p - j| < window``.

    Query rows are processed ``chunk`` at a time, each against the union of its
    sink range and window range only, and heads sharing a rule are batched, so
    memory is O(chunk * (sink + chunk + window)) per head, never O(Sq * Sk).
    Returns ``out`` ``[B, H, Sq, Dv]`` in ``q.dtype`` (and ``lse`` ``[B, H, Sq]``
    when ``return_lse``).
    """
    b, h, sq, sk, group = _check_qkv(q, k, v)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is not allowed; expected an integer >= 1")
    sinks, windows = _per_head(sink, h, "sink"), _per_head(window, h, "window")
    for s_, w_ in zip(sinks, windows):
        if s_ < 0 or (w_ < 1 and w_ != FULL_WINDOW):
            raise ValueError(f"sink={s_}, window={w_} is not allowed; expected sink >= 0 and window >= 1 "
                             f"or FULL_WINDOW ({FULL_WINDOW})")
    m4 = _check_mask(mask, b, h, sq, sk)
    dtype = _compute_dtype(q)
    dev = q.device
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=dtype, device=dev)
    lse = torch.full((b, h, sq), -math.inf, dtype=dtype, device=dev)
    offset = sk - sq
    rules: dict[tuple[int, int], list[int]] = {}
    for head, rule in enumerate(zip(sinks, windows)):
        rules.setdefault(rule, []).append(head)
    for (s_, w_), heads_of_rule in rules.items():
        widest = sk if w_ == FULL_WINDOW or not causal else min(sk, s_ + min(chunk, sq) + w_)
        for h0, h1 in _head_batches(len(heads_of_rule), b * min(chunk, sq) * widest):
            heads = torch.tensor(heads_of_rule[h0:h1], device=dev)
            for r0 in range(0, sq, chunk):
                r1 = min(sq, r0 + chunk)
                keys = _streaming_keys(r0 + offset, r1 - 1 + offset, s_, w_, sk, causal, dev)
                if keys.numel() == 0:
                    continue
                pos = torch.arange(r0, r1, device=dev) + offset
                keep = _streaming_keep(pos[:, None], keys[None, :], s_, w_, causal)
                bool_m, add_m = _split_mask(None if m4 is None else _mask_tile(m4, heads, r0, r1, keys), dtype)
                if bool_m is not None:
                    keep = keep & bool_m
                q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, r0, r1, keys, dtype)
                o_t, l_t = _attend(q_t, k_t, v_t, keep, add_m, scale)
                out[:, heads, r0:r1] = o_t
                lse[:, heads, r0:r1] = l_t
    return _finish(out, lse, q, return_lse)


def block_sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, table: BlockTable, scale: float,
                               mask: Optional[Tensor] = None, return_lse: bool = False,
                               chunk: int = 1024) -> AttentionOut:
    """Reference attention over a :class:`~sparsecc.layouts.BlockTable`.

    Keeps the table's kept blocks (full and partial), then at token level
    bottom-right causality when ``table.causal`` (the sequence ends are implicit:
    keys past ``Sk`` do not exist), intersected with ``mask``. A table with
    ``Bt == 1`` / ``Ht == 1`` broadcasts over batch / heads. Query rows go
    ``chunk`` at a time (rounded down to whole query blocks, at least one), each
    against the union of the key blocks its row blocks keep.
    """
    b, h, sq, sk, group = _check_qkv(q, k, v)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is not allowed; expected an integer >= 1")
    if (table.seq_q, table.seq_k) != (sq, sk):
        raise ValueError(f"table is for seq_q={table.seq_q}, seq_k={table.seq_k}; inputs have Sq={sq}, Sk={sk}")
    bt, ht = table.kv_num_blocks.shape[:2]
    if bt not in (1, b) or ht not in (1, h):
        raise ValueError(f"table batch/heads ({bt}, {ht}) must be 1 or the inputs' ({b}, {h})")
    m4 = _check_mask(mask, b, h, sq, sk)
    dtype = _compute_dtype(q)
    dev = q.device
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=dtype, device=dev)
    lse = torch.full((b, h, sq), -math.inf, dtype=dtype, device=dev)
    bq, bk = table.block_q, table.block_k
    rows = max(bq, chunk // bq * bq)
    offset = sk - sq
    for h0, h1 in _head_batches(h, b * min(rows, sq) * sk):
        heads = torch.arange(h0, h1, device=dev)
        for r0 in range(0, sq, rows):
            r1 = min(sq, r0 + rows)
            a0, a1 = r0 // bq, -(-r1 // bq)
            blocks = table.dense_block_rows(a0, a1).to(dev)
            if ht != 1:
                blocks = blocks[:, h0:h1]
            chosen = blocks.flatten(0, 2).any(0).nonzero().squeeze(-1)
            if chosen.numel() == 0:
                continue
            keys = (chosen[:, None] * bk + torch.arange(bk, device=dev)).flatten()
            keys = keys[keys < sk]
            row_block = torch.arange(r0, r1, device=dev) // bq - a0
            keep = blocks[:, :, row_block][..., keys // bk]
            if table.causal:
                pos = torch.arange(r0, r1, device=dev) + offset
                keep = keep & (keys[None, :] <= pos[:, None])
            bool_m, add_m = _split_mask(None if m4 is None else _mask_tile(m4, heads, r0, r1, keys), dtype)
            if bool_m is not None:
                keep = keep & bool_m
            q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, r0, r1, keys, dtype)
            o_t, l_t = _attend(q_t, k_t, v_t, keep, add_m, scale)
            out[:, h0:h1, r0:r1] = o_t
            lse[:, h0:h1, r0:r1] = l_t
    return _finish(out, lse, q, return_lse)


def dense_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool,
                        mask: Optional[Tensor] = None, return_lse: bool = False) -> AttentionOut:
    """Dense attention with the full ``Sq x Sk`` matrix, for tests and small sizes.

    Same conventions as the sparse references (GQA mapping, bottom-right
    causality, bool/float ``mask``, empty rows give zeros); float64 inputs are
    computed in float64.
    """
    b, h, sq, sk, group = _check_qkv(q, k, v)
    m4 = _check_mask(mask, b, h, sq, sk)
    dtype = _compute_dtype(q)
    heads = torch.arange(h, device=q.device)
    keys = torch.arange(sk, device=q.device)
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keys[None, :] <= (torch.arange(sq, device=q.device) + sk - sq)[:, None]
    bool_m, add_m = _split_mask(m4, dtype)
    if bool_m is not None:
        keep = keep & bool_m
    q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, 0, sq, keys, dtype)
    out, lse = _attend(q_t, k_t, v_t, keep, add_m, scale)
    return _finish(out, lse, q, return_lse)
