"""Benchmark sparsecc's FFN / linear CUDA paths and write the measured crossover grid.

    python bench/ffn.py [--quick] [--sweep] [--no-write]

Three parts, each checked against a float32 reference before it is timed
(rel err < 1e-2 in bf16, or the run aborts):

1. Gate-mode (CATS) FFN, Llama-3-8B (D 4096, F 14336, gated SiLU, no biases),
   M in {1, 4, 16} tokens, 30/50/70/90% of neurons dropped per token; against the
   cuBLAS dense FFN and a torch gather FFN (dense gate, then ``index_select`` of
   the surviving up rows / down columns and two GEMMs; the survivor index is
   given, i.e. the ``nonzero`` host sync a real gather needs is not timed).
2. 2:4 (cuSPARSELt) at 4096 -> 14336, M in {1, 16, 128, 1024, 8192}: cuBLAS,
   plain cuSPARSELt, cuBLAS + separate bias/SiLU, cuSPARSELt + separate
   bias/SiLU, and cuSPARSELt with the bias fused and SiLU in place.
3. The crossover grid: speedup over dense per (density or sparsity, M) for every
   linear / FFN form (block_weights 64x64 via ``block_sparse_linear``,
   activation threshold via ``threshold_linear``, gate-mode, 2:4), written to
   ``bench/crossover_<device>.json``.

Timing: ``triton.testing.do_bench`` medians (``bench/linear.py``'s settings);
calls of at most 16 tokens are GEMV-sized and host-bound in eager mode, so they
are timed by CUDA-graph replay (``bench/linear.py``'s ``bench_graph``), all
columns of a row alike. The table is printed; a section "## FFN kernels
(bench/ffn.py)" replaces its previous version in ``bench/RESULTS.md`` (other
sections are kept) and PNG plots go to ``bench/plots/ffn_*.png`` unless
``--no-write``.

Crossover JSON (``bench/crossover_<slug>.json``)::

    {"device": str, "slug": str, "torch": str, "triton": str, "date": "YYYY-MM-DD", "commit": str,
     "dtype": "bfloat16", "quick": bool,
     "rows": [{"form": "block_weights" | "activation_threshold" | "gate_ffn" | "semi_structured",
               "shape": "KxN" (linear) or "DxF" (FFN), "tokens": M,
               "density": kept share of weights / neurons / input channels (2:4: 0.5),
               "kept_union": for activation forms, the share kept by at least one token,
               "sparse_ms": float, "dense_ms": float, "speedup": dense_ms / sparse_ms,
               "timing": "graph" | "do_bench"}],
     "crossover": {form: {str(M): the density below which the form beats dense, interpolated
                          linearly between the measured densities where the speedup crosses 1
                          (null: faster at every measured density; 0.0: slower already at the
                          sparsest one)}}}
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import source_version  # noqa: E402 - bench/ is on the path
from linear import bench, bench_graph, check  # noqa: E402 - the repo's timing conventions

from sparsecc.codegen.activation_sparse import threshold_linear  # noqa: E402
from sparsecc.codegen.block_sparse_linear import block_sparse_linear  # noqa: E402
from sparsecc.codegen.gate_sparse_ffn import GateConfig, gate_sparse_ffn  # noqa: E402
from sparsecc.codegen.semi_structured_linear import (cusparselt_available, prepared_weight,  # noqa: E402
                                                     semi_structured_linear, semi_structured_linear_act)
from sparsecc.forms import BlockWeights  # noqa: E402
from sparsecc.weights import compress_2to4, compress_block_weights  # noqa: E402

DTYPE = torch.bfloat16
D_MODEL, D_FF = 4096, 14336          # Llama-3-8B
GRAPH_MAX_TOKENS = 16                 # up to here a call is GEMV-sized: timed by graph replay
FFN_COPIES = 2                        # weight sets a graph cycles through: 2 x 352 MB is far beyond the 50 MB L2
SECTION = "## FFN kernels (bench/ffn.py)"
HERE = os.path.dirname(os.path.abspath(__file__))


def timed(calls: List[Callable[[], object]], tokens: int) -> tuple:
    """(ms, method): graph replay over ``calls`` for GEMV-sized calls, else a do_bench median of the first."""
    if tokens <= GRAPH_MAX_TOKENS:
        try:
            return bench_graph(calls), "graph"
        except RuntimeError as err:  # a library call that cannot be captured: say so and time eagerly
            print(f"  graph capture failed ({str(err).splitlines()[0][:80]}); do_bench instead")
    return bench(calls[0]), "do_bench"


# ------------------------------------------------------------------ gate-mode FFN


def gate_tau(x: torch.Tensor, wg: torch.Tensor, sparsity: float) -> float:
    """The threshold that drops ``sparsity`` of the |SiLU(x Wgᵀ)| values of these tokens."""
    a = F.silu(F.linear(x, wg)).float().abs().flatten()
    return float(torch.quantile(a[: 2 ** 24], sparsity))


def gate_ffn_expected(x, wg, wu, wd, tau):
    """float32 oracle with the kernel's roundings (gate output, activation, g in bf16)."""
    a = F.silu((x.float() @ wg.float().T).to(DTYPE).float()).to(DTYPE).float()
    keep = a.abs() > float(torch.tensor(tau, dtype=DTYPE))
    h = (a * keep * (x.float() @ wu.float().T).to(DTYPE).float()).to(DTYPE).float()
    return h @ wd.float().T, keep


