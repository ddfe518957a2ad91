"""Dynamic attention (block_topk, vertical_slash): reference semantics, Triton kernels against the references.

vertical_slash is checked against tests/oracle/oracle.py (written from docs/spec.md alone, float64).

CPU: the Triton kernels run in the interpreter in a child process (see
test_interpreter_checks, as in test_attention_kernels.py). GPU (``gpu``
marker): realistic shapes, NaN-poisoned outputs, an fp32 reference over the
kernel's own table, bf16 relative error under 1e-2.
"""

import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

from sparsecc.codegen.block_attention import block_sparse_attention_ref, dense_attention_ref
from sparsecc.codegen.dynamic_attention import (block_topk_table_ref, dynamic_attention_ref, dynamic_table_ref,
                                                vertical_slash_scores_ref)
from sparsecc.codegen.vertical_slash import (vertical_slash_attention_ref, vertical_slash_index_ref,
                                             vertical_slash_keep_ref, vertical_slash_kept_pairs,
                                             vertical_slash_select_ref)
from sparsecc.forms import BlockTopK, VerticalSlash
from tests.budgets import examples
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

FEW = examples(8)   # the interpreter is slow: 8 examples under ci, DEEP_FACTOR times that under deep


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


def test_vertical_slash_scores_are_probability_sums():
    q, k, _ = make(0, 2, 4, 2, 20, 37, 8)
    for causal in (True, False):
        col, diag, _ = vertical_slash_scores_ref(q, k, last_q=5, causal=causal)
        torch.testing.assert_close(col.sum(-1), torch.full((2, 4), 5.0))
        torch.testing.assert_close(diag.sum(-1), torch.full((2, 4), 5.0))


@pytest.mark.parametrize("form", [BlockTopK(block=16, topk=1), BlockTopK(block=16, cdf=0.7, pool="max"),
                                  BlockTopK(block=16, topk=1, pool="rows", rows=2)], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_output_is_dense_attention_restricted_to_the_table(form, causal):
    q, k, v = make(1, 2, 4, 2, 37, 53, 16)
    table = dynamic_table_ref(q, k, form, causal, None)
    assert table.density() < 1.0
    out = dynamic_attention_ref(q, k, v, form=form, causal=causal)
    torch.testing.assert_close(out.double(), restricted_dense(q, k, v, table, 0.25), atol=1e-5, rtol=1e-5)


def test_sampled_rows_are_the_last_real_row_and_every_stride_before_it():
    from sparsecc.codegen.dynamic_attention import sampled_rows

    row, valid = sampled_rows(37, 16, 4, "cpu")       # blocks of rows 0-15, 16-31, 32-36
    assert row[valid].tolist() == [15, 11, 7, 3, 31, 27, 23, 19, 36, 32]
    assert valid.sum(1).tolist() == [4, 4, 2]


@pytest.mark.parametrize("causal", [True, False])
def test_sampled_row_scores_are_log_mean_masses_of_the_rows_softmax(causal):
    """Hand computation: one query block of 8 rows, 2 sampled rows (7 and 3), keys in blocks of 8."""
    from sparsecc.codegen.dynamic_attention import sampled_row_scores_ref

    q, k, _ = make(3, 1, 2, 1, 8, 24, 8)
    scores = sampled_row_scores_ref(q, k, block=8, rows=2, causal=causal, scale=0.5)
    qd, kd = q.double(), k.double().expand(1, 2, 24, 8)
    masses = []
    for r in (7, 3):
        logits = 0.5 * torch.einsum("bhd,bhjd->bhj", qd[:, :, r], kd)
        if causal:
            logits[..., r + 16 + 1:] = -math.inf
        masses.append(torch.softmax(logits, -1).view(1, 2, 3, 8).sum(-1))
    expect = torch.log((masses[0] + masses[1]) / 2)
    torch.testing.assert_close(scores[:, :, 0].double(), expect, atol=1e-5, rtol=1e-5)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(1, 2, 1))


