"""The cost model: monotonicity, crossovers against numeric scans, decisions against direct evaluation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsecc.codegen.block_sparse_linear import pick_config
from sparsecc.cost import H100_SXM, PROFILES, estimate_attention, estimate_linear, profile_for
from sparsecc.cost.efficiency import efficiency, provenance, table
from sparsecc.cost.sites import attention_costs, estimate_ffn
from sparsecc.cost.hardware import CPU, measure_profile, save_profile
from sparsecc.forms import BlockSparse, BlockWeights, Streaming, TwoFour

ATTN = dict(batch=1, heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16, causal=True, hw=H100_SXM,
            margin=1.05)


def _attn(form, seq, per_head=None, symbolic=False, **kw):
    args = {**ATTN, **kw}
    return estimate_attention(form, per_head, seq_q=seq, seq_k=seq, symbolic_seq=symbolic, **args)


def test_every_profile_cites_its_figures():
    for profile in list(PROFILES.values()) + [CPU]:
        assert profile.sources, profile.name
        assert all(text for text in profile.sources.values())
    assert "TARGETS.md" in H100_SXM.sources["bf16"]
    assert provenance()["device"]


@pytest.mark.parametrize("seqs", [(4096, 16384, 65536)])
def test_attention_costs_rise_with_length_and_window(seqs):
    times = [_attn(Streaming(128, 4096), s).sparse_time_s for s in seqs]
    assert times == sorted(times)
    dense = [_attn(Streaming(128, 4096), s).dense_time_s for s in seqs]
    assert dense == sorted(dense)
    windows = [_attn(Streaming(128, w), 32768).sparse_flops for w in (512, 2048, 8192)]
    assert windows == sorted(windows)


def test_streaming_density_matches_block_counting():
    est = _attn(Streaming(128, 4096), 32768)
    n = 32768 // 128
    per_row = 1 + math.ceil(4095 / 128) + 1
    kept = sum(min(a + 1, per_row) for a in range(n))
    assert est.density == pytest.approx(kept / (n * (n + 1) / 2), rel=1e-9)
    # TARGETS.md: sink 128 + window 4096 keeps 24.8% of causal blocks at 32K (block 128)
    assert est.density == pytest.approx(0.248, abs=0.01)


def test_linear_costs_rise_with_density_and_tokens():
    sparse = [estimate_linear(BlockWeights((64, 64), d), tokens=4096, in_features=4096, out_features=14336,
                              dtype=torch.bfloat16, hw=H100_SXM).sparse_time_s for d in (0.1, 0.5, 0.9)]
    assert sparse == sorted(sparse)
    dense = [estimate_linear(None, tokens=t, in_features=4096, out_features=4096, dtype=torch.bfloat16,
                             hw=H100_SXM).dense_time_s for t in (1, 64, 4096)]
    assert dense == sorted(dense)


def test_decode_sizes_never_pick_two_four():
    # TARGETS.md: cuSPARSELt 2:4 runs at 0.06x of dense at decode sizes
    for tokens in (1, 4, 16):
        est = estimate_linear(TwoFour(), tokens=tokens, in_features=4096, out_features=14336,
                              dtype=torch.bfloat16, hw=H100_SXM)
        assert est.speedup < 1.05, tokens
    large = estimate_linear(TwoFour(), tokens=8192, in_features=4096, out_features=14336, dtype=torch.bfloat16,
                            hw=H100_SXM)
    assert large.speedup > 1.0


def test_crossover_agrees_with_numeric_scan():
    est = _attn(Streaming(128, 4096), 8192, symbolic=True)
    cross = est.crossover
    assert cross is not None and not cross.never and not cross.always
    t = cross.threshold

    def wins(s):
        p = _attn(Streaming(128, 4096), s)
        return p.sparse_time_s <= p.dense_time_s / ATTN["margin"]
    assert not wins(t - 1) and wins(t)
    assert all(wins(s) for s in range(t, t + 20 * 128, 97))
    assert not any(wins(s) for s in range(max(1, t - 20 * 128), t, 97))
    assert str(cross) == f"sparse when seq_k >= {t}"


def test_decisions_are_stable_away_from_the_crossover():
    t = _attn(Streaming(128, 1024), 4096, symbolic=True).crossover.threshold
    for s in (t // 2, t * 3):
        base = _attn(Streaming(128, 1024), s).speedup >= 1.05
        for ds in (-2, -1, 1, 2):
            assert (_attn(Streaming(128, 1024), s + ds).speedup >= 1.05) == base


def _direct_time(flops, nbytes, family, dtype, hw, steps=None, programs=None):
    """The documented formula, written out again: the package's sympy expression must agree with it."""
    eff = efficiency(family)
    t = min(1.0, max(0.0, (math.log10(flops) - 8) / 2))
    compute_eff = eff.compute_small + (eff.compute_large - eff.compute_small) * t
    occupancy = 1.0 if programs is None else min(1.0, programs / hw.sm_count)
    stretch = 1.0 if steps is None else 1.0 + eff.tile_overhead / steps
    return max(flops * stretch / (hw.peak(dtype) * compute_eff * occupancy),
               nbytes / (hw.bandwidth * eff.memory * occupancy), eff.floor_s) + hw.launch_overhead_s


