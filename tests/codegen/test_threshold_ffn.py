"""Input-mode (TEAL) fused FFN kernel (codegen/threshold_ffn.py).

Oracles follow docs/spec.md ("activation_threshold", mode input) written out in float64 on explicit keep masks:
x̃ = x ⊙ [|x| > tau_input] feeds the gate and up projections, h = act(gate) ⊙ up (rounded where the model rounds:
each linear output, the activation, the product), and the down projection reads h ⊙ [|h| > tau_down].
CPU: the Triton kernels run in Triton's interpreter at tiny shapes, in a child process (tests/interpreter.py).
GPU (``gpu`` marker): Llama-3-8B shapes into NaN-poisoned outputs against a float32 oracle.
One launch against two and the launch knobs: tests/codegen/test_threshold_ffn_launches.py.
"""

import dataclasses

import pytest
import torch
from hypothesis import assume, given, strategies as st

from sparsecc.codegen.activation_sparse import ACTIVATIONS, MAX_DECODE_TOKENS, GemvConfig
from tests.codegen.test_ffn_kernels import FEW, KERNEL_DTYPES, assert_close_scaled, gap_tau, pick_tau, randn
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select="interp")


def as_dtype(tau, dtype):
    """tau as torch compares it with a ``dtype`` tensor (converted to the dtype)."""
    return float(torch.tensor(tau, dtype=dtype))


def expected(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down):
    """float64 oracle of docs/spec.md with explicit keep masks; returns (y, h, input keep, h keep)."""
    dtype = x.dtype
    x64 = x.double().reshape(-1, x.shape[-1])
    keep_x = x64.abs() > as_dtype(tau_input, dtype)
    xt = torch.where(keep_x, x64, torch.zeros_like(x64))

    def rounded(v):
        return v.to(dtype).double()

    gate = rounded(xt @ wg.double().T + (0 if bg is None else bg.double()))
    up = rounded(xt @ wu.double().T + (0 if bu is None else bu.double()))
    h = rounded(rounded(ACTIVATIONS[act](gate)) * up)
    keep_h = h.abs() > as_dtype(tau_down, dtype)
    y = torch.where(keep_h, h, torch.zeros_like(h)) @ wd.double().T + (0 if bd is None else bd.double())
    return y.reshape(*x.shape[:-1], wd.shape[0]), h, keep_x, keep_h


def make_ffn(gen, m, d, f, d_out, biases, dtype, device="cpu"):
    x = randn(gen, m, d, dtype=dtype, device=device)
    wg = randn(gen, f, d, dtype=dtype, device=device, scale=d ** -0.5)
    wu = randn(gen, f, d, dtype=dtype, device=device, scale=d ** -0.5)
    wd = randn(gen, d_out, f, dtype=dtype, device=device, scale=f ** -0.5)
    bg = randn(gen, f, dtype=dtype, device=device, scale=0.5) if biases else None
    bu = randn(gen, f, dtype=dtype, device=device, scale=0.5) if biases else None
    bd = randn(gen, d_out, dtype=dtype, device=device) if biases else None
    return x, wg, bg, wu, bu, wd, bd


def small_configs(compact=True):
    """Small launch knobs, so tiny shapes span several programs, splits of D and down splits; ``compact``: both
    stages list survivors first (else they visit every chunk, predicated)."""
    return (GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, COMPACT=compact),
            GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, COMPACT=compact))


def counters_at_zero():
    from sparsecc.codegen import launch
    return all(int(buf.count_nonzero()) == 0 for bufs in launch._COUNTERS.values() for buf in bufs)


# ------------------------------------------------------------------ interpreter


ONE_OR_MORE_TOKENS = st.one_of(st.just(1), st.integers(1, MAX_DECODE_TOKENS))   # one token often: DOT acts there


