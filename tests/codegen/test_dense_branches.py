"""The attention ops' run-time dense branches (docs/spec.md): the cost model's crossover (``dense_below``) and the
model's own sliding window (``own_window``) count an element's keys from its left padding, so a left-padded
sequence runs dense exactly where it does alone, whatever its batch-mates.

Each case batches a left-padded element (50 keys behind 30 padding keys) with an unpadded one (80 keys), four
query rows at the end of the keys (a chunk after a cache), a causal bool mask that also hides the padding, on a
call that is not ``is_causal`` (how transformers passes a padded batch). The branch is set so that the two
elements fall on different sides: the element on the dense side must equal dense attention (float64, written
from the mask alone), the other the op's form on that element alone with the branch off, which must differ from
dense attention (the form really ran).
"""

import dataclasses

import pytest
import torch

from sparsecc.codegen.attention_ops import (BLOCK_SPARSE_ATTENTION, DYNAMIC_BLOCK_ATTENTION, MIXED_HEAD_ATTENTION,
                                            STREAMING_ATTENTION, STREAMING_ATTENTION_FROM_MASK,
                                            BlockSparseAttentionArgs, DynamicAttentionArgs, MixedHeadArgs,
                                            StreamingAttentionArgs, StreamingFromMaskArgs)
from sparsecc.codegen.mixed_attention import HeadTable
from sparsecc.forms import BlockSparse, BlockTopK, Streaming

HEADS, KV_HEADS, DIM, ROWS = 4, 2, 16, 4
PAD, KEYS_PADDED, KEYS_FULL = 30, 50, 80
SCALE = DIM ** -0.5


def _calls():
    """(name, record, args) of every attention op, its form leaving keys out at these sizes."""
    common = dict(scale=SCALE, causal=False, impl="reference")
    from_mask = dict(common, positions_from_mask=True)
    streaming = dict(sink=(2,) * HEADS, window=(8,) * HEADS)
    return [
        ("streaming", STREAMING_ATTENTION, StreamingAttentionArgs(**common, **streaming)),
        ("streaming_from_mask", STREAMING_ATTENTION_FROM_MASK,
         StreamingFromMaskArgs(scale=SCALE, impl="reference", **streaming)),
        ("block_sparse", BLOCK_SPARSE_ATTENTION,
         BlockSparseAttentionArgs.of(BlockSparse(16, 1, 1, 1, 3), **from_mask)),
        ("block_topk", DYNAMIC_BLOCK_ATTENTION,
         DynamicAttentionArgs.of(BlockTopK(block=16, topk=1, sink_blocks=0, local_blocks=1), **from_mask)),
        ("mixed", MIXED_HEAD_ATTENTION,
         MixedHeadArgs.of(HeadTable.of([Streaming(2, 8), BlockSparse(16, 1, 1, 0, 0), Streaming(0, 12), None]),
                          **from_mask)),
    ]


CALLS = _calls()


def _inputs():
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, HEADS, ROWS, DIM, generator=g)
    k = torch.randn(2, KV_HEADS, KEYS_FULL, DIM, generator=g) * 2
    v = torch.randn(2, KV_HEADS, KEYS_FULL, DIM, generator=g)
    index = torch.arange(KEYS_FULL)
    causal = index[None, :] <= torch.arange(ROWS)[:, None] + KEYS_FULL - ROWS
    mask = causal.expand(2, 1, ROWS, KEYS_FULL).clone()
    mask[0, :, :, :PAD] = False                                  # element 0: 30 padding keys, then 50 keys
    return q, k, v, mask


def _run(record, args, q, k, v, mask):
    return record.body(*record.flatten({"q": q, "k": k, "v": v, "mask": mask}, args))


