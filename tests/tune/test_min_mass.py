"""Calibrating block_topk's shared min_mass threshold: densities against the float64 oracle, and the choice."""

import math

import pytest
import torch

from sparsecc.forms import BlockTopK
from sparsecc.tune.attention import AttentionStats
from sparsecc.tune.min_mass import calibrate_min_mass, candidate_densities
from tests.oracle import oracle
from tests.tune import models

GRID = (0.02, 0.05, 0.1, 0.2, 0.4)


def _oracle_density(q, k, scale, tau, block, rows):
    """Kept over causal block cells, from docs/spec.md's rule written in float64 (tests/oracle)."""
    keep_min, keep_max = oracle.block_topk_keep(q, k, scale=scale, causal=True, block=block, min_mass=tau,
                                                sink_blocks=1, local_blocks=1, pool="rows", rows=rows)
    sq, sk = q.shape[2], k.shape[2]
    nq, nk = math.ceil(sq / block), math.ceil(sk / block)
    causal = torch.tensor([[b * block <= min((a + 1) * block, sq) - 1 + sk - sq for b in range(nk)]
                           for a in range(nq)])
    heads = q.shape[0] * q.shape[1]

    def blocks(keep):
        padded = torch.nn.functional.pad(keep, (0, nk * block - sk, 0, nq * block - sq))
        return padded.view(*keep.shape[:2], nq, block, nk, block).any(3).any(-1).sum().item()

    return blocks(keep_min) / (causal.sum().item() * heads), blocks(keep_max) / (causal.sum().item() * heads)


def test_candidate_densities_match_the_oracle():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g)
    forms = [BlockTopK(block=16, min_mass=t, pool="rows", rows=4) for t in GRID]
    stats = AttentionStats(forms, density_block=16)
    stats.record("s", q, k, [], [], 0.5, True)
    got = candidate_densities(stats)
    for tau, d in zip(GRID, got.tolist()):
        low, high = _oracle_density(q, k, 0.5, tau, 16, 4)
        assert low - 1e-9 <= d <= high + 1e-9, (tau, d, low, high)
    assert got[0] > got[-1]          # the thresholds make different choices: the comparison is not vacuous


def test_calibration_takes_the_smallest_threshold_within_the_budget():
    model = models.AttnStack().eval()
    batches = models.batches(2, tokens=64, hidden=32)
    loose = calibrate_min_mass(model, batches, 1.0, block=16, rows=4, grid=GRID)
    densities = [d for _, d in loose.densities]
    assert [t for t, _ in loose.densities] == list(GRID)
    assert all(a >= b - 1e-12 for a, b in zip(densities, densities[1:]))   # a higher threshold keeps a subset
    assert densities[0] > densities[-1]
    assert loose.min_mass == GRID[0] and loose.form == BlockTopK(block=16, min_mass=GRID[0], pool="rows", rows=4)
    budget = (densities[1] + densities[2]) / 2 if densities[1] > densities[2] else densities[2]
    chosen = calibrate_min_mass(model, batches, budget, block=16, rows=4, grid=GRID)
    assert chosen.min_mass == next(t for t, d in chosen.densities if d <= budget)
    none = calibrate_min_mass(model, batches, min(densities) / 2, block=16, rows=4, grid=GRID)
    assert none.min_mass is None and none.form is None