def gate_rows(tokens: List[int], sparsities: List[float], sweep: bool) -> List[dict]:
    """Time the gate-mode FFN against the dense and gather FFNs for each (M, sparsity)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    sets = []
    for _ in range(FFN_COPIES):
        wg = torch.randn(D_FF, D_MODEL, device="cuda", dtype=DTYPE, generator=gen) / D_MODEL ** 0.5
        wu = torch.randn(D_FF, D_MODEL, device="cuda", dtype=DTYPE, generator=gen) / D_MODEL ** 0.5
        wd = torch.randn(D_MODEL, D_FF, device="cuda", dtype=DTYPE, generator=gen) / D_FF ** 0.5
        # The layout the compiler binds: W_down K-major, passed as the [D, F] view (no cache copy).
        sets.append((wg, wu, wd.t().contiguous().t()))
    rows = []
    for m in tokens:
        x = torch.randn(m, D_MODEL, device="cuda", dtype=DTYPE, generator=gen)

        def dense(s):
            wg, wu, wd = s
            return lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        t_dense, how = timed([dense(s) for s in sets], m)
        for sparsity in sparsities:
            wg, wu, wd = sets[0]
            tau = gate_tau(x, wg, sparsity)
            ref, keep = gate_ffn_expected(x, wg, wu, wd, tau)
            name = f"gate FFN M={m} sparsity {sparsity:.0%}"
            print(name, flush=True)
            out = torch.full((m, D_MODEL), float("nan"), device="cuda", dtype=DTYPE)
            check(name, gate_sparse_ffn(x, wg, None, wu, None, wd, None, "silu", tau, out=out), ref)

            def ours(s, cfg=None):
                return lambda: gate_sparse_ffn(x, s[0], None, s[1], None, s[2], None, "silu", tau, config=cfg)
            t_ours, _ = timed([ours(s) for s in sets], m)
            idx = keep.any(0).nonzero().squeeze(-1)
            wdt = [s[2].t() for s in sets]  # K-major [F, D] buffers: a row gather per surviving neuron

            def gather(s, wdt_s):
                def run():
                    h = F.silu(F.linear(x, s[0]))
                    h = h * (h.abs() > tau)
                    up = F.linear(x, s[1].index_select(0, idx))
                    return (h.index_select(1, idx) * up) @ wdt_s.index_select(0, idx)
                return run
            t_gather, _ = timed([gather(s, w) for s, w in zip(sets, wdt)], m)
            kept = idx.numel() / D_FF
            note = ""
            if sweep:
                best = (t_ours, "default")
                for cfg in GATE_SWEEP[m == 1]:
                    best = min(best, (timed([ours(s, cfg) for s in sets], m)[0], str(cfg)))
                note = f"best {best[0] * 1e3:.1f}us {best[1]}"
            rows.append(dict(form="gate_ffn", shape=f"{D_MODEL}x{D_FF}", tokens=m, density=1 - sparsity,
                             kept_union=kept, sparse_ms=t_ours, dense_ms=t_dense, gather_ms=t_gather,
                             speedup=t_dense / t_ours, ideal=3 / (1 + 2 * kept), timing=how, note=note))
    return rows


GATE_SWEEP = {  # [one token?] -> configs tried by --sweep
    True: [GateConfig(bf, bd, w) for bf in (16, 32) for bd in (256, 512, 1024) for w in (4, 8)],
    False: [GateConfig(bf, bd, w) for bf in (16, 32, 64) for bd in (64, 128, 256) for w in (4, 8)],
}


# ------------------------------------------------------------------ 2:4


def semi_rows(tokens: List[int], k: int = D_MODEL, n: int = D_FF) -> List[dict]:
    """cuBLAS vs cuSPARSELt (plain, separate epilogue, fused bias + in-place SiLU) per M."""
    if not cusparselt_available():
        print("2:4: this torch build has no cuSPARSELt; skipped")
        return []
    gen = torch.Generator(device="cuda").manual_seed(3)
    w = torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5
    c = compress_2to4(w)
    wd = c.to_dense()
    bias = torch.randn(n, device="cuda", dtype=DTYPE, generator=gen)
    rows = []
    for m in tokens:
        name = f"2:4 x[{m},{k}]->{n}"
        print(name, flush=True)
        x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
        ref = x.float() @ wd.float().T
        check(name + " plain", semi_structured_linear(x, c.values, c.indices, None), ref)
        check(name + " bias+silu", semi_structured_linear_act(x, c.values, c.indices, bias, "silu"),
              F.silu(ref + bias.float()))
        assert prepared_weight(c.values, c.indices, n, k, DTYPE).packed is not None, "cuSPARSELt was not used"
        t = {}
        t["cublas"], how = timed([lambda: F.linear(x, wd)], m)
        t["cslt"], _ = timed([lambda: semi_structured_linear(x, c.values, c.indices, None)], m)
        t["cublas_epi"], _ = timed([lambda: F.silu(F.linear(x, wd, bias))], m)
        t["cslt_epi"], _ = timed([lambda: F.silu(semi_structured_linear(x, c.values, c.indices, None) + bias)], m)
        t["cslt_fused"], _ = timed([lambda: semi_structured_linear_act(x, c.values, c.indices, bias, "silu")], m)
        alg = searched_alg(c, x, bias) if m >= SEARCH_FROM_TOKENS else 0
        if alg:
            t[f"cslt_fused_alg{alg}"], _ = timed(
                [lambda: semi_structured_linear_act(x, c.values, c.indices, bias, "silu", alg_id=alg)], m)
        rows.append(dict(form="semi_structured", shape=f"{k}x{n}", tokens=m, density=0.5, sparse_ms=t["cslt"],
                         dense_ms=t["cublas"], speedup=t["cublas"] / t["cslt"], timing=how,
                         fused_speedup=t["cublas_epi"] / t["cslt_fused"], times=t))
    return rows


SEARCH_FROM_TOKENS = 1024  # cuSPARSELt's algorithm search is also timed from this many tokens on


def searched_alg(c, x: torch.Tensor, bias: torch.Tensor) -> int:
    """cuSPARSELt's own pick of algorithm id for this product (0 when the search is unavailable)."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        return 0
    packed = prepared_weight(c.values, c.indices, *c.shape, x.dtype).packed
    pad = (-x.shape[0]) % 8  # the dense operand's multiple, as in semi_structured_linear
    xp = F.pad(x, (0, 0, 0, pad)) if pad else x
    try:
        return int(search(packed, xp.t(), bias=bias, transpose_result=True))
    except (RuntimeError, TypeError) as err:  # refused, or another signature in this build: keep alg 0
        print(f"  cuSPARSELt algorithm search failed ({str(err).splitlines()[0][:80]})")
        return 0


