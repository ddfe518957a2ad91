"""The kernel time is defined once (``kernel_seconds``); the crossover is searched on it.

The pinned crossovers are worked out by hand from docs/costmodel.md ("Formulas", "Attention") on a made-up
device where every number is round: one 128 x 128 block pair of one head of dimension 64 takes exactly 1 us,
memory is free, efficiencies are 1 and there is no floor or tile overhead, so a kernel's time is
``pairs * 1 us + launch overhead``.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.cost import H100_SXM, efficiency, estimate_attention
from sparsecc.cost.efficiency import kernel_seconds, table
from sparsecc.cost.formulas import B, D, ELEM, H, HKV, K, M, N, SK, SQ
from sparsecc.cost.hardware import HardwareProfile
from sparsecc.cost.sites import attention_costs, ffn_costs, linear_costs
from sparsecc.forms import BlockSparse, BlockWeights, Streaming, TwoFour

# 4 * 128^2 * 64 FLOPs per block pair (docs: 4 * B * H * pairs * 128^2 * D), at this rate: 1 us per pair.
PAIR_FLOPS = 4 * 128 ** 2 * 64
PAIR_S = 1e-6


def round_device(launch_pairs: float) -> HardwareProfile:
    """The made-up device: a launch costs ``launch_pairs`` block pairs' time (it must be > 0)."""
    return HardwareProfile(name="round", matmul_flops={k: PAIR_FLOPS / PAIR_S for k in ("bf16", "fp16", "fp32")},
                           vector_flops=1.0, bandwidth=1e30, l2_bytes=1, sm_count=1,
                           launch_overhead_s=launch_pairs * PAIR_S)


@pytest.fixture
def round_table(monkeypatch):
    """Every family at the full ceiling, without floor or tile overhead."""
    fixed = {"provenance": {}, "families": {fam: {"compute_small": 1.0, "compute_large": 1.0, "memory": 1.0}
                                            for fam in table()["families"]}}
    monkeypatch.setattr(efficiency, "table", lambda: fixed)


def crossover_of(form, seq_q, launch_pairs, margin=1.05):
    est = estimate_attention(form, None, batch=1, heads=1, kv_heads=1, seq_q=seq_q, seq_k=seq_q if seq_q > 1 else 4096,
                             head_dim=64, dtype=torch.bfloat16, causal=True, hw=round_device(launch_pairs),
                             margin=margin, symbolic_seq=True)
    return est.crossover


# Streaming sink 128 + window 1024 keeps ceil(128/128) + ceil(1023/128) + 1 = 10 key blocks per query block.
# Prefill (nq = ceil(S/128) query blocks): dense nq(nq+1)/2 pairs; sparse 55 + 10(nq - 10) once nq > 10 (the same
# as dense before). Sparse wins by the margin when 1.05 (sparse + L) <= dense + L, L the launch in pairs:
#   L ~ 0:   1.05 (10 nq - 45) <= nq(nq+1)/2       <=> nq^2 - 20 nq + 94.5 >= 0 <=> nq >= 12.35: nq = 13, S = 1537
#   L = 100: 1.05 (10 nq + 55) <= nq(nq+1)/2 + 100 <=> nq^2 - 20 nq + 84.5 >= 0 <=> nq >= 13.94: nq = 14, S = 1665
# Decode (one query, nk = ceil(S/128) key blocks): dense nk pairs, sparse min(nk, 10);
#   L = 100: 1.05 (10 + 100) <= nk + 100 <=> nk >= 15.5: nk = 16, S = 1921.
@pytest.mark.parametrize("seq_q, launch_pairs, threshold", [(2048, 1e-6, 1537), (2048, 100, 1665), (1, 100, 1921)])
def test_streaming_crossover_matches_the_hand_computed_one(round_table, seq_q, launch_pairs, threshold):
    cross = crossover_of(Streaming(sink=128, window=1024), seq_q, launch_pairs)
    assert cross.threshold == threshold
    assert str(cross) == f"sparse when seq_k >= {threshold}"


def test_crossover_ends_always_and_never(round_table):
    # At S = 1 both sides are one block pair and a launch, so margin 0.5 wins at once. dense / sparse grows like
    # nq / 20 (about 6600 at the end of the search, 2^24 tokens), so margin 1e9 is never reached.
    always = crossover_of(Streaming(sink=128, window=1024), 2048, 1e-6, margin=0.5)
    assert always.always and str(always) == "sparse for every seq_k"
    never = crossover_of(Streaming(sink=128, window=1024), 2048, 1e-6, margin=1e9)
    assert never.never and str(never) == "dense for every seq_k"


def _direct_kernel_time(eff, flops, nbytes, launches, hw, dtype, steps, programs, host=True):
    """docs/costmodel.md, "Formulas", written out."""
    t = min(1.0, max(0.0, (math.log10(flops) - 8) / 2))
    compute_eff = eff.compute_small + (eff.compute_large - eff.compute_small) * t
    occupancy = 1.0 if programs is None else min(1.0, programs / hw.sm_count)
    stretch = 1.0 if steps is None else 1.0 + eff.tile_overhead / steps
    device = max(flops * stretch / (hw.peak(dtype) * compute_eff * occupancy),
                 nbytes / (hw.bandwidth * eff.memory * occupancy)) + eff.fixed_s
    return max(device, eff.floor_s if host else 0.0) + launches * hw.launch_overhead_s


