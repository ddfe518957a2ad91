"""Tensor-parallel prefill: a streaming spec at TP=N against TP=1, and against dense at the same TP, in one job.

    python bench/tensor_parallel.py [--seq 65536,131072] [--world 2] [--layers 2] [--reps 5]
                                    [--results bench/RESULTS.md] [--json out.json]
    python bench/tensor_parallel.py --smoke      # CPUs, gloo, tiny shapes: the whole protocol, no timing claim

Workload (issue: tensor parallelism): ``--layers`` decoder layers of transformers' ``LlamaModel`` at Llama-3-8B's
shapes (hidden 4096, 32 heads, 8 KV heads, FFN 14336, bf16, random weights), one sequence of ``--seq`` tokens fed as
embeddings (no vocabulary: the embedding and head are not what TP or the spec change). The parallel model is
``parallelize_module`` with PyTorch's TP plan (column-wise q/k/v/gate/up, row-wise o/down; docs/distributed.md).
Spec: ``streaming`` sink 128 + window 4096 on every head of every layer, the cost model deciding as in use (the
bench fails when it did not rewrite every attention site on every rank: a dense run is not a sparse measurement).

The job spawns ``--world`` processes (one GPU each, NCCL; the NCCL environment is inherited as it is). Per length:

1. **TP=1** on rank 0 alone (the others wait): the unsharded model compiled by Inductor (dense anchor) and by
   sparsecc with the spec;
2. **TP=N** on every rank: the parallel model compiled by Inductor and by sparsecc with the same spec;
3. the TP=N sparsecc output (replicated after the last row-wise reduction) against the TP=1 sparsecc output on
   rank 0 (relative error; the issue's claim is equality to dtype tolerance), and the reports: every rank must hold
   its share of the heads (``holds_heads``) with every attention site rewritten.

Dense anchor: the faster of the model compiled by Inductor and the model run eagerly, both timed: under
``torch.compile`` on torch < 2.14, transformers builds the causal mask as a tensor (it cannot prove it may skip it
while tracing), so SDPA cannot take its flash kernel there, while the eager model passes ``is_causal=True``.

Timing: per call, all ranks leave a barrier, then CUDA events around the forward on each rank; the median over
``--reps`` calls after two warm-up calls, and for TP=N the slowest rank's median (a step ends when the last rank
ends). Columns: ``sparse x dense`` at each TP, and the TP scaling ``TP=1 time / TP=N time`` of each. It prints a
table last and appends a section to ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SINK, WINDOW = 128, 4096
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
# --smoke: the same protocol at shapes a CPU runs in seconds (window and sink scaled down with the length).
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
SMOKE_SEQ, SMOKE_SINK, SMOKE_WINDOW = 96, 4, 16


def spec_for(sink: int, window: int, force: bool) -> dict:
    """The bench's spec: one streaming rule on every attention site of ``LlamaModel`` (module paths
    ``layers.{i}.self_attn``); the cost model decides unless ``force`` (the CPU smoke: on CPUs the reference
    path never pays, and the smoke checks the rewritten model)."""
    spec = {"version": 1,
            "attention": [{"modules": "layers.*.self_attn", "form": "streaming", "sink": sink, "window": window}]}
    if force:
        spec["defaults"] = {"policy": "force"}
    return spec


def tp_plan(layers: int) -> dict:
    """PyTorch's TP tutorial plan under ``LlamaModel``'s paths."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    plan = {}
    for i in range(layers):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"layers.{i}.{name}"] = RowwiseParallel()
    return plan


def build_model(args, device: torch.device, dtype: torch.dtype):
    """``args.layers`` layers of ``LlamaModel`` with the same random weights on every rank (same seed)."""
    import transformers
    shapes = SMOKE if args.smoke else LLAMA3_8B
    cfg = transformers.LlamaConfig(vocab_size=16, num_hidden_layers=args.layers, max_position_embeddings=1 << 18,
                                   **shapes)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaModel(cfg)
    return model.to(dtype).eval()


def make_input(args, seq: int, device, dtype) -> torch.Tensor:
    hidden = (SMOKE if args.smoke else LLAMA3_8B)["hidden_size"]
    g = torch.Generator().manual_seed(seq)
    return torch.randn(1, seq, hidden, generator=g).to(device=device, dtype=dtype)


