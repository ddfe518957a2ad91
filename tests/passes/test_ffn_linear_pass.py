"""FFN and linear matching and rewriting across spellings, with negative cases."""

import math

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs
from tests import zoo

def _ops():
    return [str(n.target) for gm in rewritten_graphs() for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith("sparsecc")]


@pytest.mark.parametrize("cls", zoo.FFN_SPELLINGS, ids=lambda c: c.__name__)
def test_every_ffn_spelling_is_found(cls):
    ffn = cls().eval()
    report = sparsecc.explain(ffn, torch.randn(2, 5, 32))
    sites = [s for s in report.sites if s.kind == "ffn"]
    assert len(sites) == 1, report
    assert sites[0].attrs["gated"] == cls.gated
    assert sites[0].attrs["activation"] == cls.act
    # the linears are reported too, each under the module owning its weight
    assert len([s for s in report.sites if s.kind == "linear"]) == (3 if cls is zoo.GatedSiluFFN else 2)


@pytest.mark.parametrize("mode", ["input", "gate"])
@pytest.mark.parametrize("cls", zoo.FFN_SPELLINGS, ids=lambda c: c.__name__)
def test_threshold_rewrite_matches_semantics(cls, mode, eager_lowering):
    torch.manual_seed(5)
    ffn = cls().eval()
    x = torch.randn(2, 5, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": mode, "threshold": 0.3}]}
    with torch.no_grad():
        out = sparsecc.compile(ffn, spec=spec, kernels="reference")(x)
        expected = zoo.ffn_expected(ffn, x, mode, 0.3).float()
    wanted = "threshold_linear" if mode == "input" else "gate_sparse_ffn"
    assert any(wanted in n for n in _ops())
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def _weighted_expected(ffn, x, tau):
    """docs/spec.md, input mode, criterion weighted, in float64: each projection keeps channel i of its input iff
    |v_i| * ||W[:, i]||_2 > tau."""
    def kept(v, w):
        return v * (v.abs() * w.double().norm(dim=0) > tau)

    xd = x.double()
    wg, wu, wd = ffn.gate_proj.weight.double(), ffn.up_proj.weight.double(), ffn.down_proj.weight.double()
    h = torch.nn.functional.silu(kept(xd, wg) @ wg.t()) * (kept(xd, wu) @ wu.t())
    return kept(h, wd) @ wd.t()


@pytest.mark.parametrize("mode", ["input", "gate", "weighted"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 40])
def test_decode_gemv_weights_are_bound_k_major(mode, tokens, monkeypatch, eager_lowering):
    """Where the decode GEMV runs, its weights arrive as views of K-major buffers bound at compile time.

    A stand-in "kernel" registered for CPU records each weight's strides and
    runs the reference. Decode-sized sites (<= MAX_DECODE_TOKENS) get K-major
    views, larger ones the plain weight; after an in-place weight update the
    bound copy is refreshed, so the output never goes stale.
    """
    from sparsecc.codegen import activation_sparse, gate_sparse_ffn, ops
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref

    seen, fused, scales = [], [], []

    def fake_linear(x, weight, bias, tau, channel_scale=None):
        seen.append(weight.stride())
        scales.append(channel_scale is not None)
        return activation_sparse.threshold_linear_ref(x, weight, bias, tau, channel_scale)

    def fake_ffn(x, wg, bg, wu, bu, wd, bd, act, tau):
        seen.append(wd.stride())
        return gate_sparse_ffn.gate_sparse_ffn_ref(x, wg, bg, wu, bu, wd, bd, act=act, tau=tau)

    def fake_threshold_ffn(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down, scale_gate=None, scale_up=None,
                           scale_down=None):
        seen.extend(w.stride() for w in (wg, wu, wd))
        fused.append(act)
        scales.extend(s is not None for s in (scale_gate, scale_up, scale_down))
        return threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act=act, tau_input=tau_input, tau_down=tau_down,
                                 scale_gate=scale_gate, scale_up=scale_up, scale_down=scale_down)

    # The records' kernels become these CPU stand-ins: every reader (the op bodies, the compiler's kernel check)
    # looks the record up by name or through its module's global at call time.
    import dataclasses
    import sys
    from sparsecc.codegen import linear_ops
    monkeypatch.setitem(sys.modules, "sparsecc_test_kernels", type(sys)("sparsecc_test_kernels"))
    stand_ins = sys.modules["sparsecc_test_kernels"]
    stand_ins.fake_linear, stand_ins.fake_ffn, stand_ins.fake_threshold_ffn = fake_linear, fake_ffn, fake_threshold_ffn
    for attr, fn in (("THRESHOLD_LINEAR", "fake_linear"), ("GATE_SPARSE_FFN", "fake_ffn"),
                     ("THRESHOLD_FFN", "fake_threshold_ffn")):
        stand_in = dataclasses.replace(getattr(linear_ops, attr), kernel=f"sparsecc_test_kernels:{fn}",
                                       devices=("cpu",))
        monkeypatch.setattr(linear_ops, attr, stand_in)
        monkeypatch.setitem(ops.RECORDS, stand_in.name, stand_in)
    torch.manual_seed(9)
    ffn = zoo.GatedSiluFFN().eval()
    x = torch.randn(1, tokens, 32)
    rule = {"form": "activation_threshold", "mode": "gate" if mode == "gate" else "input", "threshold": 0.3}
    if mode == "weighted":
        rule["criterion"] = "weighted"
    spec = {"version": 1, "defaults": {"policy": "force"}, "ffn": [rule]}

    def expected():
        return (_weighted_expected(ffn, x, 0.3) if mode == "weighted" else zoo.ffn_expected(ffn, x, mode, 0.3)).float()

    with torch.no_grad():
        compiled = sparsecc.compile(ffn, spec=spec, kernels="auto")
        torch.testing.assert_close(compiled(x), expected(), atol=1e-4, rtol=1e-4)
        decode = tokens <= activation_sparse.MAX_DECODE_TOKENS
        assert seen and all((s[0] == 1) == decode for s in seen), seen
        # input mode runs the whole gated FFN as one threshold_ffn op for one token with either criterion, and for
        # two with the magnitude criterion (the measured plan rule of passes/ffn.py); otherwise one op per projection
        one_op = mode != "gate" and (tokens == 1 or (tokens == 2 and mode == "input"))
        assert fused == (["silu"] if one_op else []), fused
        if mode != "gate" and decode and not one_op:   # the report names the token rule (never silently)
            plan = [s for s in sparsecc.explain(ffn, x, spec=spec, kernels="auto").sites if s.kind == "ffn"][0]
            rule = "above 2 (magnitude criterion)" if mode == "input" else "above 1 (weighted criterion)"
            assert f"one op per projection: {tokens} tokens: {rule}" in plan.attrs["plan"], plan.attrs["plan"]
        # the weighted criterion's column norms reach every thresholded projection
        if mode == "gate":
            assert scales == [], scales
        else:
            assert scales and all(scales) == (mode == "weighted") and any(scales) == all(scales), scales
        ffn.down_proj.weight.mul_(-1.5)
        torch.testing.assert_close(compiled(x), expected(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls, why", [(zoo.GatedSiluFFN, "the decode kernels do not run here"),
                                      (zoo.PlainGeluFFN, "a plain (ungated) FFN"),
                                      (zoo.FusedGateUpFFN, "a fused gate_up weight")])
