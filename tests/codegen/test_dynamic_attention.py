"""Dynamic attention (block_topk, vertical_slash): reference semantics, Triton kernels against the references.

CPU: the Triton kernels run in the interpreter in a child process (see
test_interpreter_checks, as in test_attention_kernels.py). GPU (``gpu``
marker): realistic shapes, NaN-poisoned outputs, an fp32 reference over the
kernel's own table, bf16 relative error under 1e-2.
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from sparsecc.codegen.block_attention import block_sparse_attention_ref, dense_attention_ref
from sparsecc.codegen.dynamic_attention import (block_topk_table_ref, dynamic_attention_ref, dynamic_table_ref,
                                                vertical_slash_scores_ref, vertical_slash_table_ref)
from sparsecc.forms import BlockTopK, VerticalSlash
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

FEW = settings(deadline=None, max_examples=min(settings().max_examples, 8))


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton with TRITON_INTERPRET=1."""
    run_interpreter_checks(__file__, select='kernel')


def rows_of(table, b=0, h=0):
    """Kept key blocks per query block, as sets, for one (batch, head)."""
    mask = table.to_dense_block_mask()[b, h]
    return [set(torch.nonzero(r).flatten().tolist()) for r in mask]


def token_keep(table, b, h):
    """Token-level keep [Sq, Sk] of a table: its blocks, then causality (bottom-right)."""
    cells = table.to_dense_block_mask()[b if table.kv_num_blocks.shape[0] > 1 else 0,
                                         h if table.kv_num_blocks.shape[1] > 1 else 0]
    rows = torch.arange(table.seq_q) // table.block_q
    cols = torch.arange(table.seq_k) // table.block_k
    keep = cells[rows][:, cols]
    if table.causal:
        keep = keep & (torch.arange(table.seq_k)[None, :] <= torch.arange(table.seq_q)[:, None] + table.q_offset)
    return keep


def restricted_dense(q, k, v, table, scale):
    """Dense attention with the table's token-level keep mask, in float64."""
    b, h = q.shape[:2]
    mask = torch.stack([torch.stack([token_keep(table, i, j) for j in range(h)]) for i in range(b)])
    return dense_attention_ref(q.double(), k.double(), v.double(), scale=scale, causal=False, mask=mask)


def make(seed, b, h, hkv, sq, sk, d, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, s, d, generator=gen).to(dtype) for n, s in ((h, sq), (hkv, sk), (hkv, sk)))


# ---------------------------------------------------------------- hand-checked references

def _block_keys(weights, block=16, d=16):
    """q = e0 everywhere; every token of key block b is weights[b] * e0, so block b scores scale * weights[b]."""
    n = len(weights)
    q = torch.zeros(1, 1, n * block, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, n * block, d)
    k[..., 0] = torch.tensor(weights, dtype=torch.float32).repeat_interleave(block)
    return q, k


def test_block_topk_causal_hand_case():
    q, k = _block_keys([0.0, 3.0, 1.0, 2.0])
    table = block_topk_table_ref(q, k, block=16, topk=1, causal=True)
    assert rows_of(table) == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 3}]
    full = table.to_dense_block_mask(full_only=True)[0, 0]
    # Diagonal blocks are partial (causal), the others full.
    assert [set(torch.nonzero(r).flatten().tolist()) for r in full] == [set(), {0}, {0, 1}, {0, 1}]


def test_block_topk_ties_go_to_the_lower_block():
    q, k = _block_keys([0.0, 1.0, 1.0, 1.0])
    table = block_topk_table_ref(q, k, block=16, topk=1, sink_blocks=0, local_blocks=0, causal=True)
    assert rows_of(table)[3] == {1}


def test_block_topk_cdf_hand_case():
    q, k = _block_keys([0.0, 0.0, 0.0, 40.0])
    table = block_topk_table_ref(q, k, block=16, cdf=0.5, sink_blocks=0, local_blocks=0, causal=True, scale=1.0)
    # Row 2: three equal blocks, the second still starts below half the mass; row 1: its second starts at half.
    assert rows_of(table) == [{0}, {0}, {0, 1}, {3}]
    table = block_topk_table_ref(q, k, block=16, cdf=0.5, sink_blocks=1, local_blocks=0, causal=True, scale=1.0)
    # With the sink forced, row 1 already holds half the mass of its two equal blocks: nothing more.
    assert rows_of(table)[1] == {0} and rows_of(table)[3] == {0, 3}


