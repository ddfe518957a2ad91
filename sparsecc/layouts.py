"""Block-sparse attention layouts: the :class:`BlockTable` container and its builders.

A :class:`BlockTable` is FlexAttention's ``BlockMask`` without the closures:
per (batch, head, query block) a count and the indices of the kept key blocks,
with *full* blocks (every element kept; no per-element mask needed) separated
from *partial* blocks (kept, but some elements still need the token-level mask:
causality and the sequence ends). Its metadata is O(S²/B²), never O(S²).

Coordinates
-----------
* Query blocks are over query **rows**: block ``a`` holds rows
  ``[a * block_q, (a + 1) * block_q)``. This is what FlexAttention does, so the
  table converts to and from a ``BlockMask`` without re-blocking.
* Key blocks are over key **positions**: block ``b`` holds keys
  ``[b * block_k, (b + 1) * block_k)``.
* When ``seq_q < seq_k`` the queries are the last ``seq_q`` positions: row ``i``
  has position ``p = i + seq_k - seq_q`` (bottom-right alignment), and causal
  attention keeps ``(i, j)`` iff ``j <= p``.
* Counts are ``nQ = ceil(seq_q / block_q)`` query blocks and
  ``nK = ceil(seq_k / block_k)`` key blocks; the last block of each may be cut
  short by the sequence end, which makes it partial.
* A table may start before the first query (*lead rows*): attention over
  ``Sq`` queries uses the table's **last** ``Sq`` rows, so query ``i`` is table
  row ``i + lead`` with ``lead = table.seq_q - Sq`` (``0 <= lead < block_q``,
  see :meth:`BlockTable.lead_rows`) and keeps its position ``i + seq_k - Sq``.
  Lead rows stand for positions before the queries and are never computed.
  :func:`block_sparse_table` uses them so that its query blocks are position
  blocks; every other builder makes tables without lead rows.

A kept block is **full** iff every (row, key) element inside the block grid cell
exists (is before both sequence ends) and is kept by causality when the table
is causal and by the layout's own element rule (for streaming tables); all other
kept blocks are **partial**. Blocks with no element allowed by causality are
never kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from sparsecc.forms import BlockSparse

# A window of this value means "no window limit" (a dense head); shared with
# sparsecc.codegen.block_attention so both sides read the same sentinel.
FULL_WINDOW = -1

# The random-block generator for head h is seeded with (seed * _HEAD_SEED_STRIDE + h) mod 2**64: distinct
# (seed, head) pairs with seed < 2**44 get distinct seeds for any model with fewer heads than this.
_HEAD_SEED_STRIDE = 1 << 20


def _fmt_shape(t: Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


@dataclass(frozen=True)
class BlockTable:
    """A block-sparse attention layout in the shape of FlexAttention's ``BlockMask``.

    Fields (``Bt``/``Ht`` are 1, meaning broadcast, or the batch/head count):

    * ``kv_num_blocks`` int32 ``[Bt, Ht, nQ]``: number of partial key blocks per query block.
    * ``kv_indices`` int32 ``[Bt, Ht, nQ, maxK]``: their key-block indices (the first
      ``kv_num_blocks`` entries of each row count; the rest is padding).
    * ``full_kv_num_blocks`` / ``full_kv_indices``: the same for full blocks.
    * ``block_q``, ``block_k``: block sizes in rows / key positions.
    * ``seq_q``, ``seq_k``: sequence lengths; ``causal``: apply bottom-right causality.

    See the module docstring for the coordinate conventions. The constructor checks the counts and indices, and
    that no block is both partial and full, and refuses a full block whose keys pass ``seq_k`` or, causal, come
    after its block's first query position (kernels read full blocks without those tests).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    causal: bool

    def __post_init__(self):
        for name in ("block_q", "block_k", "seq_q", "seq_k"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= 1")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} is not allowed; expected a bool")
        n_q, n_k = self.num_q_blocks, self.num_k_blocks
        lead = None
        for prefix in ("", "full_"):
            num_name, idx_name = f"{prefix}kv_num_blocks", f"{prefix}kv_indices"
            num, idx = getattr(self, num_name), getattr(self, idx_name)
            for name, t, ndim in ((num_name, num, 3), (idx_name, idx, 4)):
                if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
                    got = f"{t.dtype} with {t.dim()} dims" if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name} must be an int32 tensor with {ndim} dims, got {got}")
            if num.shape[2] != n_q:
                raise ValueError(f"{num_name} has {num.shape[2]} query blocks; expected "
                                 f"ceil(seq_q / block_q) = {n_q}")
            if idx.shape[:3] != num.shape:
                raise ValueError(f"{idx_name} shape {tuple(idx.shape)} does not start with "
                                 f"{num_name} shape {tuple(num.shape)}")
            if lead is None:
                lead = num.shape
            elif num.shape != lead:
                raise ValueError(f"{num_name} shape {tuple(num.shape)} differs from "
                                 f"kv_num_blocks shape {tuple(lead)}")
            if num.numel() and (int(num.min()) < 0 or int(num.max()) > min(n_k, idx.shape[3])):
                raise ValueError(f"{num_name} must lie in [0, min(nK={n_k}, {idx_name}.shape[-1]="
                                 f"{idx.shape[3]})], got [{int(num.min())}, {int(num.max())}]")
            counted = torch.arange(idx.shape[3], device=idx.device) < num.unsqueeze(-1)
            bad = counted & ((idx < 0) | (idx >= n_k))
            if bool(bad.any()):
                where = tuple(int(x) for x in bad.nonzero()[0])
                raise ValueError(f"{idx_name}{list(where)}={int(idx[where])} is out of range [0, {n_k})")
            dense = self._scatter_dense(num, idx)
            if int(dense.sum()) != int(num.sum()):
                raise ValueError(f"{idx_name} repeats a key block within a query block")
        full = self._scatter_dense(self.full_kv_num_blocks, self.full_kv_indices)
        if bool((self._scatter_dense(self.kv_num_blocks, self.kv_indices) & full).any()):
            raise ValueError("kv_indices and full_kv_indices name the same block (a block is full or partial)")
        # Kernels read a full block's keys with no bound or causal test: one past the sequence end, or after a
        # query of its block, would be read out of bounds or attended although masked.
        bad = full & ~_keys_full(self.seq_q, self.seq_k, self.block_q, self.block_k, self.causal).to(full.device)
        if bool(bad.any()):
            where = tuple(int(x) for x in bad.nonzero()[0])
            raise ValueError(f"full_kv_indices marks key block {where[3]} of query block {where[2]} (batch "
                             f"{where[0]}, head {where[1]}) full, but it holds keys past seq_k={self.seq_k}"
                             + (" or after the block's first query position" if self.causal else "")
                             + ": list it in kv_indices (partial) instead")

    # ----------------------------------------------------------------- sizes

    @property
    def num_q_blocks(self) -> int:
        """``nQ = ceil(seq_q / block_q)``."""
        return -(-self.seq_q // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        """``nK = ceil(seq_k / block_k)``."""
        return -(-self.seq_k // self.block_k)

    @property
    def q_offset(self) -> int:
        """Position of table row 0: ``seq_k - seq_q`` (queries are the last positions)."""
        return self.seq_k - self.seq_q

    def lead_rows(self, seq_q: int, seq_k: int) -> int:
        """Table rows before the first of ``seq_q`` queries over ``seq_k`` keys (query i is table row i + lead).

        Raises ``ValueError`` when the table is not for these inputs: a different
        ``seq_k``, fewer rows than queries, or a whole query block or more of lead rows.
        """
        lead = self.seq_q - seq_q
        if self.seq_k != seq_k or not 0 <= lead < self.block_q:
            raise ValueError(f"table is for seq_q={self.seq_q}, seq_k={self.seq_k}; inputs have Sq={seq_q}, "
                             f"Sk={seq_k} (expected seq_k == Sk and Sq <= seq_q < Sq + block_q={self.block_q})")
        return lead

    # ------------------------------------------------------------ dense views

    def _scatter_dense(self, num: Tensor, idx: Tensor) -> Tensor:
        return _listed_blocks(num, idx, self.num_k_blocks)

    def to_dense_block_mask(self, full_only: bool = False, partial_only: bool = False) -> Tensor:
        """Kept blocks as a bool tensor ``[Bt, Ht, nQ, nK]`` (for tests and small sizes).

        ``full_only`` / ``partial_only`` restrict it to one kind of block.
        """
        if full_only and partial_only:
            raise ValueError("full_only and partial_only exclude each other")
        full = self._scatter_dense(self.full_kv_num_blocks, self.full_kv_indices)
        partial = self._scatter_dense(self.kv_num_blocks, self.kv_indices)
        if full_only:
            return full
        if partial_only:
            return partial
        return full | partial

    def dense_block_rows(self, q_block_start: int, q_block_end: int) -> Tensor:
        """Kept blocks of query blocks ``[q_block_start, q_block_end)`` as bool ``[Bt, Ht, n, nK]``."""
        sl = slice(q_block_start, q_block_end)
        return (self._scatter_dense(self.kv_num_blocks[:, :, sl], self.kv_indices[:, :, sl])
                | self._scatter_dense(self.full_kv_num_blocks[:, :, sl], self.full_kv_indices[:, :, sl]))

    def allowed_blocks(self) -> Tensor:
        """Bool ``[nQ, nK]``: blocks with at least one element allowed by causality (all blocks if not causal)."""
        first_row = torch.arange(self.num_q_blocks) * self.block_q
        last_row = torch.clamp(first_row + self.block_q, max=self.seq_q) - 1
        first_key = torch.arange(self.num_k_blocks) * self.block_k
        if not self.causal:
            return torch.ones(self.num_q_blocks, self.num_k_blocks, dtype=torch.bool)
        return first_key[None, :] <= (last_row + self.q_offset)[:, None]

    def density(self) -> float:
        """Kept blocks / all blocks, summed over the table's batch and heads.

        When causal, "all blocks" counts only blocks with at least one causally
        allowed element, so a dense causal table has density 1.
        """
        allowed = self.allowed_blocks().to(self.kv_num_blocks.device)
        kept = self.to_dense_block_mask() & allowed
        total = int(allowed.sum()) * self.kv_num_blocks.shape[0] * self.kv_num_blocks.shape[1]
        return float(kept.sum()) / total if total else 0.0

    def __str__(self) -> str:
        bt, ht, n_q = self.kv_num_blocks.shape
        n_full = int(self.full_kv_num_blocks.sum())
        n_partial = int(self.kv_num_blocks.sum())
        return (f"BlockTable(batch={bt}, heads={ht}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
                f"block={self.block_q}x{self.block_k}, blocks={n_q}x{self.num_k_blocks}, "
                f"causal={self.causal}, kept={n_full + n_partial} ({n_full} full, {n_partial} partial), "
                f"density={self.density():.3f})")

    # ------------------------------------------------------------------ Flex

    def flex_mask_mod(self) -> Callable:
        """The per-element rule for partial blocks: in range, and bottom-right causal when causal."""
        seq_q, seq_k, offset, causal = self.seq_q, self.seq_k, self.q_offset, self.causal

        def mask_mod(b, h, q_idx, kv_idx):
            keep = (q_idx < seq_q) & (kv_idx < seq_k)
            if causal:
                keep = keep & (kv_idx <= q_idx + offset)
            return keep

        return mask_mod

    def to_flex_block_mask(self, extra_mask_mod: Optional[Callable] = None):
        """Convert to ``torch.nn.attention.flex_attention.BlockMask``.

        The mask_mod is :meth:`flex_mask_mod` (in range, causal), and-ed with
        ``extra_mask_mod`` when given: a layout whose partial blocks need more than
        causality (a streaming table) passes its element rule here, e.g.
        :func:`streaming_mask_mod`. Index rows are padded to ``nK`` entries because
        Flex sizes its dense view by the index width. Flex has no lead rows: the
        mask is for ``seq_q`` queries, so a table with lead rows needs that many
        rows put in front of q (and their outputs dropped).
        """
        from torch.nn.attention.flex_attention import BlockMask, and_masks

        n_k = self.num_k_blocks

        def pad(idx: Tensor) -> Tensor:
            width = idx.shape[-1]
            if width >= n_k:
                return idx[..., :n_k].contiguous()
            return torch.nn.functional.pad(idx, (0, n_k - width)).contiguous()

        mask_mod = self.flex_mask_mod()
        if extra_mask_mod is not None:
            mask_mod = and_masks(mask_mod, extra_mask_mod)
        return BlockMask.from_kv_blocks(
            self.kv_num_blocks.contiguous(), pad(self.kv_indices),
            self.full_kv_num_blocks.contiguous(), pad(self.full_kv_indices),
            BLOCK_SIZE=(self.block_q, self.block_k), mask_mod=mask_mod,
            seq_lengths=(self.seq_q, self.seq_k))

    @staticmethod
    def from_flex_block_mask(bm, seq_q: int, seq_k: int, causal: bool) -> "BlockTable":
        """Build a table from a Flex ``BlockMask``; its full/partial split is taken as given, except that a block
        Flex marks full but whose keys pass ``seq_k`` (Flex bounds the sequence elsewhere) or, causal, a query of
        its block, is kept as partial."""
        block_q, block_k = (int(s) for s in bm.BLOCK_SIZE)
        num = bm.kv_num_blocks.to(torch.int32).clone()
        idx = bm.kv_indices.to(torch.int32).clone()
        if bm.full_kv_num_blocks is None:
            full_num = torch.zeros_like(num)
            full_idx = torch.zeros_like(idx)
        else:
            full_num = bm.full_kv_num_blocks.to(torch.int32).clone()
            full_idx = bm.full_kv_indices.to(torch.int32).clone()
        # Flex may pad the grid beyond ceil(seq / block); the extra blocks are empty.
        n_q = -(-seq_q // block_q)
        num, idx, full_num, full_idx = num[:, :, :n_q], idx[:, :, :n_q], full_num[:, :, :n_q], full_idx[:, :, :n_q]
        n_k = -(-seq_k // block_k)
        full = _listed_blocks(full_num, full_idx, n_k)
        kept = _listed_blocks(num, idx, n_k) | full
        full = full & _keys_full(seq_q, seq_k, block_q, block_k, causal).to(full.device)
        return BlockTable.from_dense(kept, full, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
                                     causal=causal)

    # ----------------------------------------------------------- construction

    @staticmethod
    def from_dense(kept: Tensor, full: Tensor, *, block_q: int, block_k: int, seq_q: int, seq_k: int,
                   causal: bool) -> "BlockTable":
        """Build a table from bool block masks ``kept`` and ``full`` ``[Bt, Ht, nQ, nK]``.

        ``full`` must be a subset of ``kept``; blocks in ``kept`` but not ``full`` are partial.
        Indices are stored ascending, padded to the largest count.
        """
        if kept.shape != full.shape or kept.dim() != 4:
            raise ValueError(f"kept {tuple(kept.shape)} and full {tuple(full.shape)} must be equal 4-d shapes")
        if bool((full & ~kept).any()):
            raise ValueError("full names a block that is not kept")
        partial = kept & ~full
        num_p, idx_p = _ordered(partial)
        num_f, idx_f = _ordered(full)
        return BlockTable(num_p, idx_p, num_f, idx_f, block_q=block_q, block_k=block_k,
                          seq_q=seq_q, seq_k=seq_k, causal=causal)


def _listed_blocks(num: Tensor, idx: Tensor, n_k: int) -> Tensor:
    """Bool ``[..., nK]``: the key blocks the first ``num`` entries of ``idx`` name (indices at ``nK`` or past it
    are dropped)."""
    counted = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    # Padding entries go to an extra column that is cut off afterwards.
    target = torch.where(counted, idx.long().clamp(0, n_k), torch.full_like(idx, n_k, dtype=torch.long))
    dense = torch.zeros(*num.shape, n_k + 1, dtype=torch.int32, device=idx.device)
    dense.scatter_add_(-1, target, counted.to(torch.int32))
    return dense[..., :n_k].bool()


def _ordered(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Counts and ascending indices of the True entries of ``mask`` along its last dim."""
    num = mask.sum(-1, dtype=torch.int32)
    width = max(1, int(num.max())) if num.numel() else 1
    # A stable descending sort on the 0/1 mask lists kept columns first, in ascending order.
    order = torch.sort(mask.to(torch.int8), dim=-1, descending=True, stable=True).indices
    idx = order[..., :width].to(torch.int32)
    idx = torch.where(torch.arange(width, device=mask.device) < num.unsqueeze(-1), idx, torch.zeros_like(idx))
    return num.contiguous(), idx.contiguous()


def _block_bounds(seq: int, block: int, n: int, offset: int = 0) -> tuple[Tensor, Tensor]:
    """First and last position of each of ``n`` blocks (last clipped at the sequence end)."""
    first = torch.arange(n, dtype=torch.long) * block
    last = torch.clamp(first + block, max=seq) - 1
    return first + offset, last + offset


def _keys_full(seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool) -> Tensor:
    """Bool ``[nQ, nK]``: blocks whose keys all exist and, when causal, all sit at or before the block's first
    query position. The least a block marked full must satisfy (rows past ``seq_q`` are never stored)."""
    n_q, n_k = -(-seq_q // block_q), -(-seq_k // block_k)
    q_first = torch.arange(n_q) * block_q
    k_first = torch.arange(n_k) * block_k
    ok = (k_first + block_k <= seq_k)[None, :].expand(n_q, n_k)
    if causal:
        ok = ok & ((k_first + block_k - 1)[None, :] <= (q_first + seq_k - seq_q)[:, None])
    return ok


def _token_full(seq_q: int, seq_k: int, block_q: int, block_k: int, causal: bool) -> Tensor:
    """Bool ``[nQ, nK]``: blocks whose every grid element exists and is causally allowed."""
    n_q = -(-seq_q // block_q)
    rows_inside = (torch.arange(n_q) * block_q + block_q <= seq_q)[:, None]
    return rows_inside & _keys_full(seq_q, seq_k, block_q, block_k, causal)


def block_sparse_table(form: BlockSparse, n_heads: int, seq_q: int, seq_k: int, causal: bool,
                       device: Union[str, torch.device] = "cpu", head_offset: int = 0,
                       causal_draws: Optional[bool] = None) -> BlockTable:
    """The :class:`BlockTable` of ``form`` for ``n_heads`` heads (``Bt = 1``, ``Ht = n_heads``).

    Row ``i`` of the table is the model's head ``h = head_offset + i``: a tensor-parallel rank
    holds heads ``head_offset ..`` of the model and draws their random blocks, not head 0's.

    ``block_q = block_k = form.block``. The query blocks are *position* blocks,
    as in docs/spec.md: query row ``i`` (position ``p = i + seq_k - seq_q``)
    belongs to block ``p // block``. When ``(seq_k - seq_q) % block != 0`` the
    table therefore starts with ``lead = (seq_k - seq_q) % block`` lead rows
    (``table.seq_q = seq_q + lead``, see the module docstring), so that its
    row-block ``a`` is position block ``c(a) = a + (seq_k - seq_q) // block``
    (floor division; ``c(a) = a`` when ``seq_q == seq_k``). Row-block ``a``
    keeps key block ``b`` iff

    * ``|c(a) - b| < local_blocks``, or
    * ``c(a) < global_blocks`` or ``b < global_blocks``, or
    * ``b`` is among the random blocks drawn for ``(h, c(a))``,

    and, when ``causal``, ``b`` holds at least one key at or before the row
    block's last position (blocks with nothing causally allowed are dropped).

    Random draws, exactly: for head ``h`` a CPU ``torch.Generator`` is seeded with
    ``(form.seed * 2**20 + h) mod 2**64``; then for each position block ``c = 0, 1, ..., nK - 1``
    in order, the candidates are key blocks ``0..c`` when the draws are causal and ``0..nK-1``
    otherwise, and the first ``min(random_blocks, n_candidates)`` entries of
    ``torch.randperm(n_candidates, generator=g)`` are drawn. Drawing for every
    position block in a fixed order makes causal draws independent of
    ``seq_q`` and ``seq_k`` (a decode step sees the same blocks as the prefill).
    The draws are causal when ``causal`` unless ``causal_draws`` says otherwise:
    a call that is not causal but whose mask keeps no key after any row's
    position draws as a causal one does (docs/spec.md).
    Random blocks may coincide with local or global ones.
    """
    if not (isinstance(n_heads, int) and n_heads >= 1):
        raise ValueError(f"n_heads={n_heads!r} is not allowed; expected an integer >= 1")
    if not (isinstance(head_offset, int) and head_offset >= 0):
        raise ValueError(f"head_offset={head_offset!r} is not allowed; expected an integer >= 0")
    for name, value in (("seq_q", seq_q), ("seq_k", seq_k)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= 1")
    block = form.block
    offset = seq_k - seq_q
    # Lead rows align the table's row blocks with position blocks (Python's % and // floor, also for Sq > Sk).
    rows = seq_q + offset % block
    n_q, n_k = -(-rows // block), -(-seq_k // block)
    c = torch.arange(n_q) + offset // block
    b = torch.arange(n_k)
    base = ((c[:, None] - b[None, :]).abs() < form.local_blocks)
    base |= (c[:, None] < form.global_blocks) | (b[None, :] < form.global_blocks)
    kept = base.expand(n_heads, n_q, n_k).clone()
    draws_causal = causal if causal_draws is None else causal_draws
    if form.random_blocks > 0:
        for h in range(n_heads):
            g = torch.Generator().manual_seed(_generator_seed(form.seed, head_offset + h))
            drawn = torch.zeros(n_k, n_k, dtype=torch.bool)
            for pos_block in range(n_k):
                n_cand = pos_block + 1 if draws_causal else n_k
                pick = torch.randperm(n_cand, generator=g)[:min(form.random_blocks, n_cand)]
                drawn[pos_block, pick] = True
            valid = (c >= 0) & (c < n_k)
            kept[h] |= drawn[c.clamp(0, n_k - 1)] & valid[:, None]
    _, q_last = _block_bounds(rows, block, n_q, seq_k - rows)
    if causal:
        kept &= (b * block)[None, None, :] <= q_last[None, :, None]
    full = kept & _token_full(rows, seq_k, block, block, causal)[None]
    return BlockTable.from_dense(kept[None].to(device), full[None].to(device), block_q=block, block_k=block,
                                 seq_q=rows, seq_k=seq_k, causal=causal)


def _generator_seed(seed: int, head: int) -> int:
    """The random-block generator seed of ``head``: ``(seed * 2**20 + head) mod 2**64``.

    ``torch.Generator.manual_seed`` takes 64 bits; the reduction keeps every seed the
    spec allows (up to ``2**63 - 1``) usable, and leaves seeds below ``2**44`` as they were.
    """
    return (seed * _HEAD_SEED_STRIDE + head) % (1 << 64)


def _per_head(values: Union[int, Sequence[int]], name: str) -> list[int]:
    if isinstance(values, int):
        return [values]
    out = [int(v) for v in values]
    if not out:
        raise ValueError(f"{name} must name at least one head")
    return out


def streaming_block_table(sink: Union[int, Sequence[int]], window: Union[int, Sequence[int]], *, block: int,
                          seq_q: int, seq_k: int, causal: bool, block_k: Optional[int] = None,
                          device: Union[str, torch.device] = "cpu") -> BlockTable:
    """The :class:`BlockTable` of a streaming (sink + window) layout.

    ``sink``/``window`` are ints or per-head sequences (a sequence of length H
    gives ``Ht = H``; ints give ``Ht = 1``); a window of :data:`FULL_WINDOW`
    means no window limit. The element rule is the one in ``sparsecc.forms``
    (``Streaming``) with query position ``p = i + seq_k - seq_q``. A block is
    kept iff one of its elements is kept and full iff all of its grid elements
    exist and are kept; blocks cut by the sink/window band are partial, and so
    need the streaming rule (not just causality) per element: a kernel using
    this table must evaluate that rule on partial blocks.
    """
    block_k = block if block_k is None else block_k
    sinks, windows = _per_head(sink, "sink"), _per_head(window, "window")
    if len(sinks) != len(windows) and 1 not in (len(sinks), len(windows)):
        raise ValueError(f"sink has {len(sinks)} heads and window has {len(windows)}; expected equal or 1")
    n_heads = max(len(sinks), len(windows))
    sinks = sinks * n_heads if len(sinks) == 1 else sinks
    windows = windows * n_heads if len(windows) == 1 else windows
    for s, w in zip(sinks, windows):
        if s < 0:
            raise ValueError(f"sink={s} is not allowed; expected an integer >= 0")
        if w < 1 and w != FULL_WINDOW:
            raise ValueError(f"window={w} is not allowed; expected an integer >= 1 or FULL_WINDOW ({FULL_WINDOW})")
    n_q, n_k = -(-seq_q // block), -(-seq_k // block_k)
    p0, p1 = (t[:, None] for t in _block_bounds(seq_q, block, n_q, seq_k - seq_q))
    j0, j1 = (t[None, :] for t in _block_bounds(seq_k, block_k, n_k))
    grid_full = ((torch.arange(n_q) * block + block <= seq_q)[:, None]
                 & (torch.arange(n_k) * block_k + block_k <= seq_k)[None, :])
    kept_heads, full_heads = [], []
    for s, w in zip(sinks, windows):
        win = math.inf if w == FULL_WINDOW else w
        any_kept, all_kept = _streaming_block_rule(p0, p1, j0, j1, s, win, causal)
        kept_heads.append(any_kept)
        full_heads.append(any_kept & all_kept & grid_full)
    kept = torch.stack(kept_heads)[None].to(device)
    full = torch.stack(full_heads)[None].to(device)
    return BlockTable.from_dense(kept, full, block_q=block, block_k=block_k, seq_q=seq_q, seq_k=seq_k,
                                 causal=causal)


def streaming_mask_mod(sink: Union[int, Sequence[int]], window: Union[int, Sequence[int]], *, seq_q: int,
                       seq_k: int, causal: bool, device: Union[str, torch.device] = "cpu") -> Callable:
    """A Flex ``mask_mod`` for the streaming element rule (per-head lists index by the head argument).

    Pass it as ``extra_mask_mod`` to :meth:`BlockTable.to_flex_block_mask` for a
    table from :func:`streaming_block_table`.
    """
    sinks = torch.tensor(_per_head(sink, "sink"), device=device)
    windows = torch.tensor(_per_head(window, "window"), device=device)
    # An unlimited window becomes one longer than any distance in the sequence.
    windows = torch.where(windows == FULL_WINDOW, seq_q + seq_k + 1, windows)
    offset = seq_k - seq_q

    def mask_mod(b, h, q_idx, kv_idx):
        s = sinks[h] if sinks.numel() > 1 else sinks[0]
        w = windows[h] if windows.numel() > 1 else windows[0]
        p = q_idx + offset
        if causal:
            return (kv_idx <= p) & ((kv_idx < s) | (p - kv_idx < w))
        return (kv_idx < s) | (p < s) | ((p - kv_idx).abs() < w)

    return mask_mod


def _streaming_block_rule(p0: Tensor, p1: Tensor, j0: Tensor, j1: Tensor, sink: int, window: float,
                          causal: bool) -> tuple[Tensor, Tensor]:
    """For boxes of positions ``[p0, p1] x [j0, j1]``: does any / every element pass the streaming rule?

    Works on interval bounds only (O(blocks), no per-element work): over a box
    of integers the difference ``p - j`` takes every value in
    ``[p0 - j1, p1 - j0]``.
    """
    if causal:
        # Sink part: some j < sink with j <= p; window part: some 0 <= p - j < window.
        any_sink = (j0 < sink) & (j0 <= p1)
        any_window = (p1 - j0 >= 0) & (p0 - j1 <= window - 1)
        any_kept = any_sink | any_window
        # Every element: all keys causal, and every non-sink key within the window of every row.
        causal_all = j1 <= p0
        non_sink_low = torch.clamp(j0, min=sink)
        window_all = (j1 < sink) | (p1 - non_sink_low < window)
        return any_kept, causal_all & window_all
    any_kept = (j0 < sink) | (p0 < sink) | ((p0 - j1 < window) & (p1 - j0 > -window))
    # A dropped element needs j >= sink, p >= sink and |p - j| >= window inside the box.
    pl, jl = torch.clamp(p0, min=sink), torch.clamp(j0, min=sink)
    sub_box = (pl <= p1) & (jl <= j1)
    far = (p1 - jl >= window) | (pl - j1 <= -window)
    return any_kept, ~(sub_box & far)


# The converter is also reachable as a module function, for callers that hold no BlockTable yet.
from_flex_block_mask = BlockTable.from_flex_block_mask
