"""Gate-mode activation sparsity (CATS): a decode FFN that runs up/down only for surviving neurons.

Layout of this file: module notes, the reference, then configs, the Triton kernel (bound lazily by
``epilogue.bind_triton``, so importing this module never imports Triton) and the wrapper.

Semantics (``gate_sparse_ffn_ref``): ``a = act(x Wgᵀ + bg)``; neuron j is kept for token m iff
``|a[m, j]| > tau``; gated FFN ``y = ((a ⊙ keep) ⊙ (x Wuᵀ + bu)) Wdᵀ + bd``; plain FFN (no
``w_up``) ``y = (a ⊙ keep) Wdᵀ + bd``.

Notation: x [M, D] with M <= MAX_DECODE_TOKENS, Wg / Wu [F, D], Wd [D_out, F], g [M, F] the
gated hidden state (zero where a token drops a neuron).

Stage 1 (``_gate_up_kernel``): program f owns BLOCK_F neurons. It streams their gate rows over
all of D (the gate must be computed densely: it decides who survives), adds the bias, applies
the activation and the threshold per token, and takes the union over the tokens. Then it
streams the *up* rows of the surviving neurons only: the loads of dropped rows are predicated
off (no memory traffic), and a program whose neurons all died skips the up loop entirely. It
writes g for its BLOCK_F neurons (zeros for the dropped ones) in x's dtype. Fusing gate, act,
threshold and up in one program costs no extra pass over x or the hidden state, and the up
rows of a block are read right after its gate rows.
Stage 2 + 3 (``activation_sparse.threshold_linear`` on g with tau = 0): the down projection
reads only the K-major rows ``Wdᵀ[j]`` of neurons that some token kept. Each split ranks the
surviving neurons (``tl.cumsum``; for 2-16 tokens the union of theirs) and loops over that
compacted list, so loop trips and bytes follow the survivors. Partials are float32 per (split,
N tile), and the program that draws its N tile's last ticket sums them in split order with the
bias, in the same launch: no floating-point atomics, so bfloat16 and float16 behave alike and
results are deterministic. Stage 1 zeroes those ticket counters for it.
``Wd`` is transposed once and cached per weight tensor (``activation_sparse.k_major``).

Cost per call: the dense gate read (F x D), plus the survivors' up rows and down rows, plus
two launches and the float32 partials. Dropping a neuron with an exact-zero product is exact;
the only values the down stage drops are exact zeros of g. A NaN activation counts as kept
(``activation_sparse._survives``), so it reaches the output as in the reference, where NaN * 0 is NaN.

Rounding follows the reference, which computes in the input dtype: the gate pre-activation and
the activation are rounded to x's dtype before the threshold (so both keep the same neurons
unless a value sits within one rounding of tau), and g is rounded once to x's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.codegen import activation_sparse as _gemv
from sparsecc.codegen.activation_sparse import (ACTIVATIONS, MAX_DECODE_TOKENS, GemvConfig, default_gemv_config,
                                                threshold_linear, zeroed_upstream_counters)
from sparsecc.codegen.epilogue import activation_switch, bind_triton
from sparsecc.codegen.launch import launcher, round_to_dtype

__all__ = ["gate_sparse_ffn", "gate_sparse_ffn_ref", "GateConfig", "DEFAULT_GATE_CONFIG",
           "DEFAULT_GATE_CONFIG_TOKENS", "KERNEL_DTYPES"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Dtypes the gate-mode FFN runs as a kernel; others (float64) run the reference."""


# ============================================================== reference


