"""How far can 64 x 64 block selection go at a quarter of the blocks? Exact-mass selection on SmolLM2 at 8K tokens.

    python bench/attention_oracle.py [--ctx 8192] [--budget 0.25] [--topk 15] [--json out.json]

An upper-bound experiment, not a sparsecc form: every attention call of SmolLM2-135M is replaced (a transformers
attention function) by attention restricted to 64 x 64 blocks chosen from the call's own **exact** attention
probabilities, which a real selector never has. A block's mass is the mean over its query rows of the probability
those rows put on its keys. Two selections, each at about ``--budget`` of the causal blocks:

* ``rows``: per head and query block, the diagonal block, block 0 and the ``--topk`` other blocks of largest mass
  (the row budget of the uniform ``block_topk`` rule with sink 1, local 1, top k: the same block density, with
  the exact masses instead of the mean-pooled estimate);
* ``global``: every diagonal block, and every other block whose mass reaches one threshold shared by all heads and
  layers, set from a dense pass so that the blocks kept are ``--budget`` of the causal blocks: the selection that
  spends the budget where the attention is, wherever that is;
* ``sampled``: as ``rows``, but each block's mass is estimated from ``--sample-rows`` query rows of its query block
  only (evenly spaced, the block's last row among them), with their exact probabilities: what an estimator that
  computes that share of the attention scores could know;
* ``sampled_global``: as ``global``, with the sampled estimate instead of the exact mass (its threshold set from
  the dense pass's sampled estimates).

Attention restricted to a block set is the exact softmax over the kept keys (the dense probabilities renormalised
over them). Evaluation: the first ``--ctx`` window of the pydoc topics (the held-out text of bench/quality_attention.py),
perplexity against dense. Block density as that bench counts it: kept blocks over causal blocks, averaged over heads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = 64
NAME = "sparsecc_block_oracle"


class Oracle:
    """The attention function's state: the selection, and what it saw (block masses, kept and causal counts)."""

    def __init__(self):
        self.mode = "dense"
        self.topk = 15
        self.tau = 0.0
        self.sample_rows = 4
        self.masses = []
        self.sampled_masses = []
        self.kept = 0
        self.causal = 0

    def select(self, mass: torch.Tensor) -> torch.Tensor:
        """Kept blocks ``[nb, nb]`` (bool) of one head from its block masses (causal blocks only)."""
        nb = mass.shape[0]
        causal = torch.ones(nb, nb, dtype=torch.bool).tril()
        diag = torch.eye(nb, dtype=torch.bool)
        if self.mode == "dense":
            return causal
        if self.mode in ("global", "sampled_global"):
            return diag | (causal & (mass >= self.tau))
        # rows and sampled: the row budget of block_topk (sink 1, local 1, top k)
        keep = diag.clone()
        keep[:, 0] = True
        ranked = mass.masked_fill(~causal | keep, float("-inf"))
        top = ranked.topk(min(self.topk, nb), dim=1)
        chosen = torch.zeros_like(keep)
        chosen.scatter_(1, top.indices, top.values > float("-inf"))   # rows with fewer candidates: -inf not chosen
        return (keep | chosen) & causal

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        b, h, s, d = query.shape
        rep = h // key.shape[1]
        scaling = d ** -0.5 if scaling is None else scaling
        nb = -(-s // BLOCK)
        pad = nb * BLOCK - s
        causal_tok = torch.ones(s, s, dtype=torch.bool, device=query.device).tril()
        out = torch.empty(b, s, h, d, dtype=query.dtype, device=query.device)
        rows = torch.full((nb,), BLOCK, dtype=torch.float32)   # query rows per block (the last may be short)
        rows[-1] = BLOCK - pad
        pick = torch.arange(BLOCK - 1, -1, -(BLOCK // self.sample_rows))   # the sampled rows of each block
        tri = torch.ones(nb, nb, dtype=torch.bool).tril(-1)
        wants_exact = self.mode in ("dense", "rows", "global")
        wants_sampled = self.mode in ("dense", "sampled", "sampled_global")
        for bi in range(b):
            for hi in range(h):
                q, k, v = query[bi, hi].float(), key[bi, hi // rep].float(), value[bi, hi // rep].float()
                p = ((q @ k.T) * scaling).masked_fill_(~causal_tok, float("-inf")).softmax(-1)
                blocks = torch.nn.functional.pad(p, (0, pad, 0, pad)).view(nb, BLOCK, nb, BLOCK)
                exact = blocks.sum(3).sum(1) / rows[:, None] if wants_exact else None
                sampled = blocks[:, pick].sum(3).mean(1) if wants_sampled else None
                if self.mode == "dense":
                    self.masses.append(exact[tri])
                    self.sampled_masses.append(sampled[tri])
                mass = exact if wants_exact else sampled
                keep = self.select(mass)
                self.kept += int(keep.sum())
                self.causal += nb * (nb + 1) // 2
                tok = keep.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:s, :s]
                p = p * tok
                p = p / p.sum(-1, keepdim=True)
                out[bi, :, hi] = (p @ v).to(out.dtype)
        return out, None


def main(argv=None) -> int:
    from transformers import AttentionInterface

    from sparsecc.tune.models import load_model
    from sparsecc.tune.quality import perplexity, read_texts, token_windows, tokenize

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--topk", type=int, default=15)
    p.add_argument("--modes", default="rows,global",
                   help="comma-separated, from rows, global, sampled, sampled_global")
    p.add_argument("--sample-rows", type=int, default=4, help="query rows per block the sampled estimate reads")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense", type=float, default=None,
                   help="the dense perplexity, known from an earlier run: skips the dense pass (not with global)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    model, tok = load_model("smollm2-135m")
    windows = token_windows(tokenize(tok, read_texts("pydoc")), args.ctx, 1)
    oracle = Oracle()
    AttentionInterface.register(NAME, oracle)
    model.set_attn_implementation(NAME)
    rows = []

    def run(mode):
        oracle.mode, oracle.kept, oracle.causal = mode, 0, 0
        value = perplexity(model, windows, progress=False).value
        density = oracle.kept / oracle.causal
        print(f"{mode:>6}: perplexity {value:.4f}, block density {density:.4f} [{time.time() - started:.0f} s]",
              flush=True)
        return value, density

    if args.dense is not None and not {"global", "sampled_global"} & set(args.modes.split(",")):
        dense = args.dense
    else:
        dense, _ = run("dense")
        masses = {"global": torch.cat(oracle.masses), "sampled_global": torch.cat(oracle.sampled_masses)}
        oracle.masses, oracle.sampled_masses = [], []
    for mode in args.modes.split(","):
        if mode in ("global", "sampled_global"):
            # Blocks beyond the diagonal that the budget leaves room for, over every head and layer.
            oracle.sample_rows = args.sample_rows
            nb = -(-args.ctx // BLOCK)
            heads = masses[mode].numel() // (nb * (nb - 1) // 2)
            room = int(args.budget * heads * nb * (nb + 1) // 2) - heads * nb
            oracle.tau = float(masses[mode].topk(room).values[-1])
        elif mode in ("rows", "sampled"):
            oracle.topk, oracle.sample_rows = args.topk, args.sample_rows
        else:
            p.error(f"--modes: {mode!r} is not one of rows, global, sampled, sampled_global")
        value, density = run(mode)
        rows.append({"mode": mode, "perplexity": value, "change": value / dense - 1, "block_density": density,
                     **({"tau": oracle.tau} if mode.endswith("global") else {"topk": args.topk}),
                     **({"sample_rows": args.sample_rows} if mode.startswith("sampled") else {})})
        print(f"{mode}: {100 * (value / dense - 1):+.2f}% against dense {dense:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"ctx": args.ctx, "budget": args.budget, "dense": dense,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
