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
    import copy

    from tests.models.streaming_oracle import streaming_reference

    reference = streaming_reference(copy.deepcopy(model), 4, 8)
    for layer in reference.model.layers:   # docs/spec.md, gate mode: act(gate) * [|act(gate)| > tau] * up
        mlp = layer.mlp

        def gated(x, mlp=mlp, tau=0.01):
            a = mlp.act_fn(mlp.gate_proj(x))
            return mlp.down_proj(a * (a.abs() > tau) * mlp.up_proj(x))
        mlp.forward = gated
    with torch.no_grad():
        out = _output(sparsecc.compile(model, spec=spec, kernels="reference")(ids))
        dense = _output(model(ids))
        expected = _output(reference(ids))
    applied = sorted((s.kind, s.module) for s in sparsecc.last_report().applied)
    assert applied == [("attention", f"model.layers.{i}.self_attn") for i in range(LAYERS)] + \
        [("ffn", f"model.layers.{i}.mlp") for i in range(LAYERS)]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert (expected[:, 20:] - dense[:, 20:]).abs().max() > 1e-3   # the forms really change the result


def _prune_2_4(w):
    """docs/spec.md's 2:4: in every group of 4 consecutive weights along the input dimension the 2 of largest
    magnitude stay (float64, written out here)."""
    groups = w.double().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    # ties go to the lower index: a stable sort of the magnitudes, largest first
    keep.scatter_(-1, groups.abs().sort(dim=-1, descending=True, stable=True).indices[..., :2], True)
    return (groups * keep).reshape(w.shape)


@pytest.mark.parametrize("name, head, embedding", [("llama", "lm_head", "model.embed_tokens"),
                                                   ("gpt2", "lm_head", "transformer.wte")])
def test_a_tied_lm_head_is_named_lm_head(name, head, embedding, eager_lowering):
    """A weight tied between the embedding and the LM head: the linear that reads it in ``lm_head``'s forward is
    the site ``lm_head`` (as ``named_modules()`` and a spec name it), not the weight's first holder; a rule on it
    prunes the projection only, the embedding lookup keeps the dense weight."""
    torch.manual_seed(3)
    factory = MODELS[name][0]
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg).eval()
    else:
        model = factory("sdpa").eval()
    assert model.get_submodule(head).weight is model.get_submodule(embedding).weight
    ids = torch.randint(0, 128, (2, 12))
    captured = {}
    hook = model.get_submodule(head).register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    expected = captured["x"].double() @ _prune_2_4(model.get_submodule(head).weight).T
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"modules": head, "form": "2:4"}]}
    with torch.no_grad():
        out = _output(sparsecc.compile(model, spec=spec, kernels="reference")(ids))
    report = sparsecc.last_report()
    assert [(s.module, s.applied) for s in report.sites if s.kind == "linear" and s.form] == [(head, True)]
    assert not any(s.module == embedding for s in report.sites)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_training_mode_attention_dropout_is_a_refused_site_with_its_reason():
    """BERT in training mode drops out its attention probabilities: each site is listed, dense, saying so (the
    rule counts as matched, not as naming modules without sites); in eval mode the same spec rewrites them."""
    model = _bert("eager").train()
    ids = torch.randint(0, 128, (1, 16))
    spec = {"version": 1, "attention": [{"modules": "encoder.layer.*.attention.self", "form": "streaming",
                                         "sink": 1, "window": 4, "policy": "force"}]}
    report = sparsecc.explain(model, ids, spec=spec)
    sites = [s for s in report.sites if s.kind == "attention"]
    assert [s.module for s in sites] == [f"encoder.layer.{i}.attention.self" for i in range(LAYERS)]
    for site in sites:
        assert not site.applied and site.reason.startswith(
            "not rewritable: training-mode dropout (p=0.1) between the softmax and P @ V"), site.reason
    assert report.unmatched_rules() == []
    report = sparsecc.explain(model.eval(), ids, spec=spec)
    assert [s.applied for s in report.sites if s.kind == "attention"] == [True] * LAYERS


def _gpt_oss_with_a_streaming_spec():
    """A small GPT-OSS (attention sinks, eager experts), its input and a spec covering every attention site."""
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=8, experts_implementation="eager")
    model = transformers.GptOssForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 20))
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 4, "window": 8}]}
    return model, ids, spec


def test_attention_sinks_stay_dense_with_their_reason(eager_lowering):
    """GPT-OSS normalises each head's keys together with a learned sink logit: no sparse form keeps that, so a
    rule covering its attention leaves every layer dense and the report says why (the site is not missing)."""
    torch.manual_seed(4)
    model, ids, spec = _gpt_oss_with_a_streaming_spec()
    with torch.no_grad():
        expected = _output(model(ids))
        out = _output(sparsecc.compile(model, spec=spec, kernels="reference")(ids))
    sites = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    assert all(not s.applied and "softmax runs over more logits than the keys" in s.reason for s in sites)
    torch.testing.assert_close(out, expected)


def test_a_soft_capped_attention_names_its_tanh_and_its_rule(eager_lowering):
    """Gemma-2's eager attention soft-caps its logits (tanh(x / cap) * cap) before the mask is added: each layer is
    a refused site whose reason names the tanh and whose record names the rule covering it."""
    torch.manual_seed(5)
    cfg = transformers.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                    query_pre_attn_scalar=16, max_position_embeddings=256)
    assert cfg.attn_logit_softcapping
    cfg._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 2, "window": 4}]}
    with torch.no_grad():
        expected = model(ids).logits
        out = sparsecc.compile(model, spec=spec, kernels="reference")(ids).logits
    sites = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    for site in sites:
        assert not site.applied and "they pass through tanh" in site.reason, site.reason
        assert (site.rule, site.form) == ("attention[0]", "streaming"), (site.rule, site.form)
    torch.testing.assert_close(out, expected)


