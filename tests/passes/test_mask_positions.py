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


def _expected(q, k, v, mask):
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
                cols = [j for j in kept if j < SINK or p < SINK or abs(p - j) < WINDOW]
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


@pytest.mark.parametrize("form", [{"form": "block_sparse", "block": 4},
                                  {"form": "block_topk", "block": 16, "topk": 1}], ids=["block_sparse", "block_topk"])
def test_block_layouts_stay_dense_where_positions_come_from_the_mask(form, eager_lowering):
    q, k, v = _qkv(1, 2, 32, seed=3)
    mask = torch.zeros(1, 1, 2, 32)
    out, site = _run(q, k, v, mask, _streaming_spec(form))
    assert not site.applied and "only streaming implements that rule" in site.reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_more_queries_than_keys_stay_dense(eager_lowering):
    q, k, v = _qkv(1, 6, 4, seed=4)
    mask = torch.zeros(1, 1, 6, 4)
    out, site = _run(q, k, v, mask)
    assert not site.applied and "more queries than keys" in site.reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
