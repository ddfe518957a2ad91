"""Block-sparse linear: ``y = x Wᵀ + b`` with ``W`` stored as a :class:`~sparsecc.weights.BlockSparseWeight`.

Layout of this file: module notes, then the reference section; kernels go after it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sparsecc.weights import BlockSparseWeight

__all__ = ["block_sparse_linear_ref"]

# ============================================================== reference


def _accumulate_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_sparse_linear_ref(x: Tensor, weight: BlockSparseWeight, bias: Optional[Tensor] = None) -> Tensor:
    """Reference ``x [..., K] -> [..., N]`` through the stored blocks only.

    Each block row multiplies the gathered input columns of its stored blocks,
    so the work is about ``density`` times the dense product. Accumulates in
    float32 (float64 inputs stay float64); the output has ``x.dtype``.
    """
    n, k = weight.shape
    bm, bk = weight.block
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight expects K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    acc = _accumulate_dtype(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k // bk, bk).to(acc)
    out = torch.zeros(x2.shape[0], n // bm, bm, dtype=acc, device=x.device)
    ptr = weight.row_ptr.tolist()
    cols = weight.col_idx.long()
    blocks = weight.blocks.to(acc)
    for row in range(n // bm):
        start, end = ptr[row], ptr[row + 1]
        if start == end:
            continue
        # [M, nnz_r * bk] @ [nnz_r * bk, bm]: one matmul over the row's stored blocks.
        xs = x2[:, cols[start:end]].flatten(1)
        ws = blocks[start:end].transpose(1, 2).reshape(-1, bm)
        out[:, row] = xs @ ws
    out = out.reshape(*lead, n)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(x.dtype)