def _dense(q, k, v, mask):
    """Softmax over the keys the mask keeps (float64), GQA heads sharing their key head."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * SCALE
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _alone(record, args, q, k, v, mask, element):
    """The element alone, its padding cut off, the dense branches off."""
    start = PAD if element == 0 else 0
    off = dataclasses.replace(args, dense_below=0, own_window=0)
    return _run(record, off, q[element:element + 1], k[element:element + 1, :, start:], v[element:element + 1, :, start:],
                mask[element:element + 1, :, :, start:])


@pytest.mark.parametrize("branch", ["dense_below", "own_window"])
@pytest.mark.parametrize("name,record,args", CALLS, ids=[c[0] for c in CALLS])
def test_a_dense_branch_counts_keys_from_the_left_padding(name, record, args, branch):
    q, k, v, mask = _inputs()
    if branch == "dense_below":   # 50 keys are below the crossover, 80 are not: element 0 dense
        args, dense, sparse = dataclasses.replace(args, dense_below=64), 0, 1
    else:   # the first query sits at 76 (element 1, past W - 1 = 69) and at 46 (element 0, counted from its key 30)
        args, dense, sparse = dataclasses.replace(args, own_window=70), 1, 0
    out = _run(record, args, q, k, v, mask)
    want_dense = _dense(q[dense:dense + 1], k[dense:dense + 1], v[dense:dense + 1], mask[dense:dense + 1])
    torch.testing.assert_close(out[dense:dense + 1].double(), want_dense, atol=1e-5, rtol=1e-5)
    alone = _alone(record, args, q, k, v, mask, sparse)
    torch.testing.assert_close(out[sparse:sparse + 1], alone, atol=1e-5, rtol=1e-5)
    sparse_dense = _dense(q[sparse:sparse + 1], k[sparse:sparse + 1], v[sparse:sparse + 1], mask[sparse:sparse + 1])
    assert (alone.double() - sparse_dense).abs().max() > 1e-2   # the form left keys out


@pytest.mark.parametrize("name,record,args", CALLS, ids=[c[0] for c in CALLS])
def test_both_elements_on_one_side_run_as_one_batch(name, record, args):
    """A crossover above both elements' key counts runs the whole batch dense; the own window past both elements'
    first queries likewise."""
    q, k, v, mask = _inputs()
    for changed in (dict(dense_below=100), dict(own_window=40)):
        out = _run(record, dataclasses.replace(args, **changed), q, k, v, mask)
        torch.testing.assert_close(out.double(), _dense(q, k, v, mask), atol=1e-5, rtol=1e-5, msg=str(changed))


@pytest.mark.parametrize("name,record,args", CALLS, ids=[c[0] for c in CALLS])
def test_the_own_window_judges_the_first_row_after_the_padding_rows(name, record, args):
    """A prefill (Sq == Sk) with ``own_window`` 1: alone, the sequence's first row sits at 0 = W - 1 and it runs
    dense; behind 30 padding keys its first row is a padding row (before key 30), which the rule skips, so it
    runs dense there too."""
    g = torch.Generator().manual_seed(3)
    n = PAD + KEYS_PADDED
    q, k, v = (torch.randn(2, h, n, DIM, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS))
    keep = torch.ones(n, n, dtype=torch.bool).tril().expand(2, 1, n, n).clone()
    keep[0, :, :, :PAD] = False
    args = dataclasses.replace(args, own_window=1, positions_from_mask=False) if hasattr(args, "positions_from_mask") \
        else dataclasses.replace(args, own_window=1)
    out = _run(record, args, q, k, v, keep)
    want = _dense(q[:1, :, PAD:], k[:1, :, PAD:], v[:1, :, PAD:], keep[:1, :, PAD:, PAD:])
    torch.testing.assert_close(out[:1, :, PAD:].double(), want, atol=1e-5, rtol=1e-5)


STATIC_CACHE = [c for c in CALLS if c[0] != "streaming"]   # the static-cache layout takes positions from the mask


@pytest.mark.parametrize("branch", ["dense_below", "own_window"])
@pytest.mark.parametrize("name,record,args", STATIC_CACHE, ids=[c[0] for c in STATIC_CACHE])
def test_a_static_cache_counts_from_the_padding_to_the_last_position(name, record, args, branch):
    """A static cache's buffer of 96 slots: element 0 holds 30 padding slots and 50 tokens, element 1 holds 80
    tokens, the tail unwritten (hidden by the mask); four query rows, the last tokens of each. Each element is
    judged on its tokens (from its padding to its last row's position): element 0 as it is alone with its 50
    tokens in a buffer of the same size, whatever the buffer and the padding."""
    slots = 96
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, HEADS, ROWS, DIM, generator=g)
    k = torch.randn(2, KV_HEADS, slots, DIM, generator=g) * 2
    v = torch.randn(2, KV_HEADS, slots, DIM, generator=g)
    written = torch.tensor([PAD + KEYS_PADDED, KEYS_FULL])
    rows = torch.arange(ROWS)
    position = written[:, None] - ROWS + rows[None, :]                          # [2, ROWS]
    mask = torch.arange(slots)[None, None, :] <= position[:, :, None]           # [2, ROWS, slots]
    mask[0, :, :PAD] = False
    mask = mask[:, None]
    if branch == "dense_below":   # 50 tokens are below the crossover, 80 are not: element 0 dense
        args, dense, sparse = dataclasses.replace(args, dense_below=64), 0, 1
    else:   # first rows at 76 (element 1, past W - 1 = 69) and 46 (element 0, counted from its token 0)
        args, dense, sparse = dataclasses.replace(args, own_window=70), 1, 0
    out = _run(record, args, q, k, v, mask)
    want = _dense(q[dense:dense + 1], k[dense:dense + 1], v[dense:dense + 1], mask[dense:dense + 1])
    torch.testing.assert_close(out[dense:dense + 1].double(), want, atol=1e-5, rtol=1e-5)
    # the sparse element alone: its tokens first in a buffer of the same size, no padding
    start = PAD if sparse == 0 else 0
    n = int(written[sparse]) - start
    k1 = torch.cat([k[sparse:sparse + 1, :, start:start + n], k[sparse:sparse + 1, :, :slots - n]], 2)
    v1 = torch.cat([v[sparse:sparse + 1, :, start:start + n], v[sparse:sparse + 1, :, :slots - n]], 2)
    mask1 = torch.arange(slots)[None, None, None, :] <= (n - ROWS + rows)[None, None, :, None]
    off = dataclasses.replace(args, dense_below=0, own_window=0)
    alone = _run(record, off, q[sparse:sparse + 1], k1, v1, mask1)
    torch.testing.assert_close(out[sparse:sparse + 1], alone, atol=1e-5, rtol=1e-5)
    if name != "block_topk":   # the dynamic forms attend densely on rows a static cache's mask moves (docs/spec.md)
        assert (alone.double() - _dense(q[sparse:sparse + 1], k1, v1, mask1)).abs().max() > 1e-2   # the form ran


@pytest.mark.parametrize("name,record,args", STATIC_CACHE, ids=[c[0] for c in STATIC_CACHE])
def test_a_static_cache_prefill_skips_its_padding_rows(name, record, args):
    """A left-padded prompt of 40 rows (3 of them padding) written into a static cache of 96 slots, with the model's
    own window 50: its padding rows keep no key, so their mask position is the default ``i + Sk - Sq`` (56, past
    the window); the rule judges the first row after them (position 0), and the prompt runs as it does alone."""
    rows, slots, pad, window = 40, 96, 3, 50
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, HEADS, rows, DIM, generator=g)
    k = torch.randn(2, KV_HEADS, slots, DIM, generator=g) * 2
    v = torch.randn(2, KV_HEADS, slots, DIM, generator=g)
    i, j = torch.arange(rows)[:, None], torch.arange(slots)[None, :]
    mask = torch.stack([(j <= i) & (j >= pad), j <= i])[:, None]
    args = dataclasses.replace(args, own_window=window)
    out = _run(record, args, q, k, v, mask)
    alone = _run(record, dataclasses.replace(args, own_window=0), q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:],
                 mask[:1, :, pad:, pad:])
    torch.testing.assert_close(out[:1, :, pad:], alone, atol=1e-5, rtol=1e-5)
    if name != "block_topk":   # (the dynamic forms attend densely on rows a static cache's mask moves)
        want = _dense(q[:1, :, pad:], k[:1, :, pad:], v[:1, :, pad:], mask[:1, :, pad:, pad:])
        assert (alone.double() - want).abs().max() > 1e-2   # the form ran
