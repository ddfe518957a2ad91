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
    # one record per layer and phase: the prefill's, and the one-token steps'
    assert sorted({s.module for s in attention}) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sorted((s.module, s.shapes["q"][2] == 1) for s in attention) == [
        (f"model.layers.{i}.self_attn", decode) for i in range(2) for decode in (False, True)]
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
    assert len(attention) == 4 and all(s.applied for s in attention)   # two layers, prefill and decode
    assert torch.equal(out.sequences, expected.sequences)
    for step, (got, want) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    assert (expected.logits[0] - dense.logits[0]).abs().max() > 1e-3   # the window really leaves keys out


def _sliding_window_oracle(model_window, sink, window):
    """An HF attention function of docs/spec.md's rule for a model with its own sliding window (float64).

    Query row ``i`` is the token at ``position_ids[i]`` (what transformers passes). A call whose first query
    sits at ``model_window - 1`` or later runs dense: its keys are the cache's last tokens in order, ending at
    the last query (bottom-right causal), within the model's window. Before that no cache has dropped a token,
    so key ``j`` is token ``j`` (a static cache's unwritten slots lie after every query and drop out by
    causality): causal streaming within the model's window."""
    from tests.models.streaming_oracle import streaming_attention

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs):
        sq, sk = query.shape[2], key.shape[2]
        p = position_ids[0, -sq:][:, None]
        if int(p[0]) >= model_window - 1:
            j = p[-1] - (sk - 1 - torch.arange(sk))[None, :]     # the cache's tokens, ending at the last query
            keep = (j <= p) & (p - j < model_window)
            return streaming_attention(module, query, key, value, keep[None, None], scaling=scaling, sink=0,
                                       window=sk + sq + 1)
        j = torch.arange(sk)[None, :]
        keep = (j <= p) & (p - j < model_window) & ((j < sink) | (p - j < window))
        return streaming_attention(module, query, key, value, keep[None, None], scaling=scaling, sink=sk,
                                   window=sk + sq + 1)
    return attend


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_model_with_its_own_sliding_window_decodes_by_the_spec(cache, eager_lowering):
    """Mistral with its own sliding window of 16 and a prompt of 8: decode steps apply the form until the first
    query reaches position 15; from then on the cache may have dropped token 0 and the steps run dense
    (docs/spec.md), as the report says. The static cache places its rows by the mask."""
    import copy

    import transformers

    torch.manual_seed(6)
    model_window = 16
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=model_window)
    model = transformers.MistralForCausalLM(cfg).eval()
    name = f"sparsecc_test_own_window_{model_window}"
    transformers.AttentionInterface.register(name, _sliding_window_oracle(model_window, SINK, WINDOW))
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(name)
    ids = torch.randint(0, 128, (1, 8))   # shorter than the window: the first decode steps apply the form
    spec = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": SINK,
                                         "window": WINDOW, "policy": "force"}]}
    settings = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        settings["cache_implementation"] = "static"
    with torch.no_grad():
        expected = reference.generate(ids, **settings)
        out = sparsecc.compile(model, spec=spec, kernels="reference").generate(ids, **settings)
    attention = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert all("own sliding window is 16" in s.reason for s in attention)
    # the prefill applies the form; a decode graph of fixed sizes past the window is decided dense at compile time
    assert [s.applied for s in attention if s.shapes["q"][2] > 1] == [True, True]
    for step, (got, want) in enumerate(zip(out.logits, expected.logits)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_the_report_after_generate_keeps_the_prefill_and_the_decode_decisions(eager_lowering):
    """A prefill-only rule: generate() compiles the prefill graph, then recompiles the frame for one-token steps.
    The report of the compile lists the prefill's applied site beside the decode step's dense one (a recompile of
    the same phase replaces its records; one of the other phase does not)."""
    model = _llama()
    spec = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": SINK,
                                         "window": WINDOW, "policy": "force", "phase": "prefill"}]}
    with torch.no_grad():   # a batch of two: the decode steps' FFN inputs are [2, 1, D]
        sparsecc.compile(model, spec=spec, kernels="reference").generate(torch.randint(0, 128, (2, PROMPT)),
                                                                         max_new_tokens=3, do_sample=False)
    sites = sparsecc.last_report().sites
    attention = [s for s in sites if s.kind == "attention"]
    layers = sorted({s.module for s in attention})
    assert len(layers) == 2
    for layer in layers:
        records = [s for s in attention if s.module == layer]
        assert sorted((s.shapes["q"][2] == 1, s.applied) for s in records) == [(False, True), (True, False)]
    for i in range(2):
        ffn = [s.shapes["x"][-2] for s in sites if s.kind == "ffn" and s.module == f"model.layers.{i}.mlp"]
        assert sorted(ffn) == [1, PROMPT]   # the prefill's record and the decode steps' one