def timed(fn, reps: int, device, barrier) -> tuple:
    """(output of the last call, median ms over ``reps`` calls after two warm-ups), every call started together."""
    out = None
    for _ in range(2):
        barrier()
        out = fn()
    times = []
    for _ in range(reps):
        barrier()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def attention_sites(report) -> list:
    return [dict(module=s.module, applied=s.applied, reason=s.reason, holds=s.attrs.get("holds_heads"))
            for s in report.sites if s.kind == "attention"]


def compile_both(model, spec, x, args, device, barrier) -> dict:
    """Dense (Inductor) and sparsecc (spec) compiles of ``model``: times, sparse output, attention sites."""
    import sparsecc
    from sparsecc.backend import reset_reports

    result = {}
    with torch.no_grad():
        torch._dynamo.reset()
        dense = torch.compile(model, backend=args.dense_backend, dynamic=False)
        _, result["dense_compiled_ms"] = timed(lambda: dense(inputs_embeds=x, use_cache=False).last_hidden_state,
                                               args.reps, device, barrier)
        _, result["dense_eager_ms"] = timed(lambda: model(inputs_embeds=x, use_cache=False).last_hidden_state,
                                            args.reps, device, barrier)
        result["dense_ms"] = min(result["dense_compiled_ms"], result["dense_eager_ms"])
        torch._dynamo.reset()
        reset_reports()
        sparse = torch.compile(model, backend="sparsecc", dynamic=False, options={"spec": spec})
        out, result["sparse_ms"] = timed(lambda: sparse(inputs_embeds=x, use_cache=False).last_hidden_state,
                                         args.reps, device, barrier)
        result["sites"] = attention_sites(sparsecc.last_report())
    result["out"] = out.detach().float()
    return result


