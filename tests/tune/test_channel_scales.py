"""Fisher channel scales of the FFN inputs, folded into a Llama: same logits, scaled inputs, the scales themselves
against a gradient computed apart, and a magnitude threshold on the scaled model as the Fisher-weighted one."""

import math

import pytest
import torch

import sparsecc
from sparsecc.spec import Defaults, Spec
from sparsecc.tune import ffn_rules
from sparsecc.tune.capture import ffn_projections
from sparsecc.tune.channel_scales import (CHANNEL_SCALES_ATTRIBUTE, ChannelScales, channel_scales_of,
                                          fisher_channel_scales, scale_ffn_channels)
from sparsecc.tune.rotation import RotationError, residual_basis, rotate_residual

transformers = pytest.importorskip("transformers")
from tests.quality import tiny  # noqa: E402


def _ids(seed=1, tokens=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, len(tiny.WORDS) + 1, (1, tokens), generator=g)


def _batches():
    return [{"input_ids": _ids(seed=s), "use_cache": False} for s in (1, 2)]


def _random_scales(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    layers = model.model.layers
    d, d_ff = layers[0].mlp.gate_proj.in_features, layers[0].mlp.down_proj.in_features
    return ChannelScales({i: 0.2 + 3 * torch.rand(d, generator=g, dtype=torch.float64) for i in range(len(layers))},
                         {i: 0.2 + 3 * torch.rand(d_ff, generator=g, dtype=torch.float64) for i in range(len(layers))},
                         1)


def _inputs(model, ids):
    """Logits and, per layer, (FFN input, down projection input)."""
    got = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: got.__setitem__(("in", i), args[0].detach().clone())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda _m, args, i=i: got.__setitem__(("down", i), args[0].detach().clone())))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, got


def test_the_fold_keeps_the_logits_and_scales_both_ffn_inputs():
    model = tiny.model().double()
    ids = _ids()
    before, x_before = _inputs(model, ids)
    scales = _random_scales(model)
    scale_ffn_channels(model, scales)
    after, x_after = _inputs(model, ids)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=1e-10)
    for (kind, i), x in x_before.items():
        c = scales.inputs[i] if kind == "in" else scales.down[i]
        torch.testing.assert_close(x_after[(kind, i)], x * c, atol=1e-10, rtol=1e-10)
    assert channel_scales_of(model) == scales.fingerprint()
    with pytest.raises(RotationError, match="already has channel scales"):
        scale_ffn_channels(model, scales)


