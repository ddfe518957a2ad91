"""The whole pipeline on CUDA: Triton kernels inside compiled models agree with float64 oracles written from
docs/spec.md (tests/oracle), and each case first checks that its form was applied."""

import copy

import pytest
import torch

import sparsecc
from tests import zoo
from tests.oracle.oracle import static_keep
from tests.oracle.oracle_weights import Ffn, expected_ffn, prune_block_weights

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=512, heads=8, kv_heads=2, inner=1024, bias=False)
    return block.eval().cuda().to(torch.bfloat16)


def _rel(out, expected):
    return float((out.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("attn", [
    {"form": "streaming", "sink": 16, "window": 128},
    {"form": "block_sparse", "block": 64, "local_blocks": 2, "global_blocks": 1},
])
def test_triton_attention_in_compiled_model_matches_the_oracle(attn):
    model = _model()
    with torch.no_grad():   # attention's share of the block output large enough to show the form (dense: ~8% off)
        model.attn.o_proj.weight.mul_(4.0)
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [attn]}
    with torch.no_grad():
        out = sparsecc.compile(model, spec=spec, kernels="triton")(x)
        site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
        assert site.applied and "triton" in site.reason, site.reason
        # the block's float64 output with its attention restricted to the spec's keep mask (causal)
        keep = static_keep(attn, 1000, 1000, causal=True).cuda()
        mid = x.double() + model.attn.expected(x, keep).double()
        expected = mid + copy.deepcopy(model.mlp).double()(mid)
        dense = x.double() + model.attn.expected(x, static_keep(None, 1000, 1000, causal=True).cuda()).double()
        dense = dense + copy.deepcopy(model.mlp).double()(dense)
    assert _rel(dense.float(), expected) > 5e-2   # the form changes this output: the comparison is not vacuous
    assert _rel(out.float(), expected) < 1e-2


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


def _ffn_oracle(ffn, x, tau, margin=0.0):
    """docs/spec.md's input mode with one threshold for the projections' inputs and the down input, float64.
    Returns (out, valid): not valid where an activation lies within ``margin`` (relative) of ``tau``."""
    weights = Ffn(ffn.gate_proj.weight.detach().cpu(), None, ffn.up_proj.weight.detach().cpu(), None,
                  ffn.down_proj.weight.detach().cpu(), None, "silu")
    return expected_ffn(weights, x.cpu(), mode="input", tau_input=tau, tau_down=tau, rtol_hidden=margin)


def test_cudagraphs_decode_ffn_matches_the_oracle_and_follows_weight_updates():
    """cudagraphs=True: a one-token thresholded FFN replayed from CUDA graphs equals the spec's output.

    The bound K-major weights are static inputs refreshed in place, so an
    in-place weight update between replays is seen by the next replay. The
    tokens are drawn so that no hidden activation lies within 1% of the
    threshold, where bf16 rounding could move a channel across it (one such
    channel moves the output by about 15%).
    """
    torch.manual_seed(4)
    ffn = zoo.GatedSiluFFN(hidden=512, inner=1024).eval().cuda().to(torch.bfloat16)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "ffn": [{"form": "activation_threshold", "mode": "input", "threshold": 0.5}]}
    candidates = [torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16) for _ in range(128)]
    xs = [x for x in candidates if _ffn_oracle(ffn, x, 0.5, margin=1e-2)[1].all()][:4]
    assert len(xs) == 4
    with torch.no_grad():
        graphed = sparsecc.compile(ffn, spec=spec, kernels="triton", cudagraphs=True)
        for step in range(2):
            for x in (xs if step == 0 else xs[:2]):   # the first calls warm up and record; the later ones replay
                out = graphed(x).float().cpu()
                site = [s for s in sparsecc.last_report().sites if s.kind == "ffn"][0]
                assert site.applied, site.reason
                expected, dense = _ffn_oracle(ffn, x, 0.5)[0], _ffn_oracle(ffn, x, None)[0]
                assert _rel(dense.float(), expected) > 0.3   # the thresholds drop channels that matter
                assert _rel(out, expected) < 2e-2
            ffn.down_proj.weight.mul_(-1.0)


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
    with torch.no_grad():
        graphed = sparsecc.compile(model, spec=spec, kernels="triton", cudagraphs=True)
        for step, x in enumerate(xs, start=1):   # warm-up, record, then replays
            out = graphed(x, cache)
            assert float(cache[0, 0]) == step
            site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
            assert site.applied, site.reason
            pruned, defined = prune_block_weights(model.proj.weight.cpu(), (16, 16), 0.5)
            assert defined
            expected = x.cpu().double() @ pruned.T + model.proj.bias.cpu().double() + step
            torch.testing.assert_close(out.double().cpu(), expected, atol=3e-2, rtol=3e-2)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_two_four_linear_runs_planned_settings_through_cached_plans(monkeypatch, dtype):
    """A static 2:4 linear: its cuSPARSELt settings are planned at compile time (searched in bf16, the default in
    fp16), every product runs through a plan cached on the host (torch's per-call op is never reached), and the
    numbers are the spec's. The same module under dynamic shapes searches on its first call, also through plans."""
    import torch.nn.functional as F

    from sparsecc.codegen import cusparselt_plan
    from sparsecc.codegen import semi_structured_linear as semi
    from sparsecc.codegen.semi_structured_linear import cusparselt_available
    from tests.oracle.oracle import prune_2_4

    if not cusparselt_available():
        pytest.skip("this torch build has no cuSPARSELt")
    if cusparselt_plan.plans_unavailable_reason():
        pytest.skip(f"no cached plans here: {cusparselt_plan.plans_unavailable_reason()}")
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda *a, **k: pytest.fail("torch's per-call product was used"))
    products = []   # what each product's cached plan returned (None: torch's op would have run)
    monkeypatch.setattr(semi, "planned_product",
                        lambda *a: products.append(cusparselt_plan.planned_product(*a)) or products[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU()).cuda().to(dtype).eval()
    x = torch.randn(2, 50, 256, device="cuda", dtype=dtype)   # 100 tokens: padded to 104 for cuSPARSELt
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    pruned, valid = prune_2_4(model[0].weight)   # docs/spec.md's rule; a tied group's feature is not compared
    expected = F.silu(x.double() @ pruned.T + model[0].bias.double())
    for dynamic, settings in ((False, "searched at compile time for 100 tokens" if dtype == torch.bfloat16
                              else "default algorithm"), (True, "the token count is symbolic")):
        torch._dynamo.reset()
        products.clear()
        with torch.no_grad():
            out = torch.compile(model, backend="sparsecc", options={"spec": spec}, dynamic=dynamic)(x)
        site = [s for s in sparsecc.last_report().sites if s.kind == "linear"][0]
        assert site.applied and settings in site.attrs["plan"], (site.reason, site.attrs)
        assert products and all(y is not None for y in products)   # every product ran through a plan
        torch.testing.assert_close(out.double()[..., valid], expected[..., valid], atol=3e-2, rtol=3e-2)
