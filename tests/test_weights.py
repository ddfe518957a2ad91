"""Compressed weights: 2:4 and block-sparse containers, compression rules, validation."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsecc.forms import BlockWeights
from sparsecc.weights import BlockSparseWeight, SemiStructuredWeight, compress_2to4, compress_block_weights

# max_examples comes from the profile in tests/conftest.py (ci: 20, deep: 2000).
SETTINGS = settings(deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def rand_w(seed, n, k, dtype=torch.float32):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------ 2:4

@SETTINGS
@given(n=st.integers(1, 40), groups=st.integers(1, 20), seed=st.integers(0, 10**6), dtype=st.sampled_from(DTYPES))
def test_2to4_keeps_the_two_largest_per_group(n, groups, seed, dtype):
    w = rand_w(seed, n, 4 * groups, dtype)
    c = compress_2to4(w)
    assert c.values.shape == (n, 2 * groups) and c.values.dtype == dtype and c.indices.dtype == torch.uint8
    dense = c.to_dense()
    assert dense.dtype == dtype
    g_w, g_d = w.view(n, groups, 4), dense.view(n, groups, 4)
    assert torch.all((g_d != 0).sum(-1) <= 2)
    # Kept entries are copied exactly; each kept |w| is at least every dropped |w| in its group.
    kept = torch.zeros_like(g_w, dtype=torch.bool).scatter_(-1, c.indices.view(n, groups, 2).long(), True)
    assert torch.equal(g_d[kept], g_w[kept])
    mag = g_w.abs().double()
    min_kept = mag.masked_fill(~kept, math.inf).amin(-1)
    max_dropped = mag.masked_fill(kept, -math.inf).amax(-1)
    assert torch.all(min_kept >= max_dropped)
    pairs = c.indices.view(n, groups, 2)
    assert torch.all(pairs[..., 0] < pairs[..., 1])
    # Already 2:4: compressing again (either mode) is exact.
    for prune in ("magnitude", "keep"):
        assert torch.equal(compress_2to4(dense, prune).to_dense(), dense)


def test_2to4_ties_keep_the_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 2.0, -2.0, 2.0]])
    c = compress_2to4(w)
    assert c.indices.tolist() == [[0, 1, 1, 2]]
    assert c.to_dense().tolist() == [[1.0, -1.0, 0.0, 0.0, 0.0, 2.0, -2.0, 0.0]]


def test_2to4_keep_mode_names_the_first_bad_group():
    w = torch.zeros(3, 12)
    w[0, :2] = 1.0
    w[1, 4:7] = 1.0     # three non-zeros in row 1, group 1
    w[2, 8:12] = 1.0    # a later offender
    with pytest.raises(ValueError, match=r"row 1, group 1"):
        compress_2to4(w, prune="keep")
    w[1, 6] = 0.0
    w[2, 8:10] = 0.0
    assert torch.equal(compress_2to4(w, prune="keep").to_dense(), w)


def test_2to4_rejects_bad_input():
    with pytest.raises(ValueError, match="K % 4"):
        compress_2to4(torch.randn(4, 6))
    with pytest.raises(ValueError, match="prune"):
        compress_2to4(torch.randn(4, 8), prune="random")
    c = compress_2to4(torch.randn(4, 8))
    with pytest.raises(ValueError, match="ascending"):
        SemiStructuredWeight(c.values, c.indices.flip(-1), (4, 8))
    with pytest.raises(ValueError, match="values"):
        SemiStructuredWeight(c.values[:, :2], c.indices, (4, 8))
    with pytest.raises(ValueError, match="indices"):
        SemiStructuredWeight(c.values, c.indices.long(), (4, 8))


def test_compression_drops_the_parameter():
    p = torch.nn.Parameter(torch.randn(32, 16))
    for c, stored in ((compress_2to4(p), "values"), (compress_block_weights(p, BlockWeights((16, 16), 1.0)), "blocks")):
        t = getattr(c, stored)
        assert not t.requires_grad and t.grad_fn is None
        assert t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
    before = compress_block_weights(p, BlockWeights((16, 16), 1.0)).to_dense().clone()
    c = compress_block_weights(p, BlockWeights((16, 16), 1.0))
    with torch.no_grad():
        p.add_(1.0)
    assert torch.equal(c.to_dense(), before)
    assert "2:4" in str(compress_2to4(p)) and "32x16" in str(compress_2to4(p))


# ----------------------------------------------------------- blocks

@SETTINGS
@given(bm=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32, 64]), rows=st.integers(1, 4),
       cols=st.integers(1, 4), density=st.floats(0.01, 1.0), seed=st.integers(0, 10**6),
       dtype=st.sampled_from(DTYPES))
def test_block_weights_keep_the_largest_blocks(bm, bk, rows, cols, density, seed, dtype):
    w = rand_w(seed, rows * bm, cols * bk, dtype)
    form = BlockWeights(block=(bm, bk), density=density)
    c = compress_block_weights(w, form)
    n_blocks = rows * cols
    assert c.nnzb == form.kept_blocks(n_blocks) == max(1, math.ceil(density * n_blocks - 1e-9))
    assert c.density == pytest.approx(c.nnzb / n_blocks)
    assert c.row_ptr.dtype == torch.int32 and c.col_idx.dtype == torch.int32 and c.blocks.dtype == dtype
    dense = c.to_dense()
    grid = w.reshape(rows, bm, cols, bk).permute(0, 2, 1, 3).double()
    kept = dense.reshape(rows, bm, cols, bk).permute(0, 2, 1, 3).ne(0).flatten(2).any(-1)
    assert int(kept.sum()) == c.nnzb
    norms = grid.pow(2).sum((-1, -2))
    if c.nnzb < n_blocks:
        assert norms[kept].min() >= norms[~kept].max()
    # Kept blocks are exact copies, dropped ones zero.
    mask = kept[:, :, None, None].expand_as(grid)
    assert torch.equal(dense.reshape(rows, bm, cols, bk).permute(0, 2, 1, 3)[mask], w.reshape(
        rows, bm, cols, bk).permute(0, 2, 1, 3)[mask])
    # BSR: columns ascending within each block row, row_ptr counts per row.
    ptr = c.row_ptr.tolist()
    for r in range(rows):
        seg = c.col_idx[ptr[r]:ptr[r + 1]].tolist()
        assert seg == sorted(seg) and seg == kept[r].nonzero().flatten().tolist()
    # keep mode on the pruned weight reproduces it.
    again = compress_block_weights(dense, BlockWeights(block=(bm, bk), density=0.5, prune="keep"))
    assert torch.equal(again.to_dense(), dense)


def test_block_weights_ties_keep_the_lower_flat_index():
    w = torch.ones(32, 48)   # six equal 16x16 blocks
    c = compress_block_weights(w, BlockWeights(block=(16, 16), density=0.5))
    assert c.col_idx.tolist() == [0, 1, 2] and c.row_ptr.tolist() == [0, 3, 3]


def test_block_weights_keep_mode_keeps_exactly_the_nonzero_blocks():
    w = torch.zeros(64, 64)
    w[0, 20] = 3.0          # block (0, 1)
    w[40:48, 50:60] = 1.0   # block (2, 3)
    c = compress_block_weights(w, BlockWeights(block=(16, 16), density=1.0, prune="keep"))
    assert c.nnzb == 2 and c.density == pytest.approx(2 / 16)
    assert c.col_idx.tolist() == [1, 3] and c.row_ptr.tolist() == [0, 1, 1, 2, 2]
    assert torch.equal(c.to_dense(), w)
    assert "blocks=2/16" in str(c)


def test_block_weights_reject_bad_shapes():
    with pytest.raises(ValueError, match="divide"):
        compress_block_weights(torch.randn(40, 64), BlockWeights(block=(16, 16)))
    with pytest.raises(ValueError, match="divide"):
        compress_block_weights(torch.randn(64, 40), BlockWeights(block=(16, 16)))
    c = compress_block_weights(torch.ones(32, 32), BlockWeights(block=(16, 16), density=1.0))  # col_idx [0, 1, 0, 1]
    with pytest.raises(ValueError, match="col_idx"):
        BlockSparseWeight(c.blocks, c.row_ptr, c.col_idx.flip(0), c.shape, c.block)
    with pytest.raises(ValueError, match="row_ptr"):
        BlockSparseWeight(c.blocks, c.row_ptr.flip(0), c.col_idx, c.shape, c.block)
    with pytest.raises(ValueError, match="blocks"):
        BlockSparseWeight(c.blocks[:, :8], c.row_ptr, c.col_idx, c.shape, c.block)