@pytest.mark.parametrize("causal", [True, False])
def test_min_mass_keeps_the_always_kept_blocks_and_every_block_with_that_much_sampled_mass(causal):
    from sparsecc.codegen.dynamic_attention import block_masks, sampled_row_scores_ref

    q, k, _ = make(4, 1, 2, 1, 64, 96, 8)
    form = BlockTopK(block=16, min_mass=0.15, pool="rows", rows=4, sink_blocks=1, local_blocks=1)
    kept = dynamic_table_ref(q, k, form, causal, 0.5).to_dense_block_mask()
    mass = sampled_row_scores_ref(q, k, block=16, rows=4, causal=causal, scale=0.5).exp()
    allowed = block_masks(64, 96, 16, causal, q.device)[0]
    a, b = torch.arange(4)[:, None], torch.arange(6)[None, :]
    forced = allowed & ((b == 0) | ((b >= a + 2) & (b <= a + 2)))    # Sk - Sq = 32: query block a ends in key block a+2
    want = forced | (allowed & (mass >= 0.15))
    assert torch.equal(kept, want)
    assert (allowed & ~want).any() and (want & ~forced).any()       # both kinds of decision were made


def test_a_given_estimate_selects_what_the_computed_one_selects():
    from sparsecc.codegen.dynamic_attention import block_topk_scores_ref, block_topk_table_ref

    q, k, _ = make(5, 1, 4, 2, 80, 80, 8)
    for rule in ({"topk": 2}, {"cdf": 0.8}, {"min_mass": 0.1}):
        form = BlockTopK(block=16, pool="rows", rows=4, **rule)
        scores = block_topk_scores_ref(q, k, form, True, 0.5)
        given = block_topk_table_ref(q, k, block=16, pool="rows", rows=4, scale=0.5, scores=scores, **rule)
        computed = block_topk_table_ref(q, k, block=16, pool="rows", rows=4, scale=0.5, **rule)
        assert torch.equal(given.to_dense_block_mask(), computed.to_dense_block_mask())
        # The table reads the given scores: reversing their order changes the choice.
        flipped = block_topk_table_ref(q, k, block=16, pool="rows", rows=4, scale=0.5, scores=-scores, **rule)
        assert not torch.equal(flipped.to_dense_block_mask(), computed.to_dense_block_mask())
    with pytest.raises(ValueError, match="do not match"):
        block_topk_table_ref(q, k, block=16, topk=2, scores=scores[..., :-1])


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


def _oracle_keep(q, k, form, scale):
    from tests.oracle import oracle
    return oracle.vertical_slash_keep(q, k, scale=scale, causal=True, last_q=form.last_q, vertical=form.vertical,
                                      slash=form.slash, block=form.block)


def _hot(sk, d=16, cols=(), diag_keys=()):
    """q = e0 everywhere; keys listed in ``cols`` score 8 on e0 (hot columns), the others 0."""
    q = torch.zeros(1, 1, sk, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, sk, d)
    for j in cols:
        k[0, 0, j, 0] = 8.0
    return q, k


def test_vertical_slash_forced_and_budgets():
    """Budgets at least 30 / 50; the first 30 columns and the nearest diagonals come first (docs/spec.md)."""
    q, k = _hot(300, cols=(200, 250))
    cols, offs = vertical_slash_select_ref(q, k, VerticalSlash(last_q=4, vertical=1, slash=1, block=16), 1.0)
    assert cols[0, 0].tolist() == list(range(30))           # max(1, 30) = 30: only the forced ones
    assert offs[0, 0].tolist() == list(range(49, -1, -1))    # max(1, 50) = 50 < 100 forced: the 50 nearest
    cols, offs = vertical_slash_select_ref(q, k, VerticalSlash(last_q=4, vertical=32, slash=101, block=16), 1.0)
    assert cols[0, 0].tolist() == list(range(30)) + [200, 250]
    assert sorted(offs[0, 0].tolist())[:100] == list(range(100)) and offs.shape[-1] == 101
    cols, _ = vertical_slash_select_ref(q[:, :, :20], k[:, :, :20], VerticalSlash(4, 1000, 1000, block=16), 1.0)
    assert cols[0, 0].tolist() == list(range(20))            # min(Sk, .): every column


