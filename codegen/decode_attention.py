"""Sparse decode attention (1-16 query rows): flash-decoding split-KV over the kept key blocks only, in one launch.

The semantics are those of ``streaming_attention_ref`` (sink + window per head,
bottom-right causality, optional bool/additive mask). Decode is bound by
reading K/V, so the kernel is shaped around reading every kept K/V tile once,
at the memory's speed, with as little else as possible around it:

* **Head packing.** The ``G = H // Hkv`` query heads that share a kv head, and
  their ``Sq`` rows, form one ``M = G * Sq`` row tile (padded to 16 for
  ``tl.dot``). Row ``r`` is head ``kvh * G + r // Sq``, query row ``r % Sq``.
* **Split-KV over kept blocks.** The kept key blocks of a kv head are the sink
  blocks followed by the window blocks; they are numbered ``0..n_kept`` and cut
  into ``n_split`` equal runs, one program each. The split count fills the GPU
  with about ``programs_per_sm`` long programs per SM (each streams many K/V
  tiles through a software pipeline), not with many short ones: short splits
  pay the Q load and the partial store per few tiles, and make the merge large.
* **Merge in the same launch.** With one split a program normalises and stores
  its rows itself. With several, each program stores its normalised partial
  output and base-2 logsumexp (real rows only), then takes a ticket from a
  per-(batch, kv head) counter; the program that draws the last ticket merges
  the ``n_split`` partials, stores the output and resets the counter to zero
  for the next call. The counters live in a zeroed int32 buffer that every
  complete call leaves zeroed again (cached per device and stream for eager
  calls; a fresh zeroed tensor while traced, see :func:`~sparsecc.codegen.launch.ticket_counters`).

* **Rules per head.** The heads of one kv group may have different sinks and
  windows (and dense heads among them): the kv head then walks the blocks of
  the group's widest sink and widest window, so its K/V is still read once for
  the whole group, and each packed row masks the keys to its own head's rule.

Works on a contiguous KV cache ``[B, Hkv, S, D]`` (any strides with a unit
last dim), for at most :data:`~sparsecc.codegen.streaming_rules.MAX_PACKED_ROWS`
packed rows (checked by :func:`decode_supported`; wider groups use the prefill
kernel).

This module imports Triton at the top: it is only imported by the kernel
wrappers and the op loaders, never by ``import sparsecc``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparsecc.codegen.block_attention_kernels import LN2, LOG2E, interpreting
from sparsecc.codegen.launch import launcher, round_to_dtype, sm_count, ticket_counters, tracing
# The kernel's layout rule lives with the other streaming dispatch rules (no Triton there: the compiler asks it).
from sparsecc.codegen.streaming_rules import decode_supported, per_head_rules
from sparsecc.forms import MASKED_LOGIT_MAX

# tl.dot needs at least 16 rows and 16 columns.
MIN_TILE = 16
# Each split walks at least this many key blocks, so the merge stays a small share of the work.
MIN_BLOCKS_PER_SPLIT = 2


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel (a config changes speed, never the computed function).

    ``block_n`` keys per K/V tile; ``num_warps``/``num_stages`` as Triton's; the split count is
    ``programs_per_sm * SMs // (B * Hkv)`` (at least 1, at most one split per ``MIN_BLOCKS_PER_SPLIT``
    kept blocks); ``n_split`` sets that count instead, with the same cap.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    n_split: Optional[int] = None


# The shipped launch shape for up to 16 packed rows and head dims up to 128 (bench/decode_kernel.py --sweep, H200, B=8,
# Hkv=8, D=128: 128-key tiles, 4 warps, 3 stages, one program per SM; two splits per kv head at B=8).
DEFAULT_CONFIG = DecodeConfig(block_n=128, num_warps=4, num_stages=3, programs_per_sm=1)
"""The decode kernel's launch shape for up to 16 packed rows and head dims up to 128."""
# Wider row tiles or head dims: 64-key tiles, so the score tile and the shared-memory stages stay as large.
WIDE_CONFIG = DecodeConfig(block_n=64, num_warps=4, num_stages=3, programs_per_sm=2)
"""The decode kernel's launch shape for more packed rows or wider heads."""
# Under the interpreter: small tiles keep the tiny test shapes cheap and still cross tile borders.
INTERPRETER_CONFIG = DecodeConfig(block_n=16, num_warps=4, num_stages=1)


