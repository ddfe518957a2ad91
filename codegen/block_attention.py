"""Sparse attention: streaming (sink + window) and block-table attention.

Layout of this file: module notes, then the **reference** section (plain
PyTorch, chunked, the ground truth for the kernels), then the **kernel
wrappers** (validation, dense dispatch, launch). The streaming rule as the
kernels take it and which kernel a streaming call runs live in
``streaming_rules.py``. The Triton jit code lives in
``block_attention_kernels.py`` (prefill) and ``decode_attention.py`` (decode);
both are imported only when a wrapper first runs, never at import time.

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

import functools
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from sparsecc.codegen.hopper_prefill import (hopper_prefill, hopper_prefill_fits, hopper_table_fits,
                                             hopper_table_prefill)
from sparsecc.codegen.launch import launcher, tracing
from sparsecc.codegen.mask_positions import leading_padding, mask_4d
from sparsecc.codegen.streaming_rules import (  # noqa: F401 - kernel_rules, rule_vectors: part of this interface
    DECODE_MAX_Q, kernel_rules, kernels_take, rule_vectors, runs_sdpa, streaming_rules_per_head)
from sparsecc.layouts import FULL_WINDOW, BlockTable

__all__ = ["rule_vectors", "kernel_rules", "FULL_WINDOW", "streaming_attention_ref", "block_sparse_attention_ref", "dense_attention_ref",
           "streaming_attention", "block_sparse_attention", "streaming_attention_op", "block_sparse_attention_op",
           # shared with the other attention modules of codegen/
           "compute_dtype", "check_qkv", "check_mask", "attend_kept", "split_mask", "streaming_rules_per_head",
           "mask_args", "launch_prefill", "attention_kernel_ok"]

# Upper bound on the elements of one score tile (batch x heads x rows x keys): with the
# exp, mask and product temporaries this keeps a reference step under ~1 GiB.
_SCORE_BUDGET = 1 << 25

AttentionOut = Union[Tensor, tuple[Tensor, Tensor]]

# ============================================================== reference


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the references compute in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
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


def check_mask(mask: Optional[Tensor], b: int, h: int, sq: int, sk: int) -> Optional[Tensor]:
    """Return ``mask`` viewed as 4-d (size-1 dims kept for broadcasting), after checking it broadcasts."""
    if mask is None:
        return None
    if mask.dim() > 4:
        raise ValueError(f"mask has {mask.dim()} dims; expected at most 4")
    m = mask_4d(mask)
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


def attend_kept(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, add: Optional[Tensor], scale: float
                ) -> tuple[Tensor, Tensor]:
    """Softmax attention of one tile over its kept keys; returns ``(out, lse)``.

    Rows with no kept key (or only ``-inf`` scores) give zeros and ``lse = -inf``
    rather than the NaN a plain softmax would.
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if add is not None:
        s = s + add
    s = s.masked_fill(~keep, -math.inf)
    if s.shape[-1] == 0:  # no keys at all (Sk = 0): amax has nothing to reduce, and every row keeps nothing
        row_max = s.new_zeros(*s.shape[:-1], 1)
    else:
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


