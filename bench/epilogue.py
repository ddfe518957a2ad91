"""Benchmark generated epilogues and fused gate/up on a CUDA GPU: fused vs unfused.

Workload: x [8192, 4096] -> 14336 (a Llama-3-8B gate/up projection), bfloat16, 10%
of the 64 x 64 weight blocks kept. For each epilogue, three ways to compute it:

* ``fused``: the block-sparse kernel with the generated epilogue (one launch);
* ``bsr + torch``: the block-sparse kernel without epilogue, then the PyTorch ops;
* ``cublas + torch``: dense ``F.linear`` on the pruned weight, then the PyTorch ops.

Epilogues: bias + SiLU; SiLU then a gating multiply by a precomputed tensor; and the
whole gated product ``silu(x W_gᵀ) * (x W_uᵀ)`` as one fused gate/up kernel, as two
launches (up, then gate with ``mul:gate``), and unfused. Every variant is checked
against a float32 reference first; times are ``triton.testing.do_bench`` medians.
``--sweep`` also times a few launch configurations of the fused gate/up kernel (it
holds two accumulators, so its best tile may differ from the single-product one).

    python bench/epilogue.py [--sweep] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from sparsecc.codegen.block_sparse_linear import BlockLinearConfig, block_sparse_linear
from sparsecc.forms import BlockWeights
from sparsecc.weights import compress_block_weights

M, K, N = 8192, 4096, 14336
BLOCK, DENSITY = (64, 64), 0.10
DTYPE = torch.bfloat16
WARMUP_MS, REP_MS = 25, 100  # triton.testing.do_bench defaults
CHECK_TOL = 2e-2             # relative to the output scale: one bfloat16 rounding plus summation order
FUSED_SWEEP = [BlockLinearConfig(block_m, warps, stages, swap) for block_m, warps, stages, swap in (
    (64, 4, 3, False), (128, 4, 3, False), (128, 8, 3, False), (128, 8, 3, True), (128, 8, 4, True),
    (256, 8, 3, True))]


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn``."""
    import triton
    return triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Fail loudly when ``out`` is not ``ref`` within one output rounding."""
    scale = float(ref.abs().max().clamp(min=1.0))
    err = float((out.float() - ref).abs().max())
    if not err <= CHECK_TOL * scale:
        raise AssertionError(f"{name}: max error {err:.3g} exceeds {CHECK_TOL * scale:.3g}")


def main(argv: Optional[List[str]] = None) -> None:
    """Time every variant and print the table (and save it with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch configs of fused gate/up")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/epilogue.py needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(DTYPE)

    form = BlockWeights(BLOCK, DENSITY)
    wg = compress_block_weights(randn(N, K, scale=K ** -0.5), form)
    wu = compress_block_weights(randn(N, K, scale=K ** -0.5), form)
    dense_g, dense_u = wg.to_dense(), wu.to_dense()
    x, bias, gate = randn(M, K), randn(N), randn(M, N)
    g_ref = x.float() @ dense_g.float().T
    u_ref = x.float() @ dense_u.float().T
    up = (wu.blocks, wu.row_ptr, wu.col_idx)

    def bsr(w, **kw):
        return block_sparse_linear(x, w.blocks, w.row_ptr, w.col_idx, **kw)

    cases: Dict[str, tuple] = {
        "bias + silu": (F.silu(g_ref + bias.float()), {
            "fused": lambda: bsr(wg, bias=bias, epilogue="act:silu"),
            "bsr + torch": lambda: F.silu(bsr(wg) + bias),
            "cublas + torch": lambda: F.silu(F.linear(x, dense_g) + bias),
        }),
        "silu * gate": (F.silu(g_ref) * gate.float(), {
            "fused": lambda: bsr(wg, epilogue="act:silu;mul:gate", gate=gate),
            "bsr + torch": lambda: F.silu(bsr(wg)) * gate,
            "cublas + torch": lambda: F.silu(F.linear(x, dense_g)) * gate,
        }),
        "silu(x Wg) * (x Wu)": (F.silu(g_ref) * u_ref, {
            "fused": lambda: bsr(wg, epilogue="act:silu;mul:up", up=up),
            "two launches": lambda: bsr(wg, epilogue="act:silu;mul:gate", gate=bsr(wu)),
            "bsr + torch": lambda: F.silu(bsr(wg)) * bsr(wu),
            "cublas + torch": lambda: F.silu(F.linear(x, dense_g)) * F.linear(x, dense_u),
        }),
    }
    rows = []
    for case, (ref, variants) in cases.items():
        times = {}
        for variant, fn in variants.items():
            check(f"{case} / {variant}", fn(), ref)
            times[variant] = bench(fn)
            print(f"{case:<22} {variant:<16} {times[variant]:8.4f} ms", flush=True)
        for variant, t in times.items():
            rows.append({"case": case, "variant": variant, "ms": t,
                         "x_bsr_torch": times["bsr + torch"] / t, "x_cublas_torch": times["cublas + torch"] / t})
    if args.sweep:
        ref = cases["silu(x Wg) * (x Wu)"][0]
        for cfg in FUSED_SWEEP:
            def fn(cfg=cfg):
                return bsr(wg, epilogue="act:silu;mul:up", up=up, config=cfg)
            try:
                check(f"fused gate/up {cfg}", fn(), ref)
                t = bench(fn)
            except Exception as err:  # noqa: BLE001 - out of shared memory / registers: skip the config
                print(f"  {cfg}: failed ({type(err).__name__}: {err})")
                continue
            print(f"  {cfg}: {t:.4f} ms", flush=True)
            rows.append({"case": "silu(x Wg) * (x Wu)", "variant": f"fused {cfg}", "ms": t})

    print(f"\nx[{M},{K}] -> {N}, {BLOCK[0]}x{BLOCK[1]} blocks, {DENSITY:.0%} kept, {str(DTYPE)[6:]}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'epilogue':<22} {'variant':<40} {'ms':>8} {'x bsr+torch':>12} {'x cublas+torch':>15}")
    for r in rows:
        extra = f"{r['x_bsr_torch']:12.2f} {r['x_cublas_torch']:15.2f}" if "x_bsr_torch" in r else ""
        print(f"{r['case']:<22} {r['variant']:<40} {r['ms']:8.4f} {extra}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"shape": [M, K, N], "block": BLOCK, "density": DENSITY, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
