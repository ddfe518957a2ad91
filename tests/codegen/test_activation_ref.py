"""Activation-sparsity references against dense float64 formulas."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings, strategies as st

from sparsecc.codegen.activation_sparse import ACTIVATIONS, threshold_linear_ref
from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn_ref

# max_examples comes from the profile in tests/conftest.py (ci: 20, deep: 2000).
SETTINGS = settings(deadline=None)
# Distance from tau below which float32 and float64 may disagree on |a| > tau; such draws are skipped.
MARGIN = 1e-4


def act64(name, x):
    """Float64 activations written from their definitions."""
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return x.clamp(min=0)
    if name == "relu2":
        return x.clamp(min=0) ** 2
    if name == "silu":
        return x / (1 + torch.exp(-x))
    raise KeyError(name)


def test_activations_match_definitions():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert set(ACTIVATIONS) == {"gelu", "gelu_tanh", "relu", "relu2", "silu"}
    for name, fn in ACTIVATIONS.items():
        torch.testing.assert_close(fn(x), act64(name, x))


def ffn64(x, wg, bg, wu, bu, wd, bd, act, tau):
    d = lambda t: None if t is None else t.double()
    a = act64(act, x.double() @ wg.double().T + (0 if bg is None else bg.double()))
    h = a * (a.abs() > tau)
    if wu is not None:
        h = h * (x.double() @ wu.double().T + (0 if bu is None else d(bu)))
    return h @ wd.double().T + (0 if bd is None else d(bd)), a


@SETTINGS
@given(m=st.integers(1, 12), k=st.integers(1, 24), n=st.integers(1, 24), tau=st.floats(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float64]), has_bias=st.booleans(), seed=st.integers(0, 10**6))
def test_threshold_linear(m, k, n, tau, dtype, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) if has_bias else None
    out = threshold_linear_ref(x, w, b, tau)
    xs = x.double() * (x.double().abs() > tau)
    ref = xs @ w.double().T + (0 if b is None else b.double())
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), d=st.integers(1, 16), f=st.integers(1, 40),
       act=st.sampled_from(sorted(ACTIVATIONS)), gated=st.booleans(), has_bias=st.booleans(),
       tau=st.floats(0, 1.5), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 10**6))
def test_gate_sparse_ffn(lead, d, f, act, gated, has_bias, tau, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    x = r(*lead, d)
    wg, wu, wd = r(f, d), (r(f, d) if gated else None), r(d, f)
    bg, bu, bd = (r(f), (r(f) if gated else None), r(d)) if has_bias else (None, None, None)
    ref, a = ffn64(x, wg, bg, wu, bu, wd, bd, act, tau)
    assume(bool(((a.abs() - tau).abs() > MARGIN).all()))
    out = gate_sparse_ffn_ref(x, wg, bg, wu, bu, wd, bd, act=act, tau=tau)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["relu", "relu2"])
@pytest.mark.parametrize("gated", [True, False])
def test_gate_sparse_ffn_bf16(act, gated):
    # Inputs on a coarse grid make the bf16 gate pre-activations exact, so the mask matches float64;
    # tau sits between grid points.
    gen = torch.Generator().manual_seed(1)
    grid = lambda *s: (torch.randint(-4, 5, s, generator=gen) / 4).to(torch.bfloat16)
    x, wg, wu, wd = grid(6, 16), grid(32, 16), grid(32, 16), grid(16, 32)
    wu = wu if gated else None
    out = gate_sparse_ffn_ref(x, wg, None, wu, None, wd, None, act=act, tau=0.6)
    ref, a = ffn64(x, wg, None, wu, None, wd, None, act, 0.6)
    assert 0 < int((a.abs() > 0.6).sum()) < a.numel()  # the threshold actually prunes
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2 * float(ref.abs().max()), rtol=1e-2)


def test_gate_sparse_ffn_computes_only_survivors():
    """Neurons nobody keeps are never read: NaN in their up/down weights does not reach the output."""
    d, f = 8, 6
    x = torch.randn(3, d)
    wg = torch.randn(f, d)
    wg[4:] = 0.0                      # neurons 4, 5: relu(0) = 0, below any tau > 0
    wu, wd = torch.randn(f, d), torch.randn(d, f)
    wu[4:] = float("nan")
    wd[:, 4:] = float("nan")
    out = gate_sparse_ffn_ref(x, wg, None, wu, None, wd, None, act="relu", tau=0.1)
    ref = F.linear((F.relu(x @ wg[:4].T) * (F.relu(x @ wg[:4].T) > 0.1)) * (x @ wu[:4].T), wd[:, :4])
    torch.testing.assert_close(out, ref)


def test_gate_sparse_ffn_rejects_unknown_activation():
    with pytest.raises(ValueError, match="act"):
        gate_sparse_ffn_ref(torch.randn(2, 4), torch.randn(3, 4), None, None, None, torch.randn(4, 3), None,
                            act="tanh", tau=0.1)