def split_mask(m: Optional[Tensor], dtype: torch.dtype) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(bool_part, additive_part)`` of a mask tile."""
    if m is None:
        return None, None
    if m.dtype == torch.bool:
        return m, None
    return None, m.to(dtype)


def _finish(out: Tensor, lse: Tensor, q: Tensor, return_lse: bool) -> AttentionOut:
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


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


def _streaming_keep(p: Tensor, j: Tensor, sink: Union[int, Tensor], window: int, causal: bool) -> Tensor:
    """The element rule of ``Streaming`` (see ``sparsecc.forms``) for positions ``p`` x keys ``j``; ``sink`` may be a
    tensor that broadcasts against them (a per-element sink moved past its left padding)."""
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

    With a mask and not ``causal`` (the model passed its causality, if any, in the mask), positions count from
    each batch element's first key the mask shows to some row (its left padding, ``leading_padding``;
    docs/spec.md): a left-padded sequence attends as it does alone. With the padding's keys hidden, that is the
    same rule with the element's sink moved past its padding (a per-element sink; such calls read every key).

    Query rows are processed ``chunk`` at a time, each against the union of its
    sink range and window range only, and heads sharing a rule are batched, so
    memory is O(chunk * (sink + chunk + window)) per head, never O(Sq * Sk).
    Returns ``out`` ``[B, H, Sq, Dv]`` in ``q.dtype`` (and ``lse`` ``[B, H, Sq]``
    when ``return_lse``).
    """
    b, h, sq, sk, group = check_qkv(q, k, v)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is not allowed; expected an integer >= 1")
    sinks, windows = streaming_rules_per_head(sink, window, h)
    m4 = check_mask(mask, b, h, sq, sk)
    # Without is_causal a mask may left-pad an element: its sink is a per-element tensor (no host read-back, so
    # the reference traces too), and each chunk reads every key (a bidirectional tile is that wide already).
    starts = None if causal else leading_padding(m4, b, sq, sk)
    dtype = compute_dtype(q)
    dev = q.device
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=dtype, device=dev)
    lse = torch.full((b, h, sq), -math.inf, dtype=dtype, device=dev)
    offset = sk - sq
    rules: dict[tuple[int, int], list[int]] = {}
    for head, rule in enumerate(zip(sinks, windows)):
        rules.setdefault(rule, []).append(head)
    for (s_, w_), heads_of_rule in rules.items():
        widest = sk if w_ == FULL_WINDOW or not causal else min(sk, s_ + min(chunk, sq) + w_)
        sink_of = s_ if starts is None else (starts.to(torch.long) + s_).view(b, 1, 1, 1)
        for h0, h1 in _head_batches(len(heads_of_rule), b * min(chunk, sq) * widest):
            heads = torch.tensor(heads_of_rule[h0:h1], device=dev)
            for r0 in range(0, sq, chunk):
                r1 = min(sq, r0 + chunk)
                if starts is None:
                    keys = _streaming_keys(r0 + offset, r1 - 1 + offset, s_, w_, sk, causal, dev)
                else:
                    keys = torch.arange(sk, device=dev)
                if keys.numel() == 0:
                    continue
                pos = torch.arange(r0, r1, device=dev) + offset
                keep = _streaming_keep(pos[:, None], keys[None, :], sink_of, w_, causal)
                bool_m, add_m = split_mask(None if m4 is None else _mask_tile(m4, heads, r0, r1, keys), dtype)
                if bool_m is not None:
                    keep = keep & bool_m
                q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, r0, r1, keys, dtype)
                o_t, l_t = attend_kept(q_t, k_t, v_t, keep, add_m, scale)
                out[:, heads, r0:r1] = o_t
                lse[:, heads, r0:r1] = l_t
    return _finish(out, lse, q, return_lse)


