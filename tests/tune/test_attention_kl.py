"""The KL judge of attention forms: masked attention against a float64 oracle, KL, exact knapsack, uniform fallback."""

import itertools
import math

import pytest
import torch

from sparsecc.forms import BlockTopK, Dense, Streaming
from sparsecc.tune import attention_kl as ak
from sparsecc.tune import attention_replay as ar

transformers = pytest.importorskip("transformers")

SEQ = 40
ORACLE = "sparsecc_test_oracle"


def _llama(seed=0, dtype=torch.float32):
    """A 2-layer random Llama (hidden 32, 4 heads, 2 KV heads, vocab 61) with weights large enough that attention is
    peaked and narrowing it moves the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.25, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval().to(dtype)


def _ids(seed=1, n=SEQ):
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed))


def _oracle_keep(form, p, j):
    """docs/spec.md, causal attention: dense keeps j <= p; streaming keeps j <= p and (j < sink or p - j < window)."""
    if j > p:
        return False
    if isinstance(form, Dense):
        return True
    return j < form.sink or p - j < form.window


def _oracle_attention(q, k, v, forms, scale):
    """Float64 attention with explicit per-entry keep masks: q [B, H, Sq, D], k/v [B, Hkv, Sk, D] -> [B, H, Sq, D]."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    rep = h // k.shape[1]
    out = torch.zeros(b, h, sq, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        mask = torch.tensor([[_oracle_keep(forms[head], i + sk - sq, j) for j in range(sk)] for i in range(sq)])
        scores = (q[:, head] @ k[:, head // rep].transpose(-1, -2)) * scale
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out[:, head] = probs @ v[:, head // rep]
    return out


def test_keep_attention_matches_the_oracle_with_gqa_and_fewer_queries_than_keys():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64)   # 5 queries at positions 11..15
    k = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 16, 8, generator=g, dtype=torch.float64)
    forms = [Streaming(2, 3), Dense(), Streaming(0, 1), Streaming(4, 6), Streaming(2, 3), Dense()]

    class Module:
        num_key_value_groups = 2
        is_causal = True

    module = Module()
    setattr(module, ar._KEEP_ATTR, forms)
    out, _ = ar.keep_attention(module, q, k, v, None, scaling=0.4)
    expected = _oracle_attention(q, k, v, forms, 0.4).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert (out - expected_dense(q, k, v)).abs().max() > 1e-2   # the narrow heads changed their rows
    # without forms the call is transformers' own causal SDPA (checked where Sq = Sk, the replay's case)
    full_q = torch.randn(2, 6, 16, 8, generator=g, dtype=torch.float64)
    dense, _ = ar.keep_attention(Module(), full_q, k, v, None, scaling=0.4)
    torch.testing.assert_close(dense, expected_dense(full_q, k, v), atol=1e-12, rtol=1e-12)


def expected_dense(q, k, v):
    return _oracle_attention(q, k, v, [Dense()] * q.shape[1], 0.4).transpose(1, 2)


def test_replay_with_forms_matches_a_float64_oracle_llama():
    from transformers import AttentionInterface
    model = _llama(dtype=torch.float64)
    ids = _ids()
    forms = {0: [Streaming(1, 4)] * 4, 1: [Streaming(2, 5), Dense(), Streaming(0, 3), Streaming(4, 9)]}

    def oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
        return _oracle_attention(query, key, value, forms[module.layer_idx], scaling).transpose(1, 2), None

    AttentionInterface.register(ORACLE, oracle)
    old = model.config._attn_implementation

    def oracle_logits():
        """The model's logits with the oracle as its attention function (the current ``forms``)."""
        model.config._attn_implementation = ORACLE
        try:
            with torch.no_grad():
                return model(input_ids=ids[None], use_cache=False).logits[0, :-1]
        finally:
            model.config._attn_implementation = old

    expected = oracle_logits()
    cache = ar.dense_pass(model, ids, topk=None)
    with torch.no_grad():
        got = model.lm_head(ar.replay(model, cache, 0, forms))
        dense = model(input_ids=ids[None], use_cache=False).logits[0, :-1]
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    assert (expected - dense).abs().max() > 1e-2   # the forms changed the logits: the comparison is not vacuous
    # a replay from layer 1 with only layer 1's forms equals the oracle with layer 0 dense
    forms[0] = [Dense()] * 4
    expected = oracle_logits()
    with torch.no_grad():
        got = model.lm_head(ar.replay(model, cache, 1, {1: forms[1]}))
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("topk", [None, 8])
def test_kl_of_dense_is_zero_and_of_a_narrow_window_is_not(topk):
    model = _llama()
    cache = ar.dense_pass(model, _ids(), topk=topk)
    assert ar.measure_kl(model, [cache], {0: [Dense()] * 4}) == 0.0
    assert ar.measure_kl(model, [cache], {1: [Dense()] * 4}) == 0.0
    # a window holding every key keeps everything: the masked path gives the dense distribution
    assert ar.measure_kl(model, [cache], {0: [Streaming(0, SEQ)] * 4}) < 1e-9
    narrow = ar.measure_kl(model, [cache], {0: [Streaming(1, 2)] * 4})
    assert narrow > 1e-4


def test_full_vocabulary_kl_is_the_definition():
    model = _llama()
    ids = _ids()
    cache = ar.dense_pass(model, ids, topk=None)
    forms = {1: [Streaming(1, 3)] * 4}
    got = ar.measure_kl(model, [cache], forms)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0, :-1].double(), -1)
        q = torch.log_softmax(model.lm_head(ar.replay(model, cache, 1, forms)).double(), -1)
    assert got == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-5)
    # the top-k form compares k tokens and one bucket: a lower bound of the full KL
    assert ar.measure_kl(model, [ar.dense_pass(model, ids, topk=5)], forms) <= got + 1e-12


