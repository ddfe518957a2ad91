"""Query positions read from the mask, the attention references that use them, and how a mask splits a batch
(left padding, causal elements; docs/spec.md).

When an attention site is not causal, has a mask and fewer queries than keys
(a static KV cache, right-padded decode), query row ``i`` sits at
``min(i + Sk - Sq, the last key its mask keeps)``. This module holds that rule
and the per-form references built on it: ``streaming`` and ``block_sparse``
place each row by its position; the dynamic forms attend densely on rows the
mask moves. Nothing here imports Triton.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import List, Optional

import torch

from sparsecc.forms import MASKED_LOGIT_MAX



def mask_4d(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` viewed with 4 dims ``[B|1, H|1, Sq|1, Sk]`` (leading size-1 dims added, nothing copied)."""
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _mask_keeps(mask: torch.Tensor, seq_k: int) -> torch.Tensor:
    """A mask as a 4-d bool "this key takes part" tensor, broadcast along the keys to ``seq_k``."""
    m4 = mask_4d(mask)
    keep = m4 if m4.dtype == torch.bool else m4 > MASKED_LOGIT_MAX
    return keep.expand(*keep.shape[:3], seq_k)


# Set while an op runs a form on what remains of left-padded elements (``padding_cut``): their keys already start
# at the first shown key, and a head group's part of a mask must not find a padding of its own.
_PADDING_CUT = contextvars.ContextVar("sparsecc_padding_cut", default=False)


@contextlib.contextmanager
def padding_cut():
    """Within this block the left-padding rule has been applied: :func:`leading_padding` finds none."""
    token = _PADDING_CUT.set(True)
    try:
        yield
    finally:
        _PADDING_CUT.reset(token)


def padding_cut_applied() -> bool:
    """Whether the caller runs inside :func:`padding_cut` (the padding rules were applied above it)."""
    return _PADDING_CUT.get()


def padding_is_cut() -> bool:
    """True inside :func:`padding_cut`, where :func:`leading_padding` finds no padding."""
    return _PADDING_CUT.get()


def leading_padding(mask: Optional[torch.Tensor], batch: int, seq_q: int, seq_k: int) -> Optional[torch.Tensor]:
    """Per batch element, how many leading keys its mask hides from every query row and head: its left padding
    (docs/spec.md, "Left padding"). Positions then count from that key: a left-padded sequence attends as it
    does alone. Returns int32 ``[batch]`` on the mask's device without a host sync (``seq_k`` for an element
    whose mask hides every key), or None without a mask or inside :func:`padding_cut`.
    """
    if mask is None or _PADDING_CUT.get():
        return None
    return _first_shown(_shown_keys(_mask_keeps(mask, seq_k)), seq_k).to(torch.int32).expand(batch).contiguous()


def _shown_keys(keep: torch.Tensor) -> torch.Tensor:
    """``[B|1, Sk]``: the keys some query row of some head keeps (``keep`` from :func:`_mask_keeps`)."""
    return keep.flatten(1, 2).any(1)


def _first_shown(shown: torch.Tensor, seq_k: int) -> torch.Tensor:
    """Per element, its first shown key (``seq_k`` when none): its left padding."""
    return torch.where(shown, torch.arange(seq_k, device=shown.device), seq_k).amin(-1)


