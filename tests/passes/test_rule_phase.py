"""An attention rule's ``phase`` (docs/spec.md, Rules): prefill, decode or both."""

import math

import pytest
import torch

import sparsecc
from sparsecc import SpecError, load_spec

H, D = 2, 8


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


STREAM_PREFILL = {"form": "streaming", "sink": 1, "window": 2, "policy": "force", "phase": "prefill"}
STREAM_DECODE = {"form": "streaming", "sink": 2, "window": 3, "policy": "force", "phase": "decode"}


def _run(sq, sk, rules, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, n, D, generator=g) for n in (sq, sk, sk))
    torch._dynamo.reset()
    with torch.no_grad():
        out = sparsecc.compile(Sdpa(), spec={"version": 1, "attention": rules}, kernels="reference")(q, k, v)
    (site,) = sparsecc.last_report().sites
    return (q, k, v), out, site


def _streaming(q, k, v, sink, window):
    """Bidirectional streaming at p = i + Sk - Sq (docs/spec.md), float64."""
    sq, sk = q.shape[2], k.shape[2]
    p = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    keep = (j < sink) | (p < sink) | ((p - j).abs() < window)
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v.double()


def test_a_prefill_rule_leaves_decode_sites_dense(eager_lowering):
    (q, k, v), out, site = _run(1, 12, [STREAM_PREFILL])
    assert not site.applied and "prefill only" in site.reason and "decode" in site.reason, site.reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_a_prefill_rule_applies_at_prefill(eager_lowering):
    (q, k, v), out, site = _run(6, 12, [STREAM_PREFILL])
    assert site.applied and "prefill only" in site.reason, site.reason
    torch.testing.assert_close(out.double(), _streaming(q, k, v, 1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq", [1, 6])
def test_a_decode_rule_and_a_prefill_rule_share_modules(sq, eager_lowering):
    """Each phase takes its own rule, whatever the order."""
    for rules in ([STREAM_PREFILL, STREAM_DECODE], [STREAM_DECODE, STREAM_PREFILL]):
        (q, k, v), out, site = _run(sq, 12, rules)
        assert site.applied, site.reason
        sink, window = (2, 3) if sq == 1 else (1, 2)
        torch.testing.assert_close(out.double(), _streaming(q, k, v, sink, window), atol=1e-5, rtol=1e-5)


def test_phase_loads_saves_and_is_checked(tmp_path):
    spec = load_spec({"version": 1, "attention": [STREAM_PREFILL, {"form": "dense", "phase": "decode"}]})
    assert [r.phase for r in spec.attention] == ["prefill", "decode"]
    path = tmp_path / "s.toml"
    spec.save(path)
    assert load_spec(str(path)) == spec
    assert "phase" not in load_spec({"version": 1, "attention": [{"form": "dense"}]}).to_dict()["attention"][0]
    with pytest.raises(SpecError, match=r"attention\[0\]\.phase.*prefill"):
        load_spec({"version": 1, "attention": [{**STREAM_PREFILL, "phase": "prompt"}]})
    with pytest.raises(SpecError, match="phase"):
        load_spec({"version": 1, "ffn": [{"form": "dense", "phase": "decode"}]})