@given(flops=st.floats(1e3, 1e15), nbytes=st.floats(1e3, 1e12), steps=st.one_of(st.none(), st.floats(0.5, 1e4)),
       programs=st.one_of(st.none(), st.integers(1, 10_000)), launches=st.integers(1, 4),
       family=st.sampled_from(sorted(table()["families"])), host=st.booleans())
def test_kernel_seconds_is_the_documented_formula(flops, nbytes, steps, programs, launches, family, host):
    eff, hw, dtype = efficiency.efficiency(family), H100_SXM, torch.bfloat16
    got = kernel_seconds(eff, flops=flops, nbytes=nbytes, launches=launches, peak=hw.peak(dtype),
                         bandwidth=hw.bandwidth, launch_overhead_s=hw.launch_overhead_s, sm_count=hw.sm_count,
                         steps=steps, programs=programs, host=host)
    assert got == pytest.approx(_direct_kernel_time(eff, flops, nbytes, launches, hw, dtype, steps, programs, host),
                                rel=1e-12)


SHIPPED = dict(batch=1, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, causal=True, hw=H100_SXM)


def _wins(form, seq, margin):
    est = estimate_attention(form, None, seq_q=seq, seq_k=seq, margin=margin, symbolic_seq=False, **SHIPPED)
    return est.sparse_time_s <= est.dense_time_s / margin


FORMS = st.one_of(
    st.builds(Streaming, sink=st.integers(0, 512), window=st.integers(1, 8192)),
    st.builds(BlockSparse, block=st.sampled_from([64, 128]), local_blocks=st.integers(1, 8),
              global_blocks=st.integers(0, 2), random_blocks=st.integers(0, 3)))


@given(form=FORMS, margin=st.floats(0.9, 1.5))
def test_the_crossover_is_where_the_predicted_times_cross(form, margin):
    """At the threshold the static prediction (sizes substituted) wins by the margin; one token shorter it does not."""
    cross = estimate_attention(form, None, seq_q=4096, seq_k=4096, margin=margin, symbolic_seq=True,
                               **SHIPPED).crossover
    if cross.never:
        assert not _wins(form, 2 ** 20, margin)
        return
    assert _wins(form, cross.threshold, margin)
    if not cross.always:
        assert not _wins(form, cross.threshold - 1, margin)


@given(form=FORMS, seqs=st.lists(st.integers(1, 200_000), min_size=2, max_size=2, unique=True))
def test_predicted_attention_times_rise_with_the_length(form, seqs):
    """The bisection's premise, at 32 heads of dimension 128: neither time falls as the sequence grows."""
    short, long_ = sorted(seqs)
    a = estimate_attention(form, None, seq_q=short, seq_k=short, margin=1.05, symbolic_seq=False, **SHIPPED)
    b = estimate_attention(form, None, seq_q=long_, seq_k=long_, margin=1.05, symbolic_seq=False, **SHIPPED)
    assert a.dense_time_s <= b.dense_time_s and a.sparse_time_s <= b.sparse_time_s


@given(seq=st.integers(1, 100_000), tokens=st.integers(1, 8192), sink=st.integers(0, 512),
       window=st.integers(1, 8192), density=st.sampled_from([0.05, 0.5, 0.9]))
def test_work_along_one_size_equals_the_substituted_work(seq, tokens, sink, window, density):
    """``kernels_along`` (compiled once, what the crossover search evaluates) gives ``kernels``' numbers."""
    attention = {B: 1, H: 32, HKV: 8, D: 128, ELEM: 2}
    cases = [(attention_costs(Streaming(sink=sink, window=window), None, True), attention, (SK, SQ), seq),
             (attention_costs(BlockSparse(128, 2, 1, 1), None, True), attention, (SK, SQ), seq),
             (linear_costs(BlockWeights((64, 64), density)), {K: 4096, N: 14336, ELEM: 2}, (M,), tokens),
             (linear_costs(TwoFour()), {K: 4096, N: 14336, ELEM: 2}, (M,), tokens),
             (ffn_costs([(512, 2048), (512, 2048), (2048, 512)], 0.5, "gate"), {ELEM: 2}, (M,), tokens)]
    for costs, values, along, at in cases:
        for cost in costs:
            direct = cost.kernels({**values, **{a: at for a in along}})
            compiled = cost.kernels_along(values, along)(at)
            assert len(direct) == len(compiled)
            for d, c in zip(direct, compiled):
                assert d.keys() == c.keys() and d["family"] == c["family"]
                for key in ("flops", "nbytes", "steps", "programs"):
                    assert (d[key] is None) == (c[key] is None), key
                    if d[key] is not None:
                        assert c[key] == pytest.approx(d[key], rel=1e-12), (cost.family, key)