def block_sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, table: BlockTable, scale: float,
                               mask: Optional[Tensor] = None, return_lse: bool = False,
                               chunk: int = 1024) -> AttentionOut:
    """Reference attention over a :class:`~sparsecc.layouts.BlockTable`.

    Keeps the table's kept blocks (full and partial), then at token level
    bottom-right causality when ``table.causal`` (the sequence ends are implicit:
    keys past ``Sk`` do not exist), intersected with ``mask``. Query row ``i``
    reads table row ``i + lead`` (``lead = table.seq_q - Sq``, the table's lead
    rows; see ``sparsecc.layouts``). A table with ``Bt == 1`` / ``Ht == 1``
    broadcasts over batch / heads. Table rows go ``chunk`` at a time (rounded
    down to whole query blocks, at least one), each against the union of the
    key blocks its row blocks keep.
    """
    b, h, sq, sk, group = check_qkv(q, k, v)
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is not allowed; expected an integer >= 1")
    lead = table.lead_rows(sq, sk)
    bt, ht = table.kv_num_blocks.shape[:2]
    if bt not in (1, b) or ht not in (1, h):
        raise ValueError(f"table batch/heads ({bt}, {ht}) must be 1 or the inputs' ({b}, {h})")
    m4 = check_mask(mask, b, h, sq, sk)
    dtype = compute_dtype(q)
    dev = q.device
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=dtype, device=dev)
    lse = torch.full((b, h, sq), -math.inf, dtype=dtype, device=dev)
    bq, bk = table.block_q, table.block_k
    rows = max(bq, chunk // bq * bq)
    offset = sk - sq
    for h0, h1 in _head_batches(h, b * min(rows, sq) * sk):
        heads = torch.arange(h0, h1, device=dev)
        # Steps are aligned to the table's row blocks; r0:r1 are the query rows of one step.
        for t0 in range(0, table.seq_q, rows):
            r0, r1 = max(0, t0 - lead), min(sq, t0 + rows - lead)
            a0, a1 = (r0 + lead) // bq, -(-(r1 + lead) // bq)
            blocks = table.dense_block_rows(a0, a1).to(dev)
            if ht != 1:
                blocks = blocks[:, h0:h1]
            chosen = blocks.flatten(0, 2).any(0).nonzero().squeeze(-1)
            if chosen.numel() == 0:
                continue
            keys = (chosen[:, None] * bk + torch.arange(bk, device=dev)).flatten()
            keys = keys[keys < sk]
            row_block = (torch.arange(r0, r1, device=dev) + lead) // bq - a0
            keep = blocks[:, :, row_block][..., keys // bk]
            if table.causal:
                pos = torch.arange(r0, r1, device=dev) + offset
                keep = keep & (keys[None, :] <= pos[:, None])
            bool_m, add_m = split_mask(None if m4 is None else _mask_tile(m4, heads, r0, r1, keys), dtype)
            if bool_m is not None:
                keep = keep & bool_m
            q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, r0, r1, keys, dtype)
            o_t, l_t = attend_kept(q_t, k_t, v_t, keep, add_m, scale)
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
    b, h, sq, sk, group = check_qkv(q, k, v)
    m4 = check_mask(mask, b, h, sq, sk)
    dtype = compute_dtype(q)
    heads = torch.arange(h, device=q.device)
    keys = torch.arange(sk, device=q.device)
    keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        keep = keys[None, :] <= (torch.arange(sq, device=q.device) + sk - sq)[:, None]
    bool_m, add_m = split_mask(m4, dtype)
    if bool_m is not None:
        keep = keep & bool_m
    q_t, k_t, v_t = _tile_inputs(q, k, v, heads, group, 0, sq, keys, dtype)
    out, lse = attend_kept(q_t, k_t, v_t, keep, add_m, scale)
    return _finish(out, lse, q, return_lse)


# ============================================================== kernel wrappers

# A table block must be a power of two of at least this size: tl.dot needs 16-wide tiles.
MIN_TABLE_BLOCK = 16


def attention_kernel_ok(q: Tensor, k: Tensor, v: Tensor, scale: float) -> bool:
    """Whether the Triton kernels take these inputs (else the reference runs).

    The kernels fold ``scale`` into the exponent after the row max, which needs ``scale > 0``.
    """
    return (kernels_take((q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]), scale, q.shape[2],
                         k.shape[2]) and q.device == k.device == v.device)


def mask_args(m4: Optional[Tensor], q: Tensor, b: int, h: int, sq: int, sk: int) -> tuple:
    """(tensor, strides, has_mask, is_bool) for the kernels; a broadcast mask keeps stride 0 on its size-1 dims."""
    if m4 is None:
        return q, (0, 0, 0, 0), False, False
    m = m4.expand(b, h, sq, sk)
    if m.dtype == torch.bool and not tracing(q):
        # Same storage, read as bytes. While traced the bool tensor goes as is (a pointer to i1, one byte per
        # element): Inductor cannot lower a bool-to-uint8 view.
        m = m.view(torch.uint8)
    return m, tuple(m.stride()), True, m4.dtype == torch.bool