@pytest.mark.parametrize("kwargs,match", [({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"),
                                          ({"budget": 0.5, "grid": ()}, "grid"),
                                          ({"budget": 0.5, "grid": (0.0,)}, "min_mass")])
def test_calibration_errors_name_the_argument(kwargs, match):
    budget = kwargs.pop("budget")
    with pytest.raises(ValueError, match=match):
        calibrate_min_mass(models.AttnStack().eval(), models.batches(1, tokens=32), budget, block=16, rows=4,
                           **kwargs)


def test_the_grid_shares_one_estimate_per_call(monkeypatch):
    from sparsecc.codegen import dynamic_attention as dyn

    calls = []
    real = dyn.block_topk_scores_ref

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dyn, "block_topk_scores_ref", counting)
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 64, 16, generator=g), torch.randn(1, 2, 64, 16, generator=g)
    forms = [BlockTopK(block=16, min_mass=t, pool="rows", rows=4) for t in GRID] + [
        BlockTopK(block=16, topk=1, pool="rows", rows=4), BlockTopK(block=16, topk=1)]
    stats = AttentionStats(forms, density_block=16)
    stats.record("s", q, k, [], [], 0.5, True)
    assert len(calls) == 2          # one sampled-row estimate for six rules, one mean-pooled estimate


def test_a_causal_mask_tensor_records_what_is_causal_does():
    """docs/spec.md: for the dynamic forms a mask that removes every later key makes the attention causal, as
    is_causal does (HF passes such a tensor whenever a batch is padded); the recording must select as the compiled
    op runs."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g)
    forms = [BlockTopK(block=16, min_mass=t, pool="rows", rows=4) for t in GRID]
    causal_mask = torch.ones(96, 96, dtype=torch.bool).tril()[None, None]
    stats = AttentionStats(forms, density_block=16)
    stats.record("s", q, k, [causal_mask], [(False, True)], 0.5, False)
    got = candidate_densities(stats)
    for tau, d in zip(GRID, got.tolist()):
        low, high = _oracle_density(q, k, 0.5, tau, 16, 4)
        assert low - 1e-9 <= d <= high + 1e-9, (tau, d, low, high)
    assert got[0] > got[-1]


def test_each_batch_element_records_with_its_own_causality(monkeypatch):
    """A padded causal mask for one sequence, a full mask for its batch-mate: the batch records what each sequence
    records alone (the first causally, the second not). Without reading causality from the mask the batch's
    statistics differ, so the comparison is not vacuous."""
    from sparsecc.forms import VerticalSlash
    from sparsecc.tune import attention

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 4, 160, 16, generator=g), torch.randn(2, 2, 160, 16, generator=g)
    forms = [BlockTopK(block=16, min_mass=0.12, pool="rows", rows=4), BlockTopK(block=16, topk=2),
             VerticalSlash(last_q=8, vertical=30, slash=50, block=16)]
    padded = torch.ones(160, 160, dtype=torch.bool).tril()
    padded[:, :7] = False                                 # left padding: 7 keys no query may see
    additive = torch.zeros(2, 1, 160, 160)
    additive[0, 0] = torch.where(padded, 0.0, torch.finfo(torch.float32).min)   # HF's additive form
    batch = AttentionStats(forms, density_block=16)
    batch.record("s", q, k, [additive], [(True, True)], 0.25, False)
    alone = AttentionStats(forms, density_block=16)
    # The first sequence alone: its keys and rows from its first shown key (docs/spec.md, "Left padding"), causal.
    alone.record("s", q[:1, :, 7:], k[:1, :, 7:], [additive[:1, :, 7:, 7:]], [(True, True)], 0.25, True)
    alone.record("s", q[1:], k[1:], [additive[1:]], [(True, True)], 0.25, False)
    keys = ("mass", "kept", "rows", "allowed", "kept_blocks", "allowed_blocks")
    for key in keys:
        torch.testing.assert_close(batch.sites["s"][key], alone.sites["s"][key], rtol=1e-9, atol=1e-9, msg=key)
    monkeypatch.setattr(attention, "_mask_causal_rows", lambda *args: None)
    blind = AttentionStats(forms, density_block=16)
    blind.record("s", q, k, [additive], [(True, True)], 0.25, False)
    differs = sum((blind.sites["s"][key] - alone.sites["s"][key]).abs().sum(0) for key in ("mass", "kept_blocks"))
    assert bool((differs > 1e-6).all()), differs          # every form selects differently without causality
