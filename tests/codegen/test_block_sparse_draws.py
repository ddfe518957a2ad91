"""block_sparse's random blocks do not depend on how the model passes causality (docs/spec.md, block_sparse).

Expected values are float64 attention over an explicit keep mask built here from the spec: query row ``i`` at
position ``p`` (``i + Sk - Sq``, or the mask's position for a static cache's rows) is in query block ``a = p //
block``; key ``j`` in key block ``b = j // block`` is kept iff ``|a - b| < local_blocks``, or ``a`` or ``b`` is a
global block, or ``b`` is one of the random blocks of ``(head, a)``; then the model's mask and causality. Random
blocks: per head a CPU generator seeded ``seed * 2**20 + head``; for each position block ``c = 0, 1, ...`` in order
the first ``random_blocks`` entries of ``randperm(n)``, with ``n = c + 1`` when no row of the call attends a key
after its position (``is_causal``, a causal mask passed as a tensor, one query row) and ``n`` = the number of key
blocks otherwise.
"""

import pytest
import torch

from sparsecc.codegen.attention_ops import block_sparse_attention

BLOCK, LOCAL, GLOBAL, RANDOM, SEED = 4, 1, 1, 2, 7
H, HKV, D = 4, 2, 8


def _drawn(n_k, causal_draws):
    drawn = torch.zeros(H, n_k, n_k, dtype=torch.bool)
    for h in range(H):
        g = torch.Generator().manual_seed(SEED * 2**20 + h)
        for c in range(n_k):
            n = c + 1 if causal_draws else n_k
            drawn[h, c, torch.randperm(n, generator=g)[:min(RANDOM, n)]] = True
    return drawn


def _keep(positions, sk, causal_draws):
    """[H, Sq, Sk] block keep mask of rows at ``positions`` (no causality, no model mask yet)."""
    n_k = -(-sk // BLOCK)
    drawn = _drawn(n_k, causal_draws)
    a = positions[:, None] // BLOCK
    b = torch.arange(sk)[None, :] // BLOCK
    kept = ((a - b).abs() < LOCAL) | (a < GLOBAL) | (b < GLOBAL)
    random = drawn[:, a.clamp(max=n_k - 1).squeeze(1)][:, :, b.squeeze(0)] & (a < n_k)[None]
    return kept[None] | random


def _attention(q, k, v, keep):
    """float64 softmax attention of one batch element over ``keep`` [H, Sq, Sk]."""
    rep = H // HKV
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    logits = (q.double() @ k.transpose(-1, -2)) * D ** -0.5
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0) @ v


def _qkv(b, sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, H, sq, D, generator=g), torch.randn(b, HKV, sk, D, generator=g),
            torch.randn(b, HKV, sk, D, generator=g))


def _op(q, k, v, mask, causal, positions_from_mask=False):
    return block_sparse_attention(q, k, v, mask, D ** -0.5, causal, BLOCK, LOCAL, GLOBAL, RANDOM, SEED, [], 0,
                                  "reference", positions_from_mask)


def _causal(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)


def test_a_causal_mask_tensor_draws_as_is_causal_and_batch_mates_do_not_matter():
    s = 24
    q, k, v = _qkv(2, s, s)
    padded = _causal(s, s).clone()
    padded[:, :5] = False                       # element 1: five left-padding keys
    padded[:5, :5] = torch.eye(5, dtype=torch.bool)
    mask = torch.stack([_causal(s, s), padded])[:, None]
    out = _op(q, k, v, mask, causal=False)
    alone = _op(q[:1], k[:1], v[:1], None, causal=True)
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)
    p = torch.arange(s)
    for e in range(2):
        keep = _keep(p, s, causal_draws=True) & mask[e]
        torch.testing.assert_close(out[e].double(), _attention(q[e], k[e], v[e], keep), atol=1e-5, rtol=1e-5)
    bidirectional = _keep(p, s, causal_draws=False) & mask[0]
    assert not torch.equal(bidirectional, _keep(p, s, causal_draws=True) & mask[0])   # the draws really differ


def test_a_batch_of_causal_and_bidirectional_elements_draws_each_its_own_way():
    s = 20
    q, k, v = _qkv(2, s, s, seed=1)
    mask = torch.stack([_causal(s, s), torch.ones(s, s, dtype=torch.bool)])[:, None]
    out = _op(q, k, v, mask, causal=False)
    p = torch.arange(s)
    for e, causal_draws in ((0, True), (1, False)):
        keep = _keep(p, s, causal_draws) & mask[e]
        torch.testing.assert_close(out[e].double(), _attention(q[e], k[e], v[e], keep), atol=1e-5, rtol=1e-5)


def test_one_query_row_sees_the_blocks_of_its_prefill_row():
    s = 27
    q, k, v = _qkv(1, s, s, seed=2)
    prefill = _op(q, k, v, None, causal=True)
    step = _op(q[:, :, -1:], k, v, None, causal=False)      # a decode step: one row, no mask, not is_causal
    torch.testing.assert_close(step, prefill[:, :, -1:], atol=1e-5, rtol=1e-5)
    keep = _keep(torch.tensor([s - 1]), s, causal_draws=True)
    torch.testing.assert_close(step[0].double(), _attention(q[0, :, -1:], k[0], v[0], keep), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("written", [13, 22])
def test_a_static_cache_row_sees_the_blocks_of_its_prefill_row(written):
    """A static cache of 32 slots with ``written`` keys written: the mask hides the unwritten tail, so the last
    query row sits at position ``written - 1`` (docs/spec.md) and draws as the causal prefill did."""
    slots, sq = 32, 2
    q, k, v = _qkv(1, sq, slots, seed=3)
    mask = torch.zeros(1, 1, sq, slots, dtype=torch.bool)
    for i in range(sq):
        mask[..., i, :written - sq + i + 1] = True
    out = _op(q, k, v, mask, causal=False, positions_from_mask=True)
    p = torch.arange(written - sq, written)
    keep = _keep(p, slots, causal_draws=True) & mask[0]
    torch.testing.assert_close(out[0].double(), _attention(q[0], k[0], v[0], keep), atol=1e-5, rtol=1e-5)
    prefix = _op(q, k[:, :, :written], v[:, :, :written], None, causal=True)   # the same rows, no cache
    torch.testing.assert_close(out, prefix, atol=1e-5, rtol=1e-5)