def test_input_mode_report_says_why_projections_run_one_op_each(cls, why):
    """Where the fused threshold_ffn op is not planned, the report's plan says why (never silently)."""
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "input", "threshold": 0.3}]}
    report = sparsecc.explain(cls().eval(), torch.randn(1, 1, 32), spec=spec, kernels="reference")
    site = [s for s in report.sites if s.kind == "ffn"][0]
    assert site.applied and f"one op per projection: {why}" in site.attrs["plan"], site.attrs["plan"]
    assert "threshold_ffn" not in site.attrs["plan"]


def test_reused_hidden_is_not_an_ffn():
    report = sparsecc.explain(zoo.ReusedHiddenFFN().eval(), torch.randn(1, 4, 32))
    assert not [s for s in report.sites if s.kind == "ffn"]


def test_uncalibrated_sparsity_target_falls_back():
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "sparsity": 0.5}]}
    report = sparsecc.explain(zoo.GatedSiluFFN().eval(), torch.randn(1, 4, 32), spec=spec)
    site = [s for s in report.sites if s.kind == "ffn"][0]
    assert not site.applied and "calibrate" in site.reason


@pytest.mark.parametrize("cls", zoo.LINEAR_SPELLINGS, ids=lambda c: c.__name__)
def test_every_linear_spelling_is_found(cls):
    model = cls().eval()
    report = sparsecc.explain(model, torch.randn(3, 32))
    sites = [s for s in report.sites if s.kind == "linear"]
    assert len(sites) == 1
    expected_module = "proj" if cls is zoo.ModuleLinear else ""
    assert sites[0].module == expected_module
    assert sites[0].attrs["in_features"] == 32 and sites[0].attrs["out_features"] == 64


