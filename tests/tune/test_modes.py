"""Input or gate mode per FFN site (``sparsecc.tune(mode="mixed")``): the knapsack's choice and the tuner around it."""

import itertools
import random

import pytest
import torch

import sparsecc
from sparsecc.spec import Defaults, Spec, load_spec
from sparsecc.tune import ffn_rules
from sparsecc.tune.capture import Projection, ThresholdHooks, ffn_projections, quantile_tau, score_samples
from sparsecc.tune.ffn import Sensitivity, weighted_share
from sparsecc.tune.ffn_modes import choose_modes, mixed_allocations

LEVELS = (0.3, 0.6, 0.9)


def _site(i, gate_width=64, hidden=32, gated=True):
    """The projections of one FFN site: input (gate + up: 2 x hidden x width), down, and gate (up + down)."""
    site = f"layers.{i}"
    first = 2 * hidden * gate_width if gated else hidden * gate_width
    inputs = [Projection(site, "input", (f"{site}.gate",), (False,), first),
              Projection(site, "down", (f"{site}.down",), (False,), hidden * gate_width)]
    gate = [Projection(site, "gate", (f"{site}.gate", f"{site}.down"), (False, False), 2 * hidden * gate_width)]
    return inputs, (gate if gated else [])


def _scores(projections):
    return {p: torch.linspace(0, 1, 1001)[:-1] for p in projections}


def _brute_force(input_table, gate_table, sites, target):
    """The least summed table error over every per-site option with at least ``target`` of all weights skipped."""
    per_site = []
    for inputs, gate in sites:
        total = sum(p.weight_elements for p in inputs)
        opts = [("input", 0.0, 0.0)]
        grid = list(enumerate(input_table.levels))
        for (i, a), (j, b) in itertools.product([(None, 0.0)] + grid, repeat=2):
            err = (input_table.errors[inputs[0]][i] if i is not None else 0.0) + \
                  (input_table.errors[inputs[1]][j] if j is not None else 0.0)
            opts.append(("input", inputs[0].weight_elements * a + inputs[1].weight_elements * b, err))
        for g in gate:
            for i, lv in grid:
                opts.append(("gate", g.weight_elements * lv, gate_table.errors[g][i]))
        per_site.append((total, opts))
    everything = sum(t for t, _ in per_site)
    best = (float("inf"), None)
    for combo in itertools.product(*(opts for _, opts in per_site)):
        if sum(o[1] for o in combo) >= target * everything - 1e-9:
            err = sum(o[2] for o in combo)
            if err < best[0]:
                best = (err, tuple(o[0] if o[1] > 0 else "input" for o in combo))
    return best


def test_choice_matches_brute_force_on_random_tables():
    rng = random.Random(0)
    for trial in range(12):
        # Sites of unequal width, one of them ungated (input-mode options only).
        sites = [_site(0, gate_width=64), _site(1, gate_width=96, gated=trial % 2 == 0), _site(2, gate_width=32)]
        inputs = [p for s, _ in sites for p in s]
        gates = [g for _, gs in sites for g in gs]

        def curve():
            a, b, c = sorted(rng.uniform(0.001, 1.0) for _ in range(3))
            return (a, a + b, a + b + c)

        input_table = Sensitivity(LEVELS, {p: curve() for p in inputs})
        gate_table = Sensitivity(LEVELS, {p: curve() for p in gates})
        target = rng.choice([0.2, 0.35, 0.5, 0.65])
        modes = choose_modes(input_table, gate_table, inputs, gates, target)
        err, want = _brute_force(input_table, gate_table, sites, target)
        # The knapsack's modes are those of the brute-force optimum (ties are improbable with random errors).
        assert tuple(modes[f"layers.{i}"] for i in range(3)) == want, (trial, target)


def test_a_cheap_gate_site_runs_gate_mode_and_the_average_lands_on_the_target():
    (in0, g0), (in1, g1) = _site(0), _site(1)
    inputs, gates = in0 + in1, g0 + g1
    dear = (0.1, 0.4, 1.6)
    input_table = Sensitivity(LEVELS, {p: dear for p in inputs})
    # Site 0's gate mode costs a hundredth of anything else; site 1's gate mode is dearer than its input mode.
    gate_table = Sensitivity(LEVELS, {g0[0]: (0.001, 0.004, 0.016), g1[0]: (1.0, 2.0, 4.0)})
    [alloc] = mixed_allocations(input_table, gate_table, inputs, gates, _scores(inputs + gates), [0.4])
    assert alloc.modes == {"layers.0": "gate", "layers.1": "input"}
    assert alloc.taus[in0[0]] is None and alloc.taus[in0[1]] is None and alloc.taus[g1[0]] is None
    assert alloc.levels[g0[0]] > 0 and alloc.taus[g0[0]] is not None
    # Share of every FFN weight (3 x 2048 per site): the gate projection's up + down count once.
    total = 2 * 3 * 32 * 64
    skipped = sum(p.weight_elements * alloc.levels[p] for p in inputs + gates)
    assert skipped / total == pytest.approx(0.4)
    assert weighted_share(inputs + gates, alloc.levels) == pytest.approx(0.4)
    rules = ffn_rules(inputs + gates, alloc.taus, "magnitude")
    assert sorted((r.modules, r.form.mode) for r in rules) == [("layers.0", "gate"), ("layers.1", "input")]


