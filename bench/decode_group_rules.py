"""Decode attention whose query heads of one kv group have different streaming rules: the split-KV kernel against
the kernels such calls ran before, and SDPA.

    python bench/decode_group_rules.py [--batches 8] [--lengths 32768,131072] [--baseline OLD.py] [--json out.json]

Workload as bench/decode_kernel.py (H=32, Hkv=8, D=128, bf16, one query row at the end of the cache), with rules
per query head:

* **two windows**: in every kv group, heads 0 and 2 keep sink 128 + window 4096, heads 1 and 3 sink 128 + window
  1024;
* **long sink**: heads 0-2 sink 128 + window 4096, head 3 sink 1024 + window 64;
* **per kv group**: one rule per kv group (even groups sink 128 + window 4096, odd ones sink 0 + window 4096), the
  case the decode kernel took before too (one rule load per kv head, as now where a group's heads agree):
  ``--baseline OLD.py`` times another ``codegen/decode_attention.py`` on it beside the shipped one (its decode
  kernel and its from-mask op), e.g. ``git show HEAD~1:codegen/decode_attention.py > /tmp/old.py``.

Columns (each checked against a float64 oracle of docs/spec.md's per-head keep-mask first, into NaN-poisoned
outputs): **decode kernel** (``streaming_attention``: since rules may differ within a kv group, the split-KV
kernel, each kv head reading its group's widest sink and window once); **prefill kernel** (``launch_prefill`` with
the per-head rules: what ``streaming_attention`` ran for such calls before); **from mask, kernel** /
**from mask, reference** (the static-cache op, ``streaming_decode_from_mask_op``, and its reference, which it ran
before); **from mask, launch alone** (that op's decode launch with its positions computed once beforehand) and
**from mask, positions alone** (the positions as ``mask_query_end`` and ``leading_padding`` compute them in torch,
what the op did before ``mask_ends``); **widest rule** (the decode kernel with every head at the group's widest
rule: the same K/V bytes); and SDPA over the whole cache. Times are CUDA-graph replays (``graph_ms``) and plain
calls, as in decode_kernel.py; the reference copies its rules to the device on every call, which a CUDA graph
cannot capture, so it has plain calls only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from decode_kernel import H, HKV, SCALE, Cycle, bench_ms, copies_for, inputs, rel_err, time_both  # noqa: E402
from provenance import source_version  # noqa: E402

GROUP = H // HKV
LAYOUTS = {
    "two windows": ([128] * H, [4096, 1024] * (H // 2)),
    "long sink": ([128, 128, 128, 1024] * HKV, [4096, 4096, 4096, 64] * HKV),
    "per kv group": (([128] * GROUP + [0] * GROUP) * (HKV // 2), [4096] * H),
}
MAX_REL_ERR = 1e-2


def oracle(q, k, v, sinks, windows):
    """float64 attention of the one query row at position S-1, each head over the keys its own rule keeps
    (docs/spec.md: ``j <= p and (j < sink or p - j < window)``), GQA by ``repeat_interleave``."""
    s = k.shape[2]
    pos = s - 1
    j = torch.arange(s, device=k.device)
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for head, (sink, window) in enumerate(zip(sinks, windows)):   # head by head: only its kept keys in float64
        idx = j[(j <= pos) & ((j < sink) | (pos - j < window))]
        kk, vv = (t[:, head // GROUP, idx].double() for t in (k, v))
        out[:, head] = torch.softmax((q[:, head].double() @ kk.transpose(-1, -2)) * SCALE, -1) @ vv
    return out


def widest(sinks, windows):
    """Every head at its kv group's widest sink and window (what the decode kernel reads for the group)."""
    out_s, out_w = [], []
    for g0 in range(0, H, GROUP):
        out_s += [max(sinks[g0:g0 + GROUP])] * GROUP
        out_w += [max(windows[g0:g0 + GROUP])] * GROUP
    return out_s, out_w


def columns(sinks, windows, kv, batch, baseline=None):
    from sparsecc.codegen import block_attention as ba
    from sparsecc.codegen import decode_attention as da
    from sparsecc.codegen import ops
    from sparsecc.codegen.mask_positions import leading_padding

    wide_s, wide_w = widest(sinks, windows)
    s_vec, w_vec = ba.rule_vectors(tuple(sinks), tuple(windows), torch.empty(0, device="cuda"))
    cache_mask = torch.ones(1, 1, 1, kv, dtype=torch.bool, device="cuda")   # a full static cache

    def decode(q, k, v, out=None):
        return ba.streaming_attention(q, k, v, sink=sinks, window=windows, scale=SCALE, causal=True, out=out)

    def prefill(q, k, v, out=None):
        return ba.launch_prefill(q, k, v, None, SCALE, True, False, sinks=s_vec, windows=w_vec, out=out)

    def from_mask(q, k, v, out=None):
        return da.streaming_decode_from_mask_op(q, k, v, cache_mask, SCALE, sinks, windows, out=out)

    def positions():   # what the from-mask op computes from the mask before its launch
        return (ops.mask_query_end(cache_mask, 1, kv).expand(batch).contiguous(),
                leading_padding(cache_mask, batch, 1, kv))

    query_end, key_start = positions()
    rules = ba.kernel_rules(sinks, windows, 1, kv)

    def from_mask_launch(q, k, v, out=None):   # the from-mask op's launch alone, its positions computed once
        return da.streaming_decode(q, k, v, cache_mask, SCALE, True, None, None, out=out, rules=rules,
                                   query_end=query_end, key_start=key_start)

    def from_mask_ref(q, k, v, out=None):
        result = ops.streaming_attention_from_mask_ref(q, k, v, cache_mask, SCALE, sinks, windows)
        return result if out is None else out.copy_(result)

    def wide(q, k, v, out=None):
        return ba.streaming_attention(q, k, v, sink=wide_s, window=wide_w, scale=SCALE, causal=True, out=out)

    cols = {"decode kernel": (decode, "rules"), "prefill kernel": (prefill, "rules"),
            "from mask, kernel": (from_mask, "rules"), "from mask, launch alone": (from_mask_launch, "rules"),
            "from mask, positions alone": (lambda q, k, v, out=None: positions(), None),
            "from mask, reference": (from_mask_ref, "rules"), "widest rule": (wide, "widest")}
    if baseline is not None:
        def old(q, k, v, out=None):
            return baseline.streaming_decode(q, k, v, None, SCALE, True, None, None, out=out, rules=(sinks, windows))
        def old_from_mask(q, k, v, out=None):
            return baseline.streaming_decode_from_mask_op(q, k, v, cache_mask, SCALE, sinks, windows, out=out)

        cols["baseline decode kernel"] = (old, "rules")
        cols["baseline from mask, kernel"] = (old_from_mask, "rules")
    return cols


