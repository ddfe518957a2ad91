"""A first roofline cost model: FLOPs and bytes per site, dense and sparse.

Predicted time = max(FLOPs / (peak * efficiency), bytes / bandwidth) + launch
overhead. Efficiencies are coarse per-family constants; the dedicated
cost-model work replaces them with fitted tables. Everything here is a pure
function of shapes, dtype and form, so ``check`` stays pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch

from sparsecc.forms import BlockSparse, BlockWeights, Streaming


@dataclass(frozen=True)
class HardwareProfile:
    """Ceilings of one device, with where each figure comes from."""

    name: str
    matmul_flops: Dict[str, float]   # dense matrix rate per dtype name, FLOP/s
    vector_flops: float              # fp32 non-matrix rate, FLOP/s
    bandwidth: float                 # device memory, bytes/s (read + write)
    launch_overhead_s: float
    source: str

    def peak(self, dtype: torch.dtype) -> float:
        """Dense matrix rate for ``dtype`` (fp32 falls back to the tf32/fp32 entry)."""
        key = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
        return self.matmul_flops.get(key, self.vector_flops)


H100 = HardwareProfile(
    name="H100 SXM",
    # bf16 GEMM 8192^3 and the device-to-device copy were measured on the H100 test machine
    # (TARGETS.md, 2026-11-23); fp32 uses the datasheet tf32 dense rate (NVIDIA H100 datasheet).
    matmul_flops={"bf16": 738e12, "fp16": 738e12, "fp32": 378e12},
    vector_flops=67e12,          # NVIDIA H100 SXM datasheet, FP32 non-tensor
    bandwidth=3.0e12,
    launch_overhead_s=5e-6,      # a typical CUDA kernel launch on Hopper, order of magnitude
    source="measured ceilings from TARGETS.md (H100 80GB HBM3, 2026-11-23) and the NVIDIA H100 datasheet",
)

CPU = HardwareProfile(
    name="CPU",
    # Order-of-magnitude figures for a few-core server CPU; CPU decisions do not hinge on them
    # because ``auto`` keeps CPU sites dense (the reference path is not a fast path).
    matmul_flops={"bf16": 2e11, "fp16": 1e11, "fp32": 2e11},
    vector_flops=1e11,
    bandwidth=2e10,
    launch_overhead_s=2e-6,
    source="order-of-magnitude CPU figures (not measured)",
)

# Efficiencies: achieved fraction of the ceiling, per kernel family.
# Dense attention reaches 583-616 of 738 TFLOP/s on the H100 (TARGETS.md): about 0.8.
DENSE_ATTENTION_EFFICIENCY = 0.8
SPARSE_ATTENTION_EFFICIENCY = 0.7
DENSE_GEMM_EFFICIENCY = 0.9
SPARSE_GEMM_EFFICIENCY = 0.7
# Tokens per attention block for counting kept work at block granularity, as the kernels do.
ESTIMATE_BLOCK = 128
# Activation sparsity assumed when a rule gives a threshold but no target sparsity.
ASSUMED_ACTIVATION_SPARSITY = 0.5


def profile_for(device: torch.device) -> HardwareProfile:
    """Pick the profile for a device (H100 for CUDA until more profiles exist)."""
    return H100 if device.type == "cuda" else CPU


def _time(flops: float, nbytes: float, hw: HardwareProfile, dtype, efficiency: float, launches: int) -> float:
    return max(flops / (hw.peak(dtype) * efficiency), nbytes / hw.bandwidth) + launches * hw.launch_overhead_s


def streaming_kept_keys(sink: int, window: int, seq_q: int, seq_k: int, causal: bool) -> float:
    """Exact number of (query, key) pairs a streaming head keeps (bottom-right aligned queries)."""
    p = torch.arange(seq_k - seq_q, seq_k, dtype=torch.float64)
    if window < 0:  # a dense head
        return float((p + 1).sum()) if causal else float(seq_q * seq_k)
    if causal:
        sink_n = torch.clamp(torch.minimum(p + 1, torch.tensor(float(sink))), min=0)
        lo = torch.clamp(p - window + 1, min=0)
        win_n = p - lo + 1
        overlap = torch.clamp(torch.minimum(p, torch.tensor(float(sink - 1))) - lo + 1, min=0)
        return float((sink_n + win_n - overlap).sum())
    j = torch.arange(seq_k, dtype=torch.float64)
    total = 0.0
    for start in range(0, seq_q, 4096):  # chunked so the count never materialises Sq x Sk
        pp = p[start:start + 4096, None]
        keep = (j[None] < sink) | (pp < sink) | ((pp - j[None]).abs() < window)
        total += float(keep.sum())
    return total


def attention_density(form, seq_q: int, seq_k: int, causal: bool, heads: int,
                      per_head: Optional[Sequence] = None) -> float:
    """Fraction of the dense (causal-aware) attention work the form keeps, at token granularity."""
    dense_pairs = streaming_kept_keys(0, -1, seq_q, seq_k, causal)
    if dense_pairs == 0:
        return 1.0
    if isinstance(form, Streaming):
        pairs = per_head or [(form.sink, form.window)] * heads
        kept = sum(streaming_kept_keys(s, w, seq_q, seq_k, causal) for s, w in pairs) / len(pairs)
        return min(1.0, kept / dense_pairs)
    if isinstance(form, BlockSparse):
        nq = math.ceil(seq_q / form.block)
        nk = math.ceil(seq_k / form.block)
        per_row = min(nk, 2 * form.local_blocks - 1 + 2 * form.global_blocks + form.random_blocks)
        frac = min(1.0, per_row / max(1, nk))
        if causal:
            frac = min(1.0, frac * 2)  # causal dense work is about half the square; the band is not halved
        dense_heads = per_head.count(None) if per_head else 0
        return ((heads - dense_heads) * frac + dense_heads) / max(1, heads) if nq else 1.0
    return 1.0


def estimate_attention(batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype, causal, density, hw):
    """(dense_flops, sparse_flops, dense_bytes, sparse_bytes, dense_s, sparse_s) for one attention."""
    elem = torch.tensor([], dtype=dtype).element_size()
    pairs = seq_q * seq_k * (0.5 if causal and seq_q == seq_k else 1.0)
    dense_flops = 4.0 * batch * heads * pairs * head_dim
    sparse_flops = dense_flops * density
    qo = 2.0 * batch * heads * seq_q * head_dim * elem
    kv = 2.0 * batch * kv_heads * seq_k * head_dim * elem
    dense_bytes = qo + kv
    sparse_bytes = qo + kv * min(1.0, density * (2.0 if causal else 1.0))
    dense_s = _time(dense_flops, dense_bytes, hw, dtype, DENSE_ATTENTION_EFFICIENCY, 1)
    sparse_s = _time(sparse_flops, sparse_bytes, hw, dtype, SPARSE_ATTENTION_EFFICIENCY, 1)
    return dense_flops, sparse_flops, dense_bytes, sparse_bytes, dense_s, sparse_s


def estimate_linear(tokens, in_features, out_features, dtype, form, hw, activation_sparsity=None):
    """Roofline for ``x[tokens, in] @ W[out, in]ᵀ`` dense and with a weight/activation form."""
    elem = torch.tensor([], dtype=dtype).element_size()
    dense_flops = 2.0 * tokens * in_features * out_features
    w_bytes = in_features * out_features * elem
    act_bytes = tokens * (in_features + out_features) * elem
    dense_bytes = w_bytes + act_bytes
    if isinstance(form, BlockWeights):
        density = form.density
        sparse_flops, sparse_bytes = dense_flops * density, w_bytes * density + act_bytes
        launches = 1
    elif form is not None and getattr(form, "name", "") == "2:4":
        density = 0.5
        # 2:4 halves the multiplies and the weight bytes, plus 2-bit metadata per kept value.
        sparse_flops, sparse_bytes = dense_flops * 0.5, w_bytes * (0.5 + 0.0625) + act_bytes
        launches = 1
    elif activation_sparsity is not None:
        # A weight row is read if any of the tokens keeps that input channel.
        keep = 1.0 - activation_sparsity ** max(1, tokens)
        density = keep
        sparse_flops, sparse_bytes = dense_flops * keep, w_bytes * keep + act_bytes
        launches = 2  # threshold + sparse GEMV, until they are fused
    else:
        density = 1.0
        sparse_flops, sparse_bytes, launches = dense_flops, dense_bytes, 1
    dense_s = _time(dense_flops, dense_bytes, hw, dtype, DENSE_GEMM_EFFICIENCY, 1)
    sparse_s = _time(sparse_flops, sparse_bytes, hw, dtype, SPARSE_GEMM_EFFICIENCY, launches)
    return dense_flops, sparse_flops, dense_bytes, sparse_bytes, dense_s, sparse_s, density
