"""Run a kernel test file's CPU checks in a child process under ``TRITON_INTERPRET=1``.

Triton fixes interpreter-or-compiler when each ``@triton.jit`` function is
decorated (its own standard library included), and any module of the pytest
session may already have imported Triton, so setting the variable in the
parent would be too late. Each kernel test file therefore has one
``test_interpreter_checks`` that re-runs the file in a child process with the
variable set, and marks its interpreter tests with the ``interpreter``
fixture, which skips them everywhere but in that child.
"""

import os
import subprocess
import sys

import pytest
import torch

CHILD_ENV = "SPARSECC_INTERPRETER_CHILD"
# True inside the child process that runs the interpreter checks.
CHILD = os.environ.get(CHILD_ENV) == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def interpreter():
    """Interpreter checks run only in the child process, where Triton was imported with TRITON_INTERPRET=1."""
    if not CHILD:
        pytest.skip("runs inside test_interpreter_checks' child process")
    pytest.importorskip("triton")
    from triton import knobs

    assert knobs.runtime.interpret


def run_interpreter_checks(test_file: str, select: str = "", no_skips: bool = False) -> None:
    """Re-run ``test_file`` (its non-gpu tests, ``-k select`` when given) in an interpreter child; fail on any failure.

    The child must report at least one passed test, so a selection that
    matches nothing cannot pass silently; ``no_skips`` also fails on any
    skipped check (this function's own test is deselected in the child).
    """
    if CHILD:
        pytest.skip("this is the child process")
    if torch.cuda.is_available():
        pytest.skip("interpreter checks run on CPU-only machines; the gpu tests cover CUDA")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    # addopts replaced (it has -q already) so the child prints its "N passed" summary line.
    cmd = [sys.executable, "-m", "pytest", test_file, "-o", "addopts=-p no:cacheprovider", "-q", "-x", "-rs",
           "-m", "not gpu", "-k", f"not test_interpreter_checks{' and ' + select if select else ''}"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert " passed" in res.stdout, res.stdout[-2000:]
    if no_skips:
        assert "SKIPPED" not in res.stdout, res.stdout[-2000:]