def gate_sparse_ffn_ref(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Optional[Tensor],
                        b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor], *, act: str,
                        tau: float) -> Tensor:
    """Reference FFN whose up/down projections run only for the surviving neurons.

    * gated (``w_up`` given): ``a = act(x Wgᵀ + bg)``, ``h = (a * (|a| > tau)) * (x Wuᵀ + bu)``,
      ``y = h Wdᵀ + bd``;
    * plain (``w_up`` is None): ``a = act(x W1ᵀ + b1)`` (``w_gate`` is W1), ``h = a * (|a| > tau)``,
      ``y = h W2ᵀ + b2`` (``w_down`` is W2).

    A neuron survives when it passes the threshold for at least one token; only
    those rows of ``w_up`` and columns of ``w_down`` are gathered and multiplied.
    Tokens for which a surviving neuron failed the threshold still get zero
    there, so the result equals the dense formula; the cost follows the union of
    survivors (exactly the survivors for a single decode token). A NaN activation
    survives: the formula's ``a * (|a| > tau)`` is NaN there (NaN * 0), so its
    neuron must be gathered for the NaN to reach the output.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not allowed; expected one of {sorted(ACTIVATIONS)}")
    if b_up is not None and w_up is None:
        raise ValueError("b_up is given without w_up")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a = ACTIVATIONS[act](F.linear(x2, w_gate, b_gate))
    keep = a.abs() > tau
    active = (keep | a.isnan()).any(0).nonzero().squeeze(-1)
    h = a[:, active] * keep[:, active].to(a.dtype)
    if w_up is not None:
        up = F.linear(x2, w_up[active], None if b_up is None else b_up[active])
        h = h * up
    y = F.linear(h, w_down[:, active], b_down)
    return y.reshape(*lead, w_down.shape[0])


@dataclass(frozen=True)
class GateConfig:
    """Launch knobs of the gate + up stage: neurons per program, D chunk, warps, and (one token) whether each
    D chunk is summed into per-neuron totals at once (``REDUCE_CHUNKS``: a [BLOCK_F] accumulator, fewer registers)
    or accumulated as a [BLOCK_F, BLOCK_D] tile summed once at the end."""

    BLOCK_F: int
    BLOCK_D: int
    num_warps: int
    REDUCE_CHUNKS: bool = False

    def __post_init__(self):
        for name, low in (("BLOCK_F", 1), ("BLOCK_D", 16)):
            value = getattr(self, name)
            if value < low or value & (value - 1):
                raise ValueError(f"GateConfig.{name}={value} must be a power of two >= {low} (tl.arange; 2-16 "
                                 "tokens also need BLOCK_F >= 16 for tl.dot)")


# One token: 2 neurons per program, each program reading its two whole 8 KB rows (D = 4096) in one chunk and keeping
# only two float32 totals (REDUCE_CHUNKS); 7168 programs at F = 14336. On the H200 (bench/ffn_gate.py --sweep reduce,
# 2026-12-03) stage 1 took 43.3 / 33.5 us at 50 / 90% against 52.8 / 49.1 us for the earlier default (16 neurons,
# 512-column chunks, a [16, 512] float32 accumulator tile, 2 warps), whose 128 partial sums per thread capped the
# programs resident per SM.
DEFAULT_GATE_CONFIG = GateConfig(BLOCK_F=2, BLOCK_D=4096, num_warps=4, REDUCE_CHUNKS=True)
"""Gate-mode stage 1's launch knobs for one token."""
# 2-16 tokens use tl.dot on a 16-row tile; 32 neurons per program keeps 448 programs at F = 14336.
DEFAULT_GATE_CONFIG_TOKENS = GateConfig(BLOCK_F=32, BLOCK_D=128, num_warps=4)
"""Gate-mode stage 1's launch knobs for 2-16 tokens."""


# ============================================================== Triton kernel


# ``_activation(v, ACTIVATION: tl.constexpr)``: the FFN activation named ACTIVATION on float32 ``v``, chosen at
# compile time. Its source is generated from the activation table (``epilogue.activation_switch``), the lines the
# epilogues use too, and installed here by ``_bind`` before the kernel is JIT-compiled; Triton and Inductor find it
# by this name in the module's globals.
_activation = None
# ``_survives(score, tau)``: activation_sparse's keep test (NaN counts as kept), and ``_zero_tickets``, which zeroes
# the down GEMV's ticket counters: installed by ``_bind`` once JIT-compiled in their own module.
_survives = None
_zero_tickets = None


