"""Benchmark the sparsecc linear kernels on a CUDA GPU against dense cuBLAS and torch's sparse anchors.

Workloads are those of ``TARGETS.md`` (Linear / FFN). For each: a correctness
check on random data against a float32 reference, then medians of
``triton.testing.do_bench`` for sparsecc, dense ``F.linear`` and the anchor
measured in the same run. ``--sweep`` also times a few launch configurations
per kernel and reports the best (to tune the defaults). The summary table is
printed last; ``--json PATH`` saves every number.

    python bench/linear.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from sparsecc.codegen.activation_sparse import GemvConfig, threshold_linear
from sparsecc.codegen.block_sparse_linear import BlockLinearConfig, block_sparse_linear
from sparsecc.forms import BlockWeights
from sparsecc.weights import compress_block_weights

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

WARMUP_MS, REP_MS = 25, 100  # do_bench defaults named in GPU.md
DTYPE = torch.bfloat16


@dataclass
class Row:
    """One summary line: times in ms, ratios over dense."""

    workload: str
    sparsecc: float
    dense: float
    anchor: Optional[float]
    anchor_name: str
    ideal: float
    target: float
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.dense / self.sparsecc

    def line(self) -> str:
        anchor = f"{self.anchor:8.4f} ({self.dense / self.anchor:5.2f}x {self.anchor_name})" if self.anchor else \
            f"{'-':>8} {'':>24}"
        verdict = "pass" if self.speedup >= self.target else "miss"
        return (f"{self.workload:<44} {self.sparsecc:8.4f} {self.dense:8.4f} {anchor}  {self.speedup:6.2f}x "
                f"{self.ideal:6.2f}x {self.target:5.2f}x {verdict} {self.note}")


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (L2 flushed between runs by do_bench)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


GRAPH_COPIES = 6  # weight copies a graph cycles through, so that 90%-sparse weights (12 MB) miss L2 (50 MB)
# Passes over the calls in one graph (bench_graph); benches that take --graph-rounds set it.
GRAPH_ROUNDS = 1
GRAPH_REPLAYS = 20
# Whether the GPU is kept busy while the host submits each timed replay (bench_graph), as do_bench's L2 flush keeps it
# for the attention and decode benches; benches that take --graph-submit-exposed clear it, to time it as before.
GRAPH_SUBMIT_HIDDEN = True
GRAPH_LEAD_S = 200e-6   # GPU time queued ahead of each timed replay: several times the host's submission of one

_sleep_cycles_per_s: Optional[float] = None


def graph_lead_cycles(seconds: float = GRAPH_LEAD_S) -> int:
    """Cycles of ``torch.cuda._sleep`` that keep the GPU busy for about ``seconds`` (the rate measured once)."""
    global _sleep_cycles_per_s
    if not hasattr(torch.cuda, "_sleep"):
        raise SystemExit(f"torch {torch.__version__} has no torch.cuda._sleep to keep the GPU busy while a graph is "
                         "submitted: time with --graph-submit-exposed (bench/linear.py's GRAPH_SUBMIT_HIDDEN = False)")
    if _sleep_cycles_per_s is None:
        cycles = 2_000_000
        torch.cuda._sleep(1000)   # the first call loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _sleep_cycles_per_s = cycles / (start.elapsed_time(end) / 1e3)
    return int(seconds * _sleep_cycles_per_s)


def add_graph_submit_option(parser) -> None:
    """``--graph-submit-exposed`` on a bench that times with :func:`bench_graph` (:func:`use_graph_submit_option`
    applies it)."""
    parser.add_argument("--graph-submit-exposed", action="store_true",
                        help="time each graph replay from an idle GPU, the host's submission inside the timing "
                             "(bench/linear.py's GRAPH_SUBMIT_HIDDEN off)")


def use_graph_submit_option(args) -> str:
    """Set :data:`GRAPH_SUBMIT_HIDDEN` from the parsed ``--graph-submit-exposed``; returns how replays are timed."""
    global GRAPH_SUBMIT_HIDDEN
    GRAPH_SUBMIT_HIDDEN = not args.graph_submit_exposed
    return "submission hidden" if GRAPH_SUBMIT_HIDDEN else "submission exposed"


def graph_submit_summary() -> str:
    """One line for a bench's output: the longest host submission :func:`bench_graph` saw beside its lead."""
    how = "hidden behind" if GRAPH_SUBMIT_HIDDEN else "exposed, no"
    return (f"longest host submission of a timed replay: {1e6 * graph_submit_max_s:.1f} us "
            f"({how} {1e6 * GRAPH_LEAD_S:.0f} us lead)")


