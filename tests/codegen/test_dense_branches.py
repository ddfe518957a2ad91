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
