"""Per-head attention form choice: recall and density on synthetic attention, and the density budget."""

import pytest
import torch

from sparsecc.forms import Dense, Streaming
from sparsecc.tune.attention import AttentionStats, choose_heads, record_attention, streaming_mask
from tests.tune import models

SEQ = 32


def _synthetic(heads_kind, seq=SEQ, dim=16, seed=0):
    """q, k [1, H, S, D]: "local" heads attend (almost only) to themselves, "uniform" heads to all keys alike."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(seq, dim, generator=g), dim=-1) * 6.0
    qs, ks = [], []
    for kind in heads_kind:
        if kind == "local":
            qs.append(base)
            ks.append(base)
        elif kind == "uniform":
            qs.append(torch.zeros(seq, dim))
            ks.append(base)
        else:   # "column": every query looks at key 9
            ks.append(base)
            qs.append(base[9].expand(seq, dim) * 2)
    return torch.stack(qs)[None], torch.stack(ks)[None]


def test_recall_and_density_match_their_definitions():
    q, k = _synthetic(["uniform"])
    stats = AttentionStats([Streaming(0, 8)], density_block=1)
    stats.record("s", q, k, [], [], 1.0, False)
    _, recall, density = stats.table("s")
    keep = streaming_mask(Streaming(0, 8), SEQ, SEQ, False, "cpu")
    # uniform attention: the recalled mass is the kept share of each row, averaged over rows
    assert float(recall[0, 0]) == pytest.approx(float(keep.float().mean(-1).mean()), rel=1e-6)
    assert float(density[0, 0]) == pytest.approx(float(keep.float().mean()), rel=1e-6)


def test_obvious_choices_within_budget():
    q, k = _synthetic(["local", "uniform", "local", "uniform"])
    stats = AttentionStats([Streaming(0, 2), Streaming(0, 8), Streaming(4, 16)], density_block=1)
    stats.record("s", q, k, [], [], 1.0, False)
    (choice,) = choose_heads(stats, budget=0.6)
    assert isinstance(choice.forms[0], Streaming) and choice.forms[0].window == 2
    assert isinstance(choice.forms[2], Streaming)
    assert isinstance(choice.forms[1], Dense) and isinstance(choice.forms[3], Dense)
    assert sum(choice.density) / 4 <= 0.6
    assert min(choice.recall) > 0.99


@pytest.mark.parametrize("budget", [0.15, 0.3, 0.5, 0.8])
def test_budget_is_respected(budget):
    q, k = _synthetic(["local", "uniform", "uniform", "local"], seed=2)
    stats = AttentionStats([Streaming(0, 2), Streaming(0, 4), Streaming(0, 8), Streaming(0, 16)], density_block=1)
    stats.record("a", q, k, [], [], 1.0, False)
    stats.record("b", q.flip(1), k.flip(1), [], [], 1.0, True)
    choices = choose_heads(stats, budget)
    densities = [d for c in choices for d in c.density]
    assert sum(densities) / len(densities) <= budget + 1e-9


def test_vertical_column_head_picks_vertical_slash():
    pytest.importorskip("sparsecc.codegen.dynamic_attention")
    from sparsecc.forms import VerticalSlash
    q, k = _synthetic(["column"], seq=256)
    cands = [Streaming(0, 8), VerticalSlash(last_q=16, vertical=2, slash=1, block=16)]
    stats = AttentionStats(cands, density_block=1)
    # causal: vertical_slash is MInference's causal rule (a bidirectional call attends densely)
    stats.record("s", q, k, [], [], 1.0, True)
    # 30 columns and a band of 50 diagonals (MInference's minimum budgets) keep well under 0.75 of the causal
    # entries at 256 tokens: a budget it fits, dense does not
    (choice,) = choose_heads(stats, budget=0.75)
    assert isinstance(choice.forms[0], VerticalSlash) and choice.recall[0] > 0.99


def test_recording_through_a_model_finds_every_site():
    model = models.AttnStack().eval()
    stats = record_attention(model, models.batches(2, hidden=32), [Streaming(0, 4), Streaming(1, 8)])
    assert sorted(stats.sites) == ["blocks.0.attn", "blocks.1.attn"]
    _, recall, density = stats.table("blocks.0.attn")
    assert recall.shape == (4, 2) and bool((recall <= 1 + 1e-6).all()) and bool((density <= 1 + 1e-9).all())
    assert bool((recall[:, 1] >= recall[:, 0] - 1e-6).all())   # a superset layout recalls at least as much


def _oracle_streaming_keep(sink, window, sq, sk, causal):
    """docs/spec.md's streaming rule, written out: row i sits at position p = i + Sk - Sq."""
    keep = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        p = i + sk - sq
        for j in range(sk):
            if causal:
                keep[i, j] = j <= p and (j < sink or p - j < window)
            else:
                keep[i, j] = j < sink or p < sink or abs(p - j) < window
    return keep