@triton.jit
def _store_rows(O, LSE, out, lse2, b, head, row, r_ok, offs_d, stride_ob, stride_oh, stride_om, n_heads, seq_q,
                WRITE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the packed rows' output (and the natural-log lse) at their heads' places."""
    o_ptrs = O + b * stride_ob + head[:, None].to(tl.int64) * stride_oh + row[:, None] * stride_om + offs_d[None, :]
    if HEAD_DIM == BLOCK_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None])
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    if WRITE_LSE:
        tl.store(LSE + (b * n_heads + head) * seq_q + row, lse2 * LN2, mask=r_ok)


@triton.jit
def _merge_splits(O, LSE, O_PART, L_PART, first, n_parts, b, kvh, stride_ob, stride_oh, stride_om, n_heads, seq_q,
                  GROUP: tl.constexpr, WRITE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_R: tl.constexpr, MERGE_S: tl.constexpr):
    """Merge the partials ``first .. first + n_parts`` of one (batch, kv head), ``MERGE_S`` per load (one round
    trip each).

    Weights ``2^(lse_s - lse)``; rows that kept nothing in any split give 0 and ``-inf``.
    """
    offs_s = tl.arange(0, MERGE_S)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < GROUP * seq_q
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    merged = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, n_parts, MERGE_S):
        s_ok = (s0 + offs_s) < n_parts
        part = first + s0 + offs_s
        ok2 = s_ok[:, None] & r_ok[None, :]
        lse_s = tl.load(L_PART + part[:, None] * BLOCK_R + offs_r[None, :], mask=ok2, other=float("-inf"),
                        cache_modifier=".cg")
        o_ptrs = O_PART + ((part[:, None, None] * BLOCK_R + offs_r[None, :, None]) * BLOCK_D + offs_d[None, None, :])
        o_s = tl.load(o_ptrs, mask=ok2[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(lse_s, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_run - m_use)
        w = tl.math.exp2(lse_s - m_use[None, :])
        total = total * alpha + tl.sum(w, 0)
        merged = merged * alpha[:, None] + tl.sum(w[:, :, None] * o_s, 0)
        m_run = m_new
    t_safe = tl.where(total > 0, total, 1.0)
    merged = tl.where((total > 0)[:, None], merged / t_safe[:, None], 0.0)
    lse2 = tl.where(total > 0, m_run + tl.math.log2(t_safe), float("-inf"))
    _store_rows(O, LSE, merged, lse2, b, kvh * GROUP + offs_r // seq_q, offs_r % seq_q, r_ok, offs_d, stride_ob,
                stride_oh, stride_om, n_heads, seq_q, WRITE_LSE, HEAD_DIM, BLOCK_D)


@triton.jit
def _kv_head_rows(b, kvh, last_pos, key0, sink, window, seq_q, seq_k, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_KEY0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (batch ``b``, kv head ``kvh``)'s packed query rows and its kept key blocks.

    ``last_pos`` is the position of the last query row, ``sink`` and ``window`` the kv head's rule, ``key0`` the
    element's first key after its left padding (with ``HAS_KEY0``): all already loaded by the caller. Returns
    ``(head, row, pos, r_ok, sink, sink_first, n_sink, wb, n_kept)``: the kept blocks are the ``n_sink`` sink blocks
    from ``sink_first`` followed by the window blocks from ``wb``, ``n_kept`` in all. With ``HAS_KEY0`` the sink
    starts after the padding, and the sink blocks start at the padding's last block.

    Takes no pointer: Inductor's mutation analysis takes a helper's results to depend on every argument, and these
    results place the output's stores, so a pointer passed here would read as written and be copied before every
    launch of the compiled graph.
    """
    offset = last_pos - seq_q + 1
    offs_r = tl.arange(0, BLOCK_M)
    row = offs_r % seq_q
    r_ok = offs_r < GROUP * seq_q
    head = kvh * GROUP + offs_r // seq_q
    pos = row + offset
    sink_first = 0
    if HAS_KEY0:
        sink = sink + key0
        sink_first = key0 // BLOCK_N
    p0 = offset
    p1 = offset + seq_q - 1
    if CAUSAL:
        hi = tl.minimum(p1 + 1, seq_k)
    else:
        hi = tl.minimum(p1 + window, seq_k)
    lo = tl.maximum(p0 - window + 1, 0)
    sink_hi = tl.minimum(sink, hi)
    if not CAUSAL:
        if p0 < sink:
            sink_hi = seq_k
            lo = seq_k
    hi = tl.maximum(hi, 0)
    sink_end = tl.cdiv(tl.maximum(sink_hi, 0), BLOCK_N)
    n_sink = tl.maximum(sink_end - sink_first, 0)
    wb = tl.maximum(lo // BLOCK_N, sink_end)
    we = tl.maximum(tl.cdiv(hi, BLOCK_N), wb)
    return head, row, pos, r_ok, sink, sink_first, n_sink, wb, n_sink + we - wb


@triton.jit
def _attend_blocks(q, K, V, MASK, b, kvh, head, row, pos, r_ok, sink, window, sink_first, n_sink, wb, t0, t1, seq_k,
                   qk_scale,
                   stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, EVEN_N: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST_DOT: tl.constexpr):
    """Online softmax of the packed rows over the kept blocks ``[t0, t1)``: returns ``(acc, l, m)`` (base 2).

    ``sink`` and ``window`` mask the keys: the kv head's one rule as scalars, or each row's own as ``[BLOCK_M, 1]``
    columns (heads of one kv group with different rules)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kvh.to(tl.int64) * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for t in range(t0, t1):
        nb = tl.where(t < n_sink, sink_first + t, wb + t - n_sink)
        cols = nb * BLOCK_N + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
        if EVEN_N and HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kv_ok = (cols < seq_k)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)
        if UPCAST_DOT:  # the triton 3.9 interpreter multiplies bf16 dot operands as raw integers
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        keep = r_ok[:, None] & (cols < seq_k)[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
            keep = keep & ((cols[None, :] < sink) | (pos[:, None] - cols[None, :] < window))
        else:
            dist = pos[:, None] - cols[None, :]
            keep = keep & ((cols[None, :] < sink) | (pos[:, None] < sink) | ((dist < window) & (dist > -window)))
        if HAS_MASK:
            m_ptrs = (MASK + b * stride_mb + head[:, None].to(tl.int64) * stride_mh + row[:, None] * stride_mm
                      + cols[None, :] * stride_mn)
            if MASK_BOOL:
                keep = keep & (tl.load(m_ptrs, mask=keep, other=0) != 0)
            else:
                s = s + tl.load(m_ptrs, mask=keep, other=0.0).to(tl.float32) * LOG2E
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with only -inf scores so far shift by 0 rather than -inf (avoids NaN from -inf - -inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if UPCAST_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _finish_rows(O, LSE, O_PART, L_PART, COUNTERS, acc, l_i, m_i, b, kvh, head, row, r_ok, bkv, part, first_part,
                 n_parts, stride_ob, stride_oh, stride_om, n_heads, seq_q, SPLIT: tl.constexpr,
                 GROUP: tl.constexpr, WRITE_LSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, MERGE_S: tl.constexpr):
    """Without ``SPLIT`` (this program saw every kept block of the kv head) store the rows; with it store partial
    ``part``, take a ticket from the kv head's counter, and merge the ``n_parts`` partials from ``first_part`` when
    it is the last one."""
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
    if not SPLIT:
        _store_rows(O, LSE, out, lse2, b, head, row, r_ok, offs_d, stride_ob, stride_oh, stride_om, n_heads, seq_q,
                    WRITE_LSE, HEAD_DIM, BLOCK_D)
    else:
        # Partials, real rows only: [n_partials, BLOCK_R, BLOCK_D] and [n_partials, BLOCK_R].
        tl.store(O_PART + (part * BLOCK_R + offs_r[:, None]) * BLOCK_D + offs_d[None, :], out, mask=r_ok[:, None])
        tl.store(L_PART + part * BLOCK_R + offs_r, lse2, mask=r_ok)
        # Every thread's partial stores happen before the ticket (release); the last ticket's reads after (acquire).
        tl.debug_barrier()
        ticket = tl.atomic_add(COUNTERS + bkv, 1, sem="acq_rel", scope="gpu")
        if ticket == n_parts - 1:
            _merge_splits(O, LSE, O_PART, L_PART, first_part, n_parts, b, kvh, stride_ob, stride_oh, stride_om,
                          n_heads, seq_q, GROUP, WRITE_LSE, HEAD_DIM, BLOCK_D, BLOCK_R, MERGE_S)
            tl.store(COUNTERS + bkv, 0)   # every part of this kv head has drawn its ticket: ready for the next call


@triton.jit
def _decode_split_kernel(Q, K, V, MASK, SINK, WINDOW, POS, KEY0, O, LSE, O_PART, L_PART, COUNTERS,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
                         stride_ob, stride_oh, stride_om,
                         n_kv_heads, seq_q, seq_k, qk_scale, blocks_per_split, n_split, sink_all, window_all,
                         pos_parts, key0_parts,
                         PER_HEAD: tl.constexpr, ROW_RULES: tl.constexpr, GROUP: tl.constexpr,
                         CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                         MASK_BOOL: tl.constexpr, HAS_POS: tl.constexpr, HAS_KEY0: tl.constexpr,
                         SPLIT: tl.constexpr,
                         WRITE_LSE: tl.constexpr, EVEN_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_R: tl.constexpr, MERGE_S: tl.constexpr, POS_BLOCK: tl.constexpr,
                         KEY0_BLOCK: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """One split of one (batch, kv head): attend the packed rows to kept blocks ``[t0, t1)``.

    Without ``SPLIT`` (one split per kv head) the program stores the output. With
    it, the program stores its normalised partial output and base-2 logsumexp
    (``-inf`` for rows that kept nothing) and the last of the kv head's splits
    to finish merges them. With ``HAS_POS`` the last query row sits at the largest
    of ``POS[b, :pos_parts]`` (a static cache's fill level; ``seq_k - 1`` when all
    are negative) instead of ``seq_k - 1``; splits past this position's kept blocks
    store empty partials. With ``HAS_KEY0`` the element's first
    ``min(KEY0[b, :key0_parts])`` keys are its left padding (its sink starts after
    them). Parts, as :func:`mask_ends` writes them: one value per stretch of the
    mask row, reduced here in the load that reads them.
    ``EVEN_N``: ``seq_k`` is a multiple of ``BLOCK_N`` (no key needs a bounds test).
    """
    # Inductor hands Python floats to the kernels it launches as float64: compute in float32, as Triton does.
    qk_scale = tl.cast(qk_scale, tl.float32)
    split = tl.program_id(0)
    bkv = tl.program_id(1)
    # Batch/head offsets in int64: a KV cache of B * Hkv * S * D elements passes 2^31 at B=8, S=128K.
    b = (bkv // n_kv_heads).to(tl.int64)
    kvh = bkv % n_kv_heads
    # Inputs are read here, not in a helper (_kv_head_rows says why). One rule for every head comes as two scalars
    # (no per-head vectors to build or read per call).
    if HAS_POS:
        offs_pos = tl.arange(0, POS_BLOCK)
        last_pos = tl.max(tl.load(POS + b * pos_parts + offs_pos, mask=offs_pos < pos_parts, other=-1), 0)
        last_pos = tl.where(last_pos >= 0, last_pos, seq_k - 1).to(tl.int32)
    else:
        last_pos = seq_k - 1
    if HAS_KEY0:
        offs_key0 = tl.arange(0, KEY0_BLOCK)
        key0 = tl.min(tl.load(KEY0 + b * key0_parts + offs_key0, mask=offs_key0 < key0_parts, other=seq_k), 0)
    else:
        key0 = 0
    if ROW_RULES:
        # Each packed row reads its own head's rule: the heads of one kv group differ. The kv head walks the
        # blocks of the group's widest sink and widest window, so one read of its K/V serves every head of the
        # group, and each row keeps only what its own rule keeps.
        offs_rule = tl.arange(0, BLOCK_M)
        rule_ok = offs_rule < GROUP * seq_q
        row_sink = tl.load(SINK + kvh * GROUP + offs_rule // seq_q, mask=rule_ok, other=0)
        row_window = tl.load(WINDOW + kvh * GROUP + offs_rule // seq_q, mask=rule_ok, other=1)
        sink = tl.max(row_sink, 0)
        window = tl.max(row_window, 0)
    elif PER_HEAD:   # one rule per kv group: its first head's
        sink = tl.load(SINK + kvh * GROUP)
        window = tl.load(WINDOW + kvh * GROUP)
    else:
        sink = sink_all
        window = window_all
    head, row, pos, r_ok, sink, sink_first, n_sink, wb, n_kept = _kv_head_rows(
        b, kvh, last_pos, key0, sink, window, seq_q, seq_k, GROUP, CAUSAL, HAS_KEY0, BLOCK_M, BLOCK_N)
    if ROW_RULES:   # the rows' own rules, as [BLOCK_M, 1] columns against the key tile's [1, BLOCK_N] positions
        sink = (row_sink + key0)[:, None]
        window = row_window[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * stride_qb + head[:, None].to(tl.int64) * stride_qh + row[:, None] * stride_qm + offs_d[None, :],
                mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    t0 = split * blocks_per_split
    t1 = tl.minimum(t0 + blocks_per_split, n_kept)
    acc, l_i, m_i = _attend_blocks(
        q, K, V, MASK, b, kvh, head, row, pos, r_ok, sink, window, sink_first, n_sink, wb, t0, t1, seq_k, qk_scale,
        stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_mb, stride_mh, stride_mm, stride_mn,
        CAUSAL, HAS_MASK, MASK_BOOL, EVEN_N, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST_DOT)
    first_part = bkv.to(tl.int64) * n_split
    _finish_rows(O, LSE, O_PART, L_PART, COUNTERS, acc, l_i, m_i, b, kvh, head, row, r_ok, bkv, first_part + split,
                 first_part, n_split, stride_ob, stride_oh, stride_om, n_kv_heads * GROUP, seq_q, SPLIT,
                 GROUP, WRITE_LSE, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_R, MERGE_S)


@triton.jit
def _mask_ends_kernel(MASK, LAST, FIRST, seq_k, stride_mb, stride_mn, masked_max, n_parts,
                      MASK_BOOL: tl.constexpr, WRITE_FIRST: tl.constexpr, CHUNK: tl.constexpr):
    """Keys ``[p * CHUNK, (p + 1) * CHUNK)`` of batch element ``b``'s one mask row (program ``(b, p)``): the last key
    they keep (-1 when none) into ``LAST[b, p]`` and, with ``WRITE_FIRST``, the first one (``seq_k`` when none) into
    ``FIRST[b, p]``. A float mask keeps a key whose value is above ``masked_max`` (compared in float32 against the
    value rounded to the mask's dtype, as torch compares it: exact for float16, bfloat16 and float32 masks; the
    wrapper turns a float64 mask into a bool one first)."""
    b = tl.program_id(0)
    part = tl.program_id(1)
    offs = part * CHUNK + tl.arange(0, CHUNK)
    ok = offs < seq_k
    m = tl.load(MASK + b.to(tl.int64) * stride_mb + offs * stride_mn, mask=ok, other=0)
    if MASK_BOOL:
        keep = (m != 0) & ok
    else:
        keep = (m.to(tl.float32) > masked_max) & ok
    tl.store(LAST + b * n_parts + part, tl.max(tl.where(keep, offs, -1), 0))
    if WRITE_FIRST:
        tl.store(FIRST + b * n_parts + part, tl.min(tl.where(keep, offs, seq_k), 0))


# At most this many parts per mask row: the decode kernel reads them in one load.
MAX_MASK_PARTS = 64


def mask_ends(m4: Tensor, batch: int, seq_k: int, with_start: bool) -> tuple[Tensor, Optional[Tensor]]:
    """For one query row and a mask shared by the heads (``m4`` ``[B|1, 1, 1, Sk|1]``): the query's position and
    (``with_start``) the element's left padding, in one launch, as int32 ``[batch, parts]`` on the device, one part per
    stretch of the mask row. The position is the largest part (``Sk - 1`` when every part is -1) and the padding the
    smallest: :func:`streaming_decode` takes the parts as they are and reduces them where it loads them.

    The same values as ``mask_positions.mask_query_end`` and ``leading_padding`` (docs/spec.md: the row sits at the
    last key its mask keeps, ``Sk - 1`` when it keeps none; the padding ends at the first kept key, ``Sk`` when none),
    which compute them in about fifteen small torch kernels: at a decode step each costs a launch (bench/RESULTS.md).
    """
    if m4.dim() != 4 or m4.shape[1] != 1 or m4.shape[2] != 1 or m4.shape[0] not in (1, batch):
        raise ValueError(f"mask_ends takes a [B|1, 1, 1, Sk|1] mask, got {tuple(m4.shape)}")
    if m4.dtype == torch.float64:   # the kernel compares in float32, which would round values next to -1e4
        m4 = m4 > MASKED_LOGIT_MAX
    m = m4.view(torch.uint8) if m4.dtype == torch.bool and not tracing(m4) else m4
    # Every part is one program reading its stretch in one round trip; the stretch grows past MAX_MASK_PARTS parts.
    chunk = max(128 if interpreting() else 4096, triton.next_power_of_2(-(-seq_k // MAX_MASK_PARTS)))
    parts = -(-seq_k // chunk)
    last = torch.empty(batch, parts, dtype=torch.int32, device=m4.device)
    # Pointers a launch never touches get the mask, which it only reads (codegen/launch.py).
    first = torch.empty(batch, parts, dtype=torch.int32, device=m4.device) if with_start else m
    launcher(_mask_ends_kernel, m4)[(batch, parts)](
        m, last, first, seq_k, m.stride(0) if m.shape[0] > 1 else 0, m.stride(3) if m.shape[3] > 1 else 0,
        round_to_dtype(MASKED_LOGIT_MAX, m4.dtype) if m4.is_floating_point() else 0.0, parts,
        MASK_BOOL=m4.dtype == torch.bool, WRITE_FIRST=with_start, CHUNK=chunk, num_warps=4)
    return last, (first if with_start else None)


def _kept_blocks(sink: int, window: int, sq: int, sk: int, causal: bool, block_n: int) -> int:
    """Number of kept key blocks of one kv head (the same count the kernel computes)."""
    p0, p1 = sk - sq, sk - 1
    hi = min(p1 + 1, sk) if causal else min(p1 + window, sk)
    lo = max(p0 - window + 1, 0)
    sink_hi = min(sink, hi)
    if not causal and p0 < sink:
        sink_hi, lo = sk, sk
    n_sink = -(-max(sink_hi, 0) // block_n)
    wb = max(lo // block_n, n_sink)
    we = max(-(-max(hi, 0) // block_n), wb)
    return n_sink + we - wb


def _kept_blocks_bound(sink: int, window: int, sq: int, sk: int, block_n: int) -> int:
    """Most kept key blocks a causal query tile can have at any position: sink blocks, window span, one straddle."""
    all_blocks = -(-sk // block_n)
    if window >= sk:
        return all_blocks
    return min(all_blocks, -(-min(sink, sk) // block_n) + -(-(window + sq - 1) // block_n) + 1)


def streaming_decode_from_mask_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float,
                                  sink: Sequence[int], window: Sequence[int], out: Optional[Tensor] = None) -> Tensor:
    """The ``torch.ops.sparsecc.streaming_attention_from_mask`` kernel callable (argument order of its reference).

    One-token decode with a mask shared by the heads runs the split-KV kernel with
    the query position read from the mask on the device; anything else runs the
    reference (prefill into a static cache is rare next to decode steps).
    ``out``, when given, receives the output (tests pass a NaN-poisoned buffer).
    """
    from sparsecc.codegen import ops
    from sparsecc.codegen.block_attention import (
        attention_kernel_ok, check_mask, check_qkv, kernel_rules, streaming_rules_per_head)
    from sparsecc.codegen.mask_positions import padding_is_cut

    b, h, sq, sk, group = check_qkv(q, k, v)
    sinks, windows = streaming_rules_per_head(sink, window, h)
    m4 = check_mask(mask, b, h, sq, sk)
    # The kernel takes one query position per batch element and the causal rule: exact for one query row and a
    # mask shared by the heads (the row's keys after its position are masked, so the causal and bidirectional
    # rules agree). Several rows may sit at positions that are not consecutive: the reference handles those.
    one_position = sq == 1 and m4.shape[1] == 1
    if not one_position or not attention_kernel_ok(q, k, v, scale) or not decode_supported(group, sq):
        result = ops.streaming_attention_from_mask_ref(q, k, v, mask, scale, sinks, windows)
        return result if out is None else out.copy_(result)
    query_end, key_start = mask_ends(m4, b, sk, with_start=not padding_is_cut())
    snk, win = kernel_rules(sinks, windows, sq, sk)
    return streaming_decode(q, k, v, m4, scale, True, None, None, out=out, rules=(snk, win), query_end=query_end,
                            key_start=key_start)


def group_rules(sinks: Sequence[int], windows: Sequence[int], group: int) -> list[tuple[int, int]]:
    """Per kv head, the ``(sink, window)`` whose blocks the kernel walks: the widest sink and the widest window of
    its ``group`` query heads (kernel form, so a dense head's window already reaches every key). Every head's kept
    keys lie within them."""
    return [(max(sinks[g0:g0 + group]), max(windows[g0:g0 + group])) for g0 in range(0, len(sinks), group)]


def _plan_splits(bkv: int, n_kept: int, num_sms: int, config: DecodeConfig) -> tuple[int, int]:
    """``(n_split, blocks_per_split)`` for ``bkv`` (batch, kv head) pairs of ``n_kept`` key blocks each."""
    if config.n_split is not None:
        want = config.n_split
    else:
        want = max(1, config.programs_per_sm * num_sms // bkv)
    n_split = max(1, min(want, -(-n_kept // MIN_BLOCKS_PER_SPLIT)))
    blocks_per_split = -(-n_kept // n_split)
    return -(-n_kept // blocks_per_split), blocks_per_split


def streaming_decode(q: Tensor, k: Tensor, v: Tensor, m4: Optional[Tensor], scale: float, causal: bool,
                     sinks: Optional[Tensor], windows: Optional[Tensor], return_lse: bool = False,
                     out: Optional[Tensor] = None, rules: Optional[tuple] = None,
                     query_end: Optional[Tensor] = None, config: Optional[DecodeConfig] = None,
                     key_start: Optional[Tensor] = None):
    """Split-KV streaming attention for ``Sq <= 16`` query rows; returns out (and the natural-log lse).

    ``sinks``/``windows`` are int32 per-head vectors in kernel form (an
    unlimited window encoded as ``Sk + Sq + 1``, as the prefill wrapper does);
    heads of one kv group may differ (each kv head then reads its group's widest rule, :func:`group_rules`, and
    each row masks to its own head's). When every head has the same rule the
    kernel takes it as two scalars; the vectors may be None (``rules`` is then required) and are made here
    when the heads differ. ``m4`` is
    the mask already viewed as 4-d, or None. ``out`` receives the output when given.
    ``rules`` are the same vectors as host lists, when the caller has them: reading
    them back from the device would sync the host on every decode step.
    ``query_end`` (int32 ``[B]``, or ``[B, parts]`` from :func:`mask_ends`: the largest part, ``Sk - 1`` when all are
    negative; causal only) places the last query row of each
    batch element at that position instead of ``Sk - 1``; the split count then
    covers the widest layout any position can have, so no host sync is needed.
    ``key_start`` (int32 ``[B]``, ``leading_padding``, or ``[B, parts]`` from :func:`mask_ends`: the smallest part):
    each element's left padding; its sink starts after it.
    The split count then allows one more sink block (the padding need not end on a block edge), or every
    block in bidirectional attention.
    ``config`` overrides the launch shape (benchmarks and tests; the default is :data:`DEFAULT_CONFIG`, or
    :data:`WIDE_CONFIG` for more than 16 packed rows or head dims over 128; :data:`INTERPRETER_CONFIG` under the
    Triton interpreter).
    """
    from sparsecc.codegen.block_attention import mask_args

    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = h // hkv
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    block_d = max(MIN_TILE, triton.next_power_of_2(d))
    block_m = max(MIN_TILE, triton.next_power_of_2(group * sq))
    if config is None:
        if interpreting():
            config = INTERPRETER_CONFIG
        else:
            config = DEFAULT_CONFIG if block_m <= MIN_TILE and block_d <= 128 else WIDE_CONFIG
    block_n = config.block_n
    s_list, w_list = rules if rules is not None else (sinks.tolist(), windows.tolist())
    per_head = per_head_rules(s_list, w_list)
    # Rules that differ inside a kv group: each row reads its own (one rule per group costs one load per kv head,
    # about 1% less time than a load per row on an H100 at B=8, bench/RESULTS.md).
    row_rules = per_head and any(per_head_rules(s_list[g0:g0 + group], w_list[g0:g0 + group])
                                 for g0 in range(0, h, group))
    if per_head and (sinks is None or windows is None):
        from sparsecc.codegen.block_attention import rule_vectors
        sinks, windows = rule_vectors(tuple(s_list), tuple(w_list), q)
    if query_end is not None:
        if not causal:
            raise ValueError("streaming_decode: query_end needs causal=True (positions past it are masked)")
        n_kept = max(_kept_blocks_bound(s_, w_, sq, sk, block_n) for s_, w_ in group_rules(s_list, w_list, group))
    else:
        n_kept = max(_kept_blocks(s_, w_, sq, sk, causal, block_n) for s_, w_ in group_rules(s_list, w_list, group))
    if key_start is not None:
        # Where the padding ends is on the device: the sink may straddle one more block, and a bidirectional row
        # before the moved sink sees every key.
        all_blocks = -(-sk // block_n)
        n_kept = min(n_kept + 1, all_blocks) if causal else all_blocks
    out = torch.empty_like(q) if out is None else out
    # Pointers a launch never touches get q, which it only reads (codegen/launch.py).
    lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device) if return_lse else q
    block_r = triton.next_power_of_2(group * sq)
    mask_t, mask_strides, has_mask, mask_bool = mask_args(m4, q, b, h, sq, sk)
    n_split, blocks_per_split = _plan_splits(b * hkv, max(n_kept, 1), sm_count(q.device), config)
    # Partials merged per load: as many as keep the merged tile within ~64 fp32 registers per thread.
    merge_s = 1
    while merge_s < n_split and 2 * merge_s * block_r * block_d <= 2048 * config.num_warps:
        merge_s *= 2
    if n_split > 1:
        o_part = torch.empty(b * hkv * n_split, block_r, block_d, dtype=torch.float32, device=q.device)
        l_part = torch.empty(b * hkv * n_split, block_r, dtype=torch.float32, device=q.device)
        counters = ticket_counters(b * hkv, q)
    else:
        o_part = l_part = counters = q     # unused: the one split stores the output itself
    pos_parts = 1 if query_end is None or query_end.dim() == 1 else query_end.shape[1]
    key0_parts = 1 if key_start is None or key_start.dim() == 1 else key_start.shape[1]
    launcher(_decode_split_kernel, q)[(n_split, b * hkv)](
        q, k, v, mask_t, sinks if per_head else q, windows if per_head else q,
        query_end if query_end is not None else q, key_start if key_start is not None else q, out, lse, o_part,
        l_part, counters,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mask_strides, *out.stride()[:3],
        hkv, sq, sk, scale * LOG2E.value, blocks_per_split, n_split, s_list[0], w_list[0], pos_parts, key0_parts,
        PER_HEAD=per_head, ROW_RULES=row_rules, GROUP=group, CAUSAL=causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
        HAS_POS=query_end is not None, HAS_KEY0=key_start is not None, WRITE_LSE=return_lse, EVEN_N=sk % block_n == 0,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, MERGE_S=merge_s,
        POS_BLOCK=triton.next_power_of_2(pos_parts), KEY0_BLOCK=triton.next_power_of_2(key0_parts),
        UPCAST_DOT=interpreting(), SPLIT=n_split > 1,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return (out, lse) if return_lse else out


__all__ = ["DEFAULT_CONFIG", "WIDE_CONFIG", "DecodeConfig", "decode_supported", "group_rules", "mask_ends",
           "streaming_decode", "streaming_decode_from_mask_op"]
