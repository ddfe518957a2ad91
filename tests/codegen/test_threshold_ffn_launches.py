"""Launch choices of the input-mode (TEAL) fused FFN (codegen/threshold_ffn.py): one launch against two, the ``DOT``
and ``PER_TOKEN`` knobs reaching the launches, the one-launch kernel compiled for sm_90 and replayed on a GPU.

Oracles as in tests/codegen/test_threshold_ffn.py (docs/spec.md, "activation_threshold", mode input, in float64 on
explicit keep masks). CPU: the Triton kernels run in Triton's interpreter at tiny shapes, in a child process
(tests/interpreter.py). GPU (``gpu`` marker): Llama-3-8B shapes.
"""

import pytest
import torch
from hypothesis import assume, given, strategies as st

from sparsecc.codegen.activation_sparse import ACTIVATIONS, GemvConfig
from tests.codegen.test_ffn_kernels import FEW, KERNEL_DTYPES, assert_close_scaled, gap_tau, pick_tau
from tests.codegen.test_threshold_ffn import (as_dtype, counters_at_zero, expected, expected_weighted, make_ffn,
                                              norms32, spread_columns, weighted_taus)
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

gpu = pytest.mark.gpu


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select="interp")


@FEW
@given(d=st.integers(1, 48), f=st.integers(1, 48), d_out=st.integers(1, 40), biases=st.booleans(),
       act=st.sampled_from(sorted(ACTIVATIONS)), dtype=st.sampled_from(KERNEL_DTYPES), weighted=st.booleans(),
       rows=st.sampled_from([16, 64]), down_rows=st.sampled_from([16, 32]), sparsity_in=st.floats(0.05, 0.95),
       sparsity_h=st.floats(0.05, 0.95), dots=st.sampled_from([(False, False), (True, False), (False, True),
                                                                (True, True)]), seed=st.integers(0, 10 ** 6))
def test_interp_one_launch_is_the_two_launches_bit_for_bit(interpreter, d, f, d_out, biases, act, dtype, weighted,
                                                            rows, down_rows, sparsity_in, sparsity_h, dots, seed):
    """One token's FFN in one launch (work by ticket, the down splits waiting on their f tiles) returns exactly
    the two launches' numbers, which match the float64 oracle of its criterion; every counter is back at zero after
    it.

    D and F span one or several splits of either stage (16-row splits), so the stage-1 merge, the down merge and
    several down splits waiting on their own tiles all run. ``dots``: stage 1's and the down GEMV's ``DOT`` knob.
    Thresholds lie between two scores (weighted: of the weighted scores), and both drop something and keep something.
    """
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    gen = torch.Generator().manual_seed(seed)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 1, d, f, d_out, biases, dtype)
    scales = {}
    if weighted:
        scales = dict(scale_gate=norms32(wg), scale_up=norms32(wu), scale_down=norms32(wd))
        tau_input, tau_down = weighted_taus(x, wg, bg, wu, bu, wd, bd, act, sparsity_in, sparsity_h, dtype)
        ref, _, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down)
        input_applied = not bool((keep_g & keep_u).all()) and bool((keep_g | keep_u).any())
    else:
        tau_input = float(torch.quantile(x.abs().double().flatten(), sparsity_in))
        _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, act, tau_input, -1.0)
        tau_down = pick_tau(h.abs(), sparsity_h, dtype)
        assume(tau_down is not None)
        ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down)
        input_applied = 0 < int(keep_x.sum()) < keep_x.numel()
    # The form applies: a draw whose thresholds drop nothing or keep nothing is skipped.
    assume(input_applied and 0 < int(keep_h.sum()) < keep_h.numel())
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=rows, num_warps=4, DOT=dots[0])
    down = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=down_rows, num_warps=4, DOT=dots[1])
    one = threshold_ffn(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down, config=cfg, down_config=down,
                        one_launch=True, **scales)
    assert counters_at_zero()
    two = threshold_ffn(x, wg, bg, wu, bu, wd, bd, act, tau_input, tau_down, config=cfg, down_config=down,
                        one_launch=False, **scales)
    assert torch.equal(one, two)
    assert_close_scaled(one, ref, dtype)