def _brute_force(kl, density, weights, budget):
    best = None
    for picks in itertools.product(range(len(kl[0])), repeat=len(kl)):
        d = sum(w * density[g][c] for g, (c, w) in enumerate(zip(picks, weights))) / sum(weights)
        if d > budget + 1e-12:
            continue
        k = sum(kl[g][c] for g, c in enumerate(picks))
        if best is None or (k, d) < best[:2]:
            best = (k, d, list(picks))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_is_the_brute_force_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    groups, options = 5, 4
    kl = [[0.0] + sorted(torch.rand(options - 1, generator=g).tolist(), reverse=True) for _ in range(groups)]
    density = [[1.0] + sorted(torch.rand(options - 1, generator=g).mul(0.8).tolist()) for _ in range(groups)]
    weights = [1, 3, 2, 1, 2]
    for budget in (0.3, 0.45, 0.6, 0.8, 1.0):
        lowest = sum(w * min(d) for w, d in zip(weights, density)) / sum(weights)
        if lowest > budget:
            with pytest.raises(ValueError, match="budget"):
                ak.allocate(kl, density, weights, budget)
            continue
        picks = ak.allocate(kl, density, weights, budget)
        k, d, expected = _brute_force(kl, density, weights, budget)
        got_d = sum(w * density[i][c] for i, (c, w) in enumerate(zip(picks, weights))) / sum(weights)
        assert got_d <= budget + 1e-12
        assert sum(kl[i][c] for i, c in enumerate(picks)) == pytest.approx(k, abs=1e-12)
        assert picks == expected


def test_allocate_beats_the_lagrangian_on_a_hand_made_table():
    # Two equal layers; options dense (density 1, KL 0), a (0.5, 1.0), b (0.1, 1.1); budget: mean density 0.55.
    # dense + b (0.55, KL 1.1) is the optimum. A price on density gives both layers the same option, so a
    # Lagrangian choice is a + a (0.5, KL 2.0) at best.
    kl = [[0.0, 1.0, 1.1], [0.0, 1.0, 1.1]]
    density = [[1.0, 0.5, 0.1], [1.0, 0.5, 0.1]]
    assert sorted(ak.allocate(kl, density, [1, 1], 0.55)) == [0, 2]
    assert ak.allocate(kl, density, [1, 1], 1.0) == [0, 0]
    assert ak.allocate(kl, density, [1, 1], 0.1) == [2, 2]


