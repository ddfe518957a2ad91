"""Retrieval heads (docs/tune.md): scores against transformers' own attention probabilities, the coverage rule,
and the dense/streaming split at a block-density budget."""

import math

import pytest
import torch

from sparsecc.forms import Dense, Streaming
from sparsecc.tune import attention_kl as ak
from sparsecc.tune import attention_replay as ar
from sparsecc.tune import retrieval as rt
from sparsecc.tune.needle import NeedleTrial

transformers = pytest.importorskip("transformers")

SEQ = 48


def _llama(attn="sdpa", seed=0):
    """A 3-layer random Llama (hidden 32, 4 heads, 2 KV heads): GQA and peaked attention."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.25, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _trial(seed, span, answer=3):
    ids = torch.randint(0, 61, (SEQ,), generator=torch.Generator().manual_seed(seed))
    return NeedleTrial(ids, SEQ - answer, 0.5, "", span)


def test_scores_equal_the_models_own_attention_probabilities():
    """docs/tune.md: per head, attention probability on the value span, summed over the span, averaged over the
    rows predicting the answer (answer_start - 1 .. ctx - 2) and over the trials. The expected values come from the
    eager attention's returned probabilities (transformers' own softmax), not from sparsecc."""
    model = _llama()
    trials = [_trial(1, (10, 13)), _trial(2, (30, 32), answer=4)]
    got = rt.retrieval_scores(model, trials, progress=False)

    eager = _llama("eager")
    eager.load_state_dict(model.state_dict())
    expected = torch.zeros(3, 4, dtype=torch.float64)
    with torch.no_grad():
        for t in trials:
            att = eager(input_ids=t.ids[None], output_attentions=True, use_cache=False).attentions
            rows = slice(t.answer_start - 1, SEQ - 1)
            for layer, a in enumerate(att):   # [1, H, S, S]
                expected[layer] += a[0, :, rows, t.value_span[0]:t.value_span[1]].double().sum(-1).mean(-1)
    expected /= len(trials)
    assert got.shape == (3, 4)
    assert expected.abs().max() > 0.02   # the span holds real attention mass: the comparison is not of zeros
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"     # the model's attention setting is restored


def test_scores_leave_the_forward_unchanged():
    model = _llama()
    ids = _trial(3, (5, 8)).ids
    with torch.no_grad():
        before = model(input_ids=ids[None], use_cache=False).logits
        state = rt._Scoring(torch.zeros(3, 4, dtype=torch.float64), (SEQ - 4, SEQ - 1), (5, 8))
        with rt._scoring(model, state):
            during = model(input_ids=ids[None], use_cache=False).logits
    torch.testing.assert_close(during, before)
    assert state.scores.abs().sum() > 0


def test_scores_reject_hand_built_trials_without_a_span():
    model = _llama()
    with pytest.raises(ValueError, match="value_span"):
        rt.retrieval_scores(model, [_trial(1, (0, 0))], progress=False)
    with pytest.raises(ValueError, match="trials"):
        rt.retrieval_scores(model, [], progress=False)


def test_coverage_takes_the_fewest_top_heads():
    scores = torch.tensor([[0.05, 0.40, 0.0], [0.30, 0.05, 0.20]], dtype=torch.float64)   # total 1.0
    assert rt.retrieval_heads(scores, 0.4) == [(0, 1)]
    assert rt.retrieval_heads(scores, 0.41) == [(0, 1), (1, 0)]
    assert rt.retrieval_heads(scores, 0.9) == [(0, 1), (1, 0), (1, 2)]
    assert rt.retrieval_heads(scores, 0.95) == [(0, 1), (1, 0), (1, 2), (0, 0)]
    assert rt.retrieval_heads(scores, 1.0) == [(0, 1), (1, 0), (1, 2), (0, 0), (1, 1)]   # never the zero head
    assert rt.retrieval_heads(scores, 0.0) == []
    with pytest.raises(ValueError, match="coverage"):
        rt.retrieval_heads(scores, 1.5)


def _density(form, ctx, block=64):
    """Kept 64 x 64 blocks over causal blocks, from docs/spec.md's streaming rule written out entry by entry."""
    p = torch.arange(ctx)[:, None]
    j = torch.arange(ctx)[None, :]
    keep = (j <= p) & ((j < form.sink) | (p - j < form.window))
    n = math.ceil(ctx / block)
    padded = torch.zeros(n * block, n * block, dtype=torch.bool)
    padded[:ctx, :ctx] = keep
    blocks = padded.view(n, block, n, block).any(3).any(1)
    return float(blocks.sum()) / (n * (n + 1) // 2)


def test_split_keeps_the_dense_heads_and_the_widest_window_in_budget():
    ctx, budget = 2048, 0.4
    dense = [(0, 1), (2, 3)]
    tuned = rt.split_forms(3, 4, dense, ctx, budget, sink=64)
    forms = {(l, h): f for l, c in enumerate(tuned.choices) for h, f in enumerate(c.forms)}
    assert all(isinstance(forms[x], Dense) for x in dense)
    others = [f for x, f in forms.items() if x not in dense]
    assert len(set(others)) == 1 and isinstance(others[0], Streaming)
    window = others[0].window
    assert window % 16 == 0 and window == tuned.window
    mean = lambda w: (len(dense) + 10 * _density(Streaming(64, w), ctx)) / 12   # noqa: E731
    assert mean(window) <= budget < mean(window + 16)      # the widest window the budget holds
    assert tuned.density == pytest.approx(mean(window), abs=1e-12)
    assert [c.site for c in tuned.choices] == [f"model.layers.{i}.self_attn" for i in range(3)]


def test_split_rejects_a_budget_too_small_for_the_dense_heads():
    with pytest.raises(ValueError, match="cannot hold 6 dense heads"):
        rt.split_forms(3, 4, [(0, h) for h in range(4)] + [(1, 0), (1, 1)], 2048, 0.3)
    with pytest.raises(ValueError, match="layers of"):
        rt.split_forms(3, 4, [(3, 0)], 2048, 0.3)


def test_tuned_split_compiles_to_what_the_forms_say(eager_lowering):
    """The split becomes a spec whose rules name the streaming heads only; compiled with the reference kernels,
    every attention site is rewritten and the logits equal the forms applied through the KL judge's masked
    attention (checked against a float64 oracle in tests/tune/test_attention_kl.py)."""
    import sparsecc
    from sparsecc.spec import Defaults, Spec
    from sparsecc.tune.tuner import attention_rules

    model = _llama()
    tuned = rt.split_forms(3, 4, [(1, 2)], SEQ, 0.95, sink=4, block=8)
    assert tuned.window < SEQ - 4    # the streaming heads drop keys
    spec = Spec(defaults=Defaults(policy="force"), attention=tuple(attention_rules(tuned.choices)))
    assert [r.heads for r in spec.attention] == [None, (0, 1, 3), None]   # layer 1's head 2 is dense: no rule
    ids = _trial(5, (5, 8)).ids
    forms = {layer: c.forms for layer, c in enumerate(tuned.choices)}
    cache = ar.dense_pass(model, ids, topk=None)
    with torch.no_grad():
        replayed = model.lm_head(ar.replay(model, cache, 0, forms))
        dense = model(input_ids=ids[None], use_cache=False).logits
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")(input_ids=ids[None], use_cache=False)
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "attention" and s.applied}
    assert applied == {f"model.layers.{i}.self_attn" for i in range(3)}
    assert not torch.allclose(compiled.logits, dense, atol=1e-3)    # the window is narrower than the sequence
    torch.testing.assert_close(compiled.logits[0, :-1], replayed, atol=1e-5, rtol=1e-5)


