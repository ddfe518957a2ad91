"""Prefill kernel config sweep: time every tile / warps / stages / TMA choice.

One command (on a CUDA machine)::

    python bench/attention_sweep.py [--s 32768] [--hkv 8] [--d 128]

For each layout (sink 128 + window 4096 streaming, and per-head random blocks
at ~10% of causal blocks) it runs the prefill kernel with each config given
explicitly (no autotuner), checks the output against the autotuned kernel's,
and prints the median time, the TFLOP/s on kept blocks and the share of ideal
(SDPA's dense time, measured in the same run, times the kept share of causal
blocks, over the config's time), best first. The
autotuner's candidate lists in ``codegen/block_attention_kernels.py`` come
from this sweep.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

from sparsecc.codegen import block_attention as ba
from sparsecc.layouts import block_sparse_table, streaming_block_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from attention import RANDOM_BLOCKS, SINK, WINDOW, random_form  # noqa: E402 - the benches' layouts


def _time(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main(argv=None):
    """Sweep the configs and print one table per layout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s", default="32768", help="comma-separated sequence lengths")
    ap.add_argument("--layouts", default="stream,random", help="comma-separated: stream, random")
    ap.add_argument("--tiles", default="128x64,128x128", help="comma-separated BLOCK_MxBLOCK_N choices")
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--warps", default="8", help="comma-separated num_warps choices")
    ap.add_argument("--stages", default="2,3", help="comma-separated num_stages choices")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/attention_sweep.py needs a CUDA device")
    for s in (int(x) for x in args.s.split(",")):
        _sweep(args, s)


def _sweep(args, s: int) -> None:
    """Time every config at sequence length ``s`` and print the tables."""
    d = args.d
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, args.hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, args.hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = d ** -0.5
    sinks, windows = ba.rule_vectors((SINK,) * 32, (WINDOW,) * 32, q)
    table = block_sparse_table(random_form(s, RANDOM_BLOCKS.get(s, 13)), 32, s, s, True, device="cuda")
    # Kept share of causal 128-blocks, to turn times into TFLOP/s on the kept work.
    stream_table = streaming_block_table(SINK, WINDOW, block=128, seq_q=s, seq_k=s, causal=True, device="cuda")
    layouts = {
        "stream": (dict(sinks=sinks, windows=windows), stream_table.density()),
        "random": (dict(table=table), table.density()),
    }
    layouts = {name: layouts[name] for name in args.layouts.split(",")}
    causal_flops = 4 * 32 * s * s * d / 2  # two GEMMs of 2*S*S*D per head, causal half
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")]
    warps = [int(x) for x in args.warps.split(",")]
    stages = [int(x) for x in args.stages.split(",")]
    grid = [dict(BLOCK_M=bm, BLOCK_N=bn, USE_TMA=tma, num_warps=w, num_stages=st)
            for (bm, bn), w, st, tma in itertools.product(tiles, warps, stages, (False, True))]
    sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                          enable_gqa=True))
    for name, (kw, density) in layouts.items():
        ref = ba.launch_prefill(q, k, v, None, scale, True, False, **kw)
        rows = []
        for cfg in grid:
            try:
                out = torch.full_like(q, float("nan"))
                ba.launch_prefill(q, k, v, None, scale, True, False, out=out, config=cfg, **kw)
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                if not err < 1e-2:
                    rows.append((float("inf"), cfg, f"wrong (rel err {err:.2e})"))
                    continue
                t = _time(lambda: ba.launch_prefill(q, k, v, None, scale, True, False, out=out, config=cfg, **kw))
                rows.append((t, cfg, f"{causal_flops * density / t / 1e9:.0f} TFLOP/s, "
                                     f"{sdpa * density / t:.3f} of ideal"))
            except Exception as e:  # a config that does not compile or fit is reported, not fatal
                rows.append((float("inf"), cfg, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        rows.sort(key=lambda r: r[0])
        print(f"\n{name} S={s} Hkv={args.hkv} D={d} density {density:.3f}; SDPA {sdpa:.3f} ms "
              f"({causal_flops / sdpa / 1e9:.0f} TFLOP/s), ideal {sdpa * density:.3f} ms")
        for t, cfg, note in rows:
            print(f"  {t:8.3f} ms  {cfg}  {note}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