@given(tokens=st.integers(1, 8192), k=st.sampled_from([512, 4096, 14336]), n=st.sampled_from([1024, 4096, 14336]),
       density=st.floats(0.05, 0.9), bf16=st.booleans())
def test_linear_decision_matches_direct_evaluation(tokens, k, n, density, bf16):
    dtype = torch.bfloat16 if bf16 else torch.float16
    form = BlockWeights((64, 64), density)
    est = estimate_linear(form, tokens=tokens, in_features=k, out_features=n, dtype=dtype, hw=H100_SXM)
    elem = 2
    flops = 2.0 * tokens * n * k
    w_bytes, act = elem * n * k, elem * tokens * (n + k)
    dense = _direct_time(flops, w_bytes + act, "gemm_dense", dtype, H100_SXM)
    tile = pick_config(tokens, 64, 64).BLOCK_M
    programs = math.ceil(tokens / tile) * math.ceil(n / 64)
    # the 16-token decode tile is its own family
    family = "gemm_block_sparse_decode" if tile == 16 else "gemm_block_sparse"
    sparse = _direct_time(flops * density, w_bytes * density + 4 * n * k * density / 4096 + act,
                          family, dtype, H100_SXM, steps=density * k / 64, programs=programs)
    assert est.dense_time_s == pytest.approx(dense, rel=1e-9)
    assert est.sparse_time_s == pytest.approx(sparse, rel=1e-9)
    assert (est.speedup >= 1.05) == (dense / sparse >= 1.05)


@given(seq=st.integers(1, 200_000), window=st.integers(1, 16384), sink=st.integers(0, 512))
def test_attention_density_is_a_fraction_and_block_sparse_is_bounded(seq, window, sink):
    est = _attn(Streaming(sink, window), seq)
    assert 0 < est.density <= 1 + 1e-12
    assert est.sparse_flops <= est.dense_flops * (1 + 1e-12)
    bs = _attn(BlockSparse(128, 2, 1, 1), seq)
    assert 0 < bs.density <= 1 + 1e-12


def test_profile_detection_and_measured_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECC_CACHE_DIR", str(tmp_path))
    assert profile_for(torch.device("cpu")) is CPU
    measured = measure_profile(torch.device("cpu"), size=128, progress=False)
    assert measured.measured and measured.bandwidth > 0 and measured.matmul_flops["fp32"] > 0
    save_profile(measured, torch.device("cpu"))
    assert profile_for(torch.device("cpu")) == measured


def test_symbolic_token_count_is_judged_at_its_worst_count():
    # 50% block weights pay at 8192 tokens on an H100 (1.10-1.12x measured) but not at decode sizes; a linear
    # has no runtime branch, so a symbolic token count must not pick the form from a large hint alone.
    form = BlockWeights((64, 64), 0.5)
    kw = dict(in_features=4096, out_features=14336, dtype=torch.bfloat16, hw=H100_SXM)
    static = estimate_linear(form, tokens=8192, **kw)
    symbolic = estimate_linear(form, tokens=8192, symbolic_tokens=True, **kw)
    assert symbolic.worst_tokens is not None and static.worst_tokens is None
    per_count = {t: estimate_linear(form, tokens=t, **kw).speedup for t in (1, 4, 16, 128, 1024, 8192)}
    assert symbolic.speedup == pytest.approx(min(per_count.values()))
    assert symbolic.speedup <= static.speedup


def test_gate_mode_ffn_reads_the_gate_in_full():
    linears = [(4096, 14336), (4096, 14336), (14336, 4096)]
    one = estimate_ffn(linears, tokens=1, dtype=torch.bfloat16, hw=H100_SXM, activation_sparsity=0.9, mode="gate")
    # the gate is a third of the weights and always read: at most 3x fewer bytes however sparse
    assert one.dense_bytes / one.sparse_bytes < 3
    assert one.sparse_bytes < one.dense_bytes
    # more tokens keep more neurons (union 1 - s^M), so the gain shrinks
    many = estimate_ffn(linears, tokens=16, dtype=torch.bfloat16, hw=H100_SXM, activation_sparsity=0.9,
                        mode="gate")
    assert many.speedup < one.speedup
    with pytest.raises(ValueError, match="mode"):
        estimate_ffn(linears, tokens=1, dtype=torch.bfloat16, hw=H100_SXM, activation_sparsity=0.9, mode="down")


