"""Block density of a shared ``min_mass`` threshold, measured on calibration text, for choosing the threshold.

    python bench/attention_min_mass.py [--ctx 8192] [--rows 16] [--grid 0.001,...,0.01] [--calib-windows 1]
                                       [--text docstrings|pydoc]

``block_topk`` with ``min_mass`` keeps an input-dependent number of blocks, so its density is known only on text.
This runs SmolLM2-135M on ``--calib-windows`` windows of the standard library's docstrings (the calibration text of
``bench/quality_attention.py``; never the pydoc topics it evaluates on), every attention layer computing dense
attention for the next layer while the sampled-row estimate of each call (``pool = "rows"``, 64-blocks) is read, and
prints for each threshold of ``--grid`` the share of causal 64 x 64 blocks the rule would keep (sink block and
diagonal always, plus every block whose sampled mass reaches the threshold), over every layer, head and query block.
Pick the threshold from this table. ``--text pydoc`` counts on the held-out text instead (its first windows), to
see what a chosen threshold keeps there; never choose on it.
The tuner's ``sparsecc.tune.min_mass.calibrate_min_mass`` makes the same count through the recording graph, which
also records every threshold's attention recall per head (a full softmax per call and a block sum per threshold);
this script only counts blocks, which is what makes an 8K window cheap on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BLOCK = 64
DEFAULT_GRID = "0.001,0.0015,0.002,0.0025,0.003,0.004,0.005,0.006,0.008,0.01"


def main(argv=None):
    import sparsecc
    import sparsecc.codegen.dynamic_attention as dyn
    from sparsecc.codegen.block_attention import dense_attention_ref
    from sparsecc.tune.evalcli import load
    from sparsecc.tune.quality import read_texts, token_windows, tokenize

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--rows", type=int, default=16, help="sampled rows per 64-row query block")
    p.add_argument("--grid", default=DEFAULT_GRID, help="comma-separated min_mass thresholds")
    p.add_argument("--calib-windows", type=int, default=1)
    p.add_argument("--text", default="docstrings", choices=("docstrings", "pydoc"),
                   help="docstrings: spread over the calibration text; pydoc: the held-out text's first windows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    grid = [float(t) for t in args.grid.split(",")]
    model, tok = load("smollm2-135m")
    windows = token_windows(tokenize(tok, read_texts(args.text)), args.ctx)
    calib = ([windows[int(i * len(windows) / args.calib_windows)] for i in range(args.calib_windows)]
             if args.text == "docstrings" else windows[:args.calib_windows])
    kept = torch.zeros(len(grid), dtype=torch.float64)
    causal_blocks = [0.0]

    def read_estimate_then_attend_densely(q, k, v, *, form, causal, scale=None, mask=None):
        mass = dyn.sampled_row_scores_ref(q, k, block=BLOCK, rows=args.rows, causal=causal, scale=scale).exp()
        allowed, _ = dyn.block_masks(q.shape[2], k.shape[2], BLOCK, causal, q.device)
        a = torch.arange(allowed.shape[0])[:, None]
        b = torch.arange(allowed.shape[1])[None, :]
        always = allowed & ((b == 0) | (b == a))       # sink 1 and the diagonal (local 1) with Sq == Sk
        heads = q.shape[0] * q.shape[1]
        causal_blocks[0] += float(allowed.sum()) * heads
        for i, tau in enumerate(grid):
            kept[i] += float(always.sum()) * heads + float((allowed & ~always & (mass >= tau)).sum())
        return dense_attention_ref(q, k, v, scale=scale, causal=causal, mask=mask).to(q.dtype)

    dyn.dynamic_attention_ref = read_estimate_then_attend_densely
    spec = {"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": "model.layers.*.self_attn", "form": "block_topk", "block": BLOCK, "min_mass": grid[0],
         "pool": "rows", "rows": args.rows}]}
    compiled = sparsecc.compile(model, spec=spec, kernels="reference")
    with torch.no_grad():
        for w in calib:
            compiled(input_ids=w.ids[None], use_cache=False)
    density = {tau: float(kept[i] / causal_blocks[0]) for i, tau in enumerate(grid)}
    print(f"| min_mass | block density ({args.text}) |\n|---|---|")
    for tau, d in density.items():
        print(f"| {tau:g} | {d:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ctx": args.ctx, "rows": args.rows, "windows": args.calib_windows,
                                               "text": args.text,
                                               "density": density}, indent=1))


if __name__ == "__main__":
    main()
