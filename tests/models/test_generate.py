"""``sparsecc.compile(model).generate()`` decodes through the compiled forward, with a bounded number of compiles."""

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs
from tests.models.streaming_oracle import streaming_reference

transformers = pytest.importorskip("transformers")

PROMPT, NEW = 12, 16


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(cfg).eval()


DENSE = {"version": 1, "attention": [{"form": "dense"}], "ffn": [{"form": "dense"}]}
# The window covers prompt + generated tokens, so the streaming form keeps every causal key: greedy tokens must
# equal eager's exactly, while the attention sites really run the sparse op.
STREAMING = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 4,
                                          "window": PROMPT + NEW + 4, "policy": "force"}]}


# torch 2.11's Inductor emits C++ that does not compile ("'tmp2' was not declared in this scope") for the
# dynamic-shape decode graph of HF's DynamicCache on the CPU, with a dense spec too (nothing rewritten): seen on the
# CUDA machine, whose tests run this model on its CPU. torch 2.13 compiles it.
_OLD_INDUCTOR_CPU = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13)


@pytest.mark.parametrize("cache", [
    pytest.param("dynamic", marks=pytest.mark.xfail(_OLD_INDUCTOR_CPU, reason="Inductor CPU codegen in torch < 2.13",
                                                     raises=Exception, strict=False)),
    "static"])
@pytest.mark.parametrize("spec_name", ["dense", "streaming"])
def test_generate_runs_the_compiled_forward_and_equals_eager(spec_name, cache):
    model = _llama()
    ids = torch.randint(0, 128, (1, PROMPT))
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=NEW, do_sample=False, **extra)
    torch._dynamo.utils.counters.clear()
    spec = STREAMING if spec_name == "streaming" else DENSE
    compiled = sparsecc.compile(model, spec=spec, kernels="reference")
    with torch.no_grad():
        out = compiled.generate(ids, max_new_tokens=NEW, do_sample=False, **extra)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 3, graphs
    report = sparsecc.last_report()
    attention = [s for s in report.sites if s.kind == "attention"]
    assert sorted(s.module for s in attention) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    if spec_name == "streaming":
        assert all(s.applied for s in attention)
        assert any("sparsecc" in str(n.target) for g in rewritten_graphs() for n in g.graph.nodes)
    else:
        assert not report.applied
    assert torch.equal(out, expected)
    assert model.forward.__func__ is type(model).forward   # the user's model is untouched


def test_hf_compile_config_path_runs_sparsecc():
    model = _llama()
    ids = torch.randint(0, 128, (1, PROMPT))
    config = transformers.CompileConfig(backend="sparsecc", mode=None,
                                        options={"spec": STREAMING, "kernels": "reference"})
    config._compile_all_devices = True   # transformers applies compile_config on accelerators only; CPU here
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static",
                             compile_config=config)
    report = sparsecc.last_report()
    attention = [s for s in report.sites if s.kind == "attention"] if report is not None else []
    assert len(attention) == 2 and all(s.applied for s in attention)
    assert torch.equal(out, expected)


SINK, WINDOW = 2, 5


def test_generate_with_a_window_shorter_than_the_prompt_matches_the_oracle(eager_lowering):
    """Streaming that leaves keys out at every step, prefill and decode through the cache: each step's logits equal
    a float64 oracle (an HF attention function written from docs/spec.md), and differ from dense attention's."""
    import copy

    model = _llama()
    ids = torch.randint(0, 128, (1, PROMPT))
    spec = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": SINK,
                                         "window": WINDOW, "policy": "force"}]}
    reference = streaming_reference(copy.deepcopy(model), SINK, WINDOW)
    settings = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(ids, **settings)
        dense = model.generate(ids, **settings)
        out = sparsecc.compile(model, spec=spec, kernels="reference").generate(ids, **settings)
    attention = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert len(attention) == 2 and all(s.applied for s in attention)
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert (expected.logits[0] - dense.logits[0]).abs().max() > 1e-3   # the window really leaves keys out
