"""Attention references (and, for block_sparse positions, the Triton kernel) against brute-force float64 attention.

The brute force here is written independently of codegen/block_attention.py:
it builds the whole Sq x Sk keep mask from the rules, then runs a float64
softmax over it. The ``kernel`` tests run in Triton's interpreter, in a child
process (see tests/interpreter.py).
"""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from sparsecc.codegen.block_attention import (
    FULL_WINDOW, block_sparse_attention_ref, dense_attention_ref, streaming_attention_ref)
from sparsecc.forms import BlockSparse
from sparsecc.layouts import block_sparse_table
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)

# max_examples comes from the profile in tests/conftest.py (ci: 20, deep: 2000).
SETTINGS = settings(deadline=None)
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (atol, rtol) of outputs against the float64 brute force: bf16 rounds the output once (2^-8 relative).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2)}


# ------------------------------------------------------------ brute force

def brute_attention(q, k, v, keep, add, scale):
    """Float64 attention with an explicit [B|1, H|1, Sq, Sk] keep mask; empty rows give 0 and lse -inf."""
    h, hkv = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(h // hkv, dim=1)
    vv = v.double().repeat_interleave(h // hkv, dim=1)
    s = scale * q.double() @ kk.transpose(-1, -2)
    if add is not None:
        s = s + add.double()
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no key: softmax gives NaN, the contract says 0
    return p @ vv, lse


def streaming_keep_full(sq, sk, sinks, windows, causal):
    """[H, Sq, Sk] keep mask from forms.Streaming, one (sink, window) per head."""
    p = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    out = []
    for s, w in zip(sinks, windows):
        w = sq + sk + 1 if w == FULL_WINDOW else w  # longer than any distance = no limit
        if causal:
            out.append((j <= p) & ((j < s) | (p - j < w)))
        else:
            out.append((j < s) | (p < s) | ((p - j).abs() < w))
    return torch.stack(out)


def table_keep_full(table, sq, causal_tokens=True):
    """Element mask of a block table for Sq queries: kept blocks expanded to tokens, cropped, and causal.

    The queries are the table's last Sq rows (a table may have lead rows before them).
    """
    blocks = table.to_dense_block_mask()
    el = blocks.repeat_interleave(table.block_q, 2).repeat_interleave(table.block_k, 3)
    el = el[:, :, table.seq_q - sq:table.seq_q, :table.seq_k]
    if table.causal and causal_tokens:
        p = torch.arange(sq)[:, None] + table.seq_k - sq
        el = el & (torch.arange(table.seq_k)[None, :] <= p)
    return el


def block_sparse_keep_brute(form, n_heads, sq, sk, causal):
    """[H, Sq, Sk] keep mask of block_sparse written from docs/spec.md, element by element.

    Query row i has position p = i + Sk - Sq and query block p // block; key j has key block j // block.
    Random blocks follow the exact draws documented in sparsecc.layouts.block_sparse_table.
    """
    bs = form.block
    n_k = -(-sk // bs)
    drawn = torch.zeros(n_heads, n_k, n_k, dtype=torch.bool)
    for h in range(n_heads):
        g = torch.Generator().manual_seed((form.seed * 2**20 + h) % 2**64)
        for c in range(n_k):
            n = c + 1 if causal else n_k
            drawn[h, c, torch.randperm(n, generator=g)[:min(form.random_blocks, n)]] = True
    keep = torch.zeros(n_heads, sq, sk, dtype=torch.bool)
    for i in range(sq):
        p = i + sk - sq
        a = p // bs
        for j in range(sk):
            b = j // bs
            kept = abs(a - b) < form.local_blocks or a < form.global_blocks or b < form.global_blocks
            for h in range(n_heads):
                random = 0 <= a < n_k and bool(drawn[h, a, b])
                keep[h, i, j] = (kept or random) and (j <= p or not causal)
    return keep


def make_qkv(gen, b, h, hkv, sq, sk, d, dtype):
    q = torch.randn(b, h, sq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def make_mask(gen, kind, b, h, sq, sk):
    """None, a bool mask or a float mask (with some -inf), with random broadcast dims."""
    if kind == "none":
        return None, None, None
    shape = [b if torch.rand(1, generator=gen) < 0.5 else 1, h if torch.rand(1, generator=gen) < 0.5 else 1, sq, sk]
    if kind == "bool":
        m = torch.rand(*shape, generator=gen) < 0.85
        return m, m, None
    m = torch.randn(*shape, generator=gen, dtype=torch.float64)
    m = m.masked_fill(torch.rand(*shape, generator=gen) < 0.1, -math.inf)
    return m.float(), None, m.float()


@st.composite
def attention_case(draw):
    h = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.sampled_from([x for x in (1, 2, 4) if h % x == 0]))
    sk = draw(st.integers(1, 300))
    sq = draw(st.one_of(st.just(sk), st.integers(1, sk)))
    return dict(b=draw(st.integers(1, 2)), h=h, hkv=hkv, sq=sq, sk=sk, d=draw(st.sampled_from([8, 16, 32])),
                dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
                mask=draw(st.sampled_from(["none", "bool", "float"])), chunk=draw(st.sampled_from([1, 7, 64, 1024])),
                seed=draw(st.integers(0, 2**31 - 1)))


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=rtol)
    if lse is not None:
        # lse is computed before the output rounding, so fp32 tolerance even for bf16 inputs.
        lse_atol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(lse.double(), ref_lse, atol=lse_atol, rtol=lse_atol)


# ------------------------------------------------------------- streaming

@SETTINGS
@given(case=attention_case(), data=st.data())
def test_streaming_matches_brute_force(case, data):
    c = case
    per_head = data.draw(st.booleans())
    n_rules = c["h"] if per_head else 1
    sinks = data.draw(st.lists(st.integers(0, 40), min_size=n_rules, max_size=n_rules))
    windows = data.draw(st.lists(st.one_of(st.just(FULL_WINDOW), st.integers(1, 80)),
                                 min_size=n_rules, max_size=n_rules))
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = make_qkv(gen, c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask, bool_m, add_m = make_mask(gen, c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    scale = 1 / math.sqrt(c["d"])
    out, lse = streaming_attention_ref(q, k, v, sink=sinks, window=windows, scale=scale, causal=c["causal"],
                                       mask=mask, return_lse=True, chunk=c["chunk"])
    keep = streaming_keep_full(c["sq"], c["sk"], sinks * (c["h"] // n_rules), windows * (c["h"] // n_rules),
                               c["causal"])[None]
    if bool_m is not None:
        keep = keep & bool_m
    ref_out, ref_lse = brute_attention(q, k, v, keep, add_m, scale)
    assert_matches(out, lse, ref_out, ref_lse, c["dtype"])


@SETTINGS
@given(case=attention_case())
def test_streaming_chunk_size_does_not_change_the_result(case):
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = make_qkv(gen, c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], torch.float64)
    sinks = [3, 0, 5, 1][:c["h"]]
    windows = [17, FULL_WINDOW, 1, 40][:c["h"]]
    outs = [streaming_attention_ref(q, k, v, sink=sinks, window=windows, scale=0.2, causal=c["causal"], chunk=ch)
            for ch in (1, 13, c["sq"])]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=1e-12)


def test_streaming_rows_without_keys_output_zero():
    # Sq > Sk and causal: the first rows have negative positions and keep nothing.
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 1, 2, 1, 10, 4, 8, torch.float32)
    out, lse = streaming_attention_ref(q, k, v, sink=[1], window=[2], scale=1.0, causal=True, return_lse=True)
    assert torch.all(out[:, :, :6] == 0) and torch.all(torch.isneginf(lse[:, :, :6]))
    assert torch.all(torch.isfinite(lse[:, :, 6:]))


@pytest.mark.parametrize("causal", [True, False])
def test_rows_with_no_keys_at_all_output_zero(causal):
    """Sk = 0: every row keeps nothing (zeros, lse -inf), also in the dense reference (it raised IndexError)."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(gen, 2, 4, 2, 5, 0, 8, torch.float64)
    keep = torch.ones(1, 1, 5, 0, dtype=torch.bool)
    ref_out, ref_lse = brute_attention(q, k, v, keep, None, 0.5)
    for out, lse in (dense_attention_ref(q, k, v, scale=0.5, causal=causal, return_lse=True),
                     dense_attention_ref(q, k, v, scale=0.5, causal=causal, return_lse=True,
                                         mask=torch.zeros(5, 0, dtype=torch.float64)),
                     streaming_attention_ref(q, k, v, sink=[1], window=[2], scale=0.5, causal=causal,
                                             return_lse=True)):
        assert torch.equal(out, torch.zeros(2, 4, 5, 8, dtype=torch.float64)) and torch.equal(out, ref_out)
        assert torch.isneginf(lse).all() and torch.equal(lse, ref_lse)


def test_streaming_full_window_equals_sdpa():
    q, k, v = make_qkv(torch.Generator().manual_seed(1), 2, 4, 2, 37, 37, 16, torch.float32)
    out = streaming_attention_ref(q, k, v, sink=[0], window=[FULL_WINDOW], scale=0.25, causal=True, chunk=8)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         is_causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_streaming_rejects_bad_arguments():
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 1, 4, 2, 8, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="sink"):
        streaming_attention_ref(q, k, v, sink=[1, 2], window=[4], scale=1.0, causal=True)
    with pytest.raises(ValueError, match="window"):
        streaming_attention_ref(q, k, v, sink=[1], window=[0], scale=1.0, causal=True)
    with pytest.raises(ValueError, match="divide"):
        streaming_attention_ref(q, k[:, :1].expand(1, 3, 8, 8), v[:, :1].expand(1, 3, 8, 8), sink=[1], window=[4],
                                scale=1.0, causal=True)
    with pytest.raises(ValueError, match="broadcast"):
        streaming_attention_ref(q, k, v, sink=[1], window=[4], scale=1.0, causal=True,
                                mask=torch.ones(3, 8, 8, dtype=torch.bool))


# ------------------------------------------------------------------ GQA

def test_gqa_uses_repeat_interleave_mapping():
    gen = torch.Generator().manual_seed(3)
    b, h, hkv, s, d = 1, 4, 2, 12, 8
    q = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    # Distinct kv heads: head 1 is far from head 0, so a wrong mapping cannot pass.
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64)
    v = torch.stack([torch.zeros(b, s, d, dtype=torch.float64),
                     100 + torch.randn(b, s, d, generator=gen, dtype=torch.float64)], dim=1)
    out = streaming_attention_ref(q, k, v, sink=[2], window=[3], scale=0.5, causal=True)
    table = block_sparse_table(BlockSparse(block=4, local_blocks=2), h, s, s, causal=True)
    out_b = block_sparse_attention_ref(q, k, v, table=table, scale=0.5)
    dense = dense_attention_ref(q, k, v, scale=0.5, causal=True)
    for o in (out, out_b, dense):
        assert torch.all(o[:, :2].abs() < 1e-12)      # heads 0, 1 read kv head 0 (v = 0)
        assert torch.all(o[:, 2:] > 90)               # heads 2, 3 read kv head 1 (v ~ 100)
    keep = streaming_keep_full(s, s, [2] * h, [3] * h, True)[None]
    ref, _ = brute_attention(q, k, v, keep, None, 0.5)
    torch.testing.assert_close(out, ref)


# -------------------------------------------------------- block tables

@SETTINGS
@given(case=attention_case(), data=st.data())
def test_block_sparse_matches_brute_force(case, data):
    c = case
    form = BlockSparse(block=data.draw(st.sampled_from([16, 32, 64])), local_blocks=data.draw(st.integers(1, 3)),
                       global_blocks=data.draw(st.integers(0, 2)), random_blocks=data.draw(st.integers(0, 2)),
                       seed=data.draw(st.integers(0, 100)))
    n_table_heads = data.draw(st.sampled_from([1, c["h"]]))
    table = block_sparse_table(form, n_table_heads, c["sq"], c["sk"], c["causal"])
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = make_qkv(gen, c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask, bool_m, add_m = make_mask(gen, c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    scale = 1 / math.sqrt(c["d"])
    out, lse = block_sparse_attention_ref(q, k, v, table=table, scale=scale, mask=mask, return_lse=True,
                                          chunk=c["chunk"])
    keep = table_keep_full(table, c["sq"])
    if bool_m is not None:
        keep = keep & bool_m
    ref_out, ref_lse = brute_attention(q, k, v, keep, add_m, scale)
    assert_matches(out, lse, ref_out, ref_lse, c["dtype"])


@SETTINGS
@given(case=attention_case(), data=st.data())
def test_block_sparse_matches_the_spec_brute_force(case, data):
    """Query rows sit in the block of their own position p = i + Sk - Sq (chunked prefill, multi-token decode)."""
    c = case
    form = BlockSparse(block=data.draw(st.sampled_from([4, 8, 16])), local_blocks=data.draw(st.integers(1, 3)),
                       global_blocks=data.draw(st.integers(0, 2)), random_blocks=data.draw(st.integers(0, 2)),
                       seed=data.draw(st.integers(0, 100)))
    table = block_sparse_table(form, c["h"], c["sq"], c["sk"], c["causal"])
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = make_qkv(gen, c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask, bool_m, add_m = make_mask(gen, c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    out, lse = block_sparse_attention_ref(q, k, v, table=table, scale=0.3, mask=mask, return_lse=True,
                                          chunk=c["chunk"])
    keep = block_sparse_keep_brute(form, c["h"], c["sq"], c["sk"], c["causal"])[None]
    if bool_m is not None:
        keep = keep & bool_m
    assert_matches(out, lse, *brute_attention(q, k, v, keep, add_m, 0.3), c["dtype"])


@pytest.mark.parametrize("sq,sk", [(20, 50), (2, 35), (7, 16 * 4 + 3), (40, 45), (33, 33), (30, 20)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_sparse_rows_use_the_block_of_their_position(sq, sk, causal):
    """Regression: with (Sk - Sq) % block != 0 a row went to block i // block + (Sk - Sq) // block."""
    form = BlockSparse(block=16, local_blocks=1)
    q, k, v = make_qkv(torch.Generator().manual_seed(sq * sk), 1, 2, 1, sq, sk, 8, torch.float64)
    table = block_sparse_table(form, 2, sq, sk, causal)
    out = block_sparse_attention_ref(q, k, v, table=table, scale=0.5)
    keep = block_sparse_keep_brute(form, 2, sq, sk, causal)[None]
    ref, _ = brute_attention(q, k, v, keep, None, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_interpreter_checks():
    """Run this file's kernel checks in a child process that imports Triton with TRITON_INTERPRET=1."""
    run_interpreter_checks(__file__, select="kernel", no_skips=True)


KERNEL_POSITION_CASES = [
    # (b, h, hkv, sq, sk, block, local, global, random, causal, mask)
    (1, 2, 1, 20, 50, 16, 1, 0, 0, True, "none"),     # (Sk - Sq) % 16 = 14: tiles straddle position blocks
    (2, 4, 2, 37, 70, 16, 2, 1, 1, True, "bool"),
    (1, 2, 2, 9, 37, 32, 1, 0, 0, True, "float"),     # multi-token decode across a 32-block boundary
    (1, 4, 1, 3, 33, 16, 1, 1, 0, True, "none"),
    (1, 2, 1, 25, 60, 16, 1, 0, 2, False, "none"),
    (2, 2, 2, 40, 40, 16, 1, 0, 1, True, "none"),     # Sq == Sk: no lead rows
    (1, 2, 1, 30, 21, 16, 1, 0, 0, False, "bool"),    # Sq > Sk: negative offset
]


@pytest.mark.parametrize("case", KERNEL_POSITION_CASES, ids=str)
def test_kernel_block_sparse_positions_match_brute_force(interpreter, case):
    """The Triton table kernel maps each query row to the block of its own position."""
    from sparsecc.codegen.block_attention import block_sparse_attention

    b, h, hkv, sq, sk, block, local, glob, rand, causal, mask_kind = case
    form = BlockSparse(block=block, local_blocks=local, global_blocks=glob, random_blocks=rand, seed=3)
    gen = torch.Generator().manual_seed(sq * 1000 + sk)
    q, k, v = make_qkv(gen, b, h, hkv, sq, sk, 16, torch.bfloat16)
    mask, bool_m, add_m = make_mask(gen, mask_kind, b, h, sq, sk)
    table = block_sparse_table(form, h, sq, sk, causal)
    out = torch.full_like(q, float("nan"))
    out, lse = block_sparse_attention(q, k, v, table=table, scale=0.25, mask=mask, return_lse=True, out=out)
    keep = block_sparse_keep_brute(form, h, sq, sk, causal)[None]
    if bool_m is not None:
        keep = keep & bool_m
    ref_out, ref_lse = brute_attention(q, k, v, keep, add_m, 0.25)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref_out, atol=3e-2, rtol=3e-2)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=1e-3, rtol=1e-3)


def test_block_sparse_chunk_size_does_not_change_the_result():
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(gen, 2, 4, 2, 150, 190, 16, torch.float64)
    table = block_sparse_table(BlockSparse(block=16, local_blocks=2, global_blocks=1, random_blocks=2, seed=9),
                               4, 150, 190, causal=True)
    outs = [block_sparse_attention_ref(q, k, v, table=table, scale=0.3, chunk=ch) for ch in (1, 16, 50, 4096)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-12, rtol=1e-12)


def test_block_sparse_batch_table_broadcast():
    """A table with Bt = B gives each batch element its own layout."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(gen, 2, 2, 2, 40, 40, 8, torch.float64)
    t0 = block_sparse_table(BlockSparse(block=16, local_blocks=1), 2, 40, 40, causal=False)
    t1 = block_sparse_table(BlockSparse(block=16, local_blocks=3), 2, 40, 40, causal=False)
    from sparsecc.layouts import BlockTable
    both = BlockTable.from_dense(torch.cat([t0.to_dense_block_mask(), t1.to_dense_block_mask()]),
                                 torch.cat([t0.to_dense_block_mask(full_only=True),
                                            t1.to_dense_block_mask(full_only=True)]),
                                 block_q=16, block_k=16, seq_q=40, seq_k=40, causal=False)
    out = block_sparse_attention_ref(q, k, v, table=both, scale=0.3)
    torch.testing.assert_close(out[:1], block_sparse_attention_ref(q[:1], k[:1], v[:1], table=t0, scale=0.3))
    torch.testing.assert_close(out[1:], block_sparse_attention_ref(q[1:], k[1:], v[1:], table=t1, scale=0.3))
    assert not torch.allclose(out[0], out[1])


def test_block_sparse_rejects_mismatched_table():
    q, k, v = make_qkv(torch.Generator().manual_seed(0), 1, 2, 2, 20, 20, 8, torch.float32)
    table = block_sparse_table(BlockSparse(block=16), 2, 20, 24, causal=True)
    with pytest.raises(ValueError, match="seq_k"):
        block_sparse_attention_ref(q, k, v, table=table, scale=1.0)
    # A table for fewer queries, or with a whole block of lead rows, is for other inputs.
    for rows in (3, 36):
        table = block_sparse_table(BlockSparse(block=16), 2, rows, 20, causal=True)
        with pytest.raises(ValueError, match="seq_q"):
            block_sparse_attention_ref(q, k, v, table=table, scale=1.0)
    table = block_sparse_table(BlockSparse(block=16), 3, 20, 20, causal=True)
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention_ref(q, k, v, table=table, scale=1.0)


# ----------------------------------------------------------------- dense

@SETTINGS
@given(case=attention_case())
def test_dense_ref_matches_brute_force(case):
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = make_qkv(gen, c["b"], c["h"], c["hkv"], c["sq"], c["sk"], c["d"], c["dtype"])
    mask, bool_m, add_m = make_mask(gen, c["mask"], c["b"], c["h"], c["sq"], c["sk"])
    out, lse = dense_attention_ref(q, k, v, scale=0.3, causal=c["causal"], mask=mask, return_lse=True)
    keep = torch.ones(1, 1, c["sq"], c["sk"], dtype=torch.bool)
    if c["causal"]:
        keep = torch.ones(c["sq"], c["sk"], dtype=torch.bool).tril(c["sk"] - c["sq"])[None, None]
    if bool_m is not None:
        keep = keep & bool_m
    assert_matches(out, lse, *brute_attention(q, k, v, keep, add_m, 0.3), c["dtype"])


def test_dense_ref_matches_sdpa_with_bool_mask():
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(gen, 2, 2, 2, 9, 9, 8, torch.float32)
    mask = torch.rand(2, 1, 9, 9, generator=gen) < 0.7
    mask[..., 0] = True  # SDPA returns NaN for empty rows; keep every row non-empty
    out = dense_attention_ref(q, k, v, scale=0.4, causal=False, mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------ slow

@pytest.mark.slow
def test_streaming_16k_tokens_runs_chunked():
    """16K tokens, sink 128, window 1024; one dense head, so the full-window path is exercised too."""
    torch.manual_seed(0)
    b, h, s, d = 1, 2, 16384, 64
    sinks, windows = [128, 128], [1024, FULL_WINDOW]
    q = torch.randn(b, h, s, d)
    k = torch.randn(b, h, s, d)
    v = torch.randn(b, h, s, d)
    start = time.perf_counter()
    out = streaming_attention_ref(q, k, v, sink=sinks, window=windows, scale=d ** -0.5, causal=True)
    assert time.perf_counter() - start < 60
    for head in range(h):
        for row in (0, 127, 128, 1023, 1024, 1500, 9000, s - 1):
            j = torch.arange(s)
            w = windows[head]
            keep = (j <= row) & ((j < sinks[head]) | (row - j < w if w != FULL_WINDOW else True))
            scores = (q[0, head, row].double() @ k[0, head].double().T) * d ** -0.5
            ref = torch.softmax(scores.masked_fill(~keep, -math.inf), -1) @ v[0, head].double()
            torch.testing.assert_close(out[0, head, row].double(), ref, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------ GPU

def block_sparse_keep_vectorized(form, n_heads, sq, sk, causal, device):
    """block_sparse_keep_brute's rule from docs/spec.md, vectorized for GPU-sized shapes: [H, Sq, Sk]."""
    bs = form.block
    n_k = -(-sk // bs)
    drawn = torch.zeros(n_heads, n_k, n_k, dtype=torch.bool)
    for h in range(n_heads):
        g = torch.Generator().manual_seed((form.seed * 2**20 + h) % 2**64)
        for c in range(n_k):
            n = c + 1 if causal else n_k
            drawn[h, c, torch.randperm(n, generator=g)[:min(form.random_blocks, n)]] = True
    p = torch.arange(sq, device=device)[:, None] + sk - sq
    j = torch.arange(sk, device=device)[None, :]
    a, b = p // bs, j // bs
    keep = ((a - b).abs() < form.local_blocks) | (a < form.global_blocks) | (b < form.global_blocks)
    in_range = (a >= 0) & (a < n_k)
    random = drawn.to(device)[:, a.clamp(0, n_k - 1).squeeze(1)][:, :, b.squeeze(0)] & in_range[None]
    keep = keep[None] | random
    return keep & (j <= p)[None] if causal else keep


@pytest.mark.gpu
@pytest.mark.parametrize("sq,sk,block,causal", [
    (1000, 2500, 128, True),      # chunked prefill, (Sk - Sq) % 128 = 92
    (4, 4097, 64, True),          # multi-token decode across a block boundary
    (16, 1000, 128, True),
    (3000, 4096 + 77, 128, False),
    (2048, 2048, 64, True),
])
def test_gpu_block_sparse_positions_match_the_spec(sq, sk, block, causal):
    from sparsecc.codegen.block_attention import block_sparse_attention

    form = BlockSparse(block=block, local_blocks=2, global_blocks=1, random_blocks=2, seed=2**50 + 3)
    gen = torch.Generator().manual_seed(sq + sk)
    q, k, v = (t.cuda() for t in make_qkv(gen, 1, 16, 4, sq, sk, 128, torch.bfloat16))
    mask = (torch.rand(1, 1, sq, sk, generator=gen) < 0.95).cuda()
    table = block_sparse_table(form, 16, sq, sk, causal, device="cuda")
    out = torch.full_like(q, float("nan"))
    out = block_sparse_attention(q, k, v, table=table, scale=128 ** -0.5, mask=mask, out=out)
    keep = block_sparse_keep_vectorized(form, 16, sq, sk, causal, "cuda")[None] & mask
    ref, _ = brute_attention(q.float(), k.float(), v.float(), keep, None, 128 ** -0.5)
    assert not out.isnan().any()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


def test_streaming_reference_traces_with_left_padding():
    """The reference applies docs/spec.md's left-padding rule without reading the mask back to the host, so it
    traces with fake tensors (as a traced op's fallback for dtypes without a kernel is) and one traced graph
    serves any padding."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from sparsecc.codegen.block_attention import streaming_attention_ref

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 30, 8, generator=g), torch.randn(2, 2, 30, 8, generator=g), \
        torch.randn(2, 2, 30, 8, generator=g)

    def ref(q, k, v, m):
        return streaming_attention_ref(q, k, v, sink=[2], window=[5], scale=0.3, causal=False, mask=m)

    mask = torch.ones(2, 1, 30, 30, dtype=torch.bool).tril()
    traced = make_fx(ref, tracing_mode="fake")(q, k, v, mask)
    for pads in ((0, 0), (7, 0), (3, 11)):
        padded = mask.clone()
        for i, pad in enumerate(pads):
            padded[i, ..., :pad] = False
        out = traced(q, k, v, padded)
        torch.testing.assert_close(out, ref(q, k, v, padded), rtol=0, atol=0)
        for i, pad in enumerate(pads):   # each element as it attends alone, from its first key
            alone = streaming_attention_ref(q[i:i + 1, :, pad:], k[i:i + 1, :, pad:], v[i:i + 1, :, pad:], sink=[2],
                                            window=[5], scale=0.3, causal=True)
            torch.testing.assert_close(out[i:i + 1, :, pad:], alone, rtol=1e-6, atol=1e-6)
