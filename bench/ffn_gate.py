"""Decode FFN in gate mode (CATS): ``gate_sparse_ffn`` against dense, with its two stages timed apart.

    python bench/ffn_gate.py [--tokens 1] [--sparsities 0.5,0.7,0.9] [--dtypes float16,bfloat16] [--sweep [reduce]]
                             [--json out.json]

Workload: one Llama-3-8B gated FFN, D 4096 -> F 14336 -> D (SiLU, no biases), laid out as the compiler binds it for
this op: gate and up row-major ``[F, D]`` (a neuron's row contiguous), down K-major (``Wdᵀ`` contiguous). The input x
[M, D] is random normal; ``tau`` drops the ``sparsity`` share of |silu(x Wgᵀ)|, as a calibrated threshold would.
Columns, all timed in one run:

* **dense**: ``F.linear`` (cuBLAS) gate, up, ``silu(gate) * up``, down;
* **gate**: ``gate_sparse_ffn`` (codegen/gate_sparse_ffn.py), the whole op, at its default knobs;
* **stage 1** / **down**: its gate + up kernel alone, launched as the op launches it (``_stage1``), and the down
  GEMV alone on a precomputed g.

The op is checked against a float32 oracle written from docs/spec.md's gate-mode rule (explicit keep mask, the
model's roundings) before it is timed (rel err < 1e-2). Timing: CUDA-graph replay over ``COPIES`` weight sets
(``bench/linear.py``'s ``bench_graph``, the GPU kept busy while the host submits each replay;
``--graph-submit-exposed`` times from an idle GPU as before), median per call. "ideal" = dense bytes / the bytes gate mode must read (the
whole gate, the kept up rows and kept down rows); "TB/s" = those bytes / gate time. ``--sweep`` also times launch
knobs of both stages at one token, 50% and 90%, float16; ``--sweep reduce`` times stage 1 with per-chunk sums
(``GateConfig.REDUCE_CHUNKS``) instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ffn_input import commit, make_weights, quantile_abs, write_json  # noqa: E402
import linear  # noqa: E402 - the repo's timing conventions
from linear import bench_graph, rel_err  # noqa: E402

from sparsecc.codegen import gate_sparse_ffn as gate_module  # noqa: E402
from sparsecc.codegen.activation_sparse import GemvConfig, threshold_linear  # noqa: E402

D_MODEL, D_FF = 4096, 14336


def oracle(x, wg, wu, wd, tau):
    """float32 gate-mode FFN with the model's roundings and an explicit keep mask on |act(x Wgᵀ)|."""
    dtype = x.dtype
    a = F.silu((x.float() @ wg.float().T).to(dtype).float()).to(dtype).float()
    keep = a.abs() > float(torch.tensor(tau, dtype=dtype))
    up = (x.float() @ wu.float().T).to(dtype).float()
    h = torch.where(keep, (a * up).to(dtype).float(), torch.zeros_like(a))
    return h @ wd.float().T