@pytest.mark.parametrize("seed", range(4))
def test_allocate_never_picks_a_not_allowed_option(seed):
    """+inf KL marks an option a group may not take: the result is the brute-force optimum over the allowed
    options, and the budget is judged with the sparsest allowed option of each group."""
    g = torch.Generator().manual_seed(seed)
    groups, options = 5, 4
    kl = [[0.0] + sorted(torch.rand(options - 1, generator=g).tolist(), reverse=True) for _ in range(groups)]
    density = [[1.0] + sorted(torch.rand(options - 1, generator=g).mul(0.8).tolist()) for _ in range(groups)]
    weights = [1, 3, 2, 1, 2]
    barred = {(0, 3), (2, 1), (2, 3), (4, 2)}
    allowed_kl = [[float("inf") if (i, c) in barred else v for c, v in enumerate(row)] for i, row in enumerate(kl)]
    priced = [[1e6 if (i, c) in barred else v for c, v in enumerate(row)] for i, row in enumerate(kl)]
    checked = 0
    for budget in (0.45, 0.6, 0.8, 1.0):
        lowest = sum(w * min(d for c, d in enumerate(density[i]) if (i, c) not in barred)
                     for i, w in enumerate(weights)) / sum(weights)
        if lowest > budget:
            with pytest.raises(ValueError, match="cannot be met"):
                ak.allocate(allowed_kl, density, weights, budget)
            continue
        picks = ak.allocate(allowed_kl, density, weights, budget)
        assert not any((i, c) in barred for i, c in enumerate(picks))
        assert picks == _brute_force(priced, density, weights, budget)[2]   # barred options priced out of reach
        checked += 1
    assert checked >= 2


def test_allocate_needs_an_allowed_option_per_group():
    with pytest.raises(ValueError, match=r"groups \[1\] have no allowed option"):
        ak.allocate([[0.0, 1.0], [float("inf"), float("inf")]], [[1.0, 0.1], [1.0, 0.1]], [1, 1], 0.5)
    with pytest.raises(ValueError, match="finite"):
        ak.allocate([[0.0, -float("inf")]], [[1.0, 0.1]], [1], 0.5)


def test_hold_dense_bars_block_topk_in_layers_with_held_heads():
    cands = [Dense(), Streaming(64, 64), BlockTopK(block=64, topk=2, sink_blocks=1, local_blocks=1)]
    dens = torch.tensor([[ak.form_density(c, 2048) for c in cands]] * 3, dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.5, 0.1], [0.0, 0.01, 0.005], [0.0, 0.02, 0.01]], dtype=torch.float64)
    table = ak.KLTable(ak.make_groups(3, 2, 2, "layer"), cands, kl, dens, [2, 2, 2])
    reduced, _ = ak.hold_dense(table, [(0, 1)], 0.5, 3, 2)
    assert math.isinf(float(reduced.kl[0, 2])) and float(reduced.kl[0, 1]) == 0.5
    torch.testing.assert_close(reduced.kl[1:], kl[1:])
    assert float(table.kl[0, 2]) == 0.1   # the measured table itself is unchanged


def test_allocate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="budget=0 "):
        ak.allocate([[0.0]], [[1.0]], [1], 0)
    with pytest.raises(ValueError, match="budget=0.5 cannot be met"):
        ak.allocate([[0.0]], [[1.0]], [1], 0.5)
    with pytest.raises(ValueError, match="finite"):
        ak.allocate([[0.0, float("nan")]], [[1.0, 0.1]], [1], 0.5)
    with pytest.raises(ValueError, match="one table"):
        ak.allocate([[0.0, 1.0]], [[1.0]], [1], 0.5)


CTX = 2048
CANDS = [Dense(), Streaming(64, 64), Streaming(64, 512)]


def _scripted_table(layers=3, heads=2):
    groups = ak.make_groups(layers, heads, heads, "layer")
    dens = torch.tensor([[ak.form_density(c, CTX) for c in CANDS]] * layers, dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.5, 0.1], [0.0, 0.01, 0.005], [0.0, 0.02, 0.01]], dtype=torch.float64)
    return ak.KLTable(groups, CANDS, kl, dens, [heads] * layers)


def _is_uniform(forms_by_layer, layers=3):
    forms = [f for layer in range(layers) for f in forms_by_layer.get(layer, [Dense()])]
    return len(set(forms)) == 1 and isinstance(forms[0], Streaming) and forms[0].sink == ak.UNIFORM_SINK


