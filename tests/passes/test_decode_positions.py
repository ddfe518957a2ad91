"""Streaming decode on a static KV cache: the query position comes from the mask, not the end of the buffer.

``torch.ops.sparsecc.streaming_attention_from_mask`` is checked against a
float64 masked softmax written from the form's definition with the true
positions, on the reference path (CPU), on the split-KV kernel under the Triton
interpreter (child process) and on CUDA (gpu marker); the attention pass is
checked on an HF Llama decoding into a ``StaticCache``.
"""

import inspect

import pytest
import torch

import sparsecc
from sparsecc.codegen import ops
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)


def expected_streaming(q, k, v, fill, sink, window, scale):
    """float64 attention of query rows at positions ``fill[b] - Sq + 1 + i`` against keys ``0..fill[b]``."""
    b, h, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    rep = h // hkv
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=torch.float64)
    j = torch.arange(sk)[None, :]
    for i in range(b):
        pos = torch.arange(sq)[:, None] + fill[i] - sq + 1
        keep = (j <= pos) & ((j < sink) | (pos - j < window))
        logits = (q[i].double() @ kk[i].transpose(-2, -1)) * scale
        probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
        out[i] = probs @ vv[i]
    return out


def static_cache_mask(b, sq, sk, fill):
    """HF's static-cache mask: row i of batch element e keeps keys j <= fill[e] - Sq + 1 + i."""
    j = torch.arange(sk)[None, None, None, :]
    pos = torch.arange(sq)[None, None, :, None] + torch.tensor(fill)[:, None, None, None] - sq + 1
    return j <= pos


def _case(sq=1, sk=96, h=4, hkv=2, d=16, fill=(40, 77), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(fill)
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    # Large values past the fill level: any weight on an unfilled slot of the static cache would dominate.
    # (Finite: kernels multiply masked probabilities of 0 with the values they load, as HF's zeroed cache allows.)
    for i, f in enumerate(fill):
        k[i, :, f + 1:] = 30.0
        v[i, :, f + 1:] = 1e4
    return q, k, v, static_cache_mask(b, sq, sk, list(fill))


def test_query_end_is_the_last_kept_key():
    mask = static_cache_mask(2, 1, 50, [10, 31])
    assert ops.mask_query_end(mask, 1, 50).tolist() == [10, 31]
    additive = torch.zeros(2, 1, 1, 50).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert ops.mask_query_end(additive, 1, 50).tolist() == [10, 31]


@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("sink,window", [(4, 8), (0, 16), (2, 200)])
def test_reference_uses_true_positions(sq, sink, window):
    q, k, v, mask = _case(sq=sq)
    scale = 0.25
    out = ops.streaming_attention_from_mask(q, k, v, mask, scale, [sink], [window], 0, "reference")
    expected = expected_streaming(q, k, v, [40, 77], sink, window, scale)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_end_anchored_op_would_be_wrong_here():
    """The plain streaming op anchors at the buffer end: with a static cache it keeps only the sinks."""
    q, k, v, mask = _case()
    anchored = ops.streaming_attention(q, k, v, mask, 0.25, False, [4], [8], 0, "reference")
    expected = expected_streaming(q, k, v, [40, 77], 4, 8, 0.25)
    assert not torch.allclose(anchored.double(), expected, atol=1e-3)


def test_interpreter_checks():
    """Run this file's kernel checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select="kernel")


@pytest.mark.parametrize("sq", [1, 2])
@pytest.mark.parametrize("sink,window", [(4, 8), (64, 64), (0, 1000)])
def test_kernel_matches_true_positions(interpreter, sq, sink, window):
    from sparsecc.codegen.decode_attention import streaming_decode_from_mask_op

    q, k, v, mask = _case(sq=sq, sk=200, fill=(70, 199), dtype=torch.bfloat16)
    out = streaming_decode_from_mask_op(q, k, v, mask, 0.25, [sink], [window])
    expected = expected_streaming(q, k, v, [70, 199], sink, window, 0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def _decode_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_static_cache_decode_site_reads_positions_from_the_mask(eager_lowering):
    pytest.importorskip("transformers")
    from transformers import StaticCache
    from sparsecc.backend import rewritten_graphs

    model = _decode_llama()
    cache = StaticCache(config=model.config, max_cache_len=64)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.1.self_attn", "form": "streaming", "sink": 2, "window": 4}]}
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    # Newer transformers name the cache argument `cache` (`past_key_values` is deprecated there).
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model(ids, **{key: cache}, cache_position=torch.arange(12))
        sparsecc.compile(model, spec=spec, kernels="reference")(
            ids[:, :1], **{key: cache}, cache_position=torch.tensor([12]))
    applied = [s for s in sparsecc.last_report().sites if s.kind == "attention" and s.applied]
    assert [s.module for s in applied] == ["model.layers.1.self_attn"]
    targets = [str(n.target) for gm in rewritten_graphs() for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("streaming_attention_from_mask" in t for t in targets) == 1
    assert not any(t.endswith("sparsecc.streaming_attention.default") for t in targets)


@pytest.mark.gpu
@pytest.mark.parametrize("sink,window", [(128, 4096), (4, 64)])
def test_gpu_kernel_matches_true_positions(sink, window):
    from sparsecc.codegen.decode_attention import streaming_decode_from_mask_op

    q, k, v, mask = _case(sq=1, sk=16384, h=32, hkv=8, d=128, fill=(9000, 16383), dtype=torch.bfloat16)
    q, k, v, mask = (t.cuda() for t in (q, k, v, mask))
    out = torch.full_like(q, float("nan"))
    streaming_decode_from_mask_op(q, k, v, mask, 128 ** -0.5, [sink], [window], out=out)
    expected = expected_streaming(q.cpu(), k.cpu(), v.cpu(), [9000, 16383], sink, window, 128 ** -0.5)
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-2, rtol=2e-2)


def test_opcheck():
    """Schema, fake implementation and dispatch of the registered op (torch.library.opcheck)."""
    q, k, v, mask = _case(sq=1, sk=48, fill=(20, 47))
    torch.library.opcheck(ops.op("streaming_attention_from_mask"), (q, k, v, mask, 0.25, [4], [8], 0, "reference"))
