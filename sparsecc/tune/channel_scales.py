"""Per-channel scales of the FFN inputs, folded into a decoder's weights, so that a magnitude threshold ranks
channels by their second-order effect on the model's output (Fisher-weighted activation thresholds).

Zeroing channel i of an FFN input x changes the log-likelihood by about ``-g_i x_i + F_i x_i² / 2`` to second order,
with ``g = ∂ log p / ∂x`` and ``F_i`` its diagonal Fisher information ``E[g_i²]`` (expectation over tokens and over
next tokens drawn from the model itself; the first-order term vanishes in that expectation). Optimal Brain Damage
(LeCun, Denker and Solla, NeurIPS 1989) ranks weights by the same diagonal saliency; here it ranks activations,
with one ``F_i`` per channel from calibration text: score ``|x_i| sqrt(F_i)``. The ``weighted`` criterion's
``|x_i| ||W[:, i]||`` is the special case where every output of ``W`` matters equally.

The scales cost nothing at run time: in a Llama-style FFN ``down((act(gate(x)) * up(x)))`` with ``x`` an RMS norm's
output ``w * h / rms(h)``,

* the FFN input is scaled by ``c``: the norm's scale becomes ``w * c``, the gate and up weights ``W diag(1 / c)``;
* the down input ``act(gate(x)) * up(x)`` is scaled by ``c'``: the up weight (and bias) becomes ``diag(c') W``,
  the down weight ``W diag(1 / c')``.

The logits are unchanged up to rounding; a ``magnitude`` threshold on the new inputs is the Fisher-weighted
threshold on the old ones. :func:`fisher_channel_scales` measures ``c = sqrt(F)`` per layer (each normalised to
geometric mean 1), :func:`scale_ffn_channels` folds them in, and the model's config records their fingerprint
(:data:`CHANNEL_SCALES_ATTRIBUTE`), which a tuned spec's ``[meta.tune] ffn_channel_scales`` repeats so that
``sparsecc.compile`` warns when a spec meets a model with other scales. Same layouts as
:mod:`sparsecc.tune.rotation` (which it composes with, in either order); anything else raises RotationError.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Sequence

import torch
from torch import nn

from sparsecc.tune.capture import first_tensor, split_batch
from sparsecc.tune.rotation import (RotationError, _parts, _restore_training, _training_states, checked_fold,
                                    rotation_of)

__all__ = ["ChannelScales", "fisher_channel_scales", "scale_ffn_channels", "channel_scales_of",
           "CHANNEL_SCALES_ATTRIBUTE", "FOLDED_TRANSFORMS", "folded_transforms"]

CHANNEL_SCALES_ATTRIBUTE = "sparsecc_ffn_channel_scales"
# A channel whose measured Fisher is below this share of its layer's largest gets this floor instead: the fold
# divides weights by the scale, and a zero would make them infinite (a channel no calibration token moved).
_SCALE_FLOOR = 1e-4


@dataclass(frozen=True)
class ChannelScales:
    """Per layer index: ``inputs`` (float64 [d], the FFN input's scales) and ``down`` (float64 [d_ff], the down
    projection input's), each positive with geometric mean 1; ``tokens``: how many tokens the Fisher averaged."""

    inputs: Dict[int, torch.Tensor]
    down: Dict[int, torch.Tensor]
    tokens: int

    def fingerprint(self) -> str:
        """A short SHA-256 of every scale (float64 bytes, in layer order)."""
        digest = hashlib.sha256()
        for i in sorted(self.inputs):
            for t in (self.inputs[i], self.down[i]):
                digest.update(t.detach().to(torch.float64).cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def channel_scales_of(model) -> "str | None":
    """The fingerprint of the channel scales folded into ``model`` (its config's attribute), or None."""
    return getattr(getattr(model, "config", None), CHANNEL_SCALES_ATTRIBUTE, None) or None


# The transforms sparsecc folds into a model's weights: the ``[meta.tune]`` key a tuned spec records the fingerprint
# under, what the transform is called, the function reading a model's fingerprint, and its docs/tune.md section.
FOLDED_TRANSFORMS = (
    ("residual_rotation", "residual rotation", rotation_of, "Rotating the residual stream first"),
    ("ffn_channel_scales", "FFN channel scales", channel_scales_of, "Fisher channel scales"),
)


def folded_transforms(model) -> Dict[str, str]:
    """``{[meta.tune] key: fingerprint}`` of the transforms of :data:`FOLDED_TRANSFORMS` folded into ``model``
    (what a spec tuned on it records)."""
    found = {key: read(model) for key, _what, read, _section in FOLDED_TRANSFORMS}
    return {key: str(fingerprint) for key, fingerprint in found.items() if fingerprint}


def _normalised(fisher: torch.Tensor) -> torch.Tensor:
    scale = fisher.clamp_min(0).sqrt()
    scale = scale.clamp_min(float(scale.max()) * _SCALE_FLOOR if scale.max() > 0 else 1.0)
    return scale / scale.log().mean().exp()


def fisher_channel_scales(model: nn.Module, batches: Sequence, *, seed: int = 0) -> ChannelScales:
    """``sqrt`` of the diagonal Fisher information of every FFN input and down input, over ``batches``.

    Each batch (as :func:`sparsecc.tune` takes them: a dict of keyword arguments, a tuple of positional ones, or a
    tensor of input ids; logits are the output's first tensor) runs forward and
    backward once: at every position a next token is drawn from the model's own distribution (``torch.Generator``
    seeded with ``seed``) and the gradient of its log-probability is taken with respect to each layer's
    ``post_attention_layernorm`` output and ``mlp.down_proj`` input. Positions an ``attention_mask`` masks out are
    left out. Parameters get no gradient (their ``requires_grad`` is restored).
    """
    parts = _parts(model)
    layers = parts["layers"]
    grads_in: Dict[int, torch.Tensor] = {}
    grads_down: Dict[int, torch.Tensor] = {}
    sums_in = {i: 0.0 for i in range(len(layers))}
    sums_down = {i: 0.0 for i in range(len(layers))}
    keep = None   # the current batch's attention mask, read by the gradient hooks

    def capture(store, i):
        def hook(tensor):
            def record(grad):
                g = grad.detach().double()
                if keep is not None:
                    g = g * keep.to(g.device)[..., None]
                store[i] = g.reshape(-1, g.shape[-1]).pow(2).sum(0).cpu()
            if tensor.requires_grad:
                tensor.register_hook(record)
        return hook

    handles = [parts["embed"].register_forward_hook(lambda _m, _a, out: out.detach().requires_grad_(True))]
    for i, layer in enumerate(layers):
        handles.append(layer.post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, h=capture(grads_in, i): h(out)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, h=capture(grads_down, i): h(args[0])))
    flags = {p: p.requires_grad for p in model.parameters()}
    states = _training_states(model)
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    model.eval()
    try:
        for p in flags:
            p.requires_grad_(False)
        for batch in batches:
            args, kwargs = split_batch(batch)
            mask = kwargs.get("attention_mask")
            keep = None if mask is None else mask.bool()
            with torch.enable_grad():
                logits = first_tensor(model(*args, **kwargs)).float()
                logp = torch.log_softmax(logits, -1)
                drawn = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]).cpu(), 1,
                                          generator=generator).reshape(logp.shape[:-1]).to(logp.device)
                chosen = logp.gather(-1, drawn[..., None])[..., 0]
                if mask is not None:
                    chosen = chosen * mask.to(chosen.dtype)
                chosen.sum().backward()
            tokens += int(mask.sum()) if mask is not None else drawn.numel()
            for i in range(len(layers)):
                if i not in grads_in or i not in grads_down:
                    raise RuntimeError(f"fisher_channel_scales: layer {i}'s FFN got no gradient (is it reached?)")
                sums_in[i] = sums_in[i] + grads_in.pop(i)
                sums_down[i] = sums_down[i] + grads_down.pop(i)
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        _restore_training(states)
    if tokens == 0:
        raise ValueError("fisher_channel_scales: the batches held no token")
    return ChannelScales({i: _normalised(s / tokens) for i, s in sums_in.items()},
                         {i: _normalised(s / tokens) for i, s in sums_down.items()}, tokens)