def test_ungated_sites_get_input_mode_and_errors_name_the_problem():
    (in0, g0), (in1, _) = _site(0), _site(1, gated=False)
    inputs = in0 + in1
    input_table = Sensitivity(LEVELS, {p: (0.1, 0.4, 1.6) for p in inputs})
    gate_table = Sensitivity(LEVELS, {g0[0]: (0.001, 0.002, 0.004)})
    modes = choose_modes(input_table, gate_table, inputs, g0, 0.3)
    assert modes == {"layers.0": "gate", "layers.1": "input"}
    with pytest.raises(ValueError, match="share their levels"):
        choose_modes(input_table, Sensitivity((0.5,), {g0[0]: (0.1,)}), inputs, g0, 0.3)
    with pytest.raises(ValueError, match=r"target=0\.99 cannot be reached with levels up to max_level=0\.95"):
        choose_modes(input_table, gate_table, inputs, g0, 0.99)
    with pytest.raises(ValueError, match="no errors"):
        choose_modes(Sensitivity(LEVELS, {}), gate_table, inputs, g0, 0.3)
    with pytest.raises(ValueError, match="target=1"):
        choose_modes(input_table, gate_table, inputs, g0, 1)
    with pytest.raises(ValueError, match="input-mode projections"):
        choose_modes(input_table, gate_table, g0, inputs, 0.3)


transformers = pytest.importorskip("transformers")
from tests.quality import tiny  # noqa: E402


from tests.tune.test_lm import _token_batches  # noqa: E402


def test_a_mixed_spec_compiles_to_what_the_tuner_measured(eager_lowering):
    """Gate mode on layer 0 and input mode on layer 1: the compiled spec equals the tuner's hooks."""
    model = tiny.model()
    batch = _token_batches(1)[0]
    report = sparsecc.explain(model, **batch)
    inputs, gates = ffn_projections(model, report, "input"), ffn_projections(model, report, "gate")
    scores = {**score_samples(model, [batch], inputs, "magnitude"), **score_samples(model, [batch], gates, "magnitude")}
    modes = {"model.layers.0.mlp": "gate", "model.layers.1.mlp": "input"}
    chosen = [p for p in inputs + gates if modes[p.site] == p.mode]
    # Midway between two neighbouring scores: no entry sits at tau, so float32 and float64 agree on every mask.
    taus = {p: _midway_tau(scores[p], 0.5) if p in chosen else None for p in inputs + gates}
    spec = Spec(defaults=Defaults(policy="force"), ffn=tuple(ffn_rules(inputs + gates, taus, "magnitude")))
    assert sorted((r.modules, r.form.mode) for r in spec.ffn) == sorted(modes.items())
    with torch.no_grad():
        dense = model(**batch).logits
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")(**batch).logits
        hooks = ThresholdHooks(model, inputs + gates, taus=taus)
        with hooks.installed():
            hooked = model(**batch).logits
    applied = {s.module: s for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert set(applied) == set(modes)
    assert not torch.allclose(hooked, dense, atol=1e-4)
    torch.testing.assert_close(compiled, hooked, atol=1e-5, rtol=1e-5)
    # And both equal docs/spec.md's activation_threshold, written out in float64.
    by_key = {(p.site, p.key): taus[p] for p in chosen}
    oracle = _spec_oracle_logits(model, batch, lambda site, key: by_key.get((site, key)))
    torch.testing.assert_close(compiled.double(), oracle, atol=1e-4, rtol=1e-4)


def _midway_tau(sorted_scores, sparsity):
    k = int(round(sparsity * sorted_scores.numel()))
    return float((sorted_scores[k - 1] + sorted_scores[k]) / 2)


def _spec_oracle_logits(model, batch, tau):
    """Logits with every gated FFN computed by docs/spec.md's rule in float64 (``tau(site, key)``; None: dense).

    Input mode: ``x~ = x [|x| > tau_input]``, ``h = silu(x~ Wgᵀ) (x~ Wuᵀ)``, ``y = (h [|h| > tau_down]) Wdᵀ``.
    Gate mode: ``g = silu(x Wgᵀ)``, ``y = (g (x Wuᵀ) [|g| > tau_gate]) Wdᵀ``.
    """
    import copy

    import torch.nn.functional as F

    oracle = copy.deepcopy(model).double()
    for i, layer in enumerate(oracle.model.layers):
        site, mlp = f"model.layers.{i}.mlp", layer.mlp

        def forward(x, mlp=mlp, site=site):
            wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            t_in, t_down, t_gate = tau(site, "input"), tau(site, "down"), tau(site, "gate")
            if t_in is not None:
                x = x * (x.abs() > t_in)
            g = F.silu(x @ wg.T)
            h = g * (x @ wu.T)
            if t_gate is not None:
                h = h * (g.abs() > t_gate)
            if t_down is not None:
                h = h * (h.abs() > t_down)
            return h @ wd.T

        mlp.forward = forward
    with torch.no_grad():
        return oracle(**batch).logits


def test_tune_mixed_writes_a_spec_that_compiles(tmp_path, eager_lowering):
    model = tiny.model()
    batches = _token_batches(2)
    spec = sparsecc.tune(model, batches, target=0.4, out=tmp_path / "mixed.toml", method="separable", mode="mixed",
                         error_fn="kl", levels=(0.3, 0.6, 0.9), policy="force", progress=False)
    meta = spec.meta["tune"]
    assert meta["search"]["mode"] == "mixed"
    assert {b for b, _ in meta["search"]["blend_errors"]} == {1.0, 0.5, 0.0}
    assert meta["search"]["mixed_error"] >= 0 and sum(meta["search"]["mixed_modes"].values()) == 2
    assert meta["achieved"]["ffn_sparsity"] == pytest.approx(0.4)
    # Each site's rule has the mode its row records, and the errors tried include the picked one.
    rows = {row["module"]: row["mode"] for row in meta["ffn"]}
    assert {r.modules: r.form.mode for r in spec.ffn} == rows
    tried = [e for _, e in meta["search"]["blend_errors"]] + [meta["search"]["mixed_error"]]
    assert any(meta["achieved"]["output_error"] == pytest.approx(e, rel=1e-4) for e in tried)
    assert load_spec(tmp_path / "mixed.toml") == spec
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="reference")(**batches[0])
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert applied == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_ffn_rules_refuse_a_site_with_thresholds_in_both_modes():
    (inputs, gate) = _site(0)
    taus = {inputs[0]: 0.1, inputs[1]: 0.2, gate[0]: 0.3}
    with pytest.raises(ValueError, match=r"sites \['layers.0'\] have thresholds in both input and gate mode"):
        ffn_rules(inputs + gate, taus, "magnitude")


