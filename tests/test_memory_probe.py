"""bench/memory_probe.py's read kernel sums exactly the elements whose bytes the probe counts (Triton's interpreter).

The probe's bandwidth figure is bytes counted over time; this checks the count against what the kernel reads.
"""

import os
import sys

import pytest
import torch

from tests.interpreter import ROOT, interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

sys.path.insert(0, os.path.join(ROOT, "bench"))


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton in interpreter mode."""
    run_interpreter_checks(__file__, select="interp", no_skips=True)


# (n, programs, block, repeats, elements per program written out by hand: ceil(ceil(n / programs) / block) blocks)
CASES = [(1000, 3, 128, 2, 384), (4096, 4, 256, 1, 1024), (700, 5, 64, 3, 192)]


@pytest.mark.parametrize("n, programs, block, repeats, per_program", CASES)
def test_counts(n, programs, block, repeats, per_program):
    """The elements per program and the bytes the probe divides by its time, for 2-byte elements."""
    import memory_probe

    assert memory_probe.per_program_elements(n, programs, block) == per_program
    assert memory_probe.bytes_read(programs, per_program, repeats, 2) == programs * per_program * repeats * 2


@pytest.mark.parametrize("n, programs, block, repeats, per_program", CASES)
def test_interp_read_kernel_reads_what_is_counted(interpreter, n, programs, block, repeats, per_program):
    import memory_probe
    gen = torch.Generator().manual_seed(n)
    src = torch.randn(n, generator=gen).to(torch.float16)
    out = torch.full((programs * block,), float("nan"))
    memory_probe._read_kernel[(programs,)](src, out, per_program, n, repeats, BLOCK=block)
    # Written from the docstring: program p reads src[(p * per_program + i) % n] for i < per_program, each
    # `repeats` times, element i landing in lane i % block.
    index = (torch.arange(programs)[:, None] * per_program + torch.arange(per_program)[None, :]) % n
    expected = src.double()[index].view(programs, per_program // block, block).sum(1) * repeats
    torch.testing.assert_close(out.view(programs, block).double(), expected, rtol=1e-5, atol=1e-4)
