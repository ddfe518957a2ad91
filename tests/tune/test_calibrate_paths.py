"""``sparsecc.calibrate`` and the tuner take their thresholds from one measurement (``tune.capture``).

docs/spec.md ("Calibrated specs") and docs/tune.md: a threshold at target sparsity s is the k-th smallest score over
the calibration batches, k = round(s * n); the scores are |x| of the FFN input and of the down projection's input
(input mode; |x_i| * ||W[:, i]||_2 with criterion weighted, gate and up pooled), or |act(x W_gate)| (gate mode).
"""

import pytest
import torch

import sparsecc
from sparsecc.tune.capture import ffn_projections, score_samples
from sparsecc.tune.ffn import uniform_allocation
from tests import zoo


class OneMlp(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


def _batches(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 16, 32, generator=g) for _ in range(n)]


def _calibrated(model, batches, mode, criterion, sparsity):
    spec = {"version": 1, "ffn": [{"modules": "*", "form": "activation_threshold", "mode": mode,
                                   "sparsity": sparsity, "criterion": criterion}]}
    return {r.modules: r.form for r in sparsecc.calibrate(model, batches, spec, progress=False).ffn[1:]}


@pytest.mark.parametrize("mode, criterion", [("input", "magnitude"), ("input", "weighted"), ("gate", "magnitude")])
def test_calibrate_gives_the_tuners_uniform_thresholds(mode, criterion):
    torch.manual_seed(0)
    model = zoo.TwoMlps().eval()
    batches = _batches()
    forms = _calibrated(model, batches, mode, criterion, 0.6)
    projections = ffn_projections(model, sparsecc.explain(model, batches[0]), mode)
    assert projections
    taus = uniform_allocation(projections, score_samples(model, batches, projections, criterion), 0.6)
    for p in projections:
        assert forms[p.site].tau(p.key) == taus[p], p


def test_calibrate_and_tune_agree_through_their_public_entry_points():
    """One gated FFN in gate mode has one threshold, so any allocation at the target is the uniform one."""
    torch.manual_seed(1)
    model = OneMlp(zoo.GatedSiluFFN()).eval()
    batches = _batches(seed=1)
    forms = _calibrated(model, batches, "gate", "magnitude", 0.6)
    tuned = sparsecc.tune(model, batches, target=0.6, mode="gate", step=0.6, progress=False)
    assert [r.modules for r in tuned.ffn] == ["mlp"]
    assert tuned.ffn[0].form.tau("gate") == forms["mlp"].tau("gate")


def _kth(scores, sparsity):
    values = torch.sort(scores.flatten().float()).values
    return float(values[max(1, round(sparsity * values.numel())) - 1])


def test_gate_thresholds_of_plain_and_fused_ffns_follow_the_documented_rule():
    """Gate mode on a plain FFN (act(x W1)) and on a fused gate_up linear (act of its gate half)."""
    torch.manual_seed(2)
    batches = _batches(seed=2, n=2)
    x = torch.cat(batches)
    with torch.no_grad():
        plain = zoo.PlainGeluFFN().eval()
        tau = _calibrated(OneMlp(plain), batches, "gate", "magnitude", 0.7)["mlp"].tau("gate")
        assert tau == _kth(torch.nn.functional.gelu(plain.fc1(x)).abs(), 0.7)
        fused = zoo.FusedGateUpFFN().eval()
        gate = fused.gate_up(x).chunk(2, dim=-1)[0]
        tau = _calibrated(OneMlp(fused), batches, "gate", "magnitude", 0.7)["mlp"].tau("gate")
        assert tau == _kth(torch.nn.functional.gelu(gate).abs(), 0.7)


def test_input_thresholds_count_each_input_once():
    """The gate and up linears read one x: its magnitudes are one sample, not two copies.

    4096 magnitudes at 0.4503: k = round(1844.4) = 1844; two copies of each would give the 1845th smallest instead.
    """
    torch.manual_seed(3)
    mlp = zoo.GatedSiluFFN().eval()
    batches = _batches(seed=3, n=2)
    forms = _calibrated(OneMlp(mlp), batches, "input", "magnitude", 0.4503)["mlp"]
    x = torch.cat(batches)
    with torch.no_grad():
        h = torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    assert forms.tau("input") == _kth(x.abs(), 0.4503)
    assert forms.tau("down") == _kth(h.abs(), 0.4503)
