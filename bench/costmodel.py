"""Validate (and refit) the cost model against measured kernel times on the GPU.

    python bench/costmodel.py [--quick] [--write] [--out results.json]

For a grid of sites (attention prefill lengths x streaming windows / block
layouts; linear token counts x block densities; decode GEMVs x activation
sparsity) it checks each sparse op against its reference on random data,
times the dense anchor (SDPA, cuBLAS) and the sparse op (through
``torch.ops.sparsecc`` with kernels="triton") with CUDA-event medians, and
compares with the cost model's prediction. It prints:

* the median absolute error of the predicted speedup (target <= 20%);
* the share of points where the variant the model chooses is within 5% of
  the best measured one (target >= 95%);
* the worst chosen/dense time ratio (target: never > 1.02).

``--write`` refits ``sparsecc/cost/efficiency.json`` from the measured
times (compute efficiency of large and small compute-bound points, memory
efficiency of memory-bound points) and records the provenance.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

import sparsecc  # noqa: F401 - registers the ops
from sparsecc.codegen import ops
from sparsecc.cost import estimate_attention, estimate_linear, profile_for
from sparsecc.cost.efficiency import TABLE_PATH, table
from sparsecc.cost.formulas import attention_cost, linear_cost
from sparsecc.forms import BlockSparse, BlockWeights, Streaming
from sparsecc.weights import compress_block_weights

MARGIN = 1.05


def bench(fn, reps: int = 50) -> float:
    """Median milliseconds of ``fn`` by CUDA events (after a warm-up)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=reps, return_mode="median")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def attention_points(quick: bool):
    """(label, form, seq) grid for B=1, H=32, Hkv=8, D=128, causal, bf16."""
    seqs = [2048, 8192, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    forms = [Streaming(128, 1024), Streaming(128, 4096)] + ([] if quick else [Streaming(64, 256)])
    forms += [BlockSparse(128, 2, 1, 0)] + ([] if quick else [BlockSparse(128, 4, 1, 2)])
    return [(f"attn {f} S={s}", f, s) for s in seqs for f in forms]


def run_attention(form, seq, hw):
    """Measure dense SDPA and the sparse op at one point; return the row."""
    b, h, hkv, d = 1, 32, 8, 128
    q = torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, seq, d, device="cuda", dtype=torch.bfloat16)
    scale = d ** -0.5
    if isinstance(form, Streaming):
        call = lambda impl: ops.op("streaming_attention")(q, k, v, None, scale, True, [form.sink] * h,  # noqa: E731
                                                           [form.window] * h, 0, impl)
    else:
        call = lambda impl: ops.op("block_sparse_attention")(q, k, v, None, scale, True, form.block,  # noqa: E731
                                                              form.local_blocks, form.global_blocks,
                                                              form.random_blocks, form.seed, [], 0, impl)
    if seq <= 8192:
        err = _rel(call("triton"), call("reference"))
        assert err < 2e-2, f"sparse attention disagrees with its reference: {err}"
    dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    sparse_ms = bench(lambda: call("triton"))
    est = estimate_attention(form, None, batch=b, heads=h, kv_heads=hkv, seq_q=seq, seq_k=seq, head_dim=d,
                             dtype=torch.bfloat16, causal=True, hw=hw, margin=MARGIN, symbolic_seq=False)
    sparse_cost = attention_cost(form, True, shapes=dict(batch=b, heads=h, kv_heads=hkv, seq_q=seq, seq_k=seq,
                                                         head_dim=d))
    return dict(kind="attention", form=str(form), size=seq, dense_ms=dense_ms, sparse_ms=sparse_ms,
                predicted=est.prediction.speedup, dense_flops=est.prediction.dense_flops,
                sparse_flops=est.prediction.sparse_flops, dense_bytes=est.prediction.dense_bytes,
                sparse_bytes=est.prediction.sparse_bytes, sparse_family=sparse_cost.family,
                dense_family="attention_dense")


def linear_points(quick: bool):
    """(label, form, tokens, K, N, activation sparsity) grid."""
    pts = []
    tokens = [16, 1024, 8192] if quick else [16, 128, 1024, 4096, 8192]
    for m in tokens:
        for k, n in ((4096, 14336), (14336, 4096)):
            for density in ((0.1, 0.5) if quick else (0.1, 0.25, 0.5, 0.9)):
                pts.append((f"bsr d={density} M={m} {k}->{n}", BlockWeights((64, 64), density), m, k, n, None))
    for m in (1, 4) if quick else (1, 2, 4, 16):
        for s in (0.5, 0.9) if quick else (0.5, 0.7, 0.9):
            pts.append((f"teal s={s} M={m}", None, m, 4096, 14336, s))
    return pts


