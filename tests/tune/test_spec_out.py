"""The tuned spec: provenance in [meta.tune], loads back equal, compiles to the numbers the tuner measured."""

import pytest
import torch

import sparsecc
from sparsecc.spec import load_spec
from sparsecc.tune.capture import ThresholdHooks, ffn_projections
from tests.tune import models

PROVENANCE = ("model_class", "config_hash", "date", "calibration", "target", "criterion", "achieved", "ffn")


@pytest.mark.parametrize("criterion", ["magnitude", "weighted"])
def test_tuned_spec_has_provenance_loads_back_and_compiles(tmp_path, criterion, eager_lowering):
    model = models.AttnStack().eval()
    batches = models.batches(2)
    out = tmp_path / "tuned.toml"
    spec = sparsecc.tune(model, batches, target=0.4, out=out, criterion=criterion, step=0.1,
                         attention_density=0.7, attention_block=1, policy="force", progress=False)
    meta = spec.meta["tune"]
    assert all(key in meta for key in PROVENANCE + ("attention",))
    assert meta["model_class"].endswith("tests.tune.models.AttnStack")
    assert meta["calibration"]["batches"] == 2 and meta["calibration"]["items"] == 4
    assert meta["target"]["ffn_sparsity"] == 0.4 and meta["achieved"]["ffn_sparsity"] == pytest.approx(0.4)
    assert meta["achieved"]["attention_density"] <= 0.7 + 1e-9
    assert [row["module"] for row in meta["ffn"]] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert all(form.criterion == criterion for form in (r.form for r in spec.ffn))
    loaded = load_spec(out)
    assert loaded == spec
    # The calibration hash is of the tensors themselves: other data gives another hash.
    other = sparsecc.tune(model, models.batches(2, seed=9), target=0.4, criterion=criterion, step=0.1,
                          progress=False)
    assert other.meta["tune"]["calibration"]["hash"] != meta["calibration"]["hash"]

    x = batches[0]
    ffn_only = loaded.with_rules("attention", [])
    with torch.no_grad():
        compiled = sparsecc.compile(model, spec=ffn_only, kernels="reference")(x)
        projections = ffn_projections(model, sparsecc.explain(model, x))
        taus = {p: r.form.tau(p.key) for r in loaded.ffn for p in projections
                if r.matches(p.site)}
        with ThresholdHooks(model, projections, criterion, taus=taus).installed():
            hooked = model(x)
    report = sparsecc.last_report()
    assert sum(s.applied for s in report.sites if s.kind == "ffn") == 2
    torch.testing.assert_close(compiled, hooked, atol=1e-5, rtol=1e-5)


def test_attention_rules_compile(tmp_path, eager_lowering):
    model = models.AttnStack().eval()
    batches = models.batches(2)
    spec = sparsecc.tune(model, batches, target=0.3, step=0.15, attention_density=0.6, attention_block=1,
                         policy="force", progress=False)
    assert spec.attention, "a 0.6 budget on causal 16-token attention leaves some heads sparse"
    with torch.no_grad():
        sparsecc.compile(model, spec=spec, kernels="reference")(batches[0])
    report = sparsecc.last_report()
    for site in report.sites:
        if site.kind == "attention" and spec.matching("attention", site.module):
            assert site.applied, site.reason


def test_cli_main_writes_the_spec(tmp_path):
    data = tmp_path / "batches.pt"
    torch.save(models.batches(2), data)
    out = tmp_path / "cli.json"
    status = sparsecc.tune.cli_main(["--model", "tests.tune.models:Stack", "--data", str(data), "--target", "0.3",
                                     "--out", str(out), "--step", "0.15", "--no-progress"])
    assert status == 0
    spec = load_spec(out)
    assert spec.meta["tune"]["calibration"]["hash"] == _hash_of(models.batches(2))
    assert len(spec.ffn) == 4


def _hash_of(batches):
    from sparsecc.tune.provenance import batches_hash
    return batches_hash(batches)


def test_sparsecc_command_dispatches_tune(tmp_path, capsys):
    from sparsecc.cli import main

    data = tmp_path / "batches.pt"
    torch.save(models.batches(2), data)
    out = tmp_path / "via_sparsecc.toml"
    assert main(["tune", "--model", "tests.tune.models:Stack", "--data", str(data), "--target", "0.3",
                 "--out", str(out), "--step", "0.15", "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert len(load_spec(out).ffn) == 4