def test_vertical_slash_ties_go_to_the_lower_index():
    """All-equal scores (q = 0): the score-ranked part takes the lowest columns / offsets."""
    q, k = torch.zeros(1, 1, 200, 8), torch.randn(1, 1, 200, 8)
    cols, offs = vertical_slash_select_ref(q, k, VerticalSlash(last_q=200, vertical=33, slash=102, block=16), 1.0)
    assert cols[0, 0].tolist() == list(range(33))
    assert sorted(offs[0, 0].tolist()) == list(range(102))


def test_vertical_slash_merge_hand_case():
    """Query blocks of 64 rows over 256 keys; kept diagonals 200, 100, 10, 0; kept columns 3, 70, 100, 170, 300."""
    cols = torch.tensor([[[3, 70, 100, 170, 300]]])
    offs = torch.tensor([[[200, 100, 10, 0]]])
    idx = vertical_slash_index_ref(cols, offs, block=64, seq_q=256, seq_k=256)

    def ranges(a):
        n = int(idx.range_count[0, 0, a])
        return list(zip(idx.range_start[0, 0, a, :n].tolist(), idx.range_end[0, 0, a, :n].tolist()))

    def columns(a):
        return idx.col_index[0, 0, a, :int(idx.col_count[0, 0, a])].tolist()

    # Block 3 (end 256): t = 200 -> e = max(56, 64) -> [0, 64); t = 100 -> e = 156 > 64 + 64: emit, open
    # [92, 156); t = 10 -> e = 246 > 220: emit, open [182, 246); t = 0 -> e = 256 within a block: grow to 310.
    assert ranges(3) == [(0, 64), (92, 156), (182, 310)]
    assert columns(3) == [70, 170]                 # 3, 100 and 300 lie in ranges
    # Block 0 (end 64): t = 200 and 100 are skipped; t = 10 -> [0, 64); t = 0 -> e = 64: covered.
    assert ranges(0) == [(0, 64)] and columns(0) == []   # 3 is covered; 70 and up are past the last range


def test_vertical_slash_scores_are_probability_sums_causal():
    q, k, _ = make(0, 2, 4, 2, 20, 37, 8)
    col, diag, t_min = vertical_slash_scores_ref(q, k, last_q=5, causal=True)
    assert t_min == 0 and diag.shape[-1] == 37
    torch.testing.assert_close(col.sum(-1), torch.full((2, 4), 5.0))


VS_SHAPES = [(1, 2, 1, 150, 150), (2, 4, 2, 90, 170), (1, 2, 2, 1, 140), (1, 2, 1, 40, 40)]
VS_FORMS = [VerticalSlash(last_q=8, vertical=35, slash=60, block=16), VerticalSlash(last_q=64, vertical=0, slash=0,
                                                                                  block=32),
            VerticalSlash(last_q=3, vertical=50, slash=110, block=16)]