# The longest host submission of one timed replay seen by bench_graph in this process, in seconds; a bench may
# print it beside GRAPH_LEAD_S (a submission longer than the lead would leave the GPU idle inside the timing).
graph_submit_max_s = 0.0


def bench_graph(calls: List[Callable[[], object]], rounds: Optional[int] = None) -> float:
    """Median ms per call of ``calls`` (one per weight copy) replayed from one CUDA graph.

    This is GPU time without Python launch overhead, as decode runs under
    CUDA graphs; cycling through copies keeps small sparse weights out of L2.
    The graph holds ``rounds`` (default :data:`GRAPH_ROUNDS`) passes over ``calls``.

    With :data:`GRAPH_SUBMIT_HIDDEN` (the default) a ``torch.cuda._sleep`` of about :data:`GRAPH_LEAD_S` is queued
    before each timed replay, so the GPU is busy while the host submits the graph and the timing starts when the
    replay's first kernel can: the time is the graph's kernels and the gaps between them. That is what one call
    costs inside a model's decode step, whose one graph of hundreds of kernels is submitted once, and it is how the
    attention and decode benches time replays (``do_bench`` runs its L2 flush before each one). Without it the
    GPU waits for the submission inside the timing, shared by the graph's calls: on an H100 an empty kernel took
    6.2 us per call in graphs of 3 and 1.2 us in graphs of 30, the one-token FFN at 90% 25.7 and 24.3 us
    (bench/RESULTS.md, "What the one-token FFN's fixed cost is made of").
    """
    global graph_submit_max_s
    rounds = GRAPH_ROUNDS if rounds is None else rounds
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:  # warm up: compile and cache outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(rounds):
            for fn in calls:
                fn()
    torch.cuda.synchronize()
    submitted = time.perf_counter()
    graph.replay()   # the first replay uploads the graph: not timed, but its submission bounds the later ones'
    first_submit_s = time.perf_counter() - submitted
    torch.cuda.synchronize()
    # The lead outlasts the submission: GRAPH_LEAD_S, or twice the first (uploading) submission, at most 5 ms.
    lead = graph_lead_cycles(min(max(GRAPH_LEAD_S, 2 * first_submit_s), 5e-3)) if GRAPH_SUBMIT_HIDDEN else 0
    times = []
    for _ in range(GRAPH_REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if lead:
            torch.cuda._sleep(lead)
        start.record()
        submitted = time.perf_counter()
        graph.replay()
        graph_submit_max_s = max(graph_submit_max_s, time.perf_counter() - submitted)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (rounds * len(calls)))
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-2) -> None:
    """Abort the benchmark on a wrong result: timing a wrong kernel means nothing."""
    err = rel_err(out, ref)
    print(f"  check {name}: rel err {err:.2e}", flush=True)
    if not err < tol:
        raise SystemExit(f"correctness check failed for {name}: rel err {err}")


# ------------------------------------------------------------------ block-sparse weights