@pytest.mark.parametrize("by_default", [True, False])
def test_interp_one_launch_by_default_for_one_token(interpreter, monkeypatch, by_default):
    """With ``ONE_LAUNCH_BY_DEFAULT`` one token with the default knobs takes the one-launch kernel, more tokens the
    two launches; without it, two launches."""
    from sparsecc.codegen import threshold_ffn as module
    monkeypatch.setattr(module, "ONE_LAUNCH_BY_DEFAULT", by_default)
    launched = []
    real = module.launcher

    def spy(kernel, *like):
        launched.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        return real(kernel, *like)

    monkeypatch.setattr(module, "launcher", spy)
    gen = torch.Generator().manual_seed(3)
    for m in (1, 2):
        x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 32, 128, 16, True, torch.float32)
        module.threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.3, 0.02)
    first = "_threshold_ffn_kernel" if by_default else "_threshold_gate_up_kernel"
    assert launched == [first, "_threshold_gate_up_kernel"], launched


@pytest.mark.parametrize("m", [1, 3])
def test_interp_per_token_knob_leaves_stage_one_on_every_token(interpreter, m):
    """Stage 1's grid has no token axis: a config with ``PER_TOKEN`` (for the down GEMV's per-token programs), passed
    for both stages, still computes every token's h, and y matches the float64 oracle row by row."""
    from sparsecc.codegen.threshold_ffn import stage_one_block_m, threshold_ffn
    gen = torch.Generator().manual_seed(13 + m)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, m, 32, 32, 16, True, torch.float32)
    tau_input = float(torch.quantile(x.abs().double().flatten(), 0.4))
    _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, -1.0)
    tau_down = pick_tau(h.abs(), 0.4, torch.float32)
    assert tau_down is not None
    ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert 0 < int(keep_x.sum()) < keep_x.numel() and 0 < int(keep_h.sum()) < keep_h.numel()
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, PER_TOKEN=True)
    assert stage_one_block_m(m, cfg) == (1 if m == 1 else 16)
    out = torch.full((m, 16), float("nan"))
    y = threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down, config=cfg, down_config=cfg, out=out)
    for row in range(m):
        assert_close_scaled(y[row:row + 1], ref[row:row + 1], torch.float32)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_dot_knob_puts_one_token_on_tl_dot(interpreter, monkeypatch, dtype, one_launch, weighted):
    """``GemvConfig.DOT`` reaches the launches: one token's stage 1 and down GEMV run with 16 padded rows (the
    ``tl.dot`` path) where their config says DOT, one row otherwise, and y matches the float64 oracle either way,
    with either criterion (weighted: gate and up keep different channels, read off the survivor list's bits)."""
    from sparsecc.codegen import activation_sparse, threshold_ffn as module
    launched = []

    def spying(real):
        def spy(kernel, *like):
            launch = real(kernel, *like)
            name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__

            class Indexed:
                def __getitem__(self, grid):
                    def call(*args, **kwargs):
                        launched.append((name, kwargs.get("BLOCK_M"), kwargs.get("DOWN_BLOCK_M")))
                        return launch[grid](*args, **kwargs)
                    return call
            return Indexed()
        return spy

    monkeypatch.setattr(module, "launcher", spying(module.launcher))
    monkeypatch.setattr(activation_sparse, "launcher", spying(activation_sparse.launcher))
    gen = torch.Generator().manual_seed(5)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 1, 32, 48, 24, True, dtype)
    scales = {}
    if weighted:
        wg, wu, wd = spread_columns(gen, wg), spread_columns(gen, wu), spread_columns(gen, wd)
        scales = dict(scale_gate=norms32(wg), scale_up=norms32(wu), scale_down=norms32(wd))
        x64 = x.double()
        tau_input = gap_tau(torch.cat([x64.abs() * wg.double().norm(dim=0), x64.abs() * wu.double().norm(dim=0)]),
                            0.5)
        _, h, _, _, _ = expected_weighted(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, -1.0)
        tau_down = pick_tau(h.abs() * wd.double().norm(dim=0), 0.5, dtype)
        ref, _, keep_g, keep_u, keep_h = expected_weighted(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
        assert not bool((keep_g == keep_u).all())   # the projections keep different channels
        keep_x = keep_g | keep_u
    else:
        tau_input = float(torch.quantile(x.abs().double().flatten(), 0.5))
        _, h, _, _ = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, -1.0)
        tau_down = pick_tau(h.abs(), 0.5, dtype)
        ref, _, keep_x, keep_h = expected(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down)
    assert tau_input is not None and tau_down is not None
    # The form is applied: both thresholds drop channels and keep some.
    assert 0 < int(keep_x.sum()) < keep_x.numel() and 0 < int(keep_h.sum()) < keep_h.numel()
    for dots in ((False, False), (True, False), (False, True), (True, True)):
        launched.clear()
        cfg = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, DOT=dots[0])
        down = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, DOT=dots[1])
        y = module.threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", tau_input, tau_down, config=cfg,
                                 down_config=down, one_launch=one_launch, **scales)
        rows = [16 if dot else 1 for dot in dots]
        if one_launch:
            assert launched == [("_threshold_ffn_kernel", rows[0], rows[1])], launched
        else:
            assert launched == [("_threshold_gate_up_kernel", rows[0], None),
                                ("_threshold_gemv_kernel", rows[1], None)], launched
        assert_close_scaled(y, ref, dtype)
    assert counters_at_zero()