@pytest.mark.parametrize("shape", VS_SHAPES, ids=str)
@pytest.mark.parametrize("form", VS_FORMS, ids=str)
def test_vertical_slash_matches_the_oracle(form, shape):
    """Kept pairs equal the oracle's (docs/spec.md in float64), attention equals dense attention restricted to them."""
    b, h, hkv, sq, sk = shape
    q, k, v = make(sq + sk, b, h, hkv, sq, sk, 8)
    q = q * 2.0
    keep_min, keep_max = _oracle_keep(q, k, form, 0.3)
    got = vertical_slash_keep_ref(q, k, form, 0.3)
    assert not (keep_min & ~got).any() and not (got & ~keep_max).any()
    defined = (keep_min == keep_max).all(-1).all(-1)
    assert defined.any(), "the case is all near-ties; pick another seed"
    out = vertical_slash_attention_ref(q, k, v, form=form, scale=0.3)
    want = brute_softmax_attention(q, k, v, got, 0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    cols, offs = vertical_slash_select_ref(q, k, form, 0.3)
    pairs = vertical_slash_kept_pairs(vertical_slash_index_ref(cols, offs, block=form.block, seq_q=sq, seq_k=sk))
    assert torch.equal(pairs, got.sum((-1, -2)))


@FEW
@given(seed=st.integers(0, 2**16), sk=st.integers(1, 200), cut=st.integers(0, 120), last_q=st.integers(1, 70),
       vertical=st.integers(0, 60), slash=st.integers(0, 130), block=st.sampled_from([16, 32]))
def test_vertical_slash_property(seed, sk, cut, last_q, vertical, slash, block):
    sq = max(1, sk - cut)
    q, k, v = make(seed, 1, 2, 1, sq, sk, 8)
    form = VerticalSlash(last_q=last_q, vertical=vertical, slash=slash, block=block)
    keep_min, keep_max = _oracle_keep(q, k, form, 0.3)
    got = vertical_slash_keep_ref(q, k, form, 0.3)
    assert not (keep_min & ~got).any() and not (got & ~keep_max).any()
    out = dynamic_attention_ref(q, k, v, form=form, causal=True, scale=0.3)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, got, 0.3), atol=1e-5, rtol=1e-5)


def test_vertical_slash_not_causal_is_dense():
    q, k, v = make(2, 1, 2, 1, 40, 40, 8)
    out = dynamic_attention_ref(q, k, v, form=VerticalSlash(4, 1, 1, block=16), causal=False, scale=0.3)
    torch.testing.assert_close(out, dense_attention_ref(q, k, v, scale=0.3, causal=False), atol=1e-6, rtol=1e-6)


def test_vertical_slash_model_mask_applies_token_by_token():
    q, k, v = make(4, 2, 2, 1, 130, 130, 8)
    form = VerticalSlash(last_q=8, vertical=35, slash=60, block=16)
    mask = torch.rand(2, 1, 130, 130, generator=torch.Generator().manual_seed(0)) > 0.2
    got = vertical_slash_keep_ref(q, k, form, 0.3)
    out = vertical_slash_attention_ref(q, k, v, form=form, scale=0.3, mask=mask)
    torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, got & mask, 0.3), atol=1e-5,
                               rtol=1e-5)

# ---------------------------------------------------------------- Triton interpreter

def same_table(a, b):
    return (torch.equal(a.to_dense_block_mask(full_only=True), b.to_dense_block_mask(full_only=True))
            and torch.equal(a.to_dense_block_mask(partial_only=True), b.to_dense_block_mask(partial_only=True)))


KERNEL_FORMS = [BlockTopK(block=16, topk=1), BlockTopK(block=16, topk=2, sink_blocks=0, local_blocks=2),
                BlockTopK(block=16, cdf=0.6, pool="max"), BlockTopK(block=32, cdf=1.0),
                BlockTopK(block=16, topk=1, pool="rows", rows=4), BlockTopK(block=32, cdf=0.7, pool="rows", rows=16),
                BlockTopK(block=16, min_mass=0.05, pool="rows", rows=4), BlockTopK(block=16, min_mass=0.1)]
