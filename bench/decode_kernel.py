"""Sparse decode attention: the split-KV kernel against dense SDPA, with the kept K/V bandwidth.

    python bench/decode_kernel.py [--baseline OLD.py] [--sweep] [--compiled] [--json out.json]

Workload (TARGETS.md, decode): H=32, Hkv=8, D=128, bf16, one query row at the end of a KV cache of 32K or 128K,
streaming sink 128 + window 4096, at B = 1, 8 and 32. Every ratio's anchor, ``F.scaled_dot_product_attention``
over the whole cache (``enable_gqa=True``), is timed in the same run.

* Correctness first: each kernel's output (into a NaN-poisoned buffer) against a float64 oracle built from
  docs/spec.md alone (the kept keys gathered by index, GQA by ``repeat_interleave``), on random data.
* **graph**: ``do_bench`` median of one CUDA-graph replay of ``REPLAYS`` calls, divided by ``REPLAYS``: device
  time, launch gaps included. **normal**: ``do_bench`` median of one plain call (host launch cost included).
  The calls cycle over enough copies of q/K/V that the kept bytes of the cycle are several times the L2
  (60 MB on an H200), so no call reads K/V that the previous one left in the cache.
* ``TB/s kept``: the kept K/V bytes (``B * Hkv * (sink + window) * D * 2 * 2``) over the graph time.
* ``--baseline OLD.py`` also times another version of ``codegen/decode_attention.py`` (same wrapper signature),
  e.g. ``git show main:codegen/decode_attention.py > /tmp/old.py``.
* ``--sweep`` times launch shapes (tile, warps, stages, split count) at B=8, KV 32K, then the split target of the
  best shape at B=1 and B=32.
* ``--compiled`` also times the public path, ``torch.compile(backend="sparsecc")`` of a one-row SDPA module at B=8,
  against the same module compiled by Inductor (normal calls and graph replay).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

H, HKV, D = 32, 8, 128
SINK, WINDOW = 128, 4096
SCALE = D ** -0.5
BATCHES = (1, 8, 32)
LENGTHS = (32768, 131072)
REPLAYS = 8
# Bytes of kept K/V that one cycle of inputs must exceed (several times the H200's 60 MB L2).
CYCLE_BYTES = 256e6
MAX_REL_ERR = 1e-2


def bench_ms(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn, calls: int = REPLAYS) -> float:
    """Median ms per call of ``calls`` consecutive calls of ``fn`` replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):   # the warm-up's stream: its split counters already exist
        for _ in range(calls):
            fn()
    return bench_ms(graph.replay) / calls


def kept_bytes(b: int) -> int:
    return b * HKV * (SINK + WINDOW) * D * 2 * 2


