"""Attention sites whose heads run different forms: the per-head table and its one-launch kernels.

A mixed site computes, for each head, exactly what the site would compute if
every head had that head's form (docs/spec.md, "Heads with different forms").
:class:`HeadTable` holds one form per query head (``None`` for a dense head)
and travels through the op as flat per-head lists (:meth:`HeadTable.op_args`).

Two families run in one kernel launch over the table:

* **vertical_slash family** (vertical_slash heads with any budgets, streaming
  and dense heads; causal attention): the vertical_slash attention kernel walks
  each vertical_slash head's index (built once for all such heads, with
  per-head budgets) and each streaming or dense head's sink and window ranges,
  computed in the kernel, with the streaming element rule per head
  (:func:`vertical_slash_family`).
* **block family** (block_sparse heads with any layouts of one block size,
  streaming and dense heads): the prefill kernel reads block_sparse heads'
  key blocks from one stacked table and keeps streaming heads' analytic
  bounds (:func:`block_family`).

Everything else (other mixes, masks that move query positions, non-causal
vertical_slash heads) runs head group by head group through each form's own
op (``sparsecc.codegen.ops.mixed_head_attention``), which is also the
reference these kernels are tested against.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sparsecc.forms import BlockSparse, Dense, Streaming, VerticalSlash

__all__ = ["HeadTable", "MIXABLE_FORMS", "KIND_DENSE", "KIND_STREAMING", "KIND_VERTICAL_SLASH", "KIND_BLOCK_SPARSE",
           "mixed_block_table", "vertical_slash_family", "block_family"]

KIND_DENSE, KIND_STREAMING, KIND_VERTICAL_SLASH, KIND_BLOCK_SPARSE = 0, 1, 2, 3
_KIND_OF = {Streaming: KIND_STREAMING, VerticalSlash: KIND_VERTICAL_SLASH, BlockSparse: KIND_BLOCK_SPARSE}
# The sparse forms a site's heads may mix (block_topk heads need the whole site).
MIXABLE_FORMS = tuple(_KIND_OF)
# The op's per-head integer lists, in order (HeadTable.op_args / from_op_args).
_FIELDS = ("kinds", "sink", "window", "vertical", "slash", "local_blocks", "global_blocks", "random_blocks", "seed")


@dataclass(frozen=True)
class HeadTable:
    """One form per query head (``None``: dense), with the parameters the heads share.

    ``block`` is the block size of every vertical_slash and block_sparse head
    and ``last_q`` that of every vertical_slash head (a site whose heads differ
    in them is not a table; the attention pass says so).
    """

    forms: Tuple[Optional[object], ...]
    block: int = 64
    last_q: int = 64
    head_offset: int = 0   # the model's index of head 0 (tensor parallelism; random blocks are drawn per model head)

    @staticmethod
    def of(forms: Sequence[Optional[object]]) -> "HeadTable":
        """The table of per-head forms; raises ``ValueError`` naming what the heads do not share."""
        forms = tuple(None if f is None or isinstance(f, Dense) else f for f in forms)
        for f in forms:
            if f is not None and type(f) not in _KIND_OF:
                raise ValueError(f"{f.name} heads cannot be mixed with other forms in one site")
        blocks = sorted({f.block for f in forms if isinstance(f, (VerticalSlash, BlockSparse))})
        last_qs = sorted({f.last_q for f in forms if isinstance(f, VerticalSlash)})
        if len(blocks) > 1:
            raise ValueError(f"heads of one site use blocks {blocks}; a mixed site needs one block size")
        if len(last_qs) > 1:
            raise ValueError(f"vertical_slash heads of one site use last_q {last_qs}; a mixed site needs one")
        return HeadTable(forms, blocks[0] if blocks else 64, last_qs[0] if last_qs else 64)

    @property
    def kinds(self) -> Tuple[int, ...]:
        return tuple(KIND_DENSE if f is None else _KIND_OF[type(f)] for f in self.forms)

    def groups(self) -> Dict[object, List[int]]:
        """Heads per distinct form (``None`` for the dense heads), in head order of first appearance."""
        out: Dict[object, List[int]] = {}
        for h, f in enumerate(self.forms):
            out.setdefault(f, []).append(h)
        return out

    def op_args(self) -> tuple:
        """Flat arguments for the op: nine per-head int lists (see ``_FIELDS``), then ``block``, ``last_q``."""
        cols = {name: [] for name in _FIELDS}
        for kind, f in zip(self.kinds, self.forms):
            cols["kinds"].append(kind)
            cols["sink"].append(f.sink if kind == KIND_STREAMING else 0)
            cols["window"].append(f.window if kind == KIND_STREAMING else 0)
            cols["vertical"].append(f.vertical if kind == KIND_VERTICAL_SLASH else 0)
            cols["slash"].append(f.slash if kind == KIND_VERTICAL_SLASH else 0)
            bs = kind == KIND_BLOCK_SPARSE
            cols["local_blocks"].append(f.local_blocks if bs else 0)
            cols["global_blocks"].append(f.global_blocks if bs else 0)
            cols["random_blocks"].append(f.random_blocks if bs else 0)
            cols["seed"].append(f.seed if bs else 0)
        return (*(cols[name] for name in _FIELDS), self.block, self.last_q)

    @staticmethod
    def from_op_args(kinds, sink, window, vertical, slash, local_blocks, global_blocks, random_blocks, seed,
                     block: int, last_q: int, head_offset: int = 0) -> "HeadTable":
        """The inverse of :meth:`op_args` (``head_offset`` travels as its own op argument)."""
        forms = []
        for h, kind in enumerate(kinds):
            if kind == KIND_DENSE:
                forms.append(None)
            elif kind == KIND_STREAMING:
                forms.append(Streaming(sink[h], window[h]))
            elif kind == KIND_VERTICAL_SLASH:
                forms.append(VerticalSlash(last_q=last_q, vertical=vertical[h], slash=slash[h], block=block))
            elif kind == KIND_BLOCK_SPARSE:
                forms.append(BlockSparse(block, local_blocks[h], global_blocks[h], random_blocks[h], seed[h]))
            else:
                raise ValueError(f"head {h}: kind {kind} is not one of 0 (dense), 1 (streaming), "
                                 "2 (vertical_slash), 3 (block_sparse)")
        return HeadTable(tuple(forms), block, last_q, head_offset)

    def family(self) -> Optional[str]:
        """``"vertical_slash"`` or ``"block"`` when one launch can run the table, else None."""
        kinds = set(self.kinds)
        if KIND_VERTICAL_SLASH in kinds and KIND_BLOCK_SPARSE not in kinds:
            return "vertical_slash"
        if KIND_BLOCK_SPARSE in kinds and KIND_VERTICAL_SLASH not in kinds:
            return "block"
        return None

    def launch_family(self, causal: bool) -> Optional[str]:
        """The family whose one launch runs the table on a call of this causality, or None (the heads then run
        group by group): the vertical_slash family takes causal calls, the block family table blocks of at least
        ``MIN_TABLE_BLOCK``. The kernel also checks the inputs (dtypes, head dims); the compiler's plan asks this
        for its report."""
        from sparsecc.codegen.block_attention import MIN_TABLE_BLOCK

        family = self.family()
        if family == "vertical_slash" and not causal:
            return None
        if family == "block" and self.block < MIN_TABLE_BLOCK:
            return None
        return family


def _unlimited(seq_q: int, seq_k: int) -> int:
    """A window longer than any query-key distance (the kernels' encoding of "no window limit")."""
    return seq_q + seq_k + 1


def _analytic_rules(table: HeadTable, seq_q: int, seq_k: int) -> Tuple[List[int], List[int]]:
    """Per-head (sink, window) of the kernels' element rule: streaming heads their own, every other head
    (dense, or one whose keys come from an index or a table) sink 0 and an unlimited window."""
    big = _unlimited(seq_q, seq_k)
    sinks, windows = [], []
    for f in table.forms:
        if isinstance(f, Streaming):
            sinks.append(min(f.sink, seq_k))
            windows.append(min(f.window, big))
        else:
            sinks.append(0)
            windows.append(big)
    return sinks, windows


@functools.lru_cache(maxsize=64)
def _head_vectors(values: tuple, device: torch.device) -> Tensor:
    """An int32 device vector, cached: a host-to-device copy per call would stall launches."""
    return torch.tensor(values, dtype=torch.int32, device=device)


# ---------------------------------------------------------------- vertical_slash family

def vertical_slash_table_index(q: Tensor, k: Tensor, table: HeadTable, scale: float):
    """The ``VSIndex`` of every head with its own budgets (heads of other forms get the first vertical_slash
    head's budgets; the kernel ignores their lanes)."""
    from sparsecc.codegen.vertical_slash import head_budgets, vertical_slash_index

    form = next(f for f in table.forms if isinstance(f, VerticalSlash))
    budgets = head_budgets([f if isinstance(f, VerticalSlash) else form for f in table.forms], k.shape[2])
    return vertical_slash_index(q, k, form, scale, per_head=budgets)


def vertical_slash_family(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                          table: HeadTable) -> Tensor:
    """Causal attention of a vertical_slash / streaming / dense table in one attention launch (fp16/bf16).

    Selection runs once for all heads with each vertical_slash head's own
    budgets; streaming and dense heads ignore the index and walk their sink
    and window ranges (docs/spec.md).
    """
    from sparsecc.codegen import vertical_slash_kernels as vk

    sq, sk = q.shape[2], k.shape[2]
    index = vertical_slash_table_index(q, k, table, scale)
    analytic = tuple(int(f is None or isinstance(f, Streaming)) for f in table.forms)
    if not any(analytic):
        # Budgets differ but every head reads the index: the kernel needs no per-head rule.
        return vk.vertical_slash_attention_kernel(q, k, v, index, scale, mask)
    sinks, windows = _analytic_rules(table, sq, sk)
    dev = q.device
    rules = (_head_vectors(analytic, dev), _head_vectors(tuple(sinks), dev), _head_vectors(tuple(windows), dev))
    return vk.vertical_slash_attention_kernel(q, k, v, index, scale, mask, head_rules=rules)


# ---------------------------------------------------------------- block family

@functools.lru_cache(maxsize=32)
def mixed_block_table(table: HeadTable, seq_q: int, seq_k: int, causal: bool, device: torch.device):
    """One ``BlockTable`` for every head: block_sparse head h has row h of its form's table for all heads
    (so its random blocks are those of head h, as in a site of that form alone); other heads keep no block."""
    from sparsecc.layouts import BlockTable, block_sparse_table

    heads = len(table.forms)
    parts = [(block_sparse_table(form, heads, seq_q, seq_k, causal, device, table.head_offset), members)
             for form, members in table.groups().items() if isinstance(form, BlockSparse)]
    fields = {}
    for name in ("kv_num_blocks", "full_kv_num_blocks", "kv_indices", "full_kv_indices"):
        rows = [getattr(t, name).expand(1, heads, *getattr(t, name).shape[2:]) for t, _ in parts]
        width = max(r.shape[-1] for r in rows)   # index rows differ in length; counts all have one per block
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows]
        merged = torch.zeros_like(rows[0])
        for r, (_, members) in zip(rows, parts):
            merged[:, members] = r[:, members]
        fields[name] = merged.contiguous()
    some = parts[0][0]
    return BlockTable(block_q=some.block_q, block_k=some.block_k, seq_q=some.seq_q, seq_k=some.seq_k,
                      causal=some.causal, **fields)


