"""``torch.ops.sparsecc.*``: the custom ops rewritten graphs call.

Every op has a fake (meta) implementation, so Inductor and dynamic shapes
trace through it, and a real implementation that dispatches on the ``impl``
argument the compiler baked in:

* ``"reference"``: the pure-PyTorch reference beside each kernel (the test
  oracle and the CPU path);
* ``"triton"``: the Triton kernel registered for the op (an error if none);
* ``"auto"``: the Triton kernel where one is registered for the tensor's
  device, the reference otherwise.

Kernels are listed in one table, ``TRITON_KERNELS``, that maps an op name to
a loader; loaders import their kernel module only when first used, so
importing sparsecc never compiles or imports Triton.

Ops are registered by ``register_ops()``, which the backend calls; it is
idempotent.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, List, Optional, Tuple

import torch

NAMESPACE = "sparsecc"
IMPL_CHOICES = ("auto", "triton", "reference")

# The mask position rule lives in its own module; these names are part of this module's interface too.
from sparsecc.codegen.mask_positions import (  # noqa: E402,F401
    block_sparse_attention_from_mask_ref, mask_4d, mask_is_causal, mask_query_end, mask_query_positions,
    mask_rows_moved, streaming_attention_from_mask_ref)


def _load_block_sparse_linear():
    """The Triton BSR linear kernel; importing Triton here keeps ``import sparsecc`` free of it."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear_op
    return block_sparse_linear_op, ("cuda",)


def _load_threshold_linear():
    """The Triton activation-sparse GEMV (TEAL input mode); imports Triton."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.activation_sparse import threshold_linear
    return threshold_linear, ("cuda",)


def _load_gate_sparse_ffn():
    """The Triton gate-mode (CATS) decode FFN; imports Triton."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn
    return gate_sparse_ffn, ("cuda",)


def _load_semi_structured_linear():
    """The cuSPARSELt 2:4 linear (falls back inside when cuSPARSELt cannot take a shape or dtype)."""
    from sparsecc.codegen.semi_structured_linear import semi_structured_linear
    return semi_structured_linear, ("cuda",)


def _load_streaming_attention():
    """Streaming attention kernels (prefill + split-KV decode); imports Triton, so only called on use."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.block_attention import streaming_attention_op
    return streaming_attention_op, ("cuda",)


def _load_streaming_attention_from_mask():
    """Split-KV decode kernel with query positions read from the mask; imports Triton."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.decode_attention import streaming_decode_from_mask_op
    return streaming_decode_from_mask_op, ("cuda",)


def _load_block_sparse_attention():
    """Block-table flash attention kernel; imports Triton, so only called on use."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.block_attention import block_sparse_attention_op
    return block_sparse_attention_op, ("cuda",)


def _load_dynamic_block_attention():
    """Dynamic-layout attention: Triton estimate + table build, then the block-table flash kernel."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.dynamic_attention import dynamic_block_attention_op
    return dynamic_block_attention_op, ("cuda",)


def _load_mixed_head_attention():
    """One launch over a per-head table of forms (vertical_slash or block family); imports Triton."""
    import triton  # noqa: F401 - ImportError means no kernel
    from sparsecc.codegen.mixed_attention import mixed_head_attention_kernel
    return mixed_head_attention_kernel, ("cuda",)


# op name -> zero-argument loader returning (kernel fn, supported device types).
# Kernel work registers here; an op absent from this table runs its reference everywhere.
TRITON_KERNELS: Dict[str, Callable[[], Tuple[Callable, Tuple[str, ...]]]] = {
    "streaming_attention": _load_streaming_attention,
    "streaming_attention_from_mask": _load_streaming_attention_from_mask,
    "block_sparse_attention": _load_block_sparse_attention,
    "dynamic_block_attention": _load_dynamic_block_attention,
    "mixed_head_attention": _load_mixed_head_attention,
    "block_sparse_linear": _load_block_sparse_linear,
    "threshold_linear": _load_threshold_linear,
    "gate_sparse_ffn": _load_gate_sparse_ffn,
    "semi_structured_linear": _load_semi_structured_linear,
}