@FEW
@given(m=ONE_OR_MORE_TOKENS, d=st.integers(1, 48), f=st.integers(1, 48), d_out=st.integers(1, 40),
       biases=st.booleans(), act=st.sampled_from(sorted(ACTIVATIONS)), dtype=st.sampled_from(KERNEL_DTYPES),
       sparsity_in=st.floats(0.0, 0.95), sparsity_h=st.floats(0.0, 0.95), compact=st.booleans(),
       dot=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_interp_threshold_ffn_kernel(interpreter, m, d, f, d_out, biases, act, dtype, sparsity_in, sparsity_h,
                                     compact, dot, seed):
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(seed)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, d, f, d_out, biases, dtype)
    # x is the input itself, compared exactly by kernel and oracle: any quantile is a safe tau.
    tau_input = float(torch.quantile(x.abs().double().flatten(), sparsity_in))
    _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, act, tau_input, -1.0)
    tau_down = pick_tau(h.abs(), sparsity_h, dtype)
    assume(tau_down is not None)
    ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down)
    # The form drops something and the output still depends on kept inputs (else the draw tests nothing).
    assume(not bool(keep_x.all() and keep_h.all()) and bool(keep_h.any()))
    # dot: one token multiplies through tl.dot in both stages (more tokens always do, without PER_TOKEN).
    cfg, down = (dataclasses.replace(c, DOT=dot) for c in small_configs(compact))
    out = torch.full((m, d_out), float("nan"), dtype=dtype)
    y = threshold_ffn(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down, config=cfg, down_config=down, out=out)
    assert_close_scaled(y, ref, dtype)
    assert counters_at_zero()


@pytest.mark.parametrize("d", [16, 40])
@pytest.mark.parametrize("m,per_token", [(1, False), (3, False), (3, True)])
def test_interp_stage_one_zeroes_the_down_gemvs_counters(interpreter, m, per_token, d):
    """Stage 1's first program zeroes the down GEMV's ticket counters (a compiled call then allocates them without
    a fill), with or without D splits of its own (their counters are another buffer): counters left non-zero by
    something else still give the oracle's y, and end at zero. Without the zeroing the down merge would miscount
    its splits."""
    from sparsecc.codegen import launch
    from sparsecc.codegen.activation_sparse import gemv_ticket_count
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(3)
    f, d_out = 48, 40   # stage 1: 1 or 3 splits of D; the down GEMV: 3 K splits of 16, 3 N tiles of 16
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, d, f, d_out, True, torch.float32)
    cfg, down = small_configs()
    down = dataclasses.replace(down, PER_TOKEN=per_token)
    n = gemv_ticket_count(m, f, d_out, down)
    assert n == 3 * (m if per_token else 1)   # one per N tile of the down GEMV, and per token where they split
    tau_input = float(torch.quantile(x.abs().flatten(), 0.3))
    _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, -1.0)
    tau_down = pick_tau(h.abs(), 0.5, torch.float32)
    ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert 0 < int(keep_x.sum()) < keep_x.numel() and 0 < int(keep_h.sum()) < keep_h.numel()   # the form applies
    # the cached counters the down GEMV will use, made non-zero
    launch.ticket_counters(n, x, zeroed_by_earlier_launch=True)[:n].fill_(2)
    y = threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down, config=cfg, down_config=down)
    assert_close_scaled(y, ref, torch.float32)
    assert counters_at_zero()


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_interp_reads_only_surviving_rows(interpreter, m, compact, dot):
    """Weight rows of input channels no token keeps, and down columns of neurons no token keeps, are NaN.

    Any such row or column that were read would turn the output NaN. The form is applied: both masks drop
    something, and the oracle computed on the clean weights differs from the dense FFN.
    """
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(21 + m)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 48, 40, 24, True, torch.bfloat16)
    dead_in = torch.arange(48) % 3 == 0
    x[:, dead_in] = x[:, dead_in].clamp(-0.05, 0.05)   # below tau_input for every token
    dead_h = torch.arange(40) % 4 == 1
    wg[dead_h] = 0
    bg[dead_h] = 0                                      # silu(0) = 0: h = 0, below tau_down
    tau_input, tau_down = 0.1, 0.01
    ref, h, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert not bool(keep_x[:, dead_in].any()) and not bool(keep_h[:, dead_h].any())
    dense, _, _, _ = expected(x, wg, bg, wu, bu, wd, bd, "silu", -1.0, -1.0)
    assert not torch.allclose(ref, dense)
    wg_bad, wu_bad, wd_bad = wg.clone(), wu.clone(), wd.clone()
    wg_bad[:, dead_in] = float("nan")
    wu_bad[:, dead_in] = float("nan")
    wd_bad[:, dead_h] = float("nan")
    cfg, down = (dataclasses.replace(c, DOT=dot) for c in small_configs(compact))
    y = threshold_ffn(x, wg_bad, bg, wu_bad, bu, wd_bad, bd, "silu", tau_input, tau_down, config=cfg,
                      down_config=down)
    assert_close_scaled(y, ref, torch.bfloat16)


