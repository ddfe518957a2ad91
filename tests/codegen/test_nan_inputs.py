"""NaN inputs through the activation-threshold kernels: the same answer as docs/spec.md's formula.

docs/spec.md thresholds by multiplying: ``x * [score > tau]``. A NaN x has a NaN score, which is not above tau, and
NaN * 0 is NaN, so the formula (like the dense layer) carries the NaN into every output of its token, and the
token's batch-mates keep their own finite values. The oracles below write that formula out in float64 (a
multiplication by the keep mask, never a ``where``, which would drop the NaN). The kernels once dropped a NaN
channel as if it were below the threshold, so the answer depended on how many tokens came in one call (the
reference path, taken above 16 tokens, kept it).
CPU: the Triton kernels in the interpreter, in a child process (tests/interpreter.py).
"""

import pytest
import torch

from sparsecc.codegen.activation_sparse import ACTIVATIONS, GemvConfig
from tests.codegen.test_ffn_kernels import randn
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

D, F, N = 40, 48, 24


def test_interpreter_checks():
    run_interpreter_checks(__file__, select="interp", no_skips=True)


def _inputs(m, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, m, D, dtype=dtype)
    x[0, 5] = float("nan")                        # token 0 carries one NaN channel; the others none
    return gen, x


def _thresholded(v, tau, scale=None):
    """docs/spec.md: ``v * [score > tau]`` with score ``|v|`` or ``|v| * scale`` (float64, NaN kept as NaN * 0)."""
    score = v.abs() if scale is None else v.abs() * scale
    return v * (score > tau).double()


def _check(out, expected):
    nan = expected.isnan()
    assert bool(nan[0].all()) and not bool(nan[1:].any())          # the oracle itself: token 0 only
    assert torch.equal(out.isnan(), nan), out
    torch.testing.assert_close(out[1:].double(), expected[1:], rtol=1e-4, atol=1e-4)


def _gemv_configs():
    """Compacted and predicated, each with one token on per-lane tiles and on tensor cores (DOT), and per-token
    programs for several tokens (PER_TOKEN): every path a NaN can take."""
    return [GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, COMPACT=compact, DOT=dot,
                       PER_TOKEN=per_token)
            for compact in (True, False) for dot, per_token in ((False, False), (True, False), (False, True))]


# Thresholds that float16 holds exactly, so the kernels' comparisons in the input's dtype and the float64 formula's
# agree on the inputs (which the cases draw in the dtype they test).
def _linear_case(m, weighted, dtype=torch.float32):
    gen, x = _inputs(m, dtype=dtype)
    w = randn(gen, N, D, dtype=dtype, scale=D ** -0.5)
    bias = randn(gen, N, dtype=dtype)
    scale = w.double().norm(dim=0) if weighted else None
    tau = 0.375
    expected = _thresholded(x.double(), tau, scale) @ w.double().T + bias.double()
    return (x, w, bias, tau), dict(channel_scale=None if scale is None else scale.float()), expected


def _input_ffn_case(m, weighted, dtype=torch.float32):
    gen, x = _inputs(m, seed=1, dtype=dtype)
    wg, wu = (randn(gen, F, D, dtype=dtype, scale=D ** -0.5) for _ in range(2))
    wd = randn(gen, N, F, dtype=dtype, scale=F ** -0.5)
    scales = (wg.double().norm(dim=0), wu.double().norm(dim=0), wd.double().norm(dim=0)) if weighted else (None,) * 3
    tau_in, tau_down = 0.3125, 0.046875
    x64 = x.double()
    gate = _thresholded(x64, tau_in, scales[0]) @ wg.double().T
    up = _thresholded(x64, tau_in, scales[1]) @ wu.double().T
    h = ACTIVATIONS["silu"](gate) * up
    expected = _thresholded(h, tau_down, scales[2]) @ wd.double().T
    kwargs = {} if not weighted else dict(scale_gate=scales[0].float(), scale_up=scales[1].float(),
                                          scale_down=scales[2].float())
    return (x, wg, None, wu, None, wd, None), dict(act="silu", tau_input=tau_in, tau_down=tau_down, **kwargs), \
        expected


