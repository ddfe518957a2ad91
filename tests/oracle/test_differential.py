"""Differential tests: compiled sparse models against the independent oracle (tests/oracle/oracle.py).

Every test compiles a model written here with ``backend="sparsecc"``,
``kernels="reference"`` and ``policy = "force"``, asserts that the form was
applied (report and rewritten graph), then compares the output with the
float64 expectation that oracle.py derives from docs/spec.md, on the rows the
spec defines. Tests whose point is a documented dense fallback assert the
fallback and its reason instead.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import AttnCase, attention_cases, run_case

NOT_FOLDED = tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")

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
@example(c=cases.case(sq=2, sk=3, causal=True, causal_via="mask", mask_kind="bool", padding="right", lengths=(2,),
                      rules=[{"form": "streaming", "sink": 0, "window": 1}]))
@given(c=attention_cases("streaming", decode=True, causal=True, paddings=("right",)))
def test_streaming_decode_causal_right_padding(c):
    """Ragged right-padded batch, Sq < Sk: only the rows of real tokens are compared (see cases.query_rows_defined)."""
    run_case(c)


@hn.examples(15)
@given(c=attention_cases("streaming", decode=True, causal=False, masked=False))
def test_streaming_decode_bidirectional_unmasked(c):
    run_case(c)


@hn.examples(10)
@example(c=cases.case(sq=2, sk=3, mask_kind="bool", rules=[{"form": "streaming", "sink": 0, "window": 2}]))
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


@hn.examples(10)
@example(c=cases.case(sq=2, sk=3, causal=True, causal_via="mask", mask_kind="bool",
                      rules=[{"form": "block_sparse", "block": 2}]))
@given(c=attention_cases("block_sparse", decode=True, aligned=False))
def test_block_sparse_decode_unaligned(c):
    run_case(c)


@hn.examples(15)
@given(c=attention_cases("block_sparse", decode=False, per_head=False, spellings=NOT_FOLDED),
       random_blocks=st.integers(1, 2), seed=st.integers(0, 1000))
def test_block_sparse_random_blocks(c, random_blocks, seed):
    """Random blocks are drawn by sparsecc, so check the property: for every (head, query block) some set of at
    most ``random_blocks`` extra key blocks, the same for every batch element, explains the output; and the
    draw is reproducible from the seed."""
    check_random_blocks(c, random_blocks, seed)


@hn.examples(10)
@example(c=cases.case(spelling="bmm_folded", batch=2, sq=2, sk=2, temperature=0.5,
                      rules=[{"form": "block_sparse", "block": 1}]), random_blocks=1, seed=0)
@given(c=attention_cases("block_sparse", decode=False, causal=False, masked=False, per_head=False,
                         spellings=("bmm_folded",)),
       random_blocks=st.integers(1, 2), seed=st.integers(0, 1000))
def test_block_sparse_random_blocks_folded_heads(c, random_blocks, seed):
    """docs/spec.md: random blocks are drawn per head, the same for every batch element; a site whose heads are
    folded into the batch cannot honour that, so it stays dense with that reason, and its output is the model's."""
    i = next(n for n, r in enumerate(c.rules) if r["form"] == "block_sparse")
    c = c.replace(rules=c.rules[:i] + [{**c.rules[i], "random_blocks": random_blocks, "seed": seed}] + c.rules[i + 1:])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="cannot be told from batch elements")
    # dense fallback runs the model's own computation (in bf16 its softmax too), so compare with the model
    with torch.no_grad():
        own = cases.model_of(c)(q, k, v, mask)
    torch.testing.assert_close(out, own, **hn.tolerance(c.torch_dtype))