def run_linear(form, m, k, n, sparsity, hw):
    """Measure dense F.linear and the sparse op at one point; return the row."""
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / math.sqrt(k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if sparsity is None:
        c = compress_block_weights(w, form)
        call = lambda impl: ops.op("block_sparse_linear")(x, c.blocks, c.row_ptr, c.col_idx, None, n, k, impl)  # noqa
    else:
        # tau at the |x| quantile gives the requested activation sparsity on this data
        tau = float(x.float().abs().flatten().kthvalue(max(1, int(sparsity * x.numel()))).values)
        call = lambda impl: ops.op("threshold_linear")(x, w, None, tau, impl)  # noqa: E731
    err = _rel(call("triton"), call("reference"))
    assert err < 2e-2, f"sparse linear disagrees with its reference: {err}"
    dense_ms = bench(lambda: F.linear(x, w))
    sparse_ms = bench(lambda: call("triton"))
    est = estimate_linear(form, tokens=m, in_features=k, out_features=n, dtype=torch.bfloat16, hw=hw,
                          activation_sparsity=sparsity)
    fam = linear_cost(form, sparsity).family
    return dict(kind="linear", form=str(form) if form else f"activation sparsity {sparsity}", size=m,
                dense_ms=dense_ms, sparse_ms=sparse_ms, predicted=est.prediction.speedup,
                dense_flops=est.prediction.dense_flops, sparse_flops=est.prediction.sparse_flops,
                dense_bytes=est.prediction.dense_bytes, sparse_bytes=est.prediction.sparse_bytes,
                sparse_family=fam, dense_family="gemm_dense")


def summarize(rows):
    """The three validation figures."""
    errors, within, worst = [], 0, 0.0
    for r in rows:
        measured = r["dense_ms"] / r["sparse_ms"]
        r["measured"] = measured
        errors.append(abs(r["predicted"] - measured) / measured)
        chosen = r["sparse_ms"] if r["predicted"] >= MARGIN else r["dense_ms"]
        best = min(r["sparse_ms"], r["dense_ms"])
        within += chosen <= 1.05 * best
        worst = max(worst, chosen / r["dense_ms"])
    return dict(median_abs_error=statistics.median(errors), share_within_5pct=within / len(rows),
                worst_vs_dense=worst, points=len(rows))


def predicted_ms(flops: float, nbytes: float, family: str, hw, families: dict) -> float:
    """The cost model's time for one kernel (the numeric form of ``Cost.time``), with a given table."""
    e = families[family]
    t = min(1.0, max(0.0, (math.log10(max(flops, 1.0)) - 8) / 2))
    eff_c = e["compute_small"] + (e["compute_large"] - e["compute_small"]) * t
    seconds = max(flops / (hw.peak(torch.bfloat16) * eff_c), nbytes / (hw.bandwidth * e["memory"]), e["floor_s"])
    return (seconds + hw.launch_overhead_s) * 1e3


def refit(rows, hw, device: str):
    """Refit every family's efficiencies and per-call floor from measured times.

    floor_s: the shortest measured call of a family whose roofline time is under half of it
    (host and launch overhead dominate there); compute efficiencies: median of FLOPs / (peak * t)
    over compute-bound points well above the floor, split at 1e9 FLOPs; memory: the same over
    memory-bound points.
    """
    fams = json.loads(json.dumps(table()))
    peak = hw.peak(torch.bfloat16)
    points = {}
    for r in rows:
        for which in ("dense", "sparse"):
            points.setdefault(r[f"{which}_family"], []).append(
                (r[f"{which}_flops"], r[f"{which}_bytes"], r[f"{which}_ms"] / 1e3))
    for fam, pts in points.items():
        entry = fams["families"][fam]
        overhead_bound = [t for f, b, t in pts if max(f / peak, b / hw.bandwidth) < 0.5 * t]
        floor = min(overhead_bound) if overhead_bound else 0.0
        entry["floor_s"] = round(floor, 7)
        usable = [(f, b, t) for f, b, t in pts if t > 2 * floor]
        large = [f / (peak * t) for f, b, t in usable if f / peak >= b / hw.bandwidth and f >= 1e9]
        small = [f / (peak * t) for f, b, t in usable if f / peak >= b / hw.bandwidth and f < 1e9]
        mem = [b / (hw.bandwidth * t) for f, b, t in usable if f / peak < b / hw.bandwidth]
        if large:
            entry["compute_large"] = round(min(1.0, statistics.median(large)), 3)
        if small:
            entry["compute_small"] = round(min(1.0, statistics.median(small)), 3)
        if mem:
            entry["memory"] = round(min(1.0, statistics.median(mem)), 3)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    fams["provenance"] = {"device": device, "date": datetime.date.today().isoformat(),
                          "commit": commit or "unknown",
                          "source": f"refit by bench/costmodel.py from measured times of {len(rows)} grid points "
                                    "(dense: SDPA / cuBLAS; sparse: sparsecc Triton kernels through torch.ops.sparsecc)",
                          "regenerate": "python bench/costmodel.py --write (GPU), or --refit-from RESULTS.json"}
    return fams


def repredict(rows, hw, families: dict) -> None:
    """Recompute each row's predicted speedup with ``families`` (in place)."""
    for r in rows:
        dense = predicted_ms(r["dense_flops"], r["dense_bytes"], r["dense_family"], hw, families)
        sparse = predicted_ms(r["sparse_flops"], r["sparse_bytes"], r["sparse_family"], hw, families)
        r["predicted"] = dense / sparse


def print_summary(summary: dict, device: str) -> None:
    """The short table, printed last."""
    print(f"\ncost model on {device}, {summary['points']} points")
    print(f"{'metric':40s} {'value':>8s} {'target':>8s}")
    print(f"{'median |predicted - measured| speedup':40s} {summary['median_abs_error']:8.1%} {'<= 20%':>8s}")
    print(f"{'chosen within 5% of best':40s} {summary['share_within_5pct']:8.1%} {'>= 95%':>8s}")
    print(f"{'worst chosen / dense time':40s} {summary['worst_vs_dense']:8.3f} {'<= 1.02':>8s}")


def main() -> None:
    """Run the grid, print the summary table last, optionally refit the efficiency table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--write", action="store_true", help="refit and write sparsecc/cost/efficiency.json")
    parser.add_argument("--out", default=None, help="write all rows as JSON here")
    parser.add_argument("--refit-from", default=None, help="refit from a saved --out file (no GPU needed); "
                        "prints the summary before and after, and writes the table with --write")
    args = parser.parse_args()
    if args.refit_from:
        with open(args.refit_from) as fh:
            saved = json.load(fh)
        hw = profile_for(torch.device("cuda")) if torch.cuda.is_available() else __import__(
            "sparsecc.cost.hardware", fromlist=["H100_SXM"]).H100_SXM
        rows = saved["rows"]
        print_summary(summarize(rows), saved["device"] + " (shipped table)")
        fitted = refit(rows, hw, saved["device"])
        repredict(rows, hw, fitted["families"])
        print_summary(summarize(rows), saved["device"] + " (refit table, same points: in-sample)")
        if args.write:
            with open(TABLE_PATH, "w") as fh:
                json.dump(fitted, fh, indent=2)
            print(f"wrote {TABLE_PATH}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench/costmodel.py needs a CUDA device")
    ops.register_ops()
    hw = profile_for(torch.device("cuda"))
    torch.manual_seed(0)
    rows = []
    for label, form, seq in attention_points(args.quick):
        rows.append({"label": label, **run_attention(form, seq, hw)})
        print(f"{label:45s} measured {rows[-1]['dense_ms'] / rows[-1]['sparse_ms']:6.2f}x "
              f"predicted {rows[-1]['predicted']:6.2f}x", flush=True)
    for label, form, m, k, n, s in linear_points(args.quick):
        rows.append({"label": label, **run_linear(form, m, k, n, s, hw)})
        print(f"{label:45s} measured {rows[-1]['dense_ms'] / rows[-1]['sparse_ms']:6.2f}x "
              f"predicted {rows[-1]['predicted']:6.2f}x", flush=True)
    summary = summarize(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"summary": summary, "rows": rows, "device": torch.cuda.get_device_name()}, fh, indent=1)
    if args.write:
        fitted = refit(rows, hw, torch.cuda.get_device_name())
        with open(TABLE_PATH, "w") as fh:
            json.dump(fitted, fh, indent=2)
        print(f"wrote {TABLE_PATH}")
    print_summary(summary, torch.cuda.get_device_name())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
