"""Input-mode activation sparsity (TEAL) on a whole gated FFN, for decode: one or two launches instead of five.

Layout of this file: module notes, the reference, then the Triton kernel (bound lazily by
``epilogue.bind_triton``, so importing this module never imports Triton) and the wrapper.

Semantics (``threshold_ffn_ref``, docs/spec.md "activation_threshold", mode input): the FFN's gate
and up projections read ``x̃ = x ⊙ [|x| > tau_input]``, the down projection reads
``h̃ = h ⊙ [|h| > tau_down]``::

    h = act(x̃ Wgᵀ + bg) ⊙ (x̃ Wuᵀ + bu)        y = h̃ Wdᵀ + bd

exactly what the three thresholded projections of the model compute one after the other (each
``threshold_linear``), with the activation and the product between them.

Notation: x [M, D] with M <= MAX_DECODE_TOKENS, Wgᵀ / Wuᵀ [D, F] K-major (row d of Wgᵀ is input
channel d's contiguous weight row), h [M, F].

Stage 1 (``_threshold_gate_up_kernel``): program (f tile, D split) owns BLOCK_N neurons and
ROWS_PER_SPLIT input channels. It ranks the channels of its split that some token keeps (``tl.cumsum``,
``activation_sparse._list_survivors``) into its scratch slot and loops over that list BLOCK_K rows at a
time, loading the gate *and* the up rows of each surviving channel in the same trip (two independent
loads in flight per trip). Dropped channels cost no weight bytes and no loop trips. With one split the
program has the whole gate and up sums of its neurons; with several it stores float32 partials and takes
a ticket from its f tile's counter (``launch.ticket_counters``), and the program that draws the last one
sums the partials in split order. That program adds the biases, applies the activation, multiplies and
stores h in x's dtype, rounding where the reference rounds (linear outputs, activation output, product):
the down stage then drops exactly the h the reference drops. Splitting D lets wide f tiles (long
contiguous row segments, which the memory serves better than many short ones) still fill the GPU.
Stage 2 (``activation_sparse.threshold_linear`` on h with ``tau_down``): the compacted split-K
GEMV over the surviving rows of Wdᵀ, merged in the same launch by the last split (ticket counters).

Against the three-op form (gate GEMV, up GEMV, Inductor's act ⊙ up kernel, down GEMV and its merge)
this reads the same weight bytes, lists x's survivors once per program instead of twice, and runs
in two launches, which is what a decode step at high sparsity pays for (each launch costs
microseconds next to a few microseconds of kept bytes).

One launch (``_threshold_ffn_kernel``, one token): both stages' programs in one grid, each taking its
work by ticket; a down program waits until the f tiles of its split of F have stored h (docs/kernels.md
says why this cannot deadlock). The stages are the same device functions as above, so the result is the
two launches' bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.codegen import activation_sparse as _gemv
from sparsecc.codegen import gate_sparse_ffn as _gate
from sparsecc.codegen.activation_sparse import (ACTIVATIONS, MAX_DECODE_TOKENS, GemvConfig, check_dot_tile,
                                                check_channel_scale, default_gemv_config, gemv_block_m, gemv_buffers,
                                                k_major, threshold_linear, zeroed_upstream_counters)
from sparsecc.codegen.epilogue import bind_triton
from sparsecc.codegen.launch import launcher, round_to_dtype, ticket_counters

__all__ = ["threshold_ffn", "threshold_ffn_ref", "default_threshold_ffn_config", "DEFAULT_THRESHOLD_FFN_CONFIG",
           "DEFAULT_THRESHOLD_FFN_CONFIG_WEIGHTED", "stage_one_block_m",
           "DEFAULT_THRESHOLD_FFN_CONFIG_TOKENS", "KERNEL_DTYPES", "one_launch_refusal", "ONE_LAUNCH_BY_DEFAULT"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes ``threshold_ffn`` runs as a kernel; others (float64) run the reference."""


# ============================================================== reference


def _kept(v: Tensor, tau: float, scale: Optional[Tensor]) -> Tensor:
    """``v`` with the entries whose score is at most ``tau`` zeroed: ``|v|`` (no scale) or ``|v| * scale`` in
    float32 (criterion weighted)."""
    if scale is None:
        return v * (v.abs() > tau).to(v.dtype)
    return v * ((v.abs().float() * scale.float()) > tau).to(v.dtype)


