"""Attention under per-head keep masks, and the dense pass and replays the KL judge measures with.

:func:`keep_attention` is a transformers attention function: the model's own SDPA attention, with one form per
query head (``Dense``, ``Streaming``, or one ``BlockTopK`` for every head) applied as a keep mask written from
docs/spec.md's rules; :func:`attention_forms` switches it on for chosen layers. :func:`dense_pass` runs a decoder LM
once and caches every layer's input and the dense next-token distribution of the scored positions;
:func:`replay` runs the layers from one cached input again under chosen forms, and :func:`measure_kl` gives the mean
KL(dense || sparse) per scored position. :mod:`sparsecc.tune.attention_kl` (the KL judge) builds on these;
:mod:`sparsecc.tune.retrieval` uses :func:`decoder_parts`.

Positions (docs/spec.md): query row i of a call with Sq queries and Sk keys sits at p = i + Sk - Sq. A ``streaming``
head keeps key j for query p iff j <= p and (j < sink or p - j < window).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sparsecc.forms import BlockTopK, Dense, Streaming
from sparsecc.tune.attention import dynamic_mask, streaming_mask

KEEP_IMPLEMENTATION = "sparsecc_keep"
"""The transformers attention-implementation name under which :func:`keep_attention` is registered."""
DEFAULT_TOPK = 1024
_KEEP_ATTR = "_sparsecc_keep_forms"


# ---------------------------------------------------------------------------------------------------------------
# the masked attention


def keep_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A transformers attention function: the model's SDPA attention, with per-head keep masks.

    ``module.<_sparsecc_keep_forms>`` (set by :func:`attention_forms`) lists one form per query head (``Dense``,
    ``Streaming``, or one ``BlockTopK`` for every head); without it the call is transformers' own SDPA attention.
    q [B, H, Sq, D], k and v [B, Hkv, Sk, D]; returns ([B, Sq, H, D], None) like transformers' attention functions.
    A ``BlockTopK`` head keeps the token mask of its reference selection (``tune.attention.dynamic_mask``) from this
    call's q and k, as the compiled op would.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    forms = getattr(module, _KEEP_ATTR, None)
    if forms is None or all(isinstance(f, Dense) for f in forms):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if len(forms) != h:
        raise ValueError(f"{len(forms)} forms given for an attention call with {h} query heads")
    rep = h // hkv
    keys = torch.arange(sk, device=query.device)
    causal = keys[None, :] <= (torch.arange(sq, device=query.device) + (sk - sq))[:, None]
    extra = None
    if attention_mask is not None:   # the model's own mask: bool keep, or additive
        extra = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4
        extra = extra[..., -sq:, -sk:]
    out = torch.empty(b, h, sq, value.shape[-1], dtype=query.dtype, device=query.device)
    groups: Dict[object, List[int]] = {}
    for head, form in enumerate(forms):
        groups.setdefault(form, []).append(head)
    for form, heads in groups.items():
        if isinstance(form, Dense):
            keep = causal[None, None]
        elif isinstance(form, Streaming):
            keep = streaming_mask(form, sq, sk, True, query.device)[None, None]
        elif isinstance(form, BlockTopK):
            if len(heads) != h:
                raise ValueError(f"form {form!r} covers heads {heads} of {h}; block_topk needs one rule for every "
                                 "head of a site")
            # the selection's kept blocks, then causality inside them (diagonal blocks are partial)
            keep = dynamic_mask(form, query, key, True, scaling if scaling is not None else query.shape[-1] ** -0.5)
            keep = keep & causal[None, None]
        else:
            raise ValueError(f"form {form!r} is not allowed for the KL judge; expected Dense, Streaming or BlockTopK")
        mask = keep if extra is None else keep & extra
        idx = torch.tensor(heads, device=query.device)
        kv = idx // rep
        out[:, idx] = torch.nn.functional.scaled_dot_product_attention(
            query[:, idx], key[:, kv], value[:, kv], attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(KEEP_IMPLEMENTATION, keep_attention)


def decoder_parts(model):
    """(layers, final norm, lm_head) of a transformers decoder LM (``model.model.layers`` etc.); ValueError else."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or getattr(inner, "norm", None) is None or getattr(model, "lm_head", None) is None:
        raise ValueError(f"model={type(model).__name__} is not allowed; sparsecc's attention judges need a "
                         "transformers decoder LM with model.model.layers, model.model.norm and model.lm_head "
                         "(e.g. LlamaForCausalLM)")
    for layer in layers:
        if getattr(layer, "self_attn", None) is None:
            raise ValueError("every decoder layer needs a self_attn module for sparsecc's attention judges")
    return layers, inner.norm, model.lm_head


@contextlib.contextmanager
def attention_forms(model, forms_by_layer: Dict[int, Sequence[object]]):
    """Within the context, layer i's attention runs :func:`keep_attention` with one form per query head."""
    _register()
    layers, _, _ = decoder_parts(model)
    config = model.config
    old = config._attn_implementation
    touched = []
    try:
        config._attn_implementation = KEEP_IMPLEMENTATION
        for i, forms in forms_by_layer.items():
            setattr(layers[i].self_attn, _KEEP_ATTR, list(forms))
            touched.append(layers[i].self_attn)
        yield
    finally:
        for m in touched:
            delattr(m, _KEEP_ATTR)
        config._attn_implementation = old


# ---------------------------------------------------------------------------------------------------------------
# dense pass, replay, KL


