"""Spellings beyond the zoo: einsum attention over [B, S, H, D], GQA by a new axis, einsum linears, refusals.

Expected values are float64 attention with an explicit keep mask built here from
docs/spec.md (streaming, causal: j <= p and (j < sink or p - j < window)).
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.backend import rewritten_graphs

SINK, WINDOW = 2, 5


class EinsumProjection(nn.Module):
    """A linear map written as einsum over a bare parameter stored [out, in]."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / math.sqrt(fan_in))

    def forward(self, x):
        return torch.einsum("bsd,od->bso", x, self.weight)


class EinsumBSHD(nn.Module):
    """Attention on [B, S, H, D] tensors written with einsum; GQA by expand on a new axis plus reshape."""

    def __init__(self, hidden=32, heads=4, kv_heads=2, causal=True, unsqueeze=False):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, hidden // heads
        self.causal, self.unsqueeze = causal, unsqueeze
        self.q = nn.Linear(hidden, heads * self.d, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.out = EinsumProjection(heads * self.d, hidden)

    def repeat(self, t):
        b, s = t.shape[:2]
        rep = self.h // self.hkv
        t = t.unsqueeze(3) if self.unsqueeze else t[:, :, :, None, :]
        return t.expand(b, s, self.hkv, rep, self.d).reshape(b, s, self.h, self.d)

    def operands(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d)
        k = self.k(x).view(b, s, self.hkv, self.d)
        v = self.v(x).view(b, s, self.hkv, self.d)
        return q, k, v

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.operands(x)
        k, v = self.repeat(k), self.repeat(v)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d)
        if self.causal:
            logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
        return self.out(out.reshape(b, s, -1))


def _streaming_keep(s):
    p = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    return (j <= p) & ((j < SINK) | (p - j < WINDOW))


def _expected(model, x, keep):
    """float64 attention restricted to ``keep`` [S, S], from the module's own projections."""
    b, s, _ = x.shape
    q, k, v = (t.double() for t in model.operands(x.double().float()))
    rep = model.h // model.hkv
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(model.d)
    logits = logits.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, s, -1)
    return out @ model.out.weight.double().t()


def _spec(**attention):
    return {"version": 1, "attention": [{"form": "streaming", "sink": SINK, "window": WINDOW, "policy": "force",
                                         **attention}]}


@pytest.mark.parametrize("unsqueeze", [False, True])
def test_einsum_bshd_attention_with_new_axis_gqa_is_rewritten(unsqueeze, eager_lowering):
    torch.manual_seed(0)
    model = EinsumBSHD(unsqueeze=unsqueeze).eval()
    x = torch.randn(2, 12, 32)
    with torch.no_grad():
        out = sparsecc.compile(model, spec=_spec(), kernels="reference")(x)
    report = sparsecc.last_report()
    (site,) = [s for s in report.sites if s.kind == "attention"]
    assert site.applied and site.attrs["layout"] == "bshd" and site.attrs["kv_heads"] == 2
    assert site.shapes["q"] == [2, 4, 12, 8] and site.shapes["k"] == [2, 2, 12, 8]
    assert any("sparsecc" in str(n.target) for g in rewritten_graphs() for n in g.graph.nodes)
    torch.testing.assert_close(out.double(), _expected(model, x, _streaming_keep(12)), atol=1e-5, rtol=1e-5)


def test_einsum_linear_is_a_linear_site(eager_lowering):
    torch.manual_seed(1)
    model = EinsumBSHD().eval()
    x = torch.randn(1, 8, 32)
    spec = {"version": 1, "linear": [{"modules": "out", "form": "2:4", "policy": "force"}]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="reference")(x)
    sites = {(s.kind, s.module): s for s in sparsecc.last_report().sites}
    out_linear = sites[("linear", "out")]
    assert out_linear.applied and out_linear.attrs["weight"] == "out.weight"
    # Expected: the output projection with 2:4 pruning by magnitude (2 largest |w| of every 4 along the input).
    w = model.out.weight.detach().double()
    groups = w.view(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    pruned = (groups * keep).view_as(w)
    with torch.no_grad():
        b, s, _ = x.shape
        q, k, v = model.operands(x)
        k, v = model.repeat(k), model.repeat(v)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(model.d)
        logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(b, s, -1)
    torch.testing.assert_close(out.double(), attn.double() @ pruned.t(), atol=1e-5, rtol=1e-5)


class IndexedProbabilities(nn.Module):
    """Causal attention whose probabilities are indexed before P @ V (``probs[index]``)."""

    def __init__(self, *index):
        super().__init__()
        self.index = index

    def forward(self, q, k, v):
        s = q.shape[-2]
        logits = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        probs = logits.softmax(-1)
        for index in self.index:
            probs = probs[index]
        return probs @ v


FULL_SLICES = {"from_zero": [(Ellipsis, slice(0, None))], "every_axis": [(slice(None),) * 4],
               "to_size": [(Ellipsis, slice(0, 8))], "past_size": [(Ellipsis, slice(None, 100))],
               "twice": [(Ellipsis, slice(None)), (slice(None), Ellipsis, slice(0, None, 1))]}


@pytest.mark.parametrize("name", sorted(FULL_SLICES))
def test_slices_that_keep_every_probability_are_attention(name, eager_lowering):
    """An index that selects everything is the tensor itself: the site is rewritten, not refused or missed."""
    torch.manual_seed(2)
    model = IndexedProbabilities(*FULL_SLICES[name])
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    with torch.no_grad():
        out = sparsecc.compile(model, spec=_spec(), kernels="reference")(q, k, v)
    (site,) = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert site.applied and site.form == "streaming" and site.forms == ["streaming"], site.reason
    logits = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    expected = logits.masked_fill(~_streaming_keep(8), float("-inf")).softmax(-1) @ v.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)