def expected_weighted(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down):
    """float64 oracle of docs/spec.md, criterion weighted: each projection keeps channel i of its input iff
    ``|v_i| * ||W[:, i]||_2 > tau`` with its own weight W; returns (y, h, gate keep, up keep, h keep)."""
    dtype = x.dtype
    x64 = x.double().reshape(-1, x.shape[-1])
    keep_g = x64.abs() * wg.double().norm(dim=0) > tau_input
    keep_u = x64.abs() * wu.double().norm(dim=0) > tau_input

    def rounded(v):
        return v.to(dtype).double()

    gate = rounded((x64 * keep_g) @ wg.double().T + (0 if bg is None else bg.double()))
    up = rounded((x64 * keep_u) @ wu.double().T + (0 if bu is None else bu.double()))
    h = rounded(rounded(ACTIVATIONS[act](gate)) * up)
    keep_h = h.abs() * wd.double().norm(dim=0) > tau_down
    y = (h * keep_h) @ wd.double().T + (0 if bd is None else bd.double())
    return y.reshape(*x.shape[:-1], wd.shape[0]), h, keep_g, keep_u, keep_h


def weighted_taus(x, wg, bg, wu, bu, wd, bd, act, sparsity_in, sparsity_h, dtype):
    """``(tau_input, tau_down)`` for the weighted criterion near the given shares of its own scores, each in a gap
    between two scores (hypothesis skips the draw where there is none).

    h is rounded to the dtype by kernel and oracle alike, but their float32 / float64 sums may round it one unit
    apart: tau_down takes pick_tau's margin, on the score scaled by the down weight's norms.
    """
    x64 = x.double()
    tau_input = gap_tau(torch.cat([x64.abs() * wg.double().norm(dim=0), x64.abs() * wu.double().norm(dim=0)]),
                        sparsity_in)
    assume(tau_input is not None)
    _, h, _, _, _ = expected_weighted(x, wg, bg, wu, bu, wd, bd, act, tau_input, -1.0)
    tau_down = pick_tau(h.abs() * wd.double().norm(dim=0), sparsity_h, dtype)
    assume(tau_down is not None)
    return tau_input, tau_down


def spread_columns(gen, w):
    """``w`` with its columns scaled over two orders of magnitude (so weighted and magnitude scores differ)."""
    k = w.shape[1]
    return (w.double() * torch.logspace(-1, 1, k, dtype=torch.float64)[torch.randperm(k, generator=gen)]).to(w.dtype)


def norms32(w):
    from sparsecc.passes.ffn import column_norms
    return column_norms(w)


@FEW
@given(m=ONE_OR_MORE_TOKENS, d=st.integers(2, 48), f=st.integers(2, 48), d_out=st.integers(1, 40),
       biases=st.booleans(), act=st.sampled_from(sorted(ACTIVATIONS)), dtype=st.sampled_from(KERNEL_DTYPES),
       sparsity_in=st.floats(0.05, 0.95), sparsity_h=st.floats(0.05, 0.95), compact=st.booleans(),
       dot=st.booleans(), seed=st.integers(0, 10 ** 6))