_registered = False
_library: Optional[torch.library.Library] = None
_lock = threading.Lock()


def triton_kernel(op: str, device: torch.device) -> Optional[Callable]:
    """The Triton kernel for ``op`` on ``device``, or None when there is none (or Triton is missing)."""
    loader = TRITON_KERNELS.get(op)
    if loader is None:
        return None
    try:
        fn, device_types = loader()
    except ImportError:
        return None
    return fn if device.type in device_types else None


def has_triton_kernel(op: str, device: torch.device) -> bool:
    """True when ``op`` has a Triton kernel for ``device``."""
    return triton_kernel(op, device) is not None


def _pick(op: str, impl: str, device: torch.device, reference: Callable) -> Callable:
    """The implementation ``impl`` selects, wrapped to return a contiguous tensor.

    Every op's fake implementation promises a contiguous result (Inductor
    asserts the strides); a kernel may write a transposed layout, so the
    contract is enforced here, once, for every op and implementation.
    """
    if impl not in IMPL_CHOICES:
        raise ValueError(f"sparsecc op {op}: impl={impl!r} is not one of {IMPL_CHOICES}")
    fn = reference
    if impl != "reference":
        kernel = triton_kernel(op, device)
        if kernel is not None:
            fn = kernel
        elif impl == "triton":
            raise RuntimeError(f"sparsecc op {op}: kernels='triton' but no Triton kernel exists for {device.type}")
    return lambda *args: fn(*args).contiguous()


# ---------------------------------------------------------------- attention

def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                    causal: bool) -> torch.Tensor:
    """The dense attention a sparse site replaced (SDPA with GQA), for the below-crossover branch.

    ``causal`` here always comes with seq_q == seq_k (the compiler keeps other
    causal sites dense), where SDPA's top-left causal mask is the same as ours.
    """
    if causal and mask is not None:   # SDPA refuses is_causal together with a mask
        mask, causal = _with_causal(mask, q.shape[2], k.shape[2]), False
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def _with_causal(mask: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """Intersect a bool or additive mask with a bottom-right causal mask."""
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=mask.device).tril(seq_k - seq_q)
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, causal: bool, sink: List[int], window: List[int], dense_below: int,
                        impl: str) -> torch.Tensor:
    """Sink + window attention, per-head sink/window (window -1 keeps the head dense).

    ``dense_below`` > 0 runs dense attention while the key length is below it:
    the cost model's crossover, branched on at run time so a dynamic-shape
    compile never recompiles when the length crosses it.
    """
    if dense_below > 0 and k.shape[2] < dense_below:
        return dense_attention(q, k, v, mask, scale, causal)
    from sparsecc.codegen.block_attention import streaming_attention_ref

    def reference(q, k, v, mask, scale, causal, sink, window):
        return streaming_attention_ref(q, k, v, sink=sink, window=window, scale=scale, causal=causal, mask=mask)

    fn = _pick("streaming_attention", impl, q.device, reference)
    return fn(q, k, v, mask, scale, causal, sink, window)