class SoftCapped(nn.Module):
    """Gemma-2-style logit soft-cap: tanh(logits / cap) * cap; no sparse form can keep its meaning."""

    def forward(self, q, k, v):
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        logits = torch.tanh(logits / 30.0) * 30.0
        return logits.softmax(-1) @ v


class LearnedTemperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(4, 1, 1))

    def forward(self, q, k, v):
        return ((q @ k.transpose(-1, -2)) * self.temperature).softmax(-1) @ v


class SinkLogits(nn.Module):
    """A learned logit per head beside the keys, normalised with them and dropped before P @ V (GPT-OSS's
    attention sinks): the probabilities of the keys sum to less than one."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(4))

    def key_probabilities(self, q, k):
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        return torch.cat([logits, sinks], dim=-1).softmax(-1)[..., :-1]

    def forward(self, q, k, v):
        return self.key_probabilities(q, k) @ v


class SinkSliceThenFullSlice(SinkLogits):
    """The sink slice, then an index that keeps everything: still the sinks' slice, and only it."""

    def forward(self, q, k, v):
        return self.key_probabilities(q, k)[..., :] @ v


class SinkLogitsReturned(SinkLogits):
    """GPT-OSS's eager attention under output_attentions=True: the sliced probabilities are also returned."""

    def forward(self, q, k, v):
        probs = self.key_probabilities(q, k)
        return probs @ v, probs


class SoftQuantiser(nn.Module):
    """Not attention: soft code assignments that weight a codebook and are also returned (a soft VQ)."""

    def __init__(self):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(4, 8, 16))

    def forward(self, q, k, v):
        weights = (-torch.cdist(q, self.codebook.unsqueeze(0).expand(q.shape[0], -1, -1, -1))).softmax(-1)
        return weights @ self.codebook, weights


class SlicedAndFullUses(nn.Module):
    """Probabilities meeting two value matmuls, one through a key slice: no sinks, whichever use is written first."""

    def __init__(self, sliced_first):
        super().__init__()
        self.sliced_first = sliced_first

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        uses = [lambda: probs.float()[..., :4] @ v[:, :, :4], lambda: probs.double().float() @ v]
        first, second = (use() for use in (uses if self.sliced_first else uses[::-1]))
        return first, second


class TrainingDropout(nn.Module):
    """Dropout on the probabilities in training mode; p = 1 keeps the comparison with eager deterministic."""

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return F.dropout(probs, p=1.0, training=True) @ v


USED_ELSEWHERE = "the attention probabilities are also used outside P @ V"
LOGITS = "the logits are not q @ kᵀ"
SINKS = "the softmax runs over more logits than the keys"
DROPOUT = "training-mode dropout (p=1.0) between the softmax and P @ V"
REFUSALS = {"softcap": (SoftCapped, [LOGITS + " with only scale / mask / cast steps: they pass through tanh"]),
            "temperature": (LearnedTemperature, [LOGITS + " with only scale / mask / cast steps: they pass through mul"]),
            "sinks": (SinkLogits, ["the softmax runs over more logits than the keys"]),
            "sinks_then_full_slice": (SinkSliceThenFullSlice, ["the softmax runs over more logits than the keys"]),
            "sinks_returned": (SinkLogitsReturned, ["the softmax runs over more logits than the keys",
                                                    USED_ELSEWHERE]),
            "soft_quantiser": (SoftQuantiser, [LOGITS + " with only scale / mask / cast steps: they pass through neg",
                                               USED_ELSEWHERE]),
            "sliced_use_first": (lambda: SlicedAndFullUses(True), [USED_ELSEWHERE]),
            "full_use_first": (lambda: SlicedAndFullUses(False), [USED_ELSEWHERE]),
            "training_dropout": (TrainingDropout, [DROPOUT])}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refused_attention_is_in_the_report_with_its_reason(name, eager_lowering):
    factory, reasons = REFUSALS[name]
    model = factory()
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    with torch.no_grad():
        expected = model(q, k, v)
        out = sparsecc.compile(model, spec=_spec(), kernels="reference")(q, k, v)
    (site,) = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert not site.applied and site.reason.startswith("not rewritable: " + reasons[0]), site.reason
    # the covering rule is named, so a refused rule can be found in the report
    assert (site.rule, site.form, site.forms) == ("attention[0]", "streaming", ["streaming"])
    positions = [site.reason.find(reason) for reason in reasons]
    assert -1 not in positions and positions == sorted(positions), site.reason
    unexpected = [other for other in (LOGITS, SINKS, DROPOUT, USED_ELSEWHERE)
                  if not any(reason.startswith(other) for reason in reasons) and other in site.reason]
    assert not unexpected, site.reason
    torch.testing.assert_close(out, expected)