def worker(rank: int, args, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        os.environ["SPARSECC_LOWERING"] = "eager"   # the smoke checks the protocol; Inductor's CPU build is slow
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh(device.type, (args.world,))
    sink, window = (SMOKE_SINK, SMOKE_WINDOW) if args.smoke else (SINK, WINDOW)
    spec = spec_for(sink, window, force=args.smoke)
    rows = []
    try:
        for seq in args.seq:
            x = make_input(args, seq, device, dtype)
            row = {"seq": seq}
            single = None
            if rank == 0:   # TP=1: one process, the others wait at the next barrier
                single = compile_both(build_model(args, device, dtype), spec, x, args, device, lambda: None)
                row.update(tp1_dense_ms=single["dense_ms"], tp1_sparse_ms=single["sparse_ms"],
                           tp1_dense_compiled_ms=single["dense_compiled_ms"],
                           tp1_dense_eager_ms=single["dense_eager_ms"], tp1_sites=single["sites"])
            dist.barrier()
            parallel = parallelize_module(build_model(args, device, dtype), mesh, tp_plan(args.layers))
            multi = compile_both(parallel, spec, x, args, device, dist.barrier)
            gathered = [None] * args.world
            dist.all_gather_object(gathered, {k: multi[k] for k in ("dense_ms", "dense_compiled_ms", "dense_eager_ms",
                                                                     "sparse_ms", "sites")})
            if rank == 0:
                row.update(tpn_dense_ms=max(g["dense_ms"] for g in gathered),
                           tpn_dense_compiled_ms=max(g["dense_compiled_ms"] for g in gathered),
                           tpn_dense_eager_ms=max(g["dense_eager_ms"] for g in gathered),
                           tpn_sparse_ms=max(g["sparse_ms"] for g in gathered),
                           tpn_rank_sparse_ms=[g["sparse_ms"] for g in gathered],
                           tpn_rank_dense_ms=[g["dense_ms"] for g in gathered],
                           tpn_sites=[g["sites"] for g in gathered])
                ref, out = single["out"], multi["out"]
                row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
                rows.append(row)
            del parallel, multi, single
            if cuda:
                torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - the parent prints it with the rank
        rows = {"error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(rows, fh)
    dist.barrier()   # every rank is done communicating before any tears down
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: objects still holding the destroyed groups (the device mesh) are
    # freed there in any order, and one CI run saw a rank abort at that point (torch 2.13, gloo: SIGABRT,
    # "terminate called without an active exception") after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check(rows: list, world: int, layers: int) -> list:
    """What makes the run not a measurement of the spec: sites not rewritten, heads not split, outputs apart."""
    problems = []
    for row in rows:
        for label, sites in [("TP=1", row["tp1_sites"])] + [(f"TP={world} rank {r}", s)
                                                            for r, s in enumerate(row["tpn_sites"])]:
            applied = [s for s in sites if s["applied"]]
            if len(applied) != layers:
                problems.append(f"seq {row['seq']} {label}: {len(applied)} of {layers} attention sites rewritten: "
                                + "; ".join(f"{s['module']}: {s['reason']}" for s in sites if not s["applied"]))
        holds = [sorted({s["holds"] for s in sites}) for sites in row["tpn_sites"]]
        if world > 1 and (any(None in h for h in holds) or len({tuple(h) for h in holds}) != world):
            problems.append(f"seq {row['seq']}: ranks' held heads {holds} are not {world} distinct shares")
        if not row["rel_err"] <= 2e-2:
            problems.append(f"seq {row['seq']}: TP={world} output differs from TP=1's (rel err {row['rel_err']:.3g})")
    return problems


def table(rows: list, world: int) -> str:
    head = (f"| seq | TP=1 dense ms (compiled / eager) | TP=1 sparsecc ms | TP={world} dense ms (compiled / eager) | TP={world} sparsecc ms (per rank) | "
            f"sparsecc x dense, TP=1 | **sparsecc x dense, TP={world}** | TP scaling dense | "
            f"**TP scaling sparsecc** | rel err TP={world} vs TP=1 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        per_rank = " / ".join(f"{t:.2f}" for t in r["tpn_rank_sparse_ms"])
        lines.append(f"| {r['seq']} | {r['tp1_dense_compiled_ms']:.2f} / {r['tp1_dense_eager_ms']:.2f} | "
                     f"{r['tp1_sparse_ms']:.2f} | {r['tpn_dense_compiled_ms']:.2f} / {r['tpn_dense_eager_ms']:.2f} | "
                     f"{r['tpn_sparse_ms']:.2f} ({per_rank}) | {r['tp1_dense_ms'] / r['tp1_sparse_ms']:.2f} | "
                     f"**{r['tpn_dense_ms'] / r['tpn_sparse_ms']:.2f}** | "
                     f"{r['tp1_dense_ms'] / r['tpn_dense_ms']:.2f} | **{r['tp1_sparse_ms'] / r['tpn_sparse_ms']:.2f}** | "
                     f"{r['rel_err']:.2e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", default=None, help="comma-separated lengths (default 65536,131072; --smoke: 96)")
    p.add_argument("--world", type=int, default=2, help="tensor-parallel ranks (one GPU each)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dense-backend", default=None, help="dense anchor's torch.compile backend (default inductor; "
                   "--smoke: eager)")
    p.add_argument("--smoke", action="store_true", help="CPUs and gloo at tiny shapes (checks the protocol only)")
    p.add_argument("--results", default=None, help="append a section to this file (e.g. bench/RESULTS.md)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.seq = [int(s) for s in (args.seq or (str(SMOKE_SEQ) if args.smoke else "65536,131072")).split(",")]
    args.dense_backend = args.dense_backend or ("eager" if args.smoke else "inductor")
    if not args.smoke and torch.cuda.device_count() < args.world:
        print(f"needs {args.world} CUDA devices, found {torch.cuda.device_count()} (--smoke runs on CPUs)")
        return 2
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, os.path.join(tmp, "rendezvous"), tmp), nprocs=args.world)
        ranks = []
        for rank in range(args.world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as fh:
                ranks.append(pickle.load(fh))
    for rank, result in enumerate(ranks):
        if isinstance(result, dict) and "error" in result:
            print(f"rank {rank} failed:\n{result['error']}")
            return 1
    rows = ranks[0]
    problems = check(rows, args.world, args.layers)
    device = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    commit = source_version()
    header = (f"{device} x {args.world}, torch {torch.__version__}, {datetime.date.today()}, commit {commit}; "
              f"{args.layers} layers of Llama-3-8B shape{' (smoke shapes)' if args.smoke else ''}, streaming "
              f"sink {SMOKE_SINK if args.smoke else SINK} + window {SMOKE_WINDOW if args.smoke else WINDOW}; "
              f"median of {args.reps} calls, slowest rank; ratios against the faster dense run")
    text = table(rows, args.world)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "problems": problems}, indent=1))
    if args.results and not args.smoke and not problems:
        with open(args.results, "a") as fh:
            fh.write(f"\n### Tensor-parallel prefill (bench/tensor_parallel.py), {datetime.date.today()}\n\n"
                     f"{header}\n\n{text}\n")
    for line in problems:
        print("PROBLEM:", line)
    print(header)
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
