"""A softmax scale Dynamo traces as a graph value: two models whose scale attribute differs, compiled in one process.

Dynamo passes a float attribute that changed since an earlier compile of the same code as a graph value
(``specialize_float`` off, torch's default). Expected values are float64 attention with the causal streaming keep
mask of docs/spec.md (``j <= p`` and (``j < sink`` or ``p - j < window``)), built here.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc

SINK, WINDOW, S, D = 2, 4, 16, 16
SPEC = {"version": 1, "defaults": {"policy": "force"},
        "attention": [{"form": "streaming", "sink": SINK, "window": WINDOW}]}


def _qkv():
    torch.manual_seed(0)
    return tuple(torch.randn(1, 2, S, D) for _ in range(3))


def _streaming_oracle(q, k, v, scale):
    p = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    keep = (j <= p) & ((j < SINK) | (p - j < WINDOW))
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    return logits.masked_fill(~keep, float("-inf")).softmax(-1) @ v.double()


def _attention_sites(report):
    return [s for s in report.sites if s.kind == "attention"]


class ScaledAttention(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


class ExplainedAttention(ScaledAttention):
    def forward(self, q, k, v):   # its own code object: no other test's compile shares its Dynamo state
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


class EagerAttention(ScaledAttention):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


def test_a_changed_scale_is_rewritten_with_its_own_value():
    q, k, v = _qkv()
    for scale in (0.25, 0.3):
        with torch.no_grad():
            out = sparsecc.compile(ScaledAttention(scale).eval(), spec=SPEC, kernels="reference")(q, k, v)
        (site,) = _attention_sites(sparsecc.last_report())
        assert site.applied, site.reason
        torch.testing.assert_close(out.double(), _streaming_oracle(q, k, v, scale), atol=1e-5, rtol=1e-5)


def test_explain_reports_the_site_whose_scale_changed():
    q, k, v = _qkv()
    for scale in (0.25, 0.3):
        report = sparsecc.explain(ExplainedAttention(scale).eval(), q, k, v, spec=SPEC, kernels="reference")
        (site,) = _attention_sites(report)
        assert site.applied, site.reason
        assert not report.warnings


def test_a_run_time_scale_without_inductor_stays_dense_with_its_reason(eager_lowering):
    q, k, v = _qkv()
    for scale in (0.25, 0.3):
        model = EagerAttention(scale).eval()
        with torch.no_grad():
            out = sparsecc.compile(model, spec=SPEC, kernels="reference")(q, k, v)
            dense = model(q, k, v)
        (site,) = _attention_sites(sparsecc.last_report())
        if scale == 0.25:   # the first compile sees a constant
            assert site.applied, site.reason
            continue
        assert not site.applied and "softmax scale is a run-time value" in site.reason
        torch.testing.assert_close(out, dense)
