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


@pytest.mark.parametrize("k, n, kept, width, block_r, splits", [(40, 64, 9, 16, 4, 2), (33, 32, 33, 32, 8, 3),
                                                                 (20, 48, 5, 16, 8, 1)])
def test_interp_gather_kernel_sums_each_splits_listed_segments(interpreter, k, n, kept, width, block_r, splits):
    """Program (column tile t, split s) sums rows[s * per_split : (s + 1) * per_split] of columns
    t * width .. (t + 1) * width - 1: the segments whose bytes the gather probe counts, once each."""
    import memory_probe
    gen = torch.Generator().manual_seed(k + kept)
    src = torch.randn(k, n, generator=gen).to(torch.float16)
    rows = torch.randperm(k, generator=gen)[:kept].sort().values.to(torch.int32)
    tiles = n // width
    per_split = -(-kept // splits)
    out = torch.full((splits * tiles * width,), float("nan"))
    memory_probe._gather_kernel[(tiles, splits)](src, rows, out, kept, per_split, n, BLOCK_N=width, BLOCK_R=block_r)
    expected = torch.zeros(splits, tiles, width, dtype=torch.float64)
    for s in range(splits):
        share = rows[s * per_split:(s + 1) * per_split].long()
        expected[s] = src.double()[share].sum(0).view(tiles, width)
    torch.testing.assert_close(out.view(splits, tiles, width).double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows, k, tau", [(2048, 2048, 1.0), (2048, 1500, 0.3), (256, 200, 1.2)])
def test_interp_listing_kernels_list_exactly_the_survivors(interpreter, rows, k, tau):
    """Both listing kernels of the probe (the shipped helper, in 1024-channel pieces, and one scan over the split)
    write, in every program's slot, the channels of x[:k] with |x| > tau in channel order, and their count."""
    import memory_probe
    memory_probe.bind_listing()
    gen = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, generator=gen).to(torch.float16)
    x[k - 1] = 3.0                                   # a survivor at the last channel inside k ...
    if k < rows:
        x[k:] = 5.0                                  # ... and large values past it, which must not be listed
    expected = torch.nonzero(x[:k].float().abs() > tau).flatten()
    assert 0 < expected.numel() < k
    programs = 3
    for kernel in (memory_probe._list_shipped_kernel, memory_probe._list_one_scan_kernel):
        slot = torch.full((programs * rows,), -1, dtype=torch.int32)
        counts = torch.full((programs,), -1, dtype=torch.int32)
        kernel[(programs,)](x, slot, counts, k, tau, ROWS=rows)
        assert counts.tolist() == [expected.numel()] * programs
        for p in range(programs):
            assert torch.equal(slot[p * rows:p * rows + expected.numel()].long(), expected)