def streaming_attention_from_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                  scale: float, sink: List[int], window: List[int], dense_below: int,
                                  impl: str) -> torch.Tensor:
    """Sink + window attention for queries whose positions the mask tells (static-cache decode).

    Used for non-causal sites with ``Sq < Sk`` and a mask: each query row sits
    at the position :func:`mask_query_positions` gives, so a static cache's
    window counts back from each query's true position, not from the end of the
    key buffer. ``dense_below`` works as in ``streaming_attention``.
    """
    if dense_below > 0 and k.shape[2] < dense_below:
        return dense_attention(q, k, v, mask, scale, False)
    if q.shape[2] == k.shape[2]:   # as many queries as keys: row i sits at i, the plain bidirectional op
        return streaming_attention(q, k, v, mask, scale, False, sink, window, 0, impl)
    fn = _pick("streaming_attention_from_mask", impl, q.device, streaming_attention_from_mask_ref)
    return fn(q, k, v, mask, scale, sink, window)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                           scale: float, causal: bool, block: int, local_blocks: int, global_blocks: int,
                           random_blocks: int, seed: int, dense_heads: List[int], dense_below: int,
                           impl: str, positions_from_mask: bool = False) -> torch.Tensor:
    """BigBird-style block attention; heads listed in ``dense_heads`` keep every block.

    ``dense_below`` works as in ``streaming_attention``. ``positions_from_mask``
    (a non-causal site with a mask): with fewer queries than keys, each row sits
    at the position the mask gives (``mask_query_positions``); when the mask
    moves any row, the call runs ``block_sparse_attention_from_mask_ref`` (one
    host read-back decides), otherwise the usual table and kernel.
    """
    if dense_below > 0 and k.shape[2] < dense_below:
        return dense_attention(q, k, v, mask, scale, causal)
    from sparsecc.codegen.block_attention import block_sparse_attention_ref

    sq, sk = q.shape[2], k.shape[2]
    if positions_from_mask and mask is not None and sq < sk and bool(mask_rows_moved(mask, sq, sk).any()):
        square = layout_table(q.shape[1], sk, sk, False, block, local_blocks, global_blocks, random_blocks, seed,
                              tuple(dense_heads), q.device)
        return block_sparse_attention_from_mask_ref(q, k, v, mask, scale, square).contiguous()
    table = layout_table(q.shape[1], q.shape[2], k.shape[2], causal, block, local_blocks, global_blocks,
                         random_blocks, seed, tuple(dense_heads), q.device)

    def reference(q, k, v, mask, scale, table):
        return block_sparse_attention_ref(q, k, v, table=table, scale=scale, mask=mask)

    fn = _pick("block_sparse_attention", impl, q.device, reference)
    return fn(q, k, v, mask, scale, table)


def dynamic_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                            scale: float, causal: bool, form: str, block: int, topk: int, cdf: float,
                            sink_blocks: int, local_blocks: int, pool: str, last_q: int, vertical: int, slash: int,
                            dense_below: int, impl: str, positions_from_mask: bool = False) -> torch.Tensor:
    """Attention over a layout chosen per input (``form`` "block_topk" or "vertical_slash").

    The form's keys travel as plain arguments (``topk`` 0 / ``cdf`` 0.0 mean
    unset; keys of the other form are ignored). ``dense_below`` works as in
    ``streaming_attention``. ``positions_from_mask`` (a non-causal site with a
    mask): with fewer queries than keys, rows the mask moves off
    ``i + Sk - Sq`` attend densely (``dense_rows_where_moved``, docs/spec.md).
    """
    if dense_below > 0 and k.shape[2] < dense_below:
        return dense_attention(q, k, v, mask, scale, causal)
    sq, sk = q.shape[2], k.shape[2]
    if not causal and mask is not None and sq <= sk:
        # docs/spec.md: a mask that removes every key after each query's position makes the estimate causal, as
        # is_causal does (HF passes its causal mask as a tensor whenever a batch is padded, or a chunk prefilled).
        # Decided per batch element, so a sequence's layout never depends on its batch-mates' masks.
        causal_rows = mask_is_causal(mask, sq, sk)
        if bool(causal_rows.all()):
            causal = True
        elif bool(causal_rows.any()):
            m4 = mask_4d(mask)
            out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
            for rows, is_causal in ((causal_rows.nonzero().flatten(), True),
                                    ((~causal_rows).nonzero().flatten(), False)):
                out[rows] = dynamic_block_attention(
                    q[rows], k[rows], v[rows], m4[rows], scale, is_causal, form, block, topk, cdf, sink_blocks,
                    local_blocks, pool, last_q, vertical, slash, 0, impl, positions_from_mask)
            return out
    from sparsecc.codegen.dynamic_attention import dynamic_attention_ref, form_from_args

    spec_form = form_from_args(form, block, topk, cdf, sink_blocks, local_blocks, pool, last_q, vertical, slash)

    def reference(q, k, v, mask, scale, causal, spec_form):
        return dynamic_attention_ref(q, k, v, form=spec_form, causal=causal, scale=scale, mask=mask)

    out = _pick("dynamic_block_attention", impl, q.device, reference)(q, k, v, mask, scale, causal, spec_form)
    if positions_from_mask and mask is not None and sq < sk:
        from sparsecc.codegen.mask_positions import dense_rows_where_moved
        out = dense_rows_where_moved(out, q, k, v, mask, scale)
    return out