def threshold_ffn_ref(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                      w_down: Tensor, b_down: Optional[Tensor], *, act: str, tau_input: float,
                      tau_down: float, scale_gate: Optional[Tensor] = None, scale_up: Optional[Tensor] = None,
                      scale_down: Optional[Tensor] = None) -> Tensor:
    """Reference gated FFN with thresholded projection inputs (weights ``[out, in]``, computed in x's dtype).

    ``x̃ = x ⊙ [|x| > tau_input]``, ``h = act(x̃ Wgᵀ + bg) ⊙ (x̃ Wuᵀ + bu)``, ``y = (h ⊙ [|h| > tau_down]) Wdᵀ + bd``.
    With the weighted criterion each projection scores its own input with its own column norms
    (``scale_gate``, ``scale_up``, ``scale_down``): the gate and up projections may keep different channels of x.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not allowed; expected one of {sorted(ACTIVATIONS)}")
    h = ACTIVATIONS[act](F.linear(_kept(x, tau_input, scale_gate), w_gate, b_gate)) * \
        F.linear(_kept(x, tau_input, scale_up), w_up, b_up)
    return F.linear(_kept(h, tau_down, scale_down), w_down, b_down)


# ============================================================== Triton kernel

# Stage 1's launch knobs are a GemvConfig: BLOCK_N neurons per program, BLOCK_K survivors per trip, ROWS_PER_SPLIT
# channels of D per split, COMPACT (list the split's survivors and loop over them) or predicated (visit every
# BLOCK_K chunk, loading only the rows some token keeps: addresses do not wait on a list); PER_TOKEN is not used.
# One token, from bench/ffn_input.py --sweep on the H200 (64 compacted and predicated stage-1 shapes, 48 down
# shapes at 50% and 90%): 64-wide N tiles, 128 survivors per trip, D unsplit up to 4096, 4 warps, compacted; the
# spread over all shapes was about 5%, predicated never won. Since then the token runs on tensor cores (DOT: its
# row padded to 16, few registers), and the down GEMV likewise (activation_sparse.DEFAULT_GEMV_CONFIG): on an H100
# and an H200 the FFN took 0-9% less time at 50-90% than with the per-lane tiles (bench/RESULTS.md, "One token on
# tensor cores"). On tensor cores 64-wide N tiles on 4 warps (224 programs) beat 128-wide ones on 8 warps at 90% by
# 4-6% in fp16 and 2.5-4% in bf16, and tied at 50-70%, in four H100 runs ("Stage 1's tile on tensor cores"). Not
# with the weighted criterion: there the FFN with stage 1 on tensor cores took 10-23% longer on an H100 (triton 3.6
# builds that loop with 255 registers per thread and 1.9x the magnitude criterion's instructions), so its stage 1
# keeps the same tile with per-lane products.
DEFAULT_THRESHOLD_FFN_CONFIG = GemvConfig(BLOCK_N=64, BLOCK_K=128, ROWS_PER_SPLIT=4096, num_warps=4, DOT=True)
"""Stage 1's launch knobs for one token (magnitude criterion)."""
DEFAULT_THRESHOLD_FFN_CONFIG_WEIGHTED = dataclasses.replace(DEFAULT_THRESHOLD_FFN_CONFIG, DOT=False)
"""Stage 1's launch knobs for one token under the weighted criterion (per-lane products)."""
# 2-16 tokens: the tl.dot union; not swept yet (the compiler plans this op for two tokens with the magnitude
# criterion, passes/ffn.py; `bench/ffn_stage1.py --tokens 2` sweeps it).
DEFAULT_THRESHOLD_FFN_CONFIG_TOKENS = GemvConfig(BLOCK_N=64, BLOCK_K=64, ROWS_PER_SPLIT=2048, num_warps=8)
"""Stage 1's launch knobs for 2-16 tokens (the ``tl.dot`` union)."""

_rounded = _gate._rounded
_list_survivors = _gemv._list_survivors
_scores = _gemv._scores
_survives = _gemv._survives
_zero_tickets = _gemv._zero_tickets
_activation = None
_gemv_program = None   # activation_sparse's, once JIT-bound there (``_bind``)