def test_an_ffn_rule_on_stacked_experts_says_they_stay_dense(eager_lowering):
    """Qwen3-MoE stores its experts stacked ([experts, out, in] parameters): no FFN site is found in them, and the
    summary says the rule covers them and that they run dense, instead of only "matched nothing"."""
    torch.manual_seed(6)
    cfg = transformers.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=256, experts_implementation="eager")
    cfg._attn_implementation = "eager"   # (transformers 5.0's grouped_mm experts need bf16 under torch.compile)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 12))
    spec = {"version": 1, "defaults": {"policy": "force"}, "ffn": [
        {"modules": "model.layers.*.mlp", "form": "activation_threshold", "mode": "input", "threshold": 0.05}]}
    with torch.no_grad():
        expected = model(ids).logits
        with pytest.warns(sparsecc.SparseccWarning) as caught:
            out = sparsecc.compile(model, spec=spec, kernels="reference")(ids).logits
    summary = " ".join(str(w.message) for w in caught)
    assert ("ffn[0] (modules='model.layers.*.mlp') covers model.layers.0.mlp.experts (gate_up_proj [4, 64, 64]"
            in summary), summary
    assert "are reached by no ffn form, so those experts run dense" in " ".join(sparsecc.last_report().notes)
    torch.testing.assert_close(out, expected)


def test_gpt_oss_returning_its_attention_probabilities_keeps_each_site(eager_lowering):
    """Under output_attentions=True GPT-OSS returns the sink-sliced probabilities: each layer is still a listed
    site, dense with both reasons, and the returned probabilities equal the eager model's."""
    torch.manual_seed(4)
    model, ids, spec = _gpt_oss_with_a_streaming_spec()
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
        out = sparsecc.compile(model, spec=spec, kernels="reference")(ids, output_attentions=True)
    report = sparsecc.last_report()
    sites = [s for s in report.sites if s.kind == "attention"]
    assert [s.module for s in sites] == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    for site in sites:
        assert not site.applied and "softmax runs over more logits than the keys" in site.reason, site.reason
        assert "the attention probabilities are also used outside P @ V" in site.reason, site.reason
    assert report.unmatched_rules() == []
    torch.testing.assert_close(out.logits, expected.logits)
    for got, want in zip(out.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(got, want)


def test_graph_breaks_inside_the_layers_keep_the_model_paths(eager_lowering):
    """Mixtral with its experts looped in Python: Dynamo breaks the graph inside every decoder layer and compiles
    the layers' frames one by one. The spec still names (and rewrites) every layer by its path in the model, and
    the report of the compile lists every layer."""
    torch.manual_seed(5)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, experts_implementation="eager")
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 24))
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 4, "window": 8}]}
    import copy

    from tests.models.streaming_oracle import streaming_reference

    reference = streaming_reference(copy.deepcopy(model), 4, 8)
    with torch.no_grad():
        out = _output(sparsecc.compile(model, spec=spec, kernels="reference")(ids))
        expected = _output(reference(ids))
    report = sparsecc.last_report()
    assert report.graphs > 1   # the graph really breaks inside the layers
    assert sorted((s.kind, s.module) for s in report.applied) == \
        [("attention", f"model.layers.{i}.self_attn") for i in range(LAYERS)]
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_the_cache_window_of_each_layer_follows_the_models_config():
    """The window of the cache transformers keeps per layer (docs/spec.md, "A model with its own sliding window"):
    written here from the configs. Mistral slides every layer; Gemma 3 the layers its layer_types say; Llama 4
    chunks the layers its layer_types say (the cache keeps a chunk's worth); Llama keeps every token."""
    from sparsecc.passes.attention_check import model_sliding_window

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    models = {
        "mistral": (transformers.MistralForCausalLM(transformers.MistralConfig(**common, num_hidden_layers=2,
                                                                               sliding_window=16)), [16, 16]),
        "gemma3": (transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, num_hidden_layers=2, head_dim=16, sliding_window=16,
            layer_types=["sliding_attention", "full_attention"])), [16, 0]),
        "llama4": (transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            **common, intermediate_size_mlp=128, num_hidden_layers=4, head_dim=16, attention_chunk_size=16,
            num_local_experts=2, layer_types=["chunked_attention"] * 3 + ["full_attention"])), [16, 16, 16, 0]),
        "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, num_hidden_layers=2)), [0, 0]),
    }
    for name, (model, expected) in models.items():
        assert [model_sliding_window(layer.self_attn) for layer in model.model.layers] == expected, name


def test_returned_attention_probabilities_keep_each_site_in_the_report(eager_lowering):
    """With output_attentions=True, eager attention returns its probabilities: every attention site is still
    listed, dense with the reason, so the spec's rule counts as matched; logits and probabilities stay exact."""
    torch.manual_seed(3)
    model = _llama("eager").eval()
    ids = torch.randint(0, 128, (1, 24))
    spec = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 2,
                                         "window": 4, "policy": "force"}]}
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
        out = sparsecc.compile(model, spec=spec)(ids, output_attentions=True)
    report = sparsecc.last_report()
    attention = [s for s in report.sites if s.kind == "attention"]
    assert sorted(s.module for s in attention) == [f"model.layers.{i}.self_attn" for i in range(LAYERS)]
    for site in attention:
        assert not site.applied and site.reason.startswith("not rewritable: the attention probabilities are also "
                                                           "used outside P @ V"), site.reason
    assert report.unmatched_rules() == [] and report.overridden_rules() == []
    torch.testing.assert_close(out.logits, expected.logits)
    for got, want in zip(out.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(got, want)
