"""What a one-token input-mode FFN call costs besides reading its kept weights: each launch timed alone.

    python bench/ffn_floor.py [--dtype float16] [--sparsities 0.5,0.9,0.99,1] [--json out.json]

Llama-3-8B shapes (D 4096 -> F 14336 -> D, SiLU, no biases), one token. ``sparsity`` is the share of |x| (and of
|h|) below the threshold; 1 means a threshold of +inf: nothing is kept and the launches read no weight row, so
their time is the fixed cost of the kernels' structure (survivor listing, split merges, launch). Timed in one run,
CUDA-graph replay over ``COPIES`` weight sets (``bench/linear.py``'s ``bench_graph``):

* **gate GEMV**: ``threshold_linear`` of x [1, D] with a K-major [F, D] weight (stage 1 of the fused op reads two);
* **down GEMV**: ``threshold_linear`` of h [1, F] with a K-major [D, F] weight (the fused op's second launch);
* **FFN**: ``threshold_ffn`` as the compiler calls it, and with ``one_launch=True``;
* **FFN, down empty**: the same with nothing kept by the down projection (stage 1's time plus the down floor);
* **no-op launch**: an empty Triton kernel, the floor of one launch inside a graph;
* **graphs of 30**: the no-op and the FFN again in graphs of ``LONG_ROUNDS`` passes over the copies. With
  ``--graph-submit-exposed`` (each replay timed from an idle GPU) the host's submission of the graph is inside the
  timing, a third of it charged to each call of a 3-call graph and a thirtieth in these; by default the GPU is kept
  busy while the host submits (``bench_graph``'s ``GRAPH_SUBMIT_HIDDEN``), which brings the two graph sizes
  close (on an H200 the no-op took 1.3 / 0.7 us per call, the FFN at 90% 20.1 / 18.8 us: each replay still pays
  something once, whatever the graph's length);
* **cuBLAS GEMV**: dense ``F.linear`` of x with the gate weight, for scale.

Every sparse call is checked against the float32 oracle first (rel err < 1e-2; at sparsity 1 the output must be
exactly zero).
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
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ffn_input import COPIES, D_MODEL, make_weights, oracle, quantile_abs  # noqa: E402
import linear  # noqa: E402 - the repo's timing conventions
from linear import bench_graph, rel_err  # noqa: E402
from provenance import source_version  # noqa: E402

from sparsecc.codegen.activation_sparse import threshold_linear  # noqa: E402
from sparsecc.codegen.threshold_ffn import threshold_ffn  # noqa: E402


LONG_ROUNDS = 10


@triton.jit
def _noop_kernel(ptr):
    """Does nothing (its pointer is never read): the launch alone."""
    pass


def _tau(t: torch.Tensor, sparsity: float) -> float:
    return float("inf") if sparsity >= 1 else quantile_abs(t, sparsity)


def row(sparsity: float, dtype, weights, gen) -> dict:
    """Times of every launch at one sparsity."""
    x = torch.randn(1, D_MODEL, device="cuda", dtype=dtype, generator=gen)
    wg, wu, wd = weights[0]
    h_dense = F.silu(F.linear(x, wg)) * F.linear(x, wu)
    tau_in, tau_down = _tau(x, sparsity), _tau(h_dense, sparsity)
    h = h_dense.to(dtype)
    cut_in, cut_down = (float(torch.tensor(t, dtype=dtype)) for t in (tau_in, tau_down))   # as torch compares
    checks = {
        "gate_gemv": (lambda w: threshold_linear(x, w[0], None, tau_in),
                      lambda: F.linear(x.float() * (x.float().abs() > cut_in), wg.float())),
        "down_gemv": (lambda w: threshold_linear(h, w[2], None, tau_down),
                      lambda: F.linear(h.float() * (h.float().abs() > cut_down), wd.float())),
        "ffn": (lambda w: threshold_ffn(x, w[0], None, w[1], None, w[2], None, "silu", tau_in, tau_down),
                lambda: oracle(x, wg, wu, wd, tau_in, tau_down)),
        "ffn_one_launch": (lambda w: threshold_ffn(x, w[0], None, w[1], None, w[2], None, "silu", tau_in, tau_down,
                                                   one_launch=True),
                           lambda: oracle(x, wg, wu, wd, tau_in, tau_down)),
        "ffn_down_empty": (lambda w: threshold_ffn(x, w[0], None, w[1], None, w[2], None, "silu", tau_in,
                                                   float("inf")),
                           lambda: torch.zeros(1, D_MODEL, device="cuda")),
    }
    out = {"sparsity": sparsity, "dtype": str(dtype).replace("torch.", ""),
           "kept_x": float((x.float().abs() > cut_in).float().mean()),
           "kept_h": float((h.float().abs() > cut_down).float().mean())}
    for name, (fn, expected) in checks.items():
        got, ref = fn(weights[0]).float().view(1, -1), expected().float().view(1, -1)
        ok = torch.equal(got, ref) if not bool(ref.any()) else rel_err(got, ref) < 1e-2
        if not ok:
            raise SystemExit(f"correctness check failed: {name} at sparsity {sparsity}: rel err {rel_err(got, ref)}")
        out[f"{name}_us"] = 1e3 * bench_graph([lambda w=w, fn=fn: fn(w) for w in weights], rounds=1)
    out["ffn_long_us"] = 1e3 * bench_graph([lambda w=w: checks["ffn"][0](w) for w in weights], rounds=LONG_ROUNDS)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--sparsities", default="0.5,0.9,0.99,1")
    ap.add_argument("--json", help="write the rows here")
    linear.add_graph_submit_option(ap)
    args = ap.parse_args(argv)
    linear.use_graph_submit_option(args)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = make_weights(dtype, gen)
    dummy = torch.empty(1, device="cuda")
    noop_us = 1e3 * bench_graph([lambda: _noop_kernel[(1,)](dummy)] * COPIES, rounds=1)
    noop_long_us = 1e3 * bench_graph([lambda: _noop_kernel[(1,)](dummy)] * COPIES, rounds=LONG_ROUNDS)
    x = torch.randn(1, D_MODEL, device="cuda", dtype=dtype, generator=gen)
    cublas_us = 1e3 * bench_graph([lambda w=w: F.linear(x, w[0]) for w in weights])
    rows = [row(float(s), dtype, weights, gen) for s in args.sparsities.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"source {source_version()}, {datetime.date.today()}")
    print(f"no-op launch {noop_us:.1f} us per call in graphs of {COPIES} calls, {noop_long_us:.1f} us in graphs of "
          f"{COPIES * LONG_ROUNDS}; cuBLAS gate GEMV (dense, 117 MB) {cublas_us:.1f} us")
    print(f"| sparsity | kept x | kept h | gate GEMV us | down GEMV us | FFN us | FFN one launch us | FFN, down empty us "
          f"| FFN us, graphs of {COPIES * LONG_ROUNDS} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:.0%} | {r['kept_x']:.3f} | {r['kept_h']:.3f} | {r['gate_gemv_us']:.1f} | "
              f"{r['down_gemv_us']:.1f} | {r['ffn_us']:.1f} | {r['ffn_one_launch_us']:.1f} | "
              f"{r['ffn_down_empty_us']:.1f} | {r['ffn_long_us']:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "source": source_version(), "noop_us": noop_us,
                       "noop_long_us": noop_long_us, "long_rounds": LONG_ROUNDS,
                       "cublas_gate_us": cublas_us, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