def mixed_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float, causal: bool, kinds: List[int], sink: List[int], window: List[int],
                         vertical: List[int], slash: List[int], local_blocks: List[int], global_blocks: List[int],
                         random_blocks: List[int], seed: List[int], block: int, last_q: int, dense_below: int,
                         impl: str, positions_from_mask: bool = False) -> torch.Tensor:
    """Attention whose heads run different forms: each head computes what a site of its form alone computes
    (docs/spec.md). The per-head lists are ``HeadTable.op_args`` (``codegen/mixed_attention.py``).

    With a kernel, one launch runs the whole table (:func:`mixed_head_attention_kernel`); inputs it does not
    cover (a mask that moves query positions, non-causal vertical_slash heads, other mixes) and the
    reference run the heads group by group through each form's own op. ``dense_below`` works as in
    ``streaming_attention``.
    """
    if dense_below > 0 and k.shape[2] < dense_below:
        return dense_attention(q, k, v, mask, scale, causal)
    table = _head_table(*(tuple(x) for x in (kinds, sink, window, vertical, slash, local_blocks, global_blocks,
                                             random_blocks, seed)), block, last_q)
    kernel = None if impl == "reference" else triton_kernel("mixed_head_attention", q.device)
    if kernel is None and impl == "triton":
        raise RuntimeError(f"sparsecc op mixed_head_attention: kernels='triton' but no Triton kernel exists for "
                           f"{q.device.type}")
    sq, sk = q.shape[2], k.shape[2]
    # A table that no one-launch family covers skips the mask read-backs below (they sync with the device).
    if kernel is not None and table.family() is not None:
        moved = positions_from_mask and mask is not None and sq < sk and bool(mask_rows_moved(mask, sq, sk).any())
        run_causal = causal
        if not causal and mask is not None and sq <= sk and table.family() == "vertical_slash":
            # As for the dynamic forms: a mask that removes every key after each query's position is causal.
            run_causal = bool(mask_is_causal(mask, sq, sk).all())
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
    from sparsecc.codegen.dynamic_attention import op_args as dynamic_op_args
    from sparsecc.forms import BlockSparse, Streaming

    group = q.shape[1] // k.shape[1]
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    m4 = None if mask is None else mask_4d(mask)
    for form, members in table.groups().items():
        if isinstance(form, BlockSparse):
            # Random blocks are drawn per head index (docs/spec.md): run every head, keep this form's.
            o = block_sparse_attention(q, k, v, mask, scale, causal, form.block, form.local_blocks,
                                       form.global_blocks, form.random_blocks, form.seed, [], 0, impl,
                                       positions_from_mask)
            out[:, members] = o[:, members]
            continue
        sel = torch.tensor(members, device=q.device)
        kv_sel = torch.tensor([h // group for h in members], device=q.device)
        qh, kh, vh = q[:, sel], k[:, kv_sel], v[:, kv_sel]
        mh = None if m4 is None else (m4 if m4.shape[1] == 1 else m4[:, sel])
        if form is None and causal and qh.shape[2] != kh.shape[2]:
            # Bottom-right causality (the queries are the last positions) as a mask: SDPA's is_causal is top-left.
            keep = torch.ones(qh.shape[2], kh.shape[2], dtype=torch.bool, device=q.device) if mh is None else mh
            o = dense_attention(qh, kh, vh, _with_causal(keep, qh.shape[2], kh.shape[2]), scale, False)
        elif form is None:
            o = dense_attention(qh, kh, vh, mh, scale, causal)
        elif isinstance(form, Streaming) and positions_from_mask and mh is not None:
            o = streaming_attention_from_mask(qh, kh, vh, mh, scale, [form.sink], [form.window], 0, impl)
        elif isinstance(form, Streaming):
            o = streaming_attention(qh, kh, vh, mh, scale, causal, [form.sink], [form.window], 0, impl)
        else:
            o = dynamic_block_attention(qh, kh, vh, mh, scale, causal, *dynamic_op_args(form), 0, impl,
                                        positions_from_mask)
        out[:, members] = o
    return out


@functools.lru_cache(maxsize=64)
def layout_table(heads: int, seq_q: int, seq_k: int, causal: bool, block: int, local_blocks: int,
                 global_blocks: int, random_blocks: int, seed: int, dense_heads: tuple, device: torch.device):
    """Build (and cache per shape) the block table of a block_sparse layout."""
    from sparsecc.forms import BlockSparse
    from sparsecc.layouts import block_sparse_table

    form = BlockSparse(block, local_blocks, global_blocks, random_blocks, seed)
    table = block_sparse_table(form, heads, seq_q, seq_k, causal, device)
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


# ---------------------------------------------------------------- ffn / linear

def threshold_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tau: float,
                     impl: str, channel_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x * (|x| > tau), weight, bias)``: input activation sparsity (TEAL).

    ``channel_scale`` (criterion "weighted") keeps channel i iff ``|x_i| * channel_scale[i] > tau``.
    The Triton GEMV compares with one scalar threshold, so weighted calls run the reference.
    """
    from sparsecc.codegen.activation_sparse import threshold_linear_ref
    if channel_scale is not None:
        if impl == "triton":
            raise RuntimeError("sparsecc op threshold_linear: kernels='triton' but the Triton kernel takes no "
                               "channel_scale (criterion weighted)")
        return threshold_linear_ref(x, weight, bias, tau, channel_scale).contiguous()
    return _pick("threshold_linear", impl, x.device, threshold_linear_ref)(x, weight, bias, tau)


def gate_sparse_ffn(x: torch.Tensor, w_gate: torch.Tensor, b_gate: Optional[torch.Tensor],
                    w_up: Optional[torch.Tensor], b_up: Optional[torch.Tensor], w_down: torch.Tensor,
                    b_down: Optional[torch.Tensor], act: str, tau: float, impl: str) -> torch.Tensor:
    """FFN with thresholded gate activations (CATS); ``w_up`` None for a plain FFN."""
    from sparsecc.codegen.activation_sparse import gate_sparse_ffn_ref

    def reference(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau):
        return gate_sparse_ffn_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act=act, tau=tau)

    fn = _pick("gate_sparse_ffn", impl, x.device, reference)
    return fn(x, w_gate, b_gate, w_up, b_up, w_down, b_down, act, tau)


def semi_structured_linear(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                           bias: Optional[torch.Tensor], out_features: int, in_features: int,
                           impl: str) -> torch.Tensor:
    """``x @ Wᵀ + b`` with W stored 2:4-compressed (values + 2-bit positions)."""
    from sparsecc.codegen.semi_structured_linear import semi_structured_linear_ref
    from sparsecc.weights import SemiStructuredWeight

    def reference(x, values, indices, bias):
        weight = SemiStructuredWeight(values=values, indices=indices, shape=(out_features, in_features))
        return semi_structured_linear_ref(x, weight, bias)

    return _pick("semi_structured_linear", impl, x.device, reference)(x, values, indices, bias)


def block_sparse_linear(x: torch.Tensor, blocks: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                        bias: Optional[torch.Tensor], out_features: int, in_features: int,
                        impl: str, epilogue: str = "", gate: Optional[torch.Tensor] = None,
                        residual: Optional[torch.Tensor] = None, up_blocks: Optional[torch.Tensor] = None,
                        up_row_ptr: Optional[torch.Tensor] = None,
                        up_col_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``chain(x @ Wᵀ + b)`` with W stored as kept (bm x bk) blocks in BSR order.

    ``epilogue`` is an ``EpilogueChain`` string (codegen/epilogue.py: bias,
    activation, ``mul:gate``, ``add:residual``, ``mul:up``, cast) whose extra
    inputs are ``gate`` / ``residual`` (the output's shape) and the up
    projection's blocks (fused gate/up).
    """
    from sparsecc.codegen.block_sparse_linear import block_sparse_linear_op_ref

    fn = _pick("block_sparse_linear", impl, x.device, block_sparse_linear_op_ref)
    return fn(x, blocks, row_ptr, col_idx, bias, epilogue, gate, residual, up_blocks, up_row_ptr, up_col_idx)


# ---------------------------------------------------------------- fake implementations

def _attention_fake(q, k, v, *args):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _linear_fake(x, *args):
    out_features = args[-3]
    return x.new_empty((*x.shape[:-1], out_features))


def _block_sparse_linear_fake(x, blocks, row_ptr, col_idx, bias, out_features, in_features, impl, epilogue="",
                              gate=None, residual=None, up_blocks=None, up_row_ptr=None, up_col_idx=None):
    from sparsecc.codegen.epilogue import EpilogueChain
    return x.new_empty((*x.shape[:-1], out_features), dtype=EpilogueChain.parse(epilogue).out_dtype(x.dtype))


def _threshold_linear_fake(x, weight, bias, tau, impl, channel_scale=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _ffn_fake(x, w_gate, b_gate, w_up, b_up, w_down, *args):
    return x.new_empty((*x.shape[:-1], w_down.shape[0]))


_OPS = (
    ("streaming_attention", streaming_attention, _attention_fake),
    ("streaming_attention_from_mask", streaming_attention_from_mask, _attention_fake),
    ("block_sparse_attention", block_sparse_attention, _attention_fake),
    ("dynamic_block_attention", dynamic_block_attention, _attention_fake),
    ("mixed_head_attention", mixed_head_attention, _attention_fake),
    ("threshold_linear", threshold_linear, _threshold_linear_fake),
    ("gate_sparse_ffn", gate_sparse_ffn, _ffn_fake),
    ("semi_structured_linear", semi_structured_linear, _linear_fake),
    ("block_sparse_linear", block_sparse_linear, _block_sparse_linear_fake),
)


def register_ops() -> None:
    """Define every ``torch.ops.sparsecc`` op with its fake implementation (idempotent).

    The ops are defined on a ``torch.library.Library`` with one
    ``CompositeExplicitAutograd`` kernel each (the Python function dispatches on
    ``impl`` and the device itself) rather than through
    ``torch.library.custom_op``: the latter wraps every call in Python-side
    dispatch and autograd machinery that costs tens of microseconds per call,
    which at batch-1 decode is longer than the kernel. The ops have no autograd
    formula either way (inference only); schemas are inferred from the type
    hints, so the two registrations accept the same calls.
    """
    global _registered, _library
    with _lock:
        if _registered:
            return
        library = torch.library.Library(NAMESPACE, "DEF")
        for name, fn, fake in _OPS:
            library.define(name + torch.library.infer_schema(fn, mutates_args=()))
            library.impl(name, fn, "CompositeExplicitAutograd")
            torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=library)
        _library = library  # the registrations live as long as this object
        _registered = True


def op(name: str):
    """The registered ``torch.ops.sparsecc.<name>.default`` overload."""
    register_ops()
    return getattr(getattr(torch.ops, NAMESPACE), name).default