class _PrefixTokenizer:
    """One token per character, plus a marker token in front of every call (as SentencePiece's word-start marker
    would): the value tokenised alone never occurs inside the needle's tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1] + [ord(c) % 128 for c in text]}


def test_trials_record_no_span_when_the_value_tokenises_differently_and_scores_refuse_them():
    from sparsecc.tune.needle import needle_trials
    from tests.quality.test_needle import CharTokenizer, _text

    trials = needle_trials(_PrefixTokenizer(), _text(), ctx=SEQ * 8, trials=3, seed=0)
    assert all(t.value_span == (0, 0) for t in trials)
    exact = needle_trials(CharTokenizer(), _text(), ctx=SEQ * 8, trials=3, seed=0)
    assert all(t.value_span != (0, 0) for t in exact)
    with pytest.raises(ValueError, match=r"value_span=\(0, 0\)"):
        rt.retrieval_scores(_llama(), trials[:1], progress=False)


def test_scoring_restores_the_model_after_an_error():
    model = _llama()
    bad = NeedleTrial(torch.tensor([70] * SEQ), SEQ - 3, 0.5, "", (5, 8))   # token 70 is outside the vocabulary
    with pytest.raises(Exception):
        rt.retrieval_scores(model, [bad], progress=False)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(layer.self_attn, rt._STATE_ATTR) for layer in model.model.layers)


def test_scores_refuse_models_without_plain_causal_attention():
    model = _llama()
    model.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        rt.retrieval_scores(model, [_trial(1, (5, 8))], progress=False)


def test_heads_refuse_scores_that_are_not_finite_non_negative_tables():
    with pytest.raises(ValueError, match="non-negative"):
        rt.retrieval_heads(torch.tensor([[0.5, float("nan")]]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        rt.retrieval_heads(torch.tensor([[0.5, -0.1]]), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        rt.retrieval_heads(torch.tensor([0.5, 0.1]), 0.5)


def test_split_rejects_a_positive_target_below_the_narrowest_window():
    # 3 of 12 heads dense at budget 0.3: the other 9 would need (3.6 - 3) / 9 = 0.067, under window 16's density.
    assert _density(Streaming(64, 16), 2048) > (0.3 * 12 - 3) / 9 > 0
    with pytest.raises(ValueError, match="cannot hold 3 dense heads"):
        rt.split_forms(3, 4, [(0, 0), (1, 1), (2, 2)], 2048, 0.3)
    with pytest.raises(ValueError, match="dense=12 heads of 12"):
        rt.split_forms(3, 4, [(l, h) for l in range(3) for h in range(4)], 2048, 0.9)


def test_uniform_window_ends_when_ctx_is_not_a_multiple_of_16():
    from sparsecc.tune.attention_kl import uniform_window

    window = uniform_window(1.0, 1001)          # every window fits: the widest multiple of 16 the search reaches
    assert window % 16 == 0 and window >= 1001 - 16
    assert _density(Streaming(64, uniform_window(0.5, 1001)), 1001) <= 0.5


def test_kl_judge_takes_block_topk_only_in_layers_without_held_heads():
    """block_topk needs one rule for every head of a site: with layer 0's head 0 held dense, layer 0 gets no
    block_topk entry in the table (KL +inf, not measured) while layer 1's is measured, and the choice for layer 0
    keeps head 0 dense."""
    from sparsecc.forms import BlockTopK

    topk = BlockTopK(block=16, topk=1, sink_blocks=1, local_blocks=1)
    result = ak.tune_by_kl(_llama(), [_trial(1, (5, 8)).ids], 1.0, candidates=[Streaming(4, 8), topk],
                           dense_heads=[(0, 0)], block=16, progress=False)
    table = result.table
    c = table.candidates.index(topk)
    rows = {layer: g for g, (layer, _) in enumerate(table.groups)}
    assert math.isinf(float(table.kl[rows[0], c]))
    assert math.isfinite(float(table.kl[rows[1], c])) and math.isfinite(float(table.kl[rows[2], c]))
    assert table.runs == 5   # streaming in the 3 layers, block_topk in layers 1 and 2 only
    layer0 = result.allocation.get(0)
    assert layer0 is not None and isinstance(layer0[0], Dense)
    assert not any(isinstance(f, BlockTopK) for f in layer0)