def test_block_topk_bidirectional_and_ragged():
    q, k = _block_keys([0.0, 3.0, 1.0, 2.0])
    table = block_topk_table_ref(q, k, block=16, topk=1, sink_blocks=0, causal=False)
    assert rows_of(table) == [{0, 1}, {1, 3}, {1, 2}, {1, 3}]
    assert table.to_dense_block_mask(partial_only=True).sum() == 0   # no causality, no ragged block
    table = block_topk_table_ref(q[:, :, :40], k[:, :, :50], block=16, topk=1, causal=False)
    partial = table.to_dense_block_mask(partial_only=True)[0, 0]
    assert partial[:, 3].all() == bool(table.to_dense_block_mask()[0, 0][:, 3].all())   # ragged key block
    assert not table.to_dense_block_mask(full_only=True)[0, 0][2].any()                 # ragged query block


def test_block_topk_queries_are_the_last_positions():
    q, k = _block_keys([0.0, 3.0, 1.0, 2.0, 0.5])
    table = block_topk_table_ref(q[:, :, -24:], k, block=16, topk=1, sink_blocks=0, local_blocks=1)
    # Rows 0-15 hold positions 56-71 (key blocks 3 and 4), rows 16-23 positions 72-79 (block 4).
    assert rows_of(table) == [{1, 3, 4}, {1, 4}]


def _vs_inputs(sk=128, hot=100, d=16):
    q = torch.zeros(1, 1, sk, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, sk, d)
    k[0, 0, hot, 0] = 10.0
    return q, k


def test_vertical_slash_column_hand_case():
    q, k = _vs_inputs(sk=64, hot=40)
    table = vertical_slash_table_ref(q, k, last_q=1, vertical=1, slash=0, block=16)
    assert rows_of(table) == [{0}, {0, 1}, {0, 2}, {0, 2, 3}]


def test_vertical_slash_diagonal_hand_case():
    q, k = _vs_inputs(sk=128, hot=100)
    col, diag, t_min = vertical_slash_scores_ref(q, k, last_q=1)
    assert t_min == 0 and int(col.argmax()) == 100 and int(diag.argmax()) == 27
    table = vertical_slash_table_ref(q, k, last_q=1, vertical=0, slash=1, block=16)
    rows = rows_of(table)
    # Diagonal 27 crosses key blocks a-1 and a-2 of query block a; column 0 and diagonal 0 are always kept.
    assert rows[7] == {0, 5, 6, 7} and rows[3] == {0, 1, 2, 3} and rows[1] == {0, 1}


def test_vertical_slash_scores_are_probability_sums():
    q, k, _ = make(0, 2, 4, 2, 20, 37, 8)
    for causal in (True, False):
        col, diag, _ = vertical_slash_scores_ref(q, k, last_q=5, causal=causal)
        torch.testing.assert_close(col.sum(-1), torch.full((2, 4), 5.0))
        torch.testing.assert_close(diag.sum(-1), torch.full((2, 4), 5.0))


@pytest.mark.parametrize("form", [BlockTopK(block=16, topk=1), BlockTopK(block=16, cdf=0.7, pool="max"),
                                  VerticalSlash(last_q=4, vertical=2, slash=3, block=16)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_output_is_dense_attention_restricted_to_the_table(form, causal):
    q, k, v = make(1, 2, 4, 2, 37, 53, 16)
    table = dynamic_table_ref(q, k, form, causal, None)
    assert table.density() < 1.0
    out = dynamic_attention_ref(q, k, v, form=form, causal=causal)
    torch.testing.assert_close(out.double(), restricted_dense(q, k, v, table, 0.25), atol=1e-5, rtol=1e-5)


@FEW
@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.integers(1, 2),
       sk=st.integers(1, 70), cut=st.integers(0, 40), topk=st.integers(1, 3), sink=st.integers(0, 2),
       local=st.integers(0, 2), causal=st.booleans())
def test_block_topk_invariants(seed, b, hkv, group, sk, cut, topk, sink, local, causal):
    sq = max(1, sk - cut)
    q, k, _ = make(seed, b, hkv * group, hkv, sq, sk, 8)
    table = block_topk_table_ref(q, k, block=16, topk=topk, sink_blocks=sink, local_blocks=local, causal=causal)
    allowed = table.allowed_blocks()
    kept = table.to_dense_block_mask()
    assert not (kept & ~allowed).any()
    n_allowed = allowed.sum(-1)
    forced_max = min(sink, table.num_k_blocks) + (local + 1 if local else 0)
    assert (kept.sum(-1) <= torch.clamp(n_allowed, max=forced_max + topk)).all()
    assert (kept.sum(-1) >= torch.clamp(n_allowed, max=topk)).all()


# ---------------------------------------------------------------- brute force from docs/spec.md
#
# Written from the text of docs/spec.md only (no sparsecc helper): float64 everywhere, the keep mask built
# element by element, then rounded out to blocks, then intersected with causality.

def brute_softmax_attention(q, k, v, keep, scale):
    """Float64 attention of [B, H, Sq, D] queries over GQA keys with an explicit bool keep [B, H, Sq, Sk]."""
    group = q.shape[1] // k.shape[1]
    kk, vv = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    s = (scale * q.double() @ kk.transpose(-1, -2)).masked_fill(~keep, -math.inf)
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0) @ vv


