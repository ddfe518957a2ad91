"""Token-by-token decoding with a static KV cache: sparse decode attention and FFN activation sparsity.

    python examples/decode.py                  # CUDA: Llama-3-8B shape, 2 layers, KV 32K, bf16
    python examples/decode.py --tiny           # CPU: a small Llama, KV 96, seconds
    python examples/decode.py --kv 131072 --spec examples/specs/llama3_decode.toml

The prompt fills an HF ``StaticCache`` (a dense prefill, the same for every
backend); then each decode step feeds one token at its ``cache_position``. The
cache is a fixed-size buffer, so shapes stay fixed and one compiled graph serves
every step. The spec gives every layer sink + window attention and CATS
(``activation_threshold``, gate mode) at 50% sparsity, calibrated on random
tokens. The script prints tokens/s against eager and ``torch.compile``
(Inductor), and checks every step's logits against the reference semantics:
the spec's forms applied by hand (float64 attention over the true positions,
thresholded gates) on an eager copy of the model.

Decode steps are teacher-forced with fixed random tokens, so every backend and
the reference see the same inputs.

How the static cache is handled: SDPA sees the query (length 1) against the
whole buffer and a mask that hides its unfilled tail (``is_causal=False``). A
streaming window counted back from the end of the key axis would cover empty
slots; sparsecc rewrites such sites (masked, not causal, fewer queries than
keys) to ``torch.ops.sparsecc.streaming_attention_from_mask``, which takes each
query's position from the last key its mask keeps.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from llama_long_context import (  # noqa: E402 - the example directory is put on the path first
    SPEC_DIR, ReferenceModel, build_llama, compile_with, free_memory, head_forms, random_ids, rewritten_forms,
    synchronize)

# Calibration batches (random tokens) for the 50% FFN sparsity target, and their length.
CALIBRATION_BATCHES = 2
CALIBRATION_SEQ = {True: 64, False: 512}
# Steps before the timed steps: compilation, autotuning and caches settle here.
WARMUP_STEPS = 3


def calibrated_spec(model, spec_path: str, tiny: bool):
    """The spec with its FFN ``sparsity`` target turned into thresholds on random-token batches."""
    import sparsecc

    spec = sparsecc.load_spec(spec_path)
    batches = [random_ids(model, CALIBRATION_SEQ[tiny], seed=100 + i) for i in range(CALIBRATION_BATCHES)]
    with torch.no_grad():
        return sparsecc.calibrate(model, [dict(input_ids=b, use_cache=False) for b in batches], spec,
                                  progress=False)


def gate_thresholds(spec, model) -> Dict[str, float]:
    """CATS thresholds of the FFN sites the spec forces, by MLP path (from the spec and the model, not the report)."""
    from spec_sites import intended_sites

    return {path: form.tau("gate") for (kind, path), form in intended_sites(model, spec).items() if kind == "ffn"}


def new_cache(model, kv: int, steps: int):
    """A static cache with room for the prompt and the decoded tokens."""
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=kv + steps)


def cache_keyword(model) -> str:
    """The keyword that hands a cache to ``model``: ``cache`` where its forward declares one (newer transformers,
    which deprecate ``past_key_values`` and will remove it in 5.40), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, cache, prompt: torch.Tensor) -> None:
    """Fill the cache with the prompt, densely and in chunks (eager), so every backend starts from the same state."""
    chunk = 8192
    cache_kw = {cache_keyword(model): cache}
    with torch.no_grad():
        for c0 in range(0, prompt.shape[1], chunk):
            c1 = min(prompt.shape[1], c0 + chunk)
            model(prompt[:, c0:c1], **cache_kw,
                  cache_position=torch.arange(c0, c1, device=prompt.device), use_cache=True, logits_to_keep=1)


def decode_steps(step_fn: Callable, cache, tokens: torch.Tensor, start: int, device, cache_key: str) -> tuple:
    """Feed ``tokens`` one by one from position ``start``; return (logits per step, ms per step).

    ``cache_key`` is the model's keyword for the cache (:func:`cache_keyword`)."""
    logits, times = [], []
    cuda = torch.device(device).type == "cuda"
    cache_kw = {cache_key: cache}
    with torch.no_grad():
        for i in range(tokens.shape[1]):
            pos = torch.tensor([start + i], device=tokens.device)
            synchronize(device)
            t0 = time.perf_counter()
            out = step_fn(tokens[:, i:i + 1], **cache_kw, cache_position=pos, use_cache=True).logits
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            logits.append(out[:, -1].float())
    return torch.cat(logits), times


def reference_decode(model, spec, prompt: torch.Tensor, tokens: torch.Tensor, steps: int):
    """Logits of each decode step under the reference semantics (dense prefill, then the spec's forms)."""
    forms = head_forms(spec, model)
    ref = ReferenceModel(model, forms, gate_thresholds(spec, model))
    cache = new_cache(model, prompt.shape[1], steps)
    prefill(model, cache, prompt)
    out = []
    cache_kw = {cache_keyword(model): cache}
    for i in range(tokens.shape[1]):
        pos = prompt.shape[1] + i
        ref.positions = torch.tensor([pos], device=prompt.device)
        step = ref(tokens[:, i:i + 1], **cache_kw,
                   cache_position=torch.tensor([pos], device=prompt.device), use_cache=True)
        out.append(step.logits[:, -1].float())
    return torch.cat(out)