def test_interp_threshold_ffn_kernel_weighted(interpreter, m, d, f, d_out, biases, act, dtype, sparsity_in,
                                              sparsity_h, compact, dot, seed):
    """criterion weighted: gate and up keep different channels of x, each by its own column norms."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(seed)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, d, f, d_out, biases, dtype)
    wg, wu, wd = spread_columns(gen, wg), spread_columns(gen, wu), spread_columns(gen, wd)
    tau_input, tau_down = weighted_taus(x, wg, bg, wu, bu, wd, bd, act, sparsity_in, sparsity_h, dtype)
    ref, _, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down)
    # Both thresholds lie between two scores: each drops something (the form is applied) and keeps something.
    assert not bool((keep_g & keep_u).all()) and bool((keep_g | keep_u).any())
    assert 0 < int(keep_h.sum()) < keep_h.numel()
    cfg, down = (dataclasses.replace(c, DOT=dot) for c in small_configs(compact))
    out = torch.full((m, d_out), float("nan"), dtype=dtype)
    y = threshold_ffn(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down, config=cfg, down_config=down, out=out,
                      scale_gate=norms32(wg), scale_up=norms32(wu), scale_down=norms32(wd))
    assert_close_scaled(y, ref, dtype)
    assert counters_at_zero()


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_interp_weighted_reads_each_projections_own_rows(interpreter, m, compact, dot):
    """A channel the gate drops but up keeps (and the other way round) has a NaN row in the dropping weight only.

    Reading a dropped row would turn the output NaN; the masks of the two projections differ on those channels,
    and the result differs from the magnitude criterion's at the same tau.
    """
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(41 + m)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 48, 40, 24, True, torch.bfloat16)
    x = x.sign() * (x.abs() + 0.5)                   # every |x| above 0.5
    gate_light = torch.arange(48) % 4 == 0
    up_light = torch.arange(48) % 4 == 1
    wg, wu = wg.double(), wu.double()
    wg[:, gate_light] *= 1e-3
    wu[:, up_light] *= 1e-3
    wg, wu = wg.to(torch.bfloat16), wu.to(torch.bfloat16)
    tau_input, tau_down = 0.05, 1e-4
    ref, h, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert not bool(keep_g[:, gate_light].any()) and bool(keep_u[:, gate_light].all())
    assert not bool(keep_u[:, up_light].any()) and bool(keep_g[:, up_light].all())
    magnitude, *_ = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert not torch.allclose(ref, magnitude)
    wg_bad, wu_bad = wg.clone(), wu.clone()
    wg_bad[:, gate_light] = float("nan")
    wu_bad[:, up_light] = float("nan")
    cfg, down = (dataclasses.replace(c, DOT=dot) for c in small_configs(compact))
    y = threshold_ffn(x, wg_bad, bg, wu_bad, bu, wd, bd, "silu", tau_input, tau_down, config=cfg, down_config=down,
                      scale_gate=norms32(wg), scale_up=norms32(wu), scale_down=norms32(wd))
    assert_close_scaled(y, ref, torch.bfloat16)


@pytest.mark.parametrize("dot", [False, True])
def test_interp_weighted_lists_each_projections_rows_over_long_splits(interpreter, dot):
    """One token, D = 2600 over stage 1's 4096-channel split (a list of several 1024-channel pieces, the last cut by
    D): in every piece a channel the gate drops but up keeps, and the other way round, has a NaN row in the dropping
    weight only, so the list's per-projection bits must be right in every piece."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(61 + dot)
    d = 2600
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 1, d, 32, 16, True, torch.float32)
    x = x.sign() * (x.abs() + 0.5)                   # every |x| above 0.5
    gate_light = torch.arange(d) % 5 == 0
    up_light = torch.arange(d) % 5 == 1
    wg[:, gate_light] *= 1e-3
    wu[:, up_light] *= 1e-3
    tau_input, tau_down = 0.01, 1e-6
    ref, h, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert not bool(keep_g[:, gate_light].any()) and bool(keep_u[:, gate_light].all())
    assert not bool(keep_u[:, up_light].any()) and bool(keep_g[:, up_light].all())
    wg_bad, wu_bad = wg.clone(), wu.clone()
    wg_bad[:, gate_light] = float("nan")
    wu_bad[:, up_light] = float("nan")
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=128, ROWS_PER_SPLIT=4096, num_warps=4, DOT=dot)
    down = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, DOT=dot)
    y = threshold_ffn(x, wg_bad, bg, wu_bad, bu, wd, bd, "silu", tau_input, tau_down, config=cfg, down_config=down,
                      scale_gate=norms32(wg), scale_up=norms32(wu), scale_down=norms32(wd))
    assert_close_scaled(y, ref, torch.float32)


