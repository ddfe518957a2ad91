"""Metamorphic tests: pairs of compiled runs that the spec says must agree, for every attention form.

No expected values here: each test compiles two models, specs or inputs that
docs/spec.md says are equivalent, asserts the sparse form was applied in both
(when the point is a sparse form), and compares the outputs.

* a neutral mask (all-True bool, all-zero additive) changes nothing;
* a sequence's output does not depend on its batch-mates (dynamic forms choose
  their layout "separately per batch element"), nor, for the static forms,
  on how much right padding follows it;
* a sequence behind left padding its mask hides attends as it does alone;
* a causal mask passed as a tensor equals ``is_causal=True``;
* rules that do not overlap give the same result in either order;
* a dense spec (no rules, dense rules, policy off, auto on the CPU) equals eager.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import AttnCase


def attention_cases(form, **pinned):
    """``cases.attention_cases`` at lengths where the dynamic forms leave keys out: every test here compares two
    sparse runs, which would agree trivially on dense layouts."""
    return cases.attention_cases(form, sparse_layouts=True, **pinned)

FORMS = ("streaming", "block_sparse", "block_topk", "vertical_slash")
STATIC = ("streaming", "block_sparse")


def _close(a, b, dtype, what=""):
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=lambda m: f"{what}\n{m}")


def _run(c: AttnCase, args, n: int = 1, spec=None, applied=True):
    out, report = hn.compile_and_run(cases.model_of(c, n=n), args, c.spec if spec is None else spec)
    if applied:
        for i in range(n):
            hn.assert_applied(report, "attention", f"layers.{i}.attn", _form_of(spec or c.spec, i, c.heads))
    return out


def _form_of(spec, layer, heads):
    site = oracle.attention_site_rule(spec, f"layers.{layer}.attn", heads)
    (name,) = {f["form"] for f in site.forms if f is not None}
    return name


# ================================================================ a neutral mask is a no-op

def _neutral(c: AttnCase, kind: str, compact: bool) -> AttnCase:
    return c.replace(mask_kind=kind, compact_mask=compact)


@st.composite
def neutral_pairs(draw, form, decode):
    c = draw(attention_cases(form, causal=False, masked=False, decode=decode,
                             spellings=tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")))
    kinds = (["neutral_bool"] if c.spelling in cases.BOOL_SPELLINGS else []) + \
        (["neutral_additive"] if c.spelling in cases.ADDITIVE_SPELLINGS else [])
    return c, draw(st.sampled_from(kinds)), draw(st.booleans())


def _check_neutral(pair):
    c, kind, compact = pair
    q, k, v, _ = cases.tensors(c)
    masked = _neutral(c, kind, compact)
    # vertical_slash is causal only: the bidirectional site without a mask stays dense (docs/spec.md), unless it
    # has one query row (causal: no key after it); with the neutral mask it is rewritten and its calls attend
    # densely (one row: causally), so the outputs still agree.
    rewritten = _form_of(c.spec, 0, c.heads) != "vertical_slash" or c.sq == 1
    plain = _run(c, (q, k, v, None), applied=rewritten)
    mask = cases.build_mask(masked)
    with_mask = _run(masked, (q, k, v, mask))
    if rewritten:
        _close(with_mask, plain, c.torch_dtype, what=str(pair))
        return
    # The plain site ran the model's own computation (in bf16, its own bf16 softmax), so each side is checked
    # against its own reference: the plain one equals the model, the masked one the oracle (dense here).
    with torch.no_grad():
        torch.testing.assert_close(plain, cases.model_of(c)(q, k, v, None), **hn.tolerance(c.torch_dtype))
    expected, valid, _ = cases.expected(masked, q, k, v, mask)
    hn.assert_rows_close(with_mask, expected, valid, c.torch_dtype, what=str(pair))


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_neutral_mask_is_a_noop_prefill(form, data):
    _check_neutral(data.draw(neutral_pairs(form, decode=False)))


@pytest.mark.parametrize("form", [f for f in FORMS if f != "streaming"])
@hn.examples(10)
@given(data=st.data())
def test_neutral_mask_is_a_noop_decode(form, data):
    """Sq < Sk, bidirectional: an all-True / all-zero mask must not change the result."""
    _check_neutral(data.draw(neutral_pairs(form, decode=True)))


@hn.examples(10)
@example(pair=(cases.case(sq=2, sk=3, rules=[{"form": "streaming", "sink": 0, "window": 2}]), "neutral_bool", False))
@given(pair=neutral_pairs("streaming", decode=True))
def test_neutral_mask_is_a_noop_decode_streaming(pair):
    _check_neutral(pair)


# ================================================================ batch-mates and right padding


@st.composite
def batch_mate_cases(draw, form):
    c = draw(attention_cases(form, spellings=tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")))
    c = c.replace(batch=1, lengths=c.lengths[:1], compact_mask=False)
    mates = []
    for _ in range(draw(st.integers(1, 3))):
        lengths = (draw(st.integers(1, c.sk)),) if c.padding != "none" else ()
        mates.append(c.replace(seed=draw(st.integers(0, 2 ** 16)), lengths=lengths))
    position = draw(st.integers(0, len(mates)))
    return c, mates, position


def _stack(parts):
    q, k, v, m = zip(*parts)
    mask = None if m[0] is None else torch.cat(m)
    return torch.cat(q), torch.cat(k), torch.cat(v), mask


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_output_does_not_depend_on_batch_mates(form, data):
    """The same sequence alone and among other sequences (other data, other padding) gives the same rows."""
    c, mates, position = data.draw(batch_mate_cases(form))
    if form == "vertical_slash":
        assume(c.causal or c.mask_kind != "none")   # a bidirectional site without a mask stays dense
    x = cases.tensors(c)
    alone = _run(c, x)
    parts = [cases.tensors(m) for m in mates]
    parts.insert(position, x)
    together = _run(c.replace(batch=len(parts)), _stack(parts))
    _close(together[position:position + 1], alone, c.torch_dtype, what=f"{c} at {position} among {mates}")


@st.composite
def right_padding_pairs(draw, form):
    """A sequence of length L right-padded to Sk1 and to Sk2 > Sk1 (prefill, Sq == Sk)."""
    causal = draw(st.booleans())
    c = draw(attention_cases(form, decode=False, paddings=("right",), causal=causal,
                             causal_via="mask" if causal else None, masked=True,
                             spellings=tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")))
    assume(c.padding == "right")   # (neutral masks have no padding)
    c = c.replace(batch=1, lengths=c.lengths[:1], compact_mask=False)
    extra = draw(st.integers(1, 12))
    return c, extra


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_right_padding_changes_nothing(form, data):
    """spec.md, "Right padding": more right padding leaves the real rows unchanged, for the static layouts
    (positions only) and for the dynamic forms, whose estimates see none of it."""
    c, extra = data.draw(right_padding_pairs(form))
    if form == "vertical_slash":
        assume(c.causal)   # bidirectional vertical_slash attends densely on both sides
    q, k, v, mask = cases.tensors(c)
    longer = c.replace(sq=c.sq + extra, sk=c.sk + extra)
    g = torch.Generator().manual_seed(c.seed + 1)

    def grow(t):
        pad = torch.randn(*t.shape[:2], extra, t.shape[3], generator=g).to(t.dtype)
        return torch.cat([t, pad], 2)
    q2, k2, v2 = grow(q), grow(k), grow(v)
    mask2 = cases.build_mask(longer, torch.Generator().manual_seed(c.seed))
    if c.mask_kind == "bias":   # keep the same biases on the old cells
        mask2[..., :c.sq, :c.sk] = mask
    short = _run(c, (q, k, v, mask))
    long = _run(longer, (q2, k2, v2, mask2))
    n = c.lengths[0]
    _close(long[:, :, :n], short[:, :, :n], c.torch_dtype, what=f"{c} + {extra}")


# ================================================================ left padding


@st.composite
def left_padding_cases(draw, form):
    """A masked sequence (prefill or decode) and how many padding keys to put before it."""
    causal = draw(st.booleans())
    c = draw(attention_cases(form, causal=causal, causal_via="mask" if causal else None, masked=True,
                             paddings=("none", "right"),
                             spellings=tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")))
    c = c.replace(batch=1, lengths=c.lengths[:1])
    return c, draw(st.integers(1, 40))


def _left_padded(c: AttnCase, q, k, v, mask, pad: int):
    """The same sequence behind ``pad`` random padding keys (and, in prefill, their query rows), which its mask
    hides from every row, as transformers left-pads a batch."""
    g = torch.Generator().manual_seed(c.seed + 7)
    rows = pad if c.sq == c.sk else 0

    def ahead(t, n):
        return torch.cat([torch.randn(*t.shape[:2], n, t.shape[3], generator=g).to(t.dtype), t], 2)
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    m4 = m4.expand(1, m4.shape[1], c.sq, c.sk)
    hidden = False if m4.dtype == torch.bool else float("-inf")
    padded = torch.full((1, m4.shape[1], c.sq + rows, c.sk + pad), hidden, dtype=m4.dtype)
    padded[..., rows:, pad:] = m4
    return ahead(q, rows), ahead(k, pad), ahead(v, pad), padded


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_left_padding_changes_nothing(form, data):
    """spec.md, "Left padding": a sequence's rows are the same alone and behind padding its mask hides (the
    padding a batch-mate's length gives it); positions count from its first key."""
    c, pad = data.draw(left_padding_cases(form))
    if form == "vertical_slash":
        assume(c.causal)   # bidirectional vertical_slash attends densely on both sides
    q, k, v, mask = cases.tensors(c)
    alone = _run(c, (q, k, v, mask))
    longer = c.replace(sq=c.sq + (pad if c.sq == c.sk else 0), sk=c.sk + pad)
    together = _run(longer, _left_padded(c, q, k, v, mask, pad))
    _close(together[:, :, -c.sq:], alone, c.torch_dtype, what=f"{c} behind {pad} padding keys")


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_left_padding_moves_the_models_own_window_rule(form, data):
    """spec.md, "A model with its own sliding window" and "Left padding": the call runs dense once its first
    query sits at ``W - 1`` or later, counted from the element's first key. With ``W - 1`` between ``Sk - Sq``
    alone and ``Sk - Sq`` behind the padding, the padded sequence still runs the form, as it does alone (and as
    the same sequence does at a site without an own window)."""
    c, pad = data.draw(left_padding_cases(form))
    assume(c.sq < c.sk)   # with as many queries as keys the first query sits at 0: the rule never applies
    if form == "vertical_slash":
        assume(c.causal)
    own_window = c.sk - c.sq + 2 + data.draw(st.integers(0, pad - 1))   # W - 1 in (Sk - Sq, Sk - Sq + pad]
    q, k, v, mask = cases.tensors(c)
    longer = c.replace(sk=c.sk + pad)

    def run(case, tensors, window):
        model = cases.model_of(case)
        model.layers[0].attn.sliding_window = window
        out, report = hn.compile_and_run(model, tensors, case.spec)
        hn.assert_applied(report, "attention", "layers.0.attn", _form_of(case.spec, 0, case.heads))
        return out
    alone = run(c, (q, k, v, mask), own_window)
    _close(alone, _run(c, (q, k, v, mask)), c.torch_dtype, what=f"{c} alone, own window {own_window}")
    together = run(longer, _left_padded(c, q, k, v, mask, pad), own_window)
    _close(together[:, :, -c.sq:], alone, c.torch_dtype,
           what=f"{c} behind {pad} padding keys, own window {own_window}")