@dataclass
class DenseCache:
    """What one dense forward leaves for the replays: layer inputs, the layers' keyword arguments, the dense
    next-token distribution at the scored positions (rows ``score_from - 1 .. S - 2``)."""

    inputs: List[torch.Tensor]
    layer_kwargs: dict
    score_from: int
    top_index: Optional[torch.Tensor]   # [N, k] int64, None when the whole vocabulary is kept
    top_logp: torch.Tensor              # [N, k] (or [N, V]) float32 dense log-probs
    tail_logp: Optional[torch.Tensor]   # [N] float64 log of the dense mass outside the top k


ROWS_PER_CHUNK = 1024   # positions per lm_head chunk: the float32 logits of one chunk are ROWS x vocab


def _top_and_tail(logp: torch.Tensor, index: torch.Tensor):
    """(log-probs at ``index`` [N, k], log of the mass elsewhere [N] in float64)."""
    top = logp.gather(-1, index)
    rest = logp.scatter(-1, index, float("-inf"))
    return top, torch.logsumexp(rest.double(), dim=-1)


def dense_pass(model, ids: torch.Tensor, *, score_from: int = 1, topk: Optional[int] = DEFAULT_TOPK) -> DenseCache:
    """Run ``model`` densely on ``ids`` (1-D); cache every decoder layer's input and the dense distribution."""
    layers, norm, head = decoder_parts(model)
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk={topk!r} is not allowed; expected an integer >= 1 or None (whole vocabulary)")
    if not isinstance(score_from, int) or not 1 <= score_from < ids.numel():
        raise ValueError(f"score_from={score_from!r} is not allowed; expected an integer in [1, {ids.numel() - 1}]")
    inputs: List[torch.Tensor] = []
    kwargs: dict = {}

    def grab(module, args, kw):
        inputs.append((args[0] if args else kw["hidden_states"]).detach().clone())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    hooks = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            out = model.model(input_ids=ids[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    kwargs["use_cache"] = False
    hidden = out.last_hidden_state[0, score_from - 1:-1]
    tops, idxs, tails = [], [], []
    with torch.no_grad():
        for r0 in range(0, hidden.shape[0], ROWS_PER_CHUNK):
            logp = torch.log_softmax(head(hidden[r0:r0 + ROWS_PER_CHUNK]).float(), dim=-1)
            if topk is None:
                tops.append(logp)
                continue
            index = logp.topk(min(topk, logp.shape[-1]), dim=-1).indices
            top, tail = _top_and_tail(logp, index)
            tops.append(top)
            idxs.append(index)
            tails.append(tail)
    return DenseCache(inputs, kwargs, score_from, torch.cat(idxs) if idxs else None, torch.cat(tops),
                      torch.cat(tails) if tails else None)


def replay(model, cache: DenseCache, start: int, forms_by_layer: Dict[int, Sequence[object]]) -> torch.Tensor:
    """Layers ``start`` .. last from the cached input of ``start``, with ``forms_by_layer``; the final hidden states
    (after the norm) at the scored positions' rows."""
    layers, norm, _ = decoder_parts(model)
    if any(i < start for i in forms_by_layer):
        raise ValueError(f"forms for layers {sorted(forms_by_layer)} but the replay starts at layer {start}")
    hidden = cache.inputs[start]
    with torch.no_grad(), attention_forms(model, forms_by_layer):
        for layer in layers[start:]:
            out = layer(hidden, **cache.layer_kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return norm(hidden)[0, cache.score_from - 1:-1]


def kl_to_dense(model, cache: DenseCache, hidden: torch.Tensor) -> Tuple[float, int]:
    """(summed KL(dense || candidate) in nats over the scored positions, number of positions), ``hidden`` from
    :func:`replay`. With ``topk`` the two distributions are compared on the dense top-k tokens and one bucket for
    the rest (a lower bound of the full KL, equal to it when the rest holds no mass)."""
    _, _, head = decoder_parts(model)
    total = 0.0
    with torch.no_grad():
        for r0 in range(0, hidden.shape[0], ROWS_PER_CHUNK):
            logq = torch.log_softmax(head(hidden[r0:r0 + ROWS_PER_CHUNK]).float(), dim=-1)
            logp = cache.top_logp[r0:r0 + logq.shape[0]].double()
            if cache.top_index is None:
                total += float((logp.exp() * (logp - logq.double())).sum())
                continue
            q_top, q_tail = _top_and_tail(logq, cache.top_index[r0:r0 + logq.shape[0]])
            p_tail = cache.tail_logp[r0:r0 + logq.shape[0]]
            tail = torch.where(p_tail > float("-inf"), p_tail.exp() * (p_tail - q_tail), torch.zeros_like(p_tail))
            kl = (logp.exp() * (logp - q_top.double())).sum(-1) + tail
            total += float(kl.sum())
    return total, hidden.shape[0]


def measure_kl(model, caches: Sequence[DenseCache], forms_by_layer: Dict[int, Sequence[object]]) -> float:
    """Mean KL(dense || sparse) per scored position over the calibration windows, ``forms_by_layer`` applied."""
    sparse = {i: f for i, f in forms_by_layer.items() if not all(isinstance(x, Dense) for x in f)}
    start = min(sparse) if sparse else len(caches[0].inputs) - 1
    total, count = 0.0, 0
    for cache in caches:
        kl, n = kl_to_dense(model, cache, replay(model, cache, start, sparse))
        total, count = total + kl, count + n
    return total / count


__all__ = ["DEFAULT_TOPK", "DenseCache", "KEEP_IMPLEMENTATION", "ROWS_PER_CHUNK", "attention_forms", "decoder_parts",
           "dense_pass", "keep_attention", "kl_to_dense", "measure_kl", "replay"]
