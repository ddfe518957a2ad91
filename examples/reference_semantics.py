"""Independent reference for the quickstart: the spec's forms applied by hand to an eager HF Llama.

Nothing here calls sparsecc's rewrites or references, nor reads its report:
which sites change follows from the spec and the model's own module tree
(``intended_sites``). Weight forms prune a copy of each weight in place; the
gate threshold wraps each MLP's forward; attention runs a float64 masked
softmax whose keep mask is built from the form's definition in docs/spec.md.
"""

from __future__ import annotations

import copy
import math

import torch

from sparsecc.forms import BlockSparse, BlockWeights, Streaming, TwoFour
from spec_sites import intended_sites


def _prune_two_four(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
    return (groups * keep).reshape(w.shape)


def _prune_blocks(w: torch.Tensor, form: BlockWeights) -> torch.Tensor:
    bm, bk = form.block
    n, k = w.shape
    norms = w.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3).flatten(2).norm(dim=-1)
    kept = math.ceil(form.density * norms.numel())
    keep = torch.zeros(norms.numel(), dtype=torch.bool)
    keep[norms.flatten().topk(kept).indices] = True
    return w * keep.view(n // bm, k // bk).repeat_interleave(bm, 0).repeat_interleave(bk, 1)


def _head_keep(form, seq: int, causal: bool) -> torch.Tensor:
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    if isinstance(form, Streaming):
        keep = (j < form.sink) | (i < form.sink) | ((i - j).abs() < form.window)
    elif isinstance(form, BlockSparse):
        a, b = i // form.block, j // form.block
        keep = ((a - b).abs() < form.local_blocks) | (a < form.global_blocks) | (b < form.global_blocks)
    else:
        keep = torch.ones(seq, seq, dtype=torch.bool)
    return keep & (j <= i) if causal else keep


def sparse_reference_logits(model, ids: torch.Tensor, spec) -> torch.Tensor:
    """Logits of ``model`` with every site the spec forces applied by hand (float64 attention)."""
    from transformers import AttentionInterface

    intended = intended_sites(model, spec)
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for (kind, path), form in intended.items():
            if kind == "linear":
                lin = modules[path]
                lin.weight.copy_(_prune_two_four(lin.weight) if isinstance(form, TwoFour)
                                 else _prune_blocks(lin.weight, form))
            elif kind == "ffn":
                _threshold_gate(modules[path], form.tau("gate"))
    per_layer = {path: forms for (kind, path), forms in intended.items() if kind == "attention"}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        path = next(p for p, m in modules.items() if m is module)
        q, k, v = query.double(), key.double(), value.double()
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        seq = q.shape[-2]
        forms = per_layer.get(path, [None] * q.shape[1])
        keep = torch.stack([_head_keep(f, seq, causal=True) for f in forms])
        logits = (q @ k.transpose(-2, -1)) * scaling
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    AttentionInterface.register("sparsecc_quickstart_reference", attention)
    ref.config._attn_implementation = "sparsecc_quickstart_reference"
    with torch.no_grad():
        return ref(ids).logits


def _threshold_gate(mlp, tau: float) -> None:
    def forward(x):
        a = mlp.act_fn(mlp.gate_proj(x))
        return mlp.down_proj(a * (a.abs() > tau) * mlp.up_proj(x))
    mlp.forward = forward
