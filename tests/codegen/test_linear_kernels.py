"""Triton linear kernels against their references.

On a machine without CUDA the kernels run in Triton's interpreter at tiny
shapes (``TRITON_INTERPRET=1`` is set here, before any kernel is bound: the
kernels are JIT-decorated on first use, which is when Triton reads it). With
CUDA, the interpreter tests are skipped and the ``gpu`` tests run realistic
shapes against float32/float64 references, with outputs poisoned first.
"""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from sparsecc.codegen import ops  # noqa: E402
from sparsecc.codegen.activation_sparse import (GemvConfig, MAX_DECODE_TOKENS, threshold_linear,  # noqa: E402
                                                threshold_linear_ref)
from sparsecc.codegen.block_sparse_linear import (BlockLinearConfig, block_sparse_linear,  # noqa: E402
                                                  block_sparse_linear_op)
from sparsecc.codegen.epilogue import EPILOGUES, activation_ref  # noqa: E402
from sparsecc.forms import BlockWeights  # noqa: E402
from sparsecc.weights import compress_block_weights  # noqa: E402
from tests.codegen.test_ffn_kernels import gap_tau  # noqa: E402

interpreter = pytest.mark.skipif(CUDA, reason="interpreter tests run on machines without CUDA")
# The interpreter runs every program in Python: few examples, tiny shapes.
SETTINGS = settings(deadline=None)  # max_examples from the profile in tests/conftest.py
KERNEL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Relative to the output scale: float32 accumulation, then one rounding to the output dtype
# (the reference rounds nothing, so the kernel's single rounding is the whole error).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POISON = float("nan")
SMALL_GEMV = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=32, num_warps=4)


