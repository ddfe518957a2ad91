"""What block_topk's estimates cost on the GPU: pooled (mean) against sampled rows (``pool = "rows"``).

    python bench/block_topk_estimate.py [--lengths 8192,32768,65536,131072] [--json OUT]

Per workload, in one run: dense SDPA (the anchor), the estimate + table build alone and the whole
``dynamic_block_attention`` for each estimate at the same fixed row budget, and the table's density (kept share of
the causal blocks). Two shapes: Llama-3-8B's attention (H=32, Hkv=8, D=128) and SmolLM2-135M's (H=9, Hkv=3,
D=64), bf16, batch 1, causal. ``ideal`` is 1 / density: SDPA's time scaled by the kept share. Random inputs select
arbitrary blocks, so the density is the budget's, not a model's. Medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}


def forms(block: int, topk: int):
    """The estimates compared, at one row budget (sink 1, local 1, ``topk`` others)."""
    from sparsecc.forms import BlockTopK

    return [BlockTopK(block=block, topk=topk), BlockTopK(block=block, topk=topk, pool="rows", rows=4),
            BlockTopK(block=block, topk=topk, pool="rows", rows=16)]


def bench(fn) -> float:
    """Median milliseconds of ``fn``."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(shape: str, s: int, block: int, topk: int) -> list:
    from sparsecc.codegen.dynamic_attention import dynamic_block_attention, dynamic_table

    h, hkv, d = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for n in (h, hkv, hkv))
    scale = d ** -0.5
    t_dense = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != hkv))
    rows = []
    for form in forms(block, topk):
        t_table = bench(lambda: dynamic_table(q, k, form, True, scale))
        t_all = bench(lambda: dynamic_block_attention(q, k, v, form=form, causal=True, scale=scale))
        density = dynamic_table(q, k, form, True, scale).density()
        rows.append(dict(shape=shape, seq=s, form=str(form), sdpa_ms=t_dense, estimate_ms=t_table, whole_ms=t_all,
                         density=density, estimate_share=t_table / t_dense, x_sdpa=t_dense / t_all,
                         of_ideal=(t_dense / t_all) * density))
        print(f"{shape} {s}: {form}: estimate {t_table:.3f} ms ({t_table / t_dense:.1%} of SDPA {t_dense:.3f}), "
              f"whole {t_all:.3f} ms = {t_dense / t_all:.2f}x SDPA, density {density:.4f}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def sweep(s: int) -> None:
    """Time the sampled-row estimate kernel alone under other launch knobs (Llama-3-8B's shape, 4 and 16 rows)."""
    from sparsecc.codegen.dynamic_attention_kernels import sampled_row_scores

    h, hkv, d = SHAPES["llama3-8b"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, n, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for n in (h, hkv))
    t_dense = bench(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True))
    for rows in (4, 16):
        for tile in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    launch = dict(num_warps=warps, num_stages=stages)
                    t = bench(lambda: sampled_row_scores(q, k, 128, rows, True, d ** -0.5, launch=launch, tile=tile))
                    print(f"sweep {s}: rows {rows} tile {tile} warps {warps} stages {stages}: {t:.3f} ms = "
                          f"{t / t_dense:.1%} of SDPA", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="8192,32768,65536,131072")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true", help="time the sampled-row kernel's launch knobs at 32K only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/block_topk_estimate.py needs a CUDA device")
    if args.sweep:
        sweep(32768)
        return
    rows = []
    for s in (int(x) for x in args.lengths.split(",")):
        # About a quarter of the causal blocks at 8K (SmolLM2's tuned budget), about 10% at 32K and above.
        block, topk = (64, 15) if s <= 8192 else (128, 12)
        for shape in SHAPES:
            rows += run(shape, s, block, topk)
    commit = source_version()
    header = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}, "
              f"{datetime.date.today().isoformat()}, commit {commit or '?'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, rows=rows), f, indent=1)
    print(header)
    print("| shape | seq | estimate | density | estimate / SDPA | whole x SDPA | of ideal |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['seq']} | {r['form']} | {r['density']:.4f} | {r['estimate_share']:.1%} | "
              f"{r['x_sdpa']:.2f} | {r['of_ideal']:.2f} |")


if __name__ == "__main__":
    main()
