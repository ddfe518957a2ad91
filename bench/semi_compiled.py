"""2:4 linear + bias + SiLU through the public compile path, against the same module compiled by Inductor.

    python bench/semi_compiled.py [--tokens 8192,4096,1024] [--cudagraphs] [--json out.json]

The module is ``nn.Sequential(nn.Linear(4096, 14336), nn.SiLU())`` in bfloat16 (Llama-3-8B's up projection
shape). sparsecc compiles it with one ``2:4`` rule (policy forced); Inductor compiles the dense module. Before
timing, the sparse output is checked against a float32 oracle on the magnitude-pruned weight (2 largest |w| of
every 4 along K, written out here, not taken from sparsecc) and the report must show the linear site rewritten.
Times are ``triton.testing.do_bench`` medians of plain calls (``--cudagraphs``: of CUDA-graph replays, both sides);
both sides in the same run, timed in turns over ``--rounds`` rounds (one ``do_bench`` of each side per round); the
medians over the rounds are reported and the spread of the per-round ratios printed. ``--torch-op`` adds a third
side in the same turns: the same compiled model with cuSPARSELt's cached plans switched off (torch's op). One
``do_bench`` per side (before 2026-12-07) let the drift between the two measurements into the ratio; the sparse
side's plain calls also varied between processes while torch's op made cuSPARSELt's plan on every call
(bench/RESULTS.md, "2:4 through cuSPARSELt plans kept per shape").
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pruned_2to4(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 smallest |w| of every 4 consecutive input weights set to zero (docs/spec.md's 2:4)."""
    n, k = w.shape
    groups = w.float().reshape(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    top = groups.abs().topk(2, dim=-1).indices
    keep.scatter_(-1, top, True)
    return (groups * keep).reshape(n, k)


def write_json(path, meta: dict, rows) -> None:
    """``meta`` and the table's rows so far to ``path`` (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(dict(meta, rows=[{"tokens": m, "sparsecc_ms": s_ms, "inductor_ms": d_ms,
                                        "x_inductor": d_ms / s_ms, "rel_err": err} for m, err, s_ms, d_ms in rows]),
                      f, indent=1)


class PlansOff:
    """A callable running ``fn`` with cuSPARSELt's cached plans switched off: each product then goes through torch's
    ``_cslt_sparse_mm``, which makes cuSPARSELt's plan on every call (sparsecc's product before 2026-12-07)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        from sparsecc.codegen import cusparselt_plan
        library = cusparselt_plan._library
        cusparselt_plan._library = lambda: (None, "switched off by bench/semi_compiled.py --torch-op")
        try:
            return self.fn(*args)
        finally:
            cusparselt_plan._library = library


def main(argv=None) -> int:
    import sparsecc
    from sparsecc.tune.quality import site_counts
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="8192,4096,1024")
    p.add_argument("--cudagraphs", action="store_true",
                   help="both sides under CUDA graphs (sparsecc's cudagraphs option, Inductor's triton.cudagraphs)")
    p.add_argument("--json", default=None, help="also write the table's rows here (after every row)")
    p.add_argument("--rounds", type=int, default=7, help="rounds of timing the two sides in turns (median kept)")
    p.add_argument("--torch-op", action="store_true",
                   help="also time the same compiled model with cuSPARSELt's cached plans switched off (torch's "
                        "_cslt_sparse_mm, a plan made per call: sparsecc's product before 2026-12-07), in the same "
                        "turns")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds} is not allowed; expected an integer >= 1")
    if args.torch_op and args.cudagraphs:
        p.error("--torch-op compares plain calls: a replayed graph runs the product it captured, with or without plans")
    if not torch.cuda.is_available():
        raise SystemExit("bench/semi_compiled.py needs a CUDA device")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": source_version(),
            "date": str(datetime.date.today()), "cudagraphs": args.cudagraphs,
            "rounds": args.rounds} if args.json else {}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4096, 14336), nn.SiLU()).to("cuda", torch.bfloat16).eval()
    dense_model = copy.deepcopy(model)   # Inductor compiles its own copy, so both compiled sides stay live together
    w, b = model[0].weight.detach(), model[0].bias.detach()
    oracle_w = pruned_2to4(w)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    rows = []
    with torch.no_grad():
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            torch._dynamo.reset()
            sparse = torch.compile(model, backend="sparsecc", options={"spec": spec, "cudagraphs": args.cudagraphs})
            y = sparse(x)
            applied, found = site_counts(sparsecc.last_report())
            if applied.get("linear", 0) != 1:
                raise SystemExit(f"the 2:4 rule was not applied at M={m}: {applied} of {found}")
            plan = [s for s in sparsecc.last_report().sites if s.applied][0].attrs.get("plan", "")
            ref = F.silu(x.float() @ oracle_w.T + b.float())
            err = float((y.float() - ref).norm() / ref.norm())
            if err > 1e-2:
                raise SystemExit(f"M={m}: rel err {err:.2e} against the float32 oracle")
            dense = torch.compile(dense_model, options={"triton.cudagraphs": True} if args.cudagraphs else None)
            dense(x)
            sides = {"sparsecc": sparse, "dense": dense}
            if args.torch_op:
                sides["torch-op"] = PlansOff(sparse)
                err_torch_op = float((sides["torch-op"](x).float() - ref).norm() / ref.norm())
                if err_torch_op > 1e-2:
                    raise SystemExit(f"M={m}: --torch-op rel err {err_torch_op:.2e} against the float32 oracle")
            times = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, fn in sides.items():
                    times[name].append(do_bench(lambda: fn(x), warmup=25, rep=100, return_mode="median"))
            medians = {name: statistics.median(t) for name, t in times.items()}
            sparse_ms, dense_ms = medians["sparsecc"], medians["dense"]
            ratios = sorted(d / s for s, d in zip(times["sparsecc"], times["dense"]))
            print(f"M={m}: per-round x Inductor {ratios[0]:.2f}-{ratios[-1]:.2f} over {args.rounds} rounds", flush=True)
            rows.append((m, err, sparse_ms, dense_ms))
            write_json(args.json, meta, rows)
            print(f"M={m}: rel err {err:.2e}, sparsecc {sparse_ms:.4f} ms, Inductor dense {dense_ms:.4f} ms, "
                  f"{dense_ms / sparse_ms:.2f}x; the 2:4 site's plan: {plan}", flush=True)
            if args.torch_op:
                other = medians["torch-op"]
                per_round = sorted(d / t for t, d in zip(times["torch-op"], times["dense"]))
                print(f"M={m}: torch's op (plan per call) {other:.4f} ms, {dense_ms / other:.2f}x Inductor (per round "
                      f"{per_round[0]:.2f}-{per_round[-1]:.2f}); cached plans {other / sparse_ms:.2f}x faster",
                      flush=True)
    commit = source_version()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, tree {commit}")
    print("| M | sparsecc ms | Inductor dense ms | x Inductor | rel err |\n|---|---|---|---|---|")
    for m, err, s_ms, d_ms in rows:
        print(f"| {m} | {s_ms:.4f} | {d_ms:.4f} | **{d_ms / s_ms:.2f}** | {err:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