def block_family(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                 table: HeadTable) -> Tensor:
    """Attention of a block_sparse / streaming / dense table in one prefill-kernel launch (fp16/bf16).

    Streaming and dense heads keep the kernel's analytic sink and window
    bounds; block_sparse heads read their rows of :func:`mixed_block_table`.
    The kernel tells them apart by the window vector: 0 marks a table head.
    """
    from sparsecc.codegen.block_attention import check_mask, launch_prefill

    b, h, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    blocks = mixed_block_table(table, sq, sk, causal, q.device)
    sinks, windows = _analytic_rules(table, sq, sk)
    windows = [0 if isinstance(f, BlockSparse) else w for f, w in zip(table.forms, windows)]
    m4 = check_mask(mask, b, h, sq, sk)
    return launch_prefill(q, k, v, m4, scale, causal, False, sinks=_head_vectors(tuple(sinks), q.device),
                          windows=_head_vectors(tuple(windows), q.device), table=blocks)


def mixed_head_attention_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                                causal: bool, table: HeadTable) -> Optional[Tensor]:
    """One launch for the table when a family runs it on these inputs, else None (the op then runs the heads
    group by group): each family takes the inputs its kernel takes (``vertical_slash_kernel_ok``,
    ``attention_kernel_ok``), the vertical_slash family causal attention, the block family block sizes of at
    least 16 (powers of two, as the forms require)."""
    from sparsecc.codegen.block_attention import attention_kernel_ok
    from sparsecc.codegen.vertical_slash import vertical_slash_kernel_ok

    family = table.launch_family(causal)
    if family == "vertical_slash" and vertical_slash_kernel_ok(q, k, v):
        return vertical_slash_family(q, k, v, mask, scale, table)
    if family == "block" and attention_kernel_ok(q, k, v, scale):
        return block_family(q, k, v, mask, scale, causal, table)
    return None
