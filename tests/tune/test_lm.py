"""Tuning a causal LM: next-token KL, gate-mode thresholds, layer replay, separable allocation blended with uniform."""

import math

import pytest
import torch

import sparsecc
from sparsecc.spec import Defaults, Spec, load_spec
from sparsecc.tune import ffn_rules
from sparsecc.tune.capture import ThresholdHooks, ffn_projections, next_token_kl, quantile_tau, score_samples
from sparsecc.tune.prefix import LayerPrefix
from sparsecc.tune.tuner import ffn_sensitivity, tune_ffn
from tests.tune import models

transformers = pytest.importorskip("transformers")
from tests.quality import tiny  # noqa: E402


def _token_batches(n=2, tokens=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, len(tiny.WORDS) + 1, (1, tokens), generator=g), "use_cache": False}
            for _ in range(n)]


def test_next_token_kl_is_the_mean_kl_of_the_softmaxed_logits():
    # Position 0: p = (1/2, 1/2), q = (1/4, 3/4): KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3).
    # Position 1: identical distributions: 0. The mean over the two positions is 1/4 ln(4/3).
    dense = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    sparse = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]])) + 3.0   # a shift of logits changes nothing
    assert next_token_kl(dense, sparse) == pytest.approx(0.25 * math.log(4 / 3), rel=1e-6)
    assert next_token_kl(dense, dense) == pytest.approx(0.0, abs=1e-9)


def test_gate_mode_hooks_give_the_compiled_gate_sparse_ffn(eager_lowering):
    model = tiny.model()
    batch = _token_batches(1)[0]
    projections = ffn_projections(model, sparsecc.explain(model, **batch), mode="gate")
    assert [(p.site, p.key, p.act) for p in projections] == [(f"model.layers.{i}.mlp", "gate", "silu")
                                                             for i in range(2)]
    scores = score_samples(model, [batch], projections, "magnitude")
    taus = {p: quantile_tau(scores[p], 0.5) for p in projections}
    spec = Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(projections, taus, "magnitude")))
    assert all(r.form.mode == "gate" and r.form.tau("gate") == taus[p] for r, p in zip(spec.ffn, projections))
    with torch.no_grad():
        dense = model(**batch).logits
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")(**batch).logits
        hooks = ThresholdHooks(model, projections, taus=taus, counting=True)
        with hooks.installed():
            hooked = model(**batch).logits
    applied = [s for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied]
    assert len({s.module for s in applied}) == 2
    # About half of the activated gate entries fell below tau (the 50% quantile of these very scores).
    for p in projections:
        kept, total = hooks.counts[p]
        assert total == 24 * 64 and abs(kept / total - 0.5) < 0.02
    assert not torch.allclose(hooked, dense, atol=1e-4)
    torch.testing.assert_close(compiled, hooked, atol=1e-5, rtol=1e-5)


def test_replaying_dense_layers_gives_the_same_table():
    model = tiny.model()
    batches = _token_batches(2)
    replayed = ffn_sensitivity(model, batches, levels=(0.3, 0.7), error_fn="kl", progress=False)
    full = ffn_sensitivity(model, batches, levels=(0.3, 0.7), error_fn="kl", replay=False, progress=False)
    assert LayerPrefix(model, batches, [p.site for p in full.projections]).enabled
    assert all(e > 0 for row in full.sensitivity.errors.values() for e in row)
    for p, row in full.sensitivity.errors.items():
        assert replayed.sensitivity.errors[p] == pytest.approx(row, rel=1e-4, abs=1e-9)


class _Reversed(models.Stack):
    """Runs its layers last to first: a layer with a lower index does not run before the higher ones."""

    def forward(self, x):
        for layer in reversed(self.layers):
            x = x + layer(x)
        return x


def test_replay_is_used_in_index_order_and_refused_otherwise():
    sites = [f"layers.{i}" for i in range(4)]
    in_order = LayerPrefix(models.Stack().eval(), models.batches(1), sites)
    assert in_order.enabled and in_order.layer_of("layers.3") == 3
    reversed_ = LayerPrefix(_Reversed().eval(), models.batches(1), sites)
    assert reversed_.stack is not None and not reversed_.enabled
    assert reversed_.layer_of("layers.3") == 0   # nothing is replayed


@pytest.mark.parametrize("mode", ["input", "gate"])
def test_separable_tuning_measures_no_worse_than_uniform(mode):
    model = models.Stack(layers=4, loud=(1,)).eval() if mode == "input" else tiny.model()
    batches = models.batches(2) if mode == "input" else _token_batches(2)
    error_fn = None if mode == "input" else "kl"
    tuning = tune_ffn(model, batches, [0.3, 0.5], method="separable", mode=mode, error_fn=error_fn,
                      levels=(0.2, 0.4, 0.6, 0.8), progress=False)
    assert tuning.method == "separable" and all(p.mode == mode for p in tuning.projections)
    for alloc in tuning.allocations:
        tried = tuning.candidates[alloc.target]
        assert set(tried) == {1.0, 0.5, 0.0}
        assert alloc.error == min(tried.values()) and alloc.error <= tried[0.0]
        assert alloc.average(tuning.projections) == pytest.approx(alloc.target)
    if mode == "input":
        # The loud layer (down weights x8) is the sensitive one: the separable allocation spares it.
        sep = tune_ffn(model, batches, [0.5], method="separable", levels=(0.2, 0.4, 0.6, 0.8),
                       progress=False).sensitivity.allocations([0.5])[0]
        loud = next(p for p in sep.levels if p.site == "layers.1" and p.key == "down")
        assert sep.levels[loud] < 0.5


def test_tune_writes_a_gate_mode_spec_that_compiles(tmp_path, eager_lowering):
    model = tiny.model()
    batches = _token_batches(2)
    spec = sparsecc.tune(model, batches, target=0.5, out=tmp_path / "gate.toml", method="separable", mode="gate",
                         error_fn="kl", levels=(0.3, 0.6, 0.9), policy="force", progress=False)
    meta = spec.meta["tune"]
    assert meta["search"]["method"] == "separable" and meta["search"]["error"] == "next_token_kl"
    assert {b for b, _ in meta["search"]["blend_errors"]} == {1.0, 0.5, 0.0}
    assert meta["achieved"]["ffn_sparsity"] == pytest.approx(0.5)
    assert [r.form.mode for r in spec.ffn] == ["gate", "gate"]
    assert load_spec(tmp_path / "gate.toml") == spec
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="reference")(**batches[0])
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert applied == {"model.layers.0.mlp", "model.layers.1.mlp"}