def randn(gen, *shape, dtype, device="cpu"):
    """Drawn where ``gen`` lives (a CUDA generator for GPU shapes: tens of millions of CPU draws took seconds)."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64, device=gen.device).to(device=device, dtype=dtype)


def assert_matches(out, ref, dtype):
    """``out`` equals the float64 ``ref`` within one output rounding, relative to the output scale."""
    assert out.dtype == dtype and out.shape == ref.shape
    assert bool(torch.isfinite(out).all()), "unwritten (poisoned) or non-finite outputs"
    scale = float(ref.abs().max().clamp(min=1.0))
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def bsr_expected(x, c, bias, activation):
    y = x.double() @ c.to_dense().double().T
    if bias is not None:
        y = y + bias.double()
    return activation_ref(activation)(y)


def poisoned(m, n, dtype, device="cpu"):
    return torch.full((m, n), POISON, dtype=dtype, device=device)


# ------------------------------------------------------------------ block-sparse linear (interpreter)


@interpreter
@SETTINGS
@given(bm=st.sampled_from([16, 32]), bk=st.sampled_from([16, 32]), rows=st.integers(1, 3), cols=st.integers(1, 3),
       lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), density=st.floats(0.05, 1.0),
       dtype=st.sampled_from(KERNEL_DTYPES), has_bias=st.booleans(), activation=st.sampled_from(sorted(EPILOGUES)),
       block_m=st.sampled_from([16, 32]), swap_ab=st.booleans(), seed=st.integers(0, 10**6))
def test_block_sparse_linear_kernel(bm, bk, rows, cols, lead, density, dtype, has_bias, activation, block_m,
                                    swap_ab, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = rows * bm, cols * bk
    c = compress_block_weights(randn(gen, n, k, dtype=dtype), BlockWeights(block=(bm, bk), density=density))
    x = randn(gen, *lead, k, dtype=dtype)
    bias = randn(gen, n, dtype=dtype) if has_bias else None
    m = x.numel() // k
    out = poisoned(m, n, dtype)
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, activation=activation,
                            config=BlockLinearConfig(BLOCK_M=block_m, num_warps=4, num_stages=2, SWAP_AB=swap_ab),
                            out=out)
    assert y.shape == (*lead, n)
    assert_matches(y, bsr_expected(x, c, bias, activation), dtype)


@interpreter
@pytest.mark.parametrize("bm,bk", [(64, 16), (16, 128), (128, 64)])
def test_block_sparse_linear_large_blocks(bm, bk):
    gen = torch.Generator().manual_seed(bm + bk)
    c = compress_block_weights(randn(gen, 2 * bm, 2 * bk, dtype=torch.bfloat16), BlockWeights((bm, bk), 0.5))
    x = randn(gen, 3, 2 * bk, dtype=torch.bfloat16)
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None)
    assert_matches(y, bsr_expected(x, c, None, "none"), torch.bfloat16)


@interpreter
def test_block_sparse_linear_unequal_and_empty_rows():
    """Rows with 3, 0 and 1 stored blocks (run heaviest first): the empty row is act(bias)."""
    gen = torch.Generator().manual_seed(1)
    w = randn(gen, 48, 48, dtype=torch.float32)
    w[16:32] = 0          # block row 1: empty
    w[32:48, :32] = 0     # block row 2: one block
    c = compress_block_weights(w, BlockWeights((16, 16), 1.0, prune="keep"))
    assert (c.row_ptr[1:] - c.row_ptr[:-1]).tolist() == [3, 0, 1]
    x = randn(gen, 5, 48, dtype=torch.float32)
    bias = randn(gen, 48, dtype=torch.float32)
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, activation="silu")
    assert_matches(y, bsr_expected(x, c, bias, "silu"), torch.float32)


@interpreter
def test_block_sparse_linear_strided_input_and_float64():
    gen = torch.Generator().manual_seed(2)
    c = compress_block_weights(randn(gen, 32, 64, dtype=torch.float32), BlockWeights((16, 16), 0.5))
    x = randn(gen, 64, 7, dtype=torch.float32).T  # [7, 64], column-major
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None, activation="relu")
    assert_matches(y, bsr_expected(x, c, None, "relu"), torch.float32)
    y64 = block_sparse_linear(x.double(), c.blocks.double(), c.row_ptr, c.col_idx, None, activation="relu")
    torch.testing.assert_close(y64, bsr_expected(x, c, None, "relu"))


def test_unknown_epilogue_is_rejected():
    c = compress_block_weights(torch.randn(16, 16), BlockWeights((16, 16), 1.0))
    with pytest.raises(ValueError, match="not a fused epilogue"):
        block_sparse_linear(torch.randn(2, 16), c.blocks, c.row_ptr, c.col_idx, None, activation="tanh")


# ------------------------------------------------------------------ threshold GEMV (interpreter)


@interpreter
@SETTINGS
@given(m=st.one_of(st.just(1), st.integers(1, MAX_DECODE_TOKENS)), n=st.integers(1, 80), k=st.integers(1, 100),
       sparsity=st.floats(0.0, 0.99), dtype=st.sampled_from(KERNEL_DTYPES), has_bias=st.booleans(),
       k_major=st.booleans(), compact=st.booleans(), program=st.sampled_from(["default", "per token", "dot"]),
       rows=st.sampled_from([16, 32, 128]), seed=st.integers(0, 10**6))
def test_threshold_linear_kernel(m, n, k, sparsity, dtype, has_bias, k_major, compact, program, rows, seed):
    """Every path (compacted / predicated, union / per token / one token on tl.dot, split / direct store) against
    float64."""
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, m, k, dtype=dtype)
    tau = float(torch.quantile(x.abs().double().flatten(), sparsity))
    # The kernel compares with tau rounded to x's dtype, as torch does: same survivors as the reference.
    keep = x.abs() > tau
    assume(0 < int(keep.sum()) < keep.numel())   # the form applies: tau drops some inputs and keeps some
    w = randn(gen, n, k, dtype=dtype)
    w_in = w.t().contiguous().t() if k_major else w
    bias = randn(gen, n, dtype=dtype) if has_bias else None
    out = poisoned(m, n, dtype)
    cfg = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=rows, num_warps=4, COMPACT=compact,
                     PER_TOKEN=program == "per token", DOT=program == "dot")
    y = threshold_linear(x, w_in, bias, tau, config=cfg, out=out)
    ref = (x.double() * keep) @ w.double().T + (0 if bias is None else bias.double())
    assert_matches(y, ref, dtype)


@pytest.mark.parametrize("m", [1, 2, 16])
def test_gemv_block_m_follows_the_knobs(m):
    """One token multiplies one row unless DOT; more tokens pad to 16 rows for tl.dot unless PER_TOKEN; DOT and
    PER_TOKEN together are refused, naming both."""
    from sparsecc.codegen.activation_sparse import DOT_ROWS, gemv_block_m
    plain = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4)
    assert gemv_block_m(m, plain) == (1 if m == 1 else DOT_ROWS)
    assert gemv_block_m(m, GemvConfig(16, 16, 16, 4, DOT=True)) == DOT_ROWS
    assert gemv_block_m(m, GemvConfig(16, 16, 16, 4, PER_TOKEN=True)) == 1
    with pytest.raises(ValueError, match="DOT.*PER_TOKEN"):
        GemvConfig(16, 16, 16, 4, DOT=True, PER_TOKEN=True)
    with pytest.raises(ValueError, match="at least 16.*BLOCK_K=8"):
        GemvConfig(16, 8, 16, 4, DOT=True)
    assert "tl.dot" in str(GemvConfig(16, 16, 16, 4, DOT=True))
    # several tokens take tl.dot whatever the DOT flag: a tile narrower than its minimum is refused by name
    narrow = GemvConfig(BLOCK_N=8, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4)
    if m == 1:
        assert gemv_block_m(m, narrow) == 1
    else:
        with pytest.raises(ValueError, match=rf"N tile 8.* for {m} token\(s\) multiplies with tl.dot.*BLOCK_N=8"):
            gemv_block_m(m, narrow)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k,rows", [(64, 64), (65, 64), (300, 32), (4096, 2048)])
def test_gemv_ticket_count_is_the_launch_grids(m, k, rows, per_token):
    """The counters a caller zeroes for a GEMV (gemv_ticket_count) are exactly the ones its launch merges with: one
    per (token program, N tile) of gemv_buffers' grid where K is split, none where one split stores y."""
    from sparsecc.codegen import activation_sparse
    from sparsecc.codegen.activation_sparse import gemv_buffers, gemv_ticket_count
    from sparsecc.codegen.epilogue import bind_triton
    bind_triton(vars(activation_sparse), activation_sparse._KERNELS)
    n = 40
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=rows, num_warps=4, PER_TOKEN=per_token)
    x2, w = torch.zeros(m, k), torch.zeros(n, k)
    g = gemv_buffers(x2, w, None, 0.1, cfg, None, None, x2)
    assert g.grid[2] == (m if m == 1 or per_token else 1) and g.grid[1] == -(-k // rows)
    assert gemv_ticket_count(m, k, n, cfg) == g.tickets == (0 if g.direct else g.grid[0] * g.grid[2])


@interpreter
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_threshold_linear_negative_tau_keeps_everything_and_reads_nothing_past_k(m, compact):
    """tau < 0 keeps every channel, zeros included (|x| > tau always): the dense product. K = 20 in 16-channel
    splits leaves 12 channel slots past K in the last split, whose scores (0) pass too; they must not be listed
    (a listed index past K would read past the end of x and the weight)."""
    gen = torch.Generator().manual_seed(17 + m)
    x = randn(gen, m, 20, dtype=torch.float32)
    x[:, ::4] = 0.0
    w = randn(gen, 24, 20, dtype=torch.float32)
    # K-major, as the compiler binds it, inside a buffer whose rows past K are NaN: a row read past K poisons y.
    storage = torch.full((32 * 24,), float("nan"))
    storage[:20 * 24] = w.t().reshape(-1)
    w_km = storage[:20 * 24].view(20, 24).t()
    assert torch.equal(w_km, w) and w_km.stride() == (1, 24)
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, COMPACT=compact)
    y = threshold_linear(x, w_km, None, -1.0, config=cfg, out=poisoned(m, 24, torch.float32))
    assert_matches(y, x.double() @ w.double().T, torch.float32)


