"""The attention ops: ``torch.ops.sparsecc.{streaming_attention, streaming_attention_from_mask,
streaming_prefill_sm90, block_sparse_attention, dynamic_block_attention, mixed_head_attention}``.

Each op is one :class:`~sparsecc.codegen.op_record.OpRecord` at the end of this file: its typed
arguments (the ``*Args`` dataclasses), its body (the functions below, which branch on the cost
model's crossover and pick the kernel or the reference), its reference and its kernel wrapper. The dense
attention they replaced and their run-time switches to it live in ``codegen/dense_branches.py``.

The streaming ops are traced into Inductor's graph on CUDA (their kernels launch from Inductor's
generated code); the block-table, dynamic and mixed ops make host-side decisions per call (a cached
block table, mask read-backs, per-input layouts) and stay opaque ops: see each record's reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch

from sparsecc.codegen.dense_branches import dense_attention, dense_by_element, runs_dense, with_causal
from sparsecc.codegen.mask_positions import (block_sparse_attention_from_mask_ref, by_elements, by_padding,
                                             causal_batch_elements, mask_4d, mask_rows_moved, padding_cut,
                                             streaming_attention_from_mask_ref)
from sparsecc.codegen.op_record import OpRecord, TensorInput, check_impl, no_kernel_reason, pick

__all__ = ["StreamingAttentionArgs", "StreamingFromMaskArgs", "HopperPrefillArgs", "BlockSparseAttentionArgs",
           "DynamicAttentionArgs", "MixedHeadArgs", "runs_dense", "dense_by_element", "STREAMING_ATTENTION",
           "STREAMING_ATTENTION_FROM_MASK", "STREAMING_PREFILL_SM90", "BLOCK_SPARSE_ATTENTION",
           "DYNAMIC_BLOCK_ATTENTION", "MIXED_HEAD_ATTENTION", "ATTENTION_RECORDS", "dense_attention",
           "streaming_attention", "streaming_attention_from_mask", "streaming_prefill_sm90", "block_sparse_attention",
           "dynamic_block_attention", "mixed_head_attention", "mixed_head_attention_by_groups", "layout_table"]


# ---------------------------------------------------------------- typed arguments

@dataclass(frozen=True)
class StreamingAttentionArgs:
    """Arguments of ``streaming_attention``: per-head ``sink``/``window`` (window -1 keeps a head dense).

    ``dense_below`` > 0 runs dense attention while the key length is below it (the cost model's
    crossover, branched on at run time); ``impl`` is ``auto``, ``triton`` or ``reference``. ``own_window`` > 0
    is the model's own sliding window: a call with at least ``own_window - 1`` keys before its queries runs
    dense (:func:`runs_dense`). Every attention op's arguments end with it.
    """

    scale: float
    causal: bool
    sink: Tuple[int, ...]
    window: Tuple[int, ...]
    dense_below: int = 0
    impl: str = "auto"
    own_window: int = 0


@dataclass(frozen=True)
class StreamingFromMaskArgs:
    """Arguments of ``streaming_attention_from_mask`` (a non-causal site whose mask places the queries)."""

    scale: float
    sink: Tuple[int, ...]
    window: Tuple[int, ...]
    dense_below: int = 0
    impl: str = "auto"
    own_window: int = 0


@dataclass(frozen=True)
class HopperPrefillArgs:
    """Arguments of ``streaming_prefill_sm90``: causal, no mask; ``sink`` and ``window`` one entry each (every head)
    or one per query head, in kernel form (``kernel_rules``)."""

    scale: float
    sink: Tuple[int, ...]
    window: Tuple[int, ...]


@dataclass(frozen=True)
class BlockSparseAttentionArgs:
    """Arguments of ``block_sparse_attention``: the BlockSparse form's fields, heads kept dense, whether
    query positions come from the mask (a non-causal site with fewer queries than keys), and the model's
    index of the op's head 0 (``head_offset``: a tensor-parallel rank's first head; random blocks are
    drawn per model head)."""

    scale: float
    causal: bool
    block: int
    local_blocks: int
    global_blocks: int
    random_blocks: int
    seed: int
    dense_heads: Tuple[int, ...] = ()
    dense_below: int = 0
    impl: str = "auto"
    positions_from_mask: bool = False
    head_offset: int = 0
    own_window: int = 0

    @classmethod
    def of(cls, form, **common) -> "BlockSparseAttentionArgs":
        """The arguments of a :class:`~sparsecc.forms.BlockSparse` form plus ``common`` (scale, causal, ...)."""
        return cls(block=form.block, local_blocks=form.local_blocks, global_blocks=form.global_blocks,
                   random_blocks=form.random_blocks, seed=form.seed, **common)


@dataclass(frozen=True)
class DynamicAttentionArgs:
    """Arguments of ``dynamic_block_attention``: ``form`` "block_topk" or "vertical_slash" and its keys
    (``topk`` 0 / ``cdf`` and ``min_mass`` 0.0 / ``rows`` 0 mean unset; the other form's keys are ignored)."""

    scale: float
    causal: bool
    form: str
    block: int
    topk: int
    cdf: float
    min_mass: float
    sink_blocks: int
    local_blocks: int
    pool: str
    rows: int
    last_q: int
    vertical: int
    slash: int
    dense_below: int = 0
    impl: str = "auto"
    positions_from_mask: bool = False
    own_window: int = 0

    @classmethod
    def of(cls, form, **common) -> "DynamicAttentionArgs":
        """The arguments of a BlockTopK or VerticalSlash form plus ``common`` (scale, causal, ...)."""
        from sparsecc.codegen.dynamic_attention import op_args
        names = ("form", "block", "topk", "cdf", "min_mass", "sink_blocks", "local_blocks", "pool", "rows",
                 "last_q", "vertical", "slash")
        return cls(**dict(zip(names, op_args(form))), **common)


@dataclass(frozen=True)
class MixedHeadArgs:
    """Arguments of ``mixed_head_attention``: a ``HeadTable`` as per-head lists (``HeadTable.op_args``)."""

    scale: float
    causal: bool
    kinds: Tuple[int, ...]
    sink: Tuple[int, ...]
    window: Tuple[int, ...]
    vertical: Tuple[int, ...]
    slash: Tuple[int, ...]
    local_blocks: Tuple[int, ...]
    global_blocks: Tuple[int, ...]
    random_blocks: Tuple[int, ...]
    seed: Tuple[int, ...]
    block: int
    last_q: int
    dense_below: int = 0
    impl: str = "auto"
    positions_from_mask: bool = False
    head_offset: int = 0   # the model's index of head 0 (tensor parallelism): block_sparse heads draw by it
    own_window: int = 0

    @classmethod
    def of(cls, table, **common) -> "MixedHeadArgs":
        """The arguments of a :class:`~sparsecc.codegen.mixed_attention.HeadTable` plus ``common``."""
        names = ("kinds", "sink", "window", "vertical", "slash", "local_blocks", "global_blocks", "random_blocks",
                 "seed", "block", "last_q")
        values = [tuple(v) if isinstance(v, list) else v for v in table.op_args()]
        return cls(**dict(zip(names, values)), **common)


# ---------------------------------------------------------------- bodies

def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, causal: bool, sink: List[int], window: List[int], dense_below: int,
                        impl: str, own_window: int = 0) -> torch.Tensor:
    """Sink + window attention, per-head sink/window (window -1 keeps the head dense).

    ``dense_below`` > 0 runs dense attention while the key length is below it:
    the cost model's crossover, branched on at run time so a dynamic-shape
    compile never recompiles when the length crosses it.
    """
    dense = dense_by_element(runs_dense(q, k, dense_below, own_window, mask, causal=causal), q, k, v, mask, scale,
                             causal, lambda q, k, v, m: streaming_attention(q, k, v, m, scale, causal, sink, window,
                                                                            0, impl))
    if dense is not None:
        return dense
    from sparsecc.codegen.block_attention import streaming_attention_ref

    def reference(q, k, v, mask, scale, causal, sink, window):
        return streaming_attention_ref(q, k, v, sink=sink, window=window, scale=scale, causal=causal, mask=mask)

    fn = pick(STREAMING_ATTENTION, impl, q.device, reference)
    return fn(q, k, v, mask, scale, causal, sink, window)


