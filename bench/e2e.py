"""Whole-model benchmark: a Llama-3-8B-shaped HF model, eager vs Inductor vs sparsecc, prefill and decode.

One command (on a CUDA machine)::

    python bench/e2e.py [--quick] [--layers 2,4] [--lengths 8192,32768,65536,131072] [--decode-kv 32768,131072]
                        [--json bench/e2e_h100.json] [--write] [--profile]
    python bench/e2e.py --tiny          # CPU: a small Llama, short sequences, the same table (tests run this)

Prefill rows: for each layer count and length, the model (random weights, bf16)
runs one prefill with HF ``logits_to_keep=1`` (last-position logits: full
vocabulary logits at 128K would be 33 GB) under eager (SDPA), default
``torch.compile`` (Inductor), and sparsecc with three specs:

* ``sparsecc-dense``: every attention rule is ``dense`` (the compiler's overhead and its graph clean-ups only);
* ``sparsecc-streaming``: sink 128 + window 4096 in every layer but the first two (the issue's spec: with
  2 layers it rewrites nothing);
* ``sparsecc-streaming-all``: the same form in every layer, so the 2-layer anchor model shows its effect;
* ``sparsecc-tuned``: a hand-written spec in the form ``sparsecc tune`` writes (one family per layer, per-head
  choices within it): streaming with per-head windows (heads 0-15: 2048, 16-27: 4096, 28-31 dense) and
  ``block_topk`` (block 128, top 16) in layers whose index ends in 3 or 7, dense first two layers. Random
  weights carry no attention structure to calibrate on, so a tuner run would pick arbitrary heads; this spec
  has the same shape and densities as a tuned one.

Columns: ms (median of timed calls; CUDA events), x eager, compile s (first call minus one steady call),
peak GiB (max allocated during one call), sites rewritten per form, max|diff| against the reference semantics
(the spec's forms applied by hand in float64 attention, computed at ``--check-seq`` tokens, since a float64
reference at 128K is out of reach), and the Amdahl bound: with ``T`` the sparsecc-dense model time and, for
each rewritten site, ``d`` / ``s`` the times of its attention alone at that shape (dense SDPA / the sparse op),
bound = T / (T - sum(d - s)); "of bound" is the measured speedup over sparsecc-dense divided by the bound.

Decode rows (``--decode-kv``): batch 1, static KV cache, sink + window decode attention and CATS at 50% FFN
activation sparsity (examples/specs/llama3_decode.toml), ms/token and tokens/s against eager and Inductor.

``--json`` is rewritten after every row (a run cut short keeps its finished rows); ``--write`` replaces the
section between the e2e markers of bench/RESULTS.md and writes bench/plots/e2e_<device>.png;
``--profile`` prints the top kernels of eager, Inductor and sparsecc-dense at the first length (the Inductor
investigation of docs/e2e.md) and the SDPA calls Dynamo hands to the backends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # bench/'s helper modules
from provenance import source_version  # noqa: E402 - bench/ is on the path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import decode as decode_example  # noqa: E402 - examples/ is put on the path first
from llama_long_context import (  # noqa: E402
    SPEC_DIR, build_llama, compile_with, free_memory, head_forms, peak_gib, prefill_call, random_ids,
    reference_prefill_diff, rewritten_forms, synchronize, time_ms)

BEGIN = "<!-- e2e:begin (bench/e2e.py writes this section) -->"
END = "<!-- e2e:end -->"
CONFIGS = ("eager", "inductor", "sparsecc-dense", "sparsecc-streaming", "sparsecc-streaming-all", "sparsecc-tuned")
FULL = dict(layers=[2, 4], lengths=[8192, 32768, 65536, 131072], decode_kv=[32768, 131072], check_seq=8192,
            decode_steps=32, calls=5)
QUICK = dict(layers=[2], lengths=[8192, 32768], decode_kv=[32768], check_seq=8192, decode_steps=24, calls=3)
TINY = dict(layers=[3], lengths=[64, 128], decode_kv=[96], check_seq=64, decode_steps=5, calls=1)
# Sparse geometry per scale: (sink, window, narrow window, block, topk); the tiny one keeps windows shorter
# than its sequences so the forms still drop keys.
GEOMETRY = {False: (128, 4096, 2048, 128, 16), True: (4, 24, 12, 16, 2)}
# Issue targets (docs/e2e.md): sparsecc-dense vs the faster of eager and Inductor, streaming vs eager,
# measured vs the Amdahl bound, decode vs eager, compile time vs Inductor's.
DENSE_TARGET = 0.98
STREAM_TARGET = {32768: 1.4, 131072: 3.0}
BOUND_TARGET = 0.9
DECODE_TARGET = {32768: 1.7, 131072: 2.5}
COMPILE_TARGET = 1.5
# Kernels shown per backend by --profile.
PROFILE_TOP = 8


# ---------------------------------------------------------------- specs

def bench_specs(layers: int, tiny: bool) -> Dict[str, dict]:
    """The three sparsecc specs of the table, as spec dicts (rules in override order)."""
    sink, window, narrow, block, topk = GEOMETRY[tiny]
    first_two = {"modules": "model.layers.[01].self_attn", "form": "dense"}
    dense = {"version": 1, "attention": [{"modules": "model.layers.*.self_attn", "form": "dense"}]}
    streaming = {"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": "model.layers.*.self_attn", "form": "streaming", "sink": sink, "window": window}, first_two]}
    # The issue's streaming spec keeps the first two layers dense, which leaves a 2-layer model (the anchor
    # of TARGETS.md) with nothing to rewrite; this variant streams every layer, so the form's effect shows there.
    streaming_all = {"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": "model.layers.*.self_attn", "form": "streaming", "sink": sink, "window": window}]}
    heads = 8 if tiny else 32
    quarter = heads // 4
    tuned = {"version": 1, "defaults": {"policy": "force"}, "attention": [
        {"modules": "model.layers.*.self_attn", "heads": list(range(heads // 2)), "form": "streaming",
         "sink": sink, "window": narrow},
        {"modules": "model.layers.*.self_attn", "heads": list(range(heads // 2, heads - quarter)),
         "form": "streaming", "sink": sink, "window": window},
        {"modules": "model.layers.*[37].self_attn", "form": "block_topk", "block": block, "topk": topk,
         "sink_blocks": 1, "local_blocks": 2},
        first_two],
        "meta": {"note": "hand-written in the shape sparsecc tune writes; random weights have nothing to tune on"}}
    return {"sparsecc-dense": dense, "sparsecc-streaming": streaming, "sparsecc-streaming-all": streaming_all,
            "sparsecc-tuned": tuned}


# ---------------------------------------------------------------- per-site timing (Amdahl bound)

def site_times_ms(model, spec, seq: int, device, calls: int) -> List[dict]:
    """Dense SDPA and sparse op time of every rewritten attention site, alone, at this shape (random q/k/v)."""
    import torch.nn.functional as F
    from sparsecc.codegen import ops
    from sparsecc.codegen.block_attention import FULL_WINDOW
    from sparsecc.codegen.dynamic_attention import op_args
    from sparsecc.forms import BlockTopK, Streaming, VerticalSlash

    cfg = model.config
    dtype = next(model.parameters()).dtype
    h, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kernels = "auto" if torch.device(device).type == "cuda" else "reference"
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, h, seq, d, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, seq, d, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, seq, d, device=device, dtype=dtype, generator=g)
    scale = d ** -0.5
    dense_ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                              enable_gqa=True), device, calls)
    rows = []
    for path, forms in head_forms(spec, model).items():
        dynamic = [f for f in forms if isinstance(f, (BlockTopK, VerticalSlash))]
        if dynamic:
            def sparse():
                return ops.dynamic_block_attention(q, k, v, None, scale, True, *op_args(dynamic[0]), 0, kernels)
        else:
            sinks = [f.sink if isinstance(f, Streaming) else 0 for f in forms]
            windows = [f.window if isinstance(f, Streaming) else FULL_WINDOW for f in forms]

            def sparse():
                return ops.streaming_attention(q, k, v, None, scale, True, sinks, windows, 0, kernels)
        rows.append({"site": path, "dense_ms": dense_ms, "sparse_ms": time_ms(sparse, device, calls)})
    return rows


def amdahl_bound(dense_model_ms: float, sites: List[dict]) -> float:
    """Whole-model speedup if only the rewritten sites changed, by their measured standalone times."""
    saved = sum(s["dense_ms"] - s["sparse_ms"] for s in sites)
    return dense_model_ms / max(dense_model_ms - saved, 1e-9)


# ---------------------------------------------------------------- prefill rows

def prefill_rows(layers: int, lengths: List[int], opts, device, dtype, tiny: bool, emit) -> None:
    """Every config at every length for one layer count; ``emit`` receives each finished row."""
    model = build_llama(layers, tiny=tiny, device=device, dtype=dtype)
    specs = bench_specs(layers, tiny)
    kernels = "auto" if torch.device(device).type == "cuda" else "reference"
    check_diff: Dict[str, Optional[float]] = {}
    rows_of_run: List[dict] = []
    with torch.no_grad():
        for seq in lengths:
            ids = random_ids(model, seq)
            times: Dict[str, float] = {}
            for config in opts.configs:
                free_memory()
                try:
                    row = prefill_row(model, ids, layers, config, specs.get(config), kernels, opts, lengths, times,
                                      check_diff, device)
                except (RuntimeError, ValueError) as err:  # e.g. out of memory: keep the other rows
                    row = {"kind": "prefill", "layers": layers, "seq": seq, "config": config, "ms": None,
                           "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
                    free_memory()
                rows_of_run.append(row)
                emit(row)
            del ids
    for row in rows_of_run:   # rows timed before the check length get its result now
        if row.get("max_diff") is None:
            row["max_diff"] = check_diff.get(row["config"])
    del model
    free_memory()


def prefill_row(model, ids, layers: int, config: str, spec, kernels: str, opts, lengths: List[int],
                times: Dict[str, float], check_diff: Dict[str, Optional[float]], device) -> dict:
    """Compile, time and check one config at one length; records its time in ``times``."""
    import sparsecc

    seq = ids.shape[1]
    fn = compile_with(config.split("-")[0], model, spec, kernels)
    call = prefill_call(fn, opts.logits_to_keep)
    t0 = time.perf_counter()
    call(ids)
    synchronize(device)
    first_s = time.perf_counter() - t0
    ms = time_ms(lambda: call(ids), device, opts.calls, warmup=1)
    row = {"kind": "prefill", "layers": layers, "seq": seq, "config": config, "ms": ms,
           "compile_s": max(first_s - ms / 1e3, 0.0), "peak_gib": peak_gib(lambda: call(ids), device)}
    times[config] = ms
    if spec is not None:
        report = sparsecc.last_report()
        row["sites"] = rewritten_forms(report)
        sparse_sites = [s for s in report.sites if s.kind == "attention" and s.applied]
        if sparse_sites and "sparsecc-dense" in times:
            per_site = site_times_ms(model, sparsecc.load_spec(spec), seq, device, opts.calls)
            row["site_times"] = per_site
            row["bound"] = amdahl_bound(times["sparsecc-dense"], per_site)
    if config not in check_diff and seq == opts.check_seq:  # the timed graph serves the check
        check_diff[config] = prefill_diff(model, spec, ids, call(ids))
    del fn, call
    if config not in check_diff and opts.check_seq and opts.check_seq not in lengths:
        check_diff[config] = reference_check(model, config, spec, kernels, opts.check_seq, device)
    row["max_diff"] = check_diff.get(config)
    row["check_seq"] = opts.check_seq
    if "eager" in times:
        row["x_eager"] = times["eager"] / ms
    return row


def reference_check(model, config: str, spec, kernels: str, check_seq: int, device) -> Optional[float]:
    """max |output - reference semantics| of one config at ``check_seq`` tokens (dense reference for eager/Inductor)."""
    free_memory()
    ids = random_ids(model, check_seq)
    fn = compile_with(config.split("-")[0], model, spec, kernels)
    logits = prefill_call(fn)(ids)
    diff = prefill_diff(model, spec, ids, logits)
    del fn, logits
    free_memory()
    return diff


def prefill_diff(model, spec, ids, logits) -> float:
    """max |logits - reference semantics|; without a spec (eager, Inductor) the reference is dense attention."""
    import sparsecc

    if spec is None:
        return reference_prefill_diff(model, sparsecc.load_spec({"version": 1}), ids, logits)
    return reference_prefill_diff(model, sparsecc.load_spec(spec), ids, logits)


# ---------------------------------------------------------------- decode rows

def decode_rows(layers: int, kvs: List[int], opts, device, dtype, tiny: bool, emit) -> None:
    """Decode timings (eager / Inductor / sparsecc) at each KV length, with the reference check."""
    model = build_llama(layers, tiny=tiny, device=device, dtype=dtype)
    spec_path = os.path.join(SPEC_DIR, "llama_tiny_decode.toml" if tiny else "llama3_decode.toml")
    spec = decode_example.calibrated_spec(model, spec_path, tiny)
    kernels = "auto" if torch.device(device).type == "cuda" else "reference"
    wanted = [c.split("-")[0] for c in opts.configs]
    backends = tuple(b for b in ("eager", "inductor", "sparsecc") if b in wanted)
    if torch.device(device).type == "cuda":   # decode is launch-bound: also time CUDA-graph replay
        backends += tuple(f"{b}-graphs" for b in ("inductor", "sparsecc") if b in wanted)
    for kv in kvs:
        try:
            result = decode_example.run_decode(model, spec, kv, opts.decode_steps, device, backends=backends,
                                               kernels=kernels)
        except (RuntimeError, ValueError) as err:  # e.g. out of memory: keep the other rows
            emit({"kind": "decode", "layers": layers, "kv": kv, "config": "all", "ms_per_token": None,
                  "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
            free_memory()
            continue
        eager = result["backends"].get("eager", {}).get("ms_per_token")
        for backend, r in result["backends"].items():
            row = {"kind": "decode", "layers": layers, "kv": kv, "config": backend, **r}
            if eager:
                row["x_eager"] = eager / r["ms_per_token"]
            if backend.startswith("sparsecc"):
                row["sites"] = rewritten_forms(result["report"])
            emit(row)
        free_memory()
    del model
    free_memory()


# ---------------------------------------------------------------- profile

def sdpa_calls(model, ids) -> List[str]:
    """How Dynamo hands each SDPA call to a backend: mask shape or None, is_causal, enable_gqa, GQA repeat."""
    calls = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                mval = mask.meta.get("example_value") if hasattr(mask, "meta") else None
                k = node.args[1].meta.get("example_value")
                calls.append(f"attn_mask={tuple(mval.shape) if mval is not None else None} "
                             f"{mval.dtype if mval is not None else ''} is_causal={node.kwargs.get('is_causal')} "
                             f"enable_gqa={node.kwargs.get('enable_gqa', False)} k={tuple(k.shape)}")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(prefill_call(model), backend=backend)(ids)
    torch._dynamo.reset()
    return calls


def rewritten_sdpa_calls() -> List[str]:
    """The SDPA calls left in sparsecc's rewritten graphs (the ones Inductor lowers): mask or is_causal."""
    from sparsecc.backend import rewritten_graphs

    calls = []
    for gm in rewritten_graphs():
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append(f"attn_mask={'a tensor' if mask is not None else None} "
                             f"is_causal={node.kwargs.get('is_causal')}")
    return calls