def _peaked_llama():
    """A tiny random Llama whose attention is peaked (q and k scaled by 4), so that what the forms leave out
    matters."""
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


def test_a_vertical_slash_decode_step_does_not_depend_on_a_padded_batch_mate(eager_lowering):
    """One query row has no key after it, so a decode step is causal with or without a mask (docs/spec.md,
    vertical_slash): a sequence decodes the same alone (no mask reaches the attention) as beside a left-padded
    batch-mate (the model then passes one), and both are the sparse form, not dense attention."""
    model = _peaked_llama()
    prompt, pad = 260, 20
    ids = torch.randint(1, 128, (2, prompt))
    attention_mask = torch.ones(2, prompt, dtype=torch.long)
    ids[0, :pad], attention_mask[0, :pad] = 0, 0
    spec = {"version": 1, "attention": [{"form": "vertical_slash", "last_q": 64, "vertical": 30, "slash": 50,
                                         "block": 32, "policy": "force"}]}
    settings = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)
    compiled = sparsecc.compile(model, spec=spec, kernels="reference")
    with torch.no_grad():
        batch = torch.stack(compiled.generate(ids, attention_mask=attention_mask, **settings).logits, 1)[1]
        alone = torch.stack(compiled.generate(ids[1:], attention_mask=attention_mask[1:], **settings).logits, 1)[0]
        dense = torch.stack(model.generate(ids[1:], attention_mask=attention_mask[1:], **settings).logits, 1)[0]
    decode = [s for s in sparsecc.last_report().sites if s.kind == "attention" and s.shapes["q"][2] == 1]
    assert decode and all(s.applied for s in decode)
    torch.testing.assert_close(alone, batch, atol=1e-5, rtol=1e-5)
    assert (alone[1:] - dense[1:]).abs().max() > 1e-3   # the decode steps ran the sparse form


LEFT_PADDED_FORMS = {
    "streaming": {"form": "streaming", "sink": 4, "window": 24},
    "block_sparse": {"form": "block_sparse", "block": 16, "local_blocks": 1, "global_blocks": 1,
                     "random_blocks": 1, "seed": 5},
    "block_topk": {"form": "block_topk", "block": 16, "topk": 2},
    "vertical_slash": {"form": "vertical_slash", "last_q": 16, "vertical": 30, "slash": 50, "block": 16},
}


@pytest.mark.parametrize("form, cache", [(form, cache) for form in sorted(LEFT_PADDED_FORMS)
                                         for cache in ("dynamic", "static")])
def test_a_left_padded_sequence_generates_as_it_does_alone(form, cache, eager_lowering):
    """docs/spec.md, "Left padding" and "Right padding": transformers left-pads a batch to its longest prompt; the
    padded sequence's logits (prefill and every decode step) equal its logits alone, and both are the sparse
    form's. A static cache's unwritten tail is right padding, so the dynamic forms run there too."""
    model = _peaked_llama()
    prompt, pad = 150, 37
    ids = torch.randint(1, 128, (2, pad + prompt), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(ids)
    ids[0, :pad], attention_mask[0, :pad] = 0, 0
    spec = {"version": 1, "attention": [dict(LEFT_PADDED_FORMS[form], policy="force")]}
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0)
    if cache == "static":
        settings["cache_implementation"] = "static"
    compiled = sparsecc.compile(model, spec=spec, kernels="reference")
    with torch.no_grad():
        batch = torch.stack(compiled.generate(ids, attention_mask=attention_mask, **settings).logits, 1)[0]
        report = sparsecc.last_report()
        alone = torch.stack(compiled.generate(ids[:1, pad:], **settings).logits, 1)[0]
        dense = torch.stack(model.generate(ids[:1, pad:], **settings).logits, 1)[0]
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.applied for s in attention if s.shapes["q"][2] > 1)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    assert (alone - dense).abs().max() > 1e-3   # the form left out keys that matter