@pytest.mark.parametrize("uniform_kl, used", [(0.5, "uniform"), (1.0, "uniform"), (1.5, "allocation")])
def test_uniform_is_returned_when_it_measures_no_worse(uniform_kl, used):
    table = _scripted_table()
    measured = []

    def measure(forms_by_layer):
        measured.append(forms_by_layer)
        return uniform_kl if _is_uniform(forms_by_layer) else 1.0

    result = ak.decide(table, 0.5, CTX, 3, 2, measure)
    assert len(measured) == 2 and result.used == used
    assert result.allocation_kl == 1.0 and result.uniform_kl == uniform_kl
    # the table's choice: layer 0 (costly when narrowed) dense, the others at the narrowest window
    assert [result.allocation[layer][0] for layer in range(3)] == [Dense(), CANDS[1], CANDS[1]]
    assert result.uniform_density <= result.allocation_density + 1e-12
    assert result.uniform_window == ak.uniform_window(result.allocation_density, CTX)
    forms = [c.forms for c in result.choices]
    if used == "uniform":
        assert forms == [[Streaming(ak.UNIFORM_SINK, result.uniform_window)] * 2] * 3
        assert result.density == result.uniform_density
    else:
        assert forms == [[Dense()] * 2, [CANDS[1]] * 2, [CANDS[1]] * 2]
        assert result.density == pytest.approx(result.allocation_density)
    assert [c.site for c in result.choices] == [f"model.layers.{i}.self_attn" for i in range(3)]


def test_tune_by_kl_on_a_tiny_llama_by_kv_group(tmp_path):
    model = _llama()
    ids = _ids(n=64)
    cands = [Streaming(1, 4), Streaming(1, 16)]
    resume = tmp_path / "table.json"
    result = ak.tune_by_kl(model, [ids], 0.75, candidates=cands, grouping="kv", block=8, resume=resume,
                           uniform_sink=1, progress=False)
    table = result.table
    assert table.groups == [(0, (0, 1)), (0, (2, 3)), (1, (0, 1)), (1, (2, 3))] and table.weights == [2] * 4
    assert table.runs == 8 and (table.kl[:, 1:] > 0).all() and (table.kl[:, 0] == 0).all()
    assert result.density <= 0.75 + 1e-12 and result.uniform_density <= result.allocation_density + 1e-12
    assert not math.isnan(result.uniform_kl)
    assert min(result.allocation_kl, result.uniform_kl) == (
        result.allocation_kl if result.used == "allocation" else result.uniform_kl)
    # a rerun reads every entry back from the resume file
    again = ak.tune_by_kl(model, [ids], 0.75, candidates=cands, grouping="kv", block=8, resume=resume,
                          uniform_sink=1, progress=False)
    assert again.table.runs == 0 and torch.equal(again.table.kl, table.kl)
    # the transformers version that wrote the config does not invalidate the table
    model.config.transformers_version = "0.0.1"
    assert ak.tune_by_kl(model, [ids], 0.75, candidates=cands, grouping="kv", block=8, resume=resume,
                         uniform_sink=1, progress=False).table.runs == 0
    # other windows: the resume file is refused, not overwritten
    before = resume.read_text()
    with pytest.raises(ValueError, match="another model, calibration or topk"):
        ak.tune_by_kl(model, [_ids(seed=9, n=64)], 0.75, candidates=cands, grouping="kv", block=8, resume=resume,
                      uniform_sink=1, progress=False)
    assert resume.read_text() == before
    choices = ak.choose_by_kl(model, [ids], 0.75, candidates=cands, grouping="kv", block=8, resume=resume,
                              uniform_sink=1, progress=False)
    assert [c.forms for c in choices] == [c.forms for c in result.choices]
    assert all(math.isnan(r) for c in choices for r in c.recall)


def test_tune_by_kl_rejects_bad_arguments():
    model = _llama()
    ids = _ids()
    with pytest.raises(ValueError, match="grouping='head'"):
        ak.tune_by_kl(model, [ids], 0.5, grouping="head")
    with pytest.raises(ValueError, match="budget=1.5"):
        ak.tune_by_kl(model, [ids], 1.5)
    with pytest.raises(ValueError, match="candidate"):
        ak.tune_by_kl(model, [ids], 0.5, candidates=["streaming"])
    with pytest.raises(ValueError, match="windows"):
        ak.tune_by_kl(model, [], 0.5)
    with pytest.raises(ValueError, match="topk=0"):
        ar.dense_pass(model, ids, topk=0)
    with pytest.raises(ValueError, match="model=Linear"):
        ar.dense_pass(torch.nn.Linear(2, 2), ids)


