"""Expected outputs of the FFN (activation_threshold) and linear (2:4, block_weights) forms, from docs/spec.md alone.

The companion of ``oracle.py`` (which re-exports every name here), under the same rules: nothing imported from
sparsecc, every rule read off docs/spec.md and computed in float64, and a ``valid`` / ``defined`` flag where a
narrower computation may legitimately fall on either side of a boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

F64 = torch.float64


# ---------------------------------------------------------------- FFN: activation_threshold

ACTIVATIONS = {
    "gelu": lambda t: 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0))),
    "gelu_tanh": lambda t: 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3))),
    "silu": lambda t: t * torch.sigmoid(t),
    "relu": lambda t: t.clamp_min(0.0),
    "relu2": lambda t: t.clamp_min(0.0) ** 2,
}


def _linear(x, w, b):
    y = x @ w.to(F64).t()
    return y if b is None else y + b.to(F64)


def threshold(x, tau: Optional[float], *, weight=None, rtol: float = 0.0):
    """``x * (score > tau)``; score ``|x|`` or, with ``weight`` ([out, in]), ``|x_i| * ||W[:, i]||_2``.

    Returns (thresholded x, near) where ``near`` marks the tokens (all dims but
    the last) with a score within ``rtol * tau`` of tau (tau > 0), which a
    computation in a narrower dtype may put on either side. (At tau = 0 an
    entry on the boundary is 0 and contributes nothing either way.)
    """
    if tau is None:
        return x, torch.zeros(x.shape[:-1], dtype=torch.bool)
    score = x.abs()
    if weight is not None:
        score = score * torch.linalg.vector_norm(weight.to(F64), dim=0)
    near = ((score - tau).abs() <= rtol * tau).any(-1) if tau > 0 else torch.zeros(x.shape[:-1], dtype=torch.bool)
    return x * (score > tau), near


@dataclass
class Ffn:
    """An FFN's weights as [out, in] tensors (``up`` None for a plain FFN) and its activation name."""

    gate_w: torch.Tensor
    gate_b: Optional[torch.Tensor]
    up_w: Optional[torch.Tensor]
    up_b: Optional[torch.Tensor]
    down_w: torch.Tensor
    down_b: Optional[torch.Tensor]
    act: str


def expected_ffn(ffn: Ffn, x, *, mode: str, tau_input=None, tau_down=None, tau_gate=None,
                 criterion: str = "magnitude", rtol_input: float = 0.0, rtol_hidden: float = 0.0):
    """``form = "activation_threshold"`` on one FFN, float64. Returns (out, valid tokens).

    input mode: the input of the up/gate projections is thresholded with
    ``tau_input``, the input of the down projection with ``tau_down`` (None:
    that projection stays dense). With ``criterion = "weighted"`` each
    projection thresholds with its own ``W`` (the projection that consumes x).
    gate mode: ``act(x W_gate)`` is thresholded with ``tau_gate`` before it
    multiplies ``up`` (gated FFNs).
    A token is not valid when a score lies within ``rtol_input`` (scores of the
    FFN's input) or ``rtol_hidden`` (scores of computed activations) of its tau.
    """
    x = x.to(F64)
    act = ACTIVATIONS[ffn.act]
    weighted = criterion == "weighted"
    near = torch.zeros(x.shape[:-1], dtype=torch.bool)
    if mode == "input":
        xg, n1 = threshold(x, tau_input, weight=ffn.gate_w if weighted else None, rtol=rtol_input)
        h = act(_linear(xg, ffn.gate_w, ffn.gate_b))
        near |= n1
        if ffn.up_w is not None:
            xu, n2 = threshold(x, tau_input, weight=ffn.up_w if weighted else None, rtol=rtol_input)
            h = h * _linear(xu, ffn.up_w, ffn.up_b)
            near |= n2
        hd, n3 = threshold(h, tau_down, weight=ffn.down_w if weighted else None, rtol=rtol_hidden)
        near |= n3
        return _linear(hd, ffn.down_w, ffn.down_b), ~near
    assert mode == "gate" and not weighted
    a = act(_linear(x, ffn.gate_w, ffn.gate_b))
    a, n1 = threshold(a, tau_gate, rtol=rtol_hidden)
    if ffn.up_w is not None:
        a = a * _linear(x, ffn.up_w, ffn.up_b)
    return _linear(a, ffn.down_w, ffn.down_b), ~n1


# ---------------------------------------------------------------- linear: 2:4 and block_weights

def prune_2_4(w) -> Tuple[torch.Tensor, torch.Tensor]:
    """2 of every 4 consecutive weights along the input dimension, the 2 of largest magnitude, float64.

    Returns (pruned ``[out, in]``, valid output features): ties go to the lower index (docs/spec.md), so
    every output feature is defined; the second value stays for the callers' uniform (pruned, valid) shape.
    """
    out_f, in_f = w.shape
    assert in_f % 4 == 0
    g = w.to(F64).reshape(out_f, in_f // 4, 4)
    mag = g.abs()
    order = mag.argsort(dim=-1, descending=True, stable=True)   # equal magnitudes: the lower index first
    keep = torch.zeros_like(mag, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return (g * keep).reshape(out_f, in_f), torch.ones(out_f, dtype=torch.bool)


def prune_block_weights(w, block: Tuple[int, int] = (64, 64), density: float = 0.25, rtol: float = 1e-5):
    """The ``ceil(density * n_blocks)`` blocks (at least one) of largest Frobenius norm, float64.

    Returns (pruned, defined): not defined when the norm at the cut is tied
    within ``rtol`` with a dropped block.
    """
    bm, bk = block
    out_f, in_f = w.shape
    assert out_f % bm == 0 and in_f % bk == 0
    wd = w.to(F64)
    blocks = wd.reshape(out_f // bm, bm, in_f // bk, bk)
    norms = blocks.pow(2).sum((1, 3)).sqrt().reshape(-1)
    n = norms.numel()
    kept = max(1, math.ceil(density * n))
    srt = norms.sort(descending=True).values
    defined = kept == n or bool(srt[kept - 1] - srt[kept] > rtol * srt[kept - 1])
    order = norms.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[:kept]] = True
    keep = keep.reshape(out_f // bm, 1, in_f // bk, 1)
    return (blocks * keep).reshape(out_f, in_f), defined


def expected_linear(x, w, b=None):
    """``x W^T + b`` in float64."""
    return _linear(x.to(F64), w, b)
