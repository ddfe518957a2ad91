"""The activation table's Triton lines against float64 definitions, run by Triton's interpreter on the CPU.

Three ways a kernel computes an activation, each checked for every entry of the table on random inputs:
the generated activation switch (what ``gate_sparse_ffn``'s kernel calls), a generated epilogue chain
``act:<name>`` (what the block-sparse linear's kernel calls), and the gate-sparse FFN kernel itself on an
identity FFN, whose output is its activation. Expected values are the definitions of docs/kernels.md written in
float64 here, not the table's references. The checks run in a child process with ``TRITON_INTERPRET=1``
(tests/interpreter.py).
"""

from __future__ import annotations  # kernel annotations stay strings until bind_triton imports Triton

import math

import pytest
import torch

from sparsecc.activations import ACTIVATION_TABLE
from sparsecc.codegen.activation_sparse import MAX_DECODE_TOKENS
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

NAMES = [a.name for a in ACTIVATION_TABLE]
# float64, written from the one-line definitions of docs/kernels.md ("Activations").
DEFINITIONS = {
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "relu2": lambda x: torch.where(x > 0, x, torch.zeros_like(x)) ** 2,
    "silu": lambda x: x / (1 + torch.exp(-x)),
}
# float32 arithmetic against float64: a few units in the last place of float32, relative to the value.
ATOL, RTOL = 1e-6, 1e-5
BLOCK = 128


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select="interp", no_skips=True)


def test_the_definitions_cover_the_table():
    assert sorted(DEFINITIONS) == sorted(NAMES)


def _inputs(n=1000, seed=0):
    """float32 values over the range activations bend in, their tails, and exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.linspace(-12, 12, 241), 3 * torch.randn(n, generator=gen),
                   torch.tensor([0.0, -0.0, 30.0, -30.0])])
    return x.to(torch.float32)


# ------------------------------------------------------------------ kernels (bound in the interpreter child)

_activation = None  # the generated activation switch, installed by the fixture below


def _switch_kernel(x_ptr, y_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):  # noqa: F821
    """y = the table's activation ACTIVATION of x, through the generated switch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _activation(v, ACTIVATION), mask=mask)


def _epilogue_kernel(x_ptr, y_ptr, n, EPILOGUE: tl.constexpr, BLOCK: tl.constexpr):  # noqa: F821
    """y = a generated epilogue chain of x (activation steps only: no bias, gate or residual is read)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, EPILOGUE(v, v, offs, offs, mask, x_ptr, x_ptr, 0, x_ptr, 0), mask=mask)


@pytest.fixture(scope="module")
def kernels(interpreter, tmp_path_factory):
    """Bind this file's kernels, with the generated switch installed under the name the kernel calls."""
    from sparsecc.codegen import epilogue

    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSECC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    globals()["_activation"] = epilogue.activation_switch("_activation")
    epilogue.bind_triton(globals(), ("_switch_kernel", "_epilogue_kernel"))
    yield epilogue
    mp.undo()


def _launch(kernel, x, **constexprs):
    y = torch.full_like(x, float("nan"))
    kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK, **constexprs)  # noqa: F821
    return y


@pytest.mark.parametrize("name", NAMES)
def test_interp_switch_matches_the_definition(kernels, name):
    x = _inputs()
    y = _launch(_switch_kernel, x, ACTIVATION=name)
    torch.testing.assert_close(y.double(), DEFINITIONS[name](x.double()), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_interp_epilogue_step_matches_the_definition(kernels, name):
    x = _inputs(seed=1)
    y = _launch(_epilogue_kernel, x, EPILOGUE=kernels.epilogue_function(f"act:{name}"))
    torch.testing.assert_close(y.double(), DEFINITIONS[name](x.double()), atol=ATOL, rtol=RTOL)


def test_interp_the_gate_kernel_calls_the_generated_switch(kernels):
    from sparsecc.codegen import gate_sparse_ffn

    gate_sparse_ffn._bind()
    assert gate_sparse_ffn._activation is kernels.activation_switch("_activation")


@pytest.mark.parametrize("tokens", [1, MAX_DECODE_TOKENS])  # the one-token and the tl.dot paths
@pytest.mark.parametrize("name", NAMES)
def test_interp_gate_kernel_branch_matches_the_definition(kernels, name, tokens):
    """An identity FFN (W_gate = W_down = I, no up, tau = 0) returns its activation: act(x) for every x."""
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn

    width = 64
    values = _inputs(seed=2)
    pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(tokens))[: tokens * width]
    x = values[pick].reshape(tokens, width)
    eye = torch.eye(width)
    y = gate_sparse_ffn(x, eye, None, None, None, eye, None, act=name, tau=0.0)
    torch.testing.assert_close(y.double(), DEFINITIONS[name](x.double()), atol=ATOL, rtol=RTOL)