def weighted_oracle(x, w, bias, tau):
    """docs/spec.md, criterion weighted, in float64: keep x_i iff |x_i| * ||W[:, i]||_2 > tau."""
    norms = w.double().norm(dim=0)
    keep = x.double().abs() * norms > tau
    return (x.double() * keep) @ w.double().T + (0 if bias is None else bias.double()), keep


@interpreter
@SETTINGS
@given(m=st.one_of(st.just(1), st.integers(1, MAX_DECODE_TOKENS)), n=st.integers(1, 80), k=st.integers(2, 100),
       sparsity=st.floats(0.05, 0.95), dtype=st.sampled_from(KERNEL_DTYPES), has_bias=st.booleans(),
       compact=st.booleans(), program=st.sampled_from(["default", "per token", "dot"]),
       rows=st.sampled_from([16, 32, 128]), seed=st.integers(0, 10**6))
def test_threshold_linear_kernel_weighted(m, n, k, sparsity, dtype, has_bias, compact, program, rows, seed):
    """criterion weighted on every path, against float64 with the column norms written from docs/spec.md."""
    from sparsecc.passes.ffn import column_norms
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, m, k, dtype=dtype)
    # Column norms spread over two orders of magnitude, so the weighted criterion keeps other channels than |x|.
    w = (randn(gen, n, k, dtype=torch.float64) * torch.logspace(-1, 1, k, dtype=torch.float64)[torch.randperm(
        k, generator=gen)]).to(dtype)
    bias = randn(gen, n, dtype=dtype) if has_bias else None
    tau = gap_tau(x.double().abs() * w.double().norm(dim=0), sparsity)
    assume(tau is not None)
    ref, keep = weighted_oracle(x, w, bias, tau)
    assert 0 < int(keep.sum()) < keep.numel()   # tau lies between two scores: the form drops and keeps channels
    out = poisoned(m, n, dtype)
    cfg = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=rows, num_warps=4, COMPACT=compact,
                     PER_TOKEN=program == "per token", DOT=program == "dot")
    y = threshold_linear(x, w.t().contiguous().t(), bias, tau, config=cfg, out=out, channel_scale=column_norms(w))
    assert_matches(y, ref, dtype)


