"""The dense attention a sparse site replaced, and the run-time branches that switch an attention op to it
(docs/spec.md): the cost model's crossover (``dense_below``) and the model's own sliding window (``own_window``),
both counted per batch element from its left padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from sparsecc.codegen.mask_positions import by_elements, leading_padding, mask_query_positions, trailing_padding

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

    Both count an element's keys from its left padding ``o`` (docs/spec.md, "Left padding") on a call with a mask
    that is not causal, and the crossover leaves out its right padding too ("Right padding"), so a padded sequence
    switches exactly where it does alone. That reads the mask back
    once, and only when some element may run dense (a crossover is set, or ``Sk - Sq`` reaches the window).
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    reaches_window = own_window > 0 and seq_k - seq_q >= own_window - 1
    if not reaches_window and dense_below <= 0:
        return False
    padding = None if mask is None or causal else leading_padding(mask, q.shape[0], seq_q, seq_k)
    if padding is None:
        if dense_below > 0 and seq_k < dense_below:
            return True
        if not reaches_window:
            return False
        if positions_from_mask and mask is not None and seq_q < seq_k:
            return int(mask_query_positions(mask, seq_q, seq_k)[..., 0].max()) >= own_window - 1
        return True
    keys = seq_k - padding.long()
    if dense_below > 0:   # the element's keys without its padding at either end
        keys = keys - trailing_padding(mask, q.shape[0], seq_q, seq_k).long()
    dense = torch.zeros_like(keys, dtype=torch.bool)
    if dense_below > 0:
        dense |= keys < dense_below
    if reaches_window:
        first = seq_k - seq_q
        if positions_from_mask and seq_q < seq_k:
            first = mask_query_positions(mask, seq_q, seq_k)[..., 0].amax(-1).expand(q.shape[0])
        dense |= first - padding.long() >= own_window - 1
    # An element whose mask hides every key has no position; its rows are padding rows (the forms' path).
    flags = (dense & (padding < seq_k)).cpu()
    return True if bool(flags.all()) else False if not bool(flags.any()) else flags


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