def _into(out: Optional[Tensor], result: AttentionOut) -> AttentionOut:
    """Copy a non-kernel result into ``out`` when the caller gave one (kernel paths write it directly)."""
    if out is None:
        return result
    if isinstance(result, tuple):
        out.copy_(result[0])
        return out, result[1]
    out.copy_(result)
    return out


def _dense_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """``F.scaled_dot_product_attention`` with repeat_interleave GQA (for exactly dense layouts)."""
    import torch.nn.functional as F

    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=group > 1)


def launch_prefill(q: Tensor, k: Tensor, v: Tensor, m4: Optional[Tensor], scale: float, causal: bool,
                   return_lse: bool, sinks: Optional[Tensor] = None, windows: Optional[Tensor] = None,
                   table: Optional[BlockTable] = None, out: Optional[Tensor] = None,
                   config: Optional[dict] = None, key_start: Optional[Tensor] = None) -> AttentionOut:
    """Run the prefill kernel: streaming when only ``sinks``/``windows`` are given, the block table when only
    ``table`` is, and both per head when both are (a head with window 0 reads the table).

    ``key_start`` (int32 ``[B]``, streaming heads only): each batch element's left padding
    (``leading_padding``); its streaming heads count positions from that key.

    ``out`` (contiguous in its last dim, shaped like ``q``) receives the result when given.
    ``config`` (keys BLOCK_M, BLOCK_N, USE_TMA, num_warps, num_stages)
    bypasses the autotuner: ``bench/attention_sweep.py`` times configs one by one with it.
    """
    import triton

    from sparsecc.codegen import block_attention_kernels as kern

    b, h, sq, sk, group = check_qkv(q, k, v)
    d = q.shape[-1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q) if out is None else out
    # Without return_lse the LSE pointer is never touched: q, which the launch only reads (codegen/launch.py).
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device) if return_lse else q
    mask_t, mask_strides, has_mask, mask_bool = mask_args(m4, q, b, h, sq, sk)
    block_d = max(MIN_TABLE_BLOCK, triton.next_power_of_2(d))
    # TMA loads measured 4% faster on streaming layouts and no faster on tables (bench/attention_sweep.py),
    # so only the streaming tuner gets the extra configs (each one costs autotuning time).
    # While traced for Inductor the kernel launches from Inductor's wrapper, which sets up no allocator for
    # descriptors made in the kernel: TMA is used on eager launches only.
    tma = table is None and not tracing(q) and kern.tma_supported(k, v)   # the check reads data pointers
    if tma:
        kern.enable_descriptors()
    lead = 0
    if table is None:
        layout, block_q, block_k = kern.LAYOUT_STREAMING, 0, 0
        tbl = (q, q, q, q)
        tbl_strides = (0,) * 8
        kernel = kern.prefill_kernel(block_d, tma=tma)
    else:
        layout, block_q, block_k = kern.LAYOUT_TABLE, table.block_q, table.block_k
        lead = table.lead_rows(sq, sk)
        num = table.kv_num_blocks.to(q.device).expand(b, h, -1)
        fnum = table.full_kv_num_blocks.to(q.device).expand(b, h, -1)
        idx = table.kv_indices.to(q.device).expand(b, h, -1, -1)
        fidx = table.full_kv_indices.to(q.device).expand(b, h, -1, -1)
        if num.stride(-1) != 1 or idx.stride(-1) != 1 or fidx.stride(-1) != 1 or fnum.stride() != num.stride():
            num, fnum, idx, fidx = (t.contiguous() for t in (num, fnum, idx, fidx))
        tbl = (num, idx, fnum, fidx)
        tbl_strides = (num.stride(0), num.stride(1), *idx.stride()[:3], *fidx.stride()[:3])
        if sinks is None:
            sinks = windows = num  # unused by the table layout
        else:
            layout = kern.LAYOUT_MIXED  # per head: window 0 reads the table, others their bounds
        kernel = kern.prefill_kernel(block_d, block_q, block_k, tma=tma)

    extra = {}
    if config is not None:
        kernel, extra = kern._prefill_kernel, dict(config)
        if extra.get("USE_TMA"):
            kern.enable_descriptors()

    def grid(meta):
        # Tiles are aligned to table rows (query row i is table row i + lead); only tiles holding a query run.
        return ((lead + sq - 1) // meta["BLOCK_M"] - lead // meta["BLOCK_M"] + 1, b * h)

    if key_start is not None and table is not None:
        raise ValueError("launch_prefill: key_start applies to the streaming layout only")
    launcher(kernel, q)[grid](q, k, v, out, lse, mask_t, sinks, windows, q if key_start is None else key_start, *tbl,
                 *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mask_strides, *tbl_strides,
                 h, sq, sk, lead, scale * kern.LOG2E.value, 1.0 / scale, triton.next_power_of_2(sk),
                 GROUP=group, LAYOUT=layout, CAUSAL=causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
                 WRITE_LSE=return_lse, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_Q=max(block_q, 1), BLOCK_K=max(block_k, 1),
                 UPCAST_DOT=kern.interpreting(), HAS_KEY0=key_start is not None, **extra)
    return (out, lse) if return_lse else out


def streaming_attention(q: Tensor, k: Tensor, v: Tensor, *, sink: Sequence[int], window: Sequence[int],
                        scale: float, causal: bool, mask: Optional[Tensor] = None,
                        return_lse: bool = False, out: Optional[Tensor] = None) -> AttentionOut:
    """Streaming (sink + window) attention on the Triton kernels; same contract as :func:`streaming_attention_ref`.

    ``out``, when given, receives the output (tests pass a NaN-poisoned buffer).

    Dispatch: fp32/fp64 inputs, mismatched v head dim or head dims over 256 run
    the reference; an exactly dense layout (every head FULL_WINDOW or a window
    covering the sequence) with no mask and no lse request, and aligned
    causality (``Sq == Sk`` or not causal), runs ``F.scaled_dot_product_attention``;
    a causal prefill of at least 128 rows with no mask (one rule for every head or
    one per head) runs the Gluon program on sm_90 (``codegen/hopper_prefill.py``);
    ``Sq <= 16`` runs the split-KV decode kernel; everything else the prefill
    kernel with the key ranges computed in the kernel.
    """
    b, h, sq, sk, group = check_qkv(q, k, v)
    sinks, windows = streaming_rules_per_head(sink, window, h)
    m4 = check_mask(mask, b, h, sq, sk)
    if not attention_kernel_ok(q, k, v, scale):
        return _into(out, streaming_attention_ref(q, k, v, sink=sinks, window=windows, scale=scale, causal=causal,
                                                  mask=mask, return_lse=return_lse))
    if runs_sdpa(sinks, windows, sq, sk, causal, m4 is not None, return_lse, q.device):
        return _into(out, _dense_sdpa(q, k, v, scale, causal))
    snk, win = kernel_rules(sinks, windows, sq, sk)
    # streaming_runs_hopper_program's last step: the reference and SDPA cases are behind us, the rules capped.
    if hopper_prefill_fits(q.device, (q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]), sq, sk,
                           causal=causal, masked=m4 is not None, return_lse=return_lse, sinks=snk, windows=win):
        return _into(out, hopper_prefill(q, k, v, snk, win, scale))
    starts = None if causal else leading_padding(m4, b, sq, sk)   # on the device: no host sync, traceable
    if sq <= DECODE_MAX_Q:
        from sparsecc.codegen import decode_attention

        if decode_attention.decode_supported(group, sq):
            # The decode wrapper makes the per-head vectors only when the heads' rules differ: one rule goes to
            # the kernel as scalars (while traced, each vector would be a constant copied to the device per call).
            return decode_attention.streaming_decode(q, k, v, m4, scale, causal, None, None, return_lse,
                                                     out=out, rules=(snk, win), key_start=starts)
    sinks_t, windows_t = rule_vectors(tuple(snk), tuple(win), q)
    return launch_prefill(q, k, v, m4, scale, causal, return_lse, sinks=sinks_t, windows=windows_t, out=out,
                          key_start=starts)


