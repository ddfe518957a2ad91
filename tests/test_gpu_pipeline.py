"""The whole pipeline on CUDA: Triton kernels inside compiled models agree with the reference path."""

import pytest
import torch

import sparsecc
from tests import zoo
from tests.oracle.harness import lowering

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=512, heads=8, kv_heads=2, inner=1024, bias=False)
    return block.eval().cuda().to(torch.bfloat16)


@pytest.mark.parametrize("attn", [
    {"form": "streaming", "sink": 16, "window": 128},
    {"form": "block_sparse", "block": 64, "local_blocks": 2, "global_blocks": 1},
])
def test_triton_attention_in_compiled_model_matches_reference(attn):
    model = _model()
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [attn]}
    with torch.no_grad():
        with lowering("eager"):   # the expected values: the reference path needs no Inductor compile
            ref = sparsecc.compile(model, spec=spec, kernels="reference")(x).float()
        torch._dynamo.reset()
        out = sparsecc.compile(model, spec=spec, kernels="triton")(x).float()
    site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
    assert site.applied and "triton" in site.reason, site.reason
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-2, rel


def test_auto_policy_on_cuda_is_decided_by_the_cost_model():
    model = _model()
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 16, "window": 64}]}
    short = sparsecc.explain(model, torch.randn(1, 128, 512, device="cuda", dtype=torch.bfloat16), spec=spec)
    # 16K keys: the window keeps ~1% of the causal blocks, enough to beat the sparse kernel's fixed costs
    # on this small model (8 heads of 64); at 4K the cost model predicts about 0.2x and keeps it dense.
    long = sparsecc.explain(model, torch.randn(1, 16384, 512, device="cuda", dtype=torch.bfloat16), spec=spec)
    short_site = [s for s in short.sites if s.kind == "attention"][0]
    long_site = [s for s in long.sites if s.kind == "attention"][0]
    assert long_site.applied, long_site.reason
    assert long_site.predicted_speedup > short_site.predicted_speedup


def test_cudagraphs_decode_ffn_matches_reference_and_follows_weight_updates():
    """cudagraphs=True: a one-token thresholded FFN replayed from CUDA graphs equals the reference path.

    The bound K-major weights are static inputs refreshed in place, so an
    in-place weight update between replays is seen by the next replay.
    """
    torch.manual_seed(4)
    ffn = zoo.GatedSiluFFN(hidden=512, inner=1024).eval().cuda().to(torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "input", "threshold": 0.5}]}
    xs = [torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        graphed = sparsecc.compile(ffn, spec=spec, kernels="triton", cudagraphs=True)
        reference = sparsecc.compile(ffn, spec=spec, kernels="reference")
        with lowering("eager"):   # compiled here, once, without Inductor: it only provides the expected values
            reference(xs[0])
        for x in xs:   # the first calls warm up and record; the later ones replay
            torch.testing.assert_close(graphed(x).float(), reference(x).float(), atol=3e-2, rtol=3e-2)
        ffn.down_proj.weight.mul_(-1.0)
        for x in xs[:2]:
            torch.testing.assert_close(graphed(x).float(), reference(x).float(), atol=3e-2, rtol=3e-2)


def test_cudagraphs_record_a_graph_that_updates_a_static_cache_in_place():
    """A graph that updates a mark_static_address tensor in place is recorded, not skipped, and replays correctly.

    This is the static KV cache's pattern (HF's StaticCache marks its tensors
    and updates them in place). Inductor allows in-place updates only of
    inputs it knows are static, which it learns from Dynamo's metadata on the
    graph that sparsecc rewrote.
    """
    from torch._dynamo.utils import counters

    torch.manual_seed(6)
    model = zoo.StaticCacheUpdate().eval().cuda().to(torch.bfloat16)
    cache = torch.zeros(3, 32, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.mark_static_address(cache)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "linear": [{"form": "block_weights", "block": [16, 16], "density": 0.5}]}
    xs = [torch.randn(3, 32, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    torch._dynamo.reset()
    counters.clear()
    reference_cache = torch.zeros_like(cache)
    with torch.no_grad():
        graphed = sparsecc.compile(model, spec=spec, kernels="triton", cudagraphs=True)
        reference = sparsecc.compile(model, spec=spec, kernels="reference")
        for step, x in enumerate(xs, start=1):   # warm-up, record, then replays
            out = graphed(x, cache)
            assert float(cache[0, 0]) == step
            torch.testing.assert_close(out.float(), reference(x, reference_cache).float(), atol=3e-2, rtol=3e-2)
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_cudagraphs_two_four_linear_replays_and_follows_weight_updates(monkeypatch):
    """cudagraphs=True with a 2:4 linear on cuSPARSELt: the operand is bound at compile time (nothing is
    compressed inside the capture), replays match the spec's pruning, and an in-place weight update reaches
    the next replay (the bound operand is re-derived in place)."""
    from torch._dynamo.utils import counters

    from sparsecc.codegen import semi_structured_linear as semi
    from sparsecc.codegen.semi_structured_linear import cusparselt_available
    from tests.oracle.oracle import prune_2_4

    if not cusparselt_available():
        pytest.skip("this torch build has no cuSPARSELt")
    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU()).eval().cuda().to(torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    xs = [torch.randn(64, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    torch._dynamo.reset()
    counters.clear()
    cached = len(semi._CACHE)
    from torch._inductor import compile_fx as inductor
    patches, real = [], inductor.compile_fx
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, inputs, *a, **k: patches.append(k.get("config_patches")) or real(gm, inputs, *a, **k))

    def oracle(x):   # docs/spec.md's 2:4 rule; a tied group leaves its output feature undefined (not compared)
        pruned, valid = prune_2_4(model[0].weight)
        expected = torch.nn.functional.silu(x.double() @ pruned.T + model[0].bias.double()).float()
        return expected, valid

    with torch.no_grad():
        graphed = sparsecc.compile(model, spec=spec, kernels="auto", cudagraphs=True)
        for x in xs:   # warm-up, record, then replays
            out, (expected, valid) = graphed(x).float(), oracle(x)
            site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
            assert site.applied and "cuSPARSELt operand" in site.attrs.get("plan", ""), (site.reason, site.attrs)
            torch.testing.assert_close(out[:, valid], expected[:, valid], atol=3e-2, rtol=3e-2)
        model[0].weight.mul_(-1.0)
        for x in xs[:2]:
            out, (expected, valid) = graphed(x).float(), oracle(x)
            torch.testing.assert_close(out[:, valid], expected[:, valid], atol=3e-2, rtol=3e-2)
    # sparsecc asked for CUDA graphs (compile_fx then calls itself again inside the patched config, without them)
    assert patches and patches[0] == {"triton.cudagraphs": True}, patches
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert len(semi._CACHE) == cached   # the bound operand ran: nothing was compressed on a call
