"""Compressed weight containers, the compression that fills them, and the bindings that keep them fresh.

Both containers hold a linear weight ``W`` of shape ``[N, K]`` (out x in, as
``nn.Linear`` stores it):

* :class:`SemiStructuredWeight`: 2:4 sparsity along K; the two kept values of
  every group of four plus their positions in the group.
* :class:`BlockSparseWeight`: (bm x bk) blocks in BSR order (block rows over N).

Compression runs under ``torch.no_grad()`` and copies what it keeps, so a
container never holds (a view of) the original parameter: freeing or updating
the parameter does not change the container.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from sparsecc.forms import PRUNE_MODES, BlockWeights, TwoFour
from sparsecc.sharding import is_dtensor, local_part, local_tensor, shard_of

# 2:4 sparsity: GROUP consecutive input weights, KEPT of them stored.
GROUP = 4
KEPT = 2


def _check_shape(shape, name: str = "shape") -> Tuple[int, int]:
    if not (isinstance(shape, tuple) and len(shape) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise ValueError(f"{name}={shape!r} is not allowed; expected a tuple (N, K) of integers >= 1")
    return shape


def _check_prune(prune: str) -> None:
    if prune not in PRUNE_MODES:
        raise ValueError(f"prune={prune!r} is not allowed; expected one of {PRUNE_MODES}")


def _check_matrix(w: Tensor) -> None:
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        got = f"{w.dtype} with shape {tuple(w.shape)}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"weight must be a 2-d floating-point tensor [N, K], got {got}")


# ------------------------------------------------------------------ 2:4


@dataclass(frozen=True)
class SemiStructuredWeight:
    """A 2:4 semi-structured weight: in every group of 4 consecutive input weights, 2 are stored.

    * ``values`` ``[N, K // 2]``: the kept weights (the weight's dtype), two per group, in group order.
    * ``indices`` uint8 ``[N, K // 2]``: the position (0..3) of each kept weight inside its group,
      strictly ascending within each group.
    * ``shape``: the dense shape ``(N, K)``, with ``K % 4 == 0``.
    """

    values: Tensor
    indices: Tensor
    shape: Tuple[int, int]

    def __post_init__(self):
        n, k = _check_shape(self.shape)
        if k % GROUP:
            raise ValueError(f"shape={self.shape}: K={k} must be a multiple of {GROUP} for 2:4")
        want = (n, k // GROUP * KEPT)
        if not isinstance(self.values, Tensor) or tuple(self.values.shape) != want:
            raise ValueError(f"values must have shape {want}, got "
                             f"{tuple(self.values.shape) if isinstance(self.values, Tensor) else self.values!r}")
        if not isinstance(self.indices, Tensor) or self.indices.dtype != torch.uint8 \
                or tuple(self.indices.shape) != want:
            raise ValueError(f"indices must be uint8 with shape {want}")
        pairs = self.indices.view(n, k // GROUP, KEPT).long()
        if bool((pairs >= GROUP).any()):
            raise ValueError(f"indices must lie in [0, {GROUP})")
        if bool((pairs[..., 1] <= pairs[..., 0]).any()):
            raise ValueError("indices must be strictly ascending within each group")

    @property
    def dtype(self) -> torch.dtype:
        """The weight's dtype."""
        return self.values.dtype

    def to_dense(self) -> Tensor:
        """The dense ``[N, K]`` weight with zeros at the pruned positions."""
        n, k = self.shape
        dense = torch.zeros(n, k // GROUP, GROUP, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(-1, self.indices.view(n, k // GROUP, KEPT).long(), self.values.view(n, k // GROUP, KEPT))
        return dense.view(n, k)

    def __str__(self) -> str:
        n, k = self.shape
        return f"SemiStructuredWeight(2:4, shape={n}x{k}, dtype={str(self.values.dtype).replace('torch.', '')})"


def compress_2to4(w: Tensor, prune: str = "magnitude") -> SemiStructuredWeight:
    """Compress ``w`` ``[N, K]`` to 2:4 along K.

    * ``prune="magnitude"``: keep the 2 largest ``|w|`` of each group of 4; ties
      go to the lower index (a stable sort), so a group of equal magnitudes keeps
      positions 0 and 1.
    * ``prune="keep"``: ``w`` must already be 2:4 (at most 2 non-zeros per
      group); raises ``ValueError`` naming the first offending (row, group) in
      row-major order. Groups with fewer than 2 non-zeros store zeros at their
      lowest zero positions.

    Raises ``ValueError`` when ``K % 4 != 0``.
    """
    _check_prune(prune)
    _check_matrix(w)
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"2:4 needs K % {GROUP} == 0; the weight has shape {tuple(w.shape)}")
    with torch.no_grad():
        groups = w.detach().reshape(n, k // GROUP, GROUP)
        if prune == "keep":
            nonzero = (groups != 0).sum(-1)
            bad = (nonzero > KEPT).nonzero()
            if bad.numel():
                row, group = (int(x) for x in bad[0])
                raise ValueError(f"weight is not 2:4: row {row}, group {group} (columns {group * GROUP}.."
                                 f"{group * GROUP + GROUP - 1}) has {int(nonzero[row, group])} non-zeros")
        # For a valid 2:4 weight, magnitude order puts the non-zeros first, so both modes share it.
        order = torch.sort(groups.abs(), dim=-1, descending=True, stable=True).indices[..., :KEPT]
        order = order.sort(dim=-1).values
        values = torch.gather(groups, -1, order).reshape(n, k // GROUP * KEPT).clone()
        indices = order.to(torch.uint8).reshape(n, k // GROUP * KEPT).contiguous()
    return SemiStructuredWeight(values=values, indices=indices, shape=(n, k))


# --------------------------------------------------------------- blocks


@dataclass(frozen=True)
class BlockSparseWeight:
    """A block-sparse weight in BSR order: (bm x bk) blocks, block rows over N.

    * ``blocks`` ``[nnzb, bm, bk]``: the kept blocks, block row by block row.
    * ``row_ptr`` int32 ``[N // bm + 1]``: block row ``r`` owns ``blocks[row_ptr[r]:row_ptr[r + 1]]``.
    * ``col_idx`` int32 ``[nnzb]``: the block column of each block, ascending within a block row.
    * ``shape``: the dense ``(N, K)``; ``block``: ``(bm, bk)``, dividing N and K.
    """

    blocks: Tensor
    row_ptr: Tensor
    col_idx: Tensor
    shape: Tuple[int, int]
    block: Tuple[int, int]

    def __post_init__(self):
        n, k = _check_shape(self.shape)
        bm, bk = _check_shape(self.block, "block")
        if n % bm or k % bk:
            raise ValueError(f"block={self.block} must divide shape={self.shape}")
        n_rows, n_cols = n // bm, k // bk
        if not isinstance(self.blocks, Tensor) or self.blocks.dim() != 3 or tuple(self.blocks.shape[1:]) != (bm, bk):
            raise ValueError(f"blocks must have shape [nnzb, {bm}, {bk}]")
        nnzb = self.blocks.shape[0]
        if not isinstance(self.row_ptr, Tensor) or self.row_ptr.dtype != torch.int32 \
                or tuple(self.row_ptr.shape) != (n_rows + 1,):
            raise ValueError(f"row_ptr must be int32 with shape ({n_rows + 1},)")
        if not isinstance(self.col_idx, Tensor) or self.col_idx.dtype != torch.int32 \
                or tuple(self.col_idx.shape) != (nnzb,):
            raise ValueError(f"col_idx must be int32 with shape ({nnzb},)")
        ptr = self.row_ptr.long()
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnzb or bool((ptr[1:] < ptr[:-1]).any()):
            raise ValueError(f"row_ptr must rise from 0 to nnzb={nnzb}")
        cols = self.col_idx.long()
        if nnzb and (int(cols.min()) < 0 or int(cols.max()) >= n_cols):
            raise ValueError(f"col_idx must lie in [0, {n_cols})")
        # Within a block row the columns rise strictly; across a row boundary they may drop.
        row_of = self.block_rows().long()
        rising = (cols[1:] > cols[:-1]) | (row_of[1:] != row_of[:-1])
        if not bool(rising.all()):
            raise ValueError("col_idx must be strictly ascending within each block row")

    @property
    def n_blocks(self) -> int:
        """Number of blocks in the dense grid."""
        return (self.shape[0] // self.block[0]) * (self.shape[1] // self.block[1])

    @property
    def nnzb(self) -> int:
        """Number of stored blocks."""
        return self.blocks.shape[0]

    @property
    def density(self) -> float:
        """Stored blocks / all blocks."""
        return self.nnzb / self.n_blocks

    @property
    def dtype(self) -> torch.dtype:
        """The weight's dtype."""
        return self.blocks.dtype

    def block_rows(self) -> Tensor:
        """The block row of each stored block (int64 ``[nnzb]``), expanded from ``row_ptr``."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to_dense(self) -> Tensor:
        """The dense ``[N, K]`` weight with zeros outside the stored blocks."""
        n, k = self.shape
        bm, bk = self.block
        grid = torch.zeros(n // bm, k // bk, bm, bk, dtype=self.blocks.dtype, device=self.blocks.device)
        grid[self.block_rows(), self.col_idx.long()] = self.blocks
        return grid.permute(0, 2, 1, 3).reshape(n, k)

    def __str__(self) -> str:
        n, k = self.shape
        return (f"BlockSparseWeight(shape={n}x{k}, block={self.block[0]}x{self.block[1]}, "
                f"blocks={self.nnzb}/{self.n_blocks}, density={self.density:.3f}, "
                f"dtype={str(self.blocks.dtype).replace('torch.', '')})")


def _block_grid(w: Tensor, bm: int, bk: int) -> Tensor:
    """``w`` ``[N, K]`` viewed as ``[N // bm, K // bk, bm, bk]``."""
    n, k = w.shape
    return w.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)


def compress_block_weights(w: Tensor, form: BlockWeights) -> BlockSparseWeight:
    """Compress ``w`` ``[N, K]`` into (bm x bk) blocks per ``form``.

    * ``prune="magnitude"``: keep ``form.kept_blocks(n_blocks)`` blocks with the
      largest Frobenius norm over the whole matrix (norms in float64 so that the
      order does not depend on the weight's dtype rounding); ties go to the lower
      flat (row-major block) index.
    * ``prune="keep"``: keep exactly the blocks with a non-zero entry, whatever
      ``form.density`` says; every dropped block is then exactly zero, so the
      compression is lossless.

    Raises ``ValueError`` when bm does not divide N or bk does not divide K.
    """
    if not isinstance(form, BlockWeights):
        raise ValueError(f"form must be BlockWeights, got {type(form).__name__}")
    _check_matrix(w)
    n, k = w.shape
    bm, bk = form.block
    if n % bm or k % bk:
        raise ValueError(f"block {bm}x{bk} does not divide the weight shape {n}x{k}")
    with torch.no_grad():
        grid = _block_grid(w.detach(), bm, bk)
        return _blocks_kept(grid, _kept_block_mask(grid, form), (n, k))


def _kept_block_mask(grid: Tensor, form: BlockWeights) -> Tensor:
    """bool ``[N // bm, K // bk]``: the blocks ``form`` keeps of the block grid ``[N // bm, K // bk, bm, bk]``."""
    n_rows, n_cols = grid.shape[:2]
    if form.prune == "keep":
        return (grid != 0).flatten(2).any(-1)
    norms = grid.double().pow(2).sum((-1, -2)).flatten()
    n_keep = form.kept_blocks(norms.numel())
    # Stable descending sort: equal norms keep the lower flat index first.
    top = torch.sort(norms, descending=True, stable=True).indices[:n_keep]
    keep = torch.zeros(n_rows * n_cols, dtype=torch.bool, device=grid.device)
    keep[top] = True
    return keep.view(n_rows, n_cols)


def _blocks_kept(grid: Tensor, keep: Tensor, shape: Tuple[int, int]) -> BlockSparseWeight:
    """The BSR weight of ``shape`` holding the blocks of ``grid`` that ``keep`` marks (an all-zero one too)."""
    n_rows = grid.shape[0]
    rows, cols = keep.nonzero(as_tuple=True)  # row-major, so BSR order with ascending columns
    blocks = grid[rows, cols].contiguous().clone()
    counts = keep.sum(1, dtype=torch.int64)
    row_ptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=grid.device)
    row_ptr[1:] = counts.cumsum(0)
    return BlockSparseWeight(blocks=blocks, row_ptr=row_ptr.to(torch.int32), col_idx=cols.to(torch.int32),
                             shape=shape, block=tuple(grid.shape[2:]))


# ---------------------------------------------------------------- bindings of compiled graphs

@dataclass(eq=False)
class WeightBinding:
    """Tensors derived from one parameter (a compressed weight), fed to the compiled graph as extra inputs.

    The contract (docs/design.md, "Weights"): an update through the parameter
    itself (``p.copy_()``, ``p.mul_()`` under ``no_grad``, an optimizer step, a
    new Parameter object) bumps its version or changes its identity and is
    seen on the next call, which rebuilds the tensors in place. An update that
    bypasses the version counter (``p.data.mul_()``, a write through another
    view) is seen only with ``check_weights=True`` (a checksum of the weight on
    every call) or after ``sparsecc.refresh(model)``.
    """

    input_index: Optional[int]     # the parameter's position among the graph inputs (None: get_attr)
    param: torch.Tensor
    form: Any
    fields: Tuple[str, ...]
    tensors: List[torch.Tensor]
    version: int
    data_ptr: int
    qualname: str
    in_out: bool = False           # the parameter is stored [in, out] (Conv1D): compress its transpose
    fingerprint: Optional[torch.Tensor] = None   # checksum of the parameter, kept when check_weights is on

    def derive(self, param: torch.Tensor) -> List[torch.Tensor]:
        """The bound tensors for the parameter's current values."""
        fresh = compress(param.t() if self.in_out else param, self.form)
        return [getattr(fresh, f) for f in self.fields]

    def changed(self, param: torch.Tensor) -> bool:
        """True when the parameter is another object, was written through itself, or fails its checksum."""
        if param is not self.param or param._version != self.version or param.data_ptr() != self.data_ptr:
            return True
        return self.fingerprint is not None and not torch.equal(weight_fingerprint(param), self.fingerprint)

    def refresh(self, param: torch.Tensor, force: bool = False) -> None:
        """Rebuild the bound tensors in place when the parameter changed (or always, with ``force``)."""
        if not force and not self.changed(param):
            return
        new = self.derive(param)
        if any(a.shape != b.shape for a, b in zip(new, self.tensors)):
            # Under tensor parallelism the kept blocks are a global choice: an update can move some to another
            # rank, and this rank's share then has another size than the compiled graph's.
            moved = (" (tensor parallelism: the update moved kept blocks between ranks, so this rank's share "
                     "changed size)") if is_dtensor(param) else ""
            raise RuntimeError(
                f"sparsecc: weight {self.qualname} changed after compile and its derived form no longer "
                f"fits the compiled graph ({self.form or self.fields[0]}){moved}; recompile the model "
                "(torch._dynamo.reset()).")
        with torch.no_grad():
            for dst, src in zip(self.tensors, new):
                dst.copy_(src)
        self.param, self.version, self.data_ptr = param, param._version, param.data_ptr()
        if self.fingerprint is not None:
            self.fingerprint = weight_fingerprint(param)

    def watch(self) -> None:
        """Keep a checksum of the parameter, compared on every call (``check_weights=True``)."""
        self.fingerprint = weight_fingerprint(self.param)


class DerivedBinding(WeightBinding):
    """One tensor derived from one weight (column norms, a K-major copy), fed to the compiled graph like a
    compressed weight; ``refresh`` re-derives it (instead of compressing) when the parameter changed.
    ``derive_fn(param, in_out)`` makes it."""

    derive_fn = None

    def derive(self, param: torch.Tensor):
        """The derived tensor for the parameter's current values (no compression; a DTensor: its local shard)."""
        return [self.derive_fn(local_tensor(param), self.in_out)]


def weight_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A checksum of a weight's values: float64 sums of the values and of their magnitudes."""
    with torch.no_grad():
        w = weight.detach()
        return torch.stack([w.sum(dtype=torch.float64), w.abs().sum(dtype=torch.float64)])


# Every binding alive in this process, for sparsecc.refresh(model), with the order it was made in: a WeakSet
# iterates by address, which differs between processes, and tensor-parallel ranks must gather (``compress_shard``)
# in one order.
_live_bindings: "weakref.WeakKeyDictionary[WeightBinding, int]" = weakref.WeakKeyDictionary()
_binding_order = itertools.count()


def register_binding(binding: WeightBinding) -> None:
    """Make ``binding`` known to ``sparsecc.refresh``."""
    _live_bindings.setdefault(binding, next(_binding_order))


def live_bindings() -> List[WeightBinding]:
    """The weight bindings of every compiled graph still alive, in the order they were made."""
    return [b for b, _ in sorted(_live_bindings.items(), key=lambda item: item[1])]


def compress(weight: torch.Tensor, form):
    """Compress a weight [out, in] for a weight form (once, without autograd).

    A DTensor weight (tensor parallelism) gives the compressed form of this
    rank's shard, pruned with the unsharded semantics (``compress_shard``). A weight on the meta device is a
    ValueError (checks turn it into a dense fallback with the reason).
    """
    if weight.device.type == "meta":   # a model built before its weights were loaded
        raise ValueError("it is on the meta device (not loaded): there are no values to prune")
    if is_dtensor(weight):
        return compress_shard(weight, form)
    with torch.no_grad():
        w = weight.detach()
        if isinstance(form, TwoFour):
            return compress_2to4(w, form.prune)
        if isinstance(form, BlockWeights):
            return compress_block_weights(w, form)
    raise TypeError(f"not a weight form: {form}")


def compress_shard(weight, form):
    """Compress this rank's shard of a DTensor weight ``[out, in]`` with the unsharded semantics.

    docs/spec.md defines 2:4 groups and kept blocks on the whole weight (block_weights keeps the top blocks by
    norm over the whole matrix), so pruning each shard on its own would keep other blocks. The weight is
    gathered (``full_tensor()``, a collective: every rank compresses the same weights in the same order), pruned
    whole, and this rank's slice of the pruned weight is compressed, losslessly (``prune="keep"``). With
    ``prune="keep"`` the pattern is already in the weight and the shard is compressed as it is, without a
    gather. Raises ``ValueError`` when the shard boundaries cut 2:4 groups or weight blocks, or when the
    weight is not a single ``Shard`` on a 1-D mesh.
    """
    info = shard_of(weight)
    if not info.supported or info.partial:
        raise ValueError(f"the weight is placed {info.placements}; sparse weight forms support one Shard or "
                         "Replicate placement on a 1-D mesh")
    n, k = info.global_shape
    (row0, col0), (rows, cols) = info.offset, info.local_shape
    if isinstance(form, TwoFour):
        if (col0 % GROUP or cols % GROUP) and cols:
            raise ValueError(f"this rank's shard holds input columns {col0}..{col0 + cols - 1}, which cut the "
                             f"2:4 groups of {GROUP} (shard the input dimension in multiples of {GROUP})")
    elif isinstance(form, BlockWeights):
        bm, bk = form.block
        if n % bm or k % bk:
            raise ValueError(f"block {bm}x{bk} does not divide the weight shape {n}x{k}")
        if row0 % bm or rows % bm or col0 % bk or cols % bk:
            raise ValueError(f"this rank's shard [{row0}:{row0 + rows}, {col0}:{col0 + cols}] of the {n}x{k} "
                             f"weight does not align with the {bm}x{bk} blocks")
    else:
        raise TypeError(f"not a weight form: {form}")
    with torch.no_grad():
        if form.prune == "keep":
            return compress(weight.to_local().detach(), form)
        if isinstance(form, BlockWeights):
            # The kept blocks are chosen on the whole weight; this rank holds those in its slice, an all-zero kept
            # block included (re-deriving them from the slice's nonzero blocks would make its share depend on
            # values rather than on the global choice).
            bm, bk = form.block
            keep = _kept_block_mask(_block_grid(weight.detach().full_tensor(), bm, bk), form)
            mine = keep[row0 // bm:(row0 + rows) // bm, col0 // bk:(col0 + cols) // bk]
            return _blocks_kept(_block_grid(weight.to_local().detach(), bm, bk), mine, (rows, cols))
        pruned = compress(weight.detach().full_tensor(), form).to_dense()
        return compress(local_part(pruned, info), TwoFour(prune="keep"))
