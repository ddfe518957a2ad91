"""Documented dense fallbacks and weights changed after compile, against the independent oracle
(tests/oracle/oracle.py); split from test_differential.py, under its rules: every test compiles with
``backend="sparsecc"`` and ``kernels="reference"``, and asserts either the form and the oracle's numbers, or the
documented fallback and its reason.
"""

from __future__ import annotations

import pytest
import torch

from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle


# ================================================================ documented dense fallbacks


def _eager_equal(model, args, out):
    with torch.no_grad():
        ref = model(*args)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5, equal_nan=True)


def _attn_inputs(b=1, h=4, hkv=2, sq=32, sk=32, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


DYN_RULES = {"block_topk": {"form": "block_topk", "block": 16, "topk": 1},
             "vertical_slash": {"form": "vertical_slash", "block": 16, "last_q": 4, "vertical": 1, "slash": 1}}


def test_block_topk_on_some_heads_stays_dense():
    """"block_topk applies to a site only when one rule covers every head with the same form"."""
    model = hn.AttnNet("sdpa_gqa", is_causal=True)
    args = _attn_inputs()
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{**DYN_RULES["block_topk"], "heads": [0, 1]}]}
    out, report = hn.compile_and_run(model, args, spec)
    hn.assert_dense(report, "attention", hn.SITE, because="block_topk")
    _eager_equal(model, args, out)


def test_vertical_slash_on_some_heads_applies_beside_dense_heads():
    """"vertical_slash heads may ... sit beside streaming and dense heads": heads 0-1 vertical_slash, the others
    the model's own attention (tests/oracle/test_mixed_heads.py draws such sites at random)."""
    c = cases.case(heads=4, kv_heads=2, sq=48, sk=48, dim=8, causal=True, causal_via="is_causal",
                   rules=[{**DYN_RULES["vertical_slash"], "heads": [0, 1]}])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    (site,) = hn.sites(report, "attention")
    assert site.applied and "dense on heads 2-3" in site.form_detail, (site.reason, site.form_detail)
    exp, valid, _ = cases.expected(c, q, k, v, mask)
    hn.assert_rows_close(out, exp, valid, c.torch_dtype)


def test_two_dynamic_forms_in_one_site_stay_dense():
    model = hn.AttnNet("sdpa_gqa", is_causal=True)
    args = _attn_inputs()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{**DYN_RULES["block_topk"], "heads": [0, 1]}, {**DYN_RULES["vertical_slash"], "heads": [2, 3]}]}
    out, report = hn.compile_and_run(model, args, spec)
    hn.assert_dense(report, "attention", hn.SITE)
    _eager_equal(model, args, out)


@pytest.mark.parametrize("rule", [{"form": "block_sparse", "block": 64}, {**DYN_RULES["block_topk"], "block": 64},
                                  {**DYN_RULES["vertical_slash"], "block": 64}], ids=lambda r: r["form"])
def test_block_larger_than_the_sequence_stays_dense(rule):
    """policy force: "a block larger than the sequence ... still falls back to dense, with the reason"."""
    model = hn.AttnNet("sdpa_gqa", is_causal=True)
    args = _attn_inputs(sq=40, sk=40)
    out, report = hn.compile_and_run(model, args, {"version": 1, "defaults": {"policy": "force"}, "attention": [rule]})
    hn.assert_dense(report, "attention", hn.SITE, because="block")
    _eager_equal(model, args, out)


def test_2_4_with_in_features_not_a_multiple_of_4_stays_dense():
    model = hn.LinearNet(hn.FunctionalLinear(18, 16))
    x = torch.randn(3, 18)
    out, report = hn.compile_and_run(model, (x,), {"version": 1, "defaults": {"policy": "force"},
                                                   "linear": [{"form": "2:4"}]})
    hn.assert_dense(report, "linear", "lin", because="4")
    _eager_equal(model, (x,), out)


