"""One orthogonal rotation of a decoder's residual stream, folded into its weights (FFN thresholds in a new basis).

A pre-norm decoder's FFN input is ``RMSNorm(h) = g * h / rms(h)``. An orthogonal ``Q`` keeps the norm of every
row, so ``rms(h Q) = rms(h)``: a model whose residual stream carries ``h Q`` instead of ``h`` computes the same
function when

* every weight that **writes** the stream writes ``h Q``: the token embedding ``E Q``, the attention output and FFN
  down projections ``Qᵀ W`` (and a bias ``b Q``);
* every norm's scale ``g`` moves into the weights that **read** its output, which also undo ``Q``: ``W diag(g) Q``
  for q/k/v, gate/up and the LM head; the norms keep scale 1;
* a tied embedding and LM head are untied (the head reads ``diag(g_final) Q``, the embedding writes ``Q``).

The logits are unchanged up to rounding (``tests/tune/test_rotation.py`` compares float64 logits before and
after). What changes is the FFN input the activation thresholds see: ``(h / rms(h)) Q``. With
``Q`` the eigenvectors of that input's second moment pooled over every layer (:func:`residual_basis`), a few
coordinates carry most of the energy, and a magnitude threshold in that basis drops less of the output than one on
the plain input at the same sparsity (LaRoSA, Liu et al., ICML 2025, rotates per layer; one shared rotation costs
nothing per decode step once folded; docs/tune.md, docs/quality.md).

Llama-style decoders (transformers' ``LlamaForCausalLM`` layout: ``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``, then
``model.norm`` and ``lm_head``, RMS norms) only; anything else is refused with the module that does not fit.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

__all__ = ["residual_basis", "rotate_residual", "RotationError"]

_READERS_ATTN = ("q_proj", "k_proj", "v_proj")
_READERS_FFN = ("gate_proj", "up_proj")


class RotationError(ValueError):
    """The model does not have the layout the residual rotation folds into."""


def _parts(model: nn.Module) -> Dict[str, object]:
    """The modules the rotation touches, after checking the layout (RotationError naming what is missing)."""
    def get(obj, path):
        for name in path.split("."):
            if not hasattr(obj, name):
                raise RotationError(f"rotate_residual: {type(model).__name__} has no '{path}' (a Llama-style decoder "
                                    "with model.embed_tokens, model.layers, model.norm and lm_head is needed)")
            obj = getattr(obj, name)
        return obj

    embed, layers, final, head = (get(model, p) for p in ("model.embed_tokens", "model.layers", "model.norm",
                                                          "lm_head"))
    norms = [final]
    for i, layer in enumerate(layers):
        for path in ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.down_proj",
                     *(f"self_attn.{n}" for n in _READERS_ATTN), *(f"mlp.{n}" for n in _READERS_FFN)):
            get(layer, path)
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    for norm in norms:
        weight = getattr(norm, "weight", None)
        if "RMSNorm" not in type(norm).__name__ or weight is None or getattr(norm, "bias", None) is not None:
            raise RotationError(f"rotate_residual: {type(norm).__name__} is not an RMS norm with a scale and no bias; "
                                "only RMS norms commute with a rotation")
    return {"embed": embed, "layers": layers, "final": final, "head": head}


def residual_basis(model: nn.Module, batches: Sequence) -> torch.Tensor:
    """The eigenvectors (columns, float64 [d, d]) of the FFN inputs' pooled second moment, before the norms' scales.

    Every layer's ``post_attention_layernorm`` output divided by its scale, over
    every token of ``batches`` (each a dict of model keyword arguments or a tensor
    of input ids), summed into one ``d x d`` matrix. Columns in ascending order
    of eigenvalue.
    """
    parts = _parts(model)
    d = parts["embed"].weight.shape[1]
    moment = torch.zeros(d, d, dtype=torch.float64)

    def hook(norm):
        def record(_module, _args, out):
            nonlocal moment
            x = (out.detach().double() / norm.weight.detach().double()).reshape(-1, d)
            moment += x.T @ x
        return record

    handles = [layer.post_attention_layernorm.register_forward_hook(hook(layer.post_attention_layernorm))
               for layer in parts["layers"]]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
    if not torch.isfinite(moment).all() or not moment.abs().sum() > 0:
        raise ValueError("residual_basis: the FFN inputs recorded no finite, non-zero values")
    return torch.linalg.eigh(moment)[1]


def rotate_residual(model: nn.Module, basis: torch.Tensor) -> None:
    """Fold the orthogonal ``basis`` (float [d, d]) into ``model``'s weights, in place (see the module docstring).

    Computed in float64 and stored in each weight's dtype. ``basis`` must be
    orthogonal (``basisᵀ basis = I`` to 1e-6); the model is left unchanged when a
    check fails. A tied LM head is untied and ``config.tie_word_embeddings``
    (when present) set to False.
    """
    parts = _parts(model)
    d = parts["embed"].weight.shape[1]
    q = torch.as_tensor(basis).detach().to(torch.float64).cpu()
    if q.shape != (d, d):
        raise ValueError(f"rotate_residual: basis has shape {tuple(q.shape)}; expected ({d}, {d}) (the hidden size)")
    error = (q.T @ q - torch.eye(d, dtype=torch.float64)).abs().max().item()
    if not error < 1e-6:
        raise ValueError(f"rotate_residual: basis is not orthogonal (max |QᵀQ - I| = {error:.3g})")

    def store(param: nn.Parameter, value: torch.Tensor) -> None:
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    def read(linear: nn.Linear, scale: torch.Tensor) -> None:          # W -> W diag(g) Q
        w = linear.weight.detach().double().cpu()
        store(linear.weight, (w * scale[None, :]) @ q)

    def write(linear: nn.Linear) -> None:                                # W -> Qᵀ W, b -> b Q
        store(linear.weight, q.T @ linear.weight.detach().double().cpu())
        if getattr(linear, "bias", None) is not None:
            store(linear.bias, linear.bias.detach().double().cpu() @ q)

    def take_scale(norm) -> torch.Tensor:
        scale = norm.weight.detach().double().cpu().clone()
        store(norm.weight, torch.ones_like(scale))
        return scale

    embed, head = parts["embed"], parts["head"]
    if head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    with torch.no_grad():
        store(embed.weight, embed.weight.detach().double().cpu() @ q)
        for layer in parts["layers"]:
            scale = take_scale(layer.input_layernorm)
            for name in _READERS_ATTN:
                read(getattr(layer.self_attn, name), scale)
            write(layer.self_attn.o_proj)
            scale = take_scale(layer.post_attention_layernorm)
            for name in _READERS_FFN:
                read(getattr(layer.mlp, name), scale)
            write(layer.mlp.down_proj)
        read(head, take_scale(parts["final"]))

