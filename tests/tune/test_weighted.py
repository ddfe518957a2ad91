"""The weighted criterion: keep channel i iff |x_i| * ||W[:, i]||_2 > tau, against hand computations."""

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs
from sparsecc.codegen.activation_sparse import threshold_linear_ref
from sparsecc.passes.ffn import column_norms
from tests import zoo


def _hand_weighted_linear(x, w, b, tau):
    """Element by element, in float64: channel i of token t survives iff |x[t, i]| * ||W[:, i]|| > tau."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros(x2.shape[0], w.shape[0], dtype=torch.float64)
    norms = [float(w[:, i].double().square().sum().sqrt()) for i in range(w.shape[1])]
    for t in range(x2.shape[0]):
        for i in range(w.shape[1]):
            if abs(float(x2[t, i])) * norms[i] > tau:
                out[t] += x2[t, i] * w[:, i].double()
    if b is not None:
        out += b.double()
    return out.reshape(*x.shape[:-1], w.shape[0])


def test_reference_matches_hand_computation():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 12), torch.randn(7, 12) * torch.linspace(0.1, 3.0, 12), torch.randn(7)
    got = threshold_linear_ref(x, w, b, 1.5, column_norms(w))
    torch.testing.assert_close(got.double(), _hand_weighted_linear(x, w, b, 1.5), atol=1e-5, rtol=1e-5)
    # The weighting changes the decision: magnitude at the same tau keeps a different set.
    assert not torch.allclose(got, threshold_linear_ref(x, w, b, 1.5))


def test_column_norms_of_in_out_storage():
    w = torch.randn(6, 9)
    torch.testing.assert_close(column_norms(w.t().contiguous(), in_out=True), column_norms(w))


@pytest.mark.parametrize("cls", [zoo.PlainGeluFFN, zoo.GatedSiluFFN], ids=lambda c: c.__name__)
def test_compiled_weighted_ffn_matches_hand_computation(cls, eager_lowering):
    torch.manual_seed(3)
    ffn = cls().eval()
    x = torch.randn(2, 4, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "threshold": {"input": 0.6, "down": 0.05},
                     "criterion": "weighted"}]}
    with torch.no_grad():
        out = sparsecc.compile(ffn, spec=spec, kernels="reference")(x)
        if cls is zoo.GatedSiluFFN:
            gate = _hand_weighted_linear(x, ffn.gate_proj.weight, None, 0.6)
            up = _hand_weighted_linear(x, ffn.up_proj.weight, None, 0.6)
            h = torch.nn.functional.silu(gate) * up
            expected = _hand_weighted_linear(h, ffn.down_proj.weight.double(), None, 0.05)
        else:
            h = torch.nn.functional.gelu(_hand_weighted_linear(x, ffn.fc1.weight, ffn.fc1.bias, 0.6))
            expected = _hand_weighted_linear(h, ffn.fc2.weight.double(), ffn.fc2.bias, 0.05)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    calls = [n for gm in rewritten_graphs() for n in gm.graph.nodes if "threshold_linear" in str(n.target)]
    assert calls and all(len(n.args) == 6 for n in calls)   # each carries its column norms


def test_magnitude_calls_are_unchanged(eager_lowering):
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "threshold": 0.3}]}
    with torch.no_grad():
        sparsecc.compile(zoo.PlainGeluFFN().eval(), spec=spec, kernels="reference")(torch.randn(1, 3, 32))
    calls = [n for gm in rewritten_graphs() for n in gm.graph.nodes if "threshold_linear" in str(n.target)]
    assert calls and all(len(n.args) == 5 for n in calls)


def test_norms_follow_weight_updates(eager_lowering):
    torch.manual_seed(4)
    ffn = zoo.PlainGeluFFN().eval()
    x = torch.randn(2, 3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "threshold": {"input": 0.8}, "criterion": "weighted"}]}
    with torch.no_grad():
        compiled = sparsecc.compile(ffn, spec=spec, kernels="reference")
        compiled(x)
        ffn.fc1.weight.mul_(torch.linspace(0.2, 4.0, 32))
        out = compiled(x)
        expected = ffn.fc2(torch.nn.functional.gelu(_hand_weighted_linear(x, ffn.fc1.weight, ffn.fc1.bias, 0.8)
                                                    .float()))
    assert [s.applied for s in sparsecc.last_report().sites if s.kind == "ffn"] == [True]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_triton_kernels_decide_both_criteria_alike():
    """The weighted criterion runs the same kernels as magnitude, so kernels='triton' decides both alike (here, on
    a machine without a Triton kernel for the device, both fall back with the same reason)."""
    reports = {}
    for criterion in ("weighted", "magnitude"):
        spec = {"version": 1, "defaults": {"policy": "force"},
                "ffn": [{"form": "activation_threshold", "threshold": 0.3, "criterion": criterion}]}
        report = sparsecc.explain(zoo.PlainGeluFFN().eval(), torch.randn(1, 3, 32), spec=spec, kernels="triton")
        site = [s for s in report.sites if s.kind == "ffn"][0]
        reports[criterion] = (site.applied, site.reason)
    assert reports["weighted"] == reports["magnitude"]
    if not torch.cuda.is_available():
        assert reports["weighted"][0] is False and "no Triton kernel for threshold_linear on cpu" in reports[
            "weighted"][1]


def test_weighted_gate_mode_is_refused_before_compiling():
    """Not a silent dense site: compiling with the pair fails at once, naming the key."""
    from sparsecc.spec import SpecError

    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "gate", "threshold": 0.1, "criterion": "weighted"}]}
    with pytest.raises(SpecError, match="ffn\\[0\\].criterion"):
        sparsecc.explain(zoo.GatedSiluFFN().eval(), torch.randn(1, 3, 32), spec=spec)


@pytest.mark.parametrize("margin", [1.05, 0.01])
def test_auto_on_a_gpu_decides_weighted_sites_by_the_estimate(monkeypatch, margin):
    """Under auto the weighted criterion is decided as magnitude is: by the threshold kernel's estimate.

    The decision is made as on an H200 (its profile, the threshold GEMV registered for the device, CPU sites
    not kept dense by rule), so it runs on any machine: the margin flips the decision for both criteria alike.
    """
    from sparsecc import backend
    from sparsecc.codegen import ops
    from sparsecc.cost.hardware import H200
    from sparsecc.passes import decide

    monkeypatch.setattr(backend, "profile_for", lambda device: H200)
    monkeypatch.setattr(ops, "has_triton_kernel", lambda op, device: op == "threshold_linear")
    monkeypatch.setattr(decide, "KEEP_CPU_DENSE", False)
    torch.manual_seed(8)
    rule = {"form": "activation_threshold", "threshold": {"input": 0.6}}
    for criterion in ("weighted", "magnitude"):
        spec = {"version": 1, "defaults": {"policy": "auto", "margin": margin},
                "ffn": [{**rule, "criterion": criterion}]}
        with torch.no_grad():
            report = sparsecc.explain(zoo.PlainGeluFFN().eval(), torch.randn(1, 1, 32), spec=spec)
        site = [s for s in report.sites if s.kind == "ffn"][0]
        assert site.applied == (margin < 1) and "H200" in site.reason, (criterion, site.reason)


class _Wrapped(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


def test_calibrate_takes_the_quantile_of_the_weighted_score():
    torch.manual_seed(6)
    ffn = zoo.PlainGeluFFN().eval()
    model = _Wrapped(ffn).eval()   # a root-module site has no module glob to write
    batches = [torch.randn(4, 8, 32) for _ in range(3)]
    spec = {"version": 1, "ffn": [{"form": "activation_threshold", "sparsity": 0.4, "criterion": "weighted"}]}
    calibrated = sparsecc.calibrate(model, batches, spec, progress=False)
    form = calibrated.ffn[-1].form
    assert form.criterion == "weighted"
    x = torch.cat(batches)
    score = x.abs() * column_norms(ffn.fc1.weight)
    assert abs(float((score <= form.tau("input")).float().mean()) - 0.4) < 0.01
    h = torch.nn.functional.gelu(ffn.fc1(x))
    score_down = h.abs() * column_norms(ffn.fc2.weight)
    assert abs(float((score_down <= form.tau("down")).float().mean()) - 0.4) < 0.01


def test_op_schema_with_channel_scale():
    from sparsecc.codegen import ops
    torch.manual_seed(7)
    x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
    op = ops.op("threshold_linear")
    torch.library.opcheck(op, (x, w, b, 0.5, "reference", column_norms(w)))
    torch.library.opcheck(op, (x, w, b, 0.5, "reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("spelling", ["plain", "gated"])
def test_weighted_on_cuda_runs_the_triton_kernels(spelling, eager_lowering):
    """One decode token on CUDA: a forced weighted spec runs the Triton ops (per projection for a plain FFN, the
    fused threshold_ffn for a gated one) and matches the hand computation of docs/spec.md."""
    torch.manual_seed(8)
    ffn = (zoo.PlainGeluFFN() if spelling == "plain" else zoo.GatedSiluFFN()).cuda().eval()
    x = torch.randn(1, 1, 32, device="cuda")
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "threshold": {"input": 0.6, "down": 0.05},
                     "criterion": "weighted"}]}
    with torch.no_grad():
        out = sparsecc.compile(ffn, spec=spec, kernels="triton")(x)
        xc = x.cpu()
        if spelling == "plain":
            h = torch.nn.functional.gelu(_hand_weighted_linear(xc, ffn.fc1.weight.cpu(), ffn.fc1.bias.cpu(), 0.6))
            expected = _hand_weighted_linear(h, ffn.fc2.weight.cpu().double(), ffn.fc2.bias.cpu(), 0.05)
        else:
            gate = _hand_weighted_linear(xc, ffn.gate_proj.weight.cpu(), None, 0.6)
            up = _hand_weighted_linear(xc, ffn.up_proj.weight.cpu(), None, 0.6)
            h = torch.nn.functional.silu(gate) * up
            expected = _hand_weighted_linear(h, ffn.down_proj.weight.cpu().double(), None, 0.05)
    site = [s for s in sparsecc.last_report().sites if s.kind == "ffn"][0]
    assert site.applied and "reference" not in site.reason, site.reason
    torch.testing.assert_close(out.double().cpu(), expected.double(), atol=1e-4, rtol=1e-4)
