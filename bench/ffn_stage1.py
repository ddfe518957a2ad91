"""Input-mode FFN at decode sizes: stage-1 launch knobs against the default, timed in alternating rounds.

    python bench/ffn_stage1.py [--configs 128x128x8,256x64x8x1024,64x128x4s4] [--weighted-configs 64x128x4]
                               [--sparsities 0.5,0.7,0.9] [--dtypes float16,bfloat16] [--tokens 1] [--rounds 5]
                               [--json out.json]

Workload as bench/ffn_input.py (Llama-3-8B gated FFN, D 4096 -> F 14336 -> D, SiLU, ``--tokens`` random tokens,
thresholds at the given share of |x| and |h|). A config ``NxKxW`` is stage 1 with ``GemvConfig(BLOCK_N=N,
BLOCK_K=K, ROWS_PER_SPLIT=4096, num_warps=W)``, on tensor cores (``DOT=True``) for one token (2-16 tokens take the
``tl.dot`` union whatever the flag), with the default down GEMV; ``NxKxWxR`` splits D into R-channel
splits (merged by ticket in the same launch), so that wide N tiles still make enough programs; a suffix ``sS``
(``64x128x4s4``) sets S pipelining stages (3 otherwise). Columns:

* **default**: ``threshold_ffn`` with no knobs (``default_threshold_ffn_config``);
* **three-op**: one ``threshold_linear`` per projection with torch's ``silu * up`` between, the form the compiler
  plans where the fused op is not planned (``FUSED_FFN_MAX_TOKENS``, passes/ffn.py);
* each ``--configs`` entry with the magnitude criterion;
* **weighted**: the weighted criterion at its default, and each ``--weighted-configs`` entry with it (thresholds at
  the same share of the weighted scores, as bench/ffn_input.py sets them);
* **dense**: cuBLAS, for the ratio.

Every column is checked against the float32 oracle first (rel err < 1e-2). Each round times every column once
(CUDA-graph replay over the weight copies, graphs of 30 calls: ``bench_graph`` with 10 rounds, the GPU kept busy
while the host submits each replay unless ``--graph-submit-exposed``); the median over
``--rounds`` rounds is reported, so slow drift of the machine reaches every column alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear  # noqa: E402 - the repo's timing conventions
from ffn_input import (D_MODEL, dense_ffn, make_weights, oracle, quantile_abs, three_op_ffn,  # noqa: E402
                       weighted_thresholds)
from linear import bench_graph, rel_err  # noqa: E402
from provenance import source_version  # noqa: E402

from sparsecc.codegen.activation_sparse import MAX_DECODE_TOKENS, GemvConfig  # noqa: E402
from sparsecc.codegen.threshold_ffn import default_threshold_ffn_config, stage_one_block_m, threshold_ffn  # noqa: E402
from sparsecc.passes.ffn import column_norms  # noqa: E402


def parse_config(text: str, tokens: int = 1) -> GemvConfig:
    """``NxKxW`` -> stage 1 with BLOCK_N=N, BLOCK_K=K, W warps, D unsplit up to 4096, on tensor cores for one
    token (``tokens``; more take the ``tl.dot`` union, ``DOT`` unset);
    ``NxKxWxR``: the same over R-channel splits of D; either with a suffix ``sS``: S pipelining stages (Triton's
    ``num_stages``; 3 when not given).

    Raises ``ValueError`` naming the entry and the allowed form for anything else.
    """
    try:
        shape, suffix, stages = text.partition("s")
        fields = [int(v) for v in shape.split("x")]
        if len(fields) not in (3, 4):
            raise ValueError(f"{len(fields)} fields")
        n, k, w, rows = fields if len(fields) == 4 else fields + [4096]
        config = GemvConfig(BLOCK_N=n, BLOCK_K=k, ROWS_PER_SPLIT=rows, num_warps=w, DOT=tokens == 1,
                            STAGES=int(stages) if suffix else 3)
        stage_one_block_m(tokens, config)   # the op's own rule: refuses a tile tl.dot cannot take
        return config
    except ValueError as exc:
        raise ValueError(f"config {text!r} is not allowed: expected NxKxW or NxKxWxR with N, K and R powers of two, "
                         f"N and K at least 16, R a multiple of K (4096 when not given), W warps, optionally "
                         f"followed by sS, S >= 1 pipelining stages (e.g. 64x128x4, 256x64x8x1024, 64x128x4s4) "
                         f"({exc})") from None


def row(sparsity: float, dtype, weights, norms, configs, weighted_configs, rounds: int, gen, tokens: int = 1) -> dict:
    """Median us per call of every column at one (sparsity, dtype) for ``tokens`` tokens; ``norms`` maps id(weight
    set) to its (gate, up, down) column norms; ``configs`` and ``weighted_configs`` map a name to its stage-1
    knobs."""
    x = torch.randn(tokens, D_MODEL, device="cuda", dtype=dtype, generator=gen)
    wg, wu, wd = weights[0]
    h_dense = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    tau_in, tau_down = quantile_abs(x, sparsity), quantile_abs(h_dense, sparsity)
    tau_in_w, tau_down_w = weighted_thresholds(x, h_dense, norms[id(weights[0])], sparsity)
    ref = oracle(x, wg, wu, wd, tau_in, tau_down)
    ref_w = oracle(x, wg, wu, wd, tau_in_w, tau_down_w, norms[id(weights[0])])

    def magnitude(cfg):
        return lambda w: threshold_ffn(x, w[0], None, w[1], None, w[2], None, "silu", tau_in, tau_down, config=cfg)

    def weighted(cfg):
        return lambda w: threshold_ffn(x, w[0], None, w[1], None, w[2], None, "silu", tau_in_w, tau_down_w,
                                       config=cfg, scale_gate=norms[id(w)][0], scale_up=norms[id(w)][1],
                                       scale_down=norms[id(w)][2])

    columns = {"default": (magnitude(None), ref), "three-op": (lambda w: three_op_ffn(x, w, tau_in, tau_down), ref)}
    columns.update({f"stage1 {name}": (magnitude(cfg), ref) for name, cfg in configs.items()})
    columns["weighted default"] = (weighted(None), ref_w)
    columns.update({f"weighted stage1 {name}": (weighted(cfg), ref_w) for name, cfg in weighted_configs.items()})
    columns["dense"] = (lambda w: dense_ffn(x, w), None)
    for name, (fn, expected) in columns.items():
        if expected is not None:
            err = rel_err(fn(weights[0]).view(tokens, D_MODEL), expected)
            if not err < 1e-2:
                raise SystemExit(f"correctness check failed: {name} {sparsity:.0%} {dtype}: rel err {err}")
    times = {name: [] for name in columns}
    for _ in range(rounds):
        for name, (fn, _expected) in columns.items():
            times[name].append(1e3 * bench_graph([lambda w=w, fn=fn: fn(w) for w in weights]))
    return {"tokens": tokens, "sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""),
            "us": {name: statistics.median(v) for name, v in times.items()}}


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="128x128x8",
                    help="stage-1 knobs NxKxW[xR][sS], comma-separated (may be empty)")
    ap.add_argument("--weighted-configs", default="64x128x4", help="the same for the weighted criterion")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--tokens", type=int, default=1, help=f"tokens per call, 1-{MAX_DECODE_TOKENS}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the rows here")
    linear.add_graph_submit_option(ap)
    args = ap.parse_args(argv)
    linear.use_graph_submit_option(args)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} is not allowed; expected an integer >= 1")
    if not 1 <= args.tokens <= MAX_DECODE_TOKENS:
        ap.error(f"--tokens {args.tokens} is not allowed; expected an integer from 1 to {MAX_DECODE_TOKENS} "
                 "(more tokens run dense F.linear)")
    # Every argument is checked before any GPU work.
    try:
        configs = {c: parse_config(c, args.tokens) for c in args.configs.split(",") if c}
        weighted_configs = {c: parse_config(c, args.tokens) for c in args.weighted_configs.split(",") if c}
    except ValueError as exc:
        ap.error(str(exc))
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in ("float16", "bfloat16"):
            ap.error(f"--dtypes: {d!r} is not allowed; expected float16 or bfloat16")
    try:
        sparsities = [float(v) for v in args.sparsities.split(",") if v]
    except ValueError:
        ap.error(f"--sparsities {args.sparsities!r}: expected comma-separated numbers in (0, 1)")
    if not sparsities or not all(0 < s < 1 for s in sparsities):
        ap.error(f"--sparsities {args.sparsities!r}: expected comma-separated numbers in (0, 1)")
    linear.GRAPH_ROUNDS = 10
    header = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "commit": source_version(),
              "date": str(datetime.date.today()), "tokens": args.tokens,
              "default": str(default_threshold_ffn_config(args.tokens)),
              "weighted_default": str(default_threshold_ffn_config(args.tokens, weighted=True))}
    print("#", json.dumps(header), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in (getattr(torch, d) for d in dtypes):
        weights = make_weights(dtype, gen)
        norms = {id(w): tuple(column_norms(t) for t in w) for w in weights}   # as the compiler binds them
        for s in sparsities:
            rows.append(row(s, dtype, weights, norms, configs, weighted_configs, args.rounds, gen, args.tokens))
            print(json.dumps(rows[-1]), flush=True)
        del weights, norms
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**header, "rows": rows}, fh, indent=1)
    names = [n for n in rows[0]["us"] if n != "dense"]
    ratios = [n for n in names if not n.startswith("weighted")]
    print(f"\n{args.tokens} token(s) per call")
    print("\n| dtype | sparsity | dense us | " + " | ".join(f"{n} us" for n in names) + " | " +
          " | ".join(f"{n} x dense" for n in ratios) + " |")
    print("|" + "---|" * (3 + len(names) + len(ratios)))
    for r in rows:
        us = r["us"]
        print(f"| {r['dtype']} | {r['sparsity']:.0%} | {us['dense']:.1f} | " +
              " | ".join(f"{us[n]:.2f}" for n in names) + " | " +
              " | ".join(f"{us['dense'] / us[n]:.2f}" for n in ratios) + " |")


if __name__ == "__main__":
    main()