@interpreter
@pytest.mark.parametrize("m,compact,per_token", [(1, True, False), (1, False, False), (3, False, False),
                                                 (3, True, False), (3, True, True), (3, False, True)])
def test_threshold_linear_weighted_reads_only_surviving_rows(m, compact, per_token):
    """Channels with large |x| on light columns are dropped by the weighted score; their rows are NaN.

    The form is applied and differs from the magnitude criterion: the dropped channels hold the largest |x|, so
    magnitude at the same tau would keep them.
    """
    gen = torch.Generator().manual_seed(4)
    n, k = 40, 64
    x = randn(gen, m, k, dtype=torch.bfloat16)
    light = torch.arange(k) % 3 == 0
    x[:, light] = 4.0                                  # large inputs ...
    w = randn(gen, n, k, dtype=torch.float64)
    w[:, light] *= 1e-3                                # ... on columns of norm ~0.006
    w = w.to(torch.bfloat16)
    norms = w.double().norm(dim=0)
    tau = 0.5
    ref, keep = weighted_oracle(x, w, None, tau)
    assert not bool(keep[:, light].any()) and bool((x[:, light].double().abs() > tau).all())
    assert 0 < int(keep.sum()) < keep.numel()
    w_bad = w.clone()
    w_bad[:, light] = float("nan")
    cfg = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=32, num_warps=4, COMPACT=compact, PER_TOKEN=per_token)
    y = threshold_linear(x, w_bad.t().contiguous().t(), None, tau, config=cfg, channel_scale=norms.float())
    assert_matches(y, ref, torch.bfloat16)