def _gate_ffn_case(m, gated, dtype=torch.float32):
    gen, x = _inputs(m, seed=2, dtype=dtype)
    wg = randn(gen, F, D, dtype=dtype, scale=D ** -0.5)
    wu = randn(gen, F, D, dtype=dtype, scale=D ** -0.5) if gated else None
    wd = randn(gen, N, F, dtype=dtype, scale=F ** -0.5)
    tau = 0.09375
    x64 = x.double()
    h = _thresholded(ACTIVATIONS["silu"](x64 @ wg.double().T), tau)
    if gated:
        h = h * (x64 @ wu.double().T)
    return (x, wg, None, wu, None, wd, None), dict(act="silu", tau=tau), h @ wd.double().T


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_interp_threshold_linear_carries_a_nan_input(interpreter, m, weighted):
    """m = 17 is past the kernels' token limit: the wrapper runs the reference, which must agree."""
    from sparsecc.codegen.activation_sparse import threshold_linear, threshold_linear_ref

    args, kwargs, expected = _linear_case(m, weighted)
    for cfg in _gemv_configs():
        _check(threshold_linear(*args, config=cfg, **kwargs), expected)
    _check(threshold_linear_ref(*args, **kwargs), expected)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_interp_threshold_ffn_carries_a_nan_input(interpreter, m, weighted):
    from sparsecc.codegen.threshold_ffn import threshold_ffn, threshold_ffn_ref

    args, kwargs, expected = _input_ffn_case(m, weighted)
    scales = {k: v for k, v in kwargs.items() if k.startswith("scale_")}
    for cfg in _gemv_configs():
        _check(threshold_ffn(*args, "silu", kwargs["tau_input"], kwargs["tau_down"], config=cfg, down_config=cfg,
                             **scales), expected)
    _check(threshold_ffn_ref(*args, **kwargs), expected)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("m", [1, 3, 17])
def test_interp_gate_sparse_ffn_carries_a_nan_input(interpreter, m, gated):
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn_ref
    from sparsecc.codegen.gate_sparse_ffn import GateConfig, gate_sparse_ffn

    args, kwargs, expected = _gate_ffn_case(m, gated)
    cfg = GateConfig(BLOCK_F=16, BLOCK_D=16, num_warps=4)
    _check(gate_sparse_ffn(*args, "silu", kwargs["tau"], config=cfg, down_config=_gemv_configs()[0]), expected)
    _check(gate_sparse_ffn_ref(*args, **kwargs), expected)


@pytest.mark.parametrize("m", [1, 17])
def test_the_references_carry_a_nan_input(m):
    """The CPU path (and kernels="reference") runs these references: the same answer as the formula."""
    from sparsecc.codegen.activation_sparse import threshold_linear_ref
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn_ref
    from sparsecc.codegen.threshold_ffn import threshold_ffn_ref

    for weighted in (False, True):
        args, kwargs, expected = _linear_case(m, weighted)
        _check(threshold_linear_ref(*args, **kwargs), expected)
        args, kwargs, expected = _input_ffn_case(m, weighted)
        _check(threshold_ffn_ref(*args, **kwargs), expected)
    for gated in (True, False):
        args, kwargs, expected = _gate_ffn_case(m, gated)
        _check(gate_sparse_ffn_ref(*args, **kwargs), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3])
def test_kernels_carry_a_nan_input_gpu(m):
    """The same cases compiled for CUDA with the default launch configs, in float16: the NaN token's outputs are
    all NaN, its batch-mates' are finite and match the formula (float16 tolerance)."""
    from sparsecc.codegen.activation_sparse import threshold_linear
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn
    from sparsecc.codegen.threshold_ffn import threshold_ffn

    def on_gpu(values):
        return [v.cuda() if isinstance(v, torch.Tensor) else v for v in values]

    def check(out, expected):
        nan = expected.isnan()
        assert torch.equal(out.isnan().cpu(), nan), out
        scale = expected[1:].abs().max().clamp_min(1.0) if m > 1 else 1.0
        torch.testing.assert_close(out[1:].double().cpu(), expected[1:], rtol=0, atol=2e-2 * float(scale))

    for weighted in (False, True):
        args, kwargs, expected = _linear_case(m, weighted, torch.float16)
        scale = kwargs["channel_scale"]
        check(threshold_linear(*on_gpu(args), channel_scale=None if scale is None else scale.cuda()), expected)
        args, kwargs, expected = _input_ffn_case(m, weighted, torch.float16)
        scales = {k: v.cuda() for k, v in kwargs.items() if k.startswith("scale_")}
        check(threshold_ffn(*on_gpu(args), "silu", kwargs["tau_input"], kwargs["tau_down"], **scales), expected)
    for gated in (True, False):
        args, kwargs, expected = _gate_ffn_case(m, gated, torch.float16)
        check(gate_sparse_ffn(*on_gpu(args), "silu", kwargs["tau"]), expected)