def _two_four_dense(w):
    groups = w.reshape(w.shape[0], -1, 4)
    idx = groups.abs().topk(2, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return (groups * keep).reshape(w.shape)


def _block_dense(w, bm, bk, density):
    n, k = w.shape
    blocks = w.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3)
    norms = blocks.flatten(2).norm(dim=-1).flatten()
    kept = math.ceil(density * norms.numel())
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[norms.topk(kept).indices] = True
    mask = keep.view(n // bm, k // bk)[:, None, :, None].expand(-1, bm, -1, bk).reshape(n, k)
    return w * mask


def _weight_and_bias(model):
    if isinstance(model, zoo.ModuleLinear):
        return model.proj.weight, model.proj.bias
    if isinstance(model, zoo.Conv1DLinear):
        return model.weight.t(), model.bias
    return model.weight, model.bias


@pytest.mark.parametrize("form", ["2:4", "block_weights"])
@pytest.mark.parametrize("cls", zoo.LINEAR_SPELLINGS, ids=lambda c: c.__name__)
def test_weight_forms_match_semantics(cls, form, eager_lowering):
    torch.manual_seed(6)
    model = cls().eval()
    x = torch.randn(3, 32)
    rule = {"form": form} if form == "2:4" else {"form": form, "block": [16, 16], "density": 0.5}
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [rule]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="reference")(x)
        w, b = _weight_and_bias(model)
        w_sparse = _two_four_dense(w) if form == "2:4" else _block_dense(w, 16, 16, 0.5)
        expected = x @ w_sparse.t() + b
    assert any(("semi_structured" if form == "2:4" else "block_sparse_linear") in n for n in _ops())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_buffer_weight_is_not_a_linear_site():
    report = sparsecc.explain(zoo.BufferWeightLinear().eval(), torch.randn(2, 32))
    assert not [s for s in report.sites if s.kind == "linear"]


def test_two_four_needs_k_divisible_by_4():
    model = zoo.ModuleLinear(k=30).eval()
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    site = sparsecc.explain(model, torch.randn(2, 30), spec=spec).sites[0]
    assert not site.applied and "divisible by 4" in site.reason


def test_keep_mode_rejects_dense_weights():
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4", "prune": "keep"}]}
    site = sparsecc.explain(zoo.ModuleLinear().eval(), torch.randn(2, 32), spec=spec).sites[0]
    assert not site.applied and "cannot compress" in site.reason