def _stage1(x, wg, wu, tau, cfg):
    """The gate + up kernel alone (what ``gate_sparse_ffn`` launches before the down GEMV): returns g."""
    gate_module._bind()
    m, d = x.shape
    g = torch.empty(m, D_FF, dtype=x.dtype, device=x.device)
    gate_module.launcher(gate_module._gate_up_kernel, x)[(-(-D_FF // cfg.BLOCK_F),)](
        x, wg, g, wu, g, g, x, 0, m, D_FF, d, gate_module.round_to_dtype(tau, x.dtype),
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
        BLOCK_M=1 if m == 1 else 16, BLOCK_F=cfg.BLOCK_F, BLOCK_D=cfg.BLOCK_D, HAS_BG=False, GATED=True,
        HAS_BU=False, ACTIVATION="silu", DOT_IN_FP32=x.dtype == torch.float32, ROUND_BY_BITS=False,
        REDUCE_CHUNKS=cfg.REDUCE_CHUNKS, ZERO_BLOCK=0, num_warps=cfg.num_warps)
    return g


def row(m: int, sparsity: float, dtype, weights, gen, sweep: Optional[str] = None) -> dict:
    x = torch.randn(m, D_MODEL, device="cuda", dtype=dtype, generator=gen)
    wg, wu, wd = weights[0]
    tau = quantile_abs(F.silu(F.linear(x, wg)), sparsity)
    ref = oracle(x, wg, wu, wd, tau)
    a = F.silu(F.linear(x, wg))
    kept = (a.float().abs() > float(torch.tensor(tau, dtype=dtype))).any(0).float().mean().item()
    elem = torch.finfo(dtype).bits // 8
    dense_bytes = elem * 3 * D_FF * D_MODEL
    sparse_bytes = elem * D_FF * D_MODEL * (1 + 2 * kept)
    cfg1 = gate_module.DEFAULT_GATE_CONFIG if m == 1 else gate_module.DEFAULT_GATE_CONFIG_TOKENS
    gs = [_stage1(x, w[0], w[1], tau, cfg1) for w in weights]

    def dense(w):
        g, u, d = w
        return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)

    def gate(w, cfg=None, down=None):
        g, u, d = w
        return gate_module.gate_sparse_ffn(x, g, None, u, None, d, None, "silu", tau, config=cfg, down_config=down)

    out = {"tokens": m, "sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""), "kept": kept,
           "ideal": dense_bytes / sparse_bytes}
    err = rel_err(gate(weights[0]).view(m, D_MODEL), ref)
    if not err < 1e-2:
        raise SystemExit(f"correctness check failed: gate M={m} {sparsity:.0%} {dtype}: rel err {err}")
    out["gate_err"] = err
    out["dense_ms"] = bench_graph([lambda w=w: dense(w) for w in weights])
    out["gate_ms"] = bench_graph([lambda w=w: gate(w) for w in weights])
    out["stage1_ms"] = bench_graph([lambda w=w: _stage1(x, w[0], w[1], tau, cfg1) for w in weights])
    out["down_ms"] = bench_graph([lambda w=w, g=g: threshold_linear(g, w[2], None, 0.0) for w, g in zip(weights, gs)])
    out["tb_s"] = sparse_bytes / (out["gate_ms"] * 1e-3) / 1e12
    if sweep:
        results = []
        shapes = [gate_module.GateConfig(BLOCK_F=f, BLOCK_D=d, num_warps=w)
                  for f in (16, 32, 64) for d in (256, 512, 1024) for w in (2, 4, 8) if f * d <= 32768]
        if sweep == "reduce":   # per-chunk sums: a [BLOCK_F] accumulator leaves registers for more programs per SM
            shapes = [gate_module.GateConfig(BLOCK_F=f, BLOCK_D=d, num_warps=w, REDUCE_CHUNKS=True)
                      for f in (1, 2, 4, 8, 16) for d in (1024, 2048, 4096) for w in (1, 2, 4, 8)
                      if 2048 <= f * d <= 32768]
        for cfg in shapes:
            try:
                g_cfg = _stage1(x, wg, wu, tau, cfg)   # checked through the down GEMV before it is timed
                cfg_err = rel_err(threshold_linear(g_cfg, wd, None, 0.0).view(m, D_MODEL), ref)
                if not cfg_err < 1e-2:
                    raise ValueError(f"wrong result (rel err {cfg_err:.2e})")
                ms = bench_graph([lambda w=w: _stage1(x, w[0], w[1], tau, cfg) for w in weights])
            except Exception as exc:   # a launch shape the compiler refuses: record it, keep sweeping
                ms = float("nan")
                print(f"  sweep {cfg}: {type(exc).__name__}: {str(exc)[:80]}")
            results.append({"stage1": str(cfg), "ms": ms})
        downs = []
        down_shapes = [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=w)
                       for bn in (64, 128) for bk in (64, 128) for r in (1024, 2048, 4096) for w in (4, 8)]
        for dcfg in down_shapes if sweep == "shapes" else []:
            try:
                ms = bench_graph([lambda w=w, g=g: threshold_linear(g, w[2], None, 0.0, config=dcfg)
                                  for w, g in zip(weights, gs)])
            except Exception as exc:
                ms = float("nan")
                print(f"  sweep {dcfg}: {type(exc).__name__}: {str(exc)[:80]}")
            downs.append({"down": str(dcfg), "ms": ms})
        key = lambda r: (r["ms"] != r["ms"], r["ms"])   # noqa: E731 - NaN last
        out["sweep_stage1"] = sorted(results, key=key)[:8]
        out["sweep_down"] = sorted(downs, key=key)[:8]
    return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--sweep", nargs="?", const="shapes", choices=("shapes", "reduce"),
                    help="also time launch knobs at one token, 50%% and 90%%, fp16: 'shapes' (the default) both "
                         "stages' tile shapes, 'reduce' stage 1 with per-chunk sums (REDUCE_CHUNKS)")
    ap.add_argument("--json", help="write the rows here")
    linear.add_graph_submit_option(ap)
    args = ap.parse_args(argv)
    submission = linear.use_graph_submit_option(args)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}, {datetime.date.today()}, commit {commit()}, graph {submission}",
          flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        weights = make_weights(dtype, gen, gate_up_k_major=False)
        for m in (int(t) for t in args.tokens.split(",")):
            for s in (float(v) for v in args.sparsities.split(",")):
                sweep = args.sweep if m == 1 and s in (0.5, 0.9) and dtype == torch.float16 else None
                r = row(m, s, dtype, weights, gen, sweep)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if not k.startswith("sweep")}), flush=True)
                for k in ("sweep_stage1", "sweep_down"):
                    for entry in r.get(k, []):
                        print("  ", k, json.dumps(entry), flush=True)
        del weights
        torch.cuda.empty_cache()
    write_json(args.json, rows)
    print("\n| dtype | M | sparsity | kept | dense us | gate us | stage 1 us | down us | gate x dense | ideal | TB/s |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['tokens']} | {r['sparsity']:.0%} | {r['kept']:.2f} | {1e3 * r['dense_ms']:.1f} | "
              f"{1e3 * r['gate_ms']:.1f} | {1e3 * r['stage1_ms']:.1f} | {1e3 * r['down_ms']:.1f} | "
              f"**{r['dense_ms'] / r['gate_ms']:.2f}** | {r['ideal']:.2f} | {r['tb_s']:.2f} |")
    print("\n" + linear.graph_submit_summary())

if __name__ == "__main__":
    main()