def streaming_prefill_sm90(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sink: List[int],
                           window: List[int]) -> torch.Tensor:
    """Causal sink + window attention, one rule for every head or one per head, no mask: the Gluon program on an
    sm_90 GPU (``codegen/hopper_prefill.py`` says which streaming calls come here), the reference elsewhere."""
    from sparsecc.codegen.hopper_prefill import program_takes, sm90_gluon

    kernel = STREAMING_PREFILL_SM90.kernel_function(q.device)
    if (kernel is not None and sm90_gluon(q.device)
            and program_takes((q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]))):
        return kernel(q, k, v, scale, sink, window)
    return _hopper_prefill_reference(q, k, v, scale, sink, window)


def _hopper_prefill_reference(q, k, v, scale, sink, window):
    from sparsecc.codegen.block_attention import streaming_attention_ref

    return streaming_attention_ref(q, k, v, sink=list(sink), window=list(window), scale=scale, causal=True)


def streaming_attention_from_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                  scale: float, sink: List[int], window: List[int], dense_below: int,
                                  impl: str, own_window: int = 0) -> torch.Tensor:
    """Sink + window attention for queries whose positions the mask tells (static-cache decode).

    Used for non-causal sites with ``Sq < Sk`` and a mask: each query row sits
    at the position :func:`mask_query_positions` gives, so a static cache's
    window counts back from each query's true position, not from the end of the
    key buffer. ``dense_below`` works as in ``streaming_attention``.
    """
    dense = dense_by_element(runs_dense(q, k, dense_below, own_window, mask, True), q, k, v, mask, scale, False,
                             lambda q, k, v, m: streaming_attention_from_mask(q, k, v, m, scale, sink, window, 0,
                                                                              impl))
    if dense is not None:
        return dense
    if q.shape[2] == k.shape[2]:   # as many queries as keys: row i sits at i, the plain bidirectional op
        return streaming_attention(q, k, v, mask, scale, False, sink, window, 0, impl)
    fn = pick(STREAMING_ATTENTION_FROM_MASK, impl, q.device, streaming_attention_from_mask_ref)
    return fn(q, k, v, mask, scale, sink, window)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                           scale: float, causal: bool, block: int, local_blocks: int, global_blocks: int,
                           random_blocks: int, seed: int, dense_heads: List[int], dense_below: int,
                           impl: str, positions_from_mask: bool = False, head_offset: int = 0,
                           own_window: int = 0) -> torch.Tensor:
    """BigBird-style block attention; heads listed in ``dense_heads`` keep every block.

    Head ``i`` of q is the model's head ``head_offset + i`` (its random blocks are that head's).

    ``dense_below`` works as in ``streaming_attention``. ``positions_from_mask``
    (a non-causal site with a mask): with fewer queries than keys, each row sits
    at the position the mask gives (``mask_query_positions``); when the mask
    moves any row, the call runs ``block_sparse_attention_from_mask_ref`` (one
    host read-back decides), otherwise the usual table and kernel.
    """
    dense = dense_by_element(runs_dense(q, k, dense_below, own_window, mask, positions_from_mask, causal), q, k, v,
                             mask, scale, causal, lambda q, k, v, m: block_sparse_attention(
        q, k, v, m, scale, causal, block, local_blocks, global_blocks, random_blocks, seed, dense_heads, 0, impl,
        positions_from_mask, head_offset))
    if dense is not None:
        return dense
    padded = by_padding(q, k, v, mask, causal, scale, lambda q, k, v, m: block_sparse_attention(
        q, k, v, m, scale, causal, block, local_blocks, global_blocks, random_blocks, seed, dense_heads, 0, impl,
        positions_from_mask, head_offset))
    if padded is not None:
        return padded
    from sparsecc.codegen.block_attention import block_sparse_attention_ref

    sq, sk = q.shape[2], k.shape[2]
    causal_draws = causal
    if random_blocks > 0 and not causal:
        # docs/spec.md: a call in which no row attends a key after its position (a causal mask passed as a tensor,
        # one query row, a static cache's rows) draws its random blocks as a causal call does, per batch element,
        # so a sequence's blocks depend neither on its batch-mates' masks nor on how the model passed causality.
        by_element = causal_batch_elements(mask, sq, sk, positions_from_mask)
        if bool(by_element.all()):
            causal_draws = True
        elif bool(by_element.any()):   # each part finds its own draws again (all alike there)
            return by_elements(q, k, v, mask, by_element, lambda q, k, v, m, _: block_sparse_attention(
                q, k, v, m, scale, causal, block, local_blocks, global_blocks, random_blocks, seed, dense_heads, 0,
                impl, positions_from_mask, head_offset))
    if positions_from_mask and mask is not None and sq < sk and bool(mask_rows_moved(mask, sq, sk).any()):
        square = layout_table(q.shape[1], sk, sk, False, block, local_blocks, global_blocks, random_blocks, seed,
                              tuple(dense_heads), q.device, head_offset, causal_draws)
        return block_sparse_attention_from_mask_ref(q, k, v, mask, scale, square).contiguous()
    # Causal draws with rows at i + Sk - Sq: the causal table (its structure only drops keys the call never reads).
    table = layout_table(q.shape[1], q.shape[2], k.shape[2], causal_draws, block, local_blocks, global_blocks,
                         random_blocks, seed, tuple(dense_heads), q.device, head_offset)

    def reference(q, k, v, mask, scale, table):
        return block_sparse_attention_ref(q, k, v, table=table, scale=scale, mask=mask)

    fn = pick(BLOCK_SPARSE_ATTENTION, impl, q.device, reference)
    return fn(q, k, v, mask, scale, table)


