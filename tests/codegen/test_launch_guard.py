"""tests/launch_guard.py itself: it fails a launch that writes a tensor passed twice, and only such a launch."""

import functools

import pytest
import torch

from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 - fixture


@functools.lru_cache(maxsize=None)
def _copy_kernel():
    """``Y = 2 X``; ``UNUSED`` is never touched. Made on first use, inside the interpreter child: decorating a
    kernel (or importing Triton's language) while this file is collected would fix Triton in compiled mode for
    the whole session (tests/interpreter.py)."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(X, Y, UNUSED, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

    return copy_kernel


def test_interpreter_checks():
    run_interpreter_checks(__file__, no_skips=True)


def test_an_output_passed_again_as_a_dummy_fails(interpreter):
    from tests.launch_guard import AliasedWriteError, guard_launches

    x, y = torch.arange(8.0), torch.zeros(8)
    # The conftest's guard is active in the child already; a second one inside changes nothing.
    with guard_launches():
        with pytest.raises(AliasedWriteError, match="Y, UNUSED"):
            _copy_kernel()[(1,)](x, y, y, 8, BLOCK=8)


def test_an_input_passed_again_as_a_dummy_passes(interpreter):
    from tests.launch_guard import guard_launches

    x, y = torch.arange(8.0), torch.zeros(8)
    with guard_launches() as seen:
        _copy_kernel()[(1,)](x, y, x, 8, BLOCK=8)
    assert torch.equal(y, 2 * x)
    assert seen == [("copy_kernel", 1)]   # the guard looked at the shared storage


def test_a_view_of_the_output_counts_as_the_output(interpreter):
    from tests.launch_guard import AliasedWriteError, guard_launches

    x, y = torch.arange(8.0), torch.zeros(16)
    with guard_launches():
        with pytest.raises(AliasedWriteError):
            _copy_kernel()[(1,)](x, y[:8], y[8:], 8, BLOCK=8)
