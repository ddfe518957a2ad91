"""Query positions with fewer queries than keys and a mask (docs/spec.md, "Attention forms").

Expected values: float64 attention with an explicit keep mask built here from the text: row i sits at
p = min(i + Sk - Sq, the last key its mask keeps) (i + Sk - Sq when it keeps none), and the bidirectional
streaming rule keeps key j iff the mask keeps it and (j < sink or p < sink or |p - j| < window).
"""

import math

import pytest
import torch

import sparsecc
from sparsecc.backend import rewritten_graphs

H, D = 2, 8
SINK, WINDOW = 1, 3


class MaskedSdpa(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _streaming_spec(form=None):
    rule = form or {"form": "streaming", "sink": SINK, "window": WINDOW}
    return {"version": 1, "attention": [{**rule, "policy": "force"}]}


def _streaming_keeps(p, j):
    """docs/spec.md, bidirectional streaming: key j is kept for a query at p."""
    return j < SINK or p < SINK or abs(p - j) < WINDOW


def _expected(q, k, v, mask, form_keeps=_streaming_keeps):
    """float64 attention: row i sits at p (the rule above); key j takes part iff the mask keeps it and
    ``form_keeps(p, j)``; additive mask values are added to the logits."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    keep_mask = mask if mask.dtype == torch.bool else mask > -1e4
    keep_mask = keep_mask.expand(b, h, sq, sk)
    out = torch.zeros(b, h, sq, D, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                kept = [j for j in range(sk) if keep_mask[bi, hi, i, j]]
                p = min(i + sk - sq, kept[-1]) if kept else i + sk - sq
                cols = [j for j in kept if form_keeps(p, j)]
                if not cols:
                    continue
                logits = (q[bi, hi, i].double() @ k[bi, hi, cols].double().T) / math.sqrt(D)
                if mask.dtype != torch.bool:
                    logits = logits + mask.expand(b, h, sq, sk)[bi, hi, i, cols].double()
                out[bi, hi, i] = torch.softmax(logits, -1) @ v[bi, hi, cols].double()
    return out


def _run(q, k, v, mask, spec=None):
    with torch.no_grad():
        out = sparsecc.compile(MaskedSdpa(), spec=spec or _streaming_spec(), kernels="reference")(q, k, v, mask)
    (site,) = sparsecc.last_report().sites
    return out, site


def _qkv(b, sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, H, sq, D, generator=g), torch.randn(b, H, sk, D, generator=g),
            torch.randn(b, H, sk, D, generator=g))


def _assert_rewritten(site):
    assert site.applied and "query positions from the mask" in site.reason
    assert any("streaming_attention_from_mask" in str(n.target) for g in rewritten_graphs() for n in g.graph.nodes)


def test_a_mask_that_keeps_every_key_changes_nothing(eager_lowering):
    q, k, v = _qkv(1, 3, 10)
    zero = torch.zeros(1, 1, 3, 10)
    out, site = _run(q, k, v, zero)
    _assert_rewritten(site)
    torch.testing.assert_close(out.double(), _expected(q, k, v, zero), atol=1e-5, rtol=1e-5)
    # and equals the same site without a mask (p = i + Sk - Sq, bidirectional)
    torch._dynamo.reset()
    with torch.no_grad():
        plain = sparsecc.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                 spec=_streaming_spec(), kernels="reference")(q, k, v)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=1e-5)


def test_static_cache_rows_sit_at_their_true_positions(eager_lowering):
    """Two new tokens at positions 5 and 6 of a 12-slot cache whose slots 7.. are not written yet."""
    q, k, v = _qkv(1, 2, 12, seed=1)
    pos = torch.tensor([5, 6])
    mask = (torch.arange(12)[None, :] <= pos[:, None])[None, None]
    out, site = _run(q, k, v, mask)
    _assert_rewritten(site)
    torch.testing.assert_close(out.double(), _expected(q, k, v, mask), atol=1e-5, rtol=1e-5)
    # the same as a cache holding exactly the 7 written tokens
    torch._dynamo.reset()
    short_mask = mask[..., :7]
    short, _ = _run(q, k[:, :, :7], v[:, :, :7], short_mask)
    torch.testing.assert_close(out, short, atol=1e-5, rtol=1e-5)


def test_a_sequence_does_not_depend_on_its_batch_mates_padding(eager_lowering):
    """Sequence 0 (9 tokens) decodes beside sequence 1, whose prompt was right-padded by 3; sequence 0's
    output is the same as when it decodes alone."""
    q, k, v = _qkv(2, 1, 10, seed=2)
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, :, :, 6:9] = False
    out, site = _run(q, k, v, keep)
    _assert_rewritten(site)
    torch.testing.assert_close(out.double(), _expected(q, k, v, keep), atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    alone, _ = _run(q[:1], k[:1], v[:1], keep[:1])
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)


def _expected_block_sparse(q, k, v, mask, block, local_blocks, global_blocks):
    """docs/spec.md, block_sparse: row i at p (the rule above) is in query block a = p // block; key j in block
    b = j // block is kept iff |a - b| < local_blocks or a < global_blocks or b < global_blocks, and the mask
    keeps it."""
    def keeps(p, j):
        a, b = p // block, j // block
        return abs(a - b) < local_blocks or a < global_blocks or b < global_blocks
    return _expected(q, k, v, mask, keeps)


def _dense_masked(q, k, v, keep):
    """float64 attention over the keys ``keep`` ([B, 1, Sq, Sk] bool) allows."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_block_sparse_rows_sit_at_their_mask_positions(kind, eager_lowering):
    """A static cache of 24 slots holding 11 tokens, two new ones at positions 9 and 10, block 4: the rows are
    in query block 2, not in the blocks of the buffer's end."""
    q, k, v = _qkv(1, 2, 24, seed=3)
    pos = torch.tensor([9, 10])
    keep = (torch.arange(24)[None, :] <= pos[:, None])[None, None]
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    form = {"form": "block_sparse", "block": 4, "local_blocks": 1, "global_blocks": 1}
    out, site = _run(q, k, v, mask, _streaming_spec(form))
    assert site.applied and "query positions from the mask" in site.reason, site.reason
    torch.testing.assert_close(out.double(), _expected_block_sparse(q, k, v, mask, 4, 1, 1), atol=1e-5, rtol=1e-5)


def test_block_sparse_neutral_mask_changes_nothing(eager_lowering):
    q, k, v = _qkv(2, 3, 22, seed=5)
    form = {"form": "block_sparse", "block": 4, "local_blocks": 2}
    out, site = _run(q, k, v, torch.zeros(1, 1, 3, 22), _streaming_spec(form))
    assert site.applied
    torch.testing.assert_close(out.double(), _expected_block_sparse(q, k, v, torch.zeros(1, 1, 3, 22), 4, 2, 0),
                               atol=1e-5, rtol=1e-5)


def test_dynamic_forms_run_a_static_cache_as_its_written_tokens(eager_lowering):
    """block_topk (one block of 16 kept, no sink, a band of one) over a 128-slot static cache holding 60 tokens, two
    new rows at 58 and 59: the unwritten tail is right padding (docs/spec.md), so the rows run the form exactly as
    over the 60 written tokens alone, not dense attention; a batch-mate whose mask hides keys 40 on does not change
    sequence 0, nor sequence 0 it."""
    form = {"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 1}
    q, k, v = _qkv(1, 2, 128, seed=6)
    pos = torch.tensor([58, 59])
    keep = (torch.arange(128)[None, :] <= pos[:, None])[None, None]
    out, site = _run(q, k, v, keep, _streaming_spec(form))
    assert site.applied
    torch._dynamo.reset()
    written, _ = _run(q, k[:, :, :60], v[:, :, :60], keep[..., :60], _streaming_spec(form))
    torch.testing.assert_close(out, written, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.double(), _dense_masked(q, k, v, keep), atol=1e-3)   # the form applies

    q, k, v = _qkv(2, 2, 128, seed=7)
    keep = torch.ones(2, 1, 2, 128, dtype=torch.bool)
    keep[1, ..., 40:] = False
    torch._dynamo.reset()
    out, site = _run(q, k, v, keep, _streaming_spec(form))
    assert site.applied
    torch._dynamo.reset()
    alone, _ = _run(q[:1], k[:1], v[:1], keep[:1], _streaming_spec(form))
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    mate, _ = _run(q[1:], k[1:], v[1:], keep[1:], _streaming_spec(form))
    torch.testing.assert_close(out[1:], mate, atol=1e-5, rtol=1e-5)
    # sequence 0 is not moved: the form applies (one 16-key block per query block, so not dense attention)
    assert not torch.allclose(out[:1].double(), _dense_masked(q[:1], k[:1], v[:1], keep[:1]), atol=1e-3)


def test_dynamic_forms_attend_densely_on_rows_the_mask_moves(eager_lowering):
    """The same cache, but row 0's mask keeps only keys up to 30: the rows are not the last tokens before the
    unwritten tail (row 0 would sit at 58), so the tail is not cut (docs/spec.md, "Right padding"); row 0's position
    is 30 and row 1's 59, both off i + Sk - Sq, so both attend to every key their mask keeps, and the report says
    so. With row 0 at 58 the same call runs the form (the test above)."""
    form = {"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 1}
    q, k, v = _qkv(1, 2, 128, seed=6)
    pos = torch.tensor([30, 59])
    keep = (torch.arange(128)[None, :] <= pos[:, None])[None, None]
    out, site = _run(q, k, v, keep, _streaming_spec(form))
    assert site.applied and "attend densely" in site.reason, site.reason
    torch.testing.assert_close(out.double(), _dense_masked(q, k, v, keep), atol=1e-5, rtol=1e-5)


def test_more_queries_than_keys_stay_dense(eager_lowering):
    q, k, v = _qkv(1, 6, 4, seed=4)
    mask = torch.zeros(1, 1, 6, 4)
    out, site = _run(q, k, v, mask)
    assert not site.applied and "more queries than keys" in site.reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_block_topk_rows_left_without_keys_output_zeros(eager_lowering):
    """block_topk keeps one block per query block and no band; the estimate (which ignores the mask) prefers key
    block 1, which the mask hides: every row is left with no key and outputs zeros, and the report says so. (The
    mask shows the first and the last key, so the keys it hides are neither left nor right padding, which
    docs/spec.md removes before the estimate.)"""
    q = torch.ones(1, H, 48, D)
    k = torch.cat([torch.full((1, H, 16, D), -2.0), torch.full((1, H, 16, D), 2.0),
                   torch.full((1, H, 16, D), -2.0)], dim=2)
    v = torch.randn(1, H, 48, D)
    keep = torch.ones(1, 1, 48, 48, dtype=torch.bool)
    keep[..., 16:32] = False
    form = {"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 0}
    out, site = _run(q, k, v, keep, _streaming_spec(form))
    assert site.applied and "outputs zeros" in site.reason, site.reason
    assert torch.equal(out, torch.zeros_like(out))


def test_dynamic_estimate_is_causal_per_batch_element(eager_lowering):
    """Chunked prefill (Sq < Sk) of a bidirectional site whose mask removes every later key for sequence 0 only:
    sequence 0's layout is chosen causally, and equals the layout it gets alone (not its batch-mate's choice)."""
    form = {"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 1}
    # 40 queries at positions 24..63: the first query block may not see key block 3 causally, so the causal and
    # the bidirectional estimates choose differently (checked below), which the batch-mate checks alone would miss.
    q, k, v = _qkv(2, 40, 64, seed=12)
    keep = torch.ones(2, 1, 40, 64, dtype=torch.bool)
    keep[0] = torch.arange(64)[None, :] <= (torch.arange(40) + 24)[:, None]     # causal for sequence 0
    out, site = _run(q, k, v, keep, _streaming_spec(form))
    assert site.applied
    torch._dynamo.reset()
    alone, _ = _run(q[:1], k[:1], v[:1], keep[:1], _streaming_spec(form))
    torch.testing.assert_close(out[:1], alone, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    other, _ = _run(q[1:], k[1:], v[1:], keep[1:], _streaming_spec(form))
    torch.testing.assert_close(out[1:], other, atol=1e-5, rtol=1e-5)
    # Sequence 0 against the float64 oracle's causal layout (tests/oracle, from docs/spec.md), which differs from
    # the layout a bidirectional estimate would choose: reading the mask as causal is what is checked here.
    from tests.oracle import oracle

    rule = dict(scale=D ** -0.5, block=16, topk=1, sink_blocks=0, local_blocks=1)
    causal_min, causal_max = oracle.block_topk_keep(q[:1], k[:1], causal=True, **rule)
    plain_min, plain_max = oracle.block_topk_keep(q[:1], k[:1], causal=False, **rule)
    assert torch.equal(causal_min, causal_max) and torch.equal(plain_min, plain_max)
    assert not torch.equal(causal_min, plain_min & keep[:1])
    expected, valid = oracle.attend(q[:1], k[:1], v[:1], causal_min, scale=D ** -0.5, mask=keep[:1])
    assert bool(valid.all())
    torch.testing.assert_close(out[:1].double(), expected, atol=1e-5, rtol=1e-5)
