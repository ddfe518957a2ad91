"""Compiling zoo attention models with the dynamic forms (policy force) against the float64 oracle's layouts
(tests/oracle, written from docs/spec.md)."""

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs
from sparsecc.forms import BlockTopK, VerticalSlash
from tests import zoo
from tests.oracle import oracle
from tests.oracle.harness import lowering

FORMS = {
    "block_topk": ({"form": "block_topk", "block": 16, "topk": 1}, BlockTopK(block=16, topk=1)),
    "block_topk_cdf": ({"form": "block_topk", "block": 16, "cdf": 0.5, "pool": "max", "local_blocks": 0},
                       BlockTopK(block=16, cdf=0.5, pool="max", local_blocks=0)),
    "vertical_slash": ({"form": "vertical_slash", "block": 16, "last_q": 8, "vertical": 3, "slash": 4},
                       VerticalSlash(last_q=8, vertical=3, slash=4, block=16)),
}
SPELLINGS = (zoo.SdpaAttention, zoo.SdpaRepeatAttention)


def _token_keep(block, x, form):
    """Token-level keep [H, S, S] of the oracle's layout for this block's own q and k (batch 1); the data are such
    that no selection sits within float32 rounding of a tie (keep_min equals keep_max)."""
    q, k, _ = block.qkv(x)
    scale = q.shape[-1] ** -0.5
    if isinstance(form, VerticalSlash):
        keep_min, keep_max = oracle.vertical_slash_keep(q, k, scale=scale, causal=block.causal, last_q=form.last_q,
                                                        vertical=form.vertical, slash=form.slash, block=form.block)
    else:
        keep_min, keep_max = oracle.block_topk_keep(q, k, scale=scale, causal=block.causal, block=form.block,
                                                    topk=form.topk, cdf=form.cdf, sink_blocks=form.sink_blocks,
                                                    local_blocks=form.local_blocks, pool=form.pool)
    assert torch.equal(keep_min, keep_max), "the layout is not defined on these data (a near tie)"
    return keep_min[0]


@pytest.mark.parametrize("name", list(FORMS))
@pytest.mark.parametrize("cls", SPELLINGS, ids=lambda c: c.__name__)
def test_dynamic_form_compiles_and_matches_reference(cls, name, eager_lowering):
    torch.manual_seed(3)
    block = cls(hidden=64, heads=4, kv_heads=2).eval()
    x = torch.randn(1, 100, 64)   # 100: a ragged last block of 16
    rule, form = FORMS[name]
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [rule]}
    with torch.no_grad():
        out = sparsecc.compile(block, spec=spec, kernels="reference")(x)
        keep = _token_keep(block, x, form)
    if name == "vertical_slash" and not block.causal:
        # MInference's rule is causal only: a bidirectional site without a mask stays dense, with the reason.
        site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
        assert not site.applied and "causal" in site.reason
        return
    with torch.no_grad():
        expected = block.expected(x, keep)
    targets = [str(n.target) for gm in rewritten_graphs() for n in gm.graph.nodes if n.op == "call_function"]
    assert any("dynamic_block_attention" in t for t in targets)
    site = [s for s in sparsecc.last_report().sites if s.kind == "attention"][0]
    assert site.applied and site.form == form.name
    # The layout really is sparse here, so a dense result would fail the comparison.
    assert not bool(keep.all() if not block.causal else keep[:, torch.ones(100, 100).tril().bool()].all())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_mixed_dynamic_and_dense_heads_stay_dense():
    block = zoo.SdpaAttention(hidden=64, heads=4, kv_heads=2).eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "block_topk", "block": 16, "topk": 1, "heads": [0, 1]}]}
    report = sparsecc.explain(block, torch.randn(1, 40, 64), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert not site.applied and "every head" in site.reason


def test_block_topk_mixed_with_other_heads_stays_dense():
    block = zoo.SdpaAttention(hidden=64, heads=4, kv_heads=2).eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "block_topk", "block": 16, "topk": 1},
                          {"form": "streaming", "sink": 1, "window": 4, "heads": [3]}]}
    report = sparsecc.explain(block, torch.randn(1, 40, 64), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert not site.applied and "block_topk needs one rule for every head" in site.reason


def test_block_larger_than_sequence_stays_dense():
    block = zoo.SdpaAttention(hidden=64, heads=4, kv_heads=2).eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "vertical_slash", "block": 64, "last_q": 4, "vertical": 1, "slash": 1}]}
    report = sparsecc.explain(block, torch.randn(1, 40, 64), spec=spec)
    site = [s for s in report.sites if s.kind == "attention"][0]
    assert not site.applied and "larger than the key sequence" in site.reason


def test_cost_estimate_counts_the_per_call_estimate():
    from sparsecc.cost.hardware import H100_SXM
    from sparsecc.cost.sites import estimate_attention
    from sparsecc.forms import BlockSparse

    shape = dict(batch=1, heads=32, kv_heads=8, seq_q=32768, seq_k=32768, head_dim=128, dtype=torch.bfloat16,
                 causal=True, hw=H100_SXM, margin=1.05, symbolic_seq=False)
    topk = estimate_attention(BlockTopK(block=64, topk=8), None, **shape)
    # Same kept blocks as a static band of sink + topk + local + 1 blocks, plus the estimate's work.
    static = estimate_attention(BlockSparse(block=64, local_blocks=11), None, **shape)
    assert topk.sparse_flops > static.sparse_flops
    assert 0 < topk.density < 0.1
    cdf = estimate_attention(BlockTopK(block=64, cdf=0.9), None, **shape)
    assert 0.2 < cdf.density < 0.25
    vs = estimate_attention(VerticalSlash(last_q=64, vertical=1000, slash=6096), None, **shape)
    assert 0 < vs.density < 1


def test_dynamic_op_schema_and_fake():
    from sparsecc.codegen import ops
    from sparsecc.codegen.dynamic_attention import op_args

    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    op = ops.op("dynamic_block_attention")
    for form in (BlockTopK(block=16, topk=1), BlockTopK(block=16, cdf=0.8), VerticalSlash(4, 2, 2, block=16)):
        args = (q, k, v, None, 0.25, True, *op_args(form), 0, "reference")
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    # Below the crossover the op runs dense attention.
    dense = op(q, k, v, None, 0.25, True, *op_args(BlockTopK(block=16, topk=1)), 41, "reference")
    torch.testing.assert_close(dense, ops.dense_attention(q, k, v, None, 0.25, True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(FORMS))
def test_gpu_compiled_dynamic_attention_matches_reference_path(name):
    """The Triton path inside a compiled bf16 model against the same model on the reference path (fp32 math)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(5)
    block = zoo.SdpaAttention(hidden=512, heads=8, kv_heads=2).eval().cuda().to(torch.bfloat16)
    x = torch.randn(2, 1000, 512, device="cuda", dtype=torch.bfloat16)
    rule, _ = FORMS[name]
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [rule]}
    with torch.no_grad():
        fast = sparsecc.compile(block, spec=spec, kernels="triton")(x).float()
        with lowering("eager"):   # the expected values: the reference path needs no Inductor compile
            slow = sparsecc.compile(block, spec=spec, kernels="reference")(x).float()
    assert torch.isfinite(fast).all()
    assert ((fast - slow).norm() / slow.norm()).item() < 1e-2
