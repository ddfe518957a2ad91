"""Streaming prefill with a rule per query head: the Gluon program for sm_90 against the Triton kernel those calls
ran before, and SDPA.

    python bench/prefill_head_rules.py [--lengths 16384,32768,65536] [--rounds 3] [--json out.json]

B=1, H=32, Hkv=8, D=128, bf16, causal, per query head (sink, window):

* **two windows**: the query heads of kv heads 0-3 at (128, 4096), of kv heads 4-7 at (128, 1024);
* **retrieval heads dense**: DuoAttention's shape, one query head in four dense (every key), the others (128, 4096),
  so every kv group holds a dense head and three streaming ones;
* **tuned**: bench/e2e.py's hand-written tuned spec, heads 0-15 (128, 2048), 16-27 (128, 4096), 28-31 dense.

Columns: **program** (``streaming_attention``: on sm_90 the Gluon program, each query tile reading its head's
rule), **Triton** (``launch_prefill`` with the per-head rule vectors: what ``streaming_attention`` ran for such
calls before), **SDPA** (dense causal). "of ideal" = (SDPA time / kernel time) x the mean kept share of causal
128 x 128 blocks over the heads. Correctness first: both kernels against a float64 oracle of each head's own
keep-mask at 8192 keys (every head; shorter would make the 4096-key windows dense), and against each other at
every timed length. Times: medians of
``triton.testing.do_bench``, every round timing the three in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402

H, HKV, D = 32, 8, 128
FULL = -1   # a dense head (FULL_WINDOW)
LAYOUTS = {
    "two windows": ([128] * H, [4096] * (H // 2) + [1024] * (H // 2)),
    "retrieval heads dense": ([0, 128, 128, 128] * HKV, [FULL, 4096, 4096, 4096] * HKV),
    "tuned": ([128] * 28 + [0] * 4, [2048] * 16 + [4096] * 12 + [FULL] * 4),
}
SCALE = D ** -0.5
CHECK_LENGTH = 8192   # past every window but the dense heads': at 4096 keys or fewer a 4096-key window keeps all


def qkv(s: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(1, H, s, D, device="cuda", dtype=torch.bfloat16, generator=g),
            torch.randn(1, HKV, s, D, device="cuda", dtype=torch.bfloat16, generator=g),
            torch.randn(1, HKV, s, D, device="cuda", dtype=torch.bfloat16, generator=g))


def oracle(q, k, v, sinks, windows):
    """float64 causal attention, each query head over its own rule's keys (docs/spec.md: ``j <= p`` and
    (``j < sink`` or ``p - j < window``); a dense head keeps every ``j <= p``), GQA by ``h // (H / Hkv)``."""
    s = q.shape[2]
    i = torch.arange(s, device=q.device)[:, None]
    j = torch.arange(s, device=q.device)[None, :]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h, (sink, window) in enumerate(zip(sinks, windows)):
        keep = (j <= i) if window == FULL else (j <= i) & ((j < sink) | (i - j < window))
        kv = h // (H // HKV)
        scores = (q[0, h].double() @ k[0, kv].double().T) * SCALE
        out[0, h] = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v[0, kv].double()
    return out


def rel_err(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def kept_share(sinks, windows, s: int) -> float:
    """Mean over the heads of the kept share of causal 128 x 128 blocks."""
    from sparsecc.layouts import streaming_block_table

    shares = []
    for sink, window in zip(sinks, windows):
        if window == FULL:
            shares.append(1.0)
        else:
            shares.append(streaming_block_table(sink, window, block=128, seq_q=s, seq_k=s, causal=True).density())
    return sum(shares) / len(shares)


def candidates(q, k, v, sinks, windows):
    from sparsecc.codegen.block_attention import kernel_rules, launch_prefill, rule_vectors, streaming_attention

    s = q.shape[2]
    snk, win = kernel_rules(sinks, windows, s, s)
    s_vec, w_vec = rule_vectors(tuple(snk), tuple(win), q)
    return {
        "program": lambda: streaming_attention(q, k, v, sink=sinks, window=windows, scale=SCALE, causal=True),
        "triton": lambda: launch_prefill(q, k, v, None, SCALE, True, False, sinks=s_vec, windows=w_vec),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True),
    }


def check(log) -> None:
    """Both kernels against the float64 oracle at ``CHECK_LENGTH`` keys, every layout; the program must be the
    Gluon one."""
    from sparsecc.codegen import hopper_prefill

    calls = []
    real = hopper_prefill.streaming_prefill_sm90_kernel
    hopper_prefill.streaming_prefill_sm90_kernel = lambda *a: calls.append(1) or real(*a)
    try:
        for name, (sinks, windows) in LAYOUTS.items():
            q, k, v = qkv(CHECK_LENGTH, seed=1)
            ref = oracle(q, k, v, sinks, windows)
            for cand, fn in candidates(q, k, v, sinks, windows).items():
                if cand == "sdpa":
                    continue
                err = rel_err(fn(), ref)
                log(f"check {name}: {cand} rel err {err:.2e}")
                if not err < 1e-2:
                    raise SystemExit(f"{name}: {cand} rel err {err:.3e}; not timing")
    finally:
        hopper_prefill.streaming_prefill_sm90_kernel = real
    if len(calls) != len(LAYOUTS):
        raise SystemExit(f"the Gluon program ran {len(calls)} times for {len(LAYOUTS)} layouts: not what is timed")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="16384,32768,65536")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/prefill_head_rules.py needs a CUDA device")
    from triton.testing import do_bench

    log = lambda msg: print(msg, flush=True)  # noqa: E731
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"source {source_version()}")
    check(log)
    rows = []
    for name, (sinks, windows) in LAYOUTS.items():
        for s in map(int, args.lengths.split(",")):
            q, k, v = qkv(s, seed=s)
            fns = candidates(q, k, v, sinks, windows)
            agree = rel_err(fns["program"](), fns["triton"]())
            times = {c: [] for c in fns}
            for r in range(args.rounds):
                order = list(fns)[r % 3:] + list(fns)[:r % 3]
                for c in order:
                    times[c].append(do_bench(fns[c], warmup=25, rep=100, return_mode="median"))
            t = {c: statistics.median(ts) for c, ts in times.items()}
            share = kept_share(sinks, windows, s)
            row = dict(layout=name, s=s, kept=share, agree=agree, **{f"{c}_ms": t[c] for c in t})
            rows.append(row)
            log(json.dumps({k_: round(v_, 5) if isinstance(v_, float) else v_ for k_, v_ in row.items()}))
            del q, k, v, fns
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "source": source_version(), "rows": rows}, fh, indent=1)
    log("\n| layout | S | kept | SDPA ms | Triton ms | program ms | Triton of ideal | program of ideal | "
        "program x Triton | max rel diff |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ideal = r["sdpa_ms"] * r["kept"]
        log(f"| {r['layout']} | {r['s'] // 1024}K | {r['kept']:.4f} | {r['sdpa_ms']:.3f} | {r['triton_ms']:.3f} | "
            f"{r['program_ms']:.3f} | {ideal / r['triton_ms']:.2f} | {ideal / r['program_ms']:.2f} | "
            f"{r['triton_ms'] / r['program_ms']:.2f} | {r['agree']:.1e} |")


if __name__ == "__main__":
    main()