def _threshold_gate_up_kernel(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, scratch_ptr, partial_ptr, counters_ptr,
                              sg_ptr, su_ptr, zero_ptr, n_zero, M, F, D, tau, stride_xm, stride_xd, stride_gd,
                              stride_gf, stride_ud, stride_uf,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # noqa: F821
                              ROWS_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr,  # noqa: F821
                              COMPACT: tl.constexpr, HAS_BG: tl.constexpr,  # noqa: F821
                              HAS_BU: tl.constexpr, ACTIVATION: tl.constexpr,  # noqa: F821
                              DOT_IN_FP32: tl.constexpr, ROUND_BY_BITS: tl.constexpr,  # noqa: F821
                              HAS_SCALE: tl.constexpr, ZERO_BLOCK: tl.constexpr,  # noqa: F821
                              ONE_TOKEN: tl.constexpr):  # noqa: F821
    """Stage 1 alone: program (f tile, D split) of the grid runs :func:`_gate_up_program`. With ``ZERO_BLOCK``
    the first program also stores zeros in ``zero_ptr[:n_zero]`` (the down GEMV's ticket counters, which the next
    launch merges its K splits with: a compiled call then needs no fill kernel of its own)."""
    if ZERO_BLOCK > 0:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            _zero_tickets(zero_ptr, n_zero, ZERO_BLOCK)
    _gate_up_program(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, scratch_ptr, partial_ptr, counters_ptr, sg_ptr, su_ptr,
                     M, F, D, tau, stride_xm, stride_xd, stride_gd, stride_gf, stride_ud, stride_uf,
                     tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                     BLOCK_M, BLOCK_N, BLOCK_K, ROWS_PER_SPLIT, SPLIT, COMPACT, HAS_BG, HAS_BU, ACTIVATION, DOT_IN_FP32,
                     ROUND_BY_BITS, HAS_SCALE, ONE_TOKEN)


