"""Triton kernels of ``vertical_slash`` (imported by ``vertical_slash.py`` on first GPU use).

* ``_vs_index_kernel``: one program per (batch, head, query block) lane runs the
  sequential merge of docs/spec.md (as MInference's
  ``convert_vertical_slash_indexes_kernel`` does, one lane per thread there):
  kept diagonals, in descending ``t``, become unaligned key ranges; kept
  columns outside them become single columns. Its reference is
  ``vertical_slash_index_ref``.
* ``_vs_attention_kernel``: flash attention of a tile of rows over its lane's
  ranges (walked ``BLOCK_N`` keys at a time) and then its gathered columns,
  online softmax in float32, causal per element, the model's mask (bool or
  additive, broadcast by strides) per element, GQA. Its reference is
  ``vertical_slash_attention_ref``.

Only APIs present in both triton 3.6 and 3.9 are used (no descriptors, no
``tl.range`` options).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton import knobs

from sparsecc.codegen.mask_positions import mask_4d
from sparsecc.codegen.vertical_slash import VSIndex

# Rows and keys per tile of the attention kernel (a lane's block is walked in such tiles).
TILE = 64
# Launch settings of the attention kernel (bench/minference.py --sweep times the alternatives).
LAUNCH = {"num_warps": 4}


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (its bf16 ``tl.dot`` is wrong, so tiles are upcast there)."""
    return bool(knobs.runtime.interpret)