def _rounded(v, like_ptr, ROUND_BY_BITS: tl.constexpr):  # noqa: F821
    """float32 ``v`` rounded (to nearest even) to the element type of ``like_ptr``, returned as float32.

    ``ROUND_BY_BITS`` (bfloat16 under the CPU interpreter only): Triton 3.9's
    interpreter truncates float32 -> bfloat16 casts, while torch and compiled
    Triton round to nearest even; the bit form below rounds like them.
    """
    if ROUND_BY_BITS:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the top 16 bits, ties to even
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(like_ptr.dtype.element_ty).to(tl.float32)


def _row_dots(x_ptr, w_ptr, offs_f, rows, d_end, D, stride_xd, stride_wf, stride_wd,
              BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, REDUCE_CHUNKS: tl.constexpr):  # noqa: F821
    """One token: float32 ``x . W[f]`` for the BLOCK_F rows ``offs_f`` (loads of rows off ``rows`` predicated off),
    over columns ``[0, d_end)``; each chunk summed at once (REDUCE_CHUNKS) or as a tile summed at the end."""
    acc2 = tl.zeros((BLOCK_F, BLOCK_D), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        xv = tl.load(x_ptr + offs_d * stride_xd, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_f[:, None].to(tl.int64) * stride_wf + offs_d[None, :] * stride_wd,
                    mask=rows[:, None] & d_mask[None, :], other=0.0)
        if REDUCE_CHUNKS:
            acc1 += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        else:
            acc2 += w.to(tl.float32) * xv[None, :]
    if not REDUCE_CHUNKS:
        acc1 = tl.sum(acc2, axis=1)
    return tl.reshape(acc1, (1, BLOCK_F))


def _gate_up_kernel(x_ptr, wg_ptr, bg_ptr, wu_ptr, bu_ptr, g_ptr, zero_ptr, n_zero, M, F, D, tau,
                    stride_xm, stride_xd, stride_gf, stride_gd, stride_uf, stride_ud,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,  # noqa: F821
                    HAS_BG: tl.constexpr, GATED: tl.constexpr, HAS_BU: tl.constexpr,  # noqa: F821
                    ACTIVATION: tl.constexpr, DOT_IN_FP32: tl.constexpr,  # noqa: F821
                    ROUND_BY_BITS: tl.constexpr, REDUCE_CHUNKS: tl.constexpr,  # noqa: F821
                    ZERO_BLOCK: tl.constexpr):  # noqa: F821
    """g[:, f-block] = act(x Wgᵀ + bg) ⊙ keep (⊙ (x Wuᵀ + bu), up rows of survivors only). With ``ZERO_BLOCK`` the
    first program also zeroes the down GEMV's ``n_zero`` ticket counters at ``zero_ptr``."""
    # Inductor hands Python floats to the kernels it launches as float64: compute in float32, as Triton does.
    tau = tl.cast(tau, tl.float32)
    pid = tl.program_id(0)
    if ZERO_BLOCK > 0:
        if pid == 0:
            _zero_tickets(zero_ptr, n_zero, ZERO_BLOCK)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    f_mask = offs_f < F
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    io_dtype = g_ptr.dtype.element_ty
    # ---- gate GEMV over all of D
    if BLOCK_M == 1:
        # One token: multiply-add on [BLOCK_F, BLOCK_D] tiles, reduced once at the end or per chunk
        # (REDUCE_CHUNKS); no tl.dot at M = 1: it would pad the token to 16 rows.
        lin = _row_dots(x_ptr, wg_ptr, offs_f, f_mask, D, D, stride_xd, stride_gf, stride_gd, BLOCK_F, BLOCK_D,
                        REDUCE_CHUNKS)
    else:
        lin = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < D
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                         mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            w = tl.load(wg_ptr + offs_d[:, None] * stride_gd + offs_f[None, :].to(tl.int64) * stride_gf,
                        mask=d_mask[:, None] & f_mask[None, :], other=0.0)
            if DOT_IN_FP32:  # fp32 inputs, or the CPU interpreter (its bf16 dot multiplies raw bits)
                lin = tl.dot(xv.to(tl.float32), w.to(tl.float32), lin, input_precision="ieee")
            else:
                lin = tl.dot(xv, w, lin)
    if HAS_BG:
        lin += tl.load(bg_ptr + offs_f, mask=f_mask, other=0.0).to(tl.float32)[None, :]
    # Round where the reference rounds (linear output, then activation output), so both compare
    # the same values with tau.
    lin = _rounded(lin, g_ptr, ROUND_BY_BITS)
    a = _rounded(_activation(lin, ACTIVATION), g_ptr, ROUND_BY_BITS)
    keep = _survives(tl.abs(a), tau) & m_mask[:, None] & f_mask[None, :]
    h = tl.where(keep, a, 0.0)
    if GATED:
        # A neuron's up row is read when any token keeps it (the union over the tokens).
        live = tl.max(keep.to(tl.int32), axis=0) > 0
        n_live = tl.sum(live.to(tl.int32), axis=0)
        d_end = tl.where(n_live > 0, D, 0)  # a block with no survivor skips the up loop
        if BLOCK_M == 1:
            up = _row_dots(x_ptr, wu_ptr, offs_f, live, d_end, D, stride_xd, stride_uf, stride_ud, BLOCK_F, BLOCK_D,
                           REDUCE_CHUNKS)
        else:
            up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            for d0 in range(0, d_end, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_d[None, :] * stride_xd,
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
                w = tl.load(wu_ptr + offs_d[:, None] * stride_ud + offs_f[None, :].to(tl.int64) * stride_uf,
                            mask=d_mask[:, None] & live[None, :], other=0.0)
                if DOT_IN_FP32:
                    up = tl.dot(xv.to(tl.float32), w.to(tl.float32), up, input_precision="ieee")
                else:
                    up = tl.dot(xv, w, up)
        if HAS_BU:
            up += tl.load(bu_ptr + offs_f, mask=live, other=0.0).to(tl.float32)[None, :]
        up = _rounded(up, g_ptr, ROUND_BY_BITS)
        h = tl.where(keep, _rounded(h * up, g_ptr, ROUND_BY_BITS), 0.0)
    out = g_ptr + offs_m[:, None] * F + offs_f[None, :]
    tl.store(out, h.to(io_dtype), mask=m_mask[:, None] & f_mask[None, :])


_KERNELS = ("_rounded", "_row_dots", "_gate_up_kernel")


def _bind() -> None:
    """Install the generated activation switch, then JIT this module's kernels (first use; imports Triton; later
    calls return at once)."""
    if getattr(_gate_up_kernel, "_sparsecc_jit", False):
        return
    if _activation is None:
        globals()["_activation"] = activation_switch("_activation")
    # The shared NaN-aware keep test, JIT-ed in its own module (where it resolves ``tl``), then called from here.
    bind_triton(vars(_gemv), ("_survives", "_zero_tickets"))
    globals()["_survives"] = _gemv._survives
    globals()["_zero_tickets"] = _gemv._zero_tickets
    bind_triton(globals(), _KERNELS)


# ============================================================== wrapper


def _check_shapes(x: Tensor, w_gate: Tensor, b_gate, w_up, b_up, w_down: Tensor, b_down) -> None:
    """Raise ``ValueError`` naming the first argument whose shape does not fit the FFN."""
    f, d = w_gate.shape
    if x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} features; w_gate [{f}, {d}] expects {d}")
    if w_up is not None and tuple(w_up.shape) != (f, d):
        raise ValueError(f"w_up must have shape ({f}, {d}) like w_gate, got {tuple(w_up.shape)}")
    if w_down.shape[1] != f:
        raise ValueError(f"w_down must have {f} input features (one per neuron), got {tuple(w_down.shape)}")
    for name, b, n in (("b_gate", b_gate, f), ("b_up", b_up, f), ("b_down", b_down, w_down.shape[0])):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(b.shape)}")