# ------------------------------------------------------------------ other forms of the grid


def block_rows(tokens: List[int], densities: List[float], k: int = D_MODEL, n: int = D_FF) -> List[dict]:
    """block_sparse_linear (64x64 blocks) against cuBLAS per (density, M)."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    w = torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5
    rows = []
    for density in densities:
        c = compress_block_weights(w, BlockWeights(block=(64, 64), density=density))
        wdense = c.to_dense()
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
            check(f"bsr M={m} density {density:.0%}", block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None),
                  x.float() @ wdense.float().T)
            t_ours, how = timed([lambda: block_sparse_linear(x, c.blocks, c.row_ptr, c.col_idx, None)], m)
            t_dense, _ = timed([lambda: F.linear(x, w)], m)
            rows.append(dict(form="block_weights", shape=f"{k}x{n}", tokens=m, density=density, sparse_ms=t_ours,
                             dense_ms=t_dense, speedup=t_dense / t_ours, timing=how))
    return rows


def threshold_rows(tokens: List[int], sparsities: List[float], k: int = D_MODEL, n: int = D_FF) -> List[dict]:
    """threshold_linear (TEAL input mode) against cuBLAS per (sparsity, M); K-major weights as compiled."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    ws = [torch.randn(n, k, device="cuda", dtype=DTYPE, generator=gen) / k ** 0.5 for _ in range(6)]
    kmajor = [w.t().contiguous() for w in ws]
    rows = []
    for m in tokens:
        x = torch.randn(m, k, device="cuda", dtype=DTYPE, generator=gen)
        t_dense, how = timed([lambda w=w: F.linear(x, w) for w in ws], m)
        for sparsity in sparsities:
            tau = float(torch.quantile(x.abs().float().flatten(), sparsity))
            keep = x.abs() > tau
            check(f"threshold M={m} sparsity {sparsity:.0%}", threshold_linear(x, kmajor[0].t(), None, tau),
                  (x.float() * keep) @ ws[0].float().T)
            t_ours, _ = timed([lambda wk=wk: threshold_linear(x, wk.t(), None, tau) for wk in kmajor], m)
            rows.append(dict(form="activation_threshold", shape=f"{k}x{n}", tokens=m, density=1 - sparsity,
                             kept_union=float(keep.any(0).float().mean()), sparse_ms=t_ours, dense_ms=t_dense,
                             speedup=t_dense / t_ours, timing=how))
    return rows