def run_decode(model, spec, kv: int, steps: int, device, backends=("eager", "inductor", "sparsecc"),
               kernels: str = "auto", check: bool = True) -> dict:
    """Decode ``steps`` tokens after a ``kv``-token prompt with each backend; timings, report and reference error."""
    import sparsecc
    from torch._dynamo.utils import counters

    prompt = random_ids(model, kv, seed=2)
    tokens = random_ids(model, steps, seed=3)
    result = {"kv": kv, "steps": steps, "backends": {}}
    sparse_logits = {}   # sparsecc backend -> its logits, each checked against the reference
    for backend in backends:
        free_memory()
        counters.clear()
        fn = compile_with(backend, model, spec, kernels)
        cache = new_cache(model, kv, steps)
        prefill(model, cache, prompt)
        logits, times = decode_steps(fn, cache, tokens, kv, device, cache_keyword(model))
        timed = times[WARMUP_STEPS:] if len(times) > WARMUP_STEPS else times
        ms = statistics.median(timed)
        result["backends"][backend] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "first_step_s": times[0] / 1e3}
        if backend.endswith("-graphs"):   # Inductor falls back to plain launches when it skips graphs: say so
            skips = counters["inductor"]["cudagraph_skips"]
            result["backends"][backend]["cuda_graphs"] = f"skipped {skips}x" if skips else "replayed"
        if backend.startswith("sparsecc"):
            result["report"] = sparsecc.last_report()
            sparse_logits[backend] = logits
        del fn, cache
    if check and sparse_logits:
        from spec_sites import intended_sites, require_rewrites
        require_rewrites(result["report"], spec, intended_sites(model, spec))
        expected = reference_decode(model, spec, prompt, tokens, steps)
        for backend, logits in sparse_logits.items():
            result["backends"][backend]["max_diff"] = (logits - expected).abs().max().item()
        result["max_diff"] = max(r["max_diff"] for r in result["backends"].values() if "max_diff" in r)
    return result


def main(argv: Optional[List[str]] = None) -> None:
    """Calibrate, decode with eager / Inductor / sparsecc, print tokens/s and the reference check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small Llama on CPU (seconds)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 2)")
    parser.add_argument("--kv", type=int, default=None, help="prompt (KV cache) length (default 32768; --tiny 96)")
    parser.add_argument("--steps", type=int, default=None, help="decoded tokens (default 32; --tiny 5)")
    parser.add_argument("--spec", default=None, help="spec path (default specs/llama3_decode.toml; "
                        "--tiny: specs/llama_tiny_decode.toml)")
    parser.add_argument("--backends", default="eager,inductor,sparsecc",
                        help="comma-separated, from eager, inductor, sparsecc, inductor-graphs, sparsecc-graphs "
                             "(the -graphs variants replay CUDA graphs)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.tiny
    tiny = args.tiny or not cuda
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    kv = args.kv or (32768 if not tiny else 96)
    steps = args.steps or (32 if not tiny else 5)
    spec_path = args.spec or os.path.join(SPEC_DIR, "llama_tiny_decode.toml" if tiny else "llama3_decode.toml")

    model = build_llama(args.layers or 2, tiny=tiny, device=device, dtype=dtype)
    spec = calibrated_spec(model, spec_path, tiny)
    print(f"model: LlamaForCausalLM, {args.layers or 2} layers, {'tiny' if tiny else 'Llama-3-8B'} shape, {dtype}, "
          f"{device}; static cache, KV {kv}, {steps} decode steps, batch 1")
    print(f"spec (FFN thresholds calibrated to the sparsity target on random tokens):\n{spec}\n")
    result = run_decode(model, spec, kv, steps, device, backends=tuple(args.backends.split(",")),
                        kernels="auto" if cuda else "reference")
    if "report" in result:
        print(result["report"])
    eager = result["backends"].get("eager", {}).get("ms_per_token")
    print(f"\n{'backend':10} {'ms/token':>9} {'tokens/s':>9} {'x eager':>8} {'first step s':>13}")
    for backend, r in result["backends"].items():
        ratio = f"{eager / r['ms_per_token']:.2f}" if eager else "-"
        print(f"{backend:10} {r['ms_per_token']:9.2f} {r['tokens_per_s']:9.1f} {ratio:>8} {r['first_step_s']:13.1f}")
    if "report" in result:
        print(f"sites rewritten: {rewritten_forms(result['report'])}")
    if "max_diff" in result:
        print(f"max |sparsecc - reference semantics| over {steps} steps' logits = {result['max_diff']:.2e}")
        tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-3
        if not result["max_diff"] < tolerance:
            raise SystemExit(f"decode does not match the reference semantics (tolerance {tolerance:g})")


if __name__ == "__main__":
    main()
