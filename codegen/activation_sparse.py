"""Activation sparsity: thresholded projection inputs (TEAL), and the split-K GEMV the FFN kernels share.

Layout of this file: module notes, then the reference section, then the Triton kernels (bound
lazily by ``epilogue.bind_triton``, so importing this module never imports Triton).
The threshold rule is the ``ActivationThreshold`` rule of ``sparsecc.forms``: a
value x takes part iff ``|x| > tau`` (strictly), so ``tau = 0`` drops exact zeros only.
References compute in the input dtype, as the dense model would.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.activations import ACTIVATION_TABLE
from sparsecc.codegen.epilogue import bind_triton
from sparsecc.codegen.launch import launcher, round_to_dtype, ticket_counters, tracing

__all__ = ["ACTIVATIONS", "threshold_linear_ref", "threshold_linear", "GemvConfig",
           "k_major", "MAX_DECODE_TOKENS", "default_gemv_config", "check_channel_scale", "out_rows", "GemvBuffers",
           "gemv_block_m", "check_dot_tile", "gemv_buffers", "gemv_grid", "gemv_ticket_count",
           "zeroed_upstream_counters"]

# ============================================================== reference


ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {act.name: act.torch for act in ACTIVATION_TABLE})
"""FFN activations by the name the matcher records on a site: the references of ``sparsecc.activations``
(a read-only view of the table, which defines them)."""


def _threshold(x: Tensor, tau: float) -> Tensor:
    return x * (x.abs() > tau).to(x.dtype)


def threshold_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau: float,
                         channel_scale: Optional[Tensor] = None) -> Tensor:
    """Reference ``F.linear(x * (|x| > tau), weight, bias)`` with ``weight`` ``[N, K]``.

    With ``channel_scale`` s (``[K]``; criterion "weighted", s_i = ||W[:, i]||_2) input
    channel i is kept iff ``|x_i| * s_i > tau``, the score computed in float32.
    """
    if channel_scale is None:
        return F.linear(_threshold(x, tau), weight, bias)
    keep = (x.abs().float() * channel_scale.float()) > tau
    return F.linear(x * keep.to(x.dtype), weight, bias)


# ============================================================== Triton kernels: input mode (TEAL)
#
# Notation: x [M, K] with M <= MAX_DECODE_TOKENS, W [N, K], Wt = Wᵀ [K, N] (K-major: row k of Wt is
# the contiguous weight row of input channel k), y [M, N] = x̃ @ Wt + b with x̃ = x * [|x| > tau].
#
# Stage 1 (_threshold_gemv_kernel): program (n tile, K split, token) walks its ROWS_PER_SPLIT input
# channels. A channel nobody needs has no weight-row load at all, so the bytes read follow the
# survivors: the cost is the surviving rows plus a small per-split constant. Three ways to find them:
#   * compacted (COMPACT): the program ranks its split's survivors (tl.cumsum), writes their indices
#     to its scratch slot and loops over that list BLOCK_K rows at a time, so loop trips follow the
#     survivors too;
#   * predicated (not COMPACT): every BLOCK_K chunk is visited, dropped rows' loads masked off;
#   * tokens: with M > 1 and PER_TOKEN each program serves one token (grid axis 2) and reads that
#     token's survivors only (its own mask; rows two tokens share are read twice, the second time
#     mostly from L2); otherwise one program serves all M tokens with tl.dot and reads the union.
#     One token takes that tl.dot path too with DOT (its row padded to 16; gemv_block_m), else
#     per-lane products into a [BLOCK_K, BLOCK_N] float32 tile summed once at the end.
# With several K splits each program writes a float32 partial to partial[split, m, n-tile], then
# takes a ticket from its (token, n tile)'s counter (launch.ticket_counters); the program that draws
# the last ticket sums the partials in split order with the bias, casts once, stores y and resets the
# counter: one launch, no bfloat16 atomics, and the sum's order is fixed (deterministic). With one
# split (ROWS_PER_SPLIT >= K) the kernel adds the bias and stores y directly.
#
# Layout: the kernel reads Wt [K, N] through W's strides; a weight whose stride(0) is 1 (the view
# W = Wt.t() of a K-major buffer) is used as is. A row-major W is transposed once and cached by
# (data_ptr, _version, shape, strides, dtype): that holds a second copy of the weight; the compiler
# avoids it by binding a K-major copy at compile time and passing its ``.t()`` view.

MAX_DECODE_TOKENS = 16  # above this, thresholding saves little weight traffic: dense F.linear on x̃
"""Most tokens (rows of x) the thresholded GEMV kernels take; more run dense ``F.linear`` on x̃."""


DOT_ROWS = 16  # tl.dot needs at least 16 rows: the union path pads M up to this (padded rows load nothing)


@dataclass(frozen=True)
class GemvConfig:
    """Launch knobs of :func:`threshold_linear`'s split-K GEMV.

    ``COMPACT`` lists each split's surviving channels first and loops over them;
    without it every chunk is visited with the dropped rows' loads predicated off.
    ``PER_TOKEN`` (2-16 tokens) gives every token its own programs and its own
    survivors instead of one program over the union of the tokens' survivors.
    ``DOT`` (one token) multiplies on tensor cores, ``tl.dot`` with the token's
    row padded to :data:`DOT_ROWS` rows as the union path of 2-16 tokens does,
    instead of per-lane products summed into a ``[BLOCK_K, BLOCK_N]`` float32
    tile: far fewer registers, so more programs per SM keep rows in flight.
    """

    BLOCK_N: int
    BLOCK_K: int
    ROWS_PER_SPLIT: int
    num_warps: int
    COMPACT: bool = True
    PER_TOKEN: bool = False
    STAGES: int = 3  # Triton's num_stages (software-pipelining depth of the loops); 3 is Triton's default
    DOT: bool = False

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_K", "ROWS_PER_SPLIT"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name}={value} must be a power of two (a Triton block size)")
        if self.STAGES < 1:
            raise ValueError(f"GemvConfig.STAGES={self.STAGES} must be >= 1")
        if self.DOT and self.PER_TOKEN:
            raise ValueError("GemvConfig: DOT (one token on tensor cores) and PER_TOKEN (one program per token, "
                             "no tensor cores) exclude each other")
        if self.DOT and min(self.BLOCK_N, self.BLOCK_K) < DOT_ROWS:
            raise ValueError(f"GemvConfig.DOT needs BLOCK_N and BLOCK_K of at least {DOT_ROWS} (tl.dot's minimum), "
                             f"got BLOCK_N={self.BLOCK_N}, BLOCK_K={self.BLOCK_K}")
        if self.ROWS_PER_SPLIT % self.BLOCK_K:
            raise ValueError(f"ROWS_PER_SPLIT={self.ROWS_PER_SPLIT} must be a multiple of BLOCK_K={self.BLOCK_K}")

    def __str__(self) -> str:
        mode = ("compacted" if self.COMPACT else "predicated") + (", per token" if self.PER_TOKEN else "") + \
            (", tl.dot" if self.DOT else "") + (f", {self.STAGES} stages" if self.STAGES != 3 else "")
        return (f"GemvConfig(N tile {self.BLOCK_N}, {self.BLOCK_K} rows/trip, {self.ROWS_PER_SPLIT} rows/split, "
                f"{self.num_warps} warps, {mode})")


# One token (compacted): on tensor cores (DOT, the row padded to 16 rows, few registers per thread) with 128-wide N
# tiles, 128 survivors per trip, 2048-channel splits, 4 warps. On an H100 (bench/RESULTS.md, "One token on tensor
# cores") it beat the earlier per-lane tiles (64-wide N tiles, 4096-channel splits up to K = 4096, 2048 above, from the
# sweeps of 3e5de2f and 7a8328c) by 0.7-4.4 us at 4096 -> 14336, 50-90%; at 14336 -> 4096 it was the best swept
# shape or within 0.3 us of it, and made the one-token FFN faster as its down stage. The sweep's other DOT shapes
# (1024-4096-channel splits, 64-256-wide tiles, 8 warps) were within noise or slower.
DEFAULT_GEMV_CONFIG = GemvConfig(BLOCK_N=128, BLOCK_K=128, ROWS_PER_SPLIT=2048, num_warps=4, DOT=True)
# 2-16 tokens: the compacted union with 128-wide N tiles over 2048-channel splits, 8 warps, was the
# fastest of union-predicated, union-compacted and per-token strategies at every M in 2..16 and
# sparsity 70-95% on the H100 (bench/linear.py --tokens, commit 7a8328c; per-token masks re-read
# rows the tokens share and lost 1.1-4x at M >= 4).
DEFAULT_GEMV_CONFIG_TOKENS = GemvConfig(BLOCK_N=128, BLOCK_K=128, ROWS_PER_SPLIT=2048, num_warps=8)


def default_gemv_config(tokens: int) -> GemvConfig:
    """The launch knobs :func:`threshold_linear` uses for ``tokens`` rows when none are given."""
    return DEFAULT_GEMV_CONFIG if tokens == 1 else DEFAULT_GEMV_CONFIG_TOKENS


def _scores(xabs, scale):
    """The channel scores of ``xabs`` (``|x|`` in float32): ``|x_i|`` (criterion magnitude, ``scale`` None) or
    ``|x_i| * scale_i`` (criterion weighted, ``scale`` the float32 channel scales already loaded).

    A ``[tokens, channels]`` tile broadcasts a ``[channels]`` scale over its tokens. (Loading the scale in the
    tile's own shape instead, to spare the broadcast's layout conversion, measured 2x slower on the H200 at 4 tokens:
    sixteen times the load instructions.) Callers load the scale themselves, inline: Inductor's mutation analysis
    takes a helper's result to depend on every argument it was given, so a scale *pointer* passed into a helper
    whose result places a store reads to it as written, and the compiled graph would copy the scale (or the dummy
    standing in for it) before every launch (codegen/launch.py).
    """
    if scale is None:
        score = xabs
    else:
        score = xabs * scale
    return score


def _survives(score, tau):
    """Which channels take part: ``score > tau``, and NaN scores too.

    docs/spec.md's ``x * [score > tau]`` turns a NaN x into NaN (NaN * 0), which the reference and a dense layer
    carry to every output; so a NaN channel is read like a kept one, and its NaN reaches the output the same way
    whatever the token count or kernel path.
    """
    return (score > tau) | (score != score)


def _list_survivors(x_ptr, stride_xm, stride_xk, M, K, k0, tau, slot, scale_ptr, scale2_ptr,
                    BLOCK_M: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr, N_SCALES: tl.constexpr,  # noqa: F821
                    X_CACHE: tl.constexpr):  # noqa: F821
    """Write the indices of channels k0..k0+ROWS_PER_SPLIT that some of the M tokens keep to ``slot``.

    Returns their count. Only survivors' entries are written, in channel order. ``N_SCALES`` is 0 (a channel
    survives when ``|x| > tau``), 1 (``|x| * scale > tau``) or 2 (``|x| * scale > tau`` or ``|x| * scale2 > tau``:
    the union of two projections that read the same x with their own channel scales; each entry then also holds,
    above the channel index, bit 30 when the first projection keeps the channel for some token and bit 29 when the
    second does: a reader masks the index with ``2 ** 29 - 1``. Channel counts stay far below ``2 ** 29``).
    ``X_CACHE`` is the x loads' cache modifier: ``".cg"`` (past L1) where other programs of the same launch wrote x.
    """
    if BLOCK_M == 1:
        # One token ranks its channels as a [LIST_ROWS, LIST_CHUNK] tile of at most 1024-channel rows: a scan along
        # each row, then one over the rows' counts. Listing 4096 channels this way took 0.8 us less per launch than
        # one scan over the whole vector on an H100, 2048 channels 0.4 us less; from 8192 channels at half kept the
        # pieces were slower, but only a hand-set GemvConfig splits that long (bench/RESULTS.md, "Listing the
        # survivors").
        LIST_ROWS: tl.constexpr = (ROWS_PER_SPLIT + 1023) // 1024  # noqa: F821
        LIST_CHUNK: tl.constexpr = ROWS_PER_SPLIT // LIST_ROWS  # noqa: F821
        offs_r = k0 + tl.arange(0, LIST_ROWS)[:, None] * LIST_CHUNK + tl.arange(0, LIST_CHUNK)[None, :]
        r_mask = offs_r < K
        xabs = tl.abs(tl.load(x_ptr + offs_r * stride_xk, mask=r_mask, other=0.0,
                              cache_modifier=X_CACHE).to(tl.float32))
    else:
        offs_r = k0 + tl.arange(0, ROWS_PER_SPLIT)
        r_mask = offs_r < K
        offs_m = tl.arange(0, BLOCK_M)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_r[None, :] * stride_xk,
                     mask=(offs_m < M)[:, None] & r_mask[None, :], other=0.0, cache_modifier=X_CACHE)
        xabs = tl.abs(xv.to(tl.float32))
    keep = _survives(_scores(xabs, tl.load(scale_ptr + offs_r, mask=r_mask, other=0.0) if N_SCALES > 0 else None),
                     tau)
    if N_SCALES == 2:
        keep2 = _survives(_scores(xabs, tl.load(scale2_ptr + offs_r, mask=r_mask, other=0.0)), tau)
        if BLOCK_M == 1:
            first, second = keep, keep2
        else:
            first = tl.max(keep.to(tl.int32), axis=0) > 0
            second = tl.max(keep2.to(tl.int32), axis=0) > 0
        keep_r = first | second
        entry = offs_r + first.to(tl.int32) * 1073741824 + second.to(tl.int32) * 536870912   # bits 30 and 29
    else:
        if BLOCK_M == 1:
            keep_r = keep
        else:
            keep_r = tl.max(keep.to(tl.int32), axis=0) > 0
        entry = offs_r
    keep_r = keep_r & r_mask   # past K nothing is listed, even where tau < 0 lets a zero score pass
    kept = keep_r.to(tl.int32)
    if BLOCK_M == 1:
        per_row = tl.sum(kept, axis=1)
        rank = tl.cumsum(kept, axis=1) - kept + (tl.cumsum(per_row, axis=0) - per_row)[:, None]
        count = tl.sum(per_row, axis=0)
    else:
        rank = tl.cumsum(kept, axis=0) - 1
        count = tl.sum(kept, axis=0)
    tl.store(slot + rank, entry, mask=keep_r)
    tl.debug_barrier()  # the list is written by all threads of the program and read by all
    return count


def _threshold_gemv_kernel(x_ptr, wt_ptr, partial_ptr, scratch_ptr, bias_ptr, y_ptr, counters_ptr, scale_ptr,
                           M, N, K, tau, stride_xm, stride_xk, stride_wk, stride_wn,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # noqa: F821
                           ROWS_PER_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,  # noqa: F821
                           COMPACT: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,  # noqa: F821
                           HAS_SCALE: tl.constexpr, ONE_TOKEN: tl.constexpr):  # noqa: F821
    """``x̃ @ Wt`` over one K split for one N tile (and one token when BLOCK_M == 1); see the notes above."""
    # Grid axes: N tile, K split, token (0 unless every token has its own programs: BLOCK_M == 1, M > 1).
    _gemv_program(x_ptr, wt_ptr, partial_ptr, scratch_ptr, bias_ptr, y_ptr, counters_ptr, scale_ptr,
                  M, N, K, tau, stride_xm, stride_xk, stride_wk, stride_wn,
                  tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(0), tl.num_programs(1),
                  BLOCK_M, BLOCK_N, BLOCK_K, ROWS_PER_SPLIT, DOT_IN_FP32, COMPACT, DIRECT, HAS_BIAS, HAS_SCALE,
                  ONE_TOKEN, "")


def _gemv_program(x_ptr, wt_ptr, partial_ptr, scratch_ptr, bias_ptr, y_ptr, counters_ptr, scale_ptr,
                  M, N, K, tau, stride_xm, stride_xk, stride_wk, stride_wn, pid_n, split, token, n_tiles, n_splits,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # noqa: F821
                  ROWS_PER_SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr,  # noqa: F821
                  COMPACT: tl.constexpr, DIRECT: tl.constexpr, HAS_BIAS: tl.constexpr,  # noqa: F821
                  HAS_SCALE: tl.constexpr, ONE_TOKEN: tl.constexpr, X_CACHE: tl.constexpr):  # noqa: F821
    """The work of program (``pid_n``, ``split``, ``token``) of :func:`_threshold_gemv_kernel`'s grid of
    ``n_tiles`` N tiles by ``n_splits`` K splits (``ONE_TOKEN``: M is 1); x's loads take the cache modifier
    ``X_CACHE`` (``".cg"`` where other programs of the same launch wrote x: codegen/threshold_ffn.py's one-launch
    FFN)."""
    # Inductor hands Python floats to the kernels it launches as float64: compute in float32, as Triton does.
    tau = tl.cast(tau, tl.float32)
    x_ptr += token * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M - token
    k0 = split * ROWS_PER_SPLIT
    slot = scratch_ptr + ((token * n_splits + split) * n_tiles + pid_n).to(tl.int64) * ROWS_PER_SPLIT
    if BLOCK_M == 1 and COMPACT:
        count = _list_survivors(x_ptr, stride_xm, stride_xk, 1, K, k0, tau, slot, scale_ptr, scale_ptr, 1,
                                ROWS_PER_SPLIT, 1 if HAS_SCALE else 0, X_CACHE)
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for c in range(0, count, BLOCK_K):
            offs_j = c + tl.arange(0, BLOCK_K)
            live = offs_j < count
            kk = tl.load(slot + offs_j, mask=live, other=0)
            xk = tl.load(x_ptr + kk * stride_xk, mask=live, other=0.0, cache_modifier=X_CACHE).to(tl.float32)
            w = tl.load(wt_ptr + kk[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                        mask=live[:, None] & n_mask[None, :], other=0.0)
            acc2 += xk[:, None] * w.to(tl.float32)
        acc = tl.reshape(tl.sum(acc2, axis=0), (1, BLOCK_N))
    elif BLOCK_M == 1:
        # x is loaded as a vector along K, so its keep mask already has the layout of the weight
        # tile's rows (no layout conversion between the x load and the weight load).
        acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(ROWS_PER_SPLIT // BLOCK_K):
            offs_k = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0,
                         cache_modifier=X_CACHE).to(tl.float32)
            # Past K nothing is kept, even where tau < 0 lets a zero score pass (the row would be read past the end).
            keep = _survives(_scores(tl.abs(xk), tl.load(scale_ptr + offs_k, mask=offs_k < K, other=0.0) if HAS_SCALE
                                     else None), tau) & (offs_k < K)
            w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                        mask=keep[:, None] & n_mask[None, :], other=0.0)
            acc2 += tl.where(keep, xk, 0.0)[:, None] * w.to(tl.float32)
        acc = tl.reshape(tl.sum(acc2, axis=0), (1, BLOCK_N))
    elif COMPACT:
        # Union of the tokens' survivors, compacted: every trip multiplies BLOCK_K live rows.
        # One token (DOT) lists from a vector of x, not a [BLOCK_M, ROWS_PER_SPLIT] tile of padded rows.
        count = _list_survivors(x_ptr, stride_xm, stride_xk, M, K, k0, tau, slot, scale_ptr, scale_ptr,
                                1 if ONE_TOKEN else BLOCK_M,
                                ROWS_PER_SPLIT, 1 if HAS_SCALE else 0, X_CACHE)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(0, count, BLOCK_K):
            offs_j = c + tl.arange(0, BLOCK_K)
            live = offs_j < count
            kk = tl.load(slot + offs_j, mask=live, other=0)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                         mask=m_mask[:, None] & live[None, :], other=0.0, cache_modifier=X_CACHE)
            if ONE_TOKEN:   # one token (DOT): the list holds exactly its survivors, nothing to score again
                xs = xv
            else:           # the union: each token keeps its own survivors among the listed channels
                xs = tl.where(_survives(_scores(tl.abs(xv.to(tl.float32)),
                                                tl.load(scale_ptr + kk, mask=live, other=0.0) if HAS_SCALE else None),
                                        tau), xv,
                              tl.zeros_like(xv))
            w = tl.load(wt_ptr + kk[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                        mask=live[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:  # the CPU interpreter's dot misreads bfloat16 (it multiplies the raw bits)
                acc = tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, w, acc)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in tl.static_range(ROWS_PER_SPLIT // BLOCK_K):
            offs_k = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0, cache_modifier=X_CACHE)
            keep = _survives(_scores(tl.abs(xv.to(tl.float32)),
                                     tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0) if HAS_SCALE else None), tau)
            keep = keep & k_mask[None, :]   # past K nothing is kept, even where tau < 0 lets a zero score pass
            xs = tl.where(keep, xv, tl.zeros_like(xv))
            # A channel's weight row is read when any token keeps it (the union over the tokens).
            row_live = tl.max(keep.to(tl.int32), axis=0) > 0
            w = tl.load(wt_ptr + offs_k[:, None].to(tl.int64) * stride_wk + offs_n[None, :] * stride_wn,
                        mask=row_live[:, None] & n_mask[None, :], other=0.0)
            if DOT_IN_FP32:
                acc = tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, w, acc)
    rows = token + offs_m
    out_mask = m_mask[:, None] & n_mask[None, :]
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial_ptr + (split * M + rows[:, None]) * N + offs_n[None, :], acc, mask=out_mask)
        # Every thread's partial stores happen before the ticket (release); the last ticket's reads after (acquire).
        tl.debug_barrier()
        counter = counters_ptr + token * n_tiles + pid_n
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == n_splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(n_splits):   # split order: the sum does not depend on which program came last
                total += tl.load(partial_ptr + (s * M + rows[:, None]) * N + offs_n[None, :], mask=out_mask,
                                 other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counter, 0)   # every split has drawn its ticket: ready for the next call


def _zero_tickets(zero_ptr, n_zero, ZERO_BLOCK: tl.constexpr):  # noqa: F821
    """Store zeros in ``zero_ptr[:n_zero]`` (``ZERO_BLOCK``, a power of two, at least ``n_zero``): the ticket
    counters of the GEMV launched next on the stream (:func:`zeroed_upstream_counters`). One program of the launch
    before it calls this, so that a compiled call allocates the counters without a fill kernel of its own."""
    offs = tl.arange(0, ZERO_BLOCK)  # noqa: F821
    tl.store(zero_ptr + offs, tl.zeros((ZERO_BLOCK,), dtype=tl.int32), mask=offs < n_zero)  # noqa: F821


_KERNELS = ("_scores", "_survives", "_list_survivors", "_gemv_program", "_threshold_gemv_kernel", "_zero_tickets")

# id(weight) -> (weakref to weight, data_ptr, _version, K-major copy). The identity check (the weakref
# still points at this very tensor) guards against a freed weight whose address and shape are
# reused by another; the weakref callback drops the copy when the weight dies.
_KMAJOR_CACHE: Dict[int, Tuple[weakref.ref, int, int, Tensor]] = {}


def _forget(key: int, dead: weakref.ref) -> None:
    """Drop the cached copy of a weight that died (unless the entry already belongs to a newer one)."""
    hit = _KMAJOR_CACHE.get(key)
    if hit is not None and hit[0] is dead:
        del _KMAJOR_CACHE[key]


def k_major(weight: Tensor) -> Tensor:
    """``weight [N, K]`` as a tensor whose ``.t()`` is contiguous ``[K, N]`` (a view when it already is).

    A row-major weight is transposed once and the copy cached for that weight
    tensor (same object, data pointer and ``_version``): weights of a compiled
    model are frozen, so one copy serves every call and an in-place update
    (which bumps ``_version``) makes a new one. The copy doubles the weight's
    memory; a compiler that binds a K-major buffer and passes its ``.t()`` view
    avoids both the copy and the cache.
    """
    if weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]:
        return weight
    if tracing(weight):
        # Traced into Inductor's graph, the transpose is a graph op run per call (no cache can hold it);
        # the compiler binds K-major weights, so its own calls never take this path.
        return weight.t().contiguous().t()
    key = id(weight)
    hit = _KMAJOR_CACHE.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == weight.data_ptr() and hit[2] == weight._version:
        return hit[3]
    copy = weight.t().contiguous().t()
    ref = weakref.ref(weight, functools.partial(_forget, key))
    _KMAJOR_CACHE[key] = (ref, weight.data_ptr(), weight._version, copy)
    return copy


def check_channel_scale(name: str, scale: Optional[Tensor], width: int) -> None:
    """Raise ``ValueError`` unless ``scale`` (criterion weighted) is None or has one entry per input channel."""
    if scale is not None and tuple(scale.shape) != (width,):
        raise ValueError(f"{name} must have shape [{width}] (one score factor per input channel), "
                         f"got {list(scale.shape)}")


def out_rows(out: Optional[Tensor], m: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``out`` checked to be a contiguous ``[m, n]`` ``dtype`` tensor (``ValueError`` otherwise), or a new one."""
    if out is None:
        return torch.empty(m, n, dtype=dtype, device=device)
    if tuple(out.shape) != (m, n) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {dtype} tensor")
    return out