def crossovers(rows: List[dict]) -> Dict[str, Dict[str, Optional[float]]]:
    """Per form and M: the density where speedup falls to 1, interpolated between measured densities."""
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for form in sorted({r["form"] for r in rows}):
        out[form] = {}
        for m in sorted({r["tokens"] for r in rows if r["form"] == form}):
            pts = sorted((r["density"], r["speedup"]) for r in rows if r["form"] == form and r["tokens"] == m)
            if all(s > 1 for _, s in pts):
                out[form][str(m)] = None
                continue
            if pts[0][1] <= 1:  # already slower at the sparsest measured point
                out[form][str(m)] = 0.0
                continue
            cross = pts[-1][0]
            for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
                if s0 > 1 >= s1:
                    cross = d0 + (d1 - d0) * (s0 - 1) / (s0 - s1)
                    break
            out[form][str(m)] = round(cross, 4)
    return out


# ------------------------------------------------------------------ output


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the first letters+digits model token of the device name."""
    match = re.search(r"\b([A-Za-z]+\d+[A-Za-z]*)\b", name.replace("NVIDIA", ""))
    return match.group(1).lower() if match else re.sub(r"\W+", "_", name.lower())


def header() -> dict:
    """Device, stack, date and commit of this run."""
    import triton
    commit = source_version()
    name = torch.cuda.get_device_name()
    return dict(device=name, slug=device_slug(name), torch=torch.__version__, triton=triton.__version__,
                date=str(datetime.date.today()), commit=commit or "?", dtype=str(DTYPE).replace("torch.", ""))


def markdown(head: dict, gate: List[dict], semi: List[dict], grid: Dict, quick: bool, json_name: str) -> str:
    """The RESULTS.md section for this run."""
    lines = [SECTION, "",
             f"Device: {head['device']} (torch {head['torch']}, triton {head['triton']}), {head['date']}, "
             f"commit {head['commit']}, {head['dtype']}{', --quick' if quick else ''}.",
             "Every row checked against a float32 reference before timing (rel err < 1e-2). M <= 16: ms per call "
             "replayed from a CUDA graph (weights rotated past L2); larger M: `do_bench` medians.", "",
             "### Gate-mode (CATS) FFN, Llama-3-8B 4096 -> 14336 -> 4096, gated SiLU", "",
             "| M | sparsity | union kept | sparsecc ms | cuBLAS FFN ms | gather ms | x cuBLAS | x gather | ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in gate:
        lines.append(f"| {r['tokens']} | {1 - r['density']:.0%} | {r['kept_union']:.0%} | {r['sparse_ms']:.4f} | "
                     f"{r['dense_ms']:.4f} | {r['gather_ms']:.4f} | {r['speedup']:.2f} | "
                     f"{r['gather_ms'] / r['sparse_ms']:.2f} | {r['ideal']:.2f} |")
    lines += ["", "ideal = dense bytes / sparse bytes = 3 / (1 + 2 x union kept): the gate is always read in full.", ""]
    if semi:
        lines += ["### 2:4 via cuSPARSELt, 4096 -> 14336", "",
                  "| M | cuBLAS | cuSPARSELt | x | cuBLAS + bias+SiLU | cuSPARSELt + sep. bias+SiLU | "
                  "cuSPARSELt fused bias, SiLU in place | x (fused vs cuBLAS+epi) |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in semi:
            t = r["times"]
            lines.append(f"| {r['tokens']} | {t['cublas']:.4f} | {t['cslt']:.4f} | {r['speedup']:.2f} | "
                         f"{t['cublas_epi']:.4f} | {t['cslt_epi']:.4f} | {t['cslt_fused']:.4f} | "
                         f"{r['fused_speedup']:.2f} |")
        for r in semi:
            for key, value in r["times"].items():
                prefix = "cslt_fused_alg"
                if key.startswith(prefix):
                    lines.append(f"\nM={r['tokens']}: with cuSPARSELt's searched algorithm (id {key[len(prefix):]}) "
                                 f"the fused path takes {value:.4f} ms ({r['times']['cublas_epi'] / value:.2f}x).")
        big = [r for r in semi if r["tokens"] == max(x["tokens"] for x in semi)][0]
        verdict = "pass" if big["fused_speedup"] >= 1.3 else "miss"
        lines += ["", f"Target M={big['tokens']}: fused >= 1.3x cuBLAS + separate epilogue: "
                  f"{big['fused_speedup']:.2f}x, {verdict}.", ""]
    else:
        lines += ["2:4: no cuSPARSELt in this torch build; not measured.", ""]
    lines += [f"### Crossover (density below which each form beats dense; `bench/{json_name}`)", "",
              "| form | " + " | ".join(f"M={m}" for m in sorted({int(m) for f in grid.values() for m in f})) + " |"]
    ms = sorted({int(m) for f in grid.values() for m in f})
    lines.append("|---|" + "---|" * len(ms))
    for form, by_m in grid.items():
        cells = []
        for m in ms:
            v = by_m.get(str(m), "")
            cells.append("-" if v == "" else ("faster at all" if v is None else f"{v:.2f}"))
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: the density below which the form beats dense (interpolated); `faster at all`: faster "
              "at every measured density; 0.00: slower even at the sparsest. 2:4 has one density (0.5).", ""]
    return "\n".join(lines)


def write_section(text: str, path: str) -> None:
    """Replace the ``SECTION`` part of RESULTS.md (up to the next '## ' heading), or append it."""
    old = open(path).read() if os.path.exists(path) else "# sparsecc benchmark results\n"
    start = old.find(SECTION)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text + ("\n" + old[nxt + 1:] if nxt >= 0 else "\n")
    with open(path, "w") as fh:
        fh.write(new)


def plot(rows: List[dict], slug: str) -> None:
    """Speedup over dense against density, one line per M, one panel per form: bench/plots/ffn_<slug>.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    forms = sorted({r["form"] for r in rows})
    fig, axes = plt.subplots(1, len(forms), figsize=(4 * len(forms), 3.6), squeeze=False)
    for ax, form in zip(axes[0], forms):
        fr = [r for r in rows if r["form"] == form]
        if form == "semi_structured":
            pts = sorted((r["tokens"], r["speedup"], r["fused_speedup"]) for r in fr)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="cuSPARSELt / cuBLAS")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s-", label="fused bias+SiLU / cuBLAS+epi")
            ax.set_xscale("log")
            ax.set_xlabel("tokens M")
        else:
            for m in sorted({r["tokens"] for r in fr}):
                pts = sorted((r["density"], r["speedup"]) for r in fr if r["tokens"] == m)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"M={m}")
            ax.set_xlabel("density (kept share)")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(form, fontsize=9)
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.join(HERE, "plots"), exist_ok=True)
    dst = os.path.join(HERE, "plots", f"ffn_{slug}.png")
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