@interpreter
@pytest.mark.parametrize("rows", [2048, 4096])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("tau", [0.1, -1.0])
def test_threshold_linear_lists_survivors_of_long_splits(rows, weighted, dot, tau):
    """One token over splits of 2048 and 4096 channels (K = 2600: a split's list spans several 1024-channel
    pieces, the last one cut by K): the survivors of every piece, and only they, are read.

    tau = 0.1 drops channels in every piece (their rows are NaN) and keeps a channel in each; tau = -1 keeps every
    channel, so a list that ran past K would read the NaN rows stored past the weight's end.
    """
    gen = torch.Generator().manual_seed(5 + rows + 2 * weighted + dot)
    n, k = 16, 2600
    x = randn(gen, 1, k, dtype=torch.float32)
    x = x.sign() * (x.abs() + 0.2)                     # every |x| above 0.2 ...
    dropped = torch.rand(k, generator=gen) < 0.6
    dropped[[5, 1030, 2100]] = False                   # ... a survivor in each 1024-channel piece
    x[:, dropped] *= 0.01                              # ... dropped channels far below tau = 0.1
    w = randn(gen, n, k, dtype=torch.float32)
    scale = torch.ones(k) if weighted else None
    keep = x.abs() > tau
    assert torch.equal(keep[0], ~dropped if tau > 0 else torch.ones(k, dtype=torch.bool))
    ref = (x.double() * keep) @ w.double().T
    # K-major storage with NaN rows past K; dropped channels' rows NaN too.
    storage = torch.full((k + 2048, n), float("nan"))
    storage[:k] = w.t()
    storage[:k][~keep[0]] = float("nan")
    w_in = storage[:k].t()
    cfg = GemvConfig(BLOCK_N=16, BLOCK_K=128, ROWS_PER_SPLIT=rows, num_warps=4, DOT=dot)
    y = threshold_linear(x, w_in, None, tau, config=cfg, out=poisoned(1, n, torch.float32), channel_scale=scale)
    assert_matches(y, ref, torch.float32)


@interpreter
@pytest.mark.parametrize("program", ["lanes", "dot", "per token"])
@pytest.mark.parametrize("k", [16 * 16, 16 * 37 + 5])
def test_threshold_linear_merges_many_splits(program, k, monkeypatch):
    """One row per program over 16 and 38 K splits of 16 channels, merged by the last ticket with the bias, against
    float64; the partial buffer is poisoned beyond the splits, so a merge that read past them would return NaN."""
    m = 3 if program == "per token" else 1
    gen = torch.Generator().manual_seed(k)
    n = 40
    x = randn(gen, m, k, dtype=torch.float32)
    w = randn(gen, n, k, dtype=torch.float32)
    bias = randn(gen, n, dtype=torch.float32)
    tau = 0.5
    keep = x.abs() > tau
    assert 0 < int(keep.sum()) < keep.numel()
    cfg = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=16, num_warps=4, DOT=program == "dot",
                     PER_TOKEN=program == "per token")
    splits = -(-k // 16)
    real_empty = torch.empty
    poisoned_partials = []

    def empty(*shape, **kw):   # the launch's float32 partials: allocated with room past the splits, all NaN
        if kw.get("dtype") == torch.float32 and tuple(shape[:1]) == (splits,):
            buf = torch.full((splits + 16, *shape[1:]), float("nan"), dtype=torch.float32)
            poisoned_partials.append(buf)
            return buf[:splits]
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    y = threshold_linear(x, w.t().contiguous().t(), bias, tau, config=cfg, out=poisoned(m, n, torch.float32))
    monkeypatch.undo()
    assert poisoned_partials, "the launch merged no K splits"
    assert_matches(y, (x.double() * keep) @ w.double().T + bias.double(), torch.float32)


@interpreter
def test_threshold_linear_weighted_score_at_tau_is_dropped():
    """The comparison is strict: a channel whose float32 score equals tau is dropped."""
    x = torch.tensor([[0.5, -1.0, 0.75, 0.25]], dtype=torch.float32)
    w = torch.eye(4, dtype=torch.float32)
    scale = torch.tensor([2.0, 1.0, 1.0, 8.0])          # scores 1.0, 1.0, 0.75, 2.0
    y = threshold_linear(x, w, None, 1.0, config=SMALL_GEMV, channel_scale=scale)
    assert y.tolist() == [[0.0, 0.0, 0.0, 0.25]]


def test_threshold_linear_rejects_a_channel_scale_of_the_wrong_width():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"channel_scale must have shape \[8\]"):
        threshold_linear(x, w, None, 0.1, channel_scale=torch.ones(4))


