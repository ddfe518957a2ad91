"""Tile choices that kernels launch with and the cost model (sparsecc/cost/formulas.py) counts programs or
traffic with, in one place below both: the block-sparse linear kernel (codegen/block_sparse_linear.py) and the
sampled-row estimate of block_topk (codegen/dynamic_attention_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

# Sampled query rows per tile of block_topk's pool = "rows" estimate: rows of several heads of one kv head and of
# several query blocks share every key load (at least 16, what tl.dot needs).
ROW_MASS_TILE = 64

__all__ = ["ROW_MASS_TILE", "BlockLinearConfig", "CONFIGS", "LONG_ROW_BLOCKS", "LONG_ROW_STAGES", "FUSED_MAX_BLOCK_M", "pick_config"]


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


# A fused gate/up program holds two fp32 accumulators and runs two pipelined loops; a 256-token tile
# would need 128 accumulator registers per thread (8 warps, 64-row blocks) and, if the loops' shared
# buffers are not reused, about 240 KB of shared memory at 3 stages (H100: 228 KB). Not measured yet
# (bench/epilogue.py --sweep): until then the fused kernel caps the tile at 128 tokens.
FUSED_MAX_BLOCK_M = 128


def pick_config(m: int, bm: int, bk: int, blocks_per_row: float = 0.0, fused_up: bool = False) -> BlockLinearConfig:
    """The first entry of :data:`CONFIGS` that fits ``(m, bm, bk)``; deeper pipelines for long rows.

    ``blocks_per_row`` counts both weights' blocks for a fused gate/up (``fused_up``).
    """
    config = CONFIGS[-1][3]
    for m_min, area_max, bm_min, candidate in CONFIGS:
        if m >= m_min and bm * bk <= area_max and bm >= bm_min:
            config = candidate
            if config.SWAP_AB and blocks_per_row >= LONG_ROW_BLOCKS:
                config = BlockLinearConfig(config.BLOCK_M, config.num_warps, LONG_ROW_STAGES, True)
            break
    if fused_up and config.BLOCK_M > FUSED_MAX_BLOCK_M:
        config = BlockLinearConfig(FUSED_MAX_BLOCK_M, config.num_warps, config.num_stages, config.SWAP_AB)
    return config
