"""An HF model whose attention is docs/spec.md's causal streaming form, computed in float64 on explicit keep masks.

The expected side of tests that compile HF models with a streaming spec: written from the spec alone (no sparsecc
code), and run by transformers itself through its attention-function registry, so prefill, the KV cache and
``generate`` reach it exactly as they reach the model's own attention.
"""

from __future__ import annotations

import functools

import torch


def streaming_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, sink: int,
                        window: int, **kwargs):
    """Query row i sits at position ``i + Sk - Sq`` and keeps key ``j <= p`` iff ``j < sink`` or
    ``p - j < window``; HF's own mask (bool keep, or additive) applies on top. Returns ``([B, Sq, H, D], None)``."""
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    k = key.double().repeat_interleave(h // hkv, 1)
    v = value.double().repeat_interleave(h // hkv, 1)
    p = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    keep = (j <= p) & ((j < sink) | (p - j < window))
    if attention_mask is not None:
        m = attention_mask[..., :sk]
        keep = keep & (m if m.dtype == torch.bool else m > -1e4)
    logits = (query.double() @ k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1)
    return (probs @ v).transpose(1, 2).to(query.dtype).contiguous(), None


def streaming_reference(model, sink: int, window: int):
    """``model`` (changed in place and returned) attending with :func:`streaming_attention` in every layer."""
    import transformers

    name = f"sparsecc_test_streaming_{sink}_{window}"
    transformers.AttentionInterface.register(name, functools.partial(streaming_attention, sink=sink, window=window))
    model.set_attn_implementation(name)
    return model