def torch_bsr_anchor(w_dense: torch.Tensor, block, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torch's ``bsr_dense_mm`` on W (BSR) times xᵀ, the TARGETS.md anchor (xᵀ prepared outside the timing)."""
    wb = w_dense.to_sparse_bsr(block)
    xt = x.t().contiguous()
    try:
        from torch.sparse._triton_ops import bsr_dense_mm
        bsr_dense_mm(wb, xt)
        return lambda: bsr_dense_mm(wb, xt)
    except Exception as err:  # noqa: BLE001 - fall back to the plain operator, and say so
        print(f"  bsr_dense_mm unavailable ({err}); anchor is wb @ xt")
        return lambda: wb @ xt


# (BLOCK_M, num_warps, num_stages) tried by --sweep, each with and without SWAP_AB.
BSR_SWEEP = ((64, 4, 4), (128, 4, 4), (128, 4, 5), (128, 8, 4), (256, 8, 3), (256, 8, 4), (256, 8, 5))


def bsr_workload(m: int, k: int, n: int, block, density: float, target: float, sweep: bool,
                 activation: str = "none", with_bias: bool = False) -> Row:
    """One block-sparse workload: check, time sparsecc / dense (+ separate epilogue) / torch BSR."""
    name = f"bsr x[{m},{k}]->{n} {block[0]}x{block[1]} {density:.0%}"
    if with_bias or activation != "none":
        name += f" +bias+{activation}"
    print(name, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5
    c = compress_block_weights(w, BlockWeights(block=block, density=density))
    wd = c.to_dense()
    x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
    bias = torch.randn(n, device="cuda", dtype=DTYPE, generator=gen) if with_bias else None
    act = {"none": lambda v: v, "silu": F.silu, "gelu": F.gelu}[activation]
    ref = act(x.float() @ wd.float().T + (0 if bias is None else bias.float()))
    out = torch.full((m, n), float("nan"), device="cuda", dtype=DTYPE)
    check(name, block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, activation=activation, out=out), ref)

    def ours(cfg=None):
        return lambda: block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, bias, activation=activation,
                                           config=cfg)
    t_ours = bench(ours())
    note = ""
    if sweep:
        best = (t_ours, "default")
        for swap in (False, True):
            for block_m, warps, stages in BSR_SWEEP:
                cfg = BlockLinearConfig(BLOCK_M=block_m, num_warps=warps, num_stages=stages, SWAP_AB=swap)
                try:
                    t = bench(ours(cfg))
                except Exception as err:  # noqa: BLE001 - out of shared memory etc.: skip the config
                    print(f"  {cfg}: failed ({type(err).__name__})")
                    continue
                print(f"  {cfg}: {t:.4f} ms")
                best = min(best, (t, str(cfg)))
        note = f"best {best[0]:.4f} {best[1]}"
    dense = bench(lambda: act(F.linear(x, w, bias)))
    anchor = bench(torch_bsr_anchor(wd, block, x)) if activation == "none" and not with_bias else None
    return Row(name, t_ours, dense, anchor, "torch BSR", 1 / density, target, note)


# ------------------------------------------------------------------ activation-sparse GEMV


# One token, around the best of the 3e5de2f sweep (64-wide N tiles, 128 rows per trip, 4096-row
# splits: one launch at K = 4096): pipelining depth, wider trips, narrower tiles, longer splits.
GEMV_SWEEP = ([GemvConfig(64, 128, 4096, 4, STAGES=st) for st in (1, 2, 3, 4)]
              + [GemvConfig(64, 256, 4096, 8, STAGES=st) for st in (2, 3)]
              + [GemvConfig(32, 128, 4096, 4), GemvConfig(32, 256, 4096, 4), GemvConfig(128, 128, 4096, 8),
                 GemvConfig(64, 128, 2048, 4), GemvConfig(64, 128, 8192, 4), GemvConfig(64, 128, 16384, 8)]
              # The token's row padded to 16 on tensor cores (DOT): wider tiles fit its few registers.
              + [GemvConfig(bn, bk, rows, w, DOT=True) for bn, bk, rows, w in
                 ((128, 128, 4096, 4), (128, 128, 2048, 4), (128, 64, 4096, 4), (64, 128, 4096, 4),
                  (128, 128, 4096, 8), (256, 64, 4096, 4), (128, 128, 1024, 4))])

# 2-16 tokens: the union of the tokens' survivors (predicated or compacted, tl.dot) against one
# program per token (each token's own survivors), a few tile shapes of each.
TOKEN_STRATEGIES = {
    "union predicated": [GemvConfig(128, 32, 512, 4, COMPACT=False)],
    "union compacted": [GemvConfig(128, 128, 1024, 8), GemvConfig(128, 128, 2048, 8), GemvConfig(128, 128, 4096, 8),
                        GemvConfig(128, 256, 1024, 8), GemvConfig(128, 128, 1024, 8, STAGES=1),
                        GemvConfig(128, 128, 1024, 8, STAGES=4),
                        GemvConfig(64, 128, 1024, 4)],
    "per-token compacted": [GemvConfig(64, 128, 1024, 4, PER_TOKEN=True), GemvConfig(64, 128, 4096, 4, PER_TOKEN=True)],
}