def brute_vs_selection(q, k, last_q, vertical, slash, causal, scale):
    """vertical_slash steps 1-2 per (batch, head): kept columns, kept diagonals {t} and the selection's margin.

    The margin is the smallest gap, relative to the largest score, between the last kept and the first
    dropped score of either ranking: float32 kernels and this float64 brute force may only disagree below it.
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    group = h // k.shape[1]
    n = min(last_q, sq)
    out, margin = {}, math.inf
    for bi in range(b):
        for hi in range(h):
            rows = range(sq - n, sq)
            col = [0.0] * sk
            diag = {}
            for i in rows:
                p = i + sk - sq
                keys = [j for j in range(sk) if j <= p] if causal else list(range(sk))
                logits = torch.stack([scale * (q[bi, hi, i].double() @ k[bi, hi // group, j].double()) for j in keys])
                probs = torch.softmax(logits, 0).tolist()
                for j, pr in zip(keys, probs):
                    col[j] += pr
                    diag[p - j] = diag.get(p - j, 0.0) + pr
            # Diagonals some scoring row reaches (every t = p - j of a kept-or-not key of a scoring row).
            cols = sorted(range(1, sk), key=lambda j: (-col[j], j))
            diags = sorted((t for t in diag if t != 0), key=lambda t: (-diag[t], t))
            kept_cols = {0, *cols[:vertical]}
            kept_diags = {0, *diags[:slash]}
            top = max(col + list(diag.values()))
            for ranked, score, budget in ((cols, col, vertical), (diags, diag, slash)):
                if 0 < budget < len(ranked):
                    margin = min(margin, abs(score[ranked[budget - 1]] - score[ranked[budget]]) / top)
            out[bi, hi] = (kept_cols, kept_diags)
    return out, margin


def brute_vs_keep(q, k, last_q, vertical, slash, block, causal, scale):
    """Token keep [B, H, Sq, Sk] of vertical_slash (steps 1-3 and the attention rule) and the selection margin."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    selection, margin = brute_vs_selection(q, k, last_q, vertical, slash, causal, scale)
    p = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    keep = torch.zeros(b, h, sq, sk, dtype=torch.bool)
    for (bi, hi), (cols, diags) in selection.items():
        element = torch.isin(j, torch.tensor(sorted(cols))) | torch.isin(p - j, torch.tensor(sorted(diags)))
        if causal:
            element = element & (j <= p)     # a kept element counts only where it is causally allowed
        rows_block, cols_block = torch.arange(sq) // block, torch.arange(sk) // block
        cell = torch.zeros(rows_block.max() + 1, cols_block.max() + 1, dtype=torch.bool)
        for i in range(sq):
            for jj in range(sk):
                if element[i, jj]:
                    cell[rows_block[i], cols_block[jj]] = True
        tokens = cell[rows_block][:, cols_block]
        keep[bi, hi] = tokens & (j <= p) if causal else tokens
    return keep, margin


def test_vertical_slash_bidirectional_ragged_last_block_is_not_always_kept():
    """Regression: with Sk % block != 0 the last key block was kept by every query block (bidirectional)."""
    q, k, v = make(0, 1, 2, 1, 40, 40, 16)
    table = vertical_slash_table_ref(q, k, last_q=4, vertical=0, slash=0, block=16, causal=False)
    # Only column 0 and diagonal 0: block (a, b) holds one iff b == 0 or a == b.
    want = torch.eye(3, dtype=torch.bool) | (torch.arange(3) == 0)[None, :]
    assert torch.equal(table.to_dense_block_mask()[0], want.expand(2, 3, 3))
    keep, _ = brute_vs_keep(q, k, 4, 0, 0, 16, False, 0.25)
    out = dynamic_attention_ref(q, k, v, form=VerticalSlash(last_q=4, vertical=0, slash=0, block=16), causal=False)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, keep, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("last_q", [1, 5])