def _half_dead_gates(model, layer=0):
    """Scale half of a layer's gate rows by 1e-4: those neurons' act(gate) is ~0, so gate mode drops them for free."""
    with torch.no_grad():
        gate = model.model.layers[layer].mlp.gate_proj.weight
        gate[::2].mul_(1e-4)
    return model


def test_tune_mixed_runs_a_gate_site_where_gate_mode_is_free(tmp_path, eager_lowering):
    model = _half_dead_gates(tiny.model())
    batches = _token_batches(2)
    spec = sparsecc.tune(model, batches, target=0.3, out=tmp_path / "mixed.toml", method="separable", mode="mixed",
                         error_fn="kl", levels=(0.2, 0.4, 0.6, 0.8), policy="force", progress=False)
    meta = spec.meta["tune"]
    rows = {row["module"]: row for row in meta["ffn"]}
    # Layer 0: dropping its dead neurons in gate mode costs ~nothing, so the choice (and the measurement) take it.
    assert rows["model.layers.0.mlp"]["mode"] == "gate" and rows["model.layers.1.mlp"]["mode"] == "input"
    assert meta["search"]["mixed_modes"] == {"gate": 1, "input": 1}
    assert meta["search"]["mixed_error"] < min(e for _, e in meta["search"]["blend_errors"])
    assert {r.modules: r.form.mode for r in spec.ffn} == {"model.layers.0.mlp": "gate", "model.layers.1.mlp": "input"}
    assert rows["model.layers.0.mlp"]["gate_sparsity"] > 0 and "input_sparsity" not in rows["model.layers.0.mlp"]
    # The target is the share of every FFN weight skipped (layer 0's gate weights are read whatever it keeps).
    assert meta["achieved"]["ffn_sparsity"] == pytest.approx(0.3)
    assert abs(meta["achieved"]["ffn_sparsity_measured"] - 0.3) < 0.05
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="reference")(**batches[0])
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "ffn" and s.applied}
    assert applied == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_mixed_needs_the_separable_method():
    with pytest.raises(ValueError, match="mode='mixed'.*method='separable'"):
        sparsecc.tune(tiny.model(), _token_batches(1), target=0.4, mode="mixed", progress=False)
    with pytest.raises(ValueError, match="mode='both' is not allowed"):
        sparsecc.tune(tiny.model(), _token_batches(1), target=0.4, mode="both", progress=False)
