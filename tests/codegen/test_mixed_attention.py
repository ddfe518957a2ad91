"""Mixed-head attention (codegen/mixed_attention.py): the per-head table, per-head vertical_slash budgets, the
stacked block table, and the one-launch kernels against the head-group-by-head-group reference.

CPU: the Triton kernels run in the interpreter in a child process (test_interpreter_checks). GPU (``gpu``
marker): the same checks at long sequences, through the op.
"""

import math

import pytest
import torch

from sparsecc.codegen.mixed_attention import HeadTable, mixed_block_table
from sparsecc.codegen.ops import mixed_head_attention_by_groups
from sparsecc.codegen.vertical_slash import (head_budgets, vertical_slash_index_ref, vertical_slash_key_mask,
                                             vertical_slash_select_ref)
from sparsecc.forms import BlockSparse, Streaming, VerticalSlash
from sparsecc.layouts import block_sparse_table
from tests.interpreter import interpreter, run_interpreter_checks  # noqa: F401 (the fixture)


def test_interpreter_checks():
    """Run this file's interpreter checks in a child process that imports Triton with TRITON_INTERPRET=1."""
    run_interpreter_checks(__file__, select="kernel", no_skips=True)


def make(seed, b, h, hkv, sq, sk, d, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    return q, k, v


VS_TABLE = [VerticalSlash(8, 35, 60, 16), Streaming(4, 24), None, VerticalSlash(8, 2, 120, 16),
            VerticalSlash(8, 35, 60, 16), Streaming(0, 7), VerticalSlash(8, 80, 3, 16), None]
BLOCK_TABLE = [BlockSparse(16, 2, 1, 1, 3), Streaming(4, 24), None, BlockSparse(16, 1, 0, 2, 5),
               BlockSparse(16, 2, 1, 1, 3), Streaming(0, 40), BlockSparse(16, 3, 0, 0, 0), None]


def test_table_round_trips_through_the_op_arguments():
    for forms in (VS_TABLE, BLOCK_TABLE):
        table = HeadTable.of(forms)
        assert HeadTable.from_op_args(*table.op_args()) == table
        assert list(table.forms) == forms


def test_table_families_and_refusals():
    assert HeadTable.of(VS_TABLE).family() == "vertical_slash"
    assert HeadTable.of(BLOCK_TABLE).family() == "block"
    assert HeadTable.of([VerticalSlash(8, 1, 1, 16), BlockSparse(16)]).family() is None
    with pytest.raises(ValueError, match="one block size"):
        HeadTable.of([VerticalSlash(8, 1, 1, 16), VerticalSlash(8, 1, 1, 32)])
    with pytest.raises(ValueError, match="last_q"):
        HeadTable.of([VerticalSlash(8, 1, 1, 16), VerticalSlash(4, 1, 1, 16)])


@pytest.mark.parametrize("sq,sk", [(96, 96), (40, 100), (1, 70)])
def test_per_head_budgets_select_what_each_form_alone_selects(sq, sk):
    """Head h's keys under per-head budgets equal head h's keys under its own form for every head."""
    forms = [VerticalSlash(8, 35, 60, 16), VerticalSlash(8, 2, 120, 16), VerticalSlash(8, 80, 3, 16),
             VerticalSlash(8, 0, 0, 16)]
    q, k, _ = make(5, 2, 4, 2, sq, sk, 16, torch.float32)
    cols, offs = vertical_slash_select_ref(q, k, forms[0], 0.3, per_head=head_budgets(forms, sk))
    mixed = vertical_slash_index_ref(cols, offs, block=16, seq_q=sq, seq_k=sk)
    n_q = mixed.range_count.shape[2]
    got = vertical_slash_key_mask(mixed, 0, n_q)
    for h, form in enumerate(forms):
        c1, o1 = vertical_slash_select_ref(q, k, form, 0.3)
        alone = vertical_slash_index_ref(c1, o1, block=16, seq_q=sq, seq_k=sk)
        assert torch.equal(got[:, h], vertical_slash_key_mask(alone, 0, n_q)[:, h]), (h, form)


@pytest.mark.parametrize("sq,sk,causal", [(64, 64, True), (40, 90, True), (64, 64, False), (1, 50, False)])
def test_stacked_block_table_rows_are_each_forms_own(sq, sk, causal):
    """Row h of the stacked table is row h of its form's table for all heads (random blocks included); other
    heads keep no block."""
    table = HeadTable.of(BLOCK_TABLE)
    stacked = mixed_block_table(table, sq, sk, causal, torch.device("cpu")).to_dense_block_mask()
    for h, form in enumerate(table.forms):
        if isinstance(form, BlockSparse):
            own = block_sparse_table(form, len(table.forms), sq, sk, causal).to_dense_block_mask()
            assert torch.equal(stacked[:, h], own[:, h]), h
        else:
            assert not stacked[:, h].any(), h


# ---------------------------------------------------------------- Triton interpreter

SHAPES = [(1, 8, 2, 96, 96, 16), (2, 8, 8, 70, 70, 16), (2, 8, 4, 40, 100, 32)]   # b, h, hkv, sq, sk, d


def _mask(kind, b, sq, sk):
    g = torch.Generator().manual_seed(1)
    causal = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    if kind == "bool":
        return (torch.rand(b, 1, sq, sk, generator=g) > 0.2) & causal
    if kind == "additive":
        return torch.randn(sq, sk, generator=g).masked_fill(~causal | (torch.rand(sq, sk, generator=g) > 0.8),
                                                            -math.inf)
    return None


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_kernel_vertical_slash_family(interpreter, shape, mask_kind):
    """One launch over vertical_slash heads of four budgets, streaming and dense heads equals the heads run
    group by group through each form's reference (causal; the masks keep no later key)."""
    from sparsecc.codegen.mixed_attention import vertical_slash_family

    b, h, hkv, sq, sk, d = shape
    q, k, v = make(11, b, h, hkv, sq, sk, d, torch.bfloat16)
    table = HeadTable.of(VS_TABLE[:h])
    mask = _mask(mask_kind, b, sq, sk)
    out = vertical_slash_family(q, k, v, mask, 0.3, table)
    ref = mixed_head_attention_by_groups(q.float(), k.float(), v.float(), mask, 0.3, True, table, "reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool"])