def test_vertical_slash_bidirectional_never_keeps_diagonals_no_scoring_row_reaches(last_q):
    """A slash budget larger than the reached diagonals keeps them all, and none below t = 1 - last_q."""
    q, k, v = make(last_q, 1, 2, 1, 64, 64, 16)
    form = VerticalSlash(last_q=last_q, vertical=0, slash=10_000, block=16)
    table = vertical_slash_table_ref(q, k, last_q=last_q, vertical=0, slash=10_000, block=16, causal=False)
    # Every diagonal t >= 1 - last_q is kept, so block (a, b) is kept iff it holds some p - j >= 1 - last_q.
    a, b = torch.arange(4)[:, None], torch.arange(4)[None, :]
    want = (a * 16 + 15) - (b * 16) >= 1 - last_q
    assert torch.equal(table.to_dense_block_mask()[0], want.expand(2, 4, 4))
    keep, _ = brute_vs_keep(q, k, last_q, 0, 10_000, 16, False, 0.25)
    out = dynamic_attention_ref(q, k, v, form=form, causal=False)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, keep, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sq,sk", [(40, 40), (23, 50), (1, 33), (50, 50), (17, 31)])
@pytest.mark.parametrize("causal", [True, False])
def test_vertical_slash_structural_layout_matches_brute_force(sq, sk, causal):
    """vertical = slash = 0 keeps column 0 and diagonal 0 only: the layout does not depend on scores."""
    q, k, v = make(sq * 100 + sk, 2, 4, 2, sq, sk, 16)
    keep, _ = brute_vs_keep(q, k, 3, 0, 0, 16, causal, 0.25)
    out = dynamic_attention_ref(q, k, v, form=VerticalSlash(last_q=3, vertical=0, slash=0, block=16), causal=causal)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, keep, 0.25), atol=1e-5, rtol=1e-5)


@FEW
@given(seed=st.integers(0, 2**16), sk=st.integers(1, 70), cut=st.integers(0, 40), last_q=st.integers(1, 12),
       vertical=st.integers(0, 5), slash=st.integers(0, 5), block=st.sampled_from([16, 32]), causal=st.booleans())
def test_vertical_slash_matches_brute_force(seed, sk, cut, last_q, vertical, slash, block, causal):
    sq = max(1, sk - cut)
    q, k, v = make(seed, 1, 2, 1, sq, sk, 8)
    keep, margin = brute_vs_keep(q, k, last_q, vertical, slash, block, causal, 0.3)
    assume(margin > 1e-4)   # a near-tie may rank either way in float32
    form = VerticalSlash(last_q=last_q, vertical=vertical, slash=slash, block=block)
    out = dynamic_attention_ref(q, k, v, form=form, causal=causal, scale=0.3)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, keep, 0.3), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- Triton interpreter

def same_table(a, b):
    return (torch.equal(a.to_dense_block_mask(full_only=True), b.to_dense_block_mask(full_only=True))
            and torch.equal(a.to_dense_block_mask(partial_only=True), b.to_dense_block_mask(partial_only=True)))


KERNEL_FORMS = [BlockTopK(block=16, topk=1), BlockTopK(block=16, topk=2, sink_blocks=0, local_blocks=2),
                BlockTopK(block=16, cdf=0.6, pool="max"), BlockTopK(block=32, cdf=1.0),
                VerticalSlash(last_q=8, vertical=3, slash=4, block=16), VerticalSlash(last_q=3, vertical=0, slash=0,
                                                                                      block=32)]
