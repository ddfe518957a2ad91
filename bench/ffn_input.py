"""Decode FFN in input mode (TEAL): the fused op against its two-launch form, the three-op form, TEAL's kernels, dense.

    python bench/ffn_input.py [--tokens 1,2,4,8,16] [--sparsities 0.5,0.7,0.9] [--dtypes float16,bfloat16]
                              [--teal .carry/teal/sparse_gemv.py] [--sweep] [--sweep-one-launch] [--json out.json]

Workload: one Llama-3-8B gated FFN, D 4096 -> F 14336 -> D (SiLU, no biases). The input x [M, D] is random
normal; ``tau_input`` drops the ``sparsity`` share of |x| and ``tau_down`` the same share of |h| (h of the dense
FFN on those tokens), as calibrated thresholds would on this distribution. Columns, all timed in one run:

* **dense**: ``F.linear`` (cuBLAS) gate, up, ``silu(gate) * up``, down;
* **three-op**: ``threshold_linear`` on gate, up and down with torch's ``silu * up`` between (what a site
  compiled before the fused op launched: 5 kernels);
* **fused**: ``threshold_ffn`` (codegen/threshold_ffn.py) as the compiler calls it: gate + up + act in one launch,
  the down GEMV and its split merge in a second, or for one token where ``ONE_LAUNCH_BY_DEFAULT`` is set the
  whole FFN in one launch;
* **one-launch** and **two-launch** (one token): the same op with ``one_launch=True`` (the down GEMV's programs
  wait on their f tiles in the same launch) and ``one_launch=False``;
* **weighted**: the same op with the weighted criterion (``|x_i| * ||W[:, i]||_2 > tau``, each projection's own
  column norms; docs/spec.md), its thresholds at the same share of the weighted scores (gate and up scores
  pooled for the shared input threshold, as ``sparsecc.calibrate`` pools them);
* **TEAL**: TEAL's published Triton GEMV (``splitk_sparse_gemv`` of ``kernels/sparse_gemv.py``, FasterDecoding/TEAL)
  on gate, up and down with torch's ``silu * up`` between, as TEAL's gpt-fast FFN calls it (commit 5baaec8); float16 and one token
  only (the kernel writes float16 and serves batch size 1). Optional: pass the file with ``--teal`` (it is
  never part of sparsecc: fetch it from the public repository into an ignored folder such as ``.carry/``); the
  part of the file before its torch.compile wrappers is loaded. Without it the column reads "-".

sparsecc's columns are checked against a float32 oracle before they are timed (rel err < 1e-2); TEAL's error is
recorded, not checked: its kernel adds K-split partials into the float16 output with atomics (rel err 0.01-0.2 in
the first run, growing with sparsity). Timing: CUDA-graph replay
over ``COPIES`` weight sets (``bench/linear.py``'s ``bench_graph``; 3 x 35 MB of kept rows at 90% is beyond the
60 MB L2), median per call (``--graph-rounds R``: each graph holds R passes over the copies). The GPU is kept busy
while the host submits each timed replay (``bench_graph``'s ``GRAPH_SUBMIT_HIDDEN``), as in a model's decode step
and in the attention and decode benches; ``--graph-submit-exposed`` times as before that, from an idle GPU, which
charges each of the 3R calls a 3R-th of the submission (about 15 us per replay on an H100). "TB/s" = the weight bytes the sparse form
must read (kept gate and up rows, kept down rows) / fused time. ``--sweep`` also times launch knobs of both stages
at the ``SWEPT`` rows, ``--sweep-one-launch`` the one-launch kernel's (``one_launch_pairs``) at the one-token ones.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import source_version  # noqa: E402 - bench/ is on the path
import linear  # noqa: E402 - the repo's timing conventions
from linear import bench_graph, rel_err  # noqa: E402

from sparsecc.codegen.activation_sparse import GemvConfig, default_gemv_config, threshold_linear  # noqa: E402
from sparsecc.codegen.threshold_ffn import threshold_ffn  # noqa: E402
from sparsecc.passes.ffn import column_norms  # noqa: E402

D_MODEL, D_FF = 4096, 14336
COPIES = 3
TEAL_MARKER = "from compile_wrapper import BaseKernel"   # where the torch.compile wrappers begin


def load_teal(path: Optional[str]):
    """TEAL's ``splitk_sparse_gemv`` from ``path`` (its kernels/sparse_gemv.py), or None when not given/found."""
    if not path or not os.path.exists(path):
        return None
    source = open(path).read()
    source = source.split(TEAL_MARKER)[0]   # the kernels only: the wrappers below need TEAL's other files
    spec = importlib.util.spec_from_loader("teal_sparse_gemv", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__file__ = path   # Triton reads a kernel's source through its module's file
    exec(compile(source, path, "exec"), module.__dict__)
    return module.splitk_sparse_gemv


def quantile_abs(t: torch.Tensor, q: float) -> float:
    return float(torch.quantile(t.float().abs().flatten()[: 2 ** 24], q))


def make_weights(dtype, gen, gate_up_k_major: bool = True):
    """COPIES sets of (gate, up, down) as [out, in] tensors laid out as the compiler binds them.

    Down is always a view of a K-major buffer; gate and up too for input mode (``gate_up_k_major``), row-major
    for gate mode (a neuron's row contiguous).
    """
    sets = []
    for _ in range(COPIES):
        wg = torch.randn(D_FF, D_MODEL, device="cuda", dtype=dtype, generator=gen) / D_MODEL ** 0.5
        wu = torch.randn(D_FF, D_MODEL, device="cuda", dtype=dtype, generator=gen) / D_MODEL ** 0.5
        wd = torch.randn(D_MODEL, D_FF, device="cuda", dtype=dtype, generator=gen) / D_FF ** 0.5
        if gate_up_k_major:
            wg, wu = wg.t().contiguous().t(), wu.t().contiguous().t()
        sets.append((wg, wu, wd.t().contiguous().t()))
    return sets


def write_json(path: Optional[str], rows: list) -> None:
    """The rows with the device, versions, commit and date, to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
                       "graph_rounds": linear.GRAPH_ROUNDS, "graph_submit_hidden": linear.GRAPH_SUBMIT_HIDDEN,
                       "graph_submit_max_us": 1e6 * linear.graph_submit_max_s,
                       "date": str(datetime.date.today()), "rows": rows}, fh, indent=1)


def oracle(x, wg, wu, wd, tau_in, tau_down, norms=None):
    """float32 FFN with the model's roundings (linear outputs, activation, product) and explicit keep masks.

    ``norms`` None: the magnitude criterion (|v| against tau in x's dtype, as torch compares); else the weighted
    criterion with these (gate, up, down) column norms (|v_i| * ||W[:, i]||_2 against tau, in float32).
    """
    dtype = x.dtype
    sg, su, sd = norms if norms is not None else (None, None, None)

    def kept(v, tau, scale):
        keep = v.abs() > float(torch.tensor(tau, dtype=dtype)) if scale is None else v.abs() * scale > tau
        return v * keep

    gate = (kept(x.float(), tau_in, sg) @ wg.float().T).to(dtype).float()
    up = (kept(x.float(), tau_in, su) @ wu.float().T).to(dtype).float()
    h = (F.silu(gate).to(dtype).float() * up).to(dtype).float()
    return kept(h, tau_down, sd) @ wd.float().T


def dense_ffn(x, w):
    """The dense FFN (cuBLAS) on x with the weight set ``w`` = (gate, up, down): the anchor."""
    g, u, d = w
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def three_op_ffn(x, w, tau_in, tau_down, norms=None):
    """The FFN as one ``threshold_linear`` per projection with torch's ``silu * up`` between (what the compiler
    plans where the fused op is not); ``norms`` the (gate, up, down) column norms of the weighted criterion."""
    g, u, d = w
    s_g, s_u, s_d = norms if norms is not None else (None, None, None)
    hidden = F.silu(threshold_linear(x, g, None, tau_in, channel_scale=s_g)) * \
        threshold_linear(x, u, None, tau_in, channel_scale=s_u)
    return threshold_linear(hidden, d, None, tau_down, channel_scale=s_d)


def weighted_thresholds(x, h_dense, norms, sparsity: float):
    """``(tau_input, tau_down)`` of the weighted criterion dropping the ``sparsity`` share of the weighted scores
    (``norms`` the (gate, up, down) column norms; the gate and up scores pooled for the shared input threshold, as
    ``sparsecc.calibrate`` pools them)."""
    sg, su, sd = norms
    xa = x.float().abs()
    tau_input = float(torch.quantile(torch.cat([xa * sg, xa * su]).flatten(), sparsity))
    tau_down = float(torch.quantile((h_dense.float().abs() * sd).flatten()[: 2 ** 24], sparsity))
    return tau_input, tau_down


def row(m: int, sparsity: float, dtype, weights, norms, teal, gen, configs=None, pairs=None) -> dict:
    """One (tokens, sparsity, dtype) row; ``norms`` maps id(weight set) to its (gate, up, down) column norms."""
    x = torch.randn(m, D_MODEL, device="cuda", dtype=dtype, generator=gen)
    wg, wu, wd = weights[0]
    tau_in = quantile_abs(x, sparsity)
    h_dense = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    tau_down = quantile_abs(h_dense, sparsity)
    ref = oracle(x, wg, wu, wd, tau_in, tau_down)
    keep_x = (x.float().abs() > float(torch.tensor(tau_in, dtype=dtype))).any(0).float().mean().item()
    keep_h = (h_dense.float().abs() > float(torch.tensor(tau_down, dtype=dtype))).any(0).float().mean().item()
    elem = torch.finfo(dtype).bits // 8
    kept_bytes = elem * (2 * D_FF * D_MODEL * keep_x + D_MODEL * D_FF * keep_h)

    def dense(w):
        return dense_ffn(x, w)

    def three_op(w):
        return three_op_ffn(x, w, tau_in, tau_down)

    def fused(w, cfg=None, down=None, one_launch=None):
        g, u, d = w
        return threshold_ffn(x, g, None, u, None, d, None, "silu", tau_in, tau_down, config=cfg, down_config=down,
                             one_launch=one_launch)

    # The weighted criterion: thresholds at the same share of the weighted scores.
    sg, su, sd = norms[id(weights[0])]
    tau_in_w, tau_down_w = weighted_thresholds(x, h_dense, (sg, su, sd), sparsity)
    xa = x.float().abs()
    h_dense_w = h_dense.float().abs() * sd
    ref_w = oracle(x, wg, wu, wd, tau_in_w, tau_down_w, (sg, su, sd))
    kept_w = elem * D_FF * D_MODEL * ((xa * sg > tau_in_w).any(0).float().mean().item() +
                                      (xa * su > tau_in_w).any(0).float().mean().item() +
                                      (h_dense_w > tau_down_w).any(0).float().mean().item())

    def weighted(w):
        g, u, d = w
        s_g, s_u, s_d = norms[id(w)]
        return threshold_ffn(x, g, None, u, None, d, None, "silu", tau_in_w, tau_down_w, scale_gate=s_g,
                             scale_up=s_u, scale_down=s_d)

    def weighted_three_op(w):
        return three_op_ffn(x, w, tau_in_w, tau_down_w, norms[id(w)])

    methods = {"dense": dense, "three_op": three_op, "fused": fused, "weighted": weighted,
               "weighted_three_op": weighted_three_op}
    oracles = {"weighted": ref_w, "weighted_three_op": ref_w}
    if m == 1:   # the fused op's two forms for one token, whichever the default is
        methods["one_launch"] = lambda w: fused(w, one_launch=True)
        methods["two_launch"] = lambda w: fused(w, one_launch=False)
    if teal is not None and dtype == torch.float16 and m == 1:
        bin_ = round(10 * sparsity)   # the autotuning key TEAL gives its sparsity level
        def teal_ffn(w):
            g, u, d = w
            x3 = x.view(1, 1, D_MODEL)
            hh = F.silu(teal(x3, g, tau_in, bin_)) * teal(x3, u, tau_in, bin_)
            return teal(hh, d, tau_down, bin_).view(1, D_MODEL)
        methods["teal"] = teal_ffn
    out = {"tokens": m, "sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""), "kept_x": keep_x,
           "kept_h": keep_h, "kept_mb": kept_bytes / 1e6}
    for name, fn in methods.items():
        err = rel_err(fn(weights[0]).view(m, D_MODEL), oracles.get(name, ref))
        # dense ignores the thresholds: its error is the sparsity's own effect, reported, not checked. TEAL's
        # kernel adds its K-split partials into the float16 output with atomics: its error is recorded only.
        if name in ("three_op", "fused", "weighted", "weighted_three_op", "one_launch", "two_launch") and \
                not err < 1e-2:
            raise SystemExit(f"correctness check failed: {name} M={m} {sparsity:.0%} {dtype}: rel err {err}")
        out[f"{name}_err"] = err
        out[f"{name}_ms"] = bench_graph([lambda w=w, fn=fn: fn(w) for w in weights])
    out["tb_s"] = kept_bytes / (out["fused_ms"] * 1e-3) / 1e12
    out["weighted_kept_mb"] = kept_w / 1e6
    out["weighted_tb_s"] = kept_w / (out["weighted_ms"] * 1e-3) / 1e12

    def time_config(cfg, down, one_launch=None):
        try:
            err = rel_err(fused(weights[0], cfg, down, one_launch), ref)
            ms = bench_graph([lambda w=w: fused(w, cfg, down, one_launch) for w in weights]) if err < 1e-2 \
                else float("nan")
        except Exception as exc:   # a launch shape the compiler refuses: record it, keep sweeping
            err, ms = float("nan"), float("nan")
            print(f"  sweep {cfg} / {down}: {type(exc).__name__}: {str(exc)[:80]}")
        return {"stage1": str(cfg), "down": str(down), "ms": ms, "err": err, "cfg": cfg, "down_cfg": down}

    by_time = lambda r: (r["ms"] != r["ms"], r["ms"])   # noqa: E731 - NaN last
    if pairs:   # (stage 1, down) knobs of the one-launch kernel
        timed = sorted((time_config(c, d, True) for c, d in pairs), key=by_time)
        out["one_launch_sweep"] = [{k: v for k, v in r.items() if k not in ("cfg", "down_cfg")} for r in timed]
    if configs:
        first = sorted((time_config(c, default_gemv_config(m)) for c in configs[0]), key=by_time)
        best = first[0]["cfg"]
        second = sorted((time_config(best, d) for d in configs[1]), key=by_time)
        out["sweep"] = [{k: v for k, v in r.items() if k not in ("cfg", "down_cfg")} for r in first + second]
        out["best"] = {k: v for k, v in second[0].items() if k not in ("cfg", "down_cfg")}
    return out


def sweep_configs():
    """Launch knobs to time: stage 1 shapes (with the default down stage), then down shapes (with the best stage
    1); compacted and predicated."""
    shapes = [(bn, bk) for bn in (64, 128, 256) for bk in (32, 64, 128) if bn * bk <= 16384]
    stage1 = [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=w)
              for bn, bk in shapes for r in (1024, 2048, 4096) for w in (4, 8)]
    stage1 += [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=4, COMPACT=False)
               for bn, bk in shapes for r in (2048, 4096)]
    down = [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=w)
            for bn, bk in shapes for r in (1024, 2048) for w in (4, 8)]
    down += [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=2048, num_warps=w, COMPACT=False)
             for bn, bk in shapes for w in (4, 8)]
    # The token's row padded to 16 rows on tensor cores (DOT), with the default down stage / best stage 1.
    stage1 += [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=w, DOT=True)
               for bn, bk in shapes for r in (2048, 4096) for w in (4, 8)]
    down += [GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=r, num_warps=w, DOT=True)
             for bn, bk in shapes for r in (1024, 2048) for w in (4, 8)]
    return stage1, down


SWEPT = ((1, 0.5), (1, 0.9), (4, 0.7))   # (tokens, sparsity) rows --sweep times launch knobs at, in float16


def one_launch_pairs():
    """(stage 1, down) launch knobs for the one-launch kernel (one token): N tiles and down splits around the
    defaults, with one warp count for both stages (``one_launch_refusal``)."""
    # One launch gives every program the register count of the larger stage (stage 1's at BLOCK_K 128: about 250
    # per thread at 4 warps, two programs per SM), so 64-row trips, which halve stage 1's accumulators, are timed.
    # With DOT both stages multiply on tensor cores and need few registers: more programs per SM.
    return [(GemvConfig(BLOCK_N=bn, BLOCK_K=bk, ROWS_PER_SPLIT=4096, num_warps=warps, DOT=dot),
             GemvConfig(BLOCK_N=down_n, BLOCK_K=128, ROWS_PER_SPLIT=down_rows, num_warps=warps, DOT=dot))
            for bn in (64, 128) for bk in (64, 128) for down_rows in (2048, 4096) for warps in (4, 8)
            for dot, down_n in ((False, 64), (True, 128))]


def commit() -> str:
    return source_version()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--teal", default=".carry/teal/sparse_gemv.py", help="TEAL's kernels/sparse_gemv.py (optional)")
    ap.add_argument("--sweep", action="store_true", help="also time launch knobs at the SWEPT rows")
    ap.add_argument("--sweep-one-launch", action="store_true",
                    help="also time the one-launch kernel's knobs (one_launch_pairs) at the one-token SWEPT rows")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--graph-rounds", type=int, default=1,
                    help="passes over the weight copies in each timed graph (bench/linear.py's bench_graph)")
    linear.add_graph_submit_option(ap)
    args = ap.parse_args(argv)
    linear.GRAPH_ROUNDS = args.graph_rounds
    submission = linear.use_graph_submit_option(args)
    teal = load_teal(args.teal)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{__import__('triton').__version__}, {datetime.date.today()}, commit {commit()}, "
          f"TEAL anchor: {'loaded from ' + args.teal if teal else 'not given'}, graph rounds {args.graph_rounds}, "
          f"{submission}",
          flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        weights = make_weights(dtype, gen)
        norms = {id(w): tuple(column_norms(t) for t in w) for w in weights}   # as the compiler binds them
        for m in (int(t) for t in args.tokens.split(",")):
            for s in (float(v) for v in args.sparsities.split(",")):
                configs = sweep_configs() if args.sweep and (m, s) in SWEPT and dtype == torch.float16 else None
                pairs = one_launch_pairs() if args.sweep_one_launch and m == 1 and (m, s) in SWEPT and \
                    dtype == torch.float16 else None
                r = row(m, s, dtype, weights, norms, teal, gen, configs, pairs)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "sweep"}), flush=True)
                for entry in r.get("sweep", [])[:6] + r.get("one_launch_sweep", [])[:6]:
                    print("   sweep", json.dumps(entry), flush=True)
                if "best" in r:
                    print("   best", json.dumps(r["best"]), flush=True)
        del weights, norms
        torch.cuda.empty_cache()
    write_json(args.json, rows)
    print("\n| dtype | M | sparsity | dense us | three-op us | two-launch us | one-launch us | fused us "
          "| weighted three-op us "
          "| weighted fused us | TEAL us | fused x dense | weighted fused x dense | three-op x dense | weighted three-op x dense "
          "| TEAL x dense | fused TB/s | weighted fused TB/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
          "---|---|---|---|")
    for r in rows:
        teal_ms = r.get("teal_ms")
        two_launch, one_launch = ("%.1f" % (1e3 * r[k]) if k in r else "-" for k in ("two_launch_ms", "one_launch_ms"))
        print(f"| {r['dtype']} | {r['tokens']} | {r['sparsity']:.0%} | {1e3 * r['dense_ms']:.1f} | "
              f"{1e3 * r['three_op_ms']:.1f} | {two_launch} | {one_launch} | {1e3 * r['fused_ms']:.1f} | "
              f"{1e3 * r['weighted_three_op_ms']:.1f} | "
              f"{1e3 * r['weighted_ms']:.1f} | "
              f"{'%.1f' % (1e3 * teal_ms) if teal_ms else '-'} | **{r['dense_ms'] / r['fused_ms']:.2f}** | "
              f"{r['dense_ms'] / r['weighted_ms']:.2f} | {r['dense_ms'] / r['three_op_ms']:.2f} | "
              f"{r['dense_ms'] / r['weighted_three_op_ms']:.2f} | "
              f"{'%.2f' % (r['dense_ms'] / teal_ms) if teal_ms else '-'} | "
              f"{r['tb_s']:.2f} | {r['weighted_tb_s']:.2f} |")
    print("\n" + linear.graph_submit_summary())


if __name__ == "__main__":
    main()