@triton.jit
def _vs_index_kernel(offs_ptr, cols_ptr, rcount_ptr, rstart_ptr, rend_ptr, ccount_ptr, cidx_ptr,
                     n_q, n_s, n_v, seq_q, seq_k, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    lane = bh.to(tl.int64) * n_q + pid_m
    off_base = offs_ptr + bh.to(tl.int64) * n_s
    col_base = cols_ptr + bh.to(tl.int64) * n_v
    end_m = pid_m * BLOCK + (seq_k - seq_q) + BLOCK
    # Offsets at or past end_m reach no row of the block. t = 0 is always kept, so this stops.
    s = pid_m * 0
    t = tl.load(off_base + s)
    while t >= end_m:
        s += 1
        t = tl.load(off_base + s)
    s += 1
    e = tl.maximum(end_m - t, BLOCK)
    rs = e - BLOCK
    re = e
    vi = tl.load(col_base)
    v = s * 0 + 1
    nr = s * 0
    nc = s * 0
    done = s * 0
    while done == 0:
        if vi < re:
            if vi < rs:                               # in the gap before the current range: a single column
                tl.store(cidx_ptr + lane * n_v + nc, vi)
                nc += 1
            if v < n_v:
                vi = tl.load(col_base + v)
                v += 1
            else:
                vi = end_m + BLOCK                    # past every range end: no more columns
        else:
            if s < n_s:
                e = tl.maximum(end_m - tl.load(off_base + s), BLOCK)
                s += 1
                if e > re + BLOCK:                    # too far to extend: emit, start a new range
                    tl.store(rstart_ptr + lane * n_s + nr, rs)
                    tl.store(rend_ptr + lane * n_s + nr, re)
                    nr += 1
                    rs = e - BLOCK
                    re = e
                else:
                    if e > re:                        # within one block of the end: extend by a block
                        re += BLOCK
            else:
                tl.store(rstart_ptr + lane * n_s + nr, rs)
                tl.store(rend_ptr + lane * n_s + nr, re)
                nr += 1
                done = 1
    tl.store(rcount_ptr + lane, nr)
    tl.store(ccount_ptr + lane, nc)


def vertical_slash_index(cols: torch.Tensor, offs: torch.Tensor, *, block: int, seq_q: int, seq_k: int) -> VSIndex:
    """The lanes' ranges and columns on the GPU (int32; entries past the counts are not written)."""
    b, h, n_s = offs.shape
    n_v = cols.shape[-1]
    n_q = triton.cdiv(seq_q, block)
    dev = offs.device
    offs32 = offs.to(torch.int32).contiguous()
    cols32 = cols.to(torch.int32).contiguous()
    rcount = torch.empty(b, h, n_q, dtype=torch.int32, device=dev)
    ccount = torch.empty_like(rcount)
    rstart = torch.empty(b, h, n_q, n_s, dtype=torch.int32, device=dev)
    rend = torch.empty_like(rstart)
    cidx = torch.empty(b, h, n_q, n_v, dtype=torch.int32, device=dev)
    _vs_index_kernel[(n_q, b * h)](offs32, cols32, rcount, rstart, rend, ccount, cidx, n_q, n_s, n_v, seq_q, seq_k,
                                   BLOCK=block, num_warps=1)
    return VSIndex(rcount, rstart, rend, ccount, cidx, block, seq_q, seq_k)


@triton.jit
def _vs_tile(q, keys, k_ok, k_base, v_base, stride_ks, stride_vs, offs_d, d_ok, rows, pos, r_ok, m_i, l_i, acc,
             mask_base, stride_mq, stride_mk, scale, sink, window, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr,
             MIXED: tl.constexpr):
    """One online-softmax step of a row tile over ``keys`` (causal, the head's sink/window rule when
    ``MIXED``, and the mask, per element)."""
    kt = tl.load(k_base + keys[None, :].to(tl.int64) * stride_ks + offs_d[:, None], mask=k_ok[None, :] & d_ok[:, None],
                 other=0.0)
    vt = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :],
                 other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    s = tl.dot(q, kt) * scale
    ok = r_ok[:, None] & k_ok[None, :] & (keys[None, :] <= pos[:, None])
    if MIXED:
        ok = ok & ((keys[None, :] < sink) | (pos[:, None] - keys[None, :] < window))
    if MASK_KIND != 0:
        m_ptrs = mask_base + rows[:, None].to(tl.int64) * stride_mq + keys[None, :].to(tl.int64) * stride_mk
        if MASK_KIND == 1:
            ok = ok & (tl.load(m_ptrs, mask=ok, other=0) != 0)
        else:
            s += tl.load(m_ptrs, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing so far keeps m = -inf; subtract 0 instead so no -inf - -inf NaN appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    return m_new, l_i, acc


@triton.jit
def _vs_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, rcount_ptr, rstart_ptr, rend_ptr, ccount_ptr, cidx_ptr,
                         analytic_ptr, sink_ptr, window_ptr, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                         stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
                         stride_mb, stride_mh, stride_mq, stride_mk,
                         heads, group, seq_q, seq_k, n_q, n_s, n_v, scale,
                         LANE_BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, MASK_KIND: tl.constexpr, UPCAST: tl.constexpr,
                         MIXED: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    bi, hi = bh // heads, bh % heads
    pid_m = pid // (LANE_BLOCK // BM)                 # the lane (query block) this row tile belongs to
    lane = bh.to(tl.int64) * n_q + pid_m
    rows = pid * BM + tl.arange(0, BM)
    r_ok = rows < seq_q
    pos = rows + (seq_k - seq_q)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + bi.to(tl.int64) * stride_qb + hi.to(tl.int64) * stride_qh
                + rows[:, None].to(tl.int64) * stride_qs + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + bi.to(tl.int64) * stride_kb + (hi // group).to(tl.int64) * stride_kh
    v_base = v_ptr + bi.to(tl.int64) * stride_vb + (hi // group).to(tl.int64) * stride_vh
    mask_base = mask_ptr + bi.to(tl.int64) * stride_mb + hi.to(tl.int64) * stride_mh
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BLOCK_D), tl.float32)
    sink = 0
    window = seq_q + seq_k + 1                        # longer than any distance: no window limit
    analytic = 0
    if MIXED:
        analytic = tl.load(analytic_ptr + hi)
        sink = tl.load(sink_ptr + hi)
        window = tl.load(window_ptr + hi)
    n_ranges = tl.load(rcount_ptr + lane)
    n_cols = tl.load(ccount_ptr + lane)
    if MIXED:
        # A streaming or dense head ignores the index: two ranges, its sink and its window (causal), and no
        # columns. Selected without a branch around the loops, which would keep them from being pipelined.
        p0 = pid * BM + (seq_k - seq_q)
        k_hi = tl.minimum(tl.minimum(pid * BM + BM, seq_q) + (seq_k - seq_q), seq_k)
        sink_hi = tl.minimum(sink, k_hi)
        k_lo = tl.maximum(tl.maximum(p0 - window + 1, 0), sink_hi)
        n_ranges = tl.where(analytic != 0, 2, n_ranges)
        n_cols = tl.where(analytic != 0, 0, n_cols)
    for r in range(0, n_ranges):
        rs = tl.load(rstart_ptr + lane * n_s + r, mask=r < n_s, other=0)
        re = tl.minimum(tl.load(rend_ptr + lane * n_s + r, mask=r < n_s, other=0), seq_k)
        if MIXED:
            rs = tl.where(analytic != 0, tl.where(r == 0, 0, k_lo), rs)
            re = tl.where(analytic != 0, tl.where(r == 0, sink_hi, k_hi), re)
        for start in range(rs, re, BN):
            keys = start + tl.arange(0, BN)
            m_i, l_i, acc = _vs_tile(q, keys, keys < re, k_base, v_base, stride_ks, stride_vs, offs_d, d_ok, rows,
                                     pos, r_ok, m_i, l_i, acc, mask_base, stride_mq, stride_mk, scale, sink, window,
                                     MASK_KIND, UPCAST, MIXED)
    for c0 in range(0, n_cols, BN):
        idx = c0 + tl.arange(0, BN)
        c_ok = idx < n_cols
        keys = tl.load(cidx_ptr + lane * n_v + idx, mask=c_ok, other=0)
        m_i, l_i, acc = _vs_tile(q, keys, c_ok, k_base, v_base, stride_ks, stride_vs, offs_d, d_ok, rows, pos,
                                 r_ok, m_i, l_i, acc, mask_base, stride_mq, stride_mk, scale, sink, window,
                                 MASK_KIND, UPCAST, MIXED)
    out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)   # no key: zeros
    tl.store(o_ptr + bi.to(tl.int64) * stride_ob + hi.to(tl.int64) * stride_oh
             + rows[:, None].to(tl.int64) * stride_os + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])


