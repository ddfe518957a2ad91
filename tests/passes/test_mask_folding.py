"""Constant causal masks of SDPA calls are folded into is_causal=True (passes/normalize.py), and only those."""

import operator

import pytest
import torch
import torch.nn.functional as F

import sparsecc
from sparsecc.backend import rewritten_graphs
from sparsecc.passes.normalize import fold_causal_masks


def _capture(fn, *args):
    """The Dynamo graph of ``fn(*args)`` (captured by a backend that runs it unchanged)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]


def _qkv(s=24, h=4, d=16):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, s, d, generator=g) for _ in range(3))


def causal_bool(q, k, v):
    s = q.shape[-2]
    mask = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])


def causal_additive(q, k, v):
    s = q.shape[-2]
    keep = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    bias = torch.zeros(s, s).masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def causal_finfo_min(q, k, v):
    s = q.shape[-2]
    keep = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    bias = torch.zeros(s, s).masked_fill(~keep, torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def sliding_window(q, k, v):
    s = q.shape[-2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < 5))


def causal_but_one_hole(q, k, v):
    s = q.shape[-2]
    mask = torch.arange(s)[None, :] <= torch.arange(s)[:, None]
    mask[s - 1, 0] = False   # in place: the fold must not evaluate through it
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def causal_off_by_one(q, k, v):
    s = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.arange(s)[None, :] < torch.arange(s)[:, None] + 2)


def padded_causal(q, k, v, padding):
    s = q.shape[-2]
    mask = (torch.arange(s)[None, :] <= torch.arange(s)[:, None]) & padding[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn", [causal_bool, causal_additive, causal_finfo_min], ids=lambda f: f.__name__)
def test_constant_causal_masks_fold(fn):
    q, k, v = _qkv()
    gm = _capture(fn, q, k, v)
    assert fold_causal_masks(gm.graph) == 1
    gm.recompile()
    (node,) = _sdpa_nodes(gm)
    assert node.kwargs["attn_mask"] is None and node.kwargs["is_causal"] is True
    assert not [n for n in gm.graph.nodes if "arange" in str(n.target)], "the mask's nodes are erased"
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = gm(q, k, v)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, expected)


@pytest.mark.parametrize("fn", [sliding_window, causal_off_by_one, causal_but_one_hole], ids=lambda f: f.__name__)
def test_other_constant_masks_stay(fn):
    q, k, v = _qkv()
    gm = _capture(fn, q, k, v)
    assert fold_causal_masks(gm.graph) == 0
    (node,) = _sdpa_nodes(gm)
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    assert mask is not None


def test_masks_reading_inputs_stay():
    q, k, v = _qkv()
    padding = torch.ones(1, q.shape[-2], dtype=torch.bool)
    gm = _capture(padded_causal, q, k, v, padding)
    assert fold_causal_masks(gm.graph) == 0


def test_decode_shaped_mask_stays():
    """Sq != Sk: SDPA's is_causal would be top-left aligned, so even a constant mask is kept."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 8, generator=g)
    k = v = torch.randn(1, 2, 6, 8, generator=g)

    def last_row(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(1, 6, dtype=torch.bool))

    gm = _capture(last_row, q, k, v)
    assert fold_causal_masks(gm.graph) == 0


def _materialising_llama(monkeypatch, vocab, hidden, heads, device="cpu", dtype=torch.float32):
    """A 2-layer HF Llama (random weights) whose compiled forward builds its causal mask in the graph.

    transformers never skips the mask while compiling when torch.compiler.is_exporting() is True under
    Dynamo, which is what torch < 2.14 reports; this emulates that.
    """
    pytest.importorskip("transformers")
    import transformers.masking_utils as masking
    from transformers import LlamaConfig, LlamaForCausalLM

    # Older transformers (5.0) has no such hook and materialises the mask under Dynamo by itself; either way the
    # test below asserts that a mask was folded.
    if hasattr(masking, "is_torchdynamo_exporting"):
        monkeypatch.setattr(masking, "is_torchdynamo_exporting", torch.compiler.is_compiling)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=2, head_dim=hidden // heads,
                         max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def test_hf_llama_materialised_mask_is_folded(monkeypatch):
    """HF's compile-time mask path (torch < 2.14) builds the causal mask in-graph; sparsecc drops it."""
    model = _materialising_llama(monkeypatch, vocab=128, hidden=64, heads=4)
    ids = torch.randint(0, 128, (1, 40))

    plain = _capture(lambda x: model(x, use_cache=False).logits, ids)
    masks = [n for n in _sdpa_nodes(plain) if n.kwargs.get("attn_mask") is not None]
    assert len(masks) == 2, "the emulation must reproduce the materialised mask"

    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = sparsecc.compile(model, spec={"version": 1}, kernels="reference")(ids, use_cache=False).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    calls = [n for gm in rewritten_graphs() for n in _sdpa_nodes(gm)]
    assert len(calls) == 2
    assert all(n.kwargs["attn_mask"] is None and n.kwargs["is_causal"] is True for n in calls)


@pytest.mark.gpu
def test_gpu_hf_llama_materialised_mask_is_folded(monkeypatch):
    """On CUDA: the folded graph matches eager (bf16) and Inductor lowers a mask-free causal SDPA."""
    model = _materialising_llama(monkeypatch, vocab=1024, hidden=512, heads=8, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1024, (1, 2048), device="cuda")
    with torch.no_grad():
        expected = model(ids, use_cache=False, logits_to_keep=1).logits.float()
        out = torch.full_like(expected, float("nan"))
        out.copy_(sparsecc.compile(model, spec={"version": 1})(ids, use_cache=False, logits_to_keep=1).logits)
    calls = [n for gm in rewritten_graphs() for n in _sdpa_nodes(gm)]
    assert len(calls) == 2 and all(n.kwargs["attn_mask"] is None and n.kwargs["is_causal"] for n in calls)
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=5e-2)


def test_dunder_method_calls_in_the_mask_are_not_mutations():
    """torch 2.11's Dynamo records ``a == b`` in HF's mask builder as ``call_method __eq__``: still constant."""
    from sparsecc.passes.normalize import _inplace_method

    assert not _inplace_method("__eq__") and not _inplace_method("__and__") and not _inplace_method("__getitem__")
    assert _inplace_method("__iand__") and _inplace_method("__setitem__") and _inplace_method("masked_fill_")
    q, k, v = _qkv()

    def eq_mask(q, k, v):
        s = q.shape[-2]
        rows, cols = torch.arange(s)[:, None], torch.arange(s)[None, :]
        mask = (cols <= rows) == torch.ones(s, s, dtype=torch.bool)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])

    gm = _capture(eq_mask, q, k, v)
    eq = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.eq]
    assert len(eq) == 1
    eq[0].op, eq[0].target = "call_method", "__eq__"  # the spelling torch 2.11 records
    assert fold_causal_masks(gm.graph) == 1
    gm.recompile()
    torch.testing.assert_close(gm(q, k, v)[0], F.scaled_dot_product_attention(q, k, v, is_causal=True))
