"""``Spec.matching`` / ``Spec.resolve`` with a site's query count: the phase rules of docs/spec.md.

docs/spec.md ("Rules", ``phase``): "prefill" covers sites with more than one query row (a symbolic count counts as
more than one), "decode" sites with exactly one, "both" everywhere; a rule whose phase excludes a site does not
cover it at all. ("How a site finds its rule"): the later rule overrides the earlier ones, per head.
"""

import sympy as sp

from sparsecc import load_spec
from sparsecc.forms import Dense, Streaming

SPEC = load_spec({"version": 1, "attention": [
    {"form": "streaming", "sink": 4, "window": 64},                                   # 0: both, every head
    {"form": "streaming", "sink": 8, "window": 128, "phase": "prefill"},              # 1: prefill, every head
    {"form": "dense", "heads": [0], "phase": "decode"},                               # 2: decode, head 0
    {"form": "streaming", "sink": 1, "window": 16, "heads": [1, 9], "phase": "prefill"},  # 3: prefill, heads 1, 9
]})


def test_without_a_query_count_every_phase_counts():
    assert [r.index for r in SPEC.matching("attention", "layers.0.attn")] == [0, 1, 2, 3]
    assert SPEC.resolve("attention", "layers.0.attn").index == 1
    assert SPEC.resolve("attention", "layers.0.attn", head=0).index == 2


def test_a_decode_site_sees_only_decode_and_both_rules():
    assert [r.index for r in SPEC.matching("attention", "layers.0.attn", 1)] == [0, 2]
    assert SPEC.resolve("attention", "layers.0.attn", seq_q=1).index == 0
    assert SPEC.resolve("attention", "layers.0.attn", 0, 1).form == Dense()
    assert SPEC.resolve("attention", "layers.0.attn", 1, 1).form == Streaming(4, 64)


def test_a_prefill_site_sees_only_prefill_and_both_rules():
    for seq_q in (2, 4096, sp.Symbol("s", positive=True, integer=True)):
        assert [r.index for r in SPEC.matching("attention", "layers.0.attn", seq_q)] == [0, 1, 3]
        assert SPEC.resolve("attention", "layers.0.attn", 0, seq_q).form == Streaming(8, 128)
        assert SPEC.resolve("attention", "layers.0.attn", 1, seq_q).form == Streaming(1, 16)
        assert SPEC.resolve("attention", "layers.0.attn", 2, seq_q).form == Streaming(8, 128)


def test_no_rule_in_force_resolves_to_none():
    decode_only = load_spec({"version": 1, "attention": [{"form": "streaming", "sink": 4, "window": 64,
                                                          "phase": "decode"}]})
    assert decode_only.matching("attention", "a", 7) == []
    assert decode_only.resolve("attention", "a", 0, 7) is None
    assert decode_only.resolve("attention", "a", 0, 1).form == Streaming(4, 64)
    assert decode_only.resolve("ffn", "a") is None
