"""Estimates for the three site families, in the shape ``check`` needs.

Each function returns an ``Estimate``: the prediction at the site's sizes
(hints for symbolic ones) and, when the sequence length is symbolic, the
crossover along it (when the token count is symbolic, the count it was
judged at). The ``*_costs`` builders return the dense and sparse
``Cost`` pair behind an estimate (``bench/costmodel.py`` refits from them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Optional, Sequence, Tuple

import torch

from sparsecc.cost.formulas import (B, D, H, HKV, K, M, N, SK, SQ, Cost, attention_blocks, attention_cost,
                                    decode_kept_keys, gate_ffn_cost, linear_cost)
from sparsecc.cost.hardware import HardwareProfile
from sparsecc.cost.estimate import Estimate
from sparsecc.cost.model import crossover, predict
from sparsecc.forms import Streaming

# Activation sparsity assumed when a rule gives a threshold but no target sparsity.
ASSUMED_ACTIVATION_SPARSITY = 0.5
# A linear or FFN site whose token count is symbolic may run at any count; it is judged at its worst
# count among these (decode 1 .. long prefill 8192, the validated range) and its traced hint.
SYMBOLIC_TOKEN_PROBES = (1, 4, 16, 128, 1024, 8192)


def _per_head_mean(form, per_head: Optional[Sequence], of):
    """Mean of ``of(head's form)`` over the heads: ``per_head`` gives each head's form (None: dense), else every
    head has ``form``. Heads sharing a form are counted once per form (a site of several forms, or of dense and
    sparse heads, averages them)."""
    if not per_head:
        return of(form)
    return sum(n * of(f) for f, n in Counter(per_head).items()) / len(per_head)


def _widest_rule(forms: Sequence):
    """The rule whose keys the decode kernel reads for one kv group of heads with ``forms``: the widest sink and
    the widest window among them (codegen/decode_attention.py ``group_rules``); None (every key) when a head is
    dense."""
    if any(f is None for f in forms):
        return None
    return Streaming(max(f.sink for f in forms), max(f.window for f in forms))


def _decode_kept_keys(form, per_head: Optional[Sequence], kv_heads: Optional[int]):
    """Mean keys per kv head the decode kernel reads: each kv head reads its group's widest rule once
    (:func:`_widest_rule`), so a group of heads with different rules costs what its widest head costs. Without
    ``kv_heads`` (or per-head forms the kv heads do not divide) each head counts as its own group."""
    if not per_head:
        return decode_kept_keys(form, SQ, SK)
    group = len(per_head) // kv_heads if kv_heads and len(per_head) % kv_heads == 0 else 1
    if group == 1 or not all(f is None or isinstance(f, Streaming) for f in per_head):
        return _per_head_mean(form, per_head, lambda f: decode_kept_keys(f, SQ, SK))
    groups = Counter(_widest_rule(per_head[g0:g0 + group]) for g0 in range(0, len(per_head), group))
    return sum(n * decode_kept_keys(f, SQ, SK) for f, n in groups.items()) / sum(groups.values())


def attention_costs(form, per_head: Optional[Sequence], causal: bool, program: str = "triton",
                    kv_heads: Optional[int] = None) -> Tuple[Cost, Cost]:
    """(dense, sparse) costs of an attention site as expressions of the attention symbols; ``per_head`` as in
    ``_per_head_mean`` (the kept blocks are per-head means, the decode kernel's kept keys means over the kv groups
    of ``kv_heads``, so the head count stays a symbol); ``program``: the kernels that run the sparse side
    (``formulas.PROGRAMS``)."""
    blocks = _per_head_mean(form, per_head, lambda f: attention_blocks(f, SQ, SK, causal))
    kept_keys = _decode_kept_keys(form, per_head, kv_heads) if program == "decode" else None
    return (attention_cost(None, causal, program=program),
            attention_cost(form, causal, blocks=blocks, program=program, kept_keys=kept_keys))


def estimate_attention(form, per_head, *, batch, heads, kv_heads, seq_q, seq_k, head_dim, dtype: torch.dtype,
                       causal: bool, hw: HardwareProfile, margin: float, symbolic_seq: bool,
                       program: str = "triton", replayed: bool = False) -> Estimate:
    """Dense flash attention vs the form, per-head forms and a dynamic form's estimate pass included.

    ``program``: the kernels the site's calls run (``formulas.PROGRAMS``; the compiler asks the kernels' own
    rules). ``replayed``: the graph runs under CUDA graphs, so neither side pays its per-call host floor (which
    decides short calls such as a one-batch decode step, bench/RESULTS.md).
    """
    dense, sparse = attention_costs(form, per_head, causal, program, kv_heads=kv_heads)
    values = {B: batch, H: heads, HKV: kv_heads, SQ: seq_q, SK: seq_k, D: head_dim}
    prediction = predict(dense, sparse, hw, dtype, values, host=not replayed)
    if not symbolic_seq:
        return prediction
    tied = (SQ,) if seq_q == seq_k else ()
    return replace(prediction, crossover=crossover(dense, sparse, hw, dtype, values, SK, margin, tied,
                                                   host=not replayed))


def linear_costs(form, activation_sparsity=None, tokens=None) -> Tuple[Cost, Cost]:
    """(dense, sparse) costs of a linear site as expressions of tokens, in_features, out_features.

    A known ``tokens`` is built in (the block-sparse kernel's family depends on its token tile).
    """
    shapes = None if tokens is None else dict(tokens=tokens)
    return linear_cost(shapes=shapes), linear_cost(form, activation_sparsity, shapes)


def _probes(tokens: int, symbolic: bool):
    return sorted({tokens, *SYMBOLIC_TOKEN_PROBES}) if symbolic else [tokens]


def _at_worst(probes, symbolic: bool) -> Estimate:
    """The (estimate, tokens) probe with the lowest predicted speedup; a symbolic count records which it was."""
    estimate, tokens = min(probes, key=lambda pt: pt[0].speedup)
    return replace(estimate, worst_tokens=tokens) if symbolic else estimate


def estimate_linear(form, *, tokens, in_features, out_features, dtype, hw: HardwareProfile,
                    activation_sparsity=None, symbolic_tokens: bool = False, replayed: bool = False) -> Estimate:
    """Dense GEMM vs a weight form or input activation sparsity.

    ``replayed``: the graph runs under CUDA graphs (``cudagraphs=True``), so neither side pays its per-call host
    floor (a 2:4 call's is 58 us with cuSPARSELt's plans kept per shape; where they cannot be kept the plan stage
    raises it to torch's per-call plan, passes/linear.py ``two_four_host_floor``).

    With ``symbolic_tokens`` the site may run at any token count and no
    runtime branch exists for linears, so the estimate is taken at the probed
    count where sparse fares worst: ``auto`` applies the form only when it
    wins at every probed count.
    """
    probes = [(predict(*linear_costs(form, activation_sparsity, t), hw, dtype, {N: out_features, K: in_features},
                       host=not replayed), t) for t in _probes(tokens, symbolic_tokens)]
    return _at_worst(probes, symbolic_tokens)


def ffn_costs(linears, activation_sparsity: float, mode: str = "input") -> Tuple[Cost, Cost]:
    """(dense, sparse) costs of an FFN as expressions of ``tokens``; ``linears`` are (in, out) pairs in order
    (first, [up,] down).

    Costs of several kernels are returned as one ``Cost`` whose ``extra``
    holds the later kernels. Mode "input" thresholds each linear's input;
    mode "gate" (CATS) runs the gate in full and skips up rows / down columns.
    """
    if mode not in ("input", "gate"):
        raise ValueError(f"FFN mode {mode!r} is not one of ['gate', 'input']")
    dense = [linear_cost(shapes=dict(in_features=k, out_features=n)) for k, n in linears]
    dense_cost = Cost(dense[0].flops, dense[0].bytes, dense[0].launches, dense[0].family, extra=tuple(dense[1:]))
    if mode == "gate":
        d_model, d_ff = linears[0]
        return dense_cost, gate_ffn_cost(d_model, d_ff, M, activation_sparsity, gated=len(linears) == 3)
    sparse = [linear_cost(None, activation_sparsity, dict(in_features=k, out_features=n)) for k, n in linears]
    return dense_cost, Cost(sparse[0].flops, sparse[0].bytes, sparse[0].launches, sparse[0].family,
                            extra=tuple(sparse[1:]))


def estimate_ffn(linears, *, tokens, dtype, hw: HardwareProfile, activation_sparsity: float, mode: str = "input",
                 symbolic_tokens: bool = False, replayed: bool = False) -> Estimate:
    """The FFN's linears (``(in_features, out_features)`` pairs) dense vs with activation sparsity in ``mode``.

    ``symbolic_tokens`` and ``replayed`` as in ``estimate_linear`` (a decode step's FFN under CUDA graphs: the
    per-call host floors of its GEMVs, not their reads, decided against it).
    """
    dense, sparse = ffn_costs(linears, activation_sparsity, mode)
    probes = [(predict(dense, sparse, hw, dtype, {M: t}, host=not replayed), t)
              for t in _probes(tokens, symbolic_tokens)]
    return _at_worst(probes, symbolic_tokens)


__all__ = ["Estimate", "ASSUMED_ACTIVATION_SPARSITY", "SYMBOLIC_TOKEN_PROBES", "attention_costs",
           "estimate_attention", "linear_costs", "estimate_linear", "ffn_costs", "estimate_ffn"]
