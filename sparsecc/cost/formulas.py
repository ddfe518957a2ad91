"""FLOPs, bytes and predicted time of every form and its dense counterpart, as sympy expressions.

Shapes are sympy symbols (or numbers), so one formula serves static shapes
(substitute and evaluate) and symbolic ones (solve for the crossover).
Attention work is counted in key/value blocks of ``ATTENTION_BLOCK`` tokens,
the granularity the kernels work at: that is where causality, the sink and
window geometry and block rounding enter.

Predicted time = max(FLOPs / (peak * eff_compute), bytes / (bandwidth * eff_memory))
               + launches * launch_overhead,
with the efficiencies of the kernel family from ``efficiency.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch

from sparsecc.cost.efficiency import efficiency
from sparsecc.cost.hardware import HardwareProfile
from sparsecc.forms import BlockSparse, BlockTopK, BlockWeights, Streaming, TwoFour, VerticalSlash

# Tokens per attention block: the kernels' key-block granularity (BLOCK_N = 128 on Hopper).
ATTENTION_BLOCK = 128
# A cdf-budget block_topk keeps an input-dependent number of blocks. Assumed: this fraction of the causal
# blocks times cdf (XAttention and FlexPrefill report roughly 10-30% block density at thresholds near 0.9
# on long contexts). It only steers policy "auto"; the report shows the estimate.
ASSUMED_CDF_BLOCK_FRACTION = 0.25

B, H, HKV, SQ, SK, D = sp.symbols("batch heads kv_heads seq_q seq_k head_dim", positive=True, integer=True)
M, N, K = sp.symbols("tokens out_features in_features", positive=True, integer=True)
ELEM = sp.Symbol("elem_bytes", positive=True)


@dataclass(frozen=True)
class Cost:
    """One kernel's work: FLOPs and bytes (sympy expressions), launches, and its efficiency family."""

    flops: sp.Expr
    bytes: sp.Expr
    launches: int
    family: str

    def time(self, hw: HardwareProfile, dtype: torch.dtype) -> sp.Expr:
        """Predicted seconds on ``hw`` as an expression of the remaining symbols."""
        eff = efficiency(self.family)
        compute = self.flops / (hw.peak(dtype) * eff.compute(self.flops))
        memory = self.bytes / (hw.bandwidth * eff.memory)
        return sp.Max(compute, memory, eff.floor_s) + self.launches * hw.launch_overhead_s


def _prefix_min(n, per_row):
    """sum over j = 1..n of min(j, per_row)."""
    return sp.Piecewise((n * (n + 1) / 2, n <= per_row), (per_row * (per_row + 1) / 2 + (n - per_row) * per_row,
                                                           True))


def _kept_causal_rows(nq, nk, per_row):
    """Kept blocks over causal query blocks, each keeping at most ``per_row``.

    Queries are the last ``nq`` blocks of ``nk`` (bottom-right alignment), so
    query block a may see ``nk - nq + a + 1`` key blocks.
    """
    offset = nk - nq
    return _prefix_min(offset + nq, per_row) - _prefix_min(offset, per_row)


def attention_blocks(form, seq_q, seq_k, causal: bool, dense_head_fraction=0) -> sp.Expr:
    """Kept (query block, key block) pairs per head, for ``form`` (None: dense)."""
    nq = sp.ceiling(seq_q / ATTENTION_BLOCK)
    nk = sp.ceiling(seq_k / ATTENTION_BLOCK)
    if causal:
        dense = nq * (nq + 1) / 2 if seq_q == seq_k else nq * nk - nq * (nq - 1) / 2
    else:
        dense = nq * nk
    if form is None:
        return dense
    if isinstance(form, Streaming):
        if form.window < 0:
            return dense
        sink_blocks = math.ceil(form.sink / ATTENTION_BLOCK)
        # a window of w tokens ending anywhere inside a query block spans this many key blocks
        window_blocks = math.ceil((form.window - 1) / ATTENTION_BLOCK) + 1
        per_row = sink_blocks + window_blocks if causal else sink_blocks + 2 * window_blocks - 1
    elif isinstance(form, BlockSparse):
        scale = form.block / ATTENTION_BLOCK   # the form's own blocks in kernel-block units
        band = (form.local_blocks if causal else 2 * form.local_blocks - 1) + form.global_blocks
        per_row = max(1, math.ceil((band + form.random_blocks) * scale))
    elif isinstance(form, BlockTopK) and form.cdf is not None:
        sparse = sp.Min(dense, sp.Max(nq, ASSUMED_CDF_BLOCK_FRACTION * form.cdf * dense))
        return dense_head_fraction * dense + (1 - dense_head_fraction) * sparse
    elif isinstance(form, BlockTopK):
        # sink + topk + the local band (one block wider when queries are not block-aligned), in kernel blocks
        kept = form.sink_blocks + form.topk + form.local_blocks + 1
        per_row = max(1, math.ceil(kept * form.block / ATTENTION_BLOCK))
    elif isinstance(form, VerticalSlash):
        # Budget-based estimate. Assumed: kept columns and diagonals cluster (as in MInference's measured
        # patterns), so each set covers about as many key blocks as that many contiguous tokens, plus one
        # partially covered block per set; column 0 and diagonal 0 come on top of the budgets.
        per_row = (math.ceil((form.vertical + 1) / ATTENTION_BLOCK) + math.ceil((form.slash + 1) / ATTENTION_BLOCK)
                   + 2)
    else:
        raise TypeError(f"not an attention form: {form}")
    sparse = _kept_causal_rows(nq, nk, per_row) if causal else nq * sp.Min(nk, per_row)
    sparse = sp.Min(sparse, dense)
    return dense_head_fraction * dense + (1 - dense_head_fraction) * sparse


