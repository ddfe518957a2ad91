"""Dynamic (per-input) attention layouts: ``block_topk`` and ``vertical_slash``.

Both forms look at the actual q and k of a call and choose keys per
(batch, head, query block). block_topk hands its choice to the block-table
flash kernel of ``block_attention.py`` as a :class:`~sparsecc.layouts.BlockTable`;
vertical_slash (MInference's rule) keeps key ranges that start anywhere plus
single columns, so its index, reference and kernels live in ``vertical_slash.py``
and ``vertical_slash_kernels.py``; this file holds its score reference.
The exact selection rules are those of :class:`sparsecc.forms.BlockTopK` and
:class:`sparsecc.forms.VerticalSlash` (also in docs/spec.md).

Layout of this file: shared helpers, the PyTorch **references** (the ground
truth, and the CPU path), then the **GPU path** (Triton kernels from
``dynamic_attention_kernels.py``, imported on first use only), then the
dispatching entry points :func:`dynamic_table` and :func:`dynamic_block_attention`.

Conventions are those of ``block_attention.py``: q ``[B, H, Sq, D]``, k ``[B,
Hkv, Sk, D]``, query head h reads kv head ``h // (H // Hkv)``, queries are the
last Sq positions (row i has position ``i + Sk - Sq``), and ``Sq <= Sk``.

Ties and ordering: every ranking here orders by score, highest first, and
breaks ties towards the lower index. Both paths implement that by ranking a
packed int64 key (order-preserving bits of the float32 score in the high
word, ``N - 1 - index`` in the low word), so a ranking never depends on the
sort algorithm.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from sparsecc.forms import BlockTopK, VerticalSlash
from sparsecc.layouts import BlockTable

__all__ = ["block_topk_table_ref", "block_topk_scores_ref", "block_probabilities", "sampled_row_scores_ref",
           "sampled_rows", "vertical_slash_scores_ref", "dynamic_attention_ref", "dynamic_table",
           "dynamic_block_attention", "dynamic_block_attention_op", "form_from_args", "packed_rank_keys",
           "block_masks"]

DynamicForm = Union[BlockTopK, VerticalSlash]
# The lowest packed key: marks entries that are not candidates (they sort last and are never chosen).
NOT_A_CANDIDATE = -(1 << 63)
# Widest key-block row the fused Triton table kernel sorts in registers; wider rows use the PyTorch path.
MAX_KERNEL_KEY_BLOCKS = 4096


# ============================================================== shared helpers


def _check_inputs(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes; returns ``(B, H, Sq, Sk, group)``."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, sq, d = q.shape
    bk, hkv, sk, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head dim")
    if hkv < 1 or h % hkv:
        raise ValueError(f"kv heads {hkv} must divide query heads {h}")
    if sq > sk or sq < 1:
        raise ValueError(f"Sq={sq} must lie in [1, Sk={sk}] (queries are the last Sq positions)")
    return b, h, sq, sk, h // hkv


def _scale(q: Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def packed_rank_keys(scores: Tensor, candidate: Tensor) -> Tensor:
    """int64 keys whose descending order is (score desc, index asc); non-candidates get the lowest key.

    ``scores`` is float32 ``[..., N]``. The float bits are mapped to an int32
    with the same order (negative floats get their magnitude bits flipped).
    """
    n = scores.shape[-1]
    bits = scores.float().contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    low = (n - 1 - torch.arange(n, device=scores.device, dtype=torch.int64))
    keys = ordered * (1 << 32) + low
    return torch.where(candidate, keys, torch.full_like(keys, NOT_A_CANDIDATE))


def _keep_top(keys: Tensor, count: Tensor) -> Tensor:
    """Bool mask of the ``count`` (per row, a tensor) highest keys of each row; ``count`` never exceeds the candidates."""
    ranked = torch.sort(keys, dim=-1, descending=True).values
    pos = (count - 1).clamp(min=0).unsqueeze(-1)
    threshold = torch.gather(ranked, -1, pos)
    return (keys >= threshold) & (count.unsqueeze(-1) > 0) & (keys != NOT_A_CANDIDATE)


def block_geometry(seq_q: int, seq_k: int, block: int, device) -> dict:
    """Per query block a: first/last position; per key block b: first/last key; and nQ, nK."""
    n_q, n_k = -(-seq_q // block), -(-seq_k // block)
    a = torch.arange(n_q, device=device)
    b = torch.arange(n_k, device=device)
    offset = seq_k - seq_q
    return {"n_q": n_q, "n_k": n_k, "first_pos": a * block + offset,
            "last_pos": torch.clamp((a + 1) * block, max=seq_q) - 1 + offset,
            "first_key": b * block, "last_key": torch.clamp((b + 1) * block, max=seq_k) - 1}


def block_masks(seq_q: int, seq_k: int, block: int, causal: bool, device) -> tuple[Tensor, Tensor]:
    """``(allowed, full)`` bool ``[nQ, nK]``: cells with some causally allowed element, and cells all of whose
    elements exist and are allowed (full blocks need no per-element mask; every other kept block is partial)."""
    g = block_geometry(seq_q, seq_k, block, device)
    rows_whole = ((torch.arange(g["n_q"], device=device) + 1) * block <= seq_q)[:, None]
    keys_whole = ((torch.arange(g["n_k"], device=device) + 1) * block <= seq_k)[None, :]
    if causal:
        allowed = g["first_key"][None, :] <= g["last_pos"][:, None]
        full = rows_whole & keys_whole & (g["last_key"][None, :] <= g["first_pos"][:, None])
    else:
        allowed = torch.ones(g["n_q"], g["n_k"], dtype=torch.bool, device=device)
        full = rows_whole & keys_whole
    return allowed, full


def table_from_keep(keep: Tensor, block: int, seq_q: int, seq_k: int, causal: bool) -> BlockTable:
    """The validated BlockTable of a kept-block mask ``[B, H, nQ, nK]`` (full/partial split by :func:`block_masks`)."""
    allowed, full = block_masks(seq_q, seq_k, block, causal, keep.device)
    keep = keep & allowed
    return BlockTable.from_dense(keep, keep & full, block_q=block, block_k=block, seq_q=seq_q, seq_k=seq_k,
                                 causal=causal)


# ============================================================== references


def pool_blocks(x: Tensor, block: int, pool: str) -> Tensor:
    """float32 ``[B, Hx, n, D]``: mean or per-feature max of each block of ``block`` tokens (real tokens only)."""
    b, hx, s, d = x.shape
    n = -(-s // block)
    pad = n * block - s
    xf = x.float()
    if pool == "mean":
        summed = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(b, hx, n, block, d).sum(3)
        counts = torch.clamp(s - torch.arange(n, device=x.device) * block, max=block).to(torch.float32)
        return summed / counts[:, None]
    if pool == "max":
        return torch.nn.functional.pad(xf, (0, 0, 0, pad), value=-math.inf).view(b, hx, n, block, d).amax(3)
    raise ValueError(f"pool={pool!r} is not allowed; expected 'mean' or 'max'")


def sampled_rows(seq_q: int, block: int, rows: int, device) -> tuple[Tensor, Tensor]:
    """``(row, valid)``, each ``[nQ, rows]``: the query rows the ``pool = "rows"`` estimate reads per query block.

    Slot t of block a is row ``last(a) - t * (block // rows)``, ``last(a)`` the
    block's last real row; it is valid when it lies in the block (a short last
    block has fewer). Invalid slots hold row 0 and must be ignored.
    """
    n_q = -(-seq_q // block)
    a = torch.arange(n_q, device=device)[:, None]
    last = torch.clamp((a + 1) * block, max=seq_q) - 1
    row = last - torch.arange(rows, device=device)[None, :] * (block // rows)
    valid = row >= a * block
    return torch.where(valid, row, torch.zeros_like(row)), valid


def sampled_row_scores_ref(q: Tensor, k: Tensor, *, block: int, rows: int, causal: bool,
                           scale: Optional[float] = None) -> Tensor:
    """float32 ``[B, H, nQ, nK]``: the ``pool = "rows"`` estimate, the log of the mean attention mass that the
    sampled rows of query block a (:func:`sampled_rows`) put on key block b (``-inf`` where it is 0).

    Each sampled row's probabilities are the float32 softmax of ``scale * q . k`` over the keys it may see
    (``j <= i + Sk - Sq`` when causal, every key otherwise); cells with no causally allowed element are -inf.
    """
    b, h, sq, sk, group = _check_inputs(q, k)
    dev = q.device
    n_q, n_k = -(-sq // block), -(-sk // block)
    row, valid = sampled_rows(sq, block, rows, dev)
    kf = k.float().repeat_interleave(group, dim=1)
    s = _scale(q, scale) * torch.matmul(q[:, :, row.flatten()].float(), kf.transpose(-1, -2))   # [B, H, nQ*R, Sk]
    if causal:
        pos = row.flatten() + sk - sq
        s = s.masked_fill(torch.arange(sk, device=dev)[None, :] > pos[:, None], -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.nn.functional.pad(p, (0, n_k * block - sk)).view(b, h, n_q, rows, n_k, block).sum(-1)
    p = p * valid[:, :, None]
    mass = p.sum(3) / valid.sum(1).to(torch.float32)[:, None]
    allowed, _ = block_masks(sq, sk, block, causal, dev)
    return torch.log(mass).masked_fill(~allowed, -math.inf)


def block_topk_scores_ref(q: Tensor, k: Tensor, form: BlockTopK, causal: bool, scale: Optional[float]) -> Tensor:
    """float32 ``[B, H, nQ, nK]``: block_topk's estimate of every block pair (step 1 of docs/spec.md)."""
    if form.pool == "rows":
        return sampled_row_scores_ref(q, k, block=form.block, rows=form.rows, causal=causal, scale=scale)
    group = q.shape[1] // k.shape[1]
    qbar = pool_blocks(q, form.block, form.pool)
    kbar = pool_blocks(k, form.block, form.pool).repeat_interleave(group, dim=1)
    return _scale(q, scale) * torch.matmul(qbar, kbar.transpose(-1, -2))