def padding_cuts(mask: Optional[torch.Tensor], batch: int, seq_q: int, seq_k: int) -> Optional[list]:
    """Per batch element ``(o, first row, end, end row)`` (docs/spec.md, "Left padding" and "Right padding"): the
    form runs on rows ``first row .. end row - 1`` and keys ``o .. end - 1``; the rows before and after are its
    padding rows. ``o`` is its left padding (:func:`leading_padding`); the leading padding rows sit before key ``o``
    (``i < o`` with as many queries as keys, else ``i + end - Sq < o``) or keep no key (a static cache's padding
    rows). The trailing keys its mask hides from every row and head are its right padding ``r``: ``end = Sk - r``.
    With as many queries as keys (row ``i`` is key ``i``'s query) ``end row = Sq - r``; with fewer, ``end row = Sq``
    and the tail is cut only when each row after the leading padding rows then sits at ``i + end - Sq`` exactly
    where its mask ends (the last key it keeps, over heads): a static cache's new tokens, not a right-padded chunk
    whose last rows are padding (those keep their mask positions). None when no element is padded, without a mask,
    or inside :func:`padding_cut`. One read-back to the host.
    """
    if mask is None or _PADDING_CUT.get():
        return None
    keep = _mask_keeps(mask, seq_k)
    shown = _shown_keys(keep)
    keeps_a_key = keep.any(-1).any(1).expand(batch, seq_q)                        # [B, Sq], any head
    leading_empty = torch.where(keeps_a_key, torch.arange(seq_q, device=mask.device), seq_q).amin(-1)
    starts = _first_shown(shown, seq_k).long().expand(batch)
    last_shown = torch.where(shown, torch.arange(seq_k, device=mask.device), -1).amax(-1)   # right padding: after it
    ends = torch.maximum(last_shown.long().expand(batch) + 1, starts)

    def leading_rows(ends):   # rows before key o at their positions, or keeping no key
        offset = ends - seq_q if seq_q < seq_k else torch.zeros_like(ends)   # Sq == Sk: row i is key i's query
        return torch.maximum((starts - offset).clamp(0, seq_q), leading_empty)
    if seq_q < seq_k:   # cut when every row then sits where its mask ends (a static cache's new tokens)
        last_kept = torch.where(keep, torch.arange(seq_k, device=mask.device), -1).amax(-1).amax(1)
        index = torch.arange(seq_q, device=mask.device)[None, :]
        placed = (last_kept.expand(batch, seq_q) == index + (ends - seq_q)[:, None]) | \
            (index < leading_rows(ends)[:, None])
        ends = torch.where(placed.all(-1), ends, seq_k)
    rows = leading_rows(ends)
    end_rows = torch.maximum(ends - (seq_k - seq_q), rows) if seq_q == seq_k else torch.full_like(rows, seq_q)
    cuts = [tuple(c) for c in torch.stack([starts, rows, ends, end_rows], -1).tolist()]
    return cuts if any(c != (0, 0, seq_k, seq_q) for c in cuts) else None


def cut_element(mask: torch.Tensor, rows: int, start: int, end_rows: Optional[int] = None,
                end: Optional[int] = None) -> torch.Tensor:
    """A 4-d mask of query rows ``rows .. end_rows - 1`` and keys ``start .. end - 1`` (size-1 dims, which
    broadcast, kept; None: to the end)."""
    m = mask if mask.shape[2] == 1 else mask[:, :, rows:end_rows]
    return m if m.shape[3] == 1 else m[..., start:end]


def by_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
               causal: bool, scale: float, run) -> Optional[torch.Tensor]:
    """docs/spec.md's padding rules for the ops that decide on the host: each padded batch element
    (:func:`padding_cuts`) runs ``run(q, k, v, mask)`` on its keys from ``o`` to its right padding and its rows
    between its padding rows, inside :func:`padding_cut`, so positions count from its first key, estimates see
    none of its padding, and it attends as it does alone; its padding rows attend densely (:func:`dense_rows`).
    Elements are grouped by their cut. Returns None when no element is padded (or the call is causal, or has no
    mask).
    """
    if mask is None or causal:
        return None
    sq = q.shape[2]
    cuts = padding_cuts(mask, q.shape[0], sq, k.shape[2])
    if cuts is None:
        return None
    m4 = mask_4d(mask)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    for cut in sorted(set(cuts)):
        start, rows, end, end_rows = cut
        members = [i for i, c in enumerate(cuts) if c == cut]
        if len(members) == len(cuts):   # one cut for the whole batch: views, no copies
            batch, qb, kb, vb, mb = slice(None), q, k, v, m4
        else:
            batch = torch.tensor(members, device=q.device)
            qb, kb, vb = q[batch], k[batch], v[batch]
            mb = m4 if m4.shape[0] == 1 else m4[batch]
        for r0, r1 in ((0, rows), (end_rows, sq)):
            if r1 > r0:
                pad_mask = mb if mb.shape[2] == 1 else mb[:, :, r0:r1]
                out[batch, :, r0:r1] = dense_rows(qb[:, :, r0:r1], kb, vb, pad_mask, scale).to(q.dtype)
        if rows < end_rows:
            with padding_cut():
                out[batch, :, rows:end_rows] = run(qb[:, :, rows:end_rows], kb[:, :, start:end],
                                                   vb[:, :, start:end], cut_element(mb, rows, start, end_rows, end))
    return out


