"""The oracle itself, on cases worked out by hand from docs/spec.md (no sparsecc involved)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.oracle import oracle, oracle_dynamic

F64 = torch.float64


def test_oracle_modules_import_only_torch_and_each_other():
    """The oracle is independent of what it checks: its modules import the standard library, torch and each
    other, never sparsecc nor the harness that runs sparsecc."""
    files = sorted(Path(__file__).parent.glob("oracle*.py"))
    assert len(files) >= 4, files
    allowed = ("__future__", "dataclasses", "fnmatch", "math", "typing", "torch", "tests.oracle.oracle")
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{f.name}:{node.lineno} imports {n}" for n in names if not n.startswith(allowed)]
    assert not bad, bad


def rows(keep):
    """A [Sq, Sk] keep mask as the list of kept key indices per query row."""
    return [torch.nonzero(r).flatten().tolist() for r in keep]


# ---------------------------------------------------------------- streaming

def test_streaming_causal_by_hand():
    # sink 1, window 2: j <= p and (j < 1 or p - j < 2)
    assert rows(oracle.streaming_keep(6, 6, 1, 2, causal=True)) == [
        [0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 3, 4], [0, 4, 5]]


def test_streaming_bidirectional_by_hand():
    # j < 1, or p < 1 (the sink sees everything), or |p - j| < 2
    assert rows(oracle.streaming_keep(5, 5, 1, 2, causal=False)) == [
        [0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3, 4], [0, 3, 4]]


def test_streaming_decode_positions():
    # Sq = 2 of Sk = 6: the rows are positions 4 and 5
    assert rows(oracle.streaming_keep(2, 6, 1, 2, causal=True)) == [[0, 3, 4], [0, 4, 5]]
    assert rows(oracle.streaming_keep(2, 6, 0, 2, causal=False)) == [[3, 4, 5], [4, 5]]


# ---------------------------------------------------------------- block_sparse

def test_block_sparse_by_hand():
    # block 2, local 1 (diagonal), global 1: block rows a0 -> all, a1 -> b0 b1, a2 -> b0 b2
    assert rows(oracle.block_sparse_keep(6, 6, 2, 1, 1, causal=False)) == [
        [0, 1, 2, 3, 4, 5]] * 2 + [[0, 1, 2, 3]] * 2 + [[0, 1, 4, 5]] * 2


def test_block_sparse_decode_uses_query_positions():
    # Sq = 3 of Sk = 7: positions 4, 5, 6 in blocks 2, 2, 3; diagonal only; causal token by token
    assert rows(oracle.block_sparse_keep(3, 7, 2, 1, 0, causal=True)) == [[4], [4, 5], [6]]


# ---------------------------------------------------------------- block_topk

def _qk_with_key_scores(scores, block, sq=None):
    """q all e0; key block b all e0 * scores[b]: with scale 1 the estimate of (a, b) is scores[b]."""
    sk = block * len(scores)
    sq = sk if sq is None else sq
    q = torch.zeros(1, 1, sq, 2, dtype=F64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, sk, 2, dtype=F64)
    for b, s in enumerate(scores):
        k[0, 0, b * block:(b + 1) * block, 0] = s
    return q, k


def _block_rows(keep, block):
    """Kept key blocks per query block (rows sampled at each query block's first row)."""
    k = keep[0, 0]
    return [sorted({j // block for j in torch.nonzero(k[a]).flatten().tolist()}) for a in range(0, k.shape[0], block)]


def test_block_topk_topk_and_band_by_hand():
    q, k = _qk_with_key_scores([1.0, 3.0, 2.0, 0.0], block=2)
    lo, hi = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=0, local_blocks=0)
    assert torch.equal(lo, hi)
    assert _block_rows(lo, 2) == [[1]] * 4
    lo, _ = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=0, local_blocks=1)
    assert _block_rows(lo, 2) == [[0, 1], [1, 2], [1, 2], [1, 3]]
    lo, _ = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=1, local_blocks=0)
    assert _block_rows(lo, 2) == [[0, 1]] * 4


def test_block_topk_ties_go_to_the_lower_block():
    q, k = _qk_with_key_scores([1.0, 2.0, 2.0, 0.0], block=2)
    lo, hi = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=0, local_blocks=0)
    assert torch.equal(lo, hi) and _block_rows(lo, 2) == [[1]] * 4


def test_block_topk_causal_candidates_by_hand():
    q, k = _qk_with_key_scores([1.0, 0.0, 5.0, 9.0], block=2)
    lo, _ = oracle.block_topk_keep(q, k, scale=1.0, causal=True, block=2, topk=1, sink_blocks=0, local_blocks=0)
    # a0: only b0 allowed; a1: b0 beats b1; a2: b2; a3: b3 - and causality token by token inside
    assert rows(lo[0, 0]) == [[0], [0, 1], [0, 1], [0, 1], [4], [4, 5], [6], [6, 7]]