def run(b, kv, layout, log, baseline=None) -> dict:
    from sparsecc.codegen import decode_attention as da

    sinks, windows = LAYOUTS[layout]
    sets = inputs(b, kv, copies_for(b), seed=b * 13 + kv)
    q, k, v = sets[0]
    ref = oracle(q, k, v, sinks, windows)
    wide_ref = oracle(q, k, v, *widest(sinks, windows))
    row = {"layout": layout, "b": b, "kv": kv, "copies": len(sets)}
    cols = columns(sinks, windows, kv, b, baseline if layout == "per kv group" else None)
    launched = []
    real_launcher = da.launcher
    da.launcher = lambda kernel, like: (launched.append(kernel.fn.__name__), real_launcher(kernel, like))[1]
    try:
        cols["decode kernel"][0](q, k, v)
    finally:
        da.launcher = real_launcher
    if launched != ["_decode_split_kernel"]:
        raise SystemExit(f"{layout}: the decode kernel did not run ({launched})")
    for name, (fn, expected) in cols.items():
        if expected is None:
            continue
        err = rel_err(fn(q, k, v, out=torch.full_like(q, float("nan"))), wide_ref if expected == "widest" else ref)
        row[f"{name} err"] = err
        if not err < MAX_REL_ERR:
            raise SystemExit(f"{name}, {layout}, B{b} KV{kv}: rel err {err:.3e}; not timing")
    del ref, wide_ref
    row["sdpa normal"], row["sdpa graph"] = time_both(
        sets, lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, scale=SCALE, enable_gqa=True))
    for name, (fn, _) in cols.items():
        call = lambda q_, k_, v_, f=fn: f(q_, k_, v_)  # noqa: E731
        if name == "from mask, reference":
            row[f"{name} normal"], row[f"{name} graph"] = bench_ms(Cycle(sets, call)), float("nan")
        else:
            row[f"{name} normal"], row[f"{name} graph"] = time_both(sets, call)
    log(json.dumps({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in row.items()}))
    del sets, q, k, v
    torch.cuda.empty_cache()
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="8")
    ap.add_argument("--lengths", default="32768,131072")
    ap.add_argument("--baseline", default=None, help="another decode_attention.py, timed on the per-kv-group layout")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/decode_group_rules.py needs a CUDA device")
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"source {source_version()}")
    baseline = None
    if args.baseline:
        from decode_kernel import load_module
        baseline = load_module(args.baseline, "decode_attention_baseline")
    rows = [run(b, kv, layout, log, baseline) for layout in LAYOUTS for b in map(int, args.batches.split(","))
            for kv in map(int, args.lengths.split(","))]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "source": source_version(), "rows": rows}, f, indent=1)
    # the columns in the order run() timed them (the first layout has no baseline columns)
    names = [n[:-len(" graph")] for n in rows[0] if n.endswith(" graph") and n != "sdpa graph"]
    print("\nus per call, graph replay / plain call; x = the anchor's time over the column's (graph; the reference: "
          "plain calls)")
    print("| layout | B | KV | SDPA | " + " | ".join(names) + " | decode kernel x SDPA | decode kernel x prefill "
          "kernel | from mask: kernel x reference |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for r in rows:
        cells = [r["layout"], str(r["b"]), f"{r['kv'] // 1024}K",
                 f"{r['sdpa graph'] * 1e3:.1f} / {r['sdpa normal'] * 1e3:.1f}"]
        cells += [f"{r[n + ' graph'] * 1e3:.1f} / {r[n + ' normal'] * 1e3:.1f}" for n in names]
        cells += [f"{r['sdpa graph'] / r['decode kernel graph']:.2f}",
                  f"{r['prefill kernel graph'] / r['decode kernel graph']:.2f}",
                  f"{r['from mask, reference normal'] / r['from mask, kernel normal']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "baseline decode kernel graph" in r:
            print(f"{r['layout']}, B{r['b']} KV{r['kv'] // 1024}K: "
                  f"decode kernel {r['decode kernel graph'] * 1e3:.1f} us "
                  f"against the baseline's {r['baseline decode kernel graph'] * 1e3:.1f} us (graph), "
                  f"{r['decode kernel normal'] * 1e3:.1f} / {r['baseline decode kernel normal'] * 1e3:.1f} us (plain); "
                  f"from mask {r['from mask, kernel graph'] * 1e3:.1f} us against the baseline's "
                  f"{r['baseline from mask, kernel graph'] * 1e3:.1f} us (graph), "
                  f"{r['from mask, kernel normal'] * 1e3:.1f} / {r['baseline from mask, kernel normal'] * 1e3:.1f} us "
                  f"(plain)")
    if not all(math.isfinite(r["decode kernel graph"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