def test_autograd_recording_stays_dense():
    """policy force under autograd recording: dense, reason given (sparse forms are for inference)."""
    model = hn.AttnNet("sdpa_gqa", is_causal=True)
    q, k, v = _attn_inputs(sq=16, sk=16)
    q.requires_grad_(True)
    torch._dynamo.reset()
    hn.reset_reports()
    with hn.lowering("eager"):
        out = torch.compile(model, backend="sparsecc", options={
            "spec": {"version": 1, "defaults": {"policy": "force"},
                     "attention": [{"form": "streaming", "sink": 1, "window": 2}]},
            "kernels": "reference"})(q, k, v)
    report = hn.sparsecc.last_report()
    hn.assert_dense(report, "attention", hn.SITE, because="autograd")
    torch.testing.assert_close(out, model(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("policy", ["off", "auto"])
def test_policy_off_and_auto_on_cpu_stay_dense(policy):
    """off: never applied. auto: "sites on the CPU stay dense"."""
    torch.manual_seed(0)
    q, k, v = _attn_inputs(sq=16, sk=16)
    spec = {"version": 1, "defaults": {"policy": policy},
            "attention": [{"form": "streaming", "sink": 1, "window": 2}],
            "ffn": [{"form": "activation_threshold", "threshold": 0.5}], "linear": [{"form": "2:4"}]}
    for model, args, kind, site in [(hn.AttnNet("sdpa_gqa", is_causal=True), (q, k, v), "attention", hn.SITE),
                                    (hn.FfnNet(hn.GatedFFN(16, 32)), (torch.randn(2, 3, 16),), "ffn", "mlp"),
                                    (hn.LinearNet(hn.FunctionalLinear(16, 8)), (torch.randn(2, 16),), "linear", "lin")]:
        out, report = hn.compile_and_run(model, args, spec)
        hn.assert_dense(report, kind, site, because=policy if policy == "off" else "CPU")
        _eager_equal(model, args, out)


def test_sparsity_target_without_threshold_is_not_applied():
    """"A rule with only a sparsity target is not applied until it has been calibrated"."""
    model = hn.FfnNet(hn.GatedFFN(16, 32))
    x = torch.randn(2, 3, 16)
    out, report = hn.compile_and_run(model, (x,), {"version": 1, "defaults": {"policy": "force"},
                                                  "ffn": [{"form": "activation_threshold", "sparsity": 0.5}]})
    hn.assert_dense(report, "ffn", "mlp", because="calibrat")
    _eager_equal(model, (x,), out)


def test_is_causal_with_fewer_queries_than_keys_stays_dense():
    """SDPA's is_causal with Sq < Sk is top-left aligned; the forms put the queries last, so the site stays dense."""
    model = hn.AttnNet("sdpa_gqa", is_causal=True)
    args = _attn_inputs(sq=5, sk=12)
    out, report = hn.compile_and_run(model, args, {"version": 1, "defaults": {"policy": "force"},
                                                   "attention": [{"form": "streaming", "sink": 1, "window": 2}]})
    hn.assert_dense(report, "attention", hn.SITE)
    _eager_equal(model, args, out)


# ================================================================ weights changed after compiling

UPDATES = {
    "data_mul_": lambda p: p.data.mul_(-1.5),
    "no_grad_mul_": lambda p: p.mul_(-1.5),
    "copy_": lambda p: p.copy_(torch.randn_like(p)),
}


# docs/design.md ("Weights"): writes through .data bypass the version counter and are seen with check_weights=True;
# updates through the parameter are seen without it.
HOWS = ["data_mul_", "no_grad_mul_", "copy_"]


def _options(how):
    return {"check_weights": True} if how == "data_mul_" else {}


def _update(param, how):
    with torch.no_grad():
        UPDATES[how](param)


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("rule", [{"form": "2:4"}, {"form": "block_weights", "block": [16, 16], "density": 0.5}],
                         ids=lambda r: r["form"])
def test_linear_weight_changed_after_compile(rule, how):
    """The compiled model serves the current weights: pruning follows a weight updated in place."""
    torch.manual_seed(0)
    lin = hn.FunctionalLinear(32, 32)
    model = hn.LinearNet(lin)
    x = torch.randn(4, 32)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [rule]}
    fn = hn.compiled_fn(model, spec, **_options(how))
    with hn.lowering("eager"), torch.no_grad():
        fn(x)
        _update(lin.weight, how)
        out = fn(x)
    hn.assert_applied(hn.sparsecc.last_report(), "linear", "lin", rule["form"])
    exp, valid_out = hn.linear_expected(lin, rule, x)
    hn.assert_rows_close(out[:, valid_out], exp[:, valid_out], torch.ones(4, dtype=torch.bool), torch.float32)


@pytest.mark.parametrize("how", HOWS)
def test_ffn_weight_changed_after_compile(how):
    torch.manual_seed(0)
    ffn = hn.GatedFFN(16, 32)
    model = hn.FfnNet(ffn)
    x = torch.randn(2, 3, 16)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "threshold": 0.25, "criterion": "weighted"}]}
    fn = hn.compiled_fn(model, spec, **_options(how))
    with hn.lowering("eager"), torch.no_grad():
        fn(x)
        _update(ffn.up_proj.weight, how)
        out = fn(x)
    hn.assert_applied(hn.sparsecc.last_report(), "ffn", "mlp", "activation_threshold")
    exp, valid = oracle.expected_ffn(hn.ffn_weights(ffn), x, mode="input", tau_input=0.25, tau_down=0.25,
                                     criterion="weighted", rtol_input=1e-5, rtol_hidden=1e-4)
    hn.assert_rows_close(out, exp, valid, torch.float32)