def dynamic_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                            scale: float, causal: bool, form: str, block: int, topk: int, cdf: float,
                            min_mass: float, sink_blocks: int, local_blocks: int, pool: str, rows: int, last_q: int,
                            vertical: int, slash: int, dense_below: int, impl: str, positions_from_mask: bool = False,
                            own_window: int = 0) -> torch.Tensor:
    """Attention over a layout chosen per input (``form`` "block_topk" or "vertical_slash").

    The form's keys travel as plain arguments (``topk`` 0 / ``cdf`` and
    ``min_mass`` 0.0 / ``rows`` 0 mean unset; keys of the other form are ignored). ``dense_below`` works as in
    ``streaming_attention``. ``positions_from_mask`` (a non-causal site with a
    mask): with fewer queries than keys, rows the mask moves off
    ``i + Sk - Sq`` attend densely (``dense_rows_where_moved``, docs/spec.md).
    """
    dense = dense_by_element(runs_dense(q, k, dense_below, own_window, mask, positions_from_mask, causal), q, k, v,
                             mask, scale, causal, lambda q, k, v, m: dynamic_block_attention(
        q, k, v, m, scale, causal, form, block, topk, cdf, min_mass, sink_blocks, local_blocks, pool, rows, last_q,
        vertical, slash, 0, impl, positions_from_mask))
    if dense is not None:
        return dense
    padded = by_padding(q, k, v, mask, causal, scale, lambda q, k, v, m: dynamic_block_attention(
        q, k, v, m, scale, causal, form, block, topk, cdf, min_mass, sink_blocks, local_blocks, pool, rows, last_q,
        vertical, slash, 0, impl, positions_from_mask))
    if padded is not None:
        return padded
    sq, sk = q.shape[2], k.shape[2]
    if not causal:
        # docs/spec.md: a mask that removes every key after each query's position makes the estimate causal, as
        # is_causal does (HF passes its causal mask as a tensor whenever a batch is padded, or a chunk prefilled),
        # and so does one query row without a mask (no key lies after it). Decided per batch element.
        causal_rows = causal_batch_elements(mask, sq, sk)
        if bool(causal_rows.all()):
            causal = True
        elif bool(causal_rows.any()):
            def part(q, k, v, m, is_causal):
                return dynamic_block_attention(q, k, v, m, scale, is_causal, form, block, topk, cdf, min_mass,
                                               sink_blocks, local_blocks, pool, rows, last_q, vertical, slash, 0,
                                               impl, positions_from_mask)
            return by_elements(q, k, v, mask, causal_rows, part)
    from sparsecc.codegen.dynamic_attention import dynamic_attention_ref, form_from_args

    spec_form = form_from_args(form, block, topk, cdf, min_mass, sink_blocks, local_blocks, pool, rows, last_q,
                               vertical, slash)

    def reference(q, k, v, mask, scale, causal, spec_form):
        return dynamic_attention_ref(q, k, v, form=spec_form, causal=causal, scale=scale, mask=mask)

    out = pick(DYNAMIC_BLOCK_ATTENTION, impl, q.device, reference)(q, k, v, mask, scale, causal, spec_form)
    if positions_from_mask and mask is not None and sq < sk:
        from sparsecc.codegen.mask_positions import dense_rows_where_moved
        out = dense_rows_where_moved(out, q, k, v, mask, scale)
    return out