@functools.lru_cache(maxsize=32)
def _table_is_dense(table: BlockTable) -> bool:
    """True when the table keeps every causally allowed block for every batch and head.

    Cached per table (tables are immutable): the count comparison reads device memory back, a host sync.
    """
    n_q, n_k = table.num_q_blocks, table.num_k_blocks
    if not table.causal:
        allowed = n_q * n_k
    else:
        last_row = torch.clamp((torch.arange(n_q) + 1) * table.block_q, max=table.seq_q) - 1 + table.q_offset
        allowed = int(torch.clamp(last_row // table.block_k + 1, min=0, max=n_k).sum())
    kept = table.kv_num_blocks.sum(-1) + table.full_kv_num_blocks.sum(-1)
    return bool((kept == allowed).all())


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, *, table: BlockTable, scale: float,
                           mask: Optional[Tensor] = None, return_lse: bool = False,
                           out: Optional[Tensor] = None) -> AttentionOut:
    """Block-table attention on the Triton kernel; same contract as :func:`block_sparse_attention_ref`.

    Full blocks skip every per-element test, partial blocks apply causality
    and the sequence end; the user mask applies everywhere. Tables whose
    blocks are not powers of two >= 16, and non-fp16/bf16 inputs, run the
    reference; a table that keeps every allowed block (with no mask, no lse
    request and aligned causality) runs SDPA; a causal 128 x 128 table over
    ``Sq == Sk`` without mask runs the Gluon program on sm_90
    (``codegen/hopper_prefill.py``). ``out``, when given, receives the output.
    """
    b, h, sq, sk, group = check_qkv(q, k, v)
    table.lead_rows(sq, sk)
    bt, ht = table.kv_num_blocks.shape[:2]
    if bt not in (1, b) or ht not in (1, h):
        raise ValueError(f"table batch/heads ({bt}, {ht}) must be 1 or the inputs' ({b}, {h})")
    m4 = check_mask(mask, b, h, sq, sk)
    blocks_ok = all(x >= MIN_TABLE_BLOCK and x & (x - 1) == 0 for x in (table.block_q, table.block_k))
    if not (attention_kernel_ok(q, k, v, scale) and blocks_ok):
        return _into(out, block_sparse_attention_ref(q, k, v, table=table, scale=scale, mask=mask,
                                                     return_lse=return_lse))
    if (m4 is None and not return_lse and (sq == sk or not table.causal) and q.device.type == "cuda"
            and _table_is_dense(table)):
        return _into(out, _dense_sdpa(q, k, v, scale, table.causal))
    if hopper_table_fits(q, k, v, table, masked=m4 is not None, return_lse=return_lse):
        return _into(out, hopper_table_prefill(q, k, v, table, scale))
    return launch_prefill(q, k, v, m4, scale, table.causal, return_lse, table=table, out=out)


def streaming_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                           sink: Sequence[int], window: Sequence[int]) -> Tensor:
    """The ``torch.ops.sparsecc.streaming_attention`` kernel callable (argument order of the op's reference)."""
    return streaming_attention(q, k, v, sink=sink, window=window, scale=scale, causal=causal, mask=mask)


def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                              table: BlockTable) -> Tensor:
    """The ``torch.ops.sparsecc.block_sparse_attention`` kernel callable (argument order of the op's reference)."""
    return block_sparse_attention(q, k, v, table=table, scale=scale, mask=mask)
