"""Hypothesis strategies for models, specs and shapes (the one place tests draw them from)."""

from hypothesis import strategies as st

from tests import zoo


@st.composite
def block_configs(draw):
    """A random transformer block: sizes, GQA grouping, spellings, bias, dtype, batch and sequence length."""
    head_dim = draw(st.sampled_from([4, 8, 16]))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    return {
        "attn_cls": draw(st.sampled_from(zoo.ATTENTION_SPELLINGS)),
        "ffn_cls": draw(st.sampled_from(zoo.FFN_SPELLINGS)),
        "hidden": heads * head_dim,
        "heads": heads,
        "kv_heads": kv_heads,
        "inner": draw(st.sampled_from([16, 48])),
        "bias": draw(st.booleans()),
        "batch": draw(st.integers(1, 2)),
        "seq": draw(st.integers(1, 37)),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


@st.composite
def attention_rules(draw):
    """A streaming or block_sparse attention rule (force policy comes from the spec defaults)."""
    if draw(st.booleans()):
        return {"form": "streaming", "sink": draw(st.integers(0, 6)), "window": draw(st.integers(1, 12))}
    return {"form": "block_sparse", "block": draw(st.sampled_from([4, 8])),
            "local_blocks": draw(st.integers(1, 3)), "global_blocks": draw(st.integers(0, 2))}


@st.composite
def ffn_rules(draw):
    """An activation_threshold rule with a threshold."""
    return {"form": "activation_threshold", "mode": draw(st.sampled_from(["input", "gate"])),
            "threshold": draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))}
