"""Per-head rules, as docs/spec.md states them: each head takes the last rule that covers it, and the policy of
the last covering sparse rule (spec order) applies to the site. Expected outputs are float64 attention with an
explicit per-head keep mask built here."""

import math

import torch

import sparsecc
from sparsecc.backend import rewritten_graphs

H, S, D = 4, 12, 8
SINK, WINDOW = 1, 3


class Attn(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, S, D, generator=g) for _ in range(3)]


def _expected(q, k, v, streaming_heads):
    p = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    causal = j <= p
    keep = torch.stack([causal & ((j < SINK) | (p - j < WINDOW)) if h in streaming_heads else causal
                        for h in range(H)])
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v.double()


def _rule(heads, policy):
    return {"form": "streaming", "sink": SINK, "window": WINDOW, "heads": heads, "policy": policy}


def _run(rules):
    q, k, v = _inputs()
    with torch.no_grad():
        out = sparsecc.compile(Attn(), spec={"version": 1, "attention": rules}, kernels="reference")(q, k, v)
    (site,) = sparsecc.last_report().sites
    return out, site, (q, k, v)


def test_the_last_covering_sparse_rule_sets_the_policy_off(eager_lowering):
    out, site, (q, k, v) = _run([_rule([3], "force"), _rule([0], "off")])
    assert not site.applied and site.reason == "policy off in attention[0], attention[1]"
    assert not any("sparsecc" in str(n.target) for g in rewritten_graphs() for n in g.graph.nodes)
    torch.testing.assert_close(out.double(), _expected(q, k, v, streaming_heads=()), atol=1e-6, rtol=1e-6)


def test_the_last_covering_sparse_rule_sets_the_policy_force(eager_lowering):
    out, site, (q, k, v) = _run([_rule([0], "off"), _rule([3], "force")])
    assert site.applied and site.policy == "force"
    assert site.form_detail.endswith("on heads 0, 3; dense on heads 1-2"), site.form_detail
    torch.testing.assert_close(out.double(), _expected(q, k, v, streaming_heads=(0, 3)), atol=1e-6, rtol=1e-6)


def test_a_rule_naming_only_missing_heads_says_so(eager_lowering):
    out, site, (q, k, v) = _run([_rule([7, 9], "force")])
    assert not site.applied
    assert site.reason == "attention[0] names only heads [7, 9], which do not exist (the site has 4 heads)"
    torch.testing.assert_close(out.double(), _expected(q, k, v, streaming_heads=()), atol=1e-6, rtol=1e-6)


def test_the_report_groups_per_head_forms(eager_lowering):
    """Different windows on different heads: the report lists each form with its heads, in head order."""
    rules = [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"},
             {"form": "streaming", "sink": 1, "window": 4, "heads": [2, 3], "policy": "force"},
             {"form": "dense", "heads": [1]}]
    _, site, _ = _run(rules)
    assert site.applied
    (narrow, dense, wide) = site.form_detail.split("; ")
    assert narrow.endswith("on heads 0") and "window=2" in narrow, site.form_detail
    assert dense == "dense on heads 1", site.form_detail
    assert wide.endswith("on heads 2-3") and "window=4" in wide, site.form_detail
    assert site.forms == ["streaming", "dense"] and site.to_dict()["forms"] == site.forms


def test_streaming_heads_of_several_windows_are_one_streaming_op(eager_lowering):
    """Two sink/window settings and a dense head: one streaming op with a rule per head (not the mixed op's run
    group by group), equal to float64 attention with each head's keep mask from docs/spec.md."""
    rules = [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"},
             {"form": "streaming", "sink": 2, "window": 5, "heads": [2, 3], "policy": "force"},
             {"form": "dense", "heads": [1]}]
    out, site, (q, k, v) = _run(rules)
    assert site.applied and site.forms == ["streaming", "dense"], site.reason
    targets = [str(n.target) for g in rewritten_graphs() for n in g.graph.nodes if "sparsecc" in str(n.target)]
    assert any("streaming_attention" in t for t in targets) and not any("mixed" in t for t in targets), targets
    p, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    rule = {0: (1, 2), 2: (2, 5), 3: (2, 5)}   # head -> (sink, window); head 1 dense
    keep = torch.stack([(j <= p) & ((j < rule[h][0]) | (p - j < rule[h][1])) if h in rule else j <= p
                        for h in range(H)])
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    expected = torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
