"""Triton kernels for block-sparse flash attention (prefill), streaming and block-table layouts.

Imported lazily by the wrappers in ``sparsecc.codegen.block_attention`` (never at
``import sparsecc``). The semantics are those of the references there: query row
``i`` sits at position ``p = i + Sk - Sq``, causal keeps ``j <= p``, a user mask
(bool keep / additive float) is intersected, rows with no kept key give zeros
and ``lse = -inf``.

One jit kernel serves both layouts, specialised by the ``LAYOUT`` constexpr:

* ``LAYOUT_STREAMING``: per-head sink/window are loaded from two int32 vectors
  and the key ranges are computed in the kernel: the sink blocks, then the
  window blocks split into [lower edge | full blocks | diagonal edge]. Only the
  edges evaluate the per-element rule.
* ``LAYOUT_TABLE``: key blocks come from a ``BlockTable`` (full blocks skip all
  structural masking; partial ones apply causality and the sequence end).
  Query tiles are aligned to table rows: with ``lead`` lead rows (see
  ``sparsecc.layouts``) query row ``i`` is table row ``i + lead``, so a tile
  never straddles two table row blocks, whatever ``(Sk - Sq) % block`` is.
* ``LAYOUT_MIXED``: both, chosen per head (a site whose heads run different
  forms, ``codegen/mixed_attention.py``): a head whose window entry is 0 reads
  the table, every other head its sink/window bounds. Tiles follow the table.

Scores use ``exp2`` with ``scale * log2(e)`` folded into one multiplier; the
accumulator is fp32. Grid: axis 0 walks the query blocks last-first (the
heaviest causal blocks start first, so the tail of the launch is short) and
consecutive programs are neighbouring query blocks of one head, whose
key windows overlap and stay in L2.
"""

from __future__ import annotations

import functools
import os

import triton
import triton.language as tl
from triton import knobs

LAYOUT_STREAMING = 0
LAYOUT_TABLE = 1
LAYOUT_MIXED = 2

# log2(e): scores are computed in base 2 so the softmax uses the fast exp2.
LOG2E = tl.constexpr(1.4426950408889634)
# ln(2), to turn the base-2 logsumexp back into the natural-log one the references return.
LN2 = tl.constexpr(0.6931471805599453)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per padded head dim, for the autotuner.
# Wider head dims hold bigger Q/accumulator tiles in registers, hence smaller tiles and fewer stages.
_GPU_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
}
# Under the interpreter one small fixed tile: there is nothing to tune, and tiny shapes stay cheap.
_INTERPRETER_CONFIG = (16, 16, 4, 1)


# SPARSECC_AUTOTUNE=first keeps only the first candidate of every autotuner: the GPU test suite checks
# correctness, and tuning every kernel at every test shape took longer than one device call. Debugging and
# tests only; a config changes speed, never the computed function.
AUTOTUNE_ENV = "SPARSECC_AUTOTUNE"


