"""Under ``cudagraphs=True`` (``CompileContext.replayed``) attention and FFN estimates drop the per-call host
floors of both sides, as linear estimates did: a decode step's GEMVs and attention are short calls whose eager host
time, not their reads, decided them dense. Checked through ``check`` (the context made replayed, since CUDA graphs
need a GPU) against the cost model asked directly, and against what the H200 measured for one-token FFNs."""

from __future__ import annotations

import pytest
import torch

from sparsecc.cost.hardware import H200, profile_for
from sparsecc.cost.sites import estimate_ffn

LLAMA_FFN = [(4096, 14336), (4096, 14336), (14336, 4096)]


@pytest.mark.parametrize("mode, sparsity, measured", [("input", 0.5, 1.47), ("input", 0.7, 2.10),
                                                      ("input", 0.9, 3.70), ("gate", 0.5, 1.34), ("gate", 0.9, 1.93)])
def test_one_token_ffn_replayed_pays_as_measured(mode, sparsity, measured):
    """The compiled one-token Llama-3-8B FFN replayed from CUDA graphs on the H200 (bench/RESULTS.md, "Decode FFN in
    TEAL input mode as one op", f878b1e): input 1.47 / 2.10 / 3.70x, gate 1.34 / 1.93x of dense Inductor. Replayed,
    the estimate applies the form (above the default margin) within 25% of those; eager, its GEMVs' host floors keep
    it dense (plain calls are host-bound: 1.09-1.47x measured, predicted below 1)."""
    replayed = estimate_ffn(LLAMA_FFN, tokens=1, dtype=torch.float16, hw=H200, activation_sparsity=sparsity,
                            mode=mode, replayed=True)
    eager = estimate_ffn(LLAMA_FFN, tokens=1, dtype=torch.float16, hw=H200, activation_sparsity=sparsity, mode=mode)
    assert replayed.speedup > 1.05 and abs(replayed.speedup - measured) / measured < 0.25, replayed.speedup
    assert eager.speedup < 1.05


@pytest.fixture
def replayed_context(monkeypatch):
    """Every compile context of explain made replayed, as ``cudagraphs=True`` on a GPU makes it."""
    from sparsecc import backend

    make = backend.make_context

    def replayed(*args, **kwargs):
        ctx = make(*args, **kwargs)
        ctx.replayed = True
        return ctx

    monkeypatch.setattr(backend, "make_context", replayed)


@pytest.mark.parametrize("replayed", [False, True])
def test_check_passes_the_replay_to_ffn_and_attention_estimates(replayed, request, monkeypatch):
    import sparsecc
    from sparsecc.cost.sites import estimate_attention
    from sparsecc.forms import Streaming
    from tests import zoo

    if replayed:
        request.getfixturevalue("replayed_context")
    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=256, heads=2, kv_heads=1, inner=512, bias=False)
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 16, "window": 64}],
            "ffn": [{"form": "activation_threshold", "threshold": 0.5}]}
    torch._dynamo.reset()
    report = sparsecc.explain(block.eval(), torch.randn(1, 4, 256), spec=spec)
    by_kind = {s.kind: s for s in report.sites}
    hw = profile_for(torch.device("cpu"))
    ffn = estimate_ffn([(256, 512), (256, 512), (512, 256)], tokens=4, dtype=torch.float32, hw=hw,
                       activation_sparsity=0.5, mode="input", replayed=replayed)
    attention = estimate_attention(Streaming(16, 64), None, batch=1, heads=2, kv_heads=1, seq_q=4, seq_k=4,
                                   head_dim=128, dtype=torch.float32, causal=True, hw=hw, margin=1.05,
                                   symbolic_seq=False, replayed=replayed)
    assert by_kind["ffn"].estimate.sparse_time_s == pytest.approx(ffn.sparse_time_s, rel=1e-9)
    assert by_kind["attention"].estimate.sparse_time_s == pytest.approx(attention.sparse_time_s, rel=1e-9)
    # the floors make the difference at these sizes, so the two settings are told apart
    eager_ffn = estimate_ffn([(256, 512), (256, 512), (512, 256)], tokens=4, dtype=torch.float32, hw=hw,
                             activation_sparsity=0.5, mode="input")
    assert (ffn.sparse_time_s < eager_ffn.sparse_time_s) == replayed


@pytest.mark.parametrize("growing", [False, True])
def test_an_attention_site_over_a_growing_cache_is_not_estimated_as_replayed(growing, replayed_context, monkeypatch):
    """CUDA graphs are recorded per shape: a key length that changes every call is never replayed, so a decode
    site over a symbolic cache keeps its host floors under cudagraphs=True; a static one drops them."""
    import sparsecc
    from sparsecc.cost.sites import estimate_attention
    from sparsecc.forms import Streaming
    from sparsecc.passes import attention_check

    class OneRow(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    from sparsecc import backend

    monkeypatch.setattr(attention_check, "streaming_runs_decode_kernel", lambda *facts, **kw: facts[3] <= 16)
    # The H200's figures, where a short decode call's host floor is far above its device time
    monkeypatch.setattr(backend, "profile_for", lambda device: H200)
    q = torch.randn(2, 4, 1, 128, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 1024, 128, dtype=torch.float16) for _ in range(2))
    if growing:
        torch._dynamo.mark_dynamic(k, 2)
        torch._dynamo.mark_dynamic(v, 2)
    torch._dynamo.reset()
    report = sparsecc.explain(OneRow(), q, k, v, spec={"version": 1, "attention": [
        {"form": "streaming", "sink": 16, "window": 64}]})
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert isinstance(site.attrs["seq_k"], int) != growing, site.attrs
    args = dict(batch=2, heads=4, kv_heads=2, seq_q=1, seq_k=1024, head_dim=128, dtype=torch.float16,
                causal=site.attrs["causal"], hw=H200, margin=1.05, symbolic_seq=growing, program="decode")
    expected = estimate_attention(Streaming(16, 64), None, replayed=not growing, **args)
    other = estimate_attention(Streaming(16, 64), None, replayed=growing, **args)
    assert site.estimate.sparse_time_s == pytest.approx(expected.sparse_time_s, rel=1e-9)
    assert site.estimate.sparse_time_s != pytest.approx(other.sparse_time_s, rel=1e-3)