@interpreter
@pytest.mark.parametrize("m,compact,per_token", [(1, True, False), (1, False, False), (3, False, False),
                                                 (3, True, False), (3, True, True), (3, False, True)])
def test_threshold_linear_reads_only_surviving_rows(m, compact, per_token):
    """Weight rows of channels no token keeps are NaN: a kernel that read them would return NaN."""
    gen = torch.Generator().manual_seed(3)
    n, k = 40, 64
    x = randn(gen, m, k, dtype=torch.bfloat16)
    x[:, ::3] = 0.01  # below tau for every token
    w = randn(gen, n, k, dtype=torch.bfloat16)
    w_bad = w.clone()
    w_bad[:, ::3] = float("nan")
    cfg = GemvConfig(BLOCK_N=32, BLOCK_K=16, ROWS_PER_SPLIT=32, num_warps=4, COMPACT=compact, PER_TOKEN=per_token)
    y = threshold_linear(x, w_bad.t().contiguous().t(), None, 0.05, config=cfg)
    assert_matches(y, threshold_linear_ref(x.double(), w.double(), None, 0.05), torch.bfloat16)


@interpreter
def test_threshold_linear_values_at_tau_are_dropped():
    x = torch.tensor([[0.5, -0.5, 0.75, 0.25]], dtype=torch.float16)
    w = torch.eye(4, dtype=torch.float16)
    y = threshold_linear(x, w, None, 0.5, config=SMALL_GEMV)
    assert y.tolist() == [[0.0, 0.0, 0.75, 0.0]]


@interpreter
def test_threshold_linear_new_weight_at_a_reused_address():
    """The K-major copy is cached per weight tensor: a new weight never gets an old weight's copy."""
    gen = torch.Generator().manual_seed(5)
    x = randn(gen, 2, 32, dtype=torch.float16)
    for _ in range(3):
        w = randn(gen, 24, 32, dtype=torch.float16)  # row-major: the wrapper makes a K-major copy
        y = threshold_linear(x, w, None, 0.2, config=SMALL_GEMV)
        assert_matches(y, threshold_linear_ref(x.double(), w.double(), None, 0.2), torch.float16)
        del w, y
    w = randn(gen, 24, 32, dtype=torch.float16)
    threshold_linear(x, w, None, 0.2, config=SMALL_GEMV)
    with torch.no_grad():
        w.mul_(2)  # an in-place update bumps _version: the copy is rebuilt
    assert_matches(threshold_linear(x, w, None, 0.2, config=SMALL_GEMV),
                   threshold_linear_ref(x.double(), w.double(), None, 0.2), torch.float16)


def test_threshold_linear_many_tokens_is_the_dense_reference():
    gen = torch.Generator().manual_seed(4)
    x = randn(gen, MAX_DECODE_TOKENS + 1, 24, dtype=torch.float32)
    w, b = randn(gen, 8, 24, dtype=torch.float32), randn(gen, 8, dtype=torch.float32)
    torch.testing.assert_close(threshold_linear(x, w, b, 0.3), threshold_linear_ref(x, w, b, 0.3))


# ------------------------------------------------------------------ registration


def test_kernels_are_registered_for_cuda_only():
    for name, fn in (("block_sparse_linear", block_sparse_linear_op), ("threshold_linear", threshold_linear)):
        assert ops.triton_kernel(name, torch.device("cuda")) is fn
        assert ops.triton_kernel(name, torch.device("cpu")) is None


