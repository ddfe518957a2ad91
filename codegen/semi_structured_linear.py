"""2:4 semi-structured linear: ``y = x Wᵀ + b`` with ``W`` stored as a :class:`~sparsecc.weights.SemiStructuredWeight`.

Layout of this file: module notes, then the reference section; kernels (and the
cuSPARSELt / ``to_sparse_semi_structured`` path) go after it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.weights import SemiStructuredWeight

__all__ = ["semi_structured_linear_ref"]

# ============================================================== reference


def semi_structured_linear_ref(x: Tensor, weight: SemiStructuredWeight, bias: Optional[Tensor] = None) -> Tensor:
    """Reference ``x [..., K] -> [..., N]`` for a 2:4 weight.

    Decompresses the weight and runs a dense product: 2:4 saves work only in
    hardware sparse tensor cores, so a reference gains nothing by gathering.
    Accumulates in float32 (float64 inputs stay float64); the output has ``x.dtype``.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight expects K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to_dense().to(acc)
    out = F.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return out.to(x.dtype)