@pytest.mark.parametrize("m", [1, 5])
def test_interp_default_configs_and_k_major_weights(interpreter, m):
    """Default launch knobs, weights given as .t() views of K-major buffers (as the compiler binds them)."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn, threshold_ffn_ref
    gen = torch.Generator().manual_seed(30 + m)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 64, 96, 48, True, torch.float32)
    km = [w.t().contiguous().t() for w in (wg, wu, wd)]
    tau_input = float(torch.quantile(x.abs().flatten(), 0.5))
    _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, "gelu", tau_input, -1.0)
    tau_down = pick_tau(h.abs(), 0.5, torch.float32)
    y = threshold_ffn(x, km[0], bg, km[1], bu, km[2], bd, "gelu", tau_input, tau_down)
    ref, *_ = expected(x, wg, bg, wu, bu, wd, bd, "gelu", tau_input, tau_down)
    assert_close_scaled(y, ref, torch.float32)
    torch.testing.assert_close(y, threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act="gelu", tau_input=tau_input,
                                                    tau_down=tau_down), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ reference, dispatch and errors (no Triton run)


def test_reference_matches_the_written_out_oracle():
    """``threshold_ffn_ref`` in float64 is the oracle's formula (no rounding to compare against)."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref
    gen = torch.Generator().manual_seed(4)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 3, 16, 24, 8, True, torch.float64)
    got = threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act="silu", tau_input=0.7, tau_down=0.05)
    ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, "silu", 0.7, 0.05)
    assert 0 < int(keep_x.sum()) < keep_x.numel() and 0 < int(keep_h.sum()) < keep_h.numel()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_weighted_reference_matches_the_written_out_oracle():
    """``threshold_ffn_ref`` with column norms in float64 is the weighted oracle's formula; gate and up differ."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref
    gen = torch.Generator().manual_seed(9)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 3, 16, 24, 8, True, torch.float64)
    wg, wu, wd = spread_columns(gen, wg), spread_columns(gen, wu), spread_columns(gen, wd)
    got = threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act="silu", tau_input=0.7, tau_down=0.05,
                            scale_gate=wg.norm(dim=0), scale_up=wu.norm(dim=0), scale_down=wd.norm(dim=0))
    ref, _, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, "silu", 0.7, 0.05)
    assert not torch.equal(keep_g, keep_u) and 0 < int(keep_h.sum()) < keep_h.numel()
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_zero_thresholds_change_nothing_but_exact_zeros():
    """tau = 0 drops only exact zeros, so the result is the dense FFN (metamorphic)."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref
    gen = torch.Generator().manual_seed(5)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 2, 16, 24, 8, True, torch.float64)
    dense = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(x, wg, bg)) * torch.nn.functional.linear(x, wu, bu),
        wd, bd)
    got = threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act="silu", tau_input=0.0, tau_down=0.0)
    torch.testing.assert_close(got, dense, atol=1e-12, rtol=1e-12)


def test_many_tokens_and_float64_run_the_reference():
    pytest.importorskip("triton")
    from sparsecc.codegen.threshold_ffn import threshold_ffn, threshold_ffn_ref
    gen = torch.Generator().manual_seed(6)
    for m, dtype in ((MAX_DECODE_TOKENS + 1, torch.float32), (2, torch.float64)):
        x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 16, 24, 8, True, dtype)
        got = threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.3, 0.02)
        torch.testing.assert_close(got, threshold_ffn_ref(x, wg, bg, wu, bu, wd, bd, act="silu", tau_input=0.3,
                                                          tau_down=0.02))


def test_threshold_ffn_rejects_bad_arguments():
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(8)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 1, 16, 24, 8, True, torch.float32)
    with pytest.raises(ValueError, match="act='swish' is not allowed"):
        threshold_ffn(x, wg, bg, wu, bu, wd, bd, "swish", 0.1, 0.1)
    with pytest.raises(ValueError, match="w_up must have shape"):
        threshold_ffn(x, wg, bg, wu[:5], bu, wd, bd, "silu", 0.1, 0.1)
    with pytest.raises(ValueError, match="w_down must have 24 input features"):
        threshold_ffn(x, wg, bg, wu, bu, wd[:, :5], bd, "silu", 0.1, 0.1)
    with pytest.raises(ValueError, match="b_up must have shape"):
        threshold_ffn(x, wg, bg, wu, bu[:3], wd, bd, "silu", 0.1, 0.1)
    with pytest.raises(ValueError, match="w_up is None"):
        threshold_ffn(x, wg, bg, None, None, wd, bd, "silu", 0.1, 0.1)
    with pytest.raises(ValueError, match="scale_gate and scale_up are given together"):
        threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.1, 0.1, scale_gate=torch.ones(16))
    with pytest.raises(ValueError, match=r"scale_down must have shape \[24\]"):
        threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.1, 0.1, scale_down=torch.ones(16))


def test_stage_one_refuses_a_tile_too_narrow_for_the_token_union():
    """2-16 tokens run stage 1 on tl.dot whatever GemvConfig.DOT says: a tile under 16 wide is refused by name
    before any launch; one token multiplies per lane and takes it."""
    from sparsecc.codegen.threshold_ffn import stage_one_block_m
    narrow = GemvConfig(BLOCK_N=16, BLOCK_K=8, ROWS_PER_SPLIT=16, num_warps=4)
    assert stage_one_block_m(1, narrow) == 1
    with pytest.raises(ValueError, match=r"for 3 token\(s\) multiplies with tl.dot.*BLOCK_K=8"):
        stage_one_block_m(3, narrow)


