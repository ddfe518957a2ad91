"""Host cost of the sparse ops through ``torch.compile(backend="sparsecc")``: a normal call against its
CUDA-graph replay, and the host time each sparse op adds.

    python bench/dispatch.py [--json out.json] [--only attention|ffn] [--ffn-modes input,gate,weighted]

Workloads (fp16, H200-sized; every ratio's anchor is timed in the same run):

* **decode attention**: B=8, H=32, Hkv=8, D=128, one query row, KV 32K, sink 128 + window 4096
  (``streaming``), against dense SDPA compiled by Inductor;
* **one-token gated FFN** 4096 -> 14336 -> 4096 (SiLU), TEAL input mode at 50 / 70 / 90% sparsity
  and CATS gate mode at 50 / 90% (``--ffn-modes``; ``weighted``: input mode with the weighted criterion at 50 /
  70 / 90%), thresholds calibrated on the same input distribution, against the dense FFN compiled by Inductor.

Each is timed called normally (``do_bench`` median: host time included, as a user without CUDA graphs
sees it) and replayed from a CUDA graph captured around the compiled call (device time only).
"normal / graph" is the share of the graph-replay speed a plain call keeps (target >= 0.8).

**Host time per op**: compiled functions chain 8 copies and 1 copy of the op (each output feeds the next
query / input) at tiny shapes, where the GPU finishes faster than the host launches; the difference of
their host times per call, over 7, is what one more op costs the host (``host_us_per_op``). The same
chains of Inductor's dense op are the anchor (target: <= 10 us per sparse op). A profiler table of one
compiled call per family goes to ``$OUT`` (or bench/).

Before timing, each compiled sparse function is checked to launch its kernels from Inductor's
generated code (no ``torch.ops.sparsecc`` call left in it) and against a float32 reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.environ.get("OUT", HERE)   # where the profiler tables go
SINK, WINDOW = 128, 4096
CHAIN = 8


def bench(fn) -> float:
    """Median ms of ``fn`` called normally (host launch cost included)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float:
    """Median ms of ``fn`` replayed from one CUDA graph (captured after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def host_us_per_op(chain, single) -> float:
    """Host microseconds one more op adds to a call: (host time of the 8-op chain - of 1 op) / 7.

    Each is the median over 7 rounds of 20 calls launched without synchronisation (few enough launches that
    the GPU's queue never fills, at shapes the GPU finishes faster than the host launches): the per-call
    costs both share (guards, the wrapper's entry) cancel, what is left is the per-op launch path.
    """
    def per_call(fn) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        rounds = []
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(20):
                fn()
            rounds.append((time.perf_counter() - start) / 20)
            torch.cuda.synchronize()
        return sorted(rounds)[3]
    return (per_call(chain) - per_call(single)) / (CHAIN - 1) * 1e6


def host_profile(fn, path: str) -> None:
    """Write the profiler's CPU-side table (self CPU time, top 25) for 20 calls of ``fn`` to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    with open(path, "w") as fh:
        fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def generated_code(compiled, *args) -> str:
    """Inductor's generated source for one call of ``compiled``."""
    from torch._inductor.utils import run_and_get_code
    _, sources = run_and_get_code(compiled, *args)
    return "\n".join(sources)


def sparse_compile(module, spec, **options):
    """``torch.compile(module, backend="sparsecc")`` with ``spec`` (the public path)."""
    import sparsecc  # noqa: F401 - registers the backend
    compiled = torch.compile(module, backend="sparsecc", options={"spec": spec, **options})
    return compiled


def applied_sites(report) -> list:
    return [s for s in report.sites if s.applied]


# ---------------------------------------------------------------- modules

class DecodeAttention(nn.Module):
    """One decode step's attention: a query row against the whole KV (no causal mask needed)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class DecodeAttentionChain(nn.Module):
    """``length`` attention calls, each output the next query (host time per op)."""

    def __init__(self, length):
        super().__init__()
        self.length = length

    def forward(self, q, k, v):
        for _ in range(self.length):
            q = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return q


class GatedFFN(nn.Module):
    """Llama MLP."""

    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FFNChain(nn.Module):
    """``length`` FFNs in a row (host time per op)."""

    def __init__(self, hidden, inner, length):
        super().__init__()
        self.layers = nn.ModuleList(GatedFFN(hidden, inner) for _ in range(length))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def streaming_spec(sink=SINK, window=WINDOW):
    return {"version": 1, "defaults": {"policy": "force"},
            "attention": [{"form": "streaming", "sink": sink, "window": window}]}


def ffn_spec(mode, sparsity):
    """``mode`` input, gate, or weighted (input mode with the weighted criterion)."""
    rule = {"form": "activation_threshold", "mode": "gate" if mode == "gate" else "input", "sparsity": sparsity}
    if mode == "weighted":
        rule["criterion"] = "weighted"
    return {"version": 1, "defaults": {"policy": "force"}, "ffn": [rule]}


# ---------------------------------------------------------------- workloads

def attention_rows(emit) -> None:
    import sparsecc
    from sparsecc.codegen.block_attention import streaming_attention_ref

    b, h, hkv, d, kv = 8, 32, 8, 128, 32768
    dev, dt = torch.device("cuda"), torch.float16
    q = torch.randn(b, h, 1, d, device=dev, dtype=dt)
    k = torch.randn(b, hkv, kv, d, device=dev, dtype=dt)
    v = torch.randn(b, hkv, kv, d, device=dev, dtype=dt)
    sparse = sparse_compile(DecodeAttention(), streaming_spec())
    code = generated_code(sparse, q, k, v)
    report = sparsecc.last_report()
    assert applied_sites(report), "no attention site was rewritten"
    in_wrapper = "torch.ops.sparsecc" not in code and "_decode_split_kernel" in code
    ref = streaming_attention_ref(q.float(), k.float(), v.float(), sink=[SINK], window=[WINDOW],
                                  scale=d ** -0.5, causal=False)
    err = (sparse(q, k, v).float() - ref).abs().max().item()
    assert err < 2e-2, f"decode attention differs from the reference by {err}"
    dense = torch.compile(DecodeAttention())
    t = {"sparse": bench(lambda: sparse(q, k, v)), "sparse_graph": bench_graph(lambda: sparse(q, k, v)),
         "dense": bench(lambda: dense(q, k, v)), "dense_graph": bench_graph(lambda: dense(q, k, v))}
    # host time per op: tiny shapes (B1, 8 heads, KV 1024, sink 16 + window 64), so the host is the bottleneck
    qt = torch.randn(1, 8, 1, 64, device=dev, dtype=dt)
    kt, vt = (torch.randn(1, 2, 1024, 64, device=dev, dtype=dt) for _ in range(2))
    host = {}
    for name, make in (("sparse", lambda n: sparse_compile(DecodeAttentionChain(n), streaming_spec(16, 64))),
                       ("dense", lambda n: torch.compile(DecodeAttentionChain(n)))):
        chain, single = make(CHAIN), make(1)
        host[name] = host_us_per_op(lambda: chain(qt, kt, vt), lambda: single(qt, kt, vt))
    host_profile(lambda: sparse(q, k, v), os.path.join(OUT_DIR, "profile_attention.txt"))
    with open(os.path.join(OUT_DIR, "code_attention.py"), "w") as fh:
        fh.write(code)
    # the same with Inductor's C++ wrapper (backend option cpp_wrapper)
    cpp = sparse_compile(DecodeAttention(), streaming_spec(), cpp_wrapper=True)
    cpp(q, k, v)
    cpp_chain = sparse_compile(DecodeAttentionChain(CHAIN), streaming_spec(16, 64), cpp_wrapper=True)
    cpp_single = sparse_compile(DecodeAttentionChain(1), streaming_spec(16, 64), cpp_wrapper=True)
    t["sparse_cpp"] = bench(lambda: cpp(q, k, v))
    host["sparse_cpp"] = host_us_per_op(lambda: cpp_chain(qt, kt, vt), lambda: cpp_single(qt, kt, vt))
    emit(dict(workload="decode attention B8 KV32K sink128+window4096", launched_by_inductor=in_wrapper,
              max_err=err, **{f"{k_}_ms": v_ for k_, v_ in t.items()},
              host_us_sparse=host["sparse"], host_us_dense=host["dense"], host_us_sparse_cpp=host["sparse_cpp"]))


FFN_WORKLOADS = {"input": (0.5, 0.7, 0.9), "gate": (0.5, 0.9), "weighted": (0.5, 0.7, 0.9)}


def ffn_rows(emit, dtype=torch.float16, modes=("input", "gate")) -> None:
    import sparsecc

    hidden, inner = 4096, 14336
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base = GatedFFN(hidden, inner).to(dev, dtype).eval()
    x = torch.randn(1, 1, hidden, device=dev, dtype=dtype)
    calib = [torch.randn(1, 64, hidden, device=dev, dtype=dtype) for _ in range(4)]
    with torch.no_grad():
        ref = base.float()(x.float())
        base.to(dtype)
        dense = torch.compile(base)
        t_dense, t_dense_graph = bench(lambda: dense(x)), bench_graph(lambda: dense(x))
        xs = torch.randn(1, 1, 256, device=dev, dtype=dtype)
        chains = {n: FFNChain(256, 512, n).to(dev, dtype).eval() for n in (CHAIN, 1)}
        dense_chain, dense_single = (torch.compile(chains[n]) for n in (CHAIN, 1))
        host_dense = host_us_per_op(lambda: dense_chain(xs), lambda: dense_single(xs))
        for mode, sparsity in ((m, s) for m in modes for s in FFN_WORKLOADS[m]):
            spec = sparsecc.calibrate(base, calib, ffn_spec(mode, sparsity), progress=False)
            torch._dynamo.reset()
            sparse = sparse_compile(base, spec)
            code = generated_code(sparse, x)
            assert applied_sites(sparsecc.last_report()), f"no FFN site rewritten ({mode} {sparsity})"
            in_wrapper = "torch.ops.sparsecc" not in code
            out = sparse(x)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            t = {"sparse": bench(lambda: sparse(x)), "sparse_graph": bench_graph(lambda: sparse(x))}
            small = {}
            for n, model in chains.items():
                spec_n = sparsecc.calibrate(model, [torch.randn(1, 64, 256, device=dev, dtype=dtype)],
                                            ffn_spec(mode, sparsity), progress=False)
                small[n] = sparse_compile(model, spec_n)
            host_sparse = host_us_per_op(lambda: small[CHAIN](xs), lambda: small[1](xs))
            if (mode, sparsity) == ("input", 0.9):
                host_profile(lambda: sparse(x), os.path.join(OUT_DIR, "profile_ffn_input90.txt"))
                with open(os.path.join(OUT_DIR, "code_ffn_input90.py"), "w") as fh:
                    fh.write(code)
                cpp = sparse_compile(base, spec, cpp_wrapper=True)
                cpp(x)
                t["sparse_cpp"] = bench(lambda: cpp(x))
            emit(dict(workload=f"one-token FFN 4096x14336 {mode} {int(sparsity * 100)}%",
                      launched_by_inductor=in_wrapper, rel_err_vs_dense=rel,
                      sparse_ms=t["sparse"], sparse_graph_ms=t["sparse_graph"], dense_ms=t_dense,
                      **({"sparse_cpp_ms": t["sparse_cpp"]} if "sparse_cpp" in t else {}),
                      dense_graph_ms=t_dense_graph, host_us_sparse=host_sparse, host_us_dense=host_dense))


def table(rows) -> str:
    lines = ["| workload | in Inductor's wrapper | normal x dense (Inductor) | graph x dense (graph) | "
             "normal / graph | host us per op: sparse / dense |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "sparse_cpp_ms" in r:
            host = f"{r['host_us_sparse_cpp']:.1f} /" if "host_us_sparse_cpp" in r else ""
            lines.append(f"| {r['workload']}, cpp_wrapper | yes | {r['dense_ms'] / r['sparse_cpp_ms']:.2f} | | "
                         f"{r['sparse_graph_ms'] / r['sparse_cpp_ms']:.2f} | {host} |")
    for r in rows:
        lines.append(f"| {r['workload']} | {'yes' if r['launched_by_inductor'] else 'no'} | "
                     f"{r['dense_ms'] / r['sparse_ms']:.2f} | {r['dense_graph_ms'] / r['sparse_graph_ms']:.2f} | "
                     f"{r['sparse_graph_ms'] / r['sparse_ms']:.2f} | "
                     f"{r['host_us_sparse']:.1f} / {r['host_us_dense']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--only", choices=("attention", "ffn"), help="one workload family")
    ap.add_argument("--ffn-modes", default="input,gate",
                    help=f"comma-separated FFN workloads from {sorted(FFN_WORKLOADS)} (weighted: input mode with the "
                         "weighted criterion)")
    opts = ap.parse_args()
    modes = tuple(opts.ffn_modes.split(","))
    for m in modes:
        if m not in FFN_WORKLOADS:
            ap.error(f"--ffn-modes: {m!r} is not one of {sorted(FFN_WORKLOADS)}")
    if not torch.cuda.is_available():
        sys.exit("bench/dispatch.py needs a CUDA device")
    torch._dynamo.config.cache_size_limit = 64   # every workload compiles the same forward code again
    # ... at other shapes (the host-time chains): keep every compile static, as a model's own would be
    torch._dynamo.config.automatic_dynamic_shapes = False
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump(rows, fh, indent=1)

    if opts.only in (None, "attention"):
        attention_rows(emit)
    if opts.only in (None, "ffn"):
        ffn_rows(emit, modes=modes)
    commit = source_version()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, tree {commit}")
    print(table(rows))


if __name__ == "__main__":
    main()