KERNEL_SHAPES = [(1, 2, 1, 40, 50, 16), (2, 4, 2, 64, 64, 32), (1, 2, 2, 17, 33, 8), (2, 4, 4, 1, 70, 16)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("form", KERNEL_FORMS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_tables_match_reference(interpreter, form, shape, causal):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(7, *shape)
    build = kern.block_topk_table if isinstance(form, BlockTopK) else kern.vertical_slash_table
    got = build(q, k, form, causal, 0.3, validate=True)   # validate: the BlockTable constructor checks it
    assert same_table(got, dynamic_table_ref(q, k, form, causal, 0.3))


@FEW
@given(seed=st.integers(0, 2**16), hkv=st.integers(1, 2), group=st.integers(1, 2), sk=st.integers(1, 80),
       cut=st.integers(0, 50), d=st.sampled_from([8, 16]), topk=st.integers(1, 3), cdf=st.floats(0.05, 1.0),
       use_cdf=st.booleans(), causal=st.booleans(), pool=st.sampled_from(["mean", "max"]))
def test_kernel_block_topk_property(interpreter, seed, hkv, group, sk, cut, d, topk, cdf, use_cdf, causal, pool):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(seed, 1, hkv * group, hkv, max(1, sk - cut), sk, d)
    form = BlockTopK(block=16, topk=None if use_cdf else topk, cdf=cdf if use_cdf else None, pool=pool)
    got = kern.block_topk_table(q, k, form, causal, 1.0 / math.sqrt(d), validate=True)
    assert same_table(got, dynamic_table_ref(q, k, form, causal, None))


@FEW
@given(seed=st.integers(0, 2**16), sk=st.integers(1, 80), cut=st.integers(0, 50), last_q=st.integers(1, 20),
       vertical=st.integers(0, 6), slash=st.integers(0, 6), causal=st.booleans())
def test_kernel_vertical_slash_property(interpreter, seed, sk, cut, last_q, vertical, slash, causal):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(seed, 1, 2, 1, max(1, sk - cut), sk, 16)
    form = VerticalSlash(last_q=last_q, vertical=vertical, slash=slash, block=16)
    got = kern.vertical_slash_table(q, k, form, causal, 0.25, validate=True)
    assert same_table(got, dynamic_table_ref(q, k, form, causal, None))


@pytest.mark.parametrize("sq,sk", [(40, 40), (17, 50), (33, 33)])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_vertical_slash_ragged_last_block_matches_brute_force(interpreter, sq, sk, causal):
    """The Triton table path against the brute force (regression: bidirectional kept the ragged last block)."""
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(5, 1, 2, 1, sq, sk, 16)
    table = kern.vertical_slash_table(q, k, VerticalSlash(last_q=4, vertical=0, slash=0, block=16), causal, 0.25,
                                      validate=True)
    keep, _ = brute_vs_keep(q, k, 4, 0, 0, 16, causal, 0.25)
    rows = torch.arange(sq) // 16
    cols = torch.arange(sk) // 16
    tokens = table.to_dense_block_mask()[0][:, rows][:, :, cols]
    if causal:
        tokens = tokens & (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq)
    assert torch.equal(tokens, keep[0])


def test_kernel_attention_on_the_kernel_table(interpreter):
    """The flash kernel over a kernel-built table equals dense attention restricted to it."""
    from sparsecc.codegen import block_attention as ba
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, v = make(3, 1, 2, 1, 40, 48, 16, torch.bfloat16)
    table = kern.block_topk_table(q, k, BlockTopK(block=16, topk=1), True, 0.25, validate=True)
    out = torch.full_like(q, float("nan"))
    ba._launch_prefill(q, k, v, None, 0.25, True, False, table=table, out=out)
    torch.testing.assert_close(out.double(), restricted_dense(q, k, v, table, 0.25), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- GPU

GPU_CASES = [(BlockTopK(block=64, topk=8), True), (BlockTopK(block=128, cdf=0.9), True),
             (BlockTopK(block=64, topk=4, pool="max"), False),
             (VerticalSlash(last_q=64, vertical=256, slash=512, block=64), True)]


@pytest.mark.gpu
@pytest.mark.parametrize("form,causal", GPU_CASES, ids=str)
@pytest.mark.parametrize("sq", [4096, 3000])
def test_gpu_dynamic_attention(form, causal, sq):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sparsecc.codegen.dynamic_attention import dynamic_block_attention, dynamic_table

    sk = 4096
    q, k, v = (t.cuda() for t in make(11, 2, 8, 2, sq, sk, 128, torch.bfloat16))
    table = dynamic_table(q, k, form, causal, None)
    ref_table = dynamic_table_ref(q, k, form, causal, None)
    got, want = table.to_dense_block_mask(), ref_table.to_dense_block_mask()
    # Scores differ from the reference only in summation order: near-ties may flip a handful of blocks.
    assert (got != want).float().mean().item() < 1e-3
    out = torch.full_like(q, float("nan"))
    dynamic_block_attention(q, k, v, form=form, causal=causal, out=out)
    assert torch.isfinite(out).all()
    exact = block_sparse_attention_ref(q.float(), k.float(), v.float(), table=table, scale=1 / math.sqrt(128))
    err = (out.float() - exact).norm() / exact.norm()
    assert err.item() < 1e-2