KERNEL_SHAPES = [(1, 2, 1, 40, 50, 16), (2, 4, 2, 64, 64, 32), (1, 2, 2, 17, 33, 8), (2, 4, 4, 1, 70, 16)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("form", KERNEL_FORMS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_tables_match_reference(interpreter, form, shape, causal):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(7, *shape)
    got = kern.block_topk_table(q, k, form, causal, 0.3, validate=True)   # validate: the BlockTable constructor checks it
    assert same_table(got, dynamic_table_ref(q, k, form, causal, 0.3))


@FEW
@given(seed=st.integers(0, 2**16), hkv=st.integers(1, 2), group=st.integers(1, 2), sk=st.integers(1, 80),
       cut=st.integers(0, 50), d=st.sampled_from([8, 16]), topk=st.integers(1, 3), cdf=st.floats(0.05, 1.0),
       use_cdf=st.booleans(), causal=st.booleans(), pool=st.sampled_from(["mean", "max", "rows"]))
def test_kernel_block_topk_property(interpreter, seed, hkv, group, sk, cut, d, topk, cdf, use_cdf, causal, pool):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, _ = make(seed, 1, hkv * group, hkv, max(1, sk - cut), sk, d)
    form = BlockTopK(block=16, topk=None if use_cdf else topk, cdf=cdf if use_cdf else None, pool=pool)
    got = kern.block_topk_table(q, k, form, causal, 1.0 / math.sqrt(d), validate=True)
    assert same_table(got, dynamic_table_ref(q, k, form, causal, None))


# (b, h, hkv, sq, sk, d, block, rows): one kv head's query heads (3: a padded tile; 8 with 16 rows: two head tiles),
# several query blocks per tile, a short last block, chunked prefill.
ROW_MASS_SHAPES = [(1, 3, 1, 40, 40, 16, 16, 4), (2, 8, 1, 37, 70, 8, 16, 16), (1, 2, 2, 1, 50, 16, 16, 2),
                   (1, 4, 2, 100, 100, 32, 32, 1)]


@pytest.mark.parametrize("shape", ROW_MASS_SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_sampled_row_scores_match_reference(interpreter, shape, causal):
    from sparsecc.codegen import dynamic_attention_kernels as kern
    from sparsecc.codegen.dynamic_attention import block_masks, sampled_row_scores_ref

    b, h, hkv, sq, sk, d, block, rows = shape
    q, k, _ = make(11, b, h, hkv, sq, sk, d)
    got = kern.sampled_row_scores(q, k, block, rows, causal, 0.3)
    want = sampled_row_scores_ref(q, k, block=block, rows=rows, causal=causal, scale=0.3)
    allowed = block_masks(sq, sk, block, causal, q.device)[0].expand_as(want)
    assert torch.isfinite(want[allowed]).all()
    torch.testing.assert_close(got[allowed], want[allowed], atol=1e-5, rtol=1e-5)


VS_KERNEL_SHAPES = [(1, 2, 1, 150, 150, 16), (2, 4, 2, 70, 130, 32), (1, 2, 2, 1, 120, 8), (1, 2, 1, 33, 33, 16)]


@pytest.mark.parametrize("shape", VS_KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("form", VS_FORMS, ids=str)
def test_kernel_vertical_slash_index_matches_reference(interpreter, form, shape):
    from sparsecc.codegen import vertical_slash_kernels as vk

    b, h, hkv, sq, sk, d = shape
    q, k, _ = make(9, b, h, hkv, sq, sk, d)
    cols, offs = vertical_slash_select_ref(q, k, form, 0.3)
    ref = vertical_slash_index_ref(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    got = vk.vertical_slash_index(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    assert torch.equal(got.range_count.long(), ref.range_count) and torch.equal(got.col_count.long(), ref.col_count)
    rv = torch.arange(offs.shape[-1]) < ref.range_count[..., None]
    assert torch.equal(got.range_start.long()[rv], ref.range_start[rv])
    assert torch.equal(got.range_end.long()[rv], ref.range_end[rv])
    cv = torch.arange(cols.shape[-1]) < ref.col_count[..., None]
    assert torch.equal(got.col_index.long()[cv], ref.col_index[cv])


@pytest.mark.parametrize("shape", VS_KERNEL_SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_vertical_slash_attention(interpreter, shape, mask_kind, dtype):
    """The attention kernel over the kernel index equals the reference and float64 attention restricted to the
    kept pairs (rows the mask leaves empty output zeros)."""
    from sparsecc.codegen import vertical_slash_kernels as vk

    b, h, hkv, sq, sk, d = shape
    q, k, v = make(11, b, h, hkv, sq, sk, d, dtype)
    form = VerticalSlash(last_q=8, vertical=35, slash=60, block=16)
    g = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(sq, sk, generator=g).masked_fill(torch.rand(sq, sk, generator=g) > 0.7, -math.inf)
    cols, offs = vertical_slash_select_ref(q, k, form, 0.3)
    index = vk.vertical_slash_index(cols, offs, block=form.block, seq_q=sq, seq_k=sk)
    out = torch.full_like(q, float("nan"))
    vk.vertical_slash_attention_kernel(q, k, v, index, 0.3, mask, out=out)
    ref = vertical_slash_attention_ref(q.float(), k.float(), v.float(), form=form, scale=0.3, mask=mask)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    keep = vertical_slash_keep_ref(q, k, form, 0.3)
    if mask_kind == "bool":
        keep = keep & mask
    elif mask_kind == "additive":
        keep = keep & (mask > -math.inf)
    if mask_kind != "additive":
        torch.testing.assert_close(out.double(), brute_softmax_attention(q, k, v, keep, 0.3), atol=3e-2, rtol=3e-2)

def test_kernel_attention_on_the_kernel_table(interpreter):
    """The flash kernel over a kernel-built table equals dense attention restricted to it."""
    from sparsecc.codegen import block_attention as ba
    from sparsecc.codegen import dynamic_attention_kernels as kern

    q, k, v = make(3, 1, 2, 1, 40, 48, 16, torch.bfloat16)
    table = kern.block_topk_table(q, k, BlockTopK(block=16, topk=1), True, 0.25, validate=True)
    out = torch.full_like(q, float("nan"))
    ba.launch_prefill(q, k, v, None, 0.25, True, False, table=table, out=out)
    torch.testing.assert_close(out.double(), restricted_dense(q, k, v, table, 0.25), atol=3e-2, rtol=3e-2)


# ---------------------------------------------------------------- GPU

GPU_CASES = [(BlockTopK(block=64, topk=8), True), (BlockTopK(block=128, cdf=0.9), True),
             (BlockTopK(block=64, topk=4, pool="max"), False),
             (BlockTopK(block=64, topk=8, pool="rows", rows=4), True),
             (BlockTopK(block=128, cdf=0.9, pool="rows", rows=16), True),
             (BlockTopK(block=64, topk=4, pool="rows", rows=8), False),
             (BlockTopK(block=64, min_mass=0.004, pool="rows", rows=16), True),
]


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 8, 4096, 4096, 128, 64, 4), (2, 9, 3, 3000, 4096, 64, 64, 16),
                                   (1, 8, 1, 2048, 2048, 128, 128, 64)], ids=str)
def test_gpu_sampled_row_scores(shape, dtype):
    """The sampled-row estimate on the GPU against the float32 reference, on every allowed cell."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sparsecc.codegen import dynamic_attention_kernels as kern
    from sparsecc.codegen.dynamic_attention import block_masks, sampled_row_scores_ref

    b, h, hkv, sq, sk, d, block, rows = shape
    q, k, _ = (t.cuda() for t in make(5, b, h, hkv, sq, sk, d, dtype))
    got = kern.sampled_row_scores(q, k, block, rows, True, 1 / math.sqrt(d))
    want = sampled_row_scores_ref(q, k, block=block, rows=rows, causal=True, scale=1 / math.sqrt(d))
    allowed = block_masks(sq, sk, block, True, q.device)[0].expand_as(want)
    # Log masses: compare the masses themselves (tiny masses carry large log differences but no weight).
    torch.testing.assert_close(got[allowed].exp(), want[allowed].exp(), atol=1e-5, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("sq", [4096, 3000])
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_vertical_slash(sq, block):
    """GPU index and attention against the reference index and fp32 attention restricted to it."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sparsecc.codegen import dynamic_attention_kernels as dk
    from sparsecc.codegen import vertical_slash_kernels as vk
    from sparsecc.codegen.dynamic_attention import dynamic_block_attention

    sk, scale = 4096, 1 / math.sqrt(128)
    form = VerticalSlash(last_q=64, vertical=256, slash=512, block=block)
    q, k, v = (t.cuda() for t in make(11, 2, 8, 2, sq, sk, 128, torch.bfloat16))
    col, diag, _ = dk.vertical_slash_scores(q, k, form.last_q, True, scale)
    cols, offs = vertical_slash_select_ref(q, k, form, scale, col=col, diag=diag)
    got = vk.vertical_slash_index(cols, offs, block=block, seq_q=sq, seq_k=sk)
    ref = vertical_slash_index_ref(cols, offs, block=block, seq_q=sq, seq_k=sk)
    assert torch.equal(got.range_count.long(), ref.range_count) and torch.equal(got.col_count.long(), ref.col_count)
    out = torch.full_like(q, float("nan"))
    dynamic_block_attention(q, k, v, form=form, causal=True, out=out)
    assert torch.isfinite(out).all()
    exact = vertical_slash_attention_ref(q.float(), k.float(), v.float(), form=form, scale=scale, index=ref)
    err = (out.float() - exact).norm() / exact.norm()
    assert err.item() < 1e-2


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_cdf_one_keeps_every_allowed_block_however_peaked(pool):
    """cdf = 1 asks for all the mass (docs/spec.md): dense attention, although a float32 running sum of peaked
    block probabilities reaches 1 before the smallest ones."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 256, 16) * 3, torch.randn(1, 1, 256, 16) * 3, torch.randn(1, 1, 256, 16))
    form = BlockTopK(block=16, cdf=1.0, sink_blocks=0, local_blocks=0, pool=pool)
    table = dynamic_table_ref(q, k, form, True, 0.25)
    out = block_sparse_attention_ref(q.double(), k.double(), v.double(), table=table, scale=0.25)
    causal = torch.ones(256, 256, dtype=torch.bool).tril()   # dense causal attention, written here in float64
    logits = (q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(out, logits.softmax(-1) @ v.double())


def test_cdf_one_kernel_table_matches_reference_when_peaked(interpreter):
    from sparsecc.codegen import dynamic_attention_kernels as kern

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 96, 16) * 4, torch.randn(1, 2, 96, 16) * 4
    form = BlockTopK(block=16, cdf=1.0, sink_blocks=0, local_blocks=0, pool="max")
    assert same_table(kern.block_topk_table(q, k, form, True, 0.25, validate=True),
                      dynamic_table_ref(q, k, form, True, 0.25))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_vertical_slash_index_refuses_more_queries_than_keys(device):
    """Sq > Sk is refused on both paths with the reference's error. On CUDA the selection skipped that check
    and the index kernel's range search, which assumes every query block ends after key 0, read past its offsets
    and could store columns without end."""
    from sparsecc.codegen.vertical_slash import vertical_slash_index
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dtype = torch.float16 if device == "cuda" else torch.float32
    q = torch.randn(1, 2, 32, 16, device=device, dtype=dtype)
    k = torch.randn(1, 2, 16, 16, device=device, dtype=dtype)
    with pytest.raises(ValueError, match=r"Sq=32 must lie in \[1, Sk=16\]"):
        vertical_slash_index(q, k, VerticalSlash(vertical=2, slash=2, block=16, last_q=16), 0.25)