def block_topk_table_ref(q: Tensor, k: Tensor, *, block: int, topk: Optional[int] = None,
                         cdf: Optional[float] = None, min_mass: Optional[float] = None, sink_blocks: int = 1,
                         local_blocks: int = 1, pool: str = "mean", rows: Optional[int] = None, causal: bool = True,
                         scale: Optional[float] = None, scores: Optional[Tensor] = None) -> BlockTable:
    """Reference ``block_topk`` selection (see :class:`sparsecc.forms.BlockTopK`); a table ``[B, H, nQ, ...]``.

    ``scores``: the estimate :func:`block_topk_scores_ref` gives for the same q, k, ``block``, ``pool``, ``rows``,
    ``causal`` and ``scale``, when the caller already has it (rules that differ only in their budget share it).
    """
    form = BlockTopK(block=block, topk=topk, cdf=cdf, min_mass=min_mass, sink_blocks=sink_blocks,
                     local_blocks=local_blocks, pool=pool, rows=rows)
    b, h, sq, sk, group = _check_inputs(q, k)
    dev = q.device
    if scores is None:
        scores = block_topk_scores_ref(q, k, form, causal, scale)
    elif scores.shape[:2] != (b, h) or scores.shape[-2:] != (-(-sq // block), -(-sk // block)):
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not match q, k and block={block}")
    g = block_geometry(sq, sk, block, dev)
    allowed, _ = block_masks(sq, sk, block, causal, dev)
    kb = torch.arange(g["n_k"], device=dev)[None, :]
    lo, hi = (g["first_pos"] // block)[:, None], (g["last_pos"] // block)[:, None]
    band = (kb >= lo - local_blocks + 1) & (kb <= hi) if local_blocks > 0 else torch.zeros_like(allowed)
    forced = allowed & ((kb < sink_blocks) | band)
    cand = (allowed & ~forced).expand(b, h, -1, -1)
    if form.min_mass is not None:
        # A threshold on p needs no ranking: every candidate is judged alone.
        keep = forced | (cand & (block_probabilities(scores, allowed) >= form.min_mass))
        return table_from_keep(keep, block, sq, sk, causal)
    keys = packed_rank_keys(scores, cand)
    n_cand = cand.sum(-1)
    if form.topk is not None:
        count = torch.clamp(n_cand, max=form.topk)
    else:
        count = _cdf_count(scores, allowed, forced, keys, n_cand, form.cdf)
    keep = forced | _keep_top(keys, count)
    return table_from_keep(keep, block, sq, sk, causal)


def block_probabilities(scores: Tensor, allowed: Tensor) -> Tensor:
    """p of the ``cdf`` and ``min_mass`` rules: the float32 softmax of the estimates over each query block's allowed
    key blocks (0 elsewhere); with ``pool = "rows"`` it is the sampled attention mass itself."""
    masked = scores.masked_fill(~allowed, -math.inf)
    row_max = masked.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(masked - row_max)
    denom = e.sum(-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def _cdf_count(scores: Tensor, allowed: Tensor, forced: Tensor, keys: Tensor, n_cand: Tensor, cdf: float) -> Tensor:
    """How many ranked candidates the cdf rule keeps: those whose mass before them (forced + higher ranked) < cdf."""
    p = block_probabilities(scores, allowed)
    forced_mass = (p * forced).sum(-1, keepdim=True)
    order = torch.sort(keys, dim=-1, descending=True).indices
    ranked_p = torch.gather(p, -1, order)
    valid = torch.arange(p.shape[-1], device=p.device) < n_cand.unsqueeze(-1)
    ranked_p = torch.where(valid, ranked_p, torch.zeros_like(ranked_p))
    before = forced_mass + torch.cumsum(ranked_p, -1) - ranked_p
    if cdf >= 1.0:   # all the mass: every candidate, although the float32 running sum reaches 1 before the last
        return n_cand
    return (valid & (before < cdf)).sum(-1)


def vertical_slash_scores_ref(q: Tensor, k: Tensor, *, last_q: int, causal: bool = True,
                              scale: Optional[float] = None) -> tuple[Tensor, Tensor, int]:
    """Column and diagonal scores of the last ``last_q`` queries: ``(col [B, H, Sk], diag [B, H, T], t_min)``.

    ``diag[..., i]`` is the score of diagonal ``t = t_min + i`` (``t = p - j``);
    ``t_min`` is 0 when causal and ``p_first - (Sk - 1)`` otherwise, with
    ``p_first`` the first scoring row's position: these are exactly the diagonals
    a scoring row reaches, the only candidates of the selection (docs/spec.md).
    """
    b, h, sq, sk, group = _check_inputs(q, k)
    n_last = min(last_q, sq)
    offset = sk - sq
    pos = torch.arange(sq - n_last, sq, device=q.device) + offset
    kf = k.float().repeat_interleave(group, dim=1)
    s = _scale(q, scale) * torch.matmul(q[:, :, sq - n_last:].float(), kf.transpose(-1, -2))
    j = torch.arange(sk, device=q.device)
    if causal:
        s = s.masked_fill(j[None, :] > pos[:, None], -math.inf)
    p = torch.softmax(s, dim=-1)
    col = p.sum(-2)
    t_min = 0 if causal else int(pos[0]) - (sk - 1)
    n_diag = sk - t_min
    index = (pos[:, None] - j[None, :] - t_min).clamp(0, n_diag - 1).expand_as(p)
    diag = torch.zeros(b, h, n_diag, dtype=torch.float32, device=q.device).scatter_add_(
        -1, index.flatten(-2), p.flatten(-2))
    return col, diag, t_min


def dynamic_table_ref(q: Tensor, k: Tensor, form: DynamicForm, causal: bool, scale: Optional[float]) -> BlockTable:
    """The reference table of either dynamic form."""
    if isinstance(form, BlockTopK):
        return block_topk_table_ref(q, k, block=form.block, topk=form.topk, cdf=form.cdf, min_mass=form.min_mass,
                                    sink_blocks=form.sink_blocks, local_blocks=form.local_blocks, pool=form.pool,
                                    rows=form.rows, causal=causal, scale=scale)
    if isinstance(form, VerticalSlash):
        raise TypeError("vertical_slash has no block table: its key ranges start anywhere (codegen/vertical_slash.py)")
    raise TypeError(f"not a dynamic attention form: {form!r}")


def dynamic_attention_ref(q: Tensor, k: Tensor, v: Tensor, *, form: DynamicForm, causal: bool,
                          scale: Optional[float] = None, mask: Optional[Tensor] = None) -> Tensor:
    """Reference dynamic attention: block_topk's reference table, then block-sparse reference attention over it;
    vertical_slash's own reference (``vertical_slash.py``), dense when not causal (docs/spec.md).

    The model's own ``mask`` is not used by the estimate; it is intersected afterwards, token by token.
    """
    from sparsecc.codegen.block_attention import block_sparse_attention_ref, dense_attention_ref

    if isinstance(form, VerticalSlash):
        if not causal:
            return dense_attention_ref(q, k, v, scale=_scale(q, scale), causal=False, mask=mask).to(q.dtype)
        from sparsecc.codegen.vertical_slash import vertical_slash_attention_ref
        return vertical_slash_attention_ref(q, k, v, form=form, scale=_scale(q, scale), mask=mask)
    table = dynamic_table_ref(q, k, form, causal, scale)
    return block_sparse_attention_ref(q, k, v, table=table, scale=_scale(q, scale), mask=mask)


# ============================================================== GPU path


def _kernel_ok(q: Tensor, k: Tensor) -> bool:
    return q.device.type == "cuda" and q.device == k.device and q.shape[-1] <= 256


def dynamic_table(q: Tensor, k: Tensor, form: DynamicForm, causal: bool, scale: Optional[float]) -> BlockTable:
    """The form's table for these inputs: Triton on CUDA, the reference elsewhere."""
    if not _kernel_ok(q, k):
        return dynamic_table_ref(q, k, form, causal, scale)
    from sparsecc.codegen import dynamic_attention_kernels as kern

    _check_inputs(q, k)
    if isinstance(form, BlockTopK):
        if -(-k.shape[2] // form.block) > MAX_KERNEL_KEY_BLOCKS:
            return dynamic_table_ref(q, k, form, causal, scale)
        return kern.block_topk_table(q, k, form, causal, _scale(q, scale))
    raise TypeError(f"not a dynamic attention form: {form!r}")


def dynamic_block_attention(q: Tensor, k: Tensor, v: Tensor, *, form: DynamicForm, causal: bool,
                            scale: Optional[float] = None, mask: Optional[Tensor] = None,
                            out: Optional[Tensor] = None) -> Tensor:
    """Dynamic attention: :func:`dynamic_table`, then the block-table flash kernel (reference off CUDA).

    ``out``, when given, receives the output (tests pass a poisoned buffer).
    vertical_slash has no block table: it runs its own kernels (``vertical_slash.py``).
    """
    from sparsecc.codegen import block_attention as ba

    if isinstance(form, VerticalSlash):
        from sparsecc.codegen.vertical_slash import vertical_slash_attention
        result = vertical_slash_attention(q, k, v, form=form, causal=causal, scale=_scale(q, scale), mask=mask)
        if out is None:
            return result
        out.copy_(result)
        return out
    table = dynamic_table(q, k, form, causal, scale)
    s = _scale(q, scale)
    if ba.attention_kernel_ok(q, k, v, s) and q.device.type == "cuda":
        # Straight to the launch: block_sparse_attention's dense-table test reads the table back
        # (a host sync) and caches it per table object, neither of which suits a fresh table per call.
        return ba.launch_prefill(q, k, v, ba.check_mask(mask, *q.shape[:3], k.shape[2]), s, causal, False,
                                  table=table, out=out)
    result = ba.block_sparse_attention_ref(q, k, v, table=table, scale=s, mask=mask)
    if out is None:
        return result
    out.copy_(result)
    return out


def dynamic_block_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal: bool,
                               form: DynamicForm) -> Tensor:
    """The ``torch.ops.sparsecc.dynamic_block_attention`` kernel callable (argument order of the op's reference)."""
    return dynamic_block_attention(q, k, v, form=form, causal=causal, scale=scale, mask=mask)


def form_from_args(form: str, block: int, topk: int, cdf: float, min_mass: float, sink_blocks: int,
                   local_blocks: int, pool: str, rows: int, last_q: int, vertical: int, slash: int) -> DynamicForm:
    """Rebuild the form from the op's flat arguments (``topk`` 0, ``cdf`` / ``min_mass`` 0.0 and ``rows`` 0 mean
    unset)."""
    if form == "block_topk":
        return BlockTopK(block=block, topk=topk or None, cdf=cdf or None, min_mass=min_mass or None,
                         sink_blocks=sink_blocks,
                         local_blocks=local_blocks, pool=pool, rows=rows or None)
    if form == "vertical_slash":
        return VerticalSlash(last_q=last_q, vertical=vertical, slash=slash, block=block)
    raise ValueError(f"form={form!r} is not allowed; expected 'block_topk' or 'vertical_slash'")


def op_args(form: DynamicForm) -> tuple:
    """The op's flat form arguments, in order: the inverse of :func:`form_from_args`."""
    if isinstance(form, BlockTopK):
        return ("block_topk", form.block, form.topk or 0, float(form.cdf or 0.0), float(form.min_mass or 0.0),
                form.sink_blocks, form.local_blocks, form.pool, form.rows or 0, 0, 0, 0)
    return ("vertical_slash", form.block, 0, 0.0, 0.0, 0, 0, "mean", 0, form.last_q, form.vertical, form.slash)
