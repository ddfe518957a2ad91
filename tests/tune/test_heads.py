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
    stats = AttentionStats([Streaming(0, 8)])
    stats.record("s", q, k, [], [], 1.0, False)
    _, recall, density = stats.table("s")
    keep = streaming_mask(Streaming(0, 8), SEQ, SEQ, False, "cpu")
    # uniform attention: the recalled mass is the kept share of each row, averaged over rows
    assert float(recall[0, 0]) == pytest.approx(float(keep.float().mean(-1).mean()), rel=1e-6)
    assert float(density[0, 0]) == pytest.approx(float(keep.float().mean()), rel=1e-6)


def test_obvious_choices_within_budget():
    q, k = _synthetic(["local", "uniform", "local", "uniform"])
    stats = AttentionStats([Streaming(0, 2), Streaming(0, 8), Streaming(4, 16)])
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
    stats = AttentionStats([Streaming(0, 2), Streaming(0, 4), Streaming(0, 8), Streaming(0, 16)])
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
    stats = AttentionStats(cands)
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