def test_the_scales_are_the_root_mean_square_gradients_of_the_drawn_tokens_log_probabilities():
    """Written from the docstring: at every position a token drawn from the model (generator seeded 0, one
    multinomial draw over all positions), the gradient of the sum of their log-probabilities with respect to each FFN
    input and down input, squared, averaged over tokens, square-rooted, floored at 1e-4 of the largest, divided by
    its geometric mean."""
    model = tiny.model().double()
    batches = _batches()
    got = fisher_channel_scales(model, batches, seed=0)
    assert got.tokens == 40
    generator = torch.Generator().manual_seed(0)
    layers = model.model.layers
    sums = {}
    for batch in batches:
        xs = {}
        hooks = []
        for i, layer in enumerate(layers):
            def keep_out(_m, _a, out, i=i):
                out.retain_grad()
                xs[("in", i)] = out

            def keep_in(_m, args, i=i):
                args[0].retain_grad()
                xs[("down", i)] = args[0]
            hooks += [layer.post_attention_layernorm.register_forward_hook(keep_out),
                      layer.mlp.down_proj.register_forward_pre_hook(keep_in)]
        logits = model(**batch).logits.float()
        for h in hooks:
            h.remove()
        logp = torch.log_softmax(logits, -1)
        drawn = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=generator)
        logp.reshape(-1, logp.shape[-1]).gather(-1, drawn).sum().backward()
        for key, x in xs.items():
            sums[key] = sums.get(key, 0) + x.grad.double().reshape(-1, x.shape[-1]).pow(2).sum(0)
        model.zero_grad()

    def expected(total):
        r = (total / 40).sqrt()
        r = r.clamp_min(r.max().item() * 1e-4)
        return r / math.exp(r.log().mean().item())

    for i in range(len(layers)):
        torch.testing.assert_close(got.inputs[i], expected(sums[("in", i)]), atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(got.down[i], expected(sums[("down", i)]), atol=1e-9, rtol=1e-7)
        assert got.inputs[i].std() > 0.05        # the scales differ between channels: the test is not vacuous
    assert all(p.requires_grad for p in model.parameters())   # parameters got their flag back


def test_padding_positions_are_left_out():
    model = tiny.model().double()
    ids = _ids(tokens=12)
    mask = torch.ones_like(ids)
    mask[:, :4] = 0
    scales = fisher_channel_scales(model, [{"input_ids": ids, "attention_mask": mask, "use_cache": False}])
    assert scales.tokens == 8


def test_magnitude_on_the_scaled_model_is_the_fisher_weighted_threshold_on_the_original(eager_lowering):
    original = tiny.model()
    scaled = tiny.model()
    batches = _batches()
    scales = fisher_channel_scales(original, batches)
    scale_ffn_channels(scaled, scales)
    report = sparsecc.explain(scaled, **batches[0])
    projections = ffn_projections(scaled, report, "input")
    taus = {p: 0.3 for p in projections}
    spec = Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(projections, taus, "magnitude")))
    with torch.no_grad():
        sparse = sparsecc.compile(scaled, spec=spec, kernels="reference")(**batches[0]).logits
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert applied == {"model.layers.0.mlp", "model.layers.1.mlp"}

    def threshold(c):
        def pre(_m, args):
            x = args[0]
            return (x * (x.abs() * c.to(x.dtype) > 0.3),)
        return pre

    hooks = []
    for i, layer in enumerate(original.model.layers):
        hooks += [layer.mlp.register_forward_pre_hook(threshold(scales.inputs[i])),
                  layer.mlp.down_proj.register_forward_pre_hook(threshold(scales.down[i]))]
    try:
        with torch.no_grad():
            want = original(**batches[0]).logits
            dense = scaled(**batches[0]).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(sparse, want, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)     # the thresholds removed something


def test_composes_with_the_rotation_and_tuned_specs_record_both(eager_lowering):
    batches = _batches()
    model = tiny.model()
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    rotate_residual(model, residual_basis(model, batches))
    scale_ffn_channels(model, fisher_channel_scales(model, batches))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
    spec = sparsecc.tune(model, batches, target=0.3, method="separable", error_fn="kl", levels=(0.3, 0.6),
                         progress=False)
    assert spec.meta["tune"]["ffn_channel_scales"] == getattr(model.config, CHANNEL_SCALES_ATTRIBUTE)
    assert spec.meta["tune"]["residual_rotation"]
    plain_rotated = tiny.model()
    rotate_residual(plain_rotated, residual_basis(plain_rotated, batches))
    with pytest.warns(sparsecc.SparseccWarning, match="FFN channel scales"):
        sparsecc.compile(plain_rotated, spec=spec, kernels="reference")


def test_bad_scales_are_refused_and_the_model_is_left_alone():
    model = tiny.model().double()
    scales = _random_scales(model)
    ids = _ids()
    before, _ = _inputs(model, ids)
    bad = ChannelScales(dict(scales.inputs), {**scales.down, 0: -scales.down[0]}, 1)
    with pytest.raises(ValueError, match="layer 0 down scales must be"):
        scale_ffn_channels(model, bad)
    short = ChannelScales({0: scales.inputs[0]}, {0: scales.down[0]}, 1)
    with pytest.raises(ValueError, match="the model has 2"):
        scale_ffn_channels(model, short)
    after, _ = _inputs(model, ids)
    assert torch.equal(after, before) and channel_scales_of(model) is None