def mixed_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float, causal: bool, kinds: List[int], sink: List[int], window: List[int],
                         vertical: List[int], slash: List[int], local_blocks: List[int], global_blocks: List[int],
                         random_blocks: List[int], seed: List[int], block: int, last_q: int, dense_below: int,
                         impl: str, positions_from_mask: bool = False, head_offset: int = 0,
                         own_window: int = 0) -> torch.Tensor:
    """Attention whose heads run different forms: each head computes what a site of its form alone computes
    (docs/spec.md). The per-head lists are ``HeadTable.op_args`` (``codegen/mixed_attention.py``).

    With a kernel, one launch runs the whole table (:func:`mixed_head_attention_kernel`); inputs it does not
    cover (a mask that moves query positions, non-causal vertical_slash heads, other mixes) and the
    reference run the heads group by group through each form's own op. ``dense_below`` works as in
    ``streaming_attention``.
    """
    dense = dense_by_element(runs_dense(q, k, dense_below, own_window, mask, positions_from_mask, causal), q, k, v,
                             mask, scale, causal, lambda q, k, v, m: mixed_head_attention(
        q, k, v, m, scale, causal, kinds, sink, window, vertical, slash, local_blocks, global_blocks, random_blocks,
        seed, block, last_q, 0, impl, positions_from_mask, head_offset))
    if dense is not None:
        return dense
    # Left padding is found over every head, then each head group runs on what remains (docs/spec.md).
    padded = by_padding(q, k, v, mask, causal, scale, lambda q, k, v, m: mixed_head_attention(
        q, k, v, m, scale, causal, kinds, sink, window, vertical, slash, local_blocks, global_blocks, random_blocks,
        seed, block, last_q, 0, impl, positions_from_mask, head_offset))
    if padded is not None:
        return padded
    table = _head_table(*(tuple(x) for x in (kinds, sink, window, vertical, slash, local_blocks, global_blocks,
                                             random_blocks, seed)), block, last_q, head_offset)
    check_impl("mixed_head_attention", impl)
    kernel = None if impl == "reference" else MIXED_HEAD_ATTENTION.kernel_function(q.device)
    if kernel is None and impl == "triton":
        raise RuntimeError(f"sparsecc op mixed_head_attention: kernels='triton' but no Triton kernel exists for "
                           f"{q.device.type}")
    sq, sk = q.shape[2], k.shape[2]
    # A table that no one-launch family covers skips the mask read-backs below (they sync with the device).
    if kernel is not None and table.family() is not None:
        moved = positions_from_mask and mask is not None and sq < sk and bool(mask_rows_moved(mask, sq, sk).any())
        run_causal = causal
        if not causal and not moved and (table.family() == "vertical_slash" or any(n > 0 for n in random_blocks)):
            # As the per-form ops decide: vertical_slash heads estimate, and block_sparse heads draw their random
            # blocks, as a causal call does where no row attends a later key; a batch that mixes both kinds of
            # element runs group by group, whose ops split it.
            by_element = causal_batch_elements(mask, sq, sk, positions_from_mask)
            run_causal = bool(by_element.all())
            if not run_causal and bool(by_element.any()):
                moved = True   # not a one-launch input
        out = None if moved else kernel(q, k, v, mask, scale, run_causal, table)
        if out is not None:
            return out.contiguous()
    return mixed_head_attention_by_groups(q, k, v, mask, scale, causal, table, impl, positions_from_mask)


