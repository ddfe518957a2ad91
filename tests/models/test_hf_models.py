"""HF transformers models built from small configs (random weights, no downloads)."""

import pytest
import torch

import sparsecc

transformers = pytest.importorskip("transformers")

LAYERS = 2


def _llama(impl):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = impl
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(impl):
    cfg = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256,
                                  bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = impl
    return transformers.GPT2LMHeadModel(cfg)


def _bert(impl):
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=256)
    cfg._attn_implementation = impl
    return transformers.BertModel(cfg)


# (factory, linears per layer, extra linears outside the layers, attention module, ffn module)
MODELS = {
    "llama": (_llama, 7, 1, "model.layers.{i}.self_attn", "model.layers.{i}.mlp"),
    "gpt2": (_gpt2, 4, 1, "transformer.h.{i}.attn", "transformer.h.{i}.mlp"),
    "bert": (_bert, 6, 1, "encoder.layer.{i}.attention.self", "encoder.layer.{i}"),
}


def _output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_site_is_found(name, impl):
    factory, per_layer, extra, attn_path, ffn_path = MODELS[name]
    torch.manual_seed(0)
    model = factory(impl).eval()
    report = sparsecc.explain(model, torch.randint(0, 128, (2, 20)))
    attention = sorted(s.module for s in report.sites if s.kind == "attention")
    ffn = sorted(s.module for s in report.sites if s.kind == "ffn")
    assert attention == [attn_path.format(i=i) for i in range(LAYERS)]
    assert ffn == [ffn_path.format(i=i) for i in range(LAYERS)]
    linear = [s.module for s in report.sites if s.kind == "linear"]
    assert len(linear) == per_layer * LAYERS + extra
    assert all(s.reason == "no rule" for s in report.sites)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_spec_through_inductor_equals_eager(name):
    factory = MODELS[name][0]
    torch.manual_seed(1)
    model = factory("sdpa").eval()
    ids = torch.randint(0, 128, (2, 20))
    spec = {"version": 1, "attention": [{"form": "dense"}], "ffn": [{"form": "dense"}], "linear": [{"form": "dense"}]}
    with torch.no_grad():
        expected = _output(model(ids))
        out = _output(sparsecc.compile(model, spec=spec)(ids))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    report = sparsecc.last_report()
    assert report.sites and not report.applied


def test_llama_streaming_spec_rewrites_every_layer(eager_lowering):
    torch.manual_seed(2)
    model = _llama("sdpa").eval()
    ids = torch.randint(0, 128, (1, 40))
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 4, "window": 8}],
            "ffn": [{"modules": "model.layers.*.mlp", "form": "activation_threshold", "mode": "gate",
                     "threshold": 0.01}]}
    with torch.no_grad():
        out = _output(sparsecc.compile(model, spec=spec, kernels="reference")(ids))
        dense = _output(model(ids))
    applied = sorted((s.kind, s.module) for s in sparsecc.last_report().applied)
    assert applied == [("attention", f"model.layers.{i}.self_attn") for i in range(LAYERS)] + \
        [("ffn", f"model.layers.{i}.mlp") for i in range(LAYERS)]
    assert torch.isfinite(out).all()
    # the first sink + window positions see every key, so those rows agree with dense (up to the FFN threshold)
    assert (out[:, :8] - dense[:, :8]).abs().max() < 0.05
    assert (out[:, 20:] - dense[:, 20:]).abs().max() > 1e-3