def test_weight_update_after_compile_is_never_stale(eager_lowering):
    torch.manual_seed(7)
    model = zoo.ModuleLinear().eval()
    x = torch.randn(3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    with torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")
        compiled(x)
        model.proj.weight.mul_(-2.0).add_(0.5)
        out = compiled(x)
        expected = x @ _two_four_dense(model.proj.weight).t() + model.proj.bias
    assert [s.applied for s in sparsecc.last_report().sites if s.kind == "linear"] == [True]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_autograd_falls_back_to_dense(eager_lowering):
    model = zoo.ModuleLinear()
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    x = torch.randn(2, 32)
    compiled = sparsecc.compile(model, spec=spec, report=False)
    with torch.enable_grad():
        out = compiled(x)
    out.sum().backward()
    assert model.proj.weight.grad is not None
    site = sparsecc.last_report().sites[0]
    assert not site.applied and "autograd" in site.reason


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_two_four_binds_cusparselt_operand_where_cusparselt_takes_it(monkeypatch, kernels):
    """Where cuSPARSELt takes the weight, the plan binds its operand at compile time (the pruned weight, derived
    again in place after a weight update); reference kernels bind none. cuSPARSELt is CUDA only, so here its
    check and its compression are stand-ins that record what they are given."""
    import sparsecc.passes.linear as linear_pass
    from tests.oracle.oracle import prune_2_4

    from sparsecc.codegen.semi_structured_linear import CsltConfig

    derived, searched = [], []
    monkeypatch.setattr(linear_pass, "cslt_operand_reason", lambda n, k, dtype, device: "")
    monkeypatch.setattr(linear_pass, "cslt_operand",
                        lambda weight, dtype: derived.append(weight.to_dense().double()) or weight.to_dense().to(dtype))
    monkeypatch.setattr(linear_pass, "plans_unavailable_reason", lambda: "")   # as where cuSPARSELt's library loads
    made_args, real_args = [], linear_pass.SemiStructuredLinearArgs   # the op's typed arguments as the plan makes them
    monkeypatch.setattr(linear_pass, "SemiStructuredLinearArgs",
                        lambda **kw: made_args.append(real_args(**kw)) or made_args[-1])
    monkeypatch.setattr(linear_pass, "planned_settings",
                        lambda packed, tokens, n, k, has_bias: searched.append((tokens, n, k, has_bias))
                        or (CsltConfig(17, 1, 2), "searched (stand-in)"))
    torch.manual_seed(2)
    model = zoo.ModuleLinear().eval()
    x = torch.randn(3, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels=kernels)
        for step in range(2):
            out = compiled(x).double()
            site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
            assert site.applied, site.reason
            w, b = model.proj.weight, model.proj.bias
            pruned, valid = prune_2_4(w)   # docs/spec.md's rule (ties go to the lower index)
            torch.testing.assert_close(out[:, valid], (x.double() @ pruned.T + b.double())[:, valid],
                                       atol=1e-5, rtol=1e-5)
            if kernels == "auto":
                assert "cuSPARSELt operand" in site.attrs["plan"]
                # the settings are planned once, for the site's static token count, and reach the op's arguments
                assert "cuSPARSELt settings: algorithm 17, split-K 1 (mode 2)" in site.attrs["plan"]
                assert "cuSPARSELt plans: kept per shape" in site.attrs["plan"]
                assert searched == [(3, model.proj.out_features, model.proj.in_features, True)]
                assert [(a.alg_id, a.split_k, a.split_k_mode) for a in made_args] == [(17, 1, 2)]
                assert len(derived) == step + 1   # made once by the plan and bound as it is, then one per update
                torch.testing.assert_close(derived[-1][valid], pruned[valid])
            else:
                assert "compressed at compile time" not in site.attrs["plan"] and not derived and not searched
                assert "compressed on the first call (reference kernels)" in site.attrs["plan"]
            model.proj.weight.mul_(-0.5)


def test_two_four_ties_in_a_bf16_weight_keep_the_lower_index(eager_lowering):
    """bf16 weights tie often: docs/spec.md's rule keeps, of equal magnitudes, the lower index."""
    from tests.oracle.oracle import prune_2_4

    torch.manual_seed(3)
    model = zoo.ModuleLinear().eval()
    with torch.no_grad():   # magnitudes from {0.25, 0.5, 1}: most groups of 4 tie somewhere
        model.proj.weight.copy_(torch.tensor([0.25, 0.5, 1.0])[torch.randint(0, 3, model.proj.weight.shape)]
                                * torch.sign(torch.randn(model.proj.weight.shape)))
    model = model.to(torch.bfloat16)
    x = torch.randn(3, 32).to(torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="reference")(x)
    assert sparsecc.last_report().applied
    groups = model.proj.weight.double().abs().reshape(-1, 4).sort(-1, descending=True).values
    assert bool((groups[:, 1] == groups[:, 2]).any())   # the 2nd and 3rd magnitudes do tie
    pruned, valid = prune_2_4(model.proj.weight)
    assert valid.all()
    expected = x.double() @ pruned.T + model.proj.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def test_float64_ffn_and_linear_sites_are_listed_with_the_reason():
    """A float64 model: its FFN and linear sites are in the report, dense, saying why; the rules that name them
    count as matched (they used to drop out, and the warning blamed the rules' globs)."""
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "gate", "threshold": 0.1}],
            "linear": [{"modules": "proj", "form": "2:4"}]}
    for model, x, kind in ((zoo.GatedSiluFFN().double().eval(), torch.randn(1, 3, 32, dtype=torch.float64), "ffn"),
                           (zoo.ModuleLinear().double().eval(), torch.randn(3, 32, dtype=torch.float64), "linear")):
        report = sparsecc.explain(model, x, spec=spec)
        sites = [s for s in report.sites if s.kind == kind]
        assert sites and all(not s.applied and "unsupported dtype torch.float64" in s.reason for s in sites)
        assert not any(key.startswith(kind) for key in report.unmatched_rules())


@pytest.mark.parametrize("rule", [{"form": "2:4"}, {"form": "block_weights", "block": [16, 16], "density": 0.5}])
def test_meta_weights_stay_dense_with_a_plain_reason(rule):
    """Weights not loaded yet (the meta device): dense, saying so, instead of a torch error about meta tensors."""
    model = zoo.ModuleLinear().to("meta").eval()
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [rule]}
    report = sparsecc.explain(model, torch.randn(3, 32, device="meta"), spec=spec)
    (site,) = [s for s in report.sites if s.kind == "linear"]
    assert not site.applied and "is on the meta device (not loaded)" in site.reason