@pytest.mark.parametrize("form, cache", [("streaming", "dynamic"), ("streaming", "static"),
                                         ("block_sparse", "dynamic")])
def test_a_left_padded_sequence_reaches_the_models_own_window_when_it_does_alone(form, cache, eager_lowering):
    """docs/spec.md, "A model with its own sliding window" with "Left padding": Mistral's cache keeps its last
    ``W - 1`` tokens, and a decode step runs the model's dense attention once its query sits at ``W - 1``, counted
    from the sequence's first token. A prompt left-padded by 20 beside a longer one switches at the same step as
    alone (counted on the key axis it would switch 20 steps earlier), and until then it runs the form: its logits
    equal its logits alone at every step, and for streaming both equal the float oracle of that rule."""
    import copy

    torch.manual_seed(4)
    model_window, sink, window = 40, 4, 8
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     sliding_window=model_window)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():   # peaked attention, so that what the forms leave out matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    prompt, pad, new = 24, 20, 20   # alone, the first query reaches W - 1 = 39 at step 16; on the key axis, at 0
    ids = torch.randint(1, 128, (2, pad + prompt), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(ids)
    ids[0, :pad], attention_mask[0, :pad] = 0, 0
    rule = dict(LEFT_PADDED_FORMS[form], policy="force")
    if form == "streaming":
        rule.update(sink=sink, window=window)
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    if cache == "static":
        settings["cache_implementation"] = "static"
    compiled = sparsecc.compile(model, spec={"version": 1, "attention": [rule]}, kernels="reference")
    with torch.no_grad():
        batch = torch.stack(compiled.generate(ids, attention_mask=attention_mask, **settings).logits, 1)[0]
        report = sparsecc.last_report()
        alone = torch.stack(compiled.generate(ids[:1, pad:], **settings).logits, 1)[0]
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.applied and "own sliding window is 40" in s.reason for s in attention)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    if form == "streaming":
        name = f"sparsecc_test_own_window_{model_window}_{sink}_{window}"
        transformers.AttentionInterface.register(name, _sliding_window_oracle(model_window, sink, window))
        reference = copy.deepcopy(model)
        reference.set_attn_implementation(name)
        with torch.no_grad():
            expected = torch.stack(reference.generate(ids[:1, pad:], **settings).logits, 1)[0]
        torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["block_topk", "vertical_slash", "block_sparse"])
def test_a_right_padded_sequence_scores_as_it_does_alone(form, eager_lowering):
    """docs/spec.md, "Right padding": a batch right-padded to its longest sequence (how a batch is scored) gives a
    sequence's real positions the logits it has alone: the dynamic forms estimate from its own rows and keys
    (vertical_slash's last rows are its last tokens, not padding), and both are the sparse form's."""
    model = _peaked_llama()
    length, pad = 300, 37
    ids = torch.randint(1, 128, (2, length + pad), generator=torch.Generator().manual_seed(5))
    attention_mask = torch.ones_like(ids)
    ids[0, length:], attention_mask[0, length:] = 0, 0
    rule = dict(LEFT_PADDED_FORMS[form], policy="force")
    if form == "vertical_slash":   # budgets past the forced columns (30) and diagonals (100): the estimate picks
        rule.update(vertical=40, slash=110)
    compiled = sparsecc.compile(model, spec={"version": 1, "attention": [rule]}, kernels="reference")
    with torch.no_grad():
        batch = compiled(ids, attention_mask=attention_mask).logits[0, :length]
        report = sparsecc.last_report()
        alone = compiled(ids[:1, :length]).logits[0]
        dense = model(ids[:1, :length]).logits[0]
    attention = [s for s in report.sites if s.kind == "attention"]
    assert attention and all(s.applied for s in attention)
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
    assert (alone - dense).abs().max() > 1e-3   # the form left out keys that matter
