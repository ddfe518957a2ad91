"""The dense attention a sparse site replaced, and the run-time branches that switch an attention op to it
(docs/spec.md): the cost model's crossover (``dense_below``) and the model's own sliding window (``own_window``),
both counted per batch element from its left padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from sparsecc.codegen.mask_positions import by_elements, mask_query_positions, padding_cut_applied, padding_cuts

__all__ = ["dense_attention", "with_causal", "runs_dense", "dense_by_element"]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                    causal: bool) -> torch.Tensor:
    """The dense attention a sparse site replaced (SDPA with GQA), for the below-crossover branch.

    ``causal`` here always comes with seq_q == seq_k (the compiler keeps other
    causal sites dense), where SDPA's top-left causal mask is the same as ours.
    """
    if causal and mask is not None:   # SDPA refuses is_causal together with a mask
        mask, causal = with_causal(mask, q.shape[2], k.shape[2]), False
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def with_causal(mask: torch.Tensor, seq_q: int, seq_k: int) -> torch.Tensor:
    """Intersect a bool or additive mask with a bottom-right causal mask."""
    keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=mask.device).tril(seq_k - seq_q)
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def runs_dense(q: torch.Tensor, k: torch.Tensor, dense_below: int, own_window: int,
               mask: Optional[torch.Tensor] = None, positions_from_mask: bool = False, causal: bool = False):
    """Whether an attention op runs the dense attention it replaced for this call (docs/spec.md): True (every
    batch element), False (none), or a bool ``[B]`` tensor when the elements differ (:func:`dense_by_element`).

    * below the cost model's crossover (``dense_below``: fewer keys than that), branched on at run time;
    * with the model's own sliding window ``own_window`` (> 0), when the first query row sits at position
      ``own_window - 1`` or later: ``Sk - Sq``, or the row's mask position when positions come from the mask (a
      static cache's buffer). The model's cache keeps only its last ``own_window - 1`` tokens (transformers'
      sliding-window layers), so from then on the first key need not be token 0 and the forms' positions are
      unknown.

    On a call with a mask that is not causal both are decided per batch element on what the forms see of it
    (docs/spec.md, "Left padding", "Right padding"): its first row after its padding rows, its keys from its left
    padding ``o`` up to its last row's position, positions counted from ``o``; so a padded sequence switches exactly
    where it does alone. That reads the mask back, only when some element may run dense (a crossover is set, or
    ``Sk - Sq`` reaches the window). Without a mask the call is one element: ``Sk`` keys, first row at ``Sk - Sq``.
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    reaches_window = own_window > 0 and seq_k - seq_q >= own_window - 1
    if not reaches_window and dense_below <= 0:
        return False
    if mask is None or causal or padding_cut_applied():
        if dense_below > 0 and seq_k < dense_below:
            return True
        if not reaches_window:
            return False
        if positions_from_mask and mask is not None and seq_q < seq_k:
            return int(mask_query_positions(mask, seq_q, seq_k)[..., 0].max()) >= own_window - 1
        return True
    batch = q.shape[0]
    cuts = padding_cuts(mask, batch, seq_q, seq_k) or [(0, 0, seq_k, seq_q)] * batch
    positions = None
    if positions_from_mask and seq_q < seq_k:   # [B|1, Sq], the latest over heads
        positions = mask_query_positions(mask, seq_q, seq_k).amax(1).cpu()

    def position(element: int, row: int) -> int:
        if positions is None:
            return row + seq_k - seq_q
        return int(positions[element if positions.shape[0] > 1 else 0, row])

    flags = []
    for element, (start, rows, end, end_rows) in enumerate(cuts):
        if rows >= end_rows:   # padding rows only: no position, the forms' path attends them densely
            flags.append(False)
            continue
        dense = dense_below > 0 and position(element, end_rows - 1) + 1 - start < dense_below
        if reaches_window:
            dense = dense or position(element, rows) - start >= own_window - 1
        flags.append(dense)
    return True if all(flags) else False if not any(flags) else torch.tensor(flags)


def dense_by_element(dense, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float, causal: bool, run) -> Optional[torch.Tensor]:
    """Apply :func:`runs_dense`'s answer ``dense``: None when no element runs dense (the caller goes on),
    dense attention when all do, else dense attention on the elements it marks and ``run(q, k, v, mask)`` (the
    op with its dense branches off) on the others."""
    if dense is False:
        return None
    if dense is True:
        return dense_attention(q, k, v, mask, scale, causal)
    return by_elements(q, k, v, mask, dense, lambda q, k, v, m, is_dense: (
        dense_attention(q, k, v, m, scale, causal) if is_dense else run(q, k, v, m)))