def test_dynamic_form_pays_for_its_estimate_pass():
    from sparsecc.forms import BlockTopK
    topk = _attn(BlockTopK(block=128, topk=12), 32768)
    band = _attn(BlockSparse(128, local_blocks=14), 32768)  # same kept blocks per row, no estimate
    _, sparse = attention_costs(BlockTopK(block=128, topk=12), None, True)
    assert [c.family for c in sparse.extra] == ["attention_estimate"]
    assert topk.sparse_bytes > band.sparse_bytes


def test_sampled_row_estimate_costs_more_than_pooling_and_scales_with_its_rows():
    """Two passes of rows / block of the queries over their keys (docs/kernels.md): 16 rows cost 4x the flops
    of 4, and both more than pooling; the time estimate follows."""
    from sparsecc.cost.formulas import dynamic_estimate_cost
    from sparsecc.forms import BlockTopK

    shapes = dict(batch=1, heads=32, kv_heads=8, seq_q=32768, seq_k=32768, head_dim=128)
    mean, four, sixteen = (dynamic_estimate_cost(BlockTopK(block=128, topk=12, **kw), shapes)
                           for kw in ({}, {"pool": "rows", "rows": 4}, {"pool": "rows", "rows": 16}))
    assert float(sixteen.flops) == pytest.approx(4 * float(four.flops))
    assert float(four.flops) > float(mean.flops)
    # 2 passes x 2 flops x 32 heads x 256 query blocks x 4 rows x the keys a causal row sees on average (Sk - Sq/2)
    assert float(four.flops) == pytest.approx(2 * 2 * 32 * 256 * 4 * (32768 - 32768 / 2) * 128)
    times = [_attn(BlockTopK(block=128, topk=12, **kw), 32768).sparse_time_s
             for kw in ({}, {"pool": "rows", "rows": 4}, {"pool": "rows", "rows": 16})]
    assert times[0] < times[1] < times[2]


def test_shipped_table_has_every_family_the_formulas_use():
    families = set(table()["families"])
    for form in (None, Streaming(128, 1024), BlockSparse(128, 2, 1, 0), BlockSparse(128, 2, 1, 2)):
        assert attention_costs(form, None, True)[1].family in families
    assert {"gemm_dense", "gemm_block_sparse", "gemm_block_sparse_decode", "gemm_2to4", "gemv_activation_sparse", "ffn_gate", "ffn_gate_kept",
            "attention_estimate"} <= families
    prov = provenance()
    assert prov["device"] and prov["date"] and prov["commit"]


def test_replayed_linear_drops_the_per_call_host_floor():
    """Under CUDA graphs (``replayed``) a 2:4 linear pays no per-call host floor (the opaque op's Python and one
    cuSPARSELt call through its kept plan: 58 us fitted on an H100, bench/costmodel_h100_2to4_plans.json): at one
    token the floor is all of a plain call's time and none of a replay's; where the GPU time exceeds the floor
    both agree."""
    from sparsecc.cost import hardware
    from sparsecc.cost.efficiency import efficiency
    from sparsecc.forms import TwoFour

    floor = efficiency("gemm_2to4").floor_s
    assert floor > 1e-5   # the shipped table carries a host floor for cuSPARSELt calls
    shape = dict(in_features=4096, out_features=14336, dtype=torch.bfloat16, hw=hardware.H200)
    plain = estimate_linear(TwoFour(), tokens=1, **shape)
    replayed = estimate_linear(TwoFour(), tokens=1, **shape, replayed=True)
    assert plain.sparse_time_s >= floor and replayed.sparse_time_s < floor
    assert replayed.speedup > plain.speedup
    for tokens in (1024, 8192, 65536):   # a replay never makes the sparse form look worse
        assert estimate_linear(TwoFour(), tokens=tokens, **shape, replayed=True).speedup >= \
            estimate_linear(TwoFour(), tokens=tokens, **shape).speedup
    for tokens in (8192, 65536):
        large = [estimate_linear(TwoFour(), tokens=tokens, **shape, replayed=r).sparse_time_s for r in (False, True)]
        assert large[0] == pytest.approx(large[1])


def test_cudagraphs_option_makes_the_estimates_replayed(monkeypatch):
    import sparsecc.backend as backend
    from sparsecc.backend import make_context, parse_options

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    # on the CPU nothing is replayed (Inductor skips cudagraphs there)
    assert not make_context(gm, [torch.zeros(1)], parse_options({"cudagraphs": True})).replayed
    monkeypatch.setattr(backend, "_device_of", lambda inputs: torch.device("cuda"))
    monkeypatch.setattr(backend, "profile_for", lambda device: H100_SXM)
    assert make_context(gm, [], parse_options({"cudagraphs": True})).replayed
    assert not make_context(gm, [], parse_options({})).replayed
    # the reference forms turn CUDA graphs off for their graphs, so their estimates stay per call
    assert not make_context(gm, [], parse_options({"cudagraphs": True, "kernels": "reference"})).replayed
    monkeypatch.setenv("SPARSECC_LOWERING", "eager")   # no Inductor, no CUDA graphs
    assert not make_context(gm, [], parse_options({"cudagraphs": True})).replayed