def decode_rows(x: Tensor, act: str, w_gate: Tensor, b_gate, w_up, b_up, w_down: Tensor, b_down,
                check_shapes=None):
    """``(x as [M, D] rows, x's leading shape)`` after checking ``act``, then the shapes (``check_shapes``,
    default this op's ``_check_shapes``).

    The common prologue of the decode FFN wrappers (this one and ``threshold_ffn``); raises ``ValueError``.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not allowed; expected one of {sorted(ACTIVATIONS)}")
    (check_shapes or _check_shapes)(x, w_gate, b_gate, w_up, b_up, w_down, b_down)
    return x.reshape(-1, w_gate.shape[1]), x.shape[:-1]


def gate_sparse_ffn(x: Tensor, w_gate: Tensor, b_gate: Optional[Tensor], w_up: Optional[Tensor],
                    b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor], act: str, tau: float,
                    config: Optional[GateConfig] = None, down_config: Optional[GemvConfig] = None,
                    out: Optional[Tensor] = None) -> Tensor:
    """Triton gate-sparse FFN for decode (CATS); same arguments and result as ``gate_sparse_ffn_ref``.

    For at most :data:`MAX_DECODE_TOKENS` tokens of float16/bfloat16/float32
    the fused gate + act + threshold + up kernel writes g, and the compacted
    down GEMV reads only surviving neurons (see the module notes). More tokens
    or float64 run the reference. ``config`` / ``down_config`` override the
    launch knobs of the two stages (benchmarks, tests); ``out`` (contiguous
    ``[M, D_out]``, ``x.dtype``) receives the kernel path's result.
    """
    if b_up is not None and w_up is None:
        raise ValueError("b_up is given without w_up")
    x2, lead = decode_rows(x, act, w_gate, b_gate, w_up, b_up, w_down, b_down)
    f, d = w_gate.shape
    m = x2.shape[0]
    if m == 0 or m > MAX_DECODE_TOKENS or x.dtype not in KERNEL_DTYPES:
        return gate_sparse_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau=tau)
    _bind()
    cfg = config or (DEFAULT_GATE_CONFIG if m == 1 else DEFAULT_GATE_CONFIG_TOKENS)
    if m > 1 and cfg.BLOCK_F < 16:
        raise ValueError(f"config={cfg} is not allowed for {m} tokens; 2-16 tokens need BLOCK_F >= 16 (tl.dot)")
    dtype = x.dtype
    w_gate = w_gate.to(dtype)
    w_up = w_up.to(dtype) if w_up is not None else None
    g = torch.empty(m, f, dtype=dtype, device=x.device)
    interpreting = x.device.type == "cpu"  # CPU tensors reach a Triton kernel only under TRITON_INTERPRET
    dummy = x2  # never read (its HAS_* / GATED flag is off); an input, which the launch only reads
    wu = w_up if w_up is not None else w_gate
    down_cfg = down_config or default_gemv_config(m)
    # The gate launch zeroes the down GEMV's ticket counters: a compiled call launches no fill kernel for them.
    down_counters, n_down, zero_block = zeroed_upstream_counters(m, f, w_down.shape[0], down_cfg, dummy)
    launcher(_gate_up_kernel, x2)[(triton.cdiv(f, cfg.BLOCK_F),)](  # noqa: F821 - bound by bind_triton
        x2, w_gate, b_gate.contiguous() if b_gate is not None else dummy, wu,
        b_up.contiguous() if b_up is not None else dummy, g, down_counters, n_down, m, f, d, round_to_dtype(tau, dtype),
        x2.stride(0), x2.stride(1), w_gate.stride(0), w_gate.stride(1), wu.stride(0), wu.stride(1),
        BLOCK_M=1 if m == 1 else 16, BLOCK_F=cfg.BLOCK_F, BLOCK_D=cfg.BLOCK_D,
        HAS_BG=b_gate is not None, GATED=w_up is not None, HAS_BU=b_up is not None, ACTIVATION=act,
        DOT_IN_FP32=interpreting or dtype == torch.float32,
        ROUND_BY_BITS=interpreting and dtype == torch.bfloat16, REDUCE_CHUNKS=cfg.REDUCE_CHUNKS,
        ZERO_BLOCK=zero_block, num_warps=cfg.num_warps)
    # tau = 0 skips exactly the zeros of g: dropped neurons, and survivors whose product is 0 (no contribution).
    y = threshold_linear(g, w_down, b_down, 0.0, config=down_cfg, out=out, counters=down_counters)
    return y.reshape(*lead, w_down.shape[0])