def gemv_workload(m: int, k: int, n: int, sparsity: float, target: float, sweep: bool) -> Row:
    """One thresholded GEMV: check, time sparsecc / dense / torch gather of the kept rows.

    The row's times are ``do_bench`` medians (as TARGETS.md); the note adds
    GPU-only times from :func:`bench_graph` (graph replay, weights rotated).
    """
    name = f"gemv {m}x{k}->{n} sparsity {sparsity:.0%}"
    print(name, flush=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ws = [torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5 for _ in range(GRAPH_COPIES)]
    # The compile-time layout the kernel wants: a K-major buffer, passed as its [N, K] .t() view.
    kmajor = [w.t().contiguous() for w in ws]
    w, w_view = ws[0], kmajor[0].t()
    bias = torch.randn(n, device="cuda", dtype=DTYPE, generator=gen)
    x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
    tau = float(torch.quantile(x.abs().float().flatten(), sparsity))
    keep = x.abs() > tau
    ref = (x.float() * keep) @ w.float().T + bias.float()
    out = torch.full((m, n), float("nan"), device="cuda", dtype=DTYPE)
    check(name, threshold_linear(x, w_view, bias, tau, out=out), ref)

    def ours(cfg=None):
        return [lambda wk=wk: threshold_linear(x, wk.t(), bias, tau, config=cfg) for wk in kmajor]
    t_ours = bench(ours()[0])
    g_ours = bench_graph(ours())
    note = ""
    if sweep:
        best = (g_ours, "default")
        for cfg in GEMV_SWEEP:
            best = min(best, (bench_graph(ours(cfg)), str(cfg)))
        note = f"graph best {best[0] * 1e3:.1f}us {best[1]}; "
    dense = bench(lambda: F.linear(x, w, bias))
    g_dense = bench_graph([lambda wd=wd: F.linear(x, wd, bias) for wd in ws])
    idx = keep.any(0).nonzero().squeeze(-1)
    x_kept = x[:, idx]
    gathered = [wk[idx] for wk in kmajor]
    anchor = bench(lambda: torch.addmm(bias, x_kept, gathered[0]))  # the gather anchor, idx given
    g_anchor = bench_graph([lambda g=g: torch.addmm(bias, x_kept, g) for g in gathered])
    kept = idx.numel() / k
    note += (f"graph: ours {g_ours * 1e3:.1f}us dense {g_dense * 1e3:.1f}us gather {g_anchor * 1e3:.1f}us "
             f"-> {g_dense / g_ours:.2f}x")
    return Row(name, t_ours, dense, anchor, "gather", 1 / kept, target, note)


def tokens_sweep(k: int, n: int, m: int, sparsity: float) -> dict:
    """Union against per-token masks for ``m`` decode tokens: graph-replay µs of each strategy's best config."""
    gen = torch.Generator(device="cuda").manual_seed(m)
    kmajor = [(torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5).t().contiguous()
              for _ in range(GRAPH_COPIES)]
    bias = torch.randn(n, device="cuda", dtype=DTYPE, generator=gen)
    x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
    tau = float(torch.quantile(x.abs().float().flatten(), sparsity))
    keep = x.abs() > tau
    ref = (x.float() * keep) @ kmajor[0].float() + bias.float()
    row = {"m": m, "k": k, "n": n, "sparsity": sparsity, "union_kept": float(keep.any(0).float().mean()),
           "token_kept": float(keep.float().mean())}
    for strategy, configs in TOKEN_STRATEGIES.items():
        best = None
        for cfg in configs:
            out = torch.full((m, n), float("nan"), device="cuda", dtype=DTYPE)
            check(f"{strategy} {cfg}", threshold_linear(x, kmajor[0].t(), bias, tau, config=cfg, out=out), ref)
            t = bench_graph([lambda wk=wk, cfg=cfg: threshold_linear(x, wk.t(), bias, tau, config=cfg)
                             for wk in kmajor])
            best = min(best or (t, str(cfg)), (t, str(cfg)))
        row[strategy] = best[0] * 1e3
        row[strategy + " config"] = best[1]
    row["default"] = bench_graph([lambda wk=wk: threshold_linear(x, wk.t(), bias, tau) for wk in kmajor]) * 1e3
    row["dense"] = bench_graph([lambda wk=wk: F.linear(x, wk.t(), bias) for wk in kmajor]) * 1e3
    return row


def print_tokens_table(rows: List[dict]) -> None:
    """One line per (shape, M, sparsity): µs per call of each strategy, dense, and the winner."""
    names = list(TOKEN_STRATEGIES)
    print(f"\n{'shape':<12} {'M':>3} {'sp':>4} {'union':>6} {'tok':>5} " +
          " ".join(f"{n[:18]:>18}" for n in names) + f" {'default':>8} {'dense':>7}  best")
    for r in rows:
        best = min(names, key=lambda n: r[n])
        print(f"{r['k']}->{r['n']:<6} {r['m']:>3} {r['sparsity']:>4.0%} {r['union_kept']:>6.0%} {r['token_kept']:>5.0%} "
              + " ".join(f"{r[n]:>18.1f}" for n in names) + f" {r['default']:>8.1f} {r['dense']:>7.1f}  "
              f"{best} ({r['dense'] / r[best]:.2f}x dense)")


# ------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> None:
    """Run every workload and print the summary table last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    parser.add_argument("--json", help="save the rows here")
    parser.add_argument("--only", choices=("bsr", "gemv"), help="run one family")
    parser.add_argument("--sweep-bsr", action="store_true", help="sweep block-sparse configs too (slow)")
    parser.add_argument("--tokens", action="store_true",
                        help="only the 2-16 token sweep: union against per-token masks (graph-replay us)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/linear.py needs a CUDA device")
    torch.manual_seed(0)
    if args.tokens:
        token_rows = []
        for (k, n) in ((4096, 14336), (14336, 4096)):
            for m in (2, 4, 8, 16):
                for sparsity in (0.7, 0.9, 0.95):
                    token_rows.append(tokens_sweep(k, n, m, sparsity))
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(token_rows, f, indent=1)
        print_tokens_table(token_rows)
        return
    rows: List[Row] = []
    if args.only in (None, "gemv"):
        for (k, n) in ((4096, 14336), (14336, 4096)):
            for sparsity, target in ((0.5, 1.85), (0.7, 3.0), (0.9, 6.0)):
                rows.append(gemv_workload(1, k, n, sparsity, target, args.sweep))
        for m in (4, 16):
            rows.append(gemv_workload(m, 4096, 14336, 0.9, 1.0, False))
    if args.only in (None, "bsr"):
        rows.append(bsr_workload(8192, 4096, 14336, (64, 64), 0.1, 7.0, args.sweep_bsr))
        rows.append(bsr_workload(8192, 4096, 14336, (64, 64), 0.5, 1.7, args.sweep_bsr))
        rows.append(bsr_workload(8192, 14336, 4096, (64, 64), 0.1, 7.0, args.sweep_bsr))
        rows.append(bsr_workload(8192, 4096, 14336, (64, 64), 0.1, 7.0, False, "silu", True))
        rows.append(bsr_workload(8192, 4096, 14336, (128, 128), 0.1, 7.0, False))
        rows.append(bsr_workload(8192, 4096, 14336, (32, 32), 0.1, 7.0, False))
    commit = source_version()
    header = (f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"{datetime.date.today()}, commit {commit or '?'}, {DTYPE}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [r.__dict__ for r in rows]}, f, indent=1)
    print("\n" + header)
    print(f"{'workload':<44} {'sparsecc':>8} {'dense':>8} {'anchor (dense/anchor)':>33}  {'ratio':>7} "
          f"{'ideal':>7} {'target':>6} verdict   (ms)")
    for r in rows:
        print(r.line())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
