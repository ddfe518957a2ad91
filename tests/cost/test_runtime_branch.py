"""Dynamic shapes: one compile, the op branches on the crossover at run time, no recompile."""

import torch
import torch._dynamo.utils

import sparsecc
from sparsecc.cost import H100_SXM, efficiency
from tests import zoo


def test_one_compile_both_sides_of_the_crossover(monkeypatch, eager_lowering):
    import sparsecc.backend
    import sparsecc.passes.decide as decide
    # Decide as on an H100 with a fast kernel, while running the reference on this CPU.
    monkeypatch.setattr(decide, "KEEP_CPU_DENSE", False)
    monkeypatch.setattr(sparsecc.backend, "profile_for", lambda device: H100_SXM)
    monkeypatch.setattr(sparsecc.pipeline.CompileContext, "has_kernel", lambda self, op, device: True)
    # A fixed efficiency table, so the crossover falls at a length this CPU runs quickly whatever the
    # shipped (fitted) table says; this test is about the branch, not the numbers.
    fixed = {"provenance": {}, "families": {
        fam: {"compute_small": 0.3, "compute_large": 0.8 if fam == "attention_dense" else 0.7, "memory": 0.8,
              "floor_s": 0.0} for fam in efficiency.table()["families"]}}
    monkeypatch.setattr(efficiency, "table", lambda: fixed)
    torch.manual_seed(0)
    block = zoo.SdpaAttention(hidden=256, heads=4, kv_heads=2).eval()
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 0, "window": 128}]}
    compiled = sparsecc.compile(block, spec=spec, kernels="auto", dynamic=True)
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled(torch.randn(1, 300, 256))
        site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
        assert site.applied and "runtime branch" in site.reason, site.reason
        threshold = int(site.crossover.split("seq_k >= ")[1])
        assert site.crossover in site.reason
        assert 300 < threshold < 4096
        short, long_ = torch.randn(1, threshold - 1, 256), torch.randn(1, threshold + 200, 256)
        out_short, out_long = compiled(short), compiled(long_)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"recompiled: {frames} graphs"
    # below the crossover: exactly the dense model; above it: the streaming semantics
    with torch.no_grad():
        torch.testing.assert_close(out_short, block(short), atol=1e-5, rtol=1e-5)
        s = long_.shape[1]
        i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
        keep = (i - j).abs() < 128
        torch.testing.assert_close(out_long, block.expected(long_, keep), atol=1e-5, rtol=1e-5)
        assert (out_long - block(long_)).abs().max() > 1e-3
