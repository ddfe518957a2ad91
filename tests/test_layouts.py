"""BlockTable: validation, builders against element-level semantics, Flex round trips."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsecc.forms import BlockSparse
from sparsecc.layouts import (FULL_WINDOW, BlockTable, block_sparse_table, streaming_block_table,
                              streaming_mask_mod)

# max_examples comes from the profile in tests/conftest.py (ci: 20, deep: 2000).
SETTINGS = settings(deadline=None)


def cells(el, bq, bk):
    """Element mask [..., Sq, Sk] -> per block (any allowed, all allowed and in range) [..., nQ, nK]."""
    sq, sk = el.shape[-2:]
    nq, nk = -(-sq // bq), -(-sk // bk)
    exists = torch.zeros(nq * bq, nk * bk, dtype=torch.bool)
    exists[:sq, :sk] = True
    pad = torch.zeros(*el.shape[:-2], nq * bq, nk * bk, dtype=torch.bool)
    pad[..., :sq, :sk] = el
    grid = pad.reshape(*el.shape[:-2], nq, bq, nk, bk).transpose(-3, -2)
    ex = exists.reshape(nq, bq, nk, bk).transpose(-3, -2)
    return grid.flatten(-2).any(-1), (grid | ~ex).flatten(-2).all(-1) & ex.flatten(-2).all(-1)


def causal_el(sq, sk):
    return torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq


def draws_from_docstring(form, n_heads, n_k, causal):
    """The random draws exactly as block_sparse_table documents them: [H, nK (position block), nK]."""
    out = torch.zeros(n_heads, n_k, n_k, dtype=torch.bool)
    for h in range(n_heads):
        g = torch.Generator().manual_seed((form.seed * 2**20 + h) % 2**64)
        for c in range(n_k):
            n = c + 1 if causal else n_k
            out[h, c, torch.randperm(n, generator=g)[:min(form.random_blocks, n)]] = True
    return out


@st.composite
def block_sparse_case(draw):
    sk = draw(st.integers(1, 300))
    sq = draw(st.one_of(st.just(sk), st.integers(1, sk), st.integers(sk, sk + 40)))
    form = BlockSparse(block=draw(st.sampled_from([16, 32, 64])), local_blocks=draw(st.integers(1, 3)),
                       global_blocks=draw(st.integers(0, 2)), random_blocks=draw(st.integers(0, 3)),
                       seed=draw(st.integers(0, 1000)))
    return form, draw(st.integers(1, 3)), sq, sk, draw(st.booleans())


@SETTINGS
@given(case=block_sparse_case())
def test_block_sparse_table_follows_the_form(case):
    form, heads, sq, sk, causal = case
    t = block_sparse_table(form, heads, sq, sk, causal)
    # Query blocks are position blocks: lead rows fill the first one up to a block boundary.
    lead = (sk - sq) % form.block
    rows = sq + lead
    assert t.seq_q == rows and t.lead_rows(sq, sk) == lead
    assert ((sk - rows) % form.block) == 0
    nq, nk = -(-rows // form.block), -(-sk // form.block)
    assert t.kv_num_blocks.shape == (1, heads, nq) and (t.block_q, t.block_k) == (form.block, form.block)
    # Block rule written out from the forms.py text; table row block a is position block c(a).
    c = torch.arange(nq)[:, None] + (sk - sq) // form.block
    i = torch.arange(sq)
    assert torch.equal(c.squeeze(1)[(i + lead) // form.block], (i + sk - sq) // form.block)
    b = torch.arange(nk)[None, :]
    want = ((c - b).abs() < form.local_blocks) | (c < form.global_blocks) | (b < form.global_blocks)
    want = want[None].repeat(heads, 1, 1)
    if form.random_blocks:
        valid = (c.squeeze(1) >= 0) & (c.squeeze(1) < nk)
        want |= draws_from_docstring(form, heads, nk, causal)[:, c.squeeze(1).clamp(0, nk - 1)] & valid[:, None]
    any_el, all_el = cells(causal_el(rows, sk) if causal else torch.ones(rows, sk, dtype=torch.bool),
                           form.block, form.block)
    want &= any_el
    got = t.to_dense_block_mask()[0]
    assert torch.equal(got, want)
    assert torch.equal(t.to_dense_block_mask(full_only=True)[0], want & all_el)
    assert 0 < t.density() <= 1


def test_block_sparse_table_is_deterministic_and_seeded():
    form = BlockSparse(block=16, local_blocks=1, random_blocks=2, seed=7)
    a = block_sparse_table(form, 4, 256, 256, causal=True)
    b = block_sparse_table(form, 4, 256, 256, causal=True)
    c = block_sparse_table(BlockSparse(block=16, local_blocks=1, random_blocks=2, seed=8), 4, 256, 256, causal=True)
    assert torch.equal(a.to_dense_block_mask(), b.to_dense_block_mask())
    assert not torch.equal(a.to_dense_block_mask(), c.to_dense_block_mask())
    dense = a.to_dense_block_mask()[0]
    assert not torch.equal(dense[0], dense[1])  # heads draw differently


@pytest.mark.parametrize("seed", [2**44 - 1, 2**44, 2**44 + 5, 2**62 + 12345, 2**63 - 1])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_large_seeds_draw_deterministically(seed, causal):
    """Regression: seeds >= 2**44 overflowed the generator seed; every signed 64-bit seed must work."""
    form = BlockSparse(block=16, local_blocks=1, random_blocks=2, seed=seed)
    a = block_sparse_table(form, 3, 128, 128, causal)
    b = block_sparse_table(form, 3, 128, 128, causal)
    assert torch.equal(a.to_dense_block_mask(), b.to_dense_block_mask())
    # The documented draws: generator seed (seed * 2**20 + h) mod 2**64.
    c = torch.arange(8)[:, None]
    k = torch.arange(8)[None, :]
    want = ((c - k).abs() < 1) | draws_from_docstring(form, 3, 8, causal)
    if causal:
        want &= k <= c
    assert torch.equal(a.to_dense_block_mask()[0], want)


def test_block_sparse_op_takes_the_largest_seed():
    """Through the registered op (its schema holds the seed as a signed 64-bit int)."""
    from sparsecc.codegen import ops

    ops.register_ops()
    q, k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    outs = [ops.op("block_sparse_attention")(q, k, v, None, 0.3, True, 16, 1, 0, 1, 2**63 - 1, [], 0, "reference")
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()


def test_block_sparse_decode_step_sees_the_prefill_layout():
    """Causal draws do not depend on Sq: the last query row has the same blocks in prefill and decode."""
    form = BlockSparse(block=16, local_blocks=1, global_blocks=1, random_blocks=2, seed=3)
    prefill = block_sparse_table(form, 2, 160, 160, causal=True).to_dense_block_mask()
    decode = block_sparse_table(form, 2, 16, 160, causal=True).to_dense_block_mask()
    assert torch.equal(prefill[:, :, -1], decode[:, :, -1])


def streaming_el(sq, sk, s, w, causal):
    p = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    w = math.inf if w == FULL_WINDOW else w
    if causal:
        return (j <= p) & ((j < s) | (p - j < w))
    return (j < s) | (p < s) | ((p - j).abs() < w)


@SETTINGS
@given(sk=st.integers(1, 300), frac=st.floats(0.01, 1.0), block=st.sampled_from([16, 32, 64]),
       sinks=st.lists(st.integers(0, 40), min_size=1, max_size=3),
       windows=st.lists(st.one_of(st.just(FULL_WINDOW), st.integers(1, 100)), min_size=3, max_size=3),
       causal=st.booleans())
def test_streaming_block_table_matches_elements(sk, frac, block, sinks, windows, causal):
    sq = max(1, int(sk * frac))
    windows = windows[:len(sinks)]
    t = streaming_block_table(sinks, windows, block=block, seq_q=sq, seq_k=sk, causal=causal)
    for h, (s, w) in enumerate(zip(sinks, windows)):
        any_el, all_el = cells(streaming_el(sq, sk, s, w, causal), block, block)
        assert torch.equal(t.to_dense_block_mask()[0, h], any_el)
        assert torch.equal(t.to_dense_block_mask(full_only=True)[0, h], any_el & all_el)


def test_density_and_str():
    t = block_sparse_table(BlockSparse(block=16, local_blocks=100), 1, 100, 100, causal=True)
    assert t.density() == pytest.approx(1.0)
    t2 = block_sparse_table(BlockSparse(block=16, local_blocks=1), 1, 128, 128, causal=True)
    assert t2.density() == pytest.approx(8 / 36)  # the diagonal of 8 blocks out of 8 * 9 / 2 causal ones
    text = str(t2)
    assert "block=16x16" in text and "density=0.222" in text and "causal=True" in text


def _valid_parts():
    t = block_sparse_table(BlockSparse(block=16, local_blocks=2), 2, 64, 64, causal=True)
    return dict(kv_num_blocks=t.kv_num_blocks, kv_indices=t.kv_indices, full_kv_num_blocks=t.full_kv_num_blocks,
                full_kv_indices=t.full_kv_indices, block_q=16, block_k=16, seq_q=64, seq_k=64, causal=True)


@pytest.mark.parametrize("change, field", [
    (lambda p: p.update(kv_num_blocks=p["kv_num_blocks"].long()), "kv_num_blocks"),
    (lambda p: p.update(full_kv_indices=p["full_kv_indices"][0]), "full_kv_indices"),
    (lambda p: p.update(kv_num_blocks=p["kv_num_blocks"][:, :, :3]), "kv_num_blocks"),
    (lambda p: p.update(kv_num_blocks=p["kv_num_blocks"] + 9), "kv_num_blocks"),
    (lambda p: p.update(kv_indices=p["kv_indices"] + 4), "kv_indices"),
    (lambda p: p.update(full_kv_indices=p["kv_indices"], full_kv_num_blocks=p["kv_num_blocks"]), "full"),
    (lambda p: p.update(block_q=0), "block_q"),
    (lambda p: p.update(seq_q=70), "seq_q"),
])
def test_table_validation_names_the_field(change, field):
    parts = _valid_parts()
    BlockTable(**parts)
    change(parts)
    with pytest.raises(ValueError, match=field):
        BlockTable(**parts)


def test_table_rejects_repeated_block():
    parts = _valid_parts()
    idx = torch.nn.functional.pad(parts["kv_indices"], (0, 3))
    num = parts["kv_num_blocks"].clone()
    num[0, 0, 3] = 2
    idx[0, 0, 3, :2] = 3
    parts.update(kv_indices=idx, kv_num_blocks=num)
    with pytest.raises(ValueError, match="repeats"):
        BlockTable(**parts)


@pytest.mark.parametrize("sq, sk, causal", [(100, 100, True), (70, 130, True), (130, 70, False), (33, 33, False)])
def test_flex_round_trip(sq, sk, causal):
    t = block_sparse_table(BlockSparse(block=16, local_blocks=2, global_blocks=1, random_blocks=1, seed=2),
                           3, sq, sk, causal)
    bm = t.to_flex_block_mask()
    assert torch.equal(bm.to_dense().bool(), t.to_dense_block_mask())
    back = BlockTable.from_flex_block_mask(bm, t.seq_q, sk, causal)   # t.seq_q counts the lead rows
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(back, name), getattr(t, name))
    assert torch.equal(back.to_dense_block_mask(full_only=True), t.to_dense_block_mask(full_only=True))
    assert torch.equal(back.to_dense_block_mask(partial_only=True), t.to_dense_block_mask(partial_only=True))


def test_from_flex_create_block_mask_matches_dense_causal_table():
    from torch.nn.attention.flex_attention import create_block_mask
    sq, sk = 100, 130

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (sk - sq)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = create_block_mask(causal, None, None, sq, sk, device="cpu", BLOCK_SIZE=16)
    t = BlockTable.from_flex_block_mask(bm, sq, sk, causal=True)
    # The dense causal table over query rows (block_sparse_table would add lead rows: (Sk - Sq) % 16 != 0).
    ours = streaming_block_table(0, FULL_WINDOW, block=16, seq_q=sq, seq_k=sk, causal=True)
    assert torch.equal(t.to_dense_block_mask(), ours.to_dense_block_mask())
    # Flex does not know about our sequence-end rule for the last (cut) blocks, so compare full blocks
    # only where the block lies inside both sequences.
    inside = torch.zeros(7, 9, dtype=torch.bool)
    inside[:6, :8] = True
    assert torch.equal(t.to_dense_block_mask(full_only=True)[0, 0] & inside,
                       ours.to_dense_block_mask(full_only=True)[0, 0] & inside)


def test_flex_mask_mods_apply_the_element_rules():
    t = streaming_block_table([4, 0], [10, FULL_WINDOW], block=16, seq_q=40, seq_k=50, causal=True)
    rule = streaming_mask_mod([4, 0], [10, FULL_WINDOW], seq_q=40, seq_k=50, causal=True)
    bm = t.to_flex_block_mask(extra_mask_mod=rule)
    qi, ki = torch.arange(48)[:, None], torch.arange(64)[None, :]
    for h, (s, w) in enumerate([(4, 10), (0, FULL_WINDOW)]):
        got = bm.mask_mod(torch.tensor(0), torch.tensor(h), qi, ki)
        want = torch.zeros(48, 64, dtype=torch.bool)
        want[:40, :50] = streaming_el(40, 50, s, w, True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_head_offset_rows_are_the_model_heads(causal):
    """Row i of a table built with head_offset k is row k + i of the table of all heads (random draws per model head)."""
    form = BlockSparse(16, local_blocks=1, random_blocks=2, seed=5)
    whole = block_sparse_table(form, 6, 96, 96, causal)
    part = block_sparse_table(form, 2, 96, 96, causal, head_offset=3)
    dense_whole, dense_part = whole.to_dense_block_mask(), part.to_dense_block_mask()
    assert torch.equal(dense_part[0], dense_whole[0, 3:5])
    assert not torch.equal(dense_whole[0, 3:5], dense_whole[0, 0:2])   # the offset matters for these draws
    with pytest.raises(ValueError, match="head_offset=-1 is not allowed"):
        block_sparse_table(form, 2, 96, 96, causal, head_offset=-1)


def _one_block_table(kept_partial, kept_full, *, seq_q, seq_k, block, causal):
    """A hand-made table: one batch and head, the given (query block, key block) pairs partial / full."""
    n_q, n_k = -(-seq_q // block), -(-seq_k // block)
    kept = torch.zeros(1, 1, n_q, n_k, dtype=torch.bool)
    full = torch.zeros(1, 1, n_q, n_k, dtype=torch.bool)
    for a, b in kept_partial + kept_full:
        kept[0, 0, a, b] = True
    for a, b in kept_full:
        full[0, 0, a, b] = True
    return BlockTable.from_dense(kept, full, block_q=block, block_k=block, seq_q=seq_q, seq_k=seq_k, causal=causal)


def test_a_full_block_past_the_keys_or_the_diagonal_is_refused():
    """Kernels read a full block's keys without bound or causal tests, so the table refuses a full block that
    holds keys past seq_k (they would be read out of bounds) or, causal, after its block's first query."""
    _one_block_table([(0, 2)], [(0, 0), (0, 1)], seq_q=16, seq_k=40, block=16, causal=False)   # the rule's edge
    with pytest.raises(ValueError, match=r"marks key block 2 of query block 0 .* past seq_k=40"):
        _one_block_table([], [(0, 2)], seq_q=16, seq_k=40, block=16, causal=False)
    with pytest.raises(ValueError, match=r"marks key block 1 of query block 1 .*first query position"):
        _one_block_table([], [(1, 1)], seq_q=32, seq_k=32, block=16, causal=True)


def test_flex_full_blocks_past_the_keys_are_imported_as_partial():
    """A Flex BlockMask that marks a block full although its keys pass seq_k (Flex bounds the sequence in its
    own kernel) is imported with that block partial, the others as Flex gave them."""
    from torch.nn.attention.flex_attention import BlockMask
    num = torch.tensor([[[1]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, 0]]]], dtype=torch.int32)
    full_num = torch.tensor([[[1]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[1, 0]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=128)
    table = BlockTable.from_flex_block_mask(bm, 100, 200, False)
    assert table.full_kv_num_blocks.tolist() == [[[0]]]
    assert table.kv_num_blocks.tolist() == [[[2]]] and table.kv_indices[0, 0, 0, :2].tolist() == [0, 1]