def inputs(b: int, kv: int, copies: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n, s: torch.randn(b, n, s, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return [(mk(H, 1), mk(HKV, kv), mk(HKV, kv)) for _ in range(copies)]


def oracle(q, k, v):
    """float64 attention of the one query row at position S-1 over the keys docs/spec.md keeps for it."""
    s = k.shape[2]
    pos = s - 1
    j = torch.arange(s, device=k.device)
    idx = j[(j <= pos) & ((j < SINK) | (pos - j < WINDOW))]
    kk = k[:, :, idx].double().repeat_interleave(H // HKV, 1)
    vv = v[:, :, idx].double().repeat_interleave(H // HKV, 1)
    return torch.softmax((q.double() @ kk.transpose(-1, -2)) * SCALE, -1) @ vv


def rel_err(out, ref) -> float:
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return err if math.isfinite(err) else float("inf")


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses look their module up there while the file runs
    spec.loader.exec_module(mod)
    return mod


def decode_call(mod, q, k, v, out=None, config=None):
    kw = {} if config is None else {"config": config}
    return mod.streaming_decode(q, k, v, None, SCALE, True, None, None, out=out, rules=([SINK] * H, [WINDOW] * H),
                                **kw)


class Cycle:
    """Calls ``fn(*inputs[i])`` with i cycling over the input sets (a fresh set per call)."""

    def __init__(self, sets, fn):
        self.sets, self.fn, self.i = sets, fn, 0

    def __call__(self):
        q, k, v = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(q, k, v)


def time_both(sets, fn) -> tuple[float, float]:
    """(normal ms, graph ms) of ``fn`` cycling over ``sets``; the graph holds a whole number of cycles."""
    normal = bench_ms(Cycle(sets, fn))
    calls = max(REPLAYS, len(sets))
    calls -= calls % len(sets)
    return normal, graph_ms(Cycle(sets, fn), calls)


def ceilings(log) -> dict:
    """Device-to-device copy (bytes read + written) and a read-only reduction, in TB/s."""
    a = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)   # 2 GiB
    bcopy = torch.empty_like(a)
    t_copy = bench_ms(lambda: bcopy.copy_(a))
    t_sum = bench_ms(lambda: a.sum(dtype=torch.float32))
    res = {"copy_tbs": 2 * a.numel() * 2 / t_copy / 1e9, "read_tbs": a.numel() * 2 / t_sum / 1e9}
    log(f"ceilings: copy {res['copy_tbs']:.2f} TB/s (read + write), sum {res['read_tbs']:.2f} TB/s (read)")
    del a, bcopy
    torch.cuda.empty_cache()
    return res


def copies_for(b: int) -> int:
    return max(1, math.ceil(CYCLE_BYTES / kept_bytes(b)))


def run_workload(b, kv, mods, log) -> dict:
    sets = inputs(b, kv, copies_for(b), seed=b * 7 + kv)
    q, k, v = sets[0]
    ref = oracle(q, k, v)
    row = {"b": b, "kv": kv, "kept_mb": kept_bytes(b) / 1e6, "copies": len(sets)}
    for name, mod in mods.items():
        err = rel_err(decode_call(mod, q, k, v, out=torch.full_like(q, float("nan"))), ref)
        row[f"{name}_err"] = err
        if not err < MAX_REL_ERR:
            raise SystemExit(f"{name} B{b} KV{kv}: rel err {err:.3e}; not timing")
    del ref
    row["sdpa_normal"], row["sdpa_graph"] = time_both(
        sets, lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, scale=SCALE, enable_gqa=True))
    for name, mod in mods.items():
        row[f"{name}_normal"], row[f"{name}_graph"] = time_both(sets, lambda q_, k_, v_, m=mod: decode_call(m, q_, k_, v_))
    from sparsecc.codegen.block_attention import streaming_attention
    row["public_normal"] = bench_ms(Cycle(sets, lambda q_, k_, v_: streaming_attention(
        q_, k_, v_, sink=[SINK], window=[WINDOW], scale=SCALE, causal=True)))
    for name in mods:
        row[f"{name}_tbs"] = kept_bytes(b) / (row[f"{name}_graph"] * 1e-3) / 1e12
        row[f"{name}_x_graph"] = row["sdpa_graph"] / row[f"{name}_graph"]
        row[f"{name}_x_normal"] = row["sdpa_normal"] / row[f"{name}_normal"]
    log(json.dumps({k_: (round(v_, 5) if isinstance(v_, float) else v_) for k_, v_ in row.items()}))
    del sets, q, k, v
    torch.cuda.empty_cache()
    return row


SWEEP_SHAPES = ([(32, w, st) for w in (1, 2, 4) for st in (3, 4, 5)]
                + [(64, w, st) for w in (1, 2, 4, 8) for st in (2, 3, 4, 5)]
                + [(128, w, st) for w in (2, 4, 8) for st in (2, 3, 4)])
SWEEP_SPLITS = {32: (2, 4, 6, 8), 64: (2, 3, 4, 6, 8), 128: (1, 2, 3, 4)}


def sweep(new, log) -> list:
    """Graph-replay time of launch shapes at B=8, KV 32K; then the split target of the best ones at B=1 and B=32,
    and the fixed cost of the best (its time against the kept window at B=8)."""
    from triton.runtime.errors import OutOfResources

    results = []

    def one(b, sets, ref, cfg, rules=None, tag=""):
        try:
            call = lambda q_, k_, v_, o=None: new.streaming_decode(  # noqa: E731
                q_, k_, v_, None, SCALE, True, None, None, out=o, rules=rules or ([SINK] * H, [WINDOW] * H),
                config=cfg)
            err = rel_err(call(*sets[0], torch.full_like(sets[0][0], float("nan"))), ref) if ref is not None else 0.0
            ms = graph_ms(Cycle(sets, call), max(REPLAYS, len(sets)) // len(sets) * len(sets))
        except OutOfResources:
            log(f"sweep B{b} {cfg}: out of resources")
            return None
        r = dict(b=b, tag=tag, config=dataclasses.asdict(cfg), err=err, graph_ms=ms,
                 tbs=kept_bytes(b) / (ms * 1e-3) / 1e12)
        log(f"sweep B{b}{tag} {tuple(r['config'].values())} err {err:.1e} {ms * 1e3:.1f} us {r['tbs']:.2f} TB/s")
        results.append(r)
        return r

    sets = inputs(8, 32768, copies_for(8), seed=5)
    ref = oracle(*sets[0])
    for bn, w, st in SWEEP_SHAPES:
        for n_split in SWEEP_SPLITS[bn]:
            one(8, sets, ref, new.DecodeConfig(block_n=bn, num_warps=w, num_stages=st, n_split=n_split))
    good = sorted((r for r in results if r["err"] < MAX_REL_ERR), key=lambda r: r["graph_ms"])
    if not good:
        raise SystemExit("sweep: no launch shape computed the right answer")
    top = [r["config"] for r in good[:3]]
    log(f"sweep best at B8: {top}")
    # fixed cost: the best shape with a smaller window (no sink) against the whole kept window
    best = new.DecodeConfig(**top[0])
    for window in (128, 1024, 2048):
        one(8, sets, None, best, rules=([0] * H, [window] * H), tag=f" window {window}")
    del sets, ref
    for b in (1, 32):
        sets = inputs(b, 32768, copies_for(b), seed=6)
        ref = oracle(*sets[0])
        for cfg in top:
            for pps in (1, 2, 3, 4):
                one(b, sets, ref, new.DecodeConfig(**{**cfg, "n_split": None, "programs_per_sm": pps}))
        del sets, ref
        torch.cuda.empty_cache()
    return results


def compiled_rows(log) -> list:
    """The public path: a one-row SDPA module compiled by sparsecc (streaming spec) against Inductor's dense."""
    import torch.nn as nn

    class DecodeAttention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    spec = {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": SINK, "window": WINDOW}]}
    rows = []
    for kv in LENGTHS:
        torch._dynamo.reset()
        sets = inputs(8, kv, copies_for(8), seed=11)
        sparse = torch.compile(DecodeAttention(), backend="sparsecc", options={"spec": spec}, dynamic=False)
        dense = torch.compile(DecodeAttention(), dynamic=False)
        q, k, v = sets[0]
        pos = kv - 1
        j = torch.arange(kv, device="cuda")
        keep = (j < SINK) | ((pos - j).abs() < WINDOW)   # bidirectional rule: the one row sits at the end
        idx = j[keep]
        kk = k[:, :, idx].double().repeat_interleave(H // HKV, 1)
        vv = v[:, :, idx].double().repeat_interleave(H // HKV, 1)
        ref = torch.softmax((q.double() @ kk.transpose(-1, -2)) * SCALE, -1) @ vv
        err = rel_err(sparse(q, k, v), ref)
        if not err < MAX_REL_ERR:
            raise SystemExit(f"compiled sparse KV{kv}: rel err {err:.3e}")
        sn, sg = time_both(sets, lambda q_, k_, v_: sparse(q_, k_, v_))
        dn, dg = time_both(sets, lambda q_, k_, v_: dense(q_, k_, v_))
        row = dict(kv=kv, err=err, sparse_normal=sn, sparse_graph=sg, dense_normal=dn, dense_graph=dg,
                   x_normal=dn / sn, x_graph=dg / sg, tbs=kept_bytes(8) / (sg * 1e-3) / 1e12)
        log("compiled " + json.dumps({k_: round(v_, 5) for k_, v_ in row.items()}))
        rows.append(row)
        del sets, q, k, v, kk, vv, ref
        torch.cuda.empty_cache()
    return rows


def table(rows, names) -> list:
    lines = ["| B | KV | SDPA us (graph / normal) | "
             + " | ".join(f"{n} us (graph / normal) | {n} x SDPA (graph / normal) | {n} TB/s kept" for n in names)
             + " | public call us |",
             "|---|---|---|" + "---|---|---|" * len(names) + "---|"]
    for r in rows:
        cells = [str(r["b"]), f"{r['kv'] // 1024}K", f"{r['sdpa_graph'] * 1e3:.1f} / {r['sdpa_normal'] * 1e3:.1f}"]
        for n in names:
            cells += [f"{r[n + '_graph'] * 1e3:.1f} / {r[n + '_normal'] * 1e3:.1f}",
                      f"{r[n + '_x_graph']:.2f} / {r[n + '_x_normal']:.2f}", f"{r[n + '_tbs']:.2f}"]
        cells.append(f"{r['public_normal'] * 1e3:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="another decode_attention.py to time beside this one")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/decode_kernel.py needs a CUDA device")
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    from sparsecc.codegen import decode_attention as new

    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"source {source_version()}, default config {new.DEFAULT_CONFIG}")
    mods = {"new": new}
    if args.baseline:
        mods = {"old": load_module(args.baseline, "decode_attention_baseline"), "new": new}
    out = {"ceilings": ceilings(log)}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    if args.sweep:
        out["sweep"] = sweep(new, log)
        save()
    out["rows"] = []
    for b in map(int, args.batches.split(",")):
        for kv in LENGTHS:
            out["rows"].append(run_workload(b, kv, mods, log))
            save()
    if args.compiled:
        out["compiled"] = compiled_rows(log)
        save()
    print("\n".join(table(out["rows"], list(mods))))
    for r in out.get("compiled", []):
        print(f"compiled B8 KV{r['kv'] // 1024}K: sparsecc {r['sparse_graph'] * 1e3:.1f} / {r['sparse_normal'] * 1e3:.1f} us "
              f"(graph / normal), Inductor dense {r['dense_graph'] * 1e3:.1f} / {r['dense_normal'] * 1e3:.1f} us, "
              f"x {r['x_graph']:.2f} / {r['x_normal']:.2f}, {r['tbs']:.2f} TB/s kept")


if __name__ == "__main__":
    main()
