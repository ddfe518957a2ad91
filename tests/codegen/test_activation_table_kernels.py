"""The activation table's Triton lines against float64 definitions: Triton's interpreter on the CPU, and CUDA.

Three ways a kernel computes an activation, each checked for every entry of the table on random inputs:
the generated activation switch (what ``gate_sparse_ffn``'s kernel calls), a generated epilogue chain
``act:<name>`` (what the block-sparse linear's kernel calls), and the gate-sparse FFN kernel itself on an
identity FFN, whose output is its activation. Expected values are the definitions of docs/kernels.md written in
float64 here, not the table's references. On CPU the checks run in a child process with
``TRITON_INTERPRET=1`` (tests/interpreter.py); ``gpu`` tests run the same checks compiled for CUDA.
"""

from __future__ import annotations  # kernel annotations stay strings until bind_triton imports Triton

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from sparsecc.activations import ACTIVATION_TABLE
from sparsecc.codegen.activation_sparse import MAX_DECODE_TOKENS
from tests import zoo
from tests.interpreter import ROOT, interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

NAMES = [a.name for a in ACTIVATION_TABLE]
DEFINITIONS = zoo.ACTIVATION_DEFINITIONS   # float64, from docs/kernels.md
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


def _bind(tmp_path_factory):
    """Bind this file's kernels, with the generated switch installed under the name the kernel calls."""
    from sparsecc.codegen import epilogue

    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSECC_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    globals()["_activation"] = epilogue.activation_switch("_activation")
    epilogue.bind_triton(globals(), ("_switch_kernel", "_epilogue_kernel"))
    return epilogue, mp


@pytest.fixture(scope="module")
def kernels(interpreter, tmp_path_factory):
    """(codegen.epilogue, device) with the kernels bound in the interpreter child: CPU tensors."""
    epilogue, mp = _bind(tmp_path_factory)
    yield epilogue, "cpu"
    mp.undo()


@pytest.fixture(scope="module")
def cuda_kernels(tmp_path_factory):
    """(codegen.epilogue, device) with the kernels compiled for CUDA."""
    pytest.importorskip("triton")
    epilogue, mp = _bind(tmp_path_factory)
    yield epilogue, "cuda"
    mp.undo()


def _launch(kernel, x, **constexprs):
    y = torch.full_like(x, float("nan"))
    kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), BLOCK=BLOCK, **constexprs)  # noqa: F821
    return y


def _check_switch(bound, name):
    epilogue, device = bound
    x = _inputs().to(device)
    y = _launch(_switch_kernel, x, ACTIVATION=name)
    torch.testing.assert_close(y.double().cpu(), DEFINITIONS[name](x.double().cpu()), atol=ATOL, rtol=RTOL)


def _check_epilogue(bound, name):
    epilogue, device = bound
    x = _inputs(seed=1).to(device)
    y = _launch(_epilogue_kernel, x, EPILOGUE=epilogue.epilogue_function(f"act:{name}"))
    torch.testing.assert_close(y.double().cpu(), DEFINITIONS[name](x.double().cpu()), atol=ATOL, rtol=RTOL)


def _check_gate_kernel(bound, name, tokens):
    """An identity FFN (W_gate = W_down = I, no up, tau = 0) returns its activation: act(x) for every x."""
    from sparsecc.codegen.gate_sparse_ffn import gate_sparse_ffn

    _, device = bound
    width = 64
    values = _inputs(seed=2)
    pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(tokens))[: tokens * width]
    x = values[pick].reshape(tokens, width).to(device)
    eye = torch.eye(width, device=device)
    y = gate_sparse_ffn(x, eye, None, None, None, eye, None, act=name, tau=0.0)
    torch.testing.assert_close(y.double().cpu(), DEFINITIONS[name](x.double().cpu()), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_interp_switch_matches_the_definition(kernels, name):
    _check_switch(kernels, name)


@pytest.mark.parametrize("name", NAMES)
def test_interp_epilogue_step_matches_the_definition(kernels, name):
    _check_epilogue(kernels, name)


def test_interp_the_gate_kernel_calls_the_generated_switch(kernels):
    from sparsecc.codegen import gate_sparse_ffn

    gate_sparse_ffn._bind()
    assert gate_sparse_ffn._activation is kernels[0].activation_switch("_activation")


@pytest.mark.parametrize("tokens", [1, MAX_DECODE_TOKENS])  # the one-token and the tl.dot paths
@pytest.mark.parametrize("name", NAMES)
def test_interp_gate_kernel_branch_matches_the_definition(kernels, name, tokens):
    _check_gate_kernel(kernels, name, tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_switch_and_epilogue_step_match_the_definition(cuda_kernels, name):
    _check_switch(cuda_kernels, name)
    _check_epilogue(cuda_kernels, name)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, MAX_DECODE_TOKENS])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_gate_kernel_branch_matches_the_definition(cuda_kernels, name, tokens):
    _check_gate_kernel(cuda_kernels, name, tokens)


def test_inductor_copies_the_generated_switch_with_the_gate_kernel(tmp_path):
    """A traced launch of the gate kernel puts its source into Inductor's code together with the helpers Inductor
    finds by name in the kernel's globals: the generated switch must be among them, with the table's lines, and
    the copy must define every name the kernel calls. (The GPU test of tests/codegen/test_inductor_launch.py
    runs it; this checks the copy without a GPU.)"""
    pytest.importorskip("triton")
    from triton import knobs

    if knobs.runtime.interpret:
        # Another test file of this session turned Triton's interpreter on (it is read when a function is
        # decorated); interpreted functions have no source for Inductor. Check in a child with the compiler.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "pytest", __file__, "-o", "addopts=-p no:cacheprovider", "-q",
               "-k", "test_inductor_copies_the_generated_switch_with_the_gate_kernel"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0 and " passed" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
        return
    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if closure is None:
        pytest.skip("this torch's Inductor collects user kernels' helpers differently")
    from sparsecc.codegen import gate_sparse_ffn

    gate_sparse_ffn._bind()
    source = closure(gate_sparse_ffn._gate_up_kernel)
    assert source.count("def _activation(v, ACTIVATION: tl.constexpr):") == 1
    for act in ACTIVATION_TABLE:
        assert f"ACTIVATION == {act.name!r}:" in source
        assert all(line in source for line in act.triton)
    # Load the copy as Inductor does: a module file (Triton reads a kernel's source from its file), the kernel
    # itself decorated in front of the copied source.
    path = tmp_path / "inductor_copy.py"
    path.write_text("import triton\nimport triton.language as tl\n\n\n@triton.jit\n" + source)
    spec = importlib.util.spec_from_file_location("inductor_copy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert all(callable(getattr(module, name, None)) for name in ("_gate_up_kernel", "_activation", "_rounded"))