def check_random_blocks(c, random_blocks, seed):
    i = next(n for n, r in enumerate(c.rules) if r["form"] == "block_sparse")
    rule = {**c.rules[i], "random_blocks": random_blocks, "seed": seed}
    block = rule["block"]
    sk = min(c.sk, 8 * block)    # at most 8 key blocks, so the sets of extra blocks can be enumerated
    c = c.replace(rules=c.rules[:i] + [rule] + c.rules[i + 1:], sk=sk, sq=min(c.sq, sk),
                  lengths=tuple(min(n, sk) for n in c.lengths))
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_applied(report, "attention", hn.SITE, "block_sparse")
    again, _ = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    torch.testing.assert_close(again, out, atol=0, rtol=0, equal_nan=True)
    base_form = {key: val for key, val in rule.items() if key not in ("random_blocks", "seed")}
    flag = c.causal_via == "is_causal"
    # Each row's query block where docs/spec.md places it (positions from the mask, blocks cut from the element's
    # first shown key); -1: a padding row, which attends densely whatever was drawn.
    pos = oracle.row_positions(mask, c.batch, c.heads, c.sq, c.sk, is_causal_flag=flag)
    qblock = torch.where(pos >= 0, pos // block, -1)
    n_kb = math.ceil(c.sk / block)
    subsets = [s for n in range(random_blocks + 1) for s in itertools.combinations(range(n_kb), n)]
    # The output with a given set of extra key blocks (blocks cut as the element's positions are) for every query
    # block; the drawn set of each (head, query block) must be one of these, shared by elements padded alike.
    expl = [oracle.expected_attention(q, k, v, [{**base_form, "extra_blocks": s}] * c.heads, causal=c.causal,
                                      mask=mask, scale=c.scale, is_causal_flag=flag) for s in subsets]
    tol = hn.tolerance(c.torch_dtype)
    # Elements whose forms see the same keys share the draws; a padded element draws as it would alone
    # (docs/spec.md, "Left padding", "Right padding"), so elements that see other keys are explained apart.
    ranges = oracle.key_ranges(mask, c.batch, c.sq, c.sk, is_causal_flag=flag)
    groups = [torch.tensor([r == g for r in ranges])[:, None] for g in sorted(set(ranges))]
    for h in range(c.heads):
        for group in groups:
            for a in qblock[:, h].unique().tolist():
                check_query_block(out, expl, rows=(qblock[:, h] == a) & group, h=h, a=a, tol=tol,
                                  why=f"head {h}, query block {a}: no set of <= {random_blocks} extra key blocks "
                                      f"explains the output; {c}")


def check_query_block(out, expl, *, rows, h: int, a: int, tol: dict, why: str) -> None:
    """Some candidate of ``expl`` (outputs with given extra key blocks, the first with none) explains the rows
    ``rows`` ([B, Sq]) of head ``h``; rows no form places (``a`` -1, padding rows) must be dense: the first."""
    def fits(e):
        exp, valid = e
        sel = rows & valid[:, h]
        return torch.allclose(out[:, h][sel].double(), exp[:, h][sel], **tol)
    if a < 0:
        assert fits(expl[0]), f"head {h}: a padding row is not dense attention; {why}"
    else:
        assert any(fits(e) for e in expl), why


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


@hn.examples(10)
@example(c=cases.case(sq=32, sk=32, causal=True, causal_via="mask", mask_kind="bool",
                      rules=[{"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 0}]))
@example(c=cases.case(spelling="matmul_masked_fill", sq=17, sk=49, causal=True, causal_via="mask", mask_kind="bool",
                      temperature=0.5, rules=[{"form": "block_topk", "block": 16, "sink_blocks": 0,
                                               "local_blocks": 0, "pool": "mean", "cdf": 0.2}]))
@given(c=attention_cases("block_topk", causal=True, causal_via="mask"))
def test_block_topk_causal_mask_tensor(c):
    run_case(c)


# ================================================================ attention: vertical_slash


@hn.examples(25)
@given(c=attention_cases("vertical_slash", decode=False, causal=True, causal_via="is_causal"))
def test_vertical_slash_is_causal(c):
    run_case(c)


def _mask_keeps_a_later_key(c: AttnCase) -> bool:
    """Whether the case's mask keeps some key after a row's position i + Sk - Sq (spec: such a call is not
    causal for vertical_slash). A padding mask may by chance keep none; the oracle follows the case's intent."""
    mask = cases.tensors(c)[3]
    if mask is None:
        return True
    keep = mask if mask.dtype == torch.bool else mask > -1.0e4
    later = torch.arange(c.sk)[None, :] > (torch.arange(c.sq) + c.sk - c.sq)[:, None]
    return bool((torch.broadcast_to(keep, (c.batch, 1, c.sq, c.sk)) & later).any())


@hn.examples(10)
@given(c=attention_cases("vertical_slash", causal=False, masked=False).filter(lambda c: c.sq > 1))
def test_vertical_slash_bidirectional_stays_dense(c):
    """vertical_slash is causal only: a bidirectional site without a mask stays dense, with the reason (one query
    row is causal: test_vertical_slash_one_row_without_a_mask_is_causal)."""
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="causal")


@hn.examples(10)
@given(c=attention_cases("vertical_slash", causal=False, masked=False).map(lambda c: c.replace(sq=1)))
def test_vertical_slash_one_row_without_a_mask_is_causal(c):
    """docs/spec.md: one query row has no key after its position, so without a mask it is causal: applied, and
    equal to the oracle of the causal rule."""
    run_case(c)


@hn.examples(10)
@given(c=attention_cases("vertical_slash", causal=False, masked=True).filter(_mask_keeps_a_later_key))
def test_vertical_slash_masked_not_causal_attends_densely(c):
    """Applied (the mask may be causal at run time), but a call whose mask keeps a later key attends densely."""
    run_case(c)


@hn.examples(10)
@example(c=cases.case(sq=49, sk=49, causal=True, causal_via="mask", mask_kind="bool", temperature=0.5, seed=3,
                      rules=[{"form": "vertical_slash", "block": 16, "last_q": 3, "vertical": 2, "slash": 0}]))
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
    exp, valid_out = hn.linear_expected(lin, c["rule"], x)
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


# ================================================================ policies of per-head rules

@st.composite
def policy_cases(draw, mixed: bool):
    """Streaming rules on head subsets with policies: one policy for all rules, or mixed policies."""
    c = draw(attention_cases("streaming", decode=False, spellings=NOT_FOLDED))
    heads = c.heads
    rules = []
    for _ in range(draw(st.integers(2 if mixed else 1, 3))):
        r = {"form": "streaming", "sink": draw(st.integers(0, 4)), "window": draw(st.integers(1, 6))}
        if draw(st.booleans()):
            r["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))
        rules.append(r)
    if mixed:
        pols = [draw(st.sampled_from(["force", "off", "auto"])) for _ in rules]
        assume(len(set(pols)) > 1)
    else:
        pols = [draw(st.sampled_from(["force", "off", "auto"]))] * len(rules)
    for r, p in zip(rules, pols):
        if p != "auto" or draw(st.booleans()):
            r["policy"] = p
    return c.replace(rules=rules, defaults_policy="auto")


def run_policy_case(c: AttnCase):
    """Applied with the per-head forms when the site's policy is force; otherwise dense (off, or auto on CPU)."""
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    if site.sparse:
        return run_case(c)
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE)
    assert not hn.sparse_ops()
    # a dense site runs the model's own computation (in bf16, its own bf16 softmax): compare with the model
    with torch.no_grad():
        own = cases.model_of(c)(q, k, v, mask)
    torch.testing.assert_close(out, own, **hn.tolerance(c.torch_dtype), equal_nan=True, msg=lambda m: f"{c}\n{m}")


@hn.examples(20)
@given(c=policy_cases(mixed=False))
def test_policy_one_for_all_rules(c):
    run_policy_case(c)


def _policy_example(first_heads, first_policy, second_heads, second_policy, heads=4):
    return AttnCase(spelling="sdpa_gqa", batch=1, heads=heads, kv_heads=heads, sq=8, sk=8, dim=4, causal=True,
                    causal_via="is_causal", mask_kind="none", padding="none", lengths=(), compact_mask=False,
                    dtype="float32", scale=None, temperature=2.0, seed=0, defaults_policy="auto",
                    rules=[{"form": "streaming", "sink": 1, "window": 2, "heads": first_heads,
                            "policy": first_policy},
                           {"form": "streaming", "sink": 0, "window": 1, "heads": second_heads,
                            "policy": second_policy}])


@hn.examples(15)
@example(c=_policy_example([3], "force", [0], "off"))
@given(c=policy_cases(mixed=True))
def test_policy_mixed_per_head_rules(c):
    """spec.md: "the policy of the last covering sparse rule applies to the site"."""
    run_policy_case(c)


def test_policy_last_sparse_rule_force_applies_every_sparse_head():
    """Rule A (heads [0], off) then rule B (heads [3], force): the site is forced, head 0 takes A's form."""
    run_policy_case(_policy_example([0], "off", [3], "force"))


# ================================================================ through Inductor (a handful: seconds per graph)

INDUCTOR_ATTENTION = {
    "streaming_prefill_padded": cases.case(batch=2, heads=4, kv_heads=2, sq=24, sk=24, dim=8, causal=True,
                                           causal_via="mask", mask_kind="additive", padding="left", lengths=(24, 17),
                                           rules=[{"form": "streaming", "sink": 2, "window": 5, "heads": [0, 3]},
                                                  {"form": "streaming", "sink": 0, "window": 3, "heads": [1]}]),
    "block_sparse_decode": cases.case(batch=2, heads=2, kv_heads=1, sq=4, sk=20, dim=8, causal=True,
                                      causal_via="mask", mask_kind="bool", dtype="bfloat16",
                                      rules=[{"form": "block_sparse", "block": 4, "local_blocks": 2,
                                              "global_blocks": 1}]),
    "block_topk_causal": cases.case(batch=1, heads=4, kv_heads=2, sq=80, sk=80, dim=16, causal=True,
                                    causal_via="is_causal", temperature=2.0,
                                    rules=[{"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 1,
                                            "local_blocks": 1}]),
    "vertical_slash_causal": cases.case(batch=2, heads=2, kv_heads=2, sq=150, sk=150, dim=8, causal=True,
                                        causal_via="is_causal", temperature=2.0,
                                        rules=[{"form": "vertical_slash", "block": 16, "last_q": 8,
                                                "vertical": 35, "slash": 60}]),
}


@pytest.mark.parametrize("name", sorted(INDUCTOR_ATTENTION))
def test_attention_through_inductor(name):
    run_case(INDUCTOR_ATTENTION[name], lower="inductor")


def test_ffn_and_linear_through_inductor():
    run_ffn_case({"spelling": "gated", "act": "silu", "hidden": 16, "inner": 32, "bias": False, "batch": 2,
                  "tokens": 5, "dtype": "float32", "seed": 1,
                  "rule": {"form": "activation_threshold", "mode": "input", "threshold": {"input": 0.5, "down": 0.125}}},
                 lower="inductor")
    run_linear_case({"spelling": "module", "k": 32, "n": 16, "bias": True, "lead": (2, 3), "dtype": "float32",
                     "seed": 2, "rule": {"form": "2:4"}}, lower="inductor")