def test_judged_forms_give_the_logits_of_the_compiled_spec(eager_lowering):
    # What the judge measures is what sparsecc runs: the rules written from a choice, compiled with the reference
    # kernels, give the replay's logits.
    import sparsecc
    from sparsecc.spec import Defaults, Spec
    from sparsecc.tune import attention_rules

    model = _llama()
    ids = _ids()
    forms = {0: [Streaming(1, 4)] * 4, 1: [Streaming(2, 5), Dense(), Streaming(2, 5), Streaming(0, 9)]}
    choices = ak._choices(forms, 2, 4, SEQ, 8, "model.layers.{}.self_attn")
    spec = Spec(defaults=Defaults(policy="force"), attention=tuple(attention_rules(choices)))
    cache = ar.dense_pass(model, ids, topk=None)
    with torch.no_grad():
        replayed = model.lm_head(ar.replay(model, cache, 0, forms))
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")(input_ids=ids[None], use_cache=False)
    applied = {s.module for s in sparsecc.last_report().sites if s.kind == "attention" and s.applied}
    assert applied == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    torch.testing.assert_close(compiled.logits[0, :-1], replayed, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# block_topk candidates


def _oracle_block_topk_keep(q, k, form, scale):
    """docs/spec.md, ``block_topk`` with ``topk``, causal, Sq = Sk: the token keep mask [B, H, S, S] written from the
    text (mean-pooled blocks, estimate scale * qbar . kbar, sink blocks and the local band always kept, the others
    ranked by estimate, ties to the lower block, the first topk kept; then j <= p inside kept blocks)."""
    b, h, s, _ = q.shape
    rep = h // k.shape[1]
    n = -(-s // form.block)
    keep = torch.zeros(b, h, s, s, dtype=torch.bool)
    for bi, head in itertools.product(range(b), range(h)):
        qbar = [q[bi, head, a * form.block:(a + 1) * form.block].double().mean(0) for a in range(n)]
        kbar = [k[bi, head // rep, c * form.block:(c + 1) * form.block].double().mean(0) for c in range(n)]
        for a in range(n):
            allowed = list(range(a + 1))
            forced = [c for c in allowed if c < form.sink_blocks or a - form.local_blocks + 1 <= c <= a]
            others = sorted((c for c in allowed if c not in forced), key=lambda c: (-float(scale * qbar[a] @ kbar[c]), c))
            for c in forced + others[:form.topk]:
                for i in range(a * form.block, min((a + 1) * form.block, s)):
                    for j in range(c * form.block, min((c + 1) * form.block, s)):
                        keep[bi, head, i, j] = j <= i
    return keep


def test_keep_attention_block_topk_matches_the_spec_oracle_with_gqa():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 90, 8, generator=g, dtype=torch.float64)   # 6 blocks of 16, the last one ragged
    k = torch.randn(2, 3, 90, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 90, 8, generator=g, dtype=torch.float64)
    form = BlockTopK(block=16, topk=2, sink_blocks=1, local_blocks=1)

    class Module:
        num_key_value_groups = 2
        is_causal = True

    module = Module()
    setattr(module, ar._KEEP_ATTR, [form] * 6)
    out, _ = ar.keep_attention(module, q, k, v, None, scaling=0.4)
    keep = _oracle_block_topk_keep(q, k, form, 0.4)
    assert not keep.equal(torch.ones(90, 90, dtype=torch.bool).tril().expand_as(keep))   # something was dropped
    assert not keep[0].equal(keep[1])   # the selection depends on the input
    qd, kd, vd = q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = (qd @ kd.transpose(-1, -2) * 0.4).masked_fill(~keep, float("-inf"))
    expected = (torch.softmax(scores, -1) @ vd).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    # block_topk takes one rule for every head of a site
    setattr(module, ar._KEEP_ATTR, [form] * 5 + [Dense()])
    with pytest.raises(ValueError, match="every head"):
        ar.keep_attention(module, q, k, v, None, scaling=0.4)


def test_block_topk_density_is_the_blocks_its_selection_keeps():
    # ctx 300 in 64-blocks: 5 query blocks (the last ragged), 15 causal blocks; sink 1 + local 1 + top 1 keeps
    # 1, 2, 3, 3, 3 blocks of rows 0..4.
    form = BlockTopK(block=64, topk=1, sink_blocks=1, local_blocks=1)
    assert ak.form_density(form, 300) == pytest.approx(12 / 15)
    assert ak.form_density(BlockTopK(block=64, topk=9), 300) == 1.0
    assert ak.form_density(BlockTopK(block=64, topk=2, sink_blocks=0, local_blocks=0), 300) == pytest.approx(9 / 15)
    # the count holds for any input: the footprint of a reference selection on random q, k
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 300, 8, generator=g), torch.randn(1, 1, 300, 8, generator=g)
    from sparsecc.tune.attention import any_blocks, dynamic_mask
    blocks = any_blocks(dynamic_mask(form, q, k, True, 0.3), 64)
    assert blocks.sum().item() == 2 * 12
    with pytest.raises(ValueError, match="topk"):
        ak.form_density(BlockTopK(block=64, cdf=0.9), 300)
    with pytest.raises(ValueError, match="block = 64"):
        ak.form_density(BlockTopK(block=32, topk=2), 300)


def test_tune_by_kl_with_block_topk_candidates_gives_the_compiled_logits(tmp_path, eager_lowering):
    import sparsecc
    from sparsecc.spec import Defaults, Spec
    from sparsecc.tune import attention_rules

    model = _llama()
    ids = _ids(n=128)
    cands = [Streaming(1, 16), BlockTopK(block=16, topk=1, sink_blocks=1, local_blocks=1)]
    result = ak.tune_by_kl(model, [ids], 0.6, candidates=cands, block=16, uniform_sink=1, progress=False)
    table = result.table
    assert table.runs == 4 and (table.kl[:, 1:] > 0).all()
    topk_col = [i for i, c in enumerate(table.candidates) if isinstance(c, BlockTopK)][0]
    assert table.density[0, topk_col].item() == pytest.approx(ak.form_density(cands[1], 128, 16)) == 21 / 36
    assert result.density <= 0.6 + 1e-12
    # a choice holding block_topk compiles to rules whose logits are the replay's
    forms = {0: [cands[1]] * 4, 1: [Streaming(1, 16)] * 4}
    choices = ak._choices(forms, 2, 4, 128, 16, "model.layers.{}.self_attn")
    spec = Spec(defaults=Defaults(policy="force"), attention=tuple(attention_rules(choices)))
    cache = ar.dense_pass(model, ids, topk=None)
    with torch.no_grad():
        replayed = model.lm_head(ar.replay(model, cache, 0, forms))
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")(input_ids=ids[None], use_cache=False)
    sites = {s.module: s for s in sparsecc.last_report().sites if s.kind == "attention"}
    assert sites["model.layers.0.self_attn"].applied and sites["model.layers.1.self_attn"].applied
    torch.testing.assert_close(compiled.logits[0, :-1], replayed, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grouping='kv'"):
        ak.tune_by_kl(model, [ids], 0.6, candidates=cands, grouping="kv", block=16, progress=False)
    with pytest.raises(ValueError, match="topk"):
        ak.tune_by_kl(model, [ids], 0.6, candidates=[BlockTopK(block=16, cdf=0.5)], block=16, progress=False)


@pytest.mark.parametrize("kls, used", [((1.0, 0.5, 0.5), "uniform"), ((1.0, 0.9, 0.4), "uniform_topk"),
                                       ((1.0, 1.2, 1.0), "uniform_topk"), ((0.3, 1.2, 0.6), "allocation")])
def test_uniform_block_topk_is_compared_when_the_table_has_block_topk(kls, used):
    # KLs scripted for (allocation, uniform streaming, uniform block_topk); ties go to a uniform rule.
    cands = [Dense(), Streaming(64, 64), BlockTopK(block=64, topk=4, sink_blocks=1, local_blocks=1)]
    groups = ak.make_groups(3, 2, 2, "layer")
    dens = torch.tensor([[ak.form_density(c, CTX) for c in cands]] * 3, dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.5, 0.1], [0.0, 0.01, 0.005], [0.0, 0.02, 0.01]], dtype=torch.float64)
    table = ak.KLTable(groups, cands, kl, dens, [2] * 3)

    def measure(forms_by_layer):
        forms = {f for layer in range(3) for f in forms_by_layer.get(layer, [Dense()] * 2)}
        if len(forms) == 1 and isinstance(next(iter(forms)), Streaming):
            return kls[1]
        if len(forms) == 1 and isinstance(next(iter(forms)), BlockTopK):
            return kls[2]
        return kls[0]

    result = ak.decide(table, 0.5, CTX, 3, 2, measure)
    assert result.used == used
    topk = result.uniform_topk
    # the largest topk (same sink, band, pool as the candidate) at the allocation's density or lower
    assert topk == BlockTopK(block=64, topk=topk.topk, sink_blocks=1, local_blocks=1)
    assert result.uniform_topk_density <= result.allocation_density + 1e-12
    assert ak.form_density(BlockTopK(block=64, topk=topk.topk + 1), CTX) > result.allocation_density
    assert result.uniform_topk_kl == kls[2]
    forms = [c.forms for c in result.choices]
    expected = {"uniform": [[Streaming(ak.UNIFORM_SINK, result.uniform_window)] * 2] * 3,
                "uniform_topk": [[topk] * 2] * 3}.get(used)
    if expected is not None:
        assert forms == expected
    assert result.density == {"uniform": result.uniform_density, "uniform_topk": result.uniform_topk_density,
                              "allocation": result.allocation_density}[used]
    # without block_topk candidates nothing of the kind is measured
    plain = ak.decide(_scripted_table(), 0.5, CTX, 3, 2, lambda forms: 1.0)
    assert plain.uniform_topk is None and math.isnan(plain.uniform_topk_kl)


def _held_heads_table():
    """A scripted KL table: 3 layers of 2 heads, per-layer groups, candidates dense / window 64 / window 512."""
    cands = [Dense(), Streaming(64, 64), Streaming(64, 512)]
    groups = ak.make_groups(3, 2, 2, "layer")
    dens = torch.tensor([[ak.form_density(c, 2048) for c in cands]] * 3, dtype=torch.float64)
    kl = torch.tensor([[0.0, 0.5, 0.1], [0.0, 0.01, 0.005], [0.0, 0.02, 0.01]], dtype=torch.float64)
    return ak.KLTable(groups, cands, kl, dens, [2, 2, 2])


def test_hold_dense_removes_the_heads_and_gives_the_rest_the_budget_they_leave():
    """The retrieval heads held dense (docs/tune.md, "Attention: retrieval heads") leave their groups and the
    budget."""
    table = _held_heads_table()
    reduced, free = ak.hold_dense(table, [(0, 0), (2, 1)], 0.5, 3, 2)
    assert reduced.groups == [(0, (1,)), (1, (0, 1)), (2, (0,))]
    assert reduced.weights == [1, 2, 1]
    torch.testing.assert_close(reduced.kl, table.kl)
    assert free == pytest.approx((0.5 * 6 - 2) / 4)
    with pytest.raises(ValueError, match="cannot hold 3 dense heads"):
        ak.hold_dense(table, [(0, 0), (0, 1), (1, 0)], 0.4, 3, 2)
    with pytest.raises(ValueError, match="layer 3"):
        ak.hold_dense(table, [(3, 0)], 0.5, 3, 2)


def test_kl_decision_keeps_the_held_heads_dense_and_is_the_best_within_budget():
    """The knapsack over the other heads, against brute force over every per-layer choice (docs/tune.md: least
    summed KL with the mean block density over all heads at most the budget)."""
    table, budget, held = _held_heads_table(), 0.45, [(0, 1)]
    reduced, free = ak.hold_dense(table, held, budget, 3, 2)

    def measure(forms_by_layer):   # the uniform rule (one form on every head) measures worse
        return 1.0 if len({f for fs in forms_by_layer.values() for f in fs}) == 1 else 0.0

    result = ak.decide(reduced, free, 2048, 3, 2, measure)
    assert result.used == "allocation"
    forms = [c.forms for c in result.choices]
    assert isinstance(forms[0][1], Dense)
    d = table.density
    best = None
    for picks in itertools.product(range(3), repeat=3):
        heads = [[picks[0], "held"], [picks[1], picks[1]], [picks[2], picks[2]]]
        mean = sum(1.0 if c == "held" else float(d[0, c]) for row in heads for c in row) / 6
        if mean <= budget + 1e-12:
            cost = float(table.kl[0, picks[0]] + table.kl[1, picks[1]] + table.kl[2, picks[2]])
            if best is None or cost < best[0] - 1e-15:
                best = (cost, picks)
    expected = [[table.candidates[best[1][0]], Dense()], [table.candidates[best[1][1]]] * 2,
                [table.candidates[best[1][2]]] * 2]
    assert forms == expected
    assert result.allocation_density <= budget + 1e-12