def _oracle_block_counts(keep, present, block):
    """Per head, (kept blocks, allowed blocks) of [B, H, R, C] masks (batches summed): a block counts when any of
    its entries is kept (allowed)."""
    kept = torch.zeros(keep.shape[1], dtype=torch.float64)
    allowed = torch.zeros(keep.shape[1], dtype=torch.float64)
    sq, sk = keep.shape[-2:]
    for r in range(0, sq, block):
        for c in range(0, sk, block):
            kept += keep[..., r:r + block, c:c + block].flatten(-2).any(-1).sum(0)
            allowed += present[..., r:r + block, c:c + block].flatten(-2).any(-1).sum(0)
    return kept, allowed


def _oracle_block_density(keep, present, block):
    """Per head, kept blocks / allowed blocks of [B, H, R, C] masks (batches summed)."""
    kept, allowed = _oracle_block_counts(keep, present, block)
    return kept / allowed


@pytest.mark.parametrize("sq,sk,causal,chunk,block", [(37, 37, True, 5, 1), (7, 40, True, 3, 1),
                                                      (33, 33, False, 8, 1), (20, 20, True, 512, 1),
                                                      (37, 37, True, 5, 4), (7, 40, True, 3, 4),
                                                      (33, 33, False, 8, 8)])
def test_chunked_recording_equals_the_definitions(sq, sk, causal, chunk, block):
    """Recall and density from query chunks equal the float64 definitions (docs/tune.md) on explicit keep masks."""
    g = torch.Generator().manual_seed(sq * 100 + sk)
    h, hkv, d = 4, 2, 8
    q, k = torch.randn(1, h, sq, d, generator=g), torch.randn(1, hkv, sk, d, generator=g)
    pad = torch.zeros(1, 1, 1, sk)
    pad[..., :3] = torch.finfo(torch.float32).min          # three padded keys, an additive mask
    forms = [Streaming(0, 4), Streaming(2, 6), Streaming(4, 100)]
    stats = AttentionStats(forms, rows_per_chunk=chunk, density_block=block)
    stats.record("s", q, k, [pad], [(True, True)], 0.3, causal)
    _, recall, density = stats.table("s")

    if not causal:
        # docs/spec.md, "Left padding" (a mask, no is_causal): positions count from the first shown key, and the
        # three padding rows attend densely, outside the forms: the recording sees keys and rows from 3 on.
        q, k, pad, sq, sk = q[:, :, 3:], k[:, :, 3:], pad[..., 3:], sq - 3, sk - 3
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    allowed = (pad > -1e4).expand(1, h, sq, sk).clone()
    if causal:
        allowed &= _oracle_streaming_keep(0, sk + sq, sq, sk, True)
    logits = (q.double() @ kk.transpose(-1, -2)) * 0.3
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    pos = torch.arange(sq) + sk - sq
    counted = allowed[..., torch.arange(sq), pos.clamp(0, sk - 1)] & (pos >= 0)
    for c, form in enumerate(forms):
        keep = _oracle_streaming_keep(form.sink, form.window, sq, sk, causal) & allowed & counted[..., None]
        want_recall = (probs * keep).sum((0, 2, 3)) / counted.sum((0, 2))
        want_density = keep.sum((0, 2, 3)).double() / (allowed & counted[..., None]).sum((0, 2, 3))
        if block > 1:
            want_density = _oracle_block_density(keep, allowed & counted[..., None], block)
        assert want_recall.shape == want_density.shape == (h,)
        assert torch.allclose(recall[:, c], want_recall, atol=1e-5), (form, recall[:, c], want_recall)
        assert torch.allclose(density[:, c], want_density, atol=1e-9), (form, density[:, c], want_density)