def autotune(configs: list, key: list):
    """``triton.autotune`` with its timings cached on disk (Triton's cache directory) where Triton supports it.

    Autotuning compiles and times every candidate at the call's size, which at
    64K-128K tokens costs tens of seconds of the first compile; with the
    timings cached, a later process compiles only the chosen config. The cache
    key holds the kernel source, the tuning key's values, the configs and the
    target, so a change to any of them re-tunes.
    """
    import inspect

    if os.environ.get(AUTOTUNE_ENV, "") == "first":
        configs = configs[:1]
    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=key, **extra)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, start_n, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
                 offs_m, offs_n, offs_d, pos, seq_q, seq_k, sink, window, qk_scale, inv_scale, k_desc, v_desc,
                 MASKED: tl.constexpr, STREAMING: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                 MASK_BOOL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """One online-softmax step over keys ``[start_n, start_n + BLOCK_N)``; returns the new (acc, l, m).

    ``MASKED`` blocks evaluate the structural rule per element (sequence end,
    causality, and the streaming rule when ``STREAMING``); unmasked blocks are
    known to be fully kept and skip it. The user mask applies to every block.
    ``UPCAST_DOT`` feeds fp32 operands to ``tl.dot`` (the CPU interpreter of
    triton 3.9 multiplies bf16 operands as raw integers). ``USE_TMA`` loads K/V
    through the tensor descriptors ``k_desc``/``v_desc`` (bounds and padding
    handled by the copy engine, zeros outside ``[seq_k, HEAD_DIM]``).
    """
    cols = start_n + offs_n
    d_ok = offs_d < HEAD_DIM
    k_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :]
    if USE_TMA:
        k = tl.trans(k_desc.load([start_n, 0]))
        v = v_desc.load([start_n, 0])
    elif MASKED:
        k = tl.load(k_ptrs, mask=(cols[None, :] < seq_k) & d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < seq_k) & d_ok[None, :], other=0.0)
    elif BLOCK_D != HEAD_DIM:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    # Scores stay unscaled until the exponent, where the scale folds into one FMA per element
    # (exp2 throughput bounds flash attention on Hopper; the wrapper guarantees scale > 0).
    if UPCAST_DOT:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32))
    else:
        s = tl.dot(q, k)
    if HAS_MASK:
        # int64 rows: a [Sq, Sk] mask plane passes 2^31 elements at 46K tokens.
        m_ptrs = mask_base + offs_m[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn
        in_range = (offs_m[:, None] >= 0) & (offs_m[:, None] < seq_q) & (cols[None, :] < seq_k)
        if MASK_BOOL:
            user = tl.load(m_ptrs, mask=in_range, other=0)
            s = tl.where(user != 0, s, float("-inf"))
        else:
            user = tl.load(m_ptrs, mask=in_range, other=0.0).to(tl.float32)
            s = s + user * inv_scale  # times qk_scale below: the mask joins the base-2 scores as user*log2(e)
    if MASKED:
        keep = cols[None, :] < seq_k
        if CAUSAL:
            keep = keep & (cols[None, :] <= pos[:, None])
            if STREAMING:
                keep = keep & ((cols[None, :] < sink) | (pos[:, None] - cols[None, :] < window))
        elif STREAMING:
            dist = pos[:, None] - cols[None, :]
            keep = keep & ((cols[None, :] < sink) | (pos[:, None] < sink) | ((dist < window) & (dist > -window)))
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED or HAS_MASK:
        # A row with every score -inf so far would give exp2(-inf - -inf) = NaN; shift it by 0 instead.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if UPCAST_DOT:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _streaming_keys(SINK, WINDOW, KEY0, b, h, m0, offset, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                    mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale,
                    k_desc, v_desc,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_KEY0: tl.constexpr):
    """The streaming layout's key ranges for one program: sink blocks, then the window's blocks split into
    [lower edge | full blocks | diagonal edge]; only the edges evaluate the element rule.

    With ``HAS_KEY0`` the batch element's first ``KEY0[b]`` keys are its left padding (hidden by the mask from
    every row): its sink starts after them, and the blocks wholly inside the padding are not read."""
    sink = tl.load(SINK + h)
    first_block = 0
    if HAS_KEY0:
        key0 = tl.load(KEY0 + b)
        sink = sink + key0
        first_block = key0 // BLOCK_N
    window = tl.load(WINDOW + h)
    p0 = m0 + offset
    p1 = tl.minimum(m0 + BLOCK_M, seq_q) - 1 + offset
    if CAUSAL:
        hi = tl.minimum(p1 + 1, seq_k)
        full_last = p0  # keys at or before the first row's position are causal for every row
    else:
        hi = tl.minimum(p1 + window, seq_k)
        full_last = p0 + window - 1
    lo = tl.maximum(p0 - window + 1, 0)
    sink_hi = tl.minimum(sink, hi)
    if not CAUSAL:
        # Rows before the sink see every key (bidirectional rule): one masked sweep over all keys.
        if p0 < sink:
            sink_hi = seq_k
            lo = seq_k
    hi = tl.maximum(hi, 0)
    n_sink = tl.cdiv(tl.maximum(sink_hi, 0), BLOCK_N)
    wb = tl.maximum(lo // BLOCK_N, n_sink)
    we = tl.maximum(tl.cdiv(hi, BLOCK_N), wb)
    fb = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(p1 - window + 1, 0), BLOCK_N), wb), we)
    fe = tl.minimum(tl.maximum(tl.minimum((full_last + 1) // BLOCK_N, seq_k // BLOCK_N), fb), we)
    for nb in range(first_block, n_sink):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, nb * BLOCK_N, k_base, v_base, stride_kn, stride_vn,
                                     mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q,
                                     seq_k, sink, window, qk_scale, inv_scale, k_desc, v_desc, True, True, CAUSAL, HAS_MASK,
                                     MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    for nb in range(wb, fb):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, nb * BLOCK_N, k_base, v_base, stride_kn, stride_vn,
                                     mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q,
                                     seq_k, sink, window, qk_scale, inv_scale, k_desc, v_desc, True, True, CAUSAL, HAS_MASK,
                                     MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    for nb in range(fb, fe):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, nb * BLOCK_N, k_base, v_base, stride_kn, stride_vn,
                                     mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q,
                                     seq_k, sink, window, qk_scale, inv_scale, k_desc, v_desc, False, True, CAUSAL, HAS_MASK,
                                     MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    for nb in range(fe, we):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, nb * BLOCK_N, k_base, v_base, stride_kn, stride_vn,
                                     mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q,
                                     seq_k, sink, window, qk_scale, inv_scale, k_desc, v_desc, True, True, CAUSAL, HAS_MASK,
                                     MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _table_keys(TBL_NUM, TBL_IDX, TBL_FNUM, TBL_FIDX, b, h, t0, stride_nb, stride_nh, stride_pb, stride_ph,
                stride_pq, stride_fb, stride_fh, stride_fq, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale,
                k_desc, v_desc,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """The block table's key blocks for one program: full blocks without element tests, then partial ones."""
    # Table layout: BLOCK_M divides BLOCK_Q and BLOCK_N divides BLOCK_K (checked by the wrapper),
    # so one table row serves the program and each table block is SUBS key tiles.
    SUBS: tl.constexpr = BLOCK_K // BLOCK_N
    t_row = t0 // BLOCK_Q
    num_off = b * stride_nb + h * stride_nh + t_row
    f_num = tl.load(TBL_FNUM + num_off)
    f_row = TBL_FIDX + b * stride_fb + h * stride_fh + t_row * stride_fq
    for t in range(0, f_num * SUBS):
        kb = tl.load(f_row + t // SUBS)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, kb * BLOCK_K + (t % SUBS) * BLOCK_N, k_base, v_base,
                                     stride_kn, stride_vn, mask_base, stride_mm, stride_mn, offs_m, offs_n,
                                     offs_d, pos, seq_q, seq_k, 0, 0, qk_scale, inv_scale, k_desc, v_desc, False, False, CAUSAL,
                                     HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    p_num = tl.load(TBL_NUM + num_off)
    p_row = TBL_IDX + b * stride_pb + h * stride_ph + t_row * stride_pq
    for t in range(0, p_num * SUBS):
        kb = tl.load(p_row + t // SUBS)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, kb * BLOCK_K + (t % SUBS) * BLOCK_N, k_base, v_base,
                                     stride_kn, stride_vn, mask_base, stride_mm, stride_mn, offs_m, offs_n,
                                     offs_d, pos, seq_q, seq_k, 0, 0, qk_scale, inv_scale, k_desc, v_desc, True, False, CAUSAL,
                                     HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA)
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(Q, K, V, O, LSE, MASK, SINK, WINDOW, KEY0,
                    TBL_NUM, TBL_IDX, TBL_FNUM, TBL_FIDX,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    stride_mb, stride_mh, stride_mm, stride_mn,
                    stride_nb, stride_nh, stride_pb, stride_ph, stride_pq, stride_fb, stride_fh, stride_fq,
                    n_heads, seq_q, seq_k, lead, qk_scale, inv_scale, seq_bucket,
                    GROUP: tl.constexpr, LAYOUT: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, WRITE_LSE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST_DOT: tl.constexpr, HAS_KEY0: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """Forward attention of one (query block, batch x head) program over its kept key blocks.

    ``seq_bucket`` is unused by the body: it is part of the autotuning key
    (``next_power_of_2(seq_k)``), so the tuner re-runs per size class, not per length.
    Tiles are aligned to table rows: query row ``i`` is table row ``i + lead``
    (``lead`` is 0 for streaming), so the first tile may start before row 0.
    """
    # Inductor hands Python floats to the kernels it launches as float64: compute in float32, as Triton does.
    qk_scale = tl.cast(qk_scale, tl.float32)
    inv_scale = tl.cast(inv_scale, tl.float32)
    first_tile = lead // BLOCK_M
    n_qblocks = (lead + seq_q - 1) // BLOCK_M - first_tile + 1
    pid_m = first_tile + n_qblocks - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    # Batch/head offsets in int64: B * H * S * D elements can pass 2^31 (e.g. a KV cache, or a mask).
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kvh = h // GROUP
    t0 = pid_m * BLOCK_M  # table row of the tile's first row
    m0 = t0 - lead        # its query row (negative for lead rows)
    offset = seq_k - seq_q

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = offs_m + offset
    row_ok = (offs_m >= 0) & (offs_m < seq_q)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh.to(tl.int64) * stride_kh
    v_base = V + b * stride_vb + kvh.to(tl.int64) * stride_vh
    mask_base = MASK + b * stride_mb + h.to(tl.int64) * stride_mh
    if USE_TMA:
        # One (seq_k x HEAD_DIM) view per program; the wrapper checked the 16-byte alignment TMA needs.
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seq_k, HEAD_DIM], strides=[stride_kn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seq_k, HEAD_DIM], strides=[stride_vn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
    else:
        k_desc = k_base
        v_desc = v_base

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Each condition below is a constexpr expression, so LAYOUT_STREAMING and LAYOUT_TABLE compile one branch;
    # LAYOUT_MIXED branches per head at run time (a window of 0 marks a head that reads the table).
    if LAYOUT == 0:
        acc, l_i, m_i = _streaming_keys(
            SINK, WINDOW, KEY0, b, h, m0, offset, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base,
            stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale, k_desc, v_desc,
            CAUSAL, HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA, BLOCK_M, BLOCK_N, HAS_KEY0)
    elif LAYOUT == 1:
        acc, l_i, m_i = _table_keys(
            TBL_NUM, TBL_IDX, TBL_FNUM, TBL_FIDX, b, h, t0, stride_nb, stride_nh, stride_pb, stride_ph, stride_pq,
            stride_fb, stride_fh, stride_fq, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base,
            stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale, k_desc, v_desc,
            CAUSAL, HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_Q, BLOCK_K)
    else:
        if tl.load(WINDOW + h) > 0:
            acc, l_i, m_i = _streaming_keys(
                SINK, WINDOW, KEY0, b, h, m0, offset, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale,
                k_desc, v_desc, CAUSAL, HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA, BLOCK_M,
                BLOCK_N, HAS_KEY0)
        else:
            acc, l_i, m_i = _table_keys(
                TBL_NUM, TBL_IDX, TBL_FNUM, TBL_FIDX, b, h, t0, stride_nb, stride_nh, stride_pb, stride_ph,
                stride_pq, stride_fb, stride_fh, stride_fq, acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                mask_base, stride_mm, stride_mn, offs_m, offs_n, offs_d, pos, seq_q, seq_k, qk_scale, inv_scale,
                k_desc, v_desc, CAUSAL, HAS_MASK, MASK_BOOL, HEAD_DIM, BLOCK_D, UPCAST_DOT, USE_TMA, BLOCK_M,
                BLOCK_N, BLOCK_Q, BLOCK_K)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = tl.where((l_i > 0)[:, None], acc / l_safe[:, None], 0.0)
    o_ptrs = O + b * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
        tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


def _configs(block_d: int, block_q: int = 0, block_k: int = 0, tma: bool = False) -> list:
    """Autotuner configs for a padded head dim; for tables, only tiles that divide the table's blocks.

    With ``tma`` every tile is offered twice, with pointer loads and with
    tensor-descriptor (TMA) loads, and the tuner keeps the faster.
    """
    if interpreting():
        choices = [_INTERPRETER_CONFIG]
    else:
        choices = _GPU_CONFIGS[min(256, max(64, block_d))]
    out = []
    for use_tma in ((False, True) if tma else (False,)):
        for bm, bn, warps, stages in choices:
            if block_q:
                bm, bn = min(bm, block_q), min(bn, block_k)
                if block_q % bm or block_k % bn:
                    continue
            cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": use_tma}, num_warps=warps,
                                num_stages=stages)
            if all(str(cfg) != str(c) for c in out):
                out.append(cfg)
    return out


@functools.lru_cache(maxsize=None)
def prefill_kernel(block_d: int, block_q: int = 0, block_k: int = 0, tma: bool = False):
    """The autotuned prefill kernel for a padded head dim (and, for tables, the table's block sizes).

    One autotuner per (head dim, table block, TMA allowed) so every config it
    holds is legal for the layout and the inputs' alignment; the tuning key
    adds the layout, causality, mask kind and the power-of-two class of the
    key length.
    """
    return autotune(configs=_configs(block_d, block_q, block_k, tma),
                    key=["seq_bucket", "GROUP", "LAYOUT", "CAUSAL", "HAS_MASK", "HEAD_DIM"])(_prefill_kernel)


def tma_supported(*tensors) -> bool:
    """Whether K/V can be read through tensor descriptors: a Hopper-or-newer GPU and 16-byte aligned rows.

    TMA needs the base address and every stride but the last to be multiples
    of 16 bytes; each program builds its descriptor at a (batch, head) offset,
    so the batch and head strides must be aligned too. ``SPARSECC_TMA=0``
    turns the path off.
    """
    import os

    import torch

    if os.environ.get("SPARSECC_TMA", "1") == "0" or interpreting():
        return False
    if not all(t.is_cuda for t in tensors) or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1])
               and t.stride(-1) == 1 for t in tensors)


def _descriptor_scratch(size: int, alignment: int, stream):
    """Global scratch for in-kernel tensor descriptors (Triton asks the allocator for it)."""
    import torch

    return torch.empty(size, dtype=torch.int8, device="cuda")


def enable_descriptors() -> None:
    """Install the scratch allocator that in-kernel tensor descriptors need (cheap, idempotent)."""
    triton.set_allocator(_descriptor_scratch)
