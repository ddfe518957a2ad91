"""bench/attention_oracle.py: the block selections and the restricted attention its upper bound rests on.

Expected values are written out by hand: which blocks each rule keeps, and attention over a block set as a float64
masked softmax.
"""

import os
import sys

import torch

from tests.interpreter import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))


def _oracle(mode, **knobs):
    import attention_oracle
    oracle = attention_oracle.Oracle()
    oracle.mode = mode
    for name, value in knobs.items():
        setattr(oracle, name, value)
    return oracle


def test_rows_keep_sink_diagonal_and_the_top_blocks():
    mass = torch.tensor([[1.0, 0, 0, 0, 0],
                         [0.2, 0.8, 0, 0, 0],
                         [0.1, 0.6, 0.3, 0, 0],
                         [0.1, 0.2, 0.5, 0.2, 0],
                         [0.05, 0.1, 0.3, 0.4, 0.15]])
    keep = _oracle("rows", topk=1).select(mass)
    expected = torch.tensor([[1, 0, 0, 0, 0],      # row 0: sink = diagonal, nothing else causal
                             [1, 1, 0, 0, 0],      # row 1: sink and diagonal, no other candidate
                             [1, 1, 1, 0, 0],      # row 2: block 1 is the only other candidate
                             [1, 0, 1, 1, 0],      # row 3: block 2 (0.5) beats block 1 (0.2)
                             [1, 0, 0, 1, 1]], dtype=torch.bool)   # row 4: block 3 (0.4)
    assert torch.equal(keep, expected)


def test_global_keeps_the_diagonal_and_blocks_above_the_threshold():
    mass = torch.tensor([[1.0, 0, 0], [0.7, 0.3, 0], [0.05, 0.5, 0.45]])
    keep = _oracle("global", tau=0.4).select(mass)
    assert torch.equal(keep, torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool))


def test_attention_over_kept_blocks_is_the_masked_softmax():
    """Dense mode equals causal attention; rows mode equals a float64 softmax over the kept blocks' keys."""
    import attention_oracle
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, s, d = 1, 4, 2, 200, 16   # 4 blocks of 64, the last one partial
    q, k, v = (torch.randn(b, n, s, d, generator=gen) for n in (h, hkv, hkv))
    scale = d ** -0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for mode in ("dense", "rows"):
        oracle = _oracle(mode, topk=1)
        out, _ = oracle(None, q, k, v, None, scaling=scale)
        for hi in range(h):
            qd, kd, vd = q[0, hi].double(), k[0, hi // 2].double(), v[0, hi // 2].double()
            p = ((qd @ kd.T) * scale).masked_fill(~causal, float("-inf")).softmax(-1)
            if mode == "rows":
                nb = 4
                padded = torch.nn.functional.pad(p, (0, nb * 64 - s, 0, nb * 64 - s))
                rows = torch.tensor([64.0, 64, 64, s - 192], dtype=torch.float64)
                mass = padded.view(nb, 64, nb, 64).sum(3).sum(1) / rows[:, None]
                keep = torch.zeros(nb, nb, dtype=torch.bool)
                for a in range(nb):
                    keep[a, 0] = keep[a, a] = True
                    others = [(float(mass[a, j]), -j) for j in range(1, a)]
                    if others:
                        keep[a, -max(others)[1]] = True
                tok = keep.repeat_interleave(64, 0).repeat_interleave(64, 1)[:s, :s]
                p = ((qd @ kd.T) * scale).masked_fill(~(causal & tok), float("-inf")).softmax(-1)
            torch.testing.assert_close(out[0, :, hi].double(), p @ vd, atol=1e-5, rtol=1e-5)
        if mode == "rows":
            assert oracle.kept < oracle.causal   # the selection dropped blocks: the comparison is not vacuous
        assert oracle.causal == h * 10
    assert attention_oracle.BLOCK == 64