def test_block_topk_cdf_by_hand():
    # estimates log 1, log 6, log 3: p = 0.1, 0.6, 0.3; ranked b1 (0.6), b2 (0.3), b0 (0.1)
    q, k = _qk_with_key_scores([0.0, math.log(6.0), math.log(3.0)], block=2)
    for cdf, expected in [(0.59, [1]), (0.61, [1, 2]), (0.95, [0, 1, 2]), (1.0, [0, 1, 2])]:
        lo, hi = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, cdf=cdf, sink_blocks=0,
                                        local_blocks=0)
        assert torch.equal(lo, hi), cdf
        assert _block_rows(lo, 2) == [expected] * 3, cdf
    # exactly on the boundary (mass before b2 is 0.6): within the float32 tolerance, so undefined
    lo, hi = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, cdf=0.6, sink_blocks=0, local_blocks=0)
    assert not torch.equal(lo, hi)


def test_block_topk_ragged_last_block_and_max_pool():
    # Sk = 5, block 2: blocks {0,1}, {2,3}, {4}; the last block pools its one key
    q = torch.zeros(1, 1, 5, 1, dtype=F64) + 1.0
    k = torch.tensor([0.0, 0.0, -4.0, 3.0, 2.0], dtype=F64).view(1, 1, 5, 1)
    lo, _ = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=0, local_blocks=0)
    assert _block_rows(lo, 2) == [[2]] * 3                       # means 0, -0.5, 2
    lo, _ = oracle.block_topk_keep(q, k, scale=1.0, causal=False, block=2, topk=1, sink_blocks=0, local_blocks=0,
                                   pool="max")
    assert _block_rows(lo, 2) == [[1]] * 3                       # maxima 0, 3, 2


# ---------------------------------------------------------------- vertical_slash

def test_vertical_slash_merge_by_hand():
    """spec step 4 for one block: ranges [e - block, e) merged in descending t, single columns between them."""
    keys = oracle_dynamic._vs_merge([200, 100, 10, 0], [3, 70, 100, 170, 300], end=256, block=64)
    assert keys == set(range(0, 64)) | set(range(92, 156)) | set(range(182, 310)) | {70, 170}
    assert oracle_dynamic._vs_merge([200, 100, 10, 0], [3, 70], end=64, block=64) == set(range(64))


def test_vertical_slash_small_sequences_are_dense_and_bidirectional_is_dense():
    # Sk <= 50: the budgets keep every diagonal (S = min(Sk, max(slash, 50))), so every causal pair is kept.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 40, 4, generator=g, dtype=F64), torch.randn(1, 1, 40, 4, generator=g, dtype=F64)
    lo, hi = oracle.vertical_slash_keep(q, k, scale=0.5, causal=True, last_q=2, vertical=0, slash=0, block=16)
    assert torch.equal(lo, hi) and torch.equal(lo[0, 0], oracle.causal_keep(40, 40))
    lo, hi = oracle.vertical_slash_keep(q, k, scale=0.5, causal=False, last_q=2, vertical=0, slash=0, block=16)
    assert lo.all() and hi.all()


def test_vertical_slash_forced_band_and_columns_by_hand():
    """Sk = 200, budgets at their minimums: columns 0..29 and diagonals 0..49, rounded to ranges of 16."""
    q = torch.zeros(1, 1, 200, 4, dtype=F64)
    k = torch.randn(1, 1, 200, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    lo, hi = oracle.vertical_slash_keep(q, k, scale=1.0, causal=True, last_q=4, vertical=0, slash=0, block=16)
    assert torch.equal(lo, hi)
    # Row block 12 (rows 192..199, end = 208): t = 49 -> [143, 159), then one block at a time up to 207.
    want = set(range(30)) | set(range(143, 200))
    assert rows(lo[0, 0])[199] == sorted(want)


# ---------------------------------------------------------------- dense attention and masks

@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 9)])
def test_attend_dense_equals_torch_sdpa(sq, sk):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, sq, 8, generator=g, dtype=F64)
    k, v = torch.randn(2, 2, sk, 8, generator=g, dtype=F64), torch.randn(2, 2, sk, 8, generator=g, dtype=F64)
    keep = oracle.causal_keep(sq, sk)   # bottom-right aligned: the queries are the last positions
    pad = torch.tensor([[True] * sk, [False] * 2 + [True] * (sk - 2)])[:, None, None, :]
    bias = torch.randn(2, 1, sq, sk, generator=g, dtype=F64)
    for mask in (pad & keep, torch.zeros(2, 1, sq, sk, dtype=F64).masked_fill(~(pad & keep), float("-inf")) + bias):
        out, valid = oracle.expected_attention(q, k, v, [None] * 4, causal=True, mask=mask)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.dtype == torch.bool else
                                             mask.masked_fill(~keep, float("-inf")), enable_gqa=True)
        torch.testing.assert_close(out[valid], ref[valid])
        assert valid[0].all()