def test_kernel_block_family(interpreter, shape, causal, mask_kind):
    """One prefill-kernel launch over block_sparse heads of four layouts, streaming and dense heads equals the
    heads run group by group (causal and bidirectional, Sq < Sk with lead rows)."""
    from sparsecc.codegen.mixed_attention import block_family

    b, h, hkv, sq, sk, d = shape
    q, k, v = make(12, b, h, hkv, sq, sk, d, torch.float16)
    table = HeadTable.of(BLOCK_TABLE[:h])
    mask = _mask(mask_kind, b, sq, sk)
    if mask is not None and not causal:
        mask = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(2)) > 0.2
    out = block_family(q, k, v, mask, 0.3, causal, table)
    ref = mixed_head_attention_by_groups(q.float(), k.float(), v.float(), mask, 0.3, causal, table, "reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- GPU

def _op(q, k, v, mask, scale, causal, table, impl):
    from sparsecc.codegen import ops
    return ops.mixed_head_attention(q, k, v, mask, scale, causal, *table.op_args(), 0, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("forms", ["vertical_slash", "block"])
@pytest.mark.parametrize("sq,sk", [(4096, 4096), (3000, 4096)])
def test_gpu_mixed_heads_one_launch(forms, sq, sk, monkeypatch):
    """Through the op on CUDA: the one-launch kernel runs (counted) and matches the group-by-group path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from sparsecc.codegen import mixed_attention as mx

    if forms == "vertical_slash":
        table = HeadTable.of([VerticalSlash(64, 1000, 2048, 64), Streaming(64, 512), None,
                              VerticalSlash(64, 100, 800, 64)] * 2)
        launcher, name = mx.vertical_slash_family, "vertical_slash_family"
    else:
        table = HeadTable.of([BlockSparse(64, 4, 1, 2, 7), Streaming(64, 512), None, BlockSparse(64, 8, 0, 0, 0)] * 2)
        launcher, name = mx.block_family, "block_family"
    calls = []
    monkeypatch.setattr(mx, name, lambda *a: calls.append(1) or launcher(*a))
    q, k, v = (t.cuda() for t in make(11, 2, 8, 2, sq, sk, 128, torch.bfloat16))
    scale = 1 / math.sqrt(128)
    causal = sq == sk
    mask = None if causal else torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq)
    out = _op(q, k, v, mask, scale, causal, table, "auto")
    assert calls, "the one-launch kernel did not run"
    assert torch.isfinite(out).all()
    ref = mixed_head_attention_by_groups(q, k, v, mask, scale, causal, table, "auto")
    err = (out.float() - ref.float()).norm() / ref.float().norm()
    assert err.item() < 1e-2
