"""Block-sparse linear: ``y = x Wᵀ + b`` with ``W`` stored as a :class:`~sparsecc.weights.BlockSparseWeight`.

Layout of this file: module notes, then the reference section, then the Triton kernel
(configs, ``@triton.jit`` kernel bound lazily by ``epilogue.bind_triton``, wrapper).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from sparsecc.codegen import epilogue as _epi
from sparsecc.codegen.epilogue import activation_ref, bind_triton, check_activation
from sparsecc.weights import BlockSparseWeight

__all__ = ["block_sparse_linear_ref", "block_sparse_linear", "BlockLinearConfig", "pick_config", "BLOCK_SIZES"]

BLOCK_SIZES = (16, 32, 64, 128)  # bm and bk the kernel supports: tl.dot needs >= 16, registers cap 128

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


# ============================================================== Triton kernel
#
# Notation: x [M, K], W [N, K] stored as BSR blocks (bm x bk), y [M, N] = act(x Wᵀ + b).
# One program computes the output tile y[m0:m0+BLOCK_M, r*bm:(r+1)*bm] of block row r and
# walks only r's stored blocks: for each block j, acc += x[m-tile, col_idx[j]*bk : +bk] @ blocks[j]ᵀ.
#
# Program order: the row index varies fastest, so the programs resident at one time share one
# x slab (BLOCK_M x K) through L2 while the (small) compressed weight stays in L2 too. Within an
# M tile, block rows run heaviest first (``_row_order``), so the light rows fill the tail of the
# grid instead of a heavy row starting last.


@dataclass(frozen=True)
class BlockLinearConfig:
    """Launch knobs of :func:`block_sparse_linear`: M tile, warps, pipeline depth, operand order.

    ``SWAP_AB`` computes the transposed tile ``W_blk @ x_tileᵀ`` (the block as the MMA's left
    operand), which suits Hopper's 64-row warpgroup MMA when bm is small.
    """

    BLOCK_M: int
    num_warps: int
    num_stages: int
    SWAP_AB: bool = False

    def __post_init__(self):
        if self.BLOCK_M not in (16, 32, 64, 128, 256):
            raise ValueError(f"BLOCK_M={self.BLOCK_M} must be a power of two in [16, 256]")


# Measured on an H100 (bench/linear.py --sweep, 2026-11-23): for bm = 64 at M = 8192, the swapped
# 64 x 256 tile (SWAP_AB, 8 warps) beat every unswapped one, with 3 stages for rows of ~6 blocks
# and 5 for rows of ~32 (a deeper pipeline pays only over longer rows). 128 x 128 blocks keep the
# unswapped 128-row tile, whose x and W stages still fit in shared memory. Small M (decode) wastes
# least with BLOCK_M = 16, tl.dot's minimum.
# Keys: (M at least, bm * bk at most, bm at least) -> config; the first match wins.
CONFIGS = (
    (1024, 64 * 64, 64, BlockLinearConfig(BLOCK_M=256, num_warps=8, num_stages=3, SWAP_AB=True)),
    (1024, 64 * 64, 16, BlockLinearConfig(BLOCK_M=128, num_warps=4, num_stages=4)),
    (1024, 128 * 128, 16, BlockLinearConfig(BLOCK_M=128, num_warps=8, num_stages=3)),
    (64, 128 * 128, 16, BlockLinearConfig(BLOCK_M=64, num_warps=4, num_stages=3)),
    (1, 128 * 128, 16, BlockLinearConfig(BLOCK_M=16, num_warps=4, num_stages=3)),
)
LONG_ROW_BLOCKS = 16  # mean stored blocks per row from which the swapped tile takes 5 stages
LONG_ROW_STAGES = 5


def pick_config(m: int, bm: int, bk: int, blocks_per_row: float = 0.0) -> BlockLinearConfig:
    """The first entry of :data:`CONFIGS` that fits ``(m, bm, bk)``; deeper pipelines for long rows."""
    for m_min, area_max, bm_min, config in CONFIGS:
        if m >= m_min and bm * bk <= area_max and bm >= bm_min:
            if config.SWAP_AB and blocks_per_row >= LONG_ROW_BLOCKS:
                return BlockLinearConfig(config.BLOCK_M, config.num_warps, LONG_ROW_STAGES, True)
            return config
    return CONFIGS[-1][3]


def _bsr_linear_kernel(x_ptr, blocks_ptr, row_ptr_ptr, col_idx_ptr, order_ptr, bias_ptr, y_ptr,
                       M, N, stride_xm, stride_xk, stride_ym, n_block_rows,
                       BM: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr,  # noqa: F821
                       HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,  # noqa: F821
                       INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,  # noqa: F821
                       SWAP_AB: tl.constexpr):  # noqa: F821
    """One (BLOCK_M x BM) output tile of block row ``order[pid % n_block_rows]``, over its stored blocks."""
    pid = tl.program_id(0)
    m_tile = pid // n_block_rows
    row = tl.load(order_ptr + pid % n_block_rows)
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    block0 = blocks_ptr + start.to(tl.int64) * (BM * BK)
    if SWAP_AB:
        # Compute the transposed tile yᵀ = W_blk @ xᵀ: the block's BM rows become the MMA's M
        # side (64 per warpgroup on Hopper) and BLOCK_M tokens its wide N side.
        x_tile = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None] * stride_xk
        w_tile = block0 + offs_n[:, None] * BK + offs_k[None, :]
        acc = tl.zeros((BM, BLOCK_M), dtype=tl.float32)
    else:
        x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        # blocks[j] is (BM x BK) row-major; read it as its transpose (BK x BM) so the dot needs no permute.
        w_tile = block0 + offs_k[:, None] + offs_n[None, :] * BK
        acc = tl.zeros((BLOCK_M, BM), dtype=tl.float32)
    for j in range(start, end):
        col = tl.load(col_idx_ptr + j)
        if SWAP_AB:
            a = tl.load(w_tile)
            b = tl.load(x_tile + (col * BK).to(tl.int64) * stride_xk, mask=m_mask[None, :], other=0.0)
        else:
            a = tl.load(x_tile + (col * BK).to(tl.int64) * stride_xk, mask=m_mask[:, None], other=0.0)
            b = tl.load(w_tile)
        if DOT_IN_FP32:  # the CPU interpreter's dot misreads bfloat16 (it multiplies the raw bits)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        w_tile += BM * BK  # blocks of a row are stored back to back

    cols = row * BM + offs_n
    if SWAP_AB:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[:, None]
        acc = _epi.apply_activation(acc, ACTIVATION)
        y = y_ptr + offs_m[None, :].to(tl.int64) * stride_ym + cols[:, None]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        acc = _epi.apply_activation(acc, ACTIVATION)
        y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + cols[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None])


_KERNELS = ("_bsr_linear_kernel",)

# Row orders are cached per row_ptr tensor (the compressed weight is a compile-time constant, so
# one argsort serves every call). Entries: id(row_ptr) -> (weakref, _version, order).
_ORDER_CACHE: Dict[int, Tuple[weakref.ref, int, Tensor]] = {}
_ORDER_CACHE_MAX = 256  # more distinct weights than this in one process is unusual; drop the oldest


def _row_order(row_ptr: Tensor) -> Tensor:
    """Block rows sorted by stored-block count, heaviest first (int32, cached per ``row_ptr``)."""
    hit = _ORDER_CACHE.get(id(row_ptr))
    if hit is not None and hit[0]() is row_ptr and hit[1] == row_ptr._version:
        return hit[2]
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    if len(_ORDER_CACHE) >= _ORDER_CACHE_MAX:
        _ORDER_CACHE.pop(next(iter(_ORDER_CACHE)))
    _ORDER_CACHE[id(row_ptr)] = (weakref.ref(row_ptr), row_ptr._version, order)
    return order


def _output(out: Optional[Tensor], m: int, n: int, x: Tensor) -> Tensor:
    """``out`` checked as a contiguous ``[m, n]`` tensor of ``x``'s dtype and device, or a new one."""
    if out is None:
        return torch.empty(m, n, dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {n}] {x.dtype} tensor on {x.device}")
    return out