def test_empty_rows_are_not_valid():
    q = torch.randn(1, 1, 4, 2, dtype=F64)
    k = v = torch.randn(1, 1, 4, 2, dtype=F64)
    mask = torch.tensor([False, False, True, True])   # left padding: causal rows 0 and 1 keep nothing
    _, valid = oracle.expected_attention(q, k, v, [None], causal=True, mask=mask)
    assert valid[0, 0].tolist() == [False, False, True, True]
    finfo = torch.zeros(4).masked_fill(~mask, torch.finfo(torch.float32).min).to(F64)
    _, valid = oracle.expected_attention(q, k, v, [None], causal=True, mask=finfo)
    assert valid[0, 0].tolist() == [False, False, True, True]


# ---------------------------------------------------------------- which rule applies

def test_rule_resolution_per_head_and_policy():
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": "model.layers.*.self_attn", "heads": [0, 1, 2], "form": "streaming", "sink": 1, "window": 2},
        {"modules": "model.layers.[01].self_attn", "form": "dense"},
        {"modules": "model.layers.7.*", "heads": [1], "form": "streaming", "sink": 0, "window": 1, "policy": "off"},
    ]}
    s = oracle.attention_site_rule(spec, "model.layers.0.self_attn", 4)
    assert s.forms == [None] * 4 and not s.sparse          # the later dense rule overrides every head
    s = oracle.attention_site_rule(spec, "model.layers.12.self_attn", 4)   # '*' crosses dots
    assert [f is not None for f in s.forms] == [True, True, True, False] and s.policy == "force" and s.sparse
    s = oracle.attention_site_rule(spec, "model.layers.7.self_attn", 4)
    assert s.forms[1]["window"] == 1 and s.forms[0]["window"] == 2
    assert s.policy == "off" and not s.sparse                # the last covering sparse rule decides the policy
    assert oracle.attention_site_rule(spec, "Model.layers.7.self_attn", 4).policy is None   # case-sensitive
    assert oracle.covers({"modules": "layers.[!0].attn"}, "layers.1.attn")
    assert not oracle.covers({"modules": "layers.[!0].attn"}, "layers.0.attn")


# ---------------------------------------------------------------- FFN and linear

def test_threshold_magnitude_and_weighted_by_hand():
    x = torch.tensor([[0.5, -0.2, 0.3]], dtype=F64)
    out, _ = oracle.threshold(x, 0.25)
    assert out.tolist() == [[0.5, 0.0, 0.3]]
    w = torch.tensor([[1.0, 3.0, 0.0], [0.0, 4.0, 0.5]], dtype=F64)    # column norms 1, 5, 0.5
    out, _ = oracle.threshold(x, 0.25, weight=w)                       # scores 0.5, 1.0, 0.15
    assert out.tolist() == [[0.5, -0.2, 0.0]]


def test_ffn_gate_mode_by_hand():
    ffn = oracle.Ffn(gate_w=torch.eye(2), gate_b=None, up_w=2 * torch.eye(2), up_b=None,
                     down_w=torch.ones(1, 2), down_b=None, act="relu")
    out, valid = oracle.expected_ffn(ffn, torch.tensor([[0.1, 0.7]]), mode="gate", tau_gate=0.5)
    assert out.tolist() == [[pytest.approx(0.7 * 1.4)]] and valid.all()


def test_prune_2_4_by_hand():
    w = torch.tensor([[1.0, -3.0, 2.0, 0.5, 0.1, 0.2, -0.3, 0.4]], dtype=F64)
    pruned, valid = oracle.prune_2_4(w)
    assert pruned.tolist() == [[0.0, -3.0, 2.0, 0.0, 0.0, 0.0, -0.3, 0.4]] and valid.all()
    pruned, valid = oracle.prune_2_4(torch.tensor([[3.0, 1.0, -1.0, 0.0], [0.5, -0.5, 0.5, -0.5]]))
    assert pruned.tolist() == [[3.0, 1.0, 0.0, 0.0], [0.5, -0.5, 0.0, 0.0]] and valid.all()   # ties: lower index


def test_prune_block_weights_by_hand():
    w = torch.zeros(4, 4)
    w[:2, :2], w[:2, 2:], w[2:, :2], w[2:, 2:] = 1.0, 3.0, 2.0, 0.5     # block norms 2, 6, 4, 1
    pruned, defined = oracle.prune_block_weights(w, (2, 2), density=0.25)   # ceil(1) = 1 block
    assert defined and (pruned != 0).sum() == 4 and pruned[0, 2] == 3.0
    pruned, defined = oracle.prune_block_weights(w, (2, 2), density=0.3)    # ceil(1.2) = 2 blocks
    assert defined and pruned[0, 2] == 3.0 and pruned[2, 0] == 2.0 and pruned[0, 0] == 0 and pruned[2, 2] == 0
    pruned, _ = oracle.prune_block_weights(w, (2, 2), density=0.01)         # at least one block
    assert (pruned != 0).sum() == 4
