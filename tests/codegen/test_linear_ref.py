"""Block-sparse and 2:4 linear references against float64 dense products."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsecc.codegen.block_sparse_linear import block_sparse_linear_ref
from sparsecc.codegen.semi_structured_linear import semi_structured_linear_ref
from sparsecc.forms import BlockWeights
from sparsecc.weights import compress_2to4, compress_block_weights

# max_examples comes from the profile in tests/conftest.py (ci: 20, deep: 2000).
SETTINGS = settings(deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Relative to the output scale: fp32 accumulation, then one rounding to the output dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def check(out, x, w_dense, bias, dtype):
    ref = x.double() @ w_dense.double().T + (0 if bias is None else bias.double())
    assert out.dtype == dtype and out.shape == ref.shape
    scale = ref.abs().max().clamp(min=1.0)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * float(scale), rtol=TOL[dtype])


@SETTINGS
@given(bm=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), rows=st.integers(1, 4), cols=st.integers(1, 4),
       lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), density=st.floats(0.05, 1.0),
       dtype=st.sampled_from(DTYPES), has_bias=st.booleans(), seed=st.integers(0, 10**6))
def test_block_sparse_linear(bm, bk, rows, cols, lead, density, dtype, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = rows * bm, cols * bk
    w = randn(gen, n, k, dtype=dtype)
    c = compress_block_weights(w, BlockWeights(block=(bm, bk), density=density))
    x = randn(gen, *lead, k, dtype=dtype)
    bias = randn(gen, n, dtype=dtype) if has_bias else None
    check(block_sparse_linear_ref(x, c, bias), x, c.to_dense(), bias, dtype)


def test_block_sparse_linear_skips_dropped_blocks():
    """The reference reads only stored blocks: poisoning the dropped region of x's use changes nothing."""
    w = torch.zeros(32, 64)
    w[:16, 16:32] = torch.randn(16, 16)
    c = compress_block_weights(w, BlockWeights(block=(16, 16), density=1.0, prune="keep"))
    assert c.nnzb == 1
    x = torch.randn(3, 64)
    x_bad = x.clone()
    x_bad[:, :16] = float("nan")  # columns no stored block reads
    torch.testing.assert_close(block_sparse_linear_ref(x_bad, c), x @ w.T)


@SETTINGS
@given(n=st.integers(1, 40), groups=st.integers(1, 16), lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       dtype=st.sampled_from(DTYPES), has_bias=st.booleans(), seed=st.integers(0, 10**6))
def test_semi_structured_linear(n, groups, lead, dtype, has_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = randn(gen, n, 4 * groups, dtype=dtype)
    c = compress_2to4(w)
    x = randn(gen, *lead, 4 * groups, dtype=dtype)
    bias = randn(gen, n, dtype=dtype) if has_bias else None
    check(semi_structured_linear_ref(x, c, bias), x, c.to_dense(), bias, dtype)


def test_linear_refs_reject_wrong_input_width():
    c2 = compress_2to4(torch.randn(8, 16))
    cb = compress_block_weights(torch.randn(16, 32), BlockWeights(block=(16, 16)))
    with pytest.raises(ValueError, match="K=16"):
        semi_structured_linear_ref(torch.randn(2, 12), c2)
    with pytest.raises(ValueError, match="K=32"):
        block_sparse_linear_ref(torch.randn(2, 16), cb)
    with pytest.raises(ValueError, match="bias"):
        block_sparse_linear_ref(torch.randn(2, 32), cb, torch.randn(3))