def test_import_sparsecc_does_not_import_triton():
    code = "import sys, sparsecc, sparsecc.codegen.ops; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ GPU: realistic shapes


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("swap_ab", [None, False, True])  # None: the default config
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,block,density,activation", [
    (1024, 14336, 4096, (64, 64), 0.1, "silu"),
    (512, 4096, 14336, (128, 128), 0.25, "gelu_tanh"),
    (300, 4096, 4096, (32, 64), 0.5, "none"),
    (7, 1024, 4096, (16, 32), 0.1, "relu2"),
])
def test_block_sparse_linear_gpu(dtype, m, n, k, block, density, activation, swap_ab):
    gen = torch.Generator(device="cuda").manual_seed(m)
    c = compress_block_weights(randn(gen, n, k, dtype=dtype, device="cuda"), BlockWeights(block, density))
    x = randn(gen, m, k, dtype=dtype, device="cuda")
    bias = randn(gen, n, dtype=dtype, device="cuda")
    out = poisoned(m, n, dtype, "cuda")
    block_m = 64 if m >= 64 else 16
    cfg = None if swap_ab is None else BlockLinearConfig(BLOCK_M=block_m, num_warps=4, num_stages=3,
                                                         SWAP_AB=swap_ab)
    y = block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, activation=activation, config=cfg, out=out)
    ref = activation_ref(activation)(x.float() @ c.to_dense().float().T + bias.float()).double()
    assert_matches(y, ref, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_threshold_linear_gpu(dtype, m, n, k, sparsity):
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    x = randn(gen, m, k, dtype=dtype, device="cuda")
    tau = float(torch.quantile(x.abs().float().flatten(), sparsity))
    w = randn(gen, n, k, dtype=dtype, device="cuda") / k ** 0.5
    bias = randn(gen, n, dtype=dtype, device="cuda")
    out = poisoned(m, n, dtype, "cuda")
    y = threshold_linear(x, w, bias, tau, out=out)
    keep = x.abs() > tau
    ref = ((x.float() * keep) @ w.float().T + bias.float()).double()
    assert_matches(y, ref, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
def test_threshold_linear_weighted_gpu(dtype, m, n, k):
    """criterion weighted at Llama-3-8B shapes, 70% of the weighted scores dropped, float32 oracle."""
    from sparsecc.passes.ffn import column_norms
    gen = torch.Generator(device="cuda").manual_seed(7 * m + k)
    x = randn(gen, m, k, dtype=dtype, device="cuda")
    w = (randn(gen, n, k, dtype=torch.float32, device="cuda") / k ** 0.5 *
         torch.logspace(-1, 1, k, device="cuda")).to(dtype)
    bias = randn(gen, n, dtype=dtype, device="cuda")
    norms = column_norms(w)
    score = x.float().abs() * norms
    tau = float(torch.quantile(score.flatten(), 0.7))
    keep = score > tau
    assert 0.25 < float(keep.float().mean()) < 0.35
    out = poisoned(m, n, dtype, "cuda")
    y = threshold_linear(x, w.t().contiguous().t(), bias, tau, out=out, channel_scale=norms)
    ref = ((x.float() * keep) @ w.float().T + bias.float()).double()
    assert_matches(y, ref, dtype)


def test_row_order_is_prepared_once_and_refreshed_in_place():
    """The cached row order keeps its tensor (and address) when the weight's row pointers change in place.

    The compiler prepares it when it binds a weight, outside any CUDA-graph
    memory pool; a later in-place weight refresh must not allocate a new one.
    """
    from sparsecc.codegen.block_sparse_linear import _row_order, prepare_row_order

    row_ptr = torch.tensor([0, 1, 4, 6], dtype=torch.int32)   # rows keep 1, 3, 2 blocks
    prepare_row_order(row_ptr)
    first = _row_order(row_ptr)
    assert first.tolist() == [1, 2, 0]
    row_ptr.copy_(torch.tensor([0, 3, 4, 6], dtype=torch.int32))   # now 3, 1, 2 blocks
    again = _row_order(row_ptr)
    assert again is first and again.tolist() == [0, 2, 1]
