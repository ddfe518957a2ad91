"""Activation sparsity: thresholded projection inputs (TEAL) and gate-sparse FFNs (CATS).

Layout of this file: module notes, then the reference section; kernels go after it.
The threshold rule is the ``ActivationThreshold`` rule of ``sparsecc.forms``: a
value x takes part iff ``|x| > tau`` (strictly), so ``tau = 0`` drops exact zeros only.
References compute in the input dtype, as the dense model would.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "threshold_linear_ref", "gate_sparse_ffn_ref"]

# ============================================================== reference


def _relu2(x: Tensor) -> Tensor:
    """Squared ReLU (Primer, Nemotron)."""
    return torch.relu(x).square()


def _gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2, Gemma)."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": torch.relu,
    "relu2": _relu2,
    "silu": F.silu,
}
"""FFN activations by the name the matcher records on a site."""


def _threshold(x: Tensor, tau: float) -> Tensor:
    return x * (x.abs() > tau).to(x.dtype)


def threshold_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], tau: float) -> Tensor:
    """Reference ``F.linear(x * (|x| > tau), weight, bias)`` with ``weight`` ``[N, K]``."""
    return F.linear(_threshold(x, tau), weight, bias)


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
    survivors (exactly the survivors for a single decode token).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not allowed; expected one of {sorted(ACTIVATIONS)}")
    if b_up is not None and w_up is None:
        raise ValueError("b_up is given without w_up")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a = ACTIVATIONS[act](F.linear(x2, w_gate, b_gate))
    keep = a.abs() > tau
    active = keep.any(0).nonzero().squeeze(-1)
    h = a[:, active] * keep[:, active].to(a.dtype)
    if w_up is not None:
        up = F.linear(x2, w_up[active], None if b_up is None else b_up[active])
        h = h * up
    y = F.linear(h, w_down[:, active], b_down)
    return y.reshape(*lead, w_down.shape[0])