def _gate_up_program(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, scratch_ptr, partial_ptr, counters_ptr,
                     sg_ptr, su_ptr, M, F, D, tau, stride_xm, stride_xd, stride_gd, stride_gf, stride_ud, stride_uf,
                     pid, split, n_tiles, n_splits,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # noqa: F821
                     ROWS_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr,  # noqa: F821
                     COMPACT: tl.constexpr, HAS_BG: tl.constexpr,  # noqa: F821
                     HAS_BU: tl.constexpr, ACTIVATION: tl.constexpr,  # noqa: F821
                     DOT_IN_FP32: tl.constexpr, ROUND_BY_BITS: tl.constexpr,  # noqa: F821
                     HAS_SCALE: tl.constexpr, ONE_TOKEN: tl.constexpr):  # noqa: F821
    """h[:, f-tile ``pid``] = act(x̃ Wgᵀ + bg) ⊙ (x̃ Wuᵀ + bu) over the channels some token keeps, for D split
    ``split`` of ``n_splits`` (``n_tiles`` f tiles); see the notes above. Returns whether this program stored the
    tile's h (it ran the only split, or drew the tile's last ticket).

    With ``HAS_SCALE`` (criterion weighted) the gate keeps channel d iff ``|x_d| * sg_d > tau`` and the up
    projection iff ``|x_d| * su_d > tau``: the list holds their union, and each weight row is loaded only where
    its own projection keeps the channel. ``ONE_TOKEN``: M is 1 (the list then holds exactly the token's survivors).
    """
    # Inductor hands Python floats to the kernels it launches as float64: compute in float32, as Triton does.
    tau = tl.cast(tau, tl.float32)
    offs_f = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    f_mask = offs_f < F
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    out_mask = m_mask[:, None] & f_mask[None, :]
    k0 = split * ROWS_PER_SPLIT
    if BLOCK_M == 1:
        accg2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        accu2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        accg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        accu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if COMPACT:
        slot = scratch_ptr + (split * n_tiles + pid).to(tl.int64) * ROWS_PER_SPLIT
        # One token lists from a vector of x, not a [BLOCK_M, ROWS_PER_SPLIT] tile of padded rows.
        count = _list_survivors(x_ptr, stride_xm, stride_xd, M, D, k0, tau, slot, sg_ptr, su_ptr,
                                1 if ONE_TOKEN else BLOCK_M,
                                ROWS_PER_SPLIT, 2 if HAS_SCALE else 0, "")
        trips = tl.cdiv(count, BLOCK_K)
    else:
        trips = (ROWS_PER_SPLIT + BLOCK_K - 1) // BLOCK_K   # a split narrower than BLOCK_K still takes one trip
    for t in range(0, trips):
        offs_j = t * BLOCK_K + tl.arange(0, BLOCK_K)
        if COMPACT:   # the t-th BLOCK_K survivors of the list
            live = offs_j < count
            kk = tl.load(slot + offs_j, mask=live, other=0)
            if HAS_SCALE:   # the list's entries carry which projection keeps them (bits 30 and 29)
                live_g = live & ((kk & 1073741824) != 0)
                live_u = live & ((kk & 536870912) != 0)
                kk = kk & 536870911
        else:         # the t-th BLOCK_K channels of the split; rows no token keeps are not loaded
            kk = k0 + offs_j
            live = (offs_j < ROWS_PER_SPLIT) & (kk < D)
        if BLOCK_M == 1:
            xk = tl.load(x_ptr + kk * stride_xd, mask=live, other=0.0).to(tl.float32)
            if HAS_SCALE:
                if not COMPACT:   # each projection's own survivors among the visited channels
                    live_g = live & _survives(_scores(tl.abs(xk), tl.load(sg_ptr + kk, mask=live, other=0.0)), tau)
                    live_u = live & _survives(_scores(tl.abs(xk), tl.load(su_ptr + kk, mask=live, other=0.0)), tau)
                xk_g = tl.where(live_g, xk, 0.0)
                xk_u = tl.where(live_u, xk, 0.0)
            else:
                if not COMPACT:
                    live = live & _survives(tl.abs(xk), tau)
                    xk = tl.where(live, xk, 0.0)
                live_g = live
                live_u = live
                xk_g = xk
                xk_u = xk
        else:
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xd,
                         mask=m_mask[:, None] & live[None, :], other=0.0)
            if COMPACT and ONE_TOKEN:
                # One token on tensor cores (DOT): the list holds exactly its survivors, and with HAS_SCALE bits
                # 30 / 29 say which projection keeps each: nothing is scored again (no scale re-read per trip).
                if HAS_SCALE:
                    xs_g = tl.where(live_g[None, :], xv, tl.zeros_like(xv))
                    xs_u = tl.where(live_u[None, :], xv, tl.zeros_like(xv))
                else:   # xv is already zero off the list (its load's mask)
                    live_g = live
                    live_u = live
                    xs_g = xv
                    xs_u = xv
            else:
                xabs = tl.abs(xv.to(tl.float32))
                keep_g = _survives(_scores(xabs, tl.load(sg_ptr + kk, mask=live, other=0.0) if HAS_SCALE else None),
                                   tau)
                xs_g = tl.where(keep_g, xv, tl.zeros_like(xv))
                if HAS_SCALE:
                    keep_u = _survives(_scores(xabs, tl.load(su_ptr + kk, mask=live, other=0.0)), tau)
                    xs_u = tl.where(keep_u, xv, tl.zeros_like(xv))
                    if not COMPACT:   # a row is read when some token keeps its channel for that projection
                        live_g = live & (tl.max(keep_g.to(tl.int32), axis=0) > 0)
                        live_u = live & (tl.max(keep_u.to(tl.int32), axis=0) > 0)
                else:
                    xs_u = xs_g
                    if not COMPACT:
                        live = live & (tl.max(keep_g.to(tl.int32), axis=0) > 0)
                    live_g = live
                    live_u = live
        wg = tl.load(wg_ptr + kk[:, None].to(tl.int64) * stride_gd + offs_f[None, :] * stride_gf,
                     mask=live_g[:, None] & f_mask[None, :], other=0.0)
        wu = tl.load(wu_ptr + kk[:, None].to(tl.int64) * stride_ud + offs_f[None, :] * stride_uf,
                     mask=live_u[:, None] & f_mask[None, :], other=0.0)
        if BLOCK_M == 1:
            accg2 += xk_g[:, None] * wg.to(tl.float32)
            accu2 += xk_u[:, None] * wu.to(tl.float32)
        else:
            if DOT_IN_FP32:  # fp32 inputs, or the CPU interpreter (its bf16 dot multiplies raw bits)
                accg = tl.dot(xs_g.to(tl.float32), wg.to(tl.float32), accg, input_precision="ieee")
                accu = tl.dot(xs_u.to(tl.float32), wu.to(tl.float32), accu, input_precision="ieee")
            else:
                accg = tl.dot(xs_g, wg, accg)
                accu = tl.dot(xs_u, wu, accu)
    if BLOCK_M == 1:
        accg = tl.reshape(tl.sum(accg2, axis=0), (1, BLOCK_N))
        accu = tl.reshape(tl.sum(accu2, axis=0), (1, BLOCK_N))
    last = True
    if SPLIT:
        # Partials [split, gate|up, M, F]; the program that draws the last ticket of this N tile finishes it.
        part = partial_ptr + ((split * 2) * M + offs_m[:, None]) * F + offs_f[None, :]
        tl.store(part, accg, mask=out_mask)
        tl.store(part + M * F, accu, mask=out_mask)
        tl.debug_barrier()   # every thread's partial stores happen before the ticket (release)
        ticket = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu")
        last = ticket == n_splits - 1
        if last:
            accg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            accu = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(n_splits):   # split order: the sums do not depend on which program came last
                part = partial_ptr + ((s * 2) * M + offs_m[:, None]) * F + offs_f[None, :]
                accg += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
                accu += tl.load(part + M * F, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(counters_ptr + pid, 0)   # every split has drawn its ticket: ready for the next call
    if last:
        if HAS_BG:
            accg += tl.load(bg_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_BU:
            accu += tl.load(bu_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        # Round where the reference rounds: both linear outputs, the activation, the product.
        a = _rounded(_activation(_rounded(accg, h_ptr, ROUND_BY_BITS), ACTIVATION), h_ptr, ROUND_BY_BITS)
        h = a * _rounded(accu, h_ptr, ROUND_BY_BITS)
        tl.store(h_ptr + offs_m[:, None] * F + offs_f[None, :], h.to(h_ptr.dtype.element_ty), mask=out_mask)
    return last


def _threshold_ffn_kernel(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, scratch_ptr, partial_ptr, sg_ptr, su_ptr,
                          wd_ptr, bd_ptr, sd_ptr, y_ptr, down_scratch_ptr, down_partial_ptr, counters_ptr,
                          F, D, N, tau, tau_down, stride_xd, stride_gd, stride_gf, stride_ud, stride_uf,
                          stride_dk, stride_dn, N_F_TILES, N_SPLITS, N_DOWN_TILES, N_DOWN_SPLITS,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS_PER_SPLIT: tl.constexpr,  # noqa: F821
                          SPLIT: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,  # noqa: F821
                          ACTIVATION: tl.constexpr, ROUND_BY_BITS: tl.constexpr,  # noqa: F821
                          HAS_SCALE: tl.constexpr, DOWN_BLOCK_N: tl.constexpr,  # noqa: F821
                          DOWN_BLOCK_K: tl.constexpr, DOWN_ROWS: tl.constexpr,  # noqa: F821
                          DOWN_DIRECT: tl.constexpr, HAS_BD: tl.constexpr,  # noqa: F821
                          HAS_SCALE_DOWN: tl.constexpr, BLOCK_M: tl.constexpr,  # noqa: F821
                          DOWN_BLOCK_M: tl.constexpr, DOT_IN_FP32: tl.constexpr):  # noqa: F821
    """One token's whole FFN in one launch: stage 1's tiles, then the down GEMV's, handed out by ticket.

    Counters (int32, zero on entry, zero again on exit): [0] the work ticket; [1, 1 + S) per down split, how many of
    its f tiles have stored h; [1 + S, 1 + 2S) per down split, how many of its programs have seen them all; then
    the down GEMV's merge tickets (one per N tile) and stage 1's (one per f tile), S = N_DOWN_SPLITS.
    """
    n_stage1 = N_F_TILES * N_SPLITS
    n_work = n_stage1 + N_DOWN_TILES * N_DOWN_SPLITS
    ready = counters_ptr + 1
    passed = ready + N_DOWN_SPLITS
    down_tickets = passed + N_DOWN_SPLITS
    stage1_tickets = down_tickets + N_DOWN_TILES
    # Work goes by ticket, not by program id: a program holding a down ticket started after every stage 1
    # ticket was drawn, by programs already running, which never wait, so its wait below always ends.
    ticket = tl.atomic_add(counters_ptr, 1, sem="relaxed", scope="gpu")
    if ticket == n_work - 1:
        tl.store(counters_ptr, 0)   # every ticket is drawn: ready for the next call
    tiles_per_split = DOWN_ROWS // BLOCK_N   # stage 1's f tiles nest in the down splits (the wrapper checks)
    if ticket < n_stage1:
        pid = ticket % N_F_TILES
        last = _gate_up_program(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, h_ptr, scratch_ptr, partial_ptr,
                                stage1_tickets, sg_ptr, su_ptr, 1, F, D, tau, 0, stride_xd, stride_gd, stride_gf,
                                stride_ud, stride_uf, pid, ticket // N_F_TILES, N_F_TILES, N_SPLITS,
                                BLOCK_M, BLOCK_N, BLOCK_K, ROWS_PER_SPLIT, SPLIT, True, HAS_BG, HAS_BU, ACTIVATION,
                                DOT_IN_FP32, ROUND_BY_BITS, HAS_SCALE, True)
        if last:   # this tile's h is stored: count it for its down split (every thread's stores come first)
            tl.debug_barrier()
            tl.atomic_add(ready + pid // tiles_per_split, 1, sem="release", scope="gpu")
    elif ticket < n_work:   # (more tickets than work only if two launches shared the counters: launch.py's rule)
        work = ticket - n_stage1
        split = work // N_DOWN_TILES   # split-major: the first down programs read the first tiles stored
        want = tl.minimum(tiles_per_split, N_F_TILES - split * tiles_per_split)
        # Spin on relaxed reads (an acquire read invalidates the SM's L1 each time, under the programs beside this
        # one), then one acquire read of the final count orders the reads of h after every tile's release; the
        # count cannot be reset before this program has passed.
        seen = tl.atomic_add(ready + split, 0, sem="relaxed", scope="gpu")
        while seen < want:
            seen = tl.atomic_add(ready + split, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(ready + split, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()
        _gemv_program(h_ptr, wd_ptr, down_partial_ptr, down_scratch_ptr, bd_ptr, y_ptr, down_tickets, sd_ptr,
                      1, N, F, tau_down, F, 1, stride_dk, stride_dn, work % N_DOWN_TILES, split, 0, N_DOWN_TILES,
                      N_DOWN_SPLITS, DOWN_BLOCK_M, DOWN_BLOCK_N, DOWN_BLOCK_K, DOWN_ROWS, DOT_IN_FP32, True,
                      DOWN_DIRECT, HAS_BD, HAS_SCALE_DOWN, True, ".cg")
        # The last of a split's programs to get here resets its two counters (all the others are past the wait).
        if tl.atomic_add(passed + split, 1, sem="relaxed", scope="gpu") == N_DOWN_TILES - 1:
            tl.store(ready + split, 0)
            tl.store(passed + split, 0)


_KERNELS = ("_rounded", "_scores", "_survives", "_list_survivors", "_zero_tickets", "_gate_up_program",
            "_threshold_gate_up_kernel", "_threshold_ffn_kernel")


def _bind() -> None:
    """JIT this module's kernel and the helpers it calls (first use; imports Triton; later calls return at once)."""
    if getattr(_threshold_gate_up_kernel, "_sparsecc_jit", False):
        return
    _gate._bind()                          # the helpers resolve ``tl`` in their own modules
    bind_triton(vars(_gemv), _gemv._KERNELS)
    if _activation is None:
        globals()["_activation"] = _gate._activation
    if _gemv_program is None:
        globals()["_gemv_program"] = _gemv._gemv_program
    bind_triton(globals(), _KERNELS)


# ============================================================== wrapper


def _check_shapes(x: Tensor, w_gate: Tensor, b_gate, w_up: Tensor, b_up, w_down: Tensor, b_down) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the gated FFN."""
    if w_up is None:
        raise ValueError("w_up is None: threshold_ffn computes a gated FFN (use threshold_linear per projection)")
    _gate._check_shapes(x, w_gate, b_gate, w_up, b_up, w_down, b_down)


def stage_one_block_m(tokens: int, config: GemvConfig) -> int:
    """The rows one stage-1 program multiplies at a time: every token's (its grid has no token axis, so
    ``PER_TOKEN`` does not apply), 1 for one token unless ``config.DOT``, else :data:`DOT_ROWS` (``tl.dot``)."""
    return gemv_block_m(1, config) if tokens == 1 else check_dot_tile(tokens, config)


def default_threshold_ffn_config(tokens: int, weighted: bool = False) -> GemvConfig:
    """Stage 1's launch knobs for ``tokens`` rows when none are given (``weighted``: the weighted criterion)."""
    if tokens > 1:
        return DEFAULT_THRESHOLD_FFN_CONFIG_TOKENS
    return DEFAULT_THRESHOLD_FFN_CONFIG_WEIGHTED if weighted else DEFAULT_THRESHOLD_FFN_CONFIG


# Whether one token runs the one-launch kernel when the caller does not say. Off: timed on an H100 against the
# two launches it was 3.6-5.7 us slower at 50-90% in fp16 and bf16, and no swept knob pair won (bench/RESULTS.md,
# "One launch for the whole one-token FFN, timed"); with both stages on tensor cores (DOT) the best of 32 pairs was
# still 0.5-2.9 us slower ("One token on tensor cores").
ONE_LAUNCH_BY_DEFAULT = False
"""Whether one token runs both stages in one launch when the caller does not say."""


def one_launch_refusal(tokens: int, config: GemvConfig, down_config: GemvConfig, inner: int = 1,
                       out_features: int = 1) -> str:
    """Why the FFN cannot run as one launch with these launch knobs ("" when it can).

    One launch serves one token of a non-empty FFN (``inner`` F and ``out_features`` N at least 1: the down
    programs reset the counters stage 1 counts on), with both stages compacted, one warp count and pipelining
    depth (a launch has one of each), and stage 1's f tiles nesting in the down GEMV's splits of F (a down split
    waits for its own tiles).
    """
    if tokens != 1:
        return f"{tokens} tokens (one launch serves one token)"
    if inner < 1 or out_features < 1:
        return f"an empty FFN (F = {inner}, N = {out_features})"
    if not (config.COMPACT and down_config.COMPACT):
        return "a predicated stage (one launch lists survivors in both stages)"
    if (config.num_warps, config.STAGES) != (down_config.num_warps, down_config.STAGES):
        return (f"stage 1 on {config.num_warps} warps and {config.STAGES} stages, the down GEMV on "
                f"{down_config.num_warps} warps and {down_config.STAGES} stages (one launch has one of each)")
    if down_config.ROWS_PER_SPLIT % config.BLOCK_N:
        return (f"the down GEMV's {down_config.ROWS_PER_SPLIT}-row splits are not whole f tiles of "
                f"{config.BLOCK_N} neurons")
    return ""


def threshold_ffn(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                  w_down: Tensor, b_down: Optional[Tensor], act: str, tau_input: float, tau_down: float,
                  config: Optional[GemvConfig] = None, down_config: Optional[GemvConfig] = None,
                  out: Optional[Tensor] = None, scale_gate: Optional[Tensor] = None,
                  scale_up: Optional[Tensor] = None, scale_down: Optional[Tensor] = None,
                  one_launch: Optional[bool] = None) -> Tensor:
    """Triton gated FFN with thresholded projection inputs for decode (TEAL); same result as ``threshold_ffn_ref``.

    For at most :data:`MAX_DECODE_TOKENS` tokens of float16/bfloat16/float32: stage 1 writes h from the
    surviving channels' gate and up rows, stage 2 is the compacted down GEMV (see the module notes); weights
    are read K-major (``k_major``: pass ``.t()`` views of ``[in, out]`` buffers to avoid a cached copy). More
    tokens or float64 run the reference. ``config`` / ``down_config`` override the stages' launch knobs;
    ``out`` (contiguous ``[M, D_out]``, ``x.dtype``) receives the kernel path's result. ``scale_gate`` and
    ``scale_up`` (both or neither, ``[D]``) and ``scale_down`` (``[F]``) are the weighted criterion's column norms.
    ``one_launch``: both stages in one launch (the same numbers, bit for bit); by default (None) one token takes it
    when :data:`ONE_LAUNCH_BY_DEFAULT` is set and :func:`one_launch_refusal` allows; True raises ``ValueError``
    where it does not; False launches the stages one after the other. In one launch the default down knobs (no
    ``down_config``) take stage 1's warp count and pipelining depth, as a launch has one of each.
    """
    x2, lead = _gate.decode_rows(x, act, w_gate, b_gate, w_up, b_up, w_down, b_down, _check_shapes)
    f, d = w_gate.shape
    m = x2.shape[0]
    if (scale_gate is None) != (scale_up is None):
        raise ValueError("scale_gate and scale_up are given together (criterion weighted) or not at all")
    for name, scale, width in (("scale_gate", scale_gate, d), ("scale_up", scale_up, d), ("scale_down", scale_down, f)):
        check_channel_scale(name, scale, width)
    if m == 0 or m > MAX_DECODE_TOKENS or x.dtype not in KERNEL_DTYPES:
        return threshold_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau_input=tau_input,
                                 tau_down=tau_down, scale_gate=scale_gate, scale_up=scale_up, scale_down=scale_down)
    _bind()
    cfg = config or default_threshold_ffn_config(m, weighted=scale_gate is not None)
    down_cfg = down_config or default_gemv_config(m)
    # The rule is asked only where one launch is wanted (a decode step's calls with two launches skip it).
    wanted = one_launch or (one_launch is None and ONE_LAUNCH_BY_DEFAULT)
    # A launch has one warp count and pipelining depth: in one launch the default down knobs take stage 1's.
    one_down = dataclasses.replace(down_cfg, num_warps=cfg.num_warps, STAGES=cfg.STAGES) \
        if wanted and down_config is None else down_cfg
    refusal = one_launch_refusal(m, cfg, one_down, f, w_down.shape[0]) if wanted else ""
    if one_launch and refusal:
        raise ValueError(f"threshold_ffn(one_launch=True): not with {refusal}")
    dtype = x.dtype
    wgt, wut = k_major(w_gate.to(dtype)).t(), k_major(w_up.to(dtype)).t()   # [D, F] views
    h = torch.empty(m, f, dtype=dtype, device=x.device)
    rows = min(cfg.ROWS_PER_SPLIT, triton.next_power_of_2(d))  # noqa: F821 - bound by bind_triton
    grid = (triton.cdiv(f, cfg.BLOCK_N), triton.cdiv(d, rows))  # noqa: F821
    scratch = torch.empty(grid[0] * grid[1] * rows if cfg.COMPACT else 1, dtype=torch.int32, device=x.device)
    split = grid[1] > 1
    # Dummies for pointers the launch never touches are x2, which it only reads (codegen/launch.py says why).
    partial = torch.empty(grid[1], 2, m, f, dtype=torch.float32, device=x.device) if split else x2
    interpreting = x.device.type == "cpu"  # CPU tensors reach a Triton kernel only under TRITON_INTERPRET
    weighted = scale_gate is not None
    sg = scale_gate.float().contiguous() if weighted else x2
    su = scale_up.float().contiguous() if weighted else x2
    bg = b_gate.contiguous() if b_gate is not None else x2
    bu = b_up.contiguous() if b_up is not None else x2
    # As in threshold_linear: |x| against tau in x's dtype, a weighted score against tau in float32.
    tau_arg = round_to_dtype(tau_input, torch.float32 if weighted else dtype)
    stage1 = dict(BLOCK_M=stage_one_block_m(m, cfg), BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, ROWS_PER_SPLIT=rows,
                  SPLIT=split, HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACTIVATION=act,
                  DOT_IN_FP32=interpreting or dtype == torch.float32,
                  ROUND_BY_BITS=interpreting and dtype == torch.bfloat16, HAS_SCALE=weighted, num_warps=cfg.num_warps,
                  num_stages=cfg.STAGES)
    if wanted and not refusal:
        y = _launch_one(x2, wgt, bg, wut, bu, h, scratch, partial, sg, su, w_down, b_down, scale_down, tau_arg,
                        tau_down, grid, one_down, out, stage1)
        return y.reshape(*lead, w_down.shape[0])
    counters = ticket_counters(grid[0], x2) if split else x2   # one per N tile
    # Stage 1 zeroes the down GEMV's ticket counters (a buffer apart from its own D-split counters), so a compiled
    # call launches no fill kernel for them.
    down_counters, n_down, zero_block = zeroed_upstream_counters(m, f, w_down.shape[0], down_cfg, x2)
    launcher(_threshold_gate_up_kernel, x2)[grid](  # noqa: F821
        x2, wgt, bg, wut, bu, h, scratch, partial, counters, sg, su, down_counters, n_down, m, f, d, tau_arg,
        x2.stride(0), x2.stride(1), wgt.stride(0), wgt.stride(1), wut.stride(0), wut.stride(1),
        COMPACT=cfg.COMPACT, ZERO_BLOCK=zero_block, ONE_TOKEN=m == 1, **stage1)
    y = threshold_linear(h, w_down, b_down, tau_down, config=down_cfg, out=out, channel_scale=scale_down,
                         counters=down_counters)
    return y.reshape(*lead, w_down.shape[0])


def _launch_one(x2, wgt, bg, wut, bu, h, scratch, partial, sg, su, w_down, b_down, scale_down, tau_arg, tau_down,
                grid, down_cfg: GemvConfig, out, stage1: dict) -> Tensor:
    """Launch ``_threshold_ffn_kernel`` for one token (stage 1's buffers made by the caller); returns y ``[1, N]``."""
    f = h.shape[1]
    # h is written by this launch: the down stage's dummies are x2, which it only reads.
    g = gemv_buffers(h, w_down, b_down, tau_down, down_cfg, out, scale_down, x2)
    n_down_tiles, n_down_splits = g.grid[0], g.grid[1]
    n_counters = 1 + 2 * n_down_splits + n_down_tiles + (grid[0] if stage1["SPLIT"] else 0)
    n_work = grid[0] * grid[1] + n_down_tiles * n_down_splits
    launcher(_threshold_ffn_kernel, x2)[(n_work,)](  # noqa: F821
        x2, wgt, bg, wut, bu, h, scratch, partial, sg, su, g.wt, g.bias, g.scale, g.y, g.scratch, g.partial,
        ticket_counters(n_counters, x2), f, x2.shape[1], g.y.shape[1], tau_arg, g.tau, x2.stride(1),
        wgt.stride(0), wgt.stride(1), wut.stride(0), wut.stride(1), g.wt.stride(0), g.wt.stride(1),
        grid[0], grid[1], n_down_tiles, n_down_splits, DOWN_BLOCK_N=down_cfg.BLOCK_N, DOWN_BLOCK_K=down_cfg.BLOCK_K,
        DOWN_ROWS=down_cfg.ROWS_PER_SPLIT, DOWN_DIRECT=g.direct, HAS_BD=b_down is not None,
        HAS_SCALE_DOWN=scale_down is not None, DOWN_BLOCK_M=gemv_block_m(1, down_cfg), **stage1)
    return g.y
