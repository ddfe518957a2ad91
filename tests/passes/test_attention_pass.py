"""Attention matching and rewriting across spellings, with positive and negative cases."""

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs
from tests import zoo


def _attention_applied():
    """Every attention site of the last compile was rewritten (the numbers below are not dense by accident)."""
    return [s.applied for s in sparsecc.last_report().sites if s.kind == "attention"]


def _sparsecc_ops(kind_prefix="sparsecc"):
    names = []
    for gm in rewritten_graphs():
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith(kind_prefix):
                names.append(str(node.target))
    return names


def streaming_keep(s, sink, window, causal):
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    if causal:
        return (j <= i) & ((j < sink) | (i - j < window))
    return (j < sink) | (i < sink) | ((i - j).abs() < window)


@pytest.mark.parametrize("cls", zoo.ATTENTION_SPELLINGS, ids=lambda c: c.__name__)
def test_every_spelling_is_found(cls):
    torch.manual_seed(0)
    block = cls().eval()
    report = sparsecc.explain(block, torch.randn(2, 9, 32))
    sites = [s for s in report.sites if s.kind == "attention"]
    assert len(sites) == 1
    assert sites[0].module == ""
    assert sites[0].reason == "no rule"
    assert sites[0].attrs["causal"] == (cls is zoo.SdpaAttention)
    assert sites[0].attrs["folded_heads"] == cls.folded


@pytest.mark.parametrize("cls", zoo.ATTENTION_SPELLINGS, ids=lambda c: c.__name__)
def test_streaming_rewrite_matches_semantics(cls, eager_lowering):
    torch.manual_seed(1)
    block = cls().eval()
    x = torch.randn(2, 13, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 2, "window": 3}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
        expected = block.expected(x, streaming_keep(13, 2, 3, block.causal))
    assert any("streaming_attention" in n for n in _sparsecc_ops())
    report = sparsecc.last_report()
    assert [s.applied for s in report.sites if s.kind == "attention"] == [True]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reused_probabilities_are_a_refused_site():
    """Probabilities that are also returned cannot be fused away: the site is listed, dense, with that reason."""
    block = zoo.ReusedLogitsAttention().eval()
    report = sparsecc.explain(block, torch.randn(1, 8, 32))
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert not site.applied and site.reason.startswith(
        "not rewritable: the attention probabilities are also used outside P @ V"), site.reason


class _LogsumexpSinkAttention(zoo.AttentionBlock):
    """A learned per-head sink applied after P @ V as ``sigmoid(logsumexp(logits) - sink)`` (the spelling of
    transformers' GraniteSWA): the softmax's logits have a second reader."""

    causal = False

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(self.heads))

    def attend(self, q, k, v):
        k, v = zoo.repeat_kv(k, self.heads // self.kv_heads), zoo.repeat_kv(v, self.heads // self.kv_heads)
        logits = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        scale = torch.sigmoid(torch.logsumexp(logits, dim=-1) - self.sinks.view(1, -1, 1))
        return (torch.softmax(logits, dim=-1) @ v) * scale.unsqueeze(-1)


def test_logits_with_a_second_reader_are_a_refused_site(eager_lowering):
    """A sparse form would change the softmax and leave the logsumexp over every key: a silent wrong answer. The
    site is listed, dense, with that reason, and the compiled block equals the eager one."""
    torch.manual_seed(3)
    block = _LogsumexpSinkAttention().eval()
    x = torch.randn(1, 12, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": 1, "window": 2}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
        expected = block(x)
    (site,) = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert not site.applied and site.reason.startswith(
        "not rewritable: the logits the softmax reads are also used outside it"), site.reason
    assert not _sparsecc_ops()
    torch.testing.assert_close(out, expected)


def test_a_softmax_that_feeds_no_p_at_v_is_not_a_site():
    """A softmax whose probabilities never meet a value matmul (a router, a classifier) is not attention."""

    class Router(torch.nn.Module):
        def forward(self, x):
            p = torch.softmax(x @ x.transpose(-2, -1), dim=-1)
            return p.sum(-1), p.argmax(-1)

    report = sparsecc.explain(Router().eval(), torch.randn(1, 8, 32))
    assert not [s for s in report.sites if s.kind == "attention"]


def test_float64_attention_is_reported_as_not_rewritable():
    block = zoo.SdpaAttention().double().eval()
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"}]}
    report = sparsecc.explain(block, torch.randn(1, 8, 32, dtype=torch.float64), spec=spec)
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert not site.applied and "not rewritable: unsupported or mixed dtypes" in site.reason


def test_dense_spec_leaves_graph_alone(eager_lowering):
    block = zoo.MatmulMaskedFillAttention().eval()
    x = torch.randn(1, 8, 32)
    spec = {"version": 1, "attention": [{"form": "dense"}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec)(x)
        ref = block(x)
    assert not _sparsecc_ops()
    site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
    assert not site.applied and "dense" in site.reason
    torch.testing.assert_close(out, ref)


def test_per_head_rules_and_gqa_mapping(eager_lowering):
    torch.manual_seed(2)
    block = zoo.SdpaAttention(hidden=32, heads=4, kv_heads=2).eval()
    x = torch.randn(1, 11, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"heads": [1, 2], "form": "streaming", "sink": 1, "window": 2}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
    assert _attention_applied() == [True]
    keep = torch.ones(4, 11, 11, dtype=torch.bool)
    keep[1] = keep[2] = streaming_keep(11, 1, 2, True)
    torch.testing.assert_close(out, block.expected(x, keep), atol=1e-5, rtol=1e-5)


def test_block_sparse_rewrite_matches_semantics(eager_lowering):
    torch.manual_seed(3)
    block = zoo.EinsumAdditiveAttention().eval()
    x = torch.randn(1, 40, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "block_sparse", "block": 8, "local_blocks": 1, "global_blocks": 1}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
    qb = torch.arange(40)[:, None] // 8
    kb = torch.arange(40)[None, :] // 8
    keep = ((qb - kb).abs() < 1) | (qb < 1) | (kb < 1)
    assert _attention_applied() == [True]
    torch.testing.assert_close(out, block.expected(x, keep), atol=1e-5, rtol=1e-5)


def test_block_larger_than_sequence_falls_back():
    block = zoo.SdpaAttention().eval()
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [{"form": "block_sparse", "block": 64}]}
    report = sparsecc.explain(block, torch.randn(1, 10, 32), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert not site.applied and "larger than the key sequence" in site.reason


def test_auto_policy_keeps_cpu_dense():
    block = zoo.SdpaAttention().eval()
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 64}]}
    report = sparsecc.explain(block, torch.randn(1, 600, 32), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert not site.applied and "CPU" in site.reason
    assert site.dense_flops > site.sparse_flops > 0


def test_block_sparse_dense_heads(eager_lowering):
    torch.manual_seed(4)
    block = zoo.SdpaAttention().eval()
    x = torch.randn(1, 24, 32)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"heads": [0, 3], "form": "block_sparse", "block": 8, "local_blocks": 1}]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
    qb = torch.arange(24)[:, None] // 8
    kb = torch.arange(24)[None, :] // 8
    keep = torch.ones(4, 24, 24, dtype=torch.bool)
    keep[0] = keep[3] = (qb - kb).abs() < 1
    assert _attention_applied() == [True]
    torch.testing.assert_close(out, block.expected(x, keep), atol=1e-5, rtol=1e-5)