def test_chunked_block_topk_recording_equals_whole_call():
    """block_topk sums read chunk by chunk equal its token keep mask applied to the whole call at once."""
    pytest.importorskip("sparsecc.codegen.dynamic_attention")
    from sparsecc.forms import BlockTopK
    from sparsecc.tune.attention import dynamic_mask
    g = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 70, 8, generator=g), torch.randn(2, 2, 70, 8, generator=g)
    form = BlockTopK(block=16, topk=2)
    stats = AttentionStats([form], rows_per_chunk=9, density_block=1)
    stats.record("s", q, k, [], [], 0.5, True)
    _, recall, density = stats.table("s")
    blocks = AttentionStats([form], rows_per_chunk=9, density_block=8)
    blocks.record("s", q, k, [], [], 0.5, True)
    _, recall8, density8 = blocks.table("s")
    allowed = _oracle_streaming_keep(0, 200, 70, 70, True).expand(2, 2, 70, 70)
    probs = torch.softmax((q.double() @ k.double().transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf")), -1)
    keep = dynamic_mask(form, q, k, True, 0.5) & allowed
    assert torch.allclose(recall[:, 0], (probs * keep).sum((0, 2, 3)) / 140, atol=1e-5)
    assert torch.allclose(density[:, 0], keep.sum((0, 2, 3)).double() / allowed.sum((0, 2, 3)), atol=1e-9)
    assert torch.allclose(recall8, recall, atol=1e-9)
    assert torch.allclose(density8[:, 0], _oracle_block_density(keep, allowed, 8), atol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_block_topk_density_in_its_own_tiles_equals_the_token_definition(causal):
    """With the density tile equal to the selection's block, kept tiles are counted at block level; that count
    equals the token-level definition of docs/tune.md on the float64 oracle's keep mask (docs/spec.md), with padded
    keys and rows of several chunks."""
    pytest.importorskip("sparsecc.codegen.dynamic_attention")
    from sparsecc.forms import BlockTopK
    from tests.oracle import oracle
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(2, 2, 70, 8, generator=g), torch.randn(2, 2, 90, 8, generator=g)
    pad = torch.zeros(2, 1, 1, 90)
    pad[0, ..., :20] = torch.finfo(torch.float32).min      # the first batch's first 20 keys padded (a whole tile)
    forms = [BlockTopK(block=16, topk=1), BlockTopK(block=16, min_mass=0.2, pool="rows", rows=4)]
    stats = AttentionStats(forms, rows_per_chunk=20, density_block=16)
    stats.record("s", q, k, [pad], [(True, True)], 0.5, causal)
    _, _, density = stats.table("s")
    # Each batch element with its keys: without is_causal the mask's left padding (the first batch's 20 keys) is cut
    # off (docs/spec.md, "Left padding"; no query row sits before key 20 here, so no padding rows).
    start = [0, 0] if causal else [20, 0]
    for c, form in enumerate(forms):
        rule = {"topk": form.topk} if form.topk is not None else {"min_mass": form.min_mass}
        low_high = []
        for b in range(2):
            qb, kb, pb = q[b:b + 1], k[b:b + 1, :, start[b]:], pad[b:b + 1, ..., start[b]:]
            allowed = (pb > -1e4).expand(1, 2, 70, kb.shape[2])
            if causal:
                allowed = allowed & _oracle_streaming_keep(0, 500, 70, kb.shape[2], True)
            keep_min, keep_max = oracle.block_topk_keep(qb, kb, scale=0.5, causal=causal, block=16, sink_blocks=1,
                                                        local_blocks=1, pool=form.pool, rows=form.rows, **rule)
            low_high.append((_oracle_block_counts(keep_min & allowed, allowed, 16),
                             _oracle_block_counts(keep_max & allowed, allowed, 16)))
        low = sum(lo[0] for lo, _ in low_high) / sum(lo[1] for lo, _ in low_high)
        high = sum(hi[0] for _, hi in low_high) / sum(hi[1] for _, hi in low_high)
        assert ((low - 1e-9 <= density[:, c]) & (density[:, c] <= high + 1e-9)).all(), (form, density[:, c], low)
        assert (high < 1).all()          # the selection dropped tiles: the count is not trivially full


def test_unreachable_budget_is_an_error_naming_the_minimum():
    """Keys shorter than one density block leave nothing to skip: the budget cannot be met, and the tuner says so."""
    q, k = _synthetic(["local", "uniform"])
    stats = AttentionStats([Streaming(0, 2), Streaming(0, 8)], density_block=64)
    stats.record("s", q, k, [], [], 1.0, True)
    with pytest.raises(ValueError, match=r"budget=0.5 cannot be met.*1\.0000.*blocks of 64"):
        choose_heads(stats, 0.5)
    assert choose_heads(stats, 1.0)          # a budget every option meets still chooses


@pytest.mark.parametrize("budget", [0.6, 0.8, 1.0])
def test_block_topk_goes_to_every_head_of_a_site_or_none(budget):
    """docs/spec.md: block_topk applies only with one rule for every head (dense heads beside it keep the site
    dense), so the tuner may not give it to some heads only: a per-head choice would write a rule the compiler
    runs dense."""
    from sparsecc.forms import BlockTopK

    q, k = _synthetic(["local", "uniform", "local", "uniform"], seq=128)
    form = BlockTopK(block=16, topk=1)
    stats = AttentionStats([form], density_block=16)
    stats.record("s", q, k, [], [], 1.0, True)
    _, recall, _ = stats.table("s")
    assert float(recall[0, 0]) > 0.99 and float(recall[1, 0]) < 0.8   # per head it pays on heads 0 and 2 only
    (choice,) = choose_heads(stats, budget)
    kinds = {type(f) for f in choice.forms}
    assert len(kinds) == 1, choice
    assert sum(choice.density) / 4 <= budget + 1e-9


def test_an_unreachable_budget_counts_block_topk_for_every_head():
    """Head 0 is sparsest under one block_topk form and head 1 under another, but a site takes one form for all
    its heads: the sparsest option keeps 0.5 on average, so a 0.3 budget is an error, never a choice above it."""
    from sparsecc.forms import BlockTopK

    class Table:
        sites = {"s": {"density_block": 64}}

        def table(self, site):
            recall = torch.tensor([[0.9, 0.9], [0.9, 0.9]], dtype=torch.float64)
            density = torch.tensor([[0.1, 0.9], [0.9, 0.1]], dtype=torch.float64)
            return [BlockTopK(block=64, topk=1), BlockTopK(block=64, topk=2)], recall, density

    with pytest.raises(ValueError, match="mean density of 0.5000"):
        choose_heads(Table(), 0.3)
    (choice,) = choose_heads(Table(), 0.5)
    assert len(set(choice.forms)) == 1 and sum(choice.density) / 2 <= 0.5


@pytest.mark.parametrize("decode", [False, True])
def test_a_left_padded_call_records_what_the_sequence_alone_records(decode):
    """docs/spec.md, "Left padding": the compiled forms run a left-padded sequence as they run it alone, so the
    recording (recall and density per candidate, docs/tune.md) must not see the padding either."""
    pytest.importorskip("sparsecc.codegen.dynamic_attention")
    from sparsecc.forms import BlockTopK
    g = torch.Generator().manual_seed(9)
    sq, sk, pad = (3, 40, 11) if decode else (40, 40, 11)
    q, k = torch.randn(1, 2, sq, 8, generator=g), torch.randn(1, 2, sk, 8, generator=g)
    keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)[None, None]    # a causal mask passed as a tensor
    rows = 0 if decode else pad
    q2 = torch.cat([torch.randn(1, 2, rows, 8, generator=g), q], 2)
    k2 = torch.cat([torch.randn(1, 2, pad, 8, generator=g), k], 2)
    keep2 = torch.zeros(1, 1, sq + rows, sk + pad, dtype=torch.bool)
    keep2[..., rows:, pad:] = keep
    forms = [Streaming(2, 6), BlockTopK(block=16, topk=1)]
    tables = []
    for q_, k_, m_ in ((q, k, keep), (q2, k2, keep2)):
        stats = AttentionStats(forms, rows_per_chunk=7, density_block=1)
        stats.record("s", q_, k_, [m_], [(False, True)], 0.5, False)
        tables.append(stats.table("s"))
    (_, recall, density), (_, recall2, density2) = tables
    assert torch.allclose(recall2, recall, atol=1e-6) and torch.allclose(density2, density, atol=1e-12)
    assert (density < 1).any()   # the candidates leave keys out: equal tables are not trivially full