_SM90_CHILD = """
import json, torch
from tests import sm90
sm90.install()
from sparsecc.codegen import threshold_ffn as tf
tf._bind()
d, f, n = 4096, 14336, 4096
x, h, y = (torch.empty(1, w, dtype=torch.float16) for w in (d, f, n))
wg, wd = torch.empty(d, f, dtype=torch.float16), torch.empty(f, n, dtype=torch.float16)
i32, f32, scale = torch.empty(16, dtype=torch.int32), torch.empty(16), torch.empty(f)
out = {}
# (name, D split, weighted, one down split storing y directly, rows per program: 16 is the DOT knob's tl.dot):
# where neither merge runs, the only loads past L1 are the down programs' reads of h.
for name, split, weighted, direct, rows in (("direct", False, False, True, 1), ("split_weighted", True, True, False, 1),
                                            ("direct_dot", False, False, True, 16)):
    s = scale if weighted else x
    k = tf._threshold_ffn_kernel.warmup(
        x, wg, x, wg, x, h, i32, f32 if split else x, s, s, wd, x, s, y, i32, x if direct else f32, i32,
        2048 if direct else f, d, n, 0.5, 0.5, 1, f, 1, f, 1, n, 1, 32 if direct else 224, 2 if split else 1, 64,
        1 if direct else 7, BLOCK_N=64, BLOCK_K=128, ROWS_PER_SPLIT=2048 if split else 4096, SPLIT=split,
        HAS_BG=False, HAS_BU=False, ACTIVATION="silu", ROUND_BY_BITS=False, HAS_SCALE=weighted, DOWN_BLOCK_N=64,
        DOWN_BLOCK_K=128, DOWN_ROWS=2048, DOWN_DIRECT=direct, HAS_BD=False, HAS_SCALE_DOWN=weighted, BLOCK_M=rows,
        DOWN_BLOCK_M=rows, DOT_IN_FP32=False, num_warps=4, num_stages=3, grid=(1,))
    out[name] = dict(ptx=k.asm["ptx"], cubin=len(k.asm["cubin"]))
print("RESULT" + json.dumps(out))
"""


def test_one_launch_kernel_compiles_for_sm90_with_its_synchronisation():
    """The one-launch kernel compiled for sm_90 by the installed Triton (no GPU: tests/sm90.py's driver stub),
    with the memory orderings its waits rely on still in the PTX: a release add counting a stored f tile, relaxed
    reads of that count in the spin and one acquire read after it, and h read past L1 after the acquire. (The
    interpreter runs programs one by one, so it never waits: what a GPU needs is checked here and in the gpu
    tests.)"""
    import json
    import os
    import re
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.driver")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SM90_CHILD], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, f"sm_90 compile failed:\n{proc.stderr[-4000:]}"
    for name, kernel in json.loads(lines[-1][len("RESULT"):]).items():
        ops = [line.split()[1] if line.lstrip().startswith("@") else line.split()[0]
               for line in kernel["ptx"].splitlines() if line.strip() and not line.lstrip().startswith("//")]
        assert kernel["cubin"] > 0, name
        assert any(re.match(r"(red|atom)\.", op) and "release" in op for op in ops), name
        acquires = [i for i, op in enumerate(ops) if re.match(r"(ld|atom)\.", op) and "acquire" in op]
        assert len(acquires) == 1, (name, acquires)
        assert any(re.match(r"ld\.", op) and "relaxed" in op for op in ops[:acquires[0]]), name   # the spin
        past_l1 = [i for i, op in enumerate(ops) if op.startswith("ld.global.cg")]
        assert past_l1, name
        if name.startswith("direct"):   # no merge: these are all reads of h, each after the acquire
            assert min(past_l1) > acquires[0], name