class GemvBuffers(NamedTuple):
    """The operands of one split-K GEMV launch (``_gemv_program``) beside x and its ticket counters."""

    wt: Tensor                   # Wᵀ [K, N], a K-major view in x's dtype
    y: Tensor                    # [M, N] in x's dtype: the caller's ``out`` or a new tensor
    partial: Tensor              # float32 [splits, M, N]; the dummy when one split stores y itself
    scratch: Tensor              # int32 survivor slots, ROWS_PER_SPLIT per program; 1 element when predicated
    bias: Tensor                 # the bias, or the dummy
    scale: Tensor                # float32 channel scale (criterion weighted), or the dummy
    tau: float                   # tau rounded as the criterion compares it
    grid: Tuple[int, int, int]   # (N tiles, K splits, token programs)

    @property
    def direct(self) -> bool:
        """One K split: the kernel stores y itself (no partials, no tickets)."""
        return self.grid[1] == 1

    @property
    def tickets(self) -> int:
        """The ticket counters the launch merges its K splits with (:func:`gemv_ticket_count`)."""
        return _ticket_count(self.grid)


def gemv_grid(tokens: int, in_features: int, out_features: int, cfg: GemvConfig) -> Tuple[int, int, int]:
    """The GEMV launch's grid ``(N tiles, K splits, token programs)``: one program per token for one token or
    ``cfg.PER_TOKEN``, else one for all tokens (the ``tl.dot`` union). Plain integers: callable before Triton
    is bound. Every GEMV launch is planned here first (also the FFNs' down GEMV, before their first stage
    launches), so a config whose rows cannot go to ``tl.dot`` is refused here (:func:`gemv_block_m`)."""
    gemv_block_m(tokens, cfg)
    per_token = tokens == 1 or cfg.PER_TOKEN
    return -(-out_features // cfg.BLOCK_N), -(-in_features // cfg.ROWS_PER_SPLIT), tokens if per_token else 1


def gemv_block_m(tokens: int, cfg: GemvConfig) -> int:
    """The rows one GEMV program multiplies at a time: 1 (per-lane products, one token) for one token or
    ``cfg.PER_TOKEN``, unless ``cfg.DOT``; else :data:`DOT_ROWS` (``tl.dot``, the tokens padded to 16 rows).

    Raises ``ValueError`` when ``tl.dot`` would get a tile narrower than its minimum (``check_dot_tile``)."""
    if (tokens == 1 and not cfg.DOT) or (tokens > 1 and cfg.PER_TOKEN):
        return 1
    return check_dot_tile(tokens, cfg)


def check_dot_tile(tokens: int, cfg: GemvConfig) -> int:
    """:data:`DOT_ROWS` when ``cfg``'s tile can feed ``tl.dot`` (``BLOCK_N`` and ``BLOCK_K`` at least 16); else
    ``ValueError`` naming the config (``GemvConfig`` checks this for ``DOT`` itself; 2-16 tokens take ``tl.dot``
    whatever the flag)."""
    if min(cfg.BLOCK_N, cfg.BLOCK_K) < DOT_ROWS:
        raise ValueError(f"{cfg} for {tokens} token(s) multiplies with tl.dot, which needs BLOCK_N and BLOCK_K of "
                         f"at least {DOT_ROWS}; got BLOCK_N={cfg.BLOCK_N}, BLOCK_K={cfg.BLOCK_K}")
    return DOT_ROWS


def _ticket_count(grid: Tuple[int, int, int]) -> int:
    """One ticket counter per (token program, N tile) where K is split; none where one split stores y."""
    return 0 if grid[1] == 1 else grid[0] * grid[2]


def gemv_buffers(x2: Tensor, weight: Tensor, bias: Optional[Tensor], tau: float, cfg: GemvConfig,
                 out: Optional[Tensor], channel_scale: Optional[Tensor], dummy: Tensor) -> GemvBuffers:
    """The buffers of a GEMV launch over ``x2 [M, K]`` with ``weight [N, K]``: :func:`threshold_linear`'s, and the
    down stage of codegen/threshold_ffn.py's one-launch FFN. ``dummy`` stands for pointers the launch never
    touches: a tensor the launch only reads (codegen/launch.py says why)."""
    m, k = x2.shape
    n = weight.shape[0]
    grid = gemv_grid(m, k, n, cfg)
    n_splits = grid[1]
    # One slot of ROWS_PER_SPLIT channel indices per program for the compacted paths (only the
    # survivors' entries are written); a 1-element dummy otherwise.
    slots = grid[0] * grid[1] * grid[2] * cfg.ROWS_PER_SPLIT if cfg.COMPACT else 1
    # The magnitude criterion compares |x| with tau rounded to x's dtype (as torch compares x with a Python
    # float); the weighted one compares a float32 score with tau in float32 (as the reference does).
    return GemvBuffers(
        wt=k_major(weight.to(x2.dtype)).t(), y=out_rows(out, m, n, x2.dtype, x2.device),
        partial=dummy if n_splits == 1 else torch.empty(n_splits, m, n, dtype=torch.float32, device=x2.device),
        scratch=torch.empty(slots, dtype=torch.int32, device=x2.device),
        bias=bias.contiguous() if bias is not None else dummy,
        scale=channel_scale.float().contiguous() if channel_scale is not None else dummy,
        tau=round_to_dtype(tau, x2.dtype if channel_scale is None else torch.float32), grid=grid)


def gemv_ticket_count(tokens: int, in_features: int, out_features: int, cfg: GemvConfig) -> int:
    """How many ticket counters :func:`threshold_linear`'s launch with ``cfg`` merges its K splits with (one per
    token program and N tile); 0 where one K split stores y itself."""
    return _ticket_count(gemv_grid(tokens, in_features, out_features, cfg))


def zeroed_upstream_counters(tokens: int, in_features: int, out_features: int, cfg: GemvConfig,
                             like: Tensor) -> Tuple[Tensor, int, int]:
    """``(counters, count, zero_block)`` for a :func:`threshold_linear` launch whose ticket counters the launch
    before it zeroes with ``_zero_tickets(counters, count, zero_block)`` (the fused FFNs' first stage): eagerly the
    stream's cached counters, traced an uninitialised buffer, so Inductor emits no fill kernel for them. Where the
    GEMV merges no K splits, ``(like, 0, 0)``: nothing to zero (``like`` stands for the unused pointer)."""
    count = gemv_ticket_count(tokens, in_features, out_features, cfg)
    if count == 0:
        return like, 0, 0
    return ticket_counters(count, like, zeroed_by_earlier_launch=True), count, 1 << (count - 1).bit_length()


def threshold_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau: float,
                     config: Optional[GemvConfig] = None, out: Optional[Tensor] = None,
                     channel_scale: Optional[Tensor] = None, counters: Optional[Tensor] = None) -> Tensor:
    """Triton ``F.linear(x * (|x| > tau), weight, bias)`` for decode (TEAL input mode).

    For at most :data:`MAX_DECODE_TOKENS` tokens of float16/bfloat16/float32,
    a split-K GEMV reads only the weight rows of input channels that are kept
    (see the notes above); otherwise the reference (dense ``F.linear`` on the
    thresholded input) runs. ``channel_scale`` (``[K]``, criterion "weighted")
    keeps channel i iff ``|x_i| * channel_scale[i] > tau``, the score in float32,
    as :func:`threshold_linear_ref` computes it. ``config`` overrides
    :func:`default_gemv_config`; ``out`` (contiguous ``[M, N]``, ``x.dtype``)
    receives the result of the kernel path. ``counters`` (int32, at least
    :func:`gemv_ticket_count` of them, all zero when this launch starts) replaces
    the launch's own :func:`~sparsecc.codegen.launch.ticket_counters`: the fused
    FFNs' first launch zeroes them (:func:`zeroed_upstream_counters`), so a
    compiled call needs no fill kernel.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    check_channel_scale("channel_scale", channel_scale, k)
    if m == 0 or m > MAX_DECODE_TOKENS or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return threshold_linear_ref(x, weight, bias, tau, channel_scale)
    bind_triton(globals(), _KERNELS)
    cfg = config or default_gemv_config(m)
    # Dummies for pointers a launch never touches are x2, which it only reads (codegen/launch.py says why).
    g = gemv_buffers(x2, weight, bias, tau, cfg, out, channel_scale, x2)
    n_tickets = g.tickets
    if n_tickets == 0:
        counters = x2
    elif counters is None:
        counters = ticket_counters(n_tickets, x2)
    elif counters.dtype != torch.int32 or counters.numel() < n_tickets:
        raise ValueError(f"threshold_linear: counters must be at least {n_tickets} int32 values, got "
                         f"{counters.numel()} {counters.dtype}")
    interpreting = x.device.type == "cpu"  # CPU tensors reach a Triton kernel only under TRITON_INTERPRET
    launcher(_threshold_gemv_kernel, x2)[g.grid](  # noqa: F821
        x2, g.wt, g.partial, g.scratch, g.bias, g.y, counters, g.scale, m, n, k, g.tau,
        x2.stride(0), x2.stride(1), g.wt.stride(0), g.wt.stride(1),
        BLOCK_M=gemv_block_m(m, cfg), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        ROWS_PER_SPLIT=cfg.ROWS_PER_SPLIT, DOT_IN_FP32=interpreting or x.dtype == torch.float32,
        COMPACT=cfg.COMPACT, DIRECT=g.direct, HAS_BIAS=bias is not None, HAS_SCALE=channel_scale is not None,
        ONE_TOKEN=m == 1,
        num_warps=cfg.num_warps, num_stages=cfg.STAGES)
    return g.y.reshape(*lead, n)
