"""Sites whose heads run different forms, against the independent oracle (docs/spec.md, "Heads with different
forms": each head computes what a site of its form alone computes).

The cases are drawn like the single-form cases of test_differential.py, then given per-head rules: a base
rule on every head, overridden on some heads by a second budget or layout of the same family, a streaming
rule or a dense rule. Every case asserts that the site applied as one ``mixed_head_attention`` op with the
per-head forms in the report before comparing numbers.
"""

from __future__ import annotations

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import attention_cases

NOT_FOLDED = tuple(s for s in cases.ALL_SPELLINGS if s != "bmm_folded")


def _subset(draw, heads: int):
    return draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads - 1, unique=True))


@st.composite
def mixed_cases(draw, family: str, **pins):
    """A case whose site mixes ``family`` ("vertical_slash" or "block_sparse") heads with other heads."""
    c = draw(attention_cases(family, spellings=NOT_FOLDED, per_head=False, **pins))
    assume(c.heads > 1)
    base = next(dict(r) for r in c.rules if r["form"] == family)
    base.pop("heads", None)
    rules = [base]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["same_family", "streaming", "dense"]))
        if kind == "streaming":
            rule = {"form": "streaming", "sink": draw(st.integers(0, 6)), "window": draw(st.integers(1, 12))}
        elif kind == "dense":
            rule = {"form": "dense"}
        elif family == "vertical_slash":
            other = draw(cases.vertical_slash_rule(base["block"], c.sq, c.sk, c.causal))
            rule = dict(other, last_q=base["last_q"])
        else:
            rule = dict(base, local_blocks=draw(st.integers(1, 3)), global_blocks=draw(st.integers(0, 2)))
        rule["heads"] = _subset(draw, c.heads)
        rules.append(rule)
    c.rules = rules
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    forms = [None if f is None else tuple(sorted((k, v) for k, v in f.items() if k != "heads")) for f in site.forms]
    assume(any(f is not None and f["form"] == family for f in site.forms))
    # A mix: vertical_slash heads beside any other head; block_sparse heads beside another sparse form (with
    # only dense heads beside them, the block_sparse op covers the site).
    sparse_forms = {f for f in forms if f is not None}
    assume(len(set(forms)) > 1 if family == "vertical_slash" else len(sparse_forms) > 1)
    return c


def run_mixed(c):
    """Compile the case; assert one mixed op applied with per-head forms; compare with the oracle."""
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    (site,) = [s for s in hn.sites(report, "attention") if s.module == hn.SITE]
    assert site.applied, site.reason
    assert len(site.form_detail.split("; ")) > 1 and "on heads" in site.form_detail, site.form_detail
    # docs/spec.md: each head's form is its last covering rule's; the report lists each form once, in head order
    per_head = oracle.attention_site_rule(c.spec, hn.SITE, c.heads).forms
    assert site.forms == list(dict.fromkeys("dense" if f is None else f["form"] for f in per_head)), site.forms
    assert any("mixed_head_attention" in op for op in hn.sparse_ops()), hn.sparse_ops()
    exp, valid, _ = cases.expected(c, q, k, v, mask)
    hn.assert_rows_close(out, exp, valid, c.torch_dtype, what=f"{c}")


@hn.examples(20)
@given(c=mixed_cases("vertical_slash", decode=False, causal=True, causal_via="is_causal"))
def test_vertical_slash_budgets_streaming_and_dense_heads(c):
    run_mixed(c)


@hn.examples(15)
@given(c=mixed_cases("vertical_slash", causal=True, causal_via="mask"))
def test_mixed_vertical_slash_with_a_causal_mask_tensor(c):
    """Prefill and chunked prefill (Sq < Sk), causality from a mask tensor, padded batch-mates."""
    run_mixed(c)


@hn.examples(20)
@given(c=mixed_cases("block_sparse", decode=False))
def test_block_sparse_layouts_streaming_and_dense_heads(c):
    run_mixed(c)


@hn.examples(15)
@given(c=mixed_cases("block_sparse", decode=True))
def test_mixed_block_sparse_decode_and_mask_positions(c):
    """Sq < Sk, causal or with a mask that places the queries (static-cache decode)."""
    run_mixed(c)


@hn.examples(10)
@given(c=mixed_cases("vertical_slash", decode=False, causal=True, causal_via="is_causal"))
def test_each_head_equals_a_site_of_its_form_alone(c):
    """Metamorphic: head h of the mixed site equals head h of the same site with every head on h's form."""
    q, k, v, mask = cases.tensors(c)
    mixed, _ = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    for h, form in enumerate(site.forms):
        alone = dict(form, heads=list(range(c.heads))) if form is not None else {"form": "dense"}
        spec = dict(c.spec, attention=[alone])
        out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), spec)
        if form is not None:
            (s,) = hn.sites(report, "attention")
            assert s.applied, s.reason
        torch.testing.assert_close(mixed[:, h], out[:, h], rtol=0, atol=0)


def test_block_topk_does_not_mix():
    c = cases.case(heads=2, kv_heads=1, sq=32, sk=32, causal=True, causal_via="is_causal",
                   rules=[{"form": "block_topk", "block": 16, "topk": 1},
                          {"form": "streaming", "sink": 1, "window": 4, "heads": [1]}])
    q, k, v, mask = cases.tensors(c)
    _, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="block_topk needs one rule for every head")


def test_vertical_slash_heads_with_two_blocks_stay_dense_with_the_reason():
    c = cases.case(heads=2, kv_heads=1, sq=64, sk=64, causal=True, causal_via="is_causal",
                   rules=[{"form": "vertical_slash", "block": 16, "last_q": 4, "vertical": 1, "slash": 1},
                          {"form": "vertical_slash", "block": 32, "last_q": 4, "vertical": 1, "slash": 1,
                           "heads": [1]}])
    q, k, v, mask = cases.tensors(c)
    _, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="one block size")


def test_a_mixed_site_finds_left_padding_over_every_head():
    """docs/spec.md, "Left padding": the padding is the keys the mask hides from every row of every head. A mask
    with a head dimension that hides the first keys from the streaming heads only leaves the element unpadded, so
    the mixed site's heads compute what the oracle says (each head group once found a padding of its own, 1.6 off);
    and the same mask with those keys hidden from every head is padding, cut for all groups alike."""
    rules = [{"form": "streaming", "sink": 2, "window": 5, "heads": [0, 2]},
             {"form": "block_sparse", "block": 16, "local_blocks": 1, "global_blocks": 0, "heads": [1, 3]}]
    c = cases.case(heads=4, kv_heads=2, sq=48, sk=48, dim=8, causal=True, causal_via="mask", mask_kind="bool",
                   rules=rules, seed=3)
    q, k, v, _ = cases.tensors(c)
    site_forms = oracle.attention_site_rule(c.spec, hn.SITE, c.heads).forms
    for hidden_from in ([0, 2], [0, 1, 2, 3]):
        mask = torch.ones(1, 4, 48, 48, dtype=torch.bool).tril()
        mask[:, hidden_from, :, :6] = False
        out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
        (site,) = [s for s in hn.sites(report, "attention") if s.module == hn.SITE]
        assert site.applied and "on heads" in site.form_detail, site.reason
        assert any("mixed_head_attention" in op for op in hn.sparse_ops()), hn.sparse_ops()
        expected, valid = oracle.expected_attention(q, k, v, site_forms, causal=True, mask=mask,
                                                    is_causal_flag=False)
        hn.assert_rows_close(out, expected, valid, torch.float32, what=f"keys hidden from heads {hidden_from}")
