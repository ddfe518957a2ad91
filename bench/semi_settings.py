"""Every cuSPARSELt setting the 2:4 op can pick, timed in steady state, against the way the op picks.

    python bench/semi_settings.py [--tokens 8192] [--searches 8] [--rounds 4] [--json out.json]

Workload: Llama-3-8B's up projection (4096 -> 14336) with bias and SiLU, bf16, a random 2:4 weight (random
values, the 2 largest of every 4 along K kept), ``--tokens`` random tokens. The candidates are the defaults
(algorithm 0, no split), every distinct pick of ``--searches`` runs of cuSPARSELt's own search (``_search_once``,
as the op runs it), and algorithm 17 with split-K modes 1 / 2 and without a split where those are not among the
picks. Each runs the op's own product (``_cslt_matmul``, the bias fused) followed by SiLU in place, as
``semi_structured_linear_act`` does.

Every candidate is first checked against a float32 oracle on the dense pruned weight (rel err < 1e-2). Then, over
``--rounds`` rounds in turns, each candidate is timed two ways: ``triton.testing.do_bench`` (steady state, the median
of back-to-back calls) and one call alone between two events (the median of :data:`TIMED_CALLS` such calls: how
:func:`fastest_algorithm` timed a candidate before 2026-12-07; it now times :data:`CALLS_PER_SAMPLE` back-to-back
calls per sample). The dense anchor ``F.linear`` + SiLU in place is timed in the same rounds. Last,
:func:`fastest_algorithm` is asked three times which candidate it keeps. The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path
from semi_compiled import pruned_2to4  # noqa: E402

from sparsecc.codegen.semi_structured_linear import DENSE_MULTIPLE  # noqa: E402 - no Triton, no GPU

IN_FEATURES, OUT_FEATURES = 4096, 14336


def random_2to4(n: int, k: int, device, dtype, gen: torch.Generator) -> torch.Tensor:
    """A random ``[n, k]`` weight with 2 of every 4 consecutive input weights kept (the others exactly zero): random
    values pruned by bench/semi_compiled.py's 2:4 rule."""
    return pruned_2to4(torch.randn(n, k, device=device, generator=gen)).to(dtype)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, refused before anything touches the GPU."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192,
                   help="rows of x, a multiple of 8 (cuSPARSELt's search takes the dense operand unpadded here)")
    p.add_argument("--searches", type=int, default=8, help="runs of cuSPARSELt's search whose picks are candidates")
    p.add_argument("--rounds", type=int, default=4, help="rounds of timing every candidate in turns")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    for name in ("tokens", "searches", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} is not allowed; expected an integer >= 1")
    if args.tokens % DENSE_MULTIPLE:
        p.error(f"--tokens {args.tokens} is not allowed; expected a multiple of {DENSE_MULTIPLE}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/semi_settings.py needs a CUDA device with cuSPARSELt")
    import triton.testing

    from sparsecc.codegen import semi_structured_linear as semi
    from sparsecc.timing import call_seconds

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    w = random_2to4(OUT_FEATURES, IN_FEATURES, device, torch.bfloat16, gen)
    x = torch.randn(args.tokens, IN_FEATURES, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(OUT_FEATURES, device=device, dtype=torch.bfloat16, generator=gen)
    packed = torch._cslt_compress(w)
    picks = [semi._search_once(packed, x.contiguous().t(), b) for _ in range(args.searches)]
    # What the op chooses among, built as ``_algorithm`` builds it (the defaults, then each distinct pick in the order
    # found; from --searches searches here, SEARCH_ROUNDS there), and the alternatives it could be offered.
    op_candidates = list(dict.fromkeys([semi.CsltConfig(), *picks]))
    candidates = list(dict.fromkeys([*op_candidates, semi.CsltConfig(17, -1, 1), semi.CsltConfig(17, -1, 2),
                                     semi.CsltConfig(17, 1, None)]))

    def run(c):
        return F.silu(semi._cslt_matmul(x, packed, b, c), inplace=True)

    def dense():
        return F.silu(F.linear(x, w, b), inplace=True)

    oracle = F.silu(F.linear(x.float(), w.float(), b.float()))
    usable = []
    for c in candidates:
        try:
            err = float((run(c).float() - oracle).norm() / oracle.norm())
        except RuntimeError as exc:   # a setting this build or card refuses: say so, time the others
            print(f"{tuple(c)}: refused ({str(exc).splitlines()[0][:120]})")
            continue
        if not err < 1e-2:
            raise SystemExit(f"correctness check failed for {tuple(c)}: rel err {err:.2e}")
        usable.append(c)
    steady = {c: [] for c in usable}
    single = {c: [] for c in usable}
    dense_ms = []
    for _ in range(args.rounds):
        for c in usable:
            steady[c].append(triton.testing.do_bench(lambda: run(c), warmup=25, rep=100, return_mode="median"))
            single[c].append(1e3 * statistics.median(call_seconds(lambda: run(c), device)
                                                     for _ in range(semi.TIMED_CALLS)))
        dense_ms.append(triton.testing.do_bench(dense, warmup=25, rep=100, return_mode="median"))
    kept = [semi.fastest_algorithm(op_candidates, run) for _ in range(3)]

    anchor = statistics.median(dense_ms)
    rows = [{"setting": list(c), "steady_ms": steady[c], "single_call_ms": single[c],
             "x_dense": anchor / statistics.median(steady[c])} for c in usable]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "commit": source_version(), "date": str(datetime.date.today()), "tokens": args.tokens,
                       "picks": [list(p) for p in picks], "kept": [list(k) for k in kept], "dense_ms": dense_ms,
                       "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"tree {source_version()}, M={args.tokens}")
    print(f"search picks: {[tuple(p) for p in picks]}; fastest_algorithm keeps: {[tuple(k) for k in kept]}")
    print(f"| setting | do_bench ms per round | median | x dense ({anchor:.3f} ms) | single synchronised call ms |")
    print("|---|---|---|---|---|")
    for c, r in zip(usable, rows):
        print(f"| {tuple(c)} | {' '.join(f'{t:.3f}' for t in steady[c])} | {statistics.median(steady[c]):.4f} | "
              f"{r['x_dense']:.2f} | {' '.join(f'{t:.3f}' for t in single[c])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