def vertical_slash_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: VSIndex, scale: float,
                                    mask: Optional[torch.Tensor] = None,
                                    out: Optional[torch.Tensor] = None,
                                    head_rules: Optional[tuple] = None,
                                    launch: Optional[dict] = None) -> torch.Tensor:
    """Attention over the lanes' ranges and columns (fp16/bf16 q/k/v, ``[B, H|Hkv, S, D]``, unit last stride).

    ``head_rules`` (a mixed site, ``codegen/mixed_attention.py``): three int32
    ``[H]`` vectors: analytic (1: the head ignores the index and walks its sink
    and window ranges), sink and window of each head's element rule
    ``j < sink or p - j < window`` (vertical_slash heads: 0 and a window past
    every distance). ``launch`` overrides ``num_warps``/``num_stages`` (the bench's sweep).
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q) if out is None else out
    block = index.block
    bm = min(TILE, block)
    n_q = triton.cdiv(sq, block)
    if mask is None:
        mask_kind, m4, mstr = 0, q, (0, 0, 0, 0)
    else:
        m4 = mask_4d(mask)
        if m4.dtype == torch.bool:
            mask_kind, m4 = 1, m4.to(torch.uint8)
        else:
            mask_kind = 2
        m4 = m4.expand(b, h, sq, sk)               # broadcast dimensions get stride 0
        mstr = m4.stride()
    grid = (triton.cdiv(sq, bm), b * h)
    rules = (q, q, q) if head_rules is None else head_rules
    _vs_attention_kernel[grid](q, k, v, out, m4, index.range_count, index.range_start, index.range_end,
                               index.col_count, index.col_index, *rules, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                               *out.stride()[:3], *mstr, h, h // hkv, sq, sk, n_q, index.range_start.shape[-1],
                               index.col_index.shape[-1], scale, LANE_BLOCK=block, BM=bm, BN=bm, HEAD_DIM=d,
                               BLOCK_D=max(16, triton.next_power_of_2(d)), MASK_KIND=mask_kind,
                               UPCAST=interpreting(), MIXED=head_rules is not None,
                               **{**LAUNCH, **(launch or {})})
    return out