@functools.lru_cache(maxsize=256)
def _head_table(*op_args):
    """``HeadTable.from_op_args``, built (and its forms validated) once per distinct table, not per call."""
    from sparsecc.codegen.mixed_attention import HeadTable
    return HeadTable.from_op_args(*op_args)


def mixed_head_attention_by_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                                   scale: float, causal: bool, table, impl: str,
                                   positions_from_mask: bool = False) -> torch.Tensor:
    """The heads of ``table`` group by group, each group through its form's own op: the definition of a mixed
    site (docs/spec.md), the reference of its kernels, and the path for inputs they do not cover."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    m4 = None if mask is None else mask_4d(mask)
    # The site's left padding was found over every head before (``mixed_head_attention``): a head group's part
    # of a mask with a head dimension must not find one of its own.
    with padding_cut():
        for form, members in table.groups().items():
            out[:, members] = _head_group(q, k, v, mask, m4, scale, causal, table, impl, positions_from_mask, form,
                                          members, group)
    return out


def _head_group(q, k, v, mask, m4, scale, causal, table, impl, positions_from_mask, form, members, group):
    """The output ``[B, len(members), Sq, Dv]`` of heads ``members`` (one form of ``table``) through that form's
    own op."""
    from sparsecc.codegen.dynamic_attention import op_args as dynamic_op_args
    from sparsecc.forms import BlockSparse, Streaming

    if isinstance(form, BlockSparse):
        # Random blocks are drawn per head index (docs/spec.md): run every head, keep this form's.
        o = block_sparse_attention(q, k, v, mask, scale, causal, form.block, form.local_blocks,
                                   form.global_blocks, form.random_blocks, form.seed, [], 0, impl,
                                   positions_from_mask, table.head_offset)
        return o[:, members]
    sel = torch.tensor(members, device=q.device)
    kv_sel = torch.tensor([h // group for h in members], device=q.device)
    qh, kh, vh = q[:, sel], k[:, kv_sel], v[:, kv_sel]
    mh = None if m4 is None else (m4 if m4.shape[1] == 1 else m4[:, sel])
    if form is None and causal and qh.shape[2] != kh.shape[2]:
        # Bottom-right causality (the queries are the last positions) as a mask: SDPA's is_causal is top-left.
        keep = torch.ones(qh.shape[2], kh.shape[2], dtype=torch.bool, device=q.device) if mh is None else mh
        return dense_attention(qh, kh, vh, with_causal(keep, qh.shape[2], kh.shape[2]), scale, False)
    if form is None:
        return dense_attention(qh, kh, vh, mh, scale, causal)
    if isinstance(form, Streaming) and positions_from_mask and mh is not None:
        return streaming_attention_from_mask(qh, kh, vh, mh, scale, [form.sink], [form.window], 0, impl)
    if isinstance(form, Streaming):
        return streaming_attention(qh, kh, vh, mh, scale, causal, [form.sink], [form.window], 0, impl)
    return dynamic_block_attention(qh, kh, vh, mh, scale, causal, *dynamic_op_args(form), 0, impl,
                                   positions_from_mask)


@functools.lru_cache(maxsize=64)
def layout_table(heads: int, seq_q: int, seq_k: int, causal: bool, block: int, local_blocks: int,
                 global_blocks: int, random_blocks: int, seed: int, dense_heads: tuple, device: torch.device,
                 head_offset: int = 0, causal_draws: Optional[bool] = None):
    """Build (and cache per shape) the block table of a block_sparse layout (head i is the model's head_offset + i;
    ``causal_draws`` as in :func:`sparsecc.layouts.block_sparse_table`)."""
    from sparsecc.forms import BlockSparse
    from sparsecc.layouts import block_sparse_table

    form = BlockSparse(block, local_blocks, global_blocks, random_blocks, seed)
    table = block_sparse_table(form, heads, seq_q, seq_k, causal, device, head_offset, causal_draws)
    if not dense_heads:
        return table
    # Dense heads keep every block: a band as wide as the whole key range.
    n_kblocks = -(-seq_k // block)
    dense = block_sparse_table(BlockSparse(block, local_blocks=n_kblocks + 1), 1, seq_q, seq_k, causal, device)
    return _pick_heads(table, dense, dense_heads, heads)


def _pick_heads(sparse, dense, dense_heads: tuple, heads: int):
    """A table whose head h comes from ``dense`` when h is in ``dense_heads``, else from ``sparse``."""
    from sparsecc.layouts import BlockTable

    fields = {}
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        a, b = getattr(sparse, name).expand(-1, heads, -1), getattr(dense, name).expand(-1, heads, -1)
        pick = torch.tensor([h in dense_heads for h in range(heads)], device=a.device)[None, :, None]
        fields[name] = torch.where(pick, b, a).contiguous()
    for name in ("kv_indices", "full_kv_indices"):
        a, b = getattr(sparse, name).expand(-1, heads, -1, -1), getattr(dense, name).expand(-1, heads, -1, -1)
        width = max(a.shape[-1], b.shape[-1])
        a = torch.nn.functional.pad(a, (0, width - a.shape[-1]))
        b = torch.nn.functional.pad(b, (0, width - b.shape[-1]))
        pick = torch.tensor([h in dense_heads for h in range(heads)], device=a.device)[None, :, None, None]
        fields[name] = torch.where(pick, b, a).contiguous()
    return BlockTable(block_q=sparse.block_q, block_k=sparse.block_k, seq_q=sparse.seq_q, seq_k=sparse.seq_k,
                      causal=sparse.causal, **fields)



# ---------------------------------------------------------------- records

def _attention_fake(q, k, v, *args):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_QKV_MASK = (TensorInput("q"), TensorInput("k"), TensorInput("v"), TensorInput("mask", optional=True))


def _streaming_opaque(args, device: torch.device, symbolic: bool) -> Optional[str]:
    """Why a streaming call stays opaque: no kernel, a crossover branch, or the model's own window on symbolic
    shapes.

    Traced, ``seq_k < dense_below`` would become a guard and compile the graph once per side (the compiler sets a
    crossover on symbolic shapes only), and with a mask it is decided per batch element from a read-back of the
    mask (``runs_dense``); as one opaque op the branch is taken at run time and one compile serves both sides.
    """
    record = STREAMING_ATTENTION if isinstance(args, StreamingAttentionArgs) else STREAMING_ATTENTION_FROM_MASK
    reason = no_kernel_reason(record, args.impl, device)
    if reason is None and args.dense_below > 0:   # symbolic shapes: a guard; a mask: a per-element read-back
        reason = f"runtime branch at the crossover (dense below seq_k {args.dense_below}), per batch element"
    if reason is None and args.own_window > 0 and symbolic:
        reason = (f"runtime branch at the model's own sliding window (dense from {args.own_window - 1} cached "
                  "keys) on symbolic shapes")
    if reason is None and args.own_window > 0 and record is STREAMING_ATTENTION_FROM_MASK:
        reason = "reads the first query's position from the mask (the model's own sliding window) on the host"
    return reason


def _streaming_reference(q, k, v, mask, scale, causal, sink, window, dense_below=0, impl="reference", own_window=0):
    from sparsecc.codegen.block_attention import streaming_attention_ref
    # The model's own window: positions unknown (the crossover is not semantics).
    dense = dense_by_element(runs_dense(q, k, 0, own_window, mask, causal=causal), q, k, v, mask, scale, causal,
                             lambda q, k, v, m: _streaming_reference(q, k, v, m, scale, causal, sink, window))
    if dense is not None:
        return dense
    return streaming_attention_ref(q, k, v, sink=sink, window=window, scale=scale, causal=causal, mask=mask)


def _body_as_reference(record_name: str):
    """A reference that runs the op's body with ``impl="reference"`` (the body holds the op's semantics:
    crossover branch, mask positions, head groups), for ops whose reference is that body."""
    def reference(*flat):
        record = globals()[record_name]
        tensors, args = record.unflatten(flat)
        return record.body(*record.flatten(tensors, replace(args, impl="reference")))
    reference.__name__ = f"{record_name.lower()}_reference"
    return reference


STREAMING_ATTENTION = OpRecord(
    name="streaming_attention", tensors=_QKV_MASK, args=StreamingAttentionArgs,
    body=streaming_attention, reference=_streaming_reference, fake=_attention_fake,
    kernel="sparsecc.codegen.block_attention:streaming_attention_op",
    opaque_reason=_streaming_opaque,
    doc="Sink + window attention, per-head sink/window (docs/spec.md, streaming).")

STREAMING_ATTENTION_FROM_MASK = OpRecord(
    name="streaming_attention_from_mask",
    tensors=(TensorInput("q"), TensorInput("k"), TensorInput("v"), TensorInput("mask")),
    args=StreamingFromMaskArgs, body=streaming_attention_from_mask,
    reference=_body_as_reference("STREAMING_ATTENTION_FROM_MASK"),
    fake=_attention_fake, kernel="sparsecc.codegen.decode_attention:streaming_decode_from_mask_op",
    opaque_reason=_streaming_opaque,
    doc="Streaming attention for queries whose positions the mask tells (static-cache decode).")

STREAMING_PREFILL_SM90 = OpRecord(
    name="streaming_prefill_sm90", tensors=(TensorInput("q"), TensorInput("k"), TensorInput("v")),
    args=HopperPrefillArgs, body=streaming_prefill_sm90, reference=_hopper_prefill_reference, fake=_attention_fake,
    kernel="sparsecc.codegen.hopper_prefill:streaming_prefill_sm90_kernel",
    always_opaque="launches a Gluon program with TMA descriptors made on the host, which traced launches cannot "
                  "carry",
    doc="Causal streaming prefill on sm_90 (the Gluon program), called by streaming_attention's kernel wrapper.")

BLOCK_SPARSE_ATTENTION = OpRecord(
    name="block_sparse_attention", tensors=_QKV_MASK, args=BlockSparseAttentionArgs,
    body=block_sparse_attention, reference=_body_as_reference("BLOCK_SPARSE_ATTENTION"), fake=_attention_fake,
    kernel="sparsecc.codegen.block_attention:block_sparse_attention_op",
    always_opaque="builds its block table on the host (cached per shape) and reads the mask back when query "
                  "positions come from it",
    doc="BigBird-style block attention (docs/spec.md, block_sparse).")

DYNAMIC_BLOCK_ATTENTION = OpRecord(
    name="dynamic_block_attention", tensors=_QKV_MASK, args=DynamicAttentionArgs,
    body=dynamic_block_attention, reference=_body_as_reference("DYNAMIC_BLOCK_ATTENTION"), fake=_attention_fake,
    kernel="sparsecc.codegen.dynamic_attention:dynamic_block_attention_op",
    always_opaque="chooses its layout per input, with host-side reads of the mask and the selection",
    doc="Attention over a layout chosen per input (block_topk, vertical_slash).")

MIXED_HEAD_ATTENTION = OpRecord(
    name="mixed_head_attention", tensors=_QKV_MASK, args=MixedHeadArgs,
    body=mixed_head_attention, reference=_body_as_reference("MIXED_HEAD_ATTENTION"), fake=_attention_fake,
    kernel="sparsecc.codegen.mixed_attention:mixed_head_attention_kernel",
    always_opaque="reads the mask back to pick the one-launch family or the head-group path",
    doc="Attention whose heads run different forms (docs/spec.md, heads with different forms).")

ATTENTION_RECORDS = (STREAMING_ATTENTION, STREAMING_ATTENTION_FROM_MASK, STREAMING_PREFILL_SM90,
                     BLOCK_SPARSE_ATTENTION, DYNAMIC_BLOCK_ATTENTION, MIXED_HEAD_ATTENTION)
