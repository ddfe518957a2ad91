"""Does a low-rank correction of the dropped FFN inputs (R-Sparse's idea) pay on SmolLM2 at equal weight bytes?

    python bench/quality_lowrank.py [--spec bench/quality_lm/input_magnitude_40_tuned.toml] [--ranks 0,32,64,128]

Each FFN of the spec's input-mode thresholds runs as
``gate|up = W_gu x̃ + A_gu B_gu (x - x̃)`` and ``y = W_d h̃ + A_d B_d (h - h̃)``, where ``x̃`` / ``h̃`` keep the
entries above the spec's thresholds and ``A B`` is the rank-``r`` truncated SVD of the stacked ``[W_gate; W_up]``
(one factor pair: gate and up share their input's mask) and of ``W_down``. Rank 0 is the spec itself (through plain
PyTorch, as a check against ``sparsecc eval``'s figure). The forwards are patched in place with plain PyTorch: this
measures the idea, it is not a sparsecc form. Held-out text as ``bench/quality_lm.py``: the pydoc topics, two
windows of 2048 tokens. Printed per rank: perplexity, change against dense, and the factors' share of the FFN's
weight bytes, which a decode step reads on top of the kept rows (the effective sparsity is the spec's minus it).
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def patch(mlp, tau: dict, factors) -> None:
    """Replace ``mlp.forward`` by the thresholded FFN plus the low-rank correction (``factors`` None: none)."""
    n = mlp.gate_proj.weight.shape[0]

    def forward(x):
        xs = x * (x.abs() > tau["input"])
        gu = torch.cat([F.linear(xs, mlp.gate_proj.weight), F.linear(xs, mlp.up_proj.weight)], -1)
        if factors is not None:
            gu = gu + F.linear(F.linear(x - xs, factors[1]), factors[0])
        h = F.silu(gu[..., :n]) * gu[..., n:]
        hs = h * (h.abs() > tau["down"])
        y = F.linear(hs, mlp.down_proj.weight)
        if factors is not None:
            y = y + F.linear(F.linear(h - hs, factors[3]), factors[2])
        return y

    mlp.forward = forward


def truncated(weight: torch.Tensor, rank: int):
    """(A [out, r], B [r, in]) with A B the best rank-r approximation of ``weight`` (Frobenius)."""
    u, s, vt = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vt[:rank].float()


def main(argv=None) -> int:
    from sparsecc.tune.evalcli import load, windows_for
    from sparsecc.tune.quality import perplexity

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=str(ROOT / "bench/quality_lm/input_magnitude_40_tuned.toml"))
    p.add_argument("--ranks", default="0,32,64,128")
    args = p.parse_args(argv)
    model, tokenizer = load("smollm2-135m")
    windows, _ = windows_for(tokenizer, ["pydoc"], 2048, 2, None, 0)
    rules = tomllib.loads(Path(args.spec).read_text())["ffn"]
    taus = {int(rule["modules"].split(".")[2]): rule["threshold"] for rule in rules}
    layers = model.model.layers
    if set(taus) != set(range(len(layers))):
        raise SystemExit(f"{args.spec}: expected one input-mode rule per layer (model.layers.N.mlp)")
    ffn_weights = sum(m.weight.numel() for layer in layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj,
                                                                      layer.mlp.down_proj))
    dense = perplexity(model, windows, progress=False)
    dense_ppl = math.exp(dense.nll / dense.tokens)
    print(f"dense perplexity {dense_ppl:.4f}", flush=True)
    for rank in (int(r) for r in args.ranks.split(",")):
        extra = 0
        for i, layer in enumerate(layers):
            mlp = layer.mlp
            factors = None
            if rank:
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                factors = (*truncated(gate_up, rank), *truncated(mlp.down_proj.weight, rank))
                extra += sum(f.numel() for f in factors)
            patch(mlp, taus[i], factors)
        sparse = perplexity(model, windows, progress=False)
        ppl = math.exp(sparse.nll / sparse.tokens)
        print(f"rank {rank:4d}: perplexity {ppl:.4f} ({100 * (ppl / dense_ppl - 1):+.2f}%), factors "
              f"{100 * extra / ffn_weights:.2f}% of the FFN weights", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