def block_sparse_linear(x: Tensor, blocks: Tensor, row_ptr: Tensor, col_idx: Tensor,
                        bias: Optional[Tensor] = None, activation: str = "none",
                        config: Optional[BlockLinearConfig] = None, out: Optional[Tensor] = None) -> Tensor:
    """Triton ``act(x Wᵀ + b)`` with W as BSR ``blocks [nnzb, bm, bk]``, ``row_ptr``, ``col_idx``.

    The arguments are those of the ``sparsecc::block_sparse_linear`` op's
    kernel call: N is ``(row_ptr.numel() - 1) * bm`` and K is ``x.shape[-1]``.
    ``activation`` is an :data:`~sparsecc.codegen.epilogue.EPILOGUES` name
    applied after the bias, in float32, before the one cast to ``x.dtype``.
    float16/bfloat16 and float32 (IEEE products) run the kernel; float64 runs
    the reference. ``config`` overrides :func:`pick_config` (benchmarks);
    ``out`` (contiguous ``[M, N]``, ``x.dtype``) receives the result (tests poison it first).
    """
    check_activation(activation)
    bm, bk = blocks.shape[1], blocks.shape[2]
    n, k = (row_ptr.numel() - 1) * bm, x.shape[-1]
    if x.dtype == torch.float64:
        weight = BlockSparseWeight(blocks=blocks, row_ptr=row_ptr, col_idx=col_idx, shape=(n, k), block=(bm, bk))
        return activation_ref(activation)(block_sparse_linear_ref(x, weight, bias))
    if bm not in BLOCK_SIZES or bk not in BLOCK_SIZES:
        raise ValueError(f"block {bm}x{bk}: the kernel supports bm, bk in {BLOCK_SIZES}")
    if k % bk:
        raise ValueError(f"x has {k} input features, not a multiple of bk={bk}")
    bind_triton(globals(), _KERNELS)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = _output(out, m, n, x)
    if m == 0:
        return y.reshape(*lead, n)
    blocks = blocks.to(x.dtype).contiguous()
    bias_arg = bias.contiguous() if bias is not None else y
    cfg = config or pick_config(m, bm, bk, blocks.shape[0] / max(row_ptr.numel() - 1, 1))
    interpreting = x.device.type == "cpu"  # CPU tensors reach a Triton kernel only under TRITON_INTERPRET
    n_rows = row_ptr.numel() - 1
    grid = (triton.cdiv(m, cfg.BLOCK_M) * n_rows,)  # noqa: F821 - bound by bind_triton
    _bsr_linear_kernel[grid](
        x2, blocks, row_ptr, col_idx, _row_order(row_ptr), bias_arg, y,
        m, n, x2.stride(0), x2.stride(1), y.stride(0), n_rows,
        BM=bm, BK=bk, BLOCK_M=cfg.BLOCK_M, HAS_BIAS=bias is not None, ACTIVATION=activation,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreting else "tf32",
        DOT_IN_FP32=interpreting and x.dtype == torch.bfloat16,
        SWAP_AB=cfg.SWAP_AB, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(*lead, n)