# ================================================================ a causal mask tensor equals is_causal

@st.composite
def causal_tensor_pairs(draw, form):
    c = draw(attention_cases(form, decode=False, causal=True, causal_via="is_causal"))
    return c, draw(st.sampled_from(["bool", "additive", "finfo"])), draw(st.booleans())


def _check_causal_tensor(pair):
    c, kind, compact = pair
    q, k, v, _ = cases.tensors(c)
    flag = _run(c, (q, k, v, None))
    tensor_case = c.replace(causal_via="mask", mask_kind=kind, compact_mask=compact)
    by_tensor = _run(tensor_case, (q, k, v, cases.build_mask(tensor_case)))
    _close(by_tensor, flag, c.torch_dtype, what=f"{tensor_case}")


@pytest.mark.parametrize("form", STATIC)
@hn.examples(10)
@given(data=st.data())
def test_causal_mask_tensor_equals_is_causal(form, data):
    _check_causal_tensor(data.draw(causal_tensor_pairs(form)))


@hn.examples(10)
@example(pair=(cases.case(sq=32, sk=32, causal=True, causal_via="is_causal",
                          rules=[{"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0,
                                  "local_blocks": 0}]), "bool", False))
@given(pair=causal_tensor_pairs("block_topk"))
def test_causal_mask_tensor_equals_is_causal_block_topk(pair):
    _check_causal_tensor(pair)