@pytest.mark.parametrize("op", ["threshold_ffn", "gate_sparse_ffn"])
def test_a_down_tile_too_narrow_for_the_token_union_is_refused_before_any_launch(op, monkeypatch):
    """The FFNs plan the down GEMV (``gemv_grid``) before stage 1 launches: nothing runs with a config that fails."""
    from sparsecc.codegen import activation_sparse, gate_sparse_ffn, threshold_ffn
    launched = []
    monkeypatch.setattr(activation_sparse, "launcher", lambda kernel, like: launched.append(kernel))
    monkeypatch.setattr(threshold_ffn, "launcher", lambda kernel, like: launched.append(kernel))
    monkeypatch.setattr(gate_sparse_ffn, "launcher", lambda kernel, like: launched.append(kernel))
    gen = torch.Generator().manual_seed(8)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 3, 16, 24, 8, True, torch.float32)
    narrow = GemvConfig(BLOCK_N=8, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4)
    with pytest.raises(ValueError, match=r"for 3 token\(s\) multiplies with tl.dot.*BLOCK_N=8"):
        if op == "threshold_ffn":
            threshold_ffn.threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.1, 0.1, down_config=narrow)
        else:
            gate_sparse_ffn.gate_sparse_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.1, down_config=narrow)
    assert launched == []


# ------------------------------------------------------------------ GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_threshold_ffn_gpu(dtype, m, sparsity):
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator(device="cuda").manual_seed(m + int(100 * sparsity))
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 4096, 14336, 4096, True, dtype, "cuda")
    # float32 oracle on the GPU, rounding where the model rounds; thresholds at the sparsity quantiles.
    tau_input = float(torch.quantile(x.float().abs().flatten(), sparsity))
    xt = x.float() * (x.float().abs() > as_dtype(tau_input, dtype))
    gate = (xt @ wg.float().T + bg.float()).to(dtype).float()
    up = (xt @ wu.float().T + bu.float()).to(dtype).float()
    h = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype).float()
    tau_down = float(torch.quantile(h.abs().flatten()[:2 ** 20], sparsity))
    ref = (h * (h.abs() > as_dtype(tau_down, dtype))) @ wd.float().T + bd.float()
    out = torch.full((m, 4096), float("nan"), dtype=dtype, device="cuda")
    y = threshold_ffn(x, wg.t().contiguous().t(), bg, wu.t().contiguous().t(), bu, wd.t().contiguous().t(), bd,
                      "silu", tau_input, tau_down, out=out)
    assert bool(torch.isfinite(y).all())
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
    assert counters_at_zero()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4])
def test_threshold_ffn_weighted_gpu(dtype, m):
    """criterion weighted at Llama-3-8B shapes (column norms spread 100x), 70% of the scores dropped."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    from sparsecc.passes.ffn import column_norms
    gen = torch.Generator(device="cuda").manual_seed(50 + m)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 4096, 14336, 4096, True, dtype, "cuda")
    spread = torch.logspace(-1, 1, 4096, device="cuda")
    wg, wu = (wg.float() * spread).to(dtype), (wu.float() * spread.flip(0)).to(dtype)
    sg, su, sd = column_norms(wg), column_norms(wu), column_norms(wd)
    xa = x.float().abs()
    tau_input = float(torch.quantile(torch.cat([xa * sg, xa * su]).flatten(), 0.7))
    xg, xu = x.float() * (xa * sg > tau_input), x.float() * (xa * su > tau_input)
    gate = (xg @ wg.float().T + bg.float()).to(dtype).float()
    up = (xu @ wu.float().T + bu.float()).to(dtype).float()
    h = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype).float()
    hs = h.abs() * sd
    tau_down = float(torch.quantile(hs.flatten()[:2 ** 20], 0.7))
    ref = (h * (hs > tau_down)) @ wd.float().T + bd.float()
    out = torch.full((m, 4096), float("nan"), dtype=dtype, device="cuda")
    y = threshold_ffn(x, wg.t().contiguous().t(), bg, wu.t().contiguous().t(), bu, wd.t().contiguous().t(), bd,
                      "silu", tau_input, tau_down, out=out, scale_gate=sg, scale_up=su, scale_down=sd)
    assert bool(torch.isfinite(y).all())
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
    assert counters_at_zero()
