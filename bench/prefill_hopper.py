"""Streaming prefill: the Gluon kernel for Hopper (codegen/streaming_prefill_hopper.py) against the Triton kernel.

For each length: dense causal SDPA (the anchor), sparsecc's Triton prefill kernel (``launch_prefill``), what the
streaming wrapper dispatches to (``streaming_attention``: the Gluon program on sm_90, codegen/hopper_prefill.py),
the Gluon kernel in each ``--variants``, and Flex-Triton (``--flex``), all in one process. Every Gluon variant is
first checked against the float64 reference at small shapes (odd lengths, chunked prefill, GQA, a window wider
than the sequence). The Triton kernel is not checked here (bench/attention.py and the GPU tests do): it autotunes
at every new shape, and with it in the checks a run on the H200 was still checking after 100 s. "of ideal" =
(SDPA time / kernel time) x the kept share of causal 128 x 128 blocks, as in bench/attention.py.

``--random`` adds bench/attention.py's random ~10% block layout (128-blocks, per-head draws) at the lengths given:
the Triton table kernel, ``block_sparse_attention`` (which dispatches to the Gluon table program on sm_90) and the
Gluon variants over the same table, each variant first checked against the float64 table reference.

    python bench/prefill_hopper.py --lengths 16384,32768 --hkv 32,8 --variants s3,ws2,ws3 --flex
    python bench/prefill_hopper.py --no-streaming --random 16384,32768,65536 --hkv 32 --variants ws3,pp3 --flex
    python bench/prefill_hopper.py --hkv 8 --variants pp3p --flex --random 16384,32768,65536 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

import torch

from sparsecc.codegen.block_attention import (block_sparse_attention, block_sparse_attention_ref, kernel_rules,
                                              launch_prefill, rule_vectors, streaming_attention,
                                              streaming_attention_ref)
from sparsecc.layouts import block_sparse_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from attention import (RANDOM_BLOCKS, SINK, WINDOW, bench, flex_call, qkv, random_form, rel_err, sdpa,  # noqa: E402
                       streaming_flex_mask)
from provenance import source_version  # noqa: E402 - bench/ is on the path


def variant_kwargs(name: str) -> dict:
    """``s3`` -> stages=3; ``ws2`` -> warp_specialized at stages=2; ``pp3`` -> warp-specialised ping-pong; a
    trailing ``p`` on ``ws`` / ``pp`` (``ws3p``) -> persistent (one program per SM)."""
    if name[:2] in ("ws", "pp") and name.endswith("p"):
        return dict(variant_kwargs(name[:-1]), persistent=True)
    if name.startswith("pp"):
        return dict(stages=int(name[2:]), warp_specialized=True, pingpong=True)
    if name.startswith("ws"):
        return dict(stages=int(name[2:]), warp_specialized=True)
    return dict(stages=int(name[1:]))


def check(variants, log) -> bool:
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    ok = True
    cases = [(1, 4, 2, 1024, 1024, 64, 256, torch.bfloat16), (2, 8, 8, 1000, 1000, 100, 300, torch.float16),
             (1, 4, 4, 640, 1536, 128, 512, torch.bfloat16), (1, 2, 1, 777, 777, 0, 5000, torch.bfloat16),
             (1, 4, 2, 4096, 4096, 128, 1024, torch.float16),
             (2, 8, 2, 2048, 2048, 128, 512, torch.bfloat16)]   # 256 query tiles: several per persistent program
    for b, h, hkv, sq, sk, sink, window, dtype in cases:
        q, k, v = qkv(b, h, hkv, sq, sk, 128, seed=sq, dtype=dtype)
        ref = streaming_attention_ref(q.double(), k.double(), v.double(), sink=[sink] * h, window=[window] * h,
                                      scale=128 ** -0.5, causal=True)
        for name in variants:
            out = streaming_prefill_hopper(q, k, v, sink, window, **variant_kwargs(name))
            err = rel_err(out, ref)
            ok &= err < 1e-2
            log(f"check b{b} h{h}/{hkv} {sq}x{sk} sink {sink} window {window} {dtype} {name}: rel err {err:.2e}")
    return ok


def random_table(heads: int, s: int, random_blocks: int):
    """The random layout of bench/attention.py: 128-blocks, the diagonal and ``random_blocks`` per query block."""
    return block_sparse_table(random_form(s, random_blocks), heads, s, s, True, device="cuda")


def timed(candidates: dict, rounds: int) -> dict:
    """Median time of each candidate over ``rounds`` rounds, every round timing all candidates in turn, each round
    starting one candidate later: a slow stretch of the GPU (clocks, power), or a candidate that runs slower right
    after another, then costs every candidate alike instead of whichever ran during it or after it."""
    names = list(candidates)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(bench(candidates[name]))
    return {name: statistics.median(ts) for name, ts in times.items()}   # of two rounds, their mean


def time_row(label: str, s: int, hkv: int, density: float, fixed: dict, program, flex, variants, rounds: int,
             log) -> tuple:
    """Time ``fixed`` (sdpa, triton, shipped), ``program(**variant_kwargs(name))`` for each variant and ``flex``
    (None: not timed) in turns (:func:`timed`); log the times and return the table row."""
    candidates = dict(fixed)
    for name in variants:
        candidates[name] = functools.partial(program, **variant_kwargs(name))
    if flex is not None:
        candidates["flex"] = flex
    t = timed(candidates, rounds)
    t_gl = {name: t[name] for name in variants}
    t_flex = t.get("flex", float("nan"))
    log(f"{label}S={s} hkv={hkv}: sdpa {t['sdpa']:.3f} ms, triton {t['triton']:.3f}, shipped {t['shipped']:.3f}, "
        + ", ".join(f"gluon {name} {tn:.3f}" for name, tn in t_gl.items()) + f", flex {t_flex:.3f}")
    torch.cuda.empty_cache()
    return (s, hkv, density, t["sdpa"], t["triton"], t["shipped"], t_gl, min(t_gl, key=t_gl.get), t_flex)


def check_tables(variants, log) -> bool:
    from sparsecc.codegen.streaming_prefill_hopper import block_table_prefill_hopper

    ok = True
    for b, h, hkv, s, rnd, dtype in [(1, 4, 2, 1000, 3, torch.bfloat16), (2, 8, 8, 2048, 5, torch.float16)]:
        q, k, v = qkv(b, h, hkv, s, s, 128, seed=s, dtype=dtype)
        table = random_table(h, s, rnd)
        ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), table=table, scale=128 ** -0.5)
        for name in variants:
            err = rel_err(block_table_prefill_hopper(q, k, v, table, **variant_kwargs(name)), ref)
            ok &= err < 1e-2
            log(f"check table b{b} h{h}/{hkv} {s} random {rnd} {dtype} {name}: rel err {err:.2e}")
    return ok


def time_random(args, variants, log) -> list:
    """Random ~10% layouts: SDPA, the Triton table kernel, the dispatching wrapper, the Gluon variants, Flex."""
    from sparsecc.codegen.streaming_prefill_hopper import block_table_prefill_hopper

    rows = []
    for hkv in [int(x) for x in args.hkv.split(",")]:
        for s in [int(x) for x in args.random.split(",")]:
            q, k, v = qkv(1, 32, hkv, s, s, 128)
            table = random_table(32, s, RANDOM_BLOCKS[s])
            density = table.density()
            block_mask = table.to_flex_block_mask() if args.flex else None
            fixed = {"sdpa": lambda: sdpa(q, k, v, True),
                     "triton": lambda: launch_prefill(q, k, v, None, 128 ** -0.5, True, False, table=table),
                     "shipped": lambda: block_sparse_attention(q, k, v, table=table, scale=128 ** -0.5)}
            rows.append(time_row("random ", s, hkv, density, fixed,
                                 functools.partial(block_table_prefill_hopper, q, k, v, table),
                                 (lambda: flex_call(q, k, v, block_mask)) if args.flex else None,
                                 variants, args.rounds, log))
    return rows


def table_rows(rows, random_rows) -> list:
    """The values of the final table, one dict per row (``--json``); a time or ratio that was not measured (Flex
    without ``--flex``) is None."""
    def finite(x):
        return x if math.isfinite(x) else None

    out = []
    for layout, (s, hkv, density, t_sdpa, t_triton, t_ship, t_gl, best, t_flex) in (
            [("streaming", r) for r in rows] + [("random", r) for r in random_rows]):
        tg = t_gl[best]
        out.append(dict(layout=layout, s=s, hkv=hkv, kept=density, sdpa_ms=t_sdpa, triton_ms=t_triton,
                        shipped_ms=t_ship, best_gluon_ms=tg, best_gluon_variant=best, variant_ms=dict(t_gl),
                        triton_of_ideal=t_sdpa / t_triton * density, shipped_of_ideal=t_sdpa / t_ship * density,
                        best_gluon_of_ideal=t_sdpa / tg * density, shipped_x_triton=t_triton / t_ship,
                        flex_ms=finite(t_flex), shipped_x_flex=finite(t_flex / t_ship)))
    return out


def write_json(path, meta: dict, rows, random_rows) -> None:
    """``meta`` and the table's rows so far to ``path`` (rewritten after every row: a run cut short keeps them)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta, rows=table_rows(rows, random_rows)), f, indent=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--hkv", default="32,8")
    ap.add_argument("--variants", default="s3,ws2,ws3,pp2,pp3",
                    help="sN: software-pipelined at N stages; wsN: warp-specialised at N stages; "
                         "ppN: warp-specialised with ping-pong; wsNp / ppNp: the same, persistent (a program per SM)")
    ap.add_argument("--flex", action="store_true", help="time Flex-Triton too (compiles once per shape)")
    ap.add_argument("--random", default="", help="lengths of the random ~10%% block layout to time (e.g. 32768)")
    ap.add_argument("--no-streaming", action="store_true", help="time the random layouts only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every candidate this many times, in turns, and keep each one's median (odd: the "
                         "middle one)")
    ap.add_argument("--log", default=None)
    ap.add_argument("--json", default=None, help="also write the final table's rows here, as dicts")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} is not allowed; expected an integer >= 1")
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    def log(msg):
        print(msg, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(msg + "\n")

    variants = args.variants.split(",")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
                commit=source_version(), date=str(datetime.date.today()), variants=variants,
                rounds=args.rounds) if args.json else {}
    log(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, source {source_version()}, "
        f"{time.strftime('%Y-%m-%d')}")
    if not (check(variants, log) and (not args.random or check_tables(variants, log))):
        log("CORRECTNESS FAILED: no timings")
        return 1
    rows = []
    for hkv in [] if args.no_streaming else [int(x) for x in args.hkv.split(",")]:
        for s in [int(x) for x in args.lengths.split(",")]:
            q, k, v = qkv(1, 32, hkv, s, s, 128)
            scale = 128 ** -0.5
            table, block_mask = streaming_flex_mask(s, s)
            density = table.density()
            snk, win = kernel_rules([SINK] * 32, [WINDOW] * 32, s, s)
            sinks, windows = rule_vectors(tuple(snk), tuple(win), q)
            fixed = {"sdpa": lambda: sdpa(q, k, v, True),
                     "triton": lambda: launch_prefill(q, k, v, None, scale, True, False, sinks=sinks,
                                                      windows=windows),
                     "shipped": lambda: streaming_attention(q, k, v, sink=[SINK], window=[WINDOW], scale=scale,
                                                            causal=True)}
            rows.append(time_row("", s, hkv, density, fixed,
                                 functools.partial(streaming_prefill_hopper, q, k, v, SINK, WINDOW, scale),
                                 (lambda: flex_call(q, k, v, block_mask)) if args.flex else None,
                                 variants, args.rounds, log))
            write_json(args.json, meta, rows, [])
    random_rows = time_random(args, variants, log) if args.random else []
    write_json(args.json, meta, rows, random_rows)
    log("")
    log("| layout | S | Hkv | kept | SDPA ms | Triton ms | shipped ms | best Gluon ms (variant) | Triton of ideal "
        "| **shipped of ideal** | best Gluon of ideal | shipped x Triton | Flex ms | **shipped x Flex** |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")   # Flex not timed
    for r in table_rows(rows, random_rows):
        flex_ms, x_flex = (nan if r[key] is None else r[key] for key in ("flex_ms", "shipped_x_flex"))
        log(f"| {r['layout']} | {r['s'] // 1024}K | {r['hkv']} | {r['kept']:.4f} | {r['sdpa_ms']:.3f} "
            f"| {r['triton_ms']:.3f} | {r['shipped_ms']:.3f} | {r['best_gluon_ms']:.3f} ({r['best_gluon_variant']}) "
            f"| {r['triton_of_ideal']:.2f} | **{r['shipped_of_ideal']:.2f}** | {r['best_gluon_of_ideal']:.2f} "
            f"| {r['shipped_x_triton']:.2f} | {flex_ms:.3f} | **{x_flex:.2f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