def by_elements(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                flags: torch.Tensor, run) -> torch.Tensor:
    """``run(q, k, v, mask, flag)`` on the batch elements ``flags`` (bool ``[B]``) marks, with ``flag`` True, then
    on the others with ``flag`` False: a batch whose elements are decided differently (causal or not, dense or
    not) is split, so a sequence's result never depends on its batch-mates'."""
    m4 = None if mask is None else mask_4d(mask)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    flags = flags.to(q.device)
    for batch, flag in ((flags.nonzero().flatten(), True), ((~flags).nonzero().flatten(), False)):
        if batch.numel():
            mb = m4 if m4 is None or m4.shape[0] == 1 else m4[batch]
            out[batch] = run(q[batch], k[batch], v[batch], mb, flag)
    return out


def mask_query_positions(mask: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """Query positions when fewer queries than keys come with a mask (docs/spec.md, "Attention forms").

    Row ``i`` sits at ``min(i + Sk - Sq, the last key its mask lets it
    attend)``; a row that may attend nothing sits at ``i + Sk - Sq``. A static
    KV cache hides its unwritten tail with the mask, so its rows sit at their
    true positions; an all-zero mask changes nothing. Returns int64
    ``[B|1, H|1, Sq]`` (the mask's own batch and head sizes), on the device,
    without a host sync.
    """
    keep = _mask_keeps(mask, seq_k)
    index = torch.arange(seq_k, device=mask.device)
    last = torch.where(keep, index, -1).amax(-1)
    default = torch.arange(seq_q, device=mask.device) + (seq_k - seq_q)
    return torch.where(last >= 0, torch.minimum(last, default), default)


def mask_rows_moved(mask: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """Bool ``[B|1, H|1, Sq]``: rows whose mask position is not the default ``i + Sk - Sq``."""
    default = torch.arange(seq_q, device=mask.device) + (seq_k - seq_q)
    return mask_query_positions(mask, seq_q, seq_k) != default


def mask_is_causal(mask: torch.Tensor, seq_q: int, seq_k: int, rows_per_chunk: int = 1024,
                   positions_from_mask: bool = False) -> torch.Tensor:
    """Per batch element of the mask, whether it removes every key after each query's position
    ``p = i + Sk - Sq`` (bool False, or additive <= -1e4): a causal mask passed as a tensor, padded or not.
    With ``positions_from_mask`` the positions are :func:`mask_query_positions` (a static cache's rows).

    Returns a bool ``[B|1]`` tensor (the mask's own batch size, 1 when it has fewer than 4 dims). Reads the
    mask ``rows_per_chunk`` rows at a time (never a second ``Sq x Sk`` tensor).
    """
    keep = _mask_keeps(mask, seq_k)
    offset = seq_k - seq_q
    keys = torch.arange(seq_k, device=mask.device)
    placed = mask_query_positions(mask, seq_q, seq_k) if positions_from_mask and seq_q < seq_k else None
    if keep.shape[-2] == 1 and placed is None:   # one row broadcast to every query: the first query decides
        return ~keep[..., offset + 1:].flatten(1).any(-1)
    keep = keep.expand(*keep.shape[:2], seq_q, seq_k)
    later = torch.zeros(keep.shape[0], dtype=torch.bool, device=mask.device)
    for r0 in range(0, seq_q, rows_per_chunk):
        r1 = min(seq_q, r0 + rows_per_chunk)
        if placed is None:
            positions = torch.arange(r0, r1, device=mask.device)[:, None] + offset
        else:
            positions = placed[..., r0:r1, None]
        later = later | (keep[..., r0:r1, :] & (keys > positions)).flatten(1).any(-1)
    return ~later


def causal_batch_elements(mask: Optional[torch.Tensor], seq_q: int, seq_k: int,
                          positions_from_mask: bool = False) -> torch.Tensor:
    """Per batch element of a call that is not causal, whether no query row may attend a key after its position
    (docs/spec.md, ``block_sparse``'s random draws): a mask that keeps no such key (:func:`mask_is_causal`, at
    the mask's positions with ``positions_from_mask``), or one query row without a mask (it sits at the last
    key). Returns a bool ``[B|1]`` tensor (1 without a mask, or when the mask has no batch dimension).
    """
    if mask is None:
        return torch.tensor([seq_q == 1])
    if seq_q > seq_k:
        return torch.zeros(mask_4d(mask).shape[0], dtype=torch.bool, device=mask.device)
    return mask_is_causal(mask, seq_q, seq_k, positions_from_mask=positions_from_mask)


def mask_query_end(mask: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """Per batch element, the position of the last query row (``mask_query_positions``), as int32 ``[B]``.

    For the decode kernel, which takes one position per batch element: it
    serves masks without a head dimension (HF's), where this is exact.
    """
    return mask_query_positions(mask, seq_q, seq_k)[:, 0, -1].to(torch.int32)


def streaming_attention_from_mask_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                      scale: float, sink: List[int], window: List[int],
                                      rows_per_chunk: int = 256) -> torch.Tensor:
    """Reference of ``streaming_attention_from_mask``: streaming attention with query positions from the mask.

    Query row ``i`` of batch ``b`` and head ``h`` sits at ``p = mask_query_positions(mask)[b, h, i]``; key
    ``j`` takes part iff the mask keeps it and (``j < sink`` or ``p < sink`` or ``|p - j| < window``), the
    bidirectional streaming rule (the site is not causal; a causal-shaped mask, such as a static cache's,
    removes the keys after ``p`` itself), with each element's sink moved past its left padding
    (:func:`leading_padding`). A row with no key taking part gives zeros. Computed in float32,
    ``rows_per_chunk`` query rows at a time.
    """
    from sparsecc.codegen.block_attention import FULL_WINDOW, streaming_rules_per_head

    b, h, sq, _ = q.shape
    sk = k.shape[2]
    sinks, windows = streaming_rules_per_head(sink, window, h)
    dev = q.device
    sink_t = torch.tensor(sinks, device=dev).view(1, h, 1, 1)
    starts = leading_padding(mask, b, sq, sk)
    if starts is not None:
        sink_t = sink_t + starts.view(b, 1, 1, 1)
    window_t = torch.tensor([sk + sq + 1 if w == FULL_WINDOW else w for w in windows], device=dev).view(1, h, 1, 1)
    positions = mask_query_positions(mask, sq, sk)                       # [B|1, H|1, Sq]
    keys = torch.arange(sk, device=dev)

    def rule(r0: int, r1: int) -> torch.Tensor:
        p = positions[:, :, r0:r1, None]
        return (keys < sink_t) | (p < sink_t) | ((p - keys).abs() < window_t)

    return _attend_by_rows(q, k, v, mask, scale, rule, rows_per_chunk)


def _attend_by_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                    rule, rows_per_chunk: int) -> torch.Tensor:
    """float32 attention where ``rule(r0, r1)`` (bool ``[B|1, H|1, r1 - r0, Sk]``) says which keys rows
    ``r0:r1`` may attend, and-ed with a bool mask or plus an additive one; rows with no key give zeros."""
    b, h, sq, _ = q.shape
    hkv = k.shape[1]
    m4 = mask_4d(mask)
    kf = k.float().repeat_interleave(h // hkv, 1)
    vf = v.float().repeat_interleave(h // hkv, 1)
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=torch.float32, device=q.device)
    for r0 in range(0, sq, rows_per_chunk):
        r1 = min(sq, r0 + rows_per_chunk)
        keep = rule(r0, r1)
        tile = m4[:, :, r0:r1] if m4.shape[2] != 1 else m4
        logits = (q[:, :, r0:r1].float() @ kf.transpose(-1, -2)) * scale
        if tile.dtype == torch.bool:
            keep = keep & tile
        else:
            logits = logits + tile.float()
        logits = logits.masked_fill(~keep, float("-inf"))
        out[:, :, r0:r1] = torch.softmax(logits, dim=-1).nan_to_num(0.0) @ vf
    return out.to(q.dtype)


def block_sparse_attention_from_mask_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                                         scale: float, table, rows_per_chunk: int = 256) -> torch.Tensor:
    """``block_sparse`` attention with query positions from the mask (docs/spec.md, "Attention forms").

    ``table`` is the form's bidirectional layout over ``Sk`` queries and ``Sk``
    keys (a ``sparsecc.layouts.BlockTable`` with one row block per position
    block). Query row ``i`` of batch ``b`` and head ``h`` sits at
    ``p = mask_query_positions(mask)[b, h, i]`` and reads row block
    ``p // block`` of the table; key ``j`` takes part iff its block is kept
    there and the mask keeps it (additive masks are added to the logits). A
    row with no key taking part gives zeros. Computed in float32,
    ``rows_per_chunk`` query rows at a time.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if table.causal or table.seq_q != sk or table.seq_k != sk or table.kv_num_blocks.shape[0] != 1:
        raise ValueError(f"expected a bidirectional batch-1 layout over {sk} x {sk} positions, got {table}")
    dev = q.device
    blocks = table.dense_block_rows(0, table.num_q_blocks).to(dev)[0]        # [Ht, nQ, nK]
    blocks = blocks.expand(h, *blocks.shape[1:])
    positions = mask_query_positions(mask, sq, sk).expand(b, h, sq)
    heads = torch.arange(h, device=dev)[None, :, None]
    key_block = torch.arange(sk, device=dev) // table.block_k

    def rule(r0: int, r1: int) -> torch.Tensor:
        row_blocks = positions[:, :, r0:r1] // table.block_q                  # [B, H, r]
        return blocks[heads, row_blocks][..., key_block]                      # [B, H, r, Sk]

    return _attend_by_rows(q, k, v, mask, scale, rule, rows_per_chunk)


def dense_rows_where_moved(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The dynamic forms' rule: rows the mask moves (``mask_rows_moved``) attend densely, under the mask alone.

    ``out`` is the form's output with every row at ``i + Sk - Sq``. Reads the
    moved rows back to the host once; when none moved, ``out`` is returned as is.
    A moved row whose mask keeps no key gives zeros.
    """
    sq, sk = q.shape[2], k.shape[2]
    moved = mask_rows_moved(mask, sq, sk)
    if not bool(moved.any()):
        return out
    return torch.where(moved[..., None], dense_rows(q, k, v, mask, scale).to(out.dtype), out)


def dense_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense attention of ``q``'s rows under ``mask`` alone, in float32 as the sparse references compute (whatever
    dtype an additive mask has); a row whose mask keeps no key gives zeros."""
    attn_mask = mask if mask.dtype == torch.bool else mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                                           scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.nan_to_num(0.0)