@hn.examples(10)
@example(pair=(cases.case(sq=49, sk=49, causal=True, causal_via="is_causal", temperature=0.5, seed=3,
                          rules=[{"form": "vertical_slash", "block": 16, "last_q": 3, "vertical": 2, "slash": 0}]),
               "bool", False))
@given(pair=causal_tensor_pairs("vertical_slash"))
def test_causal_mask_tensor_equals_is_causal_vertical_slash(pair):
    _check_causal_tensor(pair)


# ================================================================ rules in either order

RULE_STRATEGIES = {
    "streaming": lambda c: st.builds(dict, form=st.just("streaming"), sink=st.integers(0, 4),
                                     window=st.integers(1, 8)),
    "block_sparse": lambda c: st.builds(dict, form=st.just("block_sparse"),
                                        block=st.sampled_from([b for b in (1, 2, 4, 8) if b <= c.sk]),
                                        local_blocks=st.integers(1, 2), global_blocks=st.integers(0, 1)),
    "block_topk": lambda c: cases.block_topk_rule(16),
    "vertical_slash": lambda c: cases.vertical_slash_rule(16, c.sq, c.sk, c.causal),
}


@pytest.mark.parametrize("form", FORMS)
@hn.examples(10)
@given(data=st.data())
def test_rules_for_different_sites_commute(form, data):
    """Two sites, one rule each (this form for one, any form for the other): the rule order does not matter."""
    c = data.draw(attention_cases(form, decode=False, causal=True, causal_via="is_causal", min_sk=16))
    assume(c.sk >= 16)
    other = data.draw(st.sampled_from(FORMS))
    r0 = {**data.draw(RULE_STRATEGIES[form](c)), "modules": "layers.0.attn"}
    r1 = {**data.draw(RULE_STRATEGIES[other](c)), "modules": "layers.1.*"}
    args = cases.tensors(c)
    spec_a = {"version": 1, "defaults": {"policy": "force"}, "attention": [r0, r1]}
    spec_b = {"version": 1, "defaults": {"policy": "force"}, "attention": [r1, r0]}
    a = _run(c, args, n=2, spec=spec_a)
    b = _run(c, args, n=2, spec=spec_b)
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


