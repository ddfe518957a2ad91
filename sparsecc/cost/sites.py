"""Estimates for the three site families, in the shape ``check`` needs.

Each function returns a ``SiteEstimate``: the prediction at the site's sizes
(hints for symbolic ones) and, when the sequence length is symbolic, the
crossover along it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sparsecc.cost.formulas import (B, D, H, HKV, K, M, N, SK, SQ, Cost, attention_blocks, attention_cost,
                                    dynamic_estimate_cost, linear_cost)
from sparsecc.cost.hardware import HardwareProfile
from sparsecc.cost.model import Crossover, Prediction, crossover, predict
from sparsecc.forms import Streaming

# Activation sparsity assumed when a rule gives a threshold but no target sparsity.
ASSUMED_ACTIVATION_SPARSITY = 0.5


@dataclass(frozen=True)
class SiteEstimate:
    """Prediction at the traced sizes, kept-work density, and the crossover when a size is symbolic."""

    prediction: Prediction
    density: float
    crossover: Optional[Crossover] = None


def _per_head_blocks(form, per_head: Optional[Sequence], seq_q, seq_k, causal: bool, heads: int):
    """Mean kept blocks per head, grouping heads that share a geometry."""
    if isinstance(form, Streaming) and per_head:
        groups = Counter(per_head)
        total = 0
        for (sink, window), count in groups.items():
            head_form = None if window < 0 else Streaming(sink, window)
            total += count * attention_blocks(head_form, seq_q, seq_k, causal)
        return total / len(per_head)
    dense_fraction = (per_head.count(None) / len(per_head)) if per_head else 0
    return attention_blocks(form, seq_q, seq_k, causal, dense_fraction)


def estimate_attention(form, per_head, *, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype: torch.dtype,
                       causal: bool, hw: HardwareProfile, margin: float, symbolic_seq: bool) -> SiteEstimate:
    """Dense flash attention vs the form, per-head geometry included."""
    dense = attention_cost(None, causal)
    blocks = _per_head_blocks(form, per_head, SQ, SK, causal, heads)
    base = attention_cost(None, causal)
    dense_blocks = attention_blocks(None, SQ, SK, causal)
    # Dynamic forms pay for their estimate and table build on every call.
    est_flops, est_bytes, est_launches = dynamic_estimate_cost(form)
    sparse = Cost(base.flops * blocks / dense_blocks + est_flops, base.bytes + est_bytes, 1 + est_launches,
                  "attention_sparse")
    values = {B: batch, H: heads, HKV: kv_heads, SQ: seq_q, SK: seq_k, D: head_dim}
    prediction = predict(dense, sparse, hw, dtype, values)
    density = prediction.sparse_flops / prediction.dense_flops if prediction.dense_flops else 1.0
    cross = None
    if symbolic_seq:
        tied = (SQ,) if seq_q == seq_k else ()
        cross = crossover(dense, sparse, hw, dtype, values, SK, margin, tied)
    return SiteEstimate(prediction, density, cross)


def estimate_linear(form, *, tokens, in_features, out_features, dtype, hw: HardwareProfile,
                    activation_sparsity=None) -> SiteEstimate:
    """Dense GEMM vs a weight form or input activation sparsity."""
    dense = linear_cost()
    sparse = linear_cost(form, activation_sparsity)
    values = {M: tokens, N: out_features, K: in_features}
    prediction = predict(dense, sparse, hw, dtype, values)
    density = prediction.sparse_flops / prediction.dense_flops if prediction.dense_flops else 1.0
    return SiteEstimate(prediction, density)


def estimate_ffn(linears, *, tokens, dtype, hw: HardwareProfile, activation_sparsity: float) -> SiteEstimate:
    """Sum over the FFN's linears (``(in_features, out_features)`` pairs) with activation sparsity."""
    totals = [0.0] * 6
    for k, n in linears:
        p = estimate_linear(None, tokens=tokens, in_features=k, out_features=n, dtype=dtype, hw=hw,
                            activation_sparsity=activation_sparsity).prediction
        values = (p.dense_flops, p.sparse_flops, p.dense_bytes, p.sparse_bytes, p.dense_time_s, p.sparse_time_s)
        totals = [t + v for t, v in zip(totals, values)]
    prediction = Prediction(*totals)
    return SiteEstimate(prediction, totals[1] / totals[0] if totals[0] else 1.0)