def profile(opts, device, dtype, tiny: bool) -> None:
    """Top kernels of eager, Inductor and sparsecc-dense at the first length, and the SDPA calls Dynamo emits."""
    import transformers
    from torch.profiler import ProfilerActivity, profile as torch_profile

    layers, seq = opts.layers[0], opts.lengths[0]
    model = build_llama(layers, tiny=tiny, device=device, dtype=dtype)
    ids = random_ids(model, seq)
    cuda = torch.device(device).type == "cuda"
    print(f"profile: {layers} layers, {seq} tokens, torch {torch.__version__}, transformers {transformers.__version__}")
    with torch.no_grad():
        for call in sdpa_calls(model, ids):
            print(f"  Dynamo SDPA call: {call}")
        specs = bench_specs(layers, tiny)
        for config in ("eager", "inductor", "sparsecc-dense"):
            free_memory()
            fn = prefill_call(compile_with(config.split("-")[0], model, specs.get(config),
                                           "auto" if cuda else "reference"), opts.logits_to_keep)
            fn(ids)
            fn(ids)
            synchronize(device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with torch_profile(activities=activities) as prof:
                fn(ids)
                synchronize(device)
            events = sorted(prof.key_averages(), key=lambda e: _self_time_us(e, cuda), reverse=True)
            total = sum(_self_time_us(e, cuda) for e in events)
            print(f"\n{config}: {total / 1e3:.1f} ms of {'CUDA kernel' if cuda else 'CPU op'} time")
            if config.startswith("sparsecc"):
                for line in rewritten_sdpa_calls():
                    print(f"  after sparsecc's passes: {line}")
            print(f"  {'ms':>9} {'share':>6} {'calls':>6}  name")
            for e in events[:PROFILE_TOP]:
                t = _self_time_us(e, cuda)
                print(f"  {t / 1e3:9.2f} {t / max(total, 1):6.1%} {e.count:6d}  {e.key[:100]}")
            del fn
    del model
    free_memory()


def _self_time_us(event, cuda: bool) -> float:
    """An averaged profiler event's own time in us: device time on CUDA, CPU time otherwise.

    torch 2.11 names the device time ``self_device_time_total``; older builds ``self_cuda_time_total``.
    """
    if not cuda:
        return event.self_cpu_time_total or 0
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value:
            return value
    return 0


# ---------------------------------------------------------------- table, RESULTS.md, plots

def verdicts(rows: List[dict]) -> Dict[tuple, str]:
    """Target checks of docs/e2e.md, keyed by (kind, layers, length, config)."""
    out = {}
    prefill = {(r["layers"], r["seq"], r["config"]): r for r in rows
               if r["kind"] == "prefill" and r.get("ms") is not None}
    for (layers, seq, config), r in prefill.items():
        eager = prefill.get((layers, seq, "eager"))
        inductor = prefill.get((layers, seq, "inductor"))
        notes = []
        if config == "sparsecc-dense" and eager and inductor:
            best = min(eager["ms"], inductor["ms"])
            ok = best / r["ms"] >= DENSE_TARGET
            notes.append(f"{best / r['ms']:.2f}x best {'pass' if ok else 'MISS'} (>= {DENSE_TARGET})")
        if config in ("sparsecc-streaming", "sparsecc-streaming-all") and seq in STREAM_TARGET and eager:
            ok = eager["ms"] / r["ms"] >= STREAM_TARGET[seq]
            notes.append(f"{'pass' if ok else 'MISS'} (>= {STREAM_TARGET[seq]}x eager)")
        if r.get("bound") and (layers, seq, "sparsecc-dense") in prefill:
            of_bound = prefill[(layers, seq, "sparsecc-dense")]["ms"] / r["ms"] / r["bound"]
            r["of_bound"] = of_bound
            notes.append(f"{of_bound:.2f} of bound {'pass' if of_bound >= BOUND_TARGET else 'MISS'}")
        if config.startswith("sparsecc") and inductor and inductor.get("compile_s"):
            ratio = r["compile_s"] / inductor["compile_s"]
            notes.append(f"compile {ratio:.2f}x Inductor {'pass' if ratio <= COMPILE_TARGET else 'MISS'}")
        out[("prefill", layers, seq, config)] = "; ".join(notes)
    for r in rows:
        if r["kind"] == "decode" and r["config"].startswith("sparsecc") and r["kv"] in DECODE_TARGET \
                and r.get("x_eager"):
            ok = r["x_eager"] >= DECODE_TARGET[r["kv"]]
            out[("decode", r["layers"], r["kv"], r["config"])] = (f"{'pass' if ok else 'MISS'} "
                                                                  f"(>= {DECODE_TARGET[r['kv']]}x eager)")
    return out


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: List[dict]) -> List[str]:
    """Markdown tables: prefill, then decode."""
    checks = verdicts(rows)
    lines = ["| layers | tokens | config | ms | x eager | compile s | peak GiB | sites rewritten | max\\|diff\\| "
             "(at tokens) | Amdahl bound | of bound | targets |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "prefill":
            continue
        if r.get("ms") is None:
            lines.append(f"| {r['layers']} | {r['seq']} | {r['config']} | - | - | - | - | - | - | - | - | "
                         f"{r.get('error', 'failed')} |")
            continue
        sites = ", ".join(f"{k}={v}" for k, v in sorted((r.get("sites") or {}).items())) or "-"
        diff = f"{r['max_diff']:.1e} ({r['check_seq']})" if r.get("max_diff") is not None else "-"
        lines.append(f"| {r['layers']} | {r['seq']} | {r['config']} | {r['ms']:.2f} | {_fmt(r.get('x_eager'))} | "
                     f"{r['compile_s']:.1f} | {_fmt(r.get('peak_gib'))} | {sites} | {diff} | "
                     f"{_fmt(r.get('bound'))} | {_fmt(r.get('of_bound'))} | "
                     f"{checks.get(('prefill', r['layers'], r['seq'], r['config']), '')} |")
    decode = [r for r in rows if r["kind"] == "decode"]
    if decode:
        lines += ["", "| layers | KV | config | ms/token | tokens/s | x eager | CUDA graphs | sites rewritten | "
                  "max\\|diff\\| | targets |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in decode:
            if r.get("ms_per_token") is None:
                lines.append(f"| {r['layers']} | {r['kv']} | {r['config']} | - | - | - | - | - | - | "
                             f"{r.get('error', 'failed')} |")
                continue
            sites = ", ".join(f"{k}={v}" for k, v in sorted((r.get("sites") or {}).items())) or "-"
            lines.append(f"| {r['layers']} | {r['kv']} | {r['config']} | {r['ms_per_token']:.3f} | "
                         f"{r['tokens_per_s']:.1f} | {_fmt(r.get('x_eager'))} | {r.get('cuda_graphs', '-')} | {sites} | "
                         f"{_fmt(r.get('max_diff'), '.1e')} | {checks.get(('decode', r['layers'], r['kv'], r['config']), '')} |")
    return lines


def header(device: str, opts) -> List[str]:
    """Provenance lines: device, versions, commit, what the numbers are."""
    import transformers

    commit = source_version()
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "CPU"
    return [f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, sparsecc {commit}; "
            f"{'tiny Llama (CPU, --tiny)' if opts.tiny else 'Llama-3-8B shape, bf16'}, random weights, batch 1.",
            f"Prefill: {'all positions' if opts.all_logits else 'HF `logits_to_keep=1` (last-position'} logits, full "
            f"{'512' if opts.tiny else '128256'} vocabulary{'' if opts.all_logits else ')'}, "
            "no KV cache returned; "
            f"max|diff| against the reference semantics at {opts.check_seq} tokens. Tuned = hand-written spec in "
            "the shape `sparsecc tune` writes (see bench/e2e.py). Decode: static cache, batch 1, "
            + ("examples/specs/llama_tiny_decode.toml (sink 4 + window 16" if opts.tiny else
               "examples/specs/llama3_decode.toml (sink 128 + window 4096")
            + ", CATS 50% calibrated on random tokens)."]


def write_results(text: str, path: str) -> None:
    """Replace the text between the e2e markers of RESULTS.md (or append the marked section)."""
    old = open(path).read() if os.path.exists(path) else "# sparsecc benchmark results\n"
    block = f"{BEGIN}\n{text}\n{END}"
    start, end = old.find(BEGIN), old.find(END)
    if start >= 0 and end > start:
        new = old[:start] + block + old[end + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(new)


def device_slug(device: str, name: Optional[str] = None) -> str:
    """A file-name tag for the device (h100, cpu, ...); ``name`` is a recorded device name (``--from-json``)."""
    if name is None:
        if torch.device(device).type != "cuda":
            return "cpu"
        name = torch.cuda.get_device_name()
    name = name.lower()
    for tag in ("h100", "h200", "a100", "l40", "b200"):
        if tag in name:
            return tag
    return "cuda"


# ---------------------------------------------------------------- main

def parse(argv: Optional[List[str]]):
    """Command-line options, with the preset chosen by --quick / --tiny filled in."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 8K/32K prefill, KV 32K decode (~4 min on H100)")
    ap.add_argument("--tiny", action="store_true", help="a small Llama on CPU at short lengths (tests)")
    ap.add_argument("--layers", help="comma-separated layer counts (default 2,4)")
    ap.add_argument("--lengths", help="comma-separated prefill lengths (default 8192,32768,65536,131072; 0 for none)")
    ap.add_argument("--decode-kv", help="comma-separated decode KV lengths (default 32768,131072; 0 for none)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    ap.add_argument("--check-seq", type=int, help="reference-check length (default 8192, reusing the 8K graphs; "
                    "0: no check)")
    ap.add_argument("--calls", type=int, help="timed calls per measurement")
    ap.add_argument("--all-logits", action="store_true",
                    help="compute every position's logits (the issue's anchor setup; 33 GB of logits at 128K)")
    ap.add_argument("--json", help="write the rows here (rewritten after every row)")
    ap.add_argument("--write", action="store_true", help="replace the e2e section of bench/RESULTS.md and plot")
    ap.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="the RESULTS.md to write")
    ap.add_argument("--profile", action="store_true", help="top kernels of eager / Inductor / sparsecc-dense, then exit")
    ap.add_argument("--from-json", nargs="+", metavar="PATH",
                    help="render saved rows (several runs' --json files) instead of running; with --write too")
    opts = ap.parse_args(argv)
    preset = TINY if opts.tiny else QUICK if opts.quick else FULL

    def ints(text, default):
        return [int(x) for x in text.split(",") if int(x) > 0] if text else list(default)

    opts.layers = ints(opts.layers, preset["layers"])
    opts.lengths = ints(opts.lengths, preset["lengths"])
    opts.decode_kv = ints(opts.decode_kv, preset["decode_kv"])
    if opts.check_seq is None:
        opts.check_seq = min(preset["check_seq"], max(opts.lengths)) if opts.lengths else 0
    opts.calls = opts.calls or preset["calls"]
    opts.decode_steps = preset["decode_steps"]
    opts.logits_to_keep = 0 if opts.all_logits else 1
    opts.configs = [c for c in opts.configs.split(",") if c]
    unknown = [c for c in opts.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: {unknown} are not among {list(CONFIGS)}")
    return opts


def main(argv: Optional[List[str]] = None) -> List[dict]:
    """Run the rows, print the tables, optionally write JSON, RESULTS.md and the plot; return the rows."""
    opts = parse(argv)
    cuda = torch.cuda.is_available() and not opts.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tiny = opts.tiny or not cuda
    if opts.profile:
        profile(opts, device, dtype, tiny)
        return []
    rows: List[dict] = []
    head = header(device, opts)
    if opts.from_json:
        for path in opts.from_json:
            with open(path) as fh:
                saved = json.load(fh)
            head, rows = saved["header"], rows + saved["rows"]
        finish(rows, head, opts, device, 0.0)
        return rows

    def emit(row: dict) -> None:
        rows.append(row)
        what = f"{row['seq']} tokens" if row["kind"] == "prefill" else f"KV {row['kv']}"
        ms = row.get("ms", row.get("ms_per_token"))
        result = f"{ms:.3f} ms" if ms is not None else row.get("error", "failed")
        print(f"[{row['kind']}] {row['layers']} layers, {what}, {row['config']}: {result}", flush=True)
        if opts.json:
            with open(opts.json, "w") as fh:
                json.dump({"header": head, "rows": rows}, fh, indent=1, default=str)

    start = time.perf_counter()
    for layers in opts.layers if opts.lengths else []:
        prefill_rows(layers, opts.lengths, opts, device, dtype, tiny, emit)
    for layers in opts.layers[:1]:
        if opts.decode_kv:
            decode_rows(layers, opts.decode_kv, opts, device, dtype, tiny, emit)
    finish(rows, head, opts, device, time.perf_counter() - start)
    return rows


def finish(rows: List[dict], head: List[str], opts, device: str, seconds: float) -> None:
    """Print the tables; with --write, replace the RESULTS.md section and draw the plot."""
    lines = table(rows)
    print("\n" + "\n".join(head + [""] + lines))
    print(f"\n{seconds:.0f} s in all")
    if opts.write:
        # Rows loaded with --from-json carry the device they ran on in their header line.
        recorded = next((tag for tag in ("H100", "H200", "A100", "L40", "B200") if head and tag in head[0]), None)
        slug = device_slug(device, recorded)
        text = "\n".join(["## End to end (bench/e2e.py)", "", *head, "", *lines, "",
                          f"![e2e](plots/e2e_{slug}.png)"])
        write_results(text, opts.results)
        try:
            from plot_e2e import plot
            plots = os.path.join(os.path.dirname(os.path.abspath(opts.results)), "plots")
            os.makedirs(plots, exist_ok=True)
            plot(rows, os.path.join(plots, f"e2e_{slug}.png"))
        except ImportError as err:
            print(f"no plot ({err}); matplotlib is a bench-only dependency")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