def scale_ffn_channels(model: nn.Module, scales: ChannelScales) -> None:
    """Fold ``scales`` into ``model``'s norms, gate, up and down weights, in place (see the module docstring).

    Computed in float64 and stored in each weight's dtype. The probe logits are compared before and after as by
    :func:`sparsecc.tune.rotation.rotate_residual`; if they moved, or anything fails, every weight is restored and
    the error raised. The config gets :data:`CHANNEL_SCALES_ATTRIBUTE`; a second fold is refused.
    """
    parts = _parts(model)
    layers = parts["layers"]
    if channel_scales_of(model):
        raise RotationError(f"scale_ffn_channels: the model already has channel scales ({CHANNEL_SCALES_ATTRIBUTE}="
                            f"{channel_scales_of(model)!r}); scale the original model instead")
    if set(scales.inputs) != set(range(len(layers))) or set(scales.down) != set(range(len(layers))):
        raise ValueError(f"scale_ffn_channels: scales are for layers {sorted(scales.inputs)}; the model has "
                         f"{len(layers)}")
    for i, layer in enumerate(layers):
        for name, vec, width in (("inputs", scales.inputs[i], layer.mlp.gate_proj.in_features),
                                 ("down", scales.down[i], layer.mlp.down_proj.in_features)):
            if tuple(vec.shape) != (width,) or not bool((vec > 0).all()) or not bool(torch.isfinite(vec).all()):
                raise ValueError(f"scale_ffn_channels: layer {i} {name} scales must be {width} positive finite "
                                 f"numbers; got shape {tuple(vec.shape)}")
    checked_fold(model, parts, lambda: _fold_all(layers, scales), "scale_ffn_channels",
                 "the FFN is not down(act(gate(x)) * up(x)) of a norm's output; the model was restored")
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CHANNEL_SCALES_ATTRIBUTE, scales.fingerprint())


def _fold_all(layers, scales: ChannelScales) -> None:
    with torch.no_grad():
        for i, layer in enumerate(layers):
            _fold_layer(layer, scales.inputs[i].double().cpu(), scales.down[i].double().cpu())


def _fold_layer(layer, c_in: torch.Tensor, c_down: torch.Tensor) -> None:
    def store(param, value):
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))

    def f64(t):
        return t.detach().double().cpu()

    norm, mlp = layer.post_attention_layernorm, layer.mlp
    store(norm.weight, f64(norm.weight) * c_in)
    store(mlp.gate_proj.weight, f64(mlp.gate_proj.weight) / c_in[None, :])
    store(mlp.up_proj.weight, f64(mlp.up_proj.weight) / c_in[None, :] * c_down[:, None])
    if mlp.up_proj.bias is not None:
        store(mlp.up_proj.bias, f64(mlp.up_proj.bias) * c_down)
    store(mlp.down_proj.weight, f64(mlp.down_proj.weight) / c_down[None, :])