def test_one_launch_refusals_name_the_knob():
    """``one_launch=True`` where one launch cannot serve raises, naming why; the refusal rule itself."""
    pytest.importorskip("triton")
    from sparsecc.codegen.threshold_ffn import one_launch_refusal, threshold_ffn
    base = GemvConfig(BLOCK_N=64, BLOCK_K=128, ROWS_PER_SPLIT=4096, num_warps=4)
    down = GemvConfig(BLOCK_N=64, BLOCK_K=128, ROWS_PER_SPLIT=2048, num_warps=4)
    assert one_launch_refusal(1, base, down) == ""
    assert "3 tokens" in one_launch_refusal(3, base, down)
    assert "predicated" in one_launch_refusal(1, GemvConfig(64, 128, 4096, 4, COMPACT=False), down)
    assert "8 warps" in one_launch_refusal(1, base, GemvConfig(64, 128, 2048, 8))
    assert "not whole f tiles" in one_launch_refusal(1, GemvConfig(128, 64, 4096, 4), GemvConfig(64, 64, 64, 4))
    # No down program would reset the counters stage 1 counts on (N = 0), or nothing would run (F = 0).
    assert "an empty FFN (F = 24, N = 0)" in one_launch_refusal(1, base, down, 24, 0)
    assert "empty FFN" in one_launch_refusal(1, base, down, 0, 8)
    gen = torch.Generator().manual_seed(12)
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 2, 16, 24, 8, True, torch.float32)
    with pytest.raises(ValueError, match=r"one_launch=True\): not with 2 tokens"):
        threshold_ffn(x, wg, bg, wu, bu, wd, bd, "silu", 0.1, 0.1, one_launch=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("shape", [(4096, 14336, 4096), (8192, 2048, 1024)])
def test_one_launch_replays_in_a_cuda_graph_gpu(dtype, sparsity, shape):
    """One token in one launch: matches the float32 oracle, equals the two launches bit for bit, and 50 replays of
    a CUDA graph of it (its counters reset by the kernel itself, never by a fill) give the eager result bit for
    bit (the merges sum in a fixed order, whichever program comes last). Llama-3-8B's FFN (7 down splits merged),
    and D 8192 (stage 1 split over D, its partials merged) into F 2048 (one down split storing y directly)."""
    from sparsecc.codegen.threshold_ffn import threshold_ffn
    d, f, d_out = shape
    gen = torch.Generator(device="cuda").manual_seed(7 + int(100 * sparsity))
    x, wg, bg, wu, bu, wd, bd = make_ffn(gen, 1, d, f, d_out, True, dtype, "cuda")
    tau_input = float(torch.quantile(x.float().abs().flatten(), sparsity))
    xt = x.float() * (x.float().abs() > as_dtype(tau_input, dtype))
    gate = (xt @ wg.float().T + bg.float()).to(dtype).float()
    up = (xt @ wu.float().T + bu.float()).to(dtype).float()
    h = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype).float()
    tau_down = float(torch.quantile(h.abs().flatten(), sparsity))
    keep_x, keep_h = x.float().abs() > as_dtype(tau_input, dtype), h.abs() > as_dtype(tau_down, dtype)
    assert 0 < int(keep_x.sum()) < keep_x.numel() and 0 < int(keep_h.sum()) < keep_h.numel()   # the form applies
    ref = (h * keep_h) @ wd.float().T + bd.float()
    km = [w.t().contiguous().t() for w in (wg, wu, wd)]

    def call(one_launch):
        return threshold_ffn(x, km[0], bg, km[1], bu, km[2], bd, "silu", tau_input, tau_down, one_launch=one_launch)

    eager = call(True)
    assert float((eager.double() - ref.double()).norm() / ref.double().norm()) < 1e-2
    assert torch.equal(eager, call(False))
    assert counters_at_zero()
    static = torch.empty_like(eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())   # the inputs are written on the current stream
    with torch.cuda.stream(stream):
        call(True)   # warm up on the capture stream (its own counters buffer)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            static.copy_(call(True))
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(50):
        static.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static, eager)
    torch.cuda.synchronize()
    assert counters_at_zero()