@hn.examples(15)
@given(data=st.data())
def test_per_head_rules_on_disjoint_heads_commute(data):
    """Streaming rules on disjoint head sets (static forms may differ per head): any order, same result."""
    c = data.draw(attention_cases("streaming", decode=False,
                                  spellings=tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")))
    assume(c.heads > 1)
    perm = data.draw(st.permutations(range(c.heads)))
    cut = sorted(data.draw(st.lists(st.integers(1, c.heads - 1), min_size=1, max_size=c.heads - 1, unique=True)))
    groups = [perm[a:b] for a, b in zip([0] + cut, cut + [c.heads])]
    rules = [{"form": "streaming", "heads": list(g), "sink": data.draw(st.integers(0, 4)),
              "window": data.draw(st.integers(1, 8))} for g in groups]
    order = data.draw(st.permutations(range(len(rules))))
    args = cases.tensors(c)
    a = _run(c.replace(rules=rules), args)
    b = _run(c.replace(rules=[rules[i] for i in order]), args)
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


# ================================================================ a dense spec equals eager

DENSE_SPECS = {
    "no rules": {"version": 1},
    "dense rules": {"version": 1, "defaults": {"policy": "force"},
                    "attention": [{"form": "streaming", "sink": 1, "window": 2}, {"form": "dense"}],
                    "ffn": [{"form": "dense"}], "linear": [{"form": "dense"}]},
    "policy off": {"version": 1, "defaults": {"policy": "off"},
                   "attention": [{"form": "streaming", "sink": 1, "window": 2}]},
    "auto on cpu": {"version": 1, "attention": [{"form": "block_sparse", "block": 1}]},
}


@hn.examples(25)
@given(c=st.sampled_from(FORMS).flatmap(lambda f: attention_cases(f)), which=st.sampled_from(sorted(DENSE_SPECS)))
def test_dense_spec_equals_eager(c, which):
    args = cases.tensors(c)
    model = cases.model_of(c)
    out, report = hn.compile_and_run(model, args, DENSE_SPECS[which])
    assert not hn.sparse_ops()
    assert all(not s.applied for s in report.sites)
    with torch.no_grad():
        ref = model(*args)
    torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)