def attention_cost(form, causal: bool, dense_head_fraction=0, shapes=None) -> Cost:
    """Cost of one attention call; ``form`` None is dense flash attention."""
    s = {**dict(batch=B, heads=H, kv_heads=HKV, seq_q=SQ, seq_k=SK, head_dim=D), **(shapes or {})}
    blocks = attention_blocks(form, s["seq_q"], s["seq_k"], causal, dense_head_fraction)
    # QK^T and PV: 2 * 2 * block^2 * D multiply-adds per kept block pair
    flops = 4 * s["batch"] * s["heads"] * blocks * ATTENTION_BLOCK**2 * s["head_dim"]
    nbytes = ELEM * s["head_dim"] * s["batch"] * (2 * s["heads"] * s["seq_q"] + 2 * s["kv_heads"] * s["seq_k"])
    return Cost(flops, nbytes, 1, "attention_dense" if form is None else "attention_sparse")


def dynamic_estimate_cost(form, shapes=None) -> tuple:
    """(FLOPs, bytes, launches) of a dynamic form's per-call estimate and table build; zeros for static forms.

    block_topk: pool q and k (one read of each), then ``qbar @ kbarᵀ`` over the
    (Sq / block) x (Sk / block) block grid and the table write (int32 per cell).
    vertical_slash: two passes of the last ``last_q`` queries over every key
    (softmax statistics, then column/diagonal sums), plus the table.
    """
    s = {**dict(batch=B, heads=H, kv_heads=HKV, seq_q=SQ, seq_k=SK, head_dim=D), **(shapes or {})}
    b, h, hkv, sq, sk, d = (s[n] for n in ("batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim"))
    if isinstance(form, BlockTopK):
        cells = b * h * sp.ceiling(sq / form.block) * sp.ceiling(sk / form.block)
        flops = 2 * cells * d
        nbytes = ELEM * d * b * (h * sq + hkv * sk) + 4 * cells
        return flops, nbytes, 2
    if isinstance(form, VerticalSlash):
        rows = sp.Min(sq, form.last_q)
        flops = 2 * 2 * b * h * rows * sk * d
        nbytes = 2 * ELEM * d * b * h * sk + 4 * b * h * sp.ceiling(sq / form.block) * sp.ceiling(sk / form.block)
        return flops, nbytes, 4
    return 0, 0, 0


def linear_cost(form=None, activation_sparsity=None, shapes=None) -> Cost:
    """Cost of ``x[tokens, in] @ W[out, in]ᵀ`` dense, with a weight form, or with input activation sparsity."""
    s = {**dict(tokens=M, out_features=N, in_features=K), **(shapes or {})}
    t, n, k = s["tokens"], s["out_features"], s["in_features"]
    flops = 2 * t * n * k
    w_bytes = ELEM * n * k
    act_bytes = ELEM * t * (n + k)
    if form is None and activation_sparsity is None:
        return Cost(flops, w_bytes + act_bytes, 1, "gemm_dense")
    if isinstance(form, BlockWeights):
        # kept blocks plus one int32 column index per block
        index = 4 * n * k * form.density / (form.block[0] * form.block[1])
        return Cost(flops * form.density, w_bytes * form.density + index + act_bytes, 1, "gemm_block_sparse")
    if isinstance(form, TwoFour):
        # half the values plus 2-bit metadata per kept value
        return Cost(flops / 2, w_bytes * sp.Rational(1, 2) + n * k / 8 + act_bytes, 1, "gemm_2to4")
    # activation sparsity: a weight row is read when any token keeps that input channel
    keep = 1 - sp.Float(activation_sparsity) ** t
    return Cost(flops * keep, w_bytes * keep + act_bytes, 1, "gemv_activation_sparse")
