"""Differential tests: compiled sparse models against the independent oracle (tests/oracle/oracle.py).

Every test compiles a model written here with ``backend="sparsecc"``,
``kernels="reference"`` and ``policy = "force"``, asserts that the form was
applied (report and rewritten graph), then compares the output with the
float64 expectation that oracle.py derives from docs/spec.md, on the rows the
spec defines. Tests whose point is a documented dense fallback assert the
fallback and its reason instead.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import AttnCase, attention_cases, run_case

# ================================================================ attention: streaming


@hn.examples(25)
@given(c=attention_cases("streaming", decode=False))
def test_streaming_prefill(c):
    """Sq == Sk: causal (is_causal or a mask tensor) and bidirectional, every mask kind, padding, per-head rules."""
    run_case(c)


@hn.examples(20)
@given(c=attention_cases("streaming", decode=True, causal=True, paddings=("none", "left")))
def test_streaming_decode_causal(c):
    """Sq < Sk (chunked prefill / multi-token decode): queries at p = i + Sk - Sq, causality by a mask tensor."""
    run_case(c)


@hn.examples(10)
@given(c=attention_cases("streaming", decode=True, causal=True, paddings=("right",)))
def test_streaming_decode_causal_right_padding(c):
    """Ragged right-padded batch, Sq < Sk: only the rows of real tokens are compared (see cases.query_rows_defined)."""
    run_case(c)


@hn.examples(15)
@given(c=attention_cases("streaming", decode=True, causal=False, masked=False))
def test_streaming_decode_bidirectional_unmasked(c):
    run_case(c)


@pytest.mark.xfail(strict=True, reason="non-causal Sq < Sk with a mask is computed as causal streaming with the "
                                       "query position taken from the mask")
@hn.examples(10)
@given(c=attention_cases("streaming", decode=True, causal=False, masked=True))
def test_streaming_decode_bidirectional_masked(c):
    run_case(c)


# ================================================================ attention: block_sparse


@hn.examples(25)
@given(c=attention_cases("block_sparse", decode=False))
def test_block_sparse_prefill(c):
    run_case(c)


@hn.examples(20)
@given(c=attention_cases("block_sparse", decode=True, aligned=True))
def test_block_sparse_decode_aligned(c):
    """Sq < Sk with Sk - Sq a multiple of the block, or Sq == 1."""
    run_case(c)


@pytest.mark.xfail(strict=True, reason="block_sparse with 1 < Sq < Sk and (Sk - Sq) % block != 0 uses the wrong "
                                       "query block")
@hn.examples(10)
@given(c=attention_cases("block_sparse", decode=True, aligned=False, causal=True))
def test_block_sparse_decode_unaligned(c):
    run_case(c)


# ================================================================ attention: block_topk


@hn.examples(25)
@given(c=attention_cases("block_topk", decode=False, causal=True, causal_via="is_causal"))
def test_block_topk_is_causal(c):
    run_case(c)


@hn.examples(25)
@given(c=attention_cases("block_topk", causal=False))
def test_block_topk_bidirectional(c):
    """Sq <= Sk, with and without masks (the estimate ignores the mask; the mask applies token by token)."""
    run_case(c)


@pytest.mark.xfail(strict=True, reason="block_topk with a causal mask tensor (not is_causal) lets future blocks "
                                       "compete")
@hn.examples(10)
@given(c=attention_cases("block_topk", causal=True, causal_via="mask"))
def test_block_topk_causal_mask_tensor(c):
    run_case(c)


# ================================================================ attention: vertical_slash


@hn.examples(25)
@given(c=attention_cases("vertical_slash", decode=False, causal=True, causal_via="is_causal"))
def test_vertical_slash_is_causal(c):
    run_case(c)


def _aligned_vs(c: AttnCase) -> AttnCase:
    """The case with Sk cut down to a multiple of the block (Sq, lengths and slash budget cut to fit)."""
    rule = c.rules[-1]
    sk = max(rule["block"], c.sk - c.sk % rule["block"])
    rules = c.rules[:-1] + [{**rule, "slash": min(rule["slash"], sk - 1)}]
    return c.replace(sk=sk, sq=min(c.sq, sk), lengths=tuple(min(n, sk) for n in c.lengths), rules=rules)


@hn.examples(20)
@given(c=attention_cases("vertical_slash", causal=False).map(_aligned_vs))
def test_vertical_slash_bidirectional_aligned(c):
    """Sk a multiple of the block."""
    run_case(c)


@pytest.mark.xfail(strict=True, reason="vertical_slash bidirectional with Sk % block != 0 keeps the last key block "
                                       "for every query block")
@hn.examples(10)
@given(c=attention_cases("vertical_slash", causal=False).filter(lambda c: c.sk % c.rules[-1]["block"] != 0))
def test_vertical_slash_bidirectional_unaligned(c):
    run_case(c)


@pytest.mark.xfail(strict=True, reason="vertical_slash with a causal mask tensor (not is_causal) estimates and "
                                       "selects as if bidirectional")
@hn.examples(10)
@given(c=attention_cases("vertical_slash", causal=True, causal_via="mask"))
def test_vertical_slash_causal_mask_tensor(c):
    run_case(c)


# ================================================================ FFN: activation_threshold

# taus exactly representable in bfloat16, so comparing a bf16 activation with tau needs no rounding of tau
TAUS = [0.0, 0.0625, 0.125, 0.25, 0.5, 1.0]
FFN_SITE = "mlp"


@st.composite
def ffn_cases(draw, mode: str, criterion: str = "magnitude", spellings=("plain", "gated", "fused_gate_up")):
    spelling = draw(st.sampled_from(spellings))
    acts = ["gelu", "gelu_tanh", "relu", "relu2", "silu"] if spelling == "plain" else ["silu", "gelu"]
    c = {"spelling": spelling, "act": draw(st.sampled_from(acts)), "hidden": draw(st.sampled_from([8, 16, 32])),
         "inner": draw(st.sampled_from([16, 32, 48])), "bias": draw(st.booleans()),
         "batch": draw(st.integers(1, 2)), "tokens": draw(st.integers(1, 9)),
         "dtype": draw(st.sampled_from(["float32", "bfloat16"])), "seed": draw(st.integers(0, 2 ** 16))}
    taus = TAUS if criterion == "magnitude" else [0.0625, 0.125, 0.25, 0.5]
    rule = {"modules": draw(st.sampled_from(["*", "mlp", "m?p"])), "form": "activation_threshold", "mode": mode}
    if criterion != "magnitude" or draw(st.booleans()):
        rule["criterion"] = criterion
    if mode == "input":
        shape = draw(st.sampled_from(["number", "both", "input", "down"]))
        if shape == "number":
            rule["threshold"] = draw(st.sampled_from(taus))
        else:
            rule["threshold"] = {key: draw(st.sampled_from(taus)) for key in (("input", "down") if shape == "both"
                                                                                else (shape,))}
    else:
        tau = draw(st.sampled_from(taus))
        rule["threshold"] = tau if draw(st.booleans()) else {"gate": tau}
    if draw(st.booleans()):
        rule["sparsity"] = 0.5   # a target next to a threshold: the threshold is what applies
    c["rule"] = rule
    return c


def _taus(rule):
    t = rule["threshold"]
    if rule["mode"] == "gate":
        return {"tau_gate": t if not isinstance(t, dict) else t["gate"]}
    if not isinstance(t, dict):
        return {"tau_input": t, "tau_down": t}
    return {"tau_input": t.get("input"), "tau_down": t.get("down")}


def run_ffn_case(c, lower="eager"):
    torch.manual_seed(c["seed"])
    dtype = getattr(torch, c["dtype"])
    ffn = hn.FFN_SPELLINGS[c["spelling"]](c["hidden"], c["inner"], act=c["act"], bias=c["bias"]).eval().to(dtype)
    x = torch.randn(c["batch"], c["tokens"], c["hidden"]).to(dtype)
    spec = {"version": 1, "defaults": {"policy": "force"}, "ffn": [c["rule"]]}
    out, report = hn.compile_and_run(hn.FfnNet(ffn), (x,), spec, lower=lower)
    assert oracle.site_applies(spec, "ffn", FFN_SITE)
    hn.assert_applied(report, "ffn", FFN_SITE, "activation_threshold")
    bf16 = dtype == torch.bfloat16
    exp, valid = oracle.expected_ffn(hn.ffn_weights(ffn), x, mode=c["rule"]["mode"], **_taus(c["rule"]),
                                     criterion=c["rule"].get("criterion", "magnitude"),
                                     rtol_input=1e-3 if bf16 else 1e-5, rtol_hidden=3e-2 if bf16 else 1e-4)
    hn.assert_rows_close(out, exp, valid, dtype, what=str(c))


@hn.examples(25)
@given(c=ffn_cases("input"))
def test_ffn_input_mode(c):
    """TEAL: x * (|x| > tau) before up/gate (tau input) and down (tau down); a projection left out stays dense."""
    run_ffn_case(c)


@hn.examples(25)
@given(c=ffn_cases("gate", spellings=("gated", "fused_gate_up")))
def test_ffn_gate_mode(c):
    """CATS: act(x W_gate) thresholded before it multiplies up (gated FFNs)."""
    run_ffn_case(c)


@hn.examples(20)
@given(c=ffn_cases("input", criterion="weighted", spellings=("plain", "gated")))
def test_ffn_input_mode_weighted(c):
    """score_i = |x_i| * ||W[:, i]||_2 with W the projection that consumes x (each of gate and up its own)."""
    run_ffn_case(c)


# ================================================================ linear: 2:4 and block_weights

def linear_site(spelling: str) -> str:
    """The module path of the linear site: ``lin`` (the module holding the parameter), ``lin.proj`` for nn.Linear."""
    return "lin.proj" if spelling == "module" else "lin"


@st.composite
def linear_cases(draw, form: str):
    if form == "2:4":
        k = draw(st.sampled_from([8, 16, 32, 48]))
        n = draw(st.sampled_from([8, 16, 24, 32]))
        rule = {"form": "2:4"}
        if draw(st.booleans()):
            rule["prune"] = "magnitude"
    else:
        bm, bk = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 32]))
        n, k = bm * draw(st.integers(1, 3)), bk * draw(st.integers(1, 3))
        rule = {"form": "block_weights", "block": [bm, bk], "density": draw(st.sampled_from([0.1, 0.25, 0.5, 0.75, 1]))}
    rule["modules"] = draw(st.sampled_from(["*", "lin*", "l*"]))
    return {"spelling": draw(st.sampled_from(sorted(hn.LINEAR_SPELLINGS))), "k": k, "n": n, "rule": rule,
            "bias": draw(st.booleans()), "lead": draw(st.sampled_from([(3,), (2, 5), (1, 1)])),
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])), "seed": draw(st.integers(0, 2 ** 16))}


def _linear_expected(lin, rule, x):
    w, b = lin.weight_out_in()
    w = w.detach()
    if rule["form"] == "2:4":
        pruned, valid_out = oracle.prune_2_4(w)
    else:
        pruned, defined = oracle.prune_block_weights(w, tuple(rule.get("block", (64, 64))), rule.get("density", 0.25))
        assume(defined)
        valid_out = torch.ones(w.shape[0], dtype=torch.bool)
    exp = oracle.expected_linear(x, pruned, None if b is None else b.detach())
    return exp, valid_out


def run_linear_case(c, lower="eager"):
    torch.manual_seed(c["seed"])
    dtype = getattr(torch, c["dtype"])
    lin = hn.LINEAR_SPELLINGS[c["spelling"]](c["k"], c["n"], bias=c["bias"]).eval().to(dtype)
    x = torch.randn(*c["lead"], c["k"]).to(dtype)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [c["rule"]]}
    out, report = hn.compile_and_run(hn.LinearNet(lin), (x,), spec, lower=lower)
    site = linear_site(c["spelling"])
    assert oracle.site_applies(spec, "linear", site)
    hn.assert_applied(report, "linear", site, c["rule"]["form"])
    exp, valid_out = _linear_expected(lin, c["rule"], x)
    hn.assert_rows_close(out[..., valid_out], exp[..., valid_out], torch.ones(out.shape[:-1], dtype=torch.bool),
                         dtype, what=str(c))
    return lin, x


@hn.examples(25)
@given(c=linear_cases("2:4"))
def test_linear_2_4(c):
    run_linear_case(c)


@hn.examples(25)
@given(c=linear_cases("block_weights"))
def test_linear_block_weights(c):
    run_linear_case(c)