def main(argv: Optional[List[str]] = None) -> None:
    """Run the three parts, print the tables, write RESULTS.md, the crossover JSON and the plots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller grid (under ~4 minutes on an H100)")
    parser.add_argument("--sweep", action="store_true", help="also time gate-kernel launch configs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md, JSON and plots alone")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/ffn.py needs a CUDA device")
    torch.manual_seed(0)
    gate_sp = [0.3, 0.5, 0.7, 0.9]
    gate = gate_rows([1, 4, 16], gate_sp, args.sweep)
    semi = semi_rows([1, 16, 128, 1024, 8192])
    if args.quick:
        block = block_rows([16, 1024, 8192], [0.1, 0.5, 0.9])
        thresh = threshold_rows([1, 16], [0.5, 0.9])
    else:
        # The Llama-3-8B projections: the up shape in full, the others at a few sizes.
        block = (block_rows([1, 16, 128, 1024, 8192], [0.05, 0.1, 0.25, 0.5, 0.9])
                 + block_rows([16, 1024, 8192], [0.1, 0.5], k=D_FF, n=D_MODEL)
                 + block_rows([16, 8192], [0.1, 0.5], k=D_MODEL, n=D_MODEL)
                 + block_rows([16, 8192], [0.1, 0.5], k=D_MODEL, n=1024))
        thresh = (threshold_rows([1, 4, 16], [0.3, 0.5, 0.7, 0.9])
                  + threshold_rows([1, 4, 16], [0.5, 0.9], k=D_FF, n=D_MODEL))
    rows = gate + semi + block + thresh
    grid = crossovers(rows)
    head = header()
    json_name = f"crossover_{head['slug']}.json"
    text = markdown(head, gate, semi, grid, args.quick, json_name)
    print("\n" + text)
    for r in gate:
        if r["note"]:
            print(f"sweep M={r['tokens']} {1 - r['density']:.0%}: {r['note']}")
    if args.no_write:
        return
    keep = ("form", "shape", "tokens", "density", "kept_union", "sparse_ms", "dense_ms", "speedup", "timing")
    with open(os.path.join(HERE, json_name), "w") as fh:
        json.dump(dict(head, quick=args.quick, rows=[{k: r[k] for k in keep if k in r} for r in rows],
                       crossover=grid), fh, indent=1)
    write_section(text, os.path.join(HERE, "RESULTS.md"))
    plot(rows, head["slug"])
    print(f"wrote bench/{json_name}, bench/RESULTS.md ({SECTION})")


if __name__ == "__main__":
    main()
