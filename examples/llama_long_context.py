"""Long-context prefill of a Llama-3-8B-shaped model: sparsecc against eager and Inductor.

    python examples/llama_long_context.py                       # CUDA: 4 layers, 32K tokens, bf16
    python examples/llama_long_context.py --tiny                # CPU: a small Llama, 256 tokens, seconds
    python examples/llama_long_context.py --layers 4 --seq 131072 --spec examples/specs/llama3_long_context.toml

The model is an HF ``LlamaForCausalLM`` built from a config with random weights
(nothing is downloaded). The spec keeps the first two layers dense, gives most
later layers streaming heads (attention sink + sliding window) and the rest
``block_topk`` (a per-input block selection). The script compiles the model with
sparsecc, prints the report, the prefill time against eager and ``torch.compile``
(Inductor), the peak memory, and the largest difference from the reference
semantics (the spec's forms applied by hand, float64, at a reduced length).

Only the last position's logits are computed (HF ``logits_to_keep=1``): a
prefill needs the next-token distribution, and full-vocabulary logits at 128K
tokens would be 128K x 128256 bf16 values (33 GB).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections import Counter
from typing import Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC_DIR = os.path.join(HERE, "specs")
# Llama-3-8B's shape (config.json of meta-llama/Meta-Llama-3-8B); layers are chosen per run.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, rope_theta=500000.0, rms_norm_eps=1e-5)
# A CPU-sized Llama with the same proportions (GQA 4:1, gated SiLU MLP) for --tiny runs and tests.
LLAMA_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16, rope_theta=500000.0, rms_norm_eps=1e-5)
# Timed calls per measurement (after warm-up); the median is reported.
TIMED_CALLS = 5
WARMUP_CALLS = 2
# Reference attention processes this many query rows at a time (float64 logits of rows x keys per head).
REFERENCE_ROWS = 512


def build_llama(layers: int, tiny: bool, device: str, dtype: torch.dtype, max_positions: int = 262144):
    """An HF LlamaForCausalLM with random weights (seed 0), SDPA attention, eval mode, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=max_positions,
                         **(LLAMA_TINY if tiny else LLAMA3_8B))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def random_ids(model, seq: int, seed: int = 1) -> torch.Tensor:
    """A batch of one random token sequence on the model's device."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
    return ids.to(next(model.parameters()).device)


def prefill_call(model, logits_to_keep: int = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """The prefill step every backend runs: no KV cache returned, the last ``logits_to_keep`` positions' logits.

    ``logits_to_keep=0`` is HF's "all positions" (the full lm_head GEMM).
    """
    def run(ids):
        return model(ids, use_cache=False, logits_to_keep=logits_to_keep).logits
    return run


def synchronize(device) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device, calls: int = TIMED_CALLS, warmup: int = WARMUP_CALLS) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(calls):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_gib(fn: Callable[[], object], device) -> Optional[float]:
    """Peak allocated device memory of one call of ``fn`` in GiB (None on CPU, where it is not tracked)."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2 ** 30


def free_memory() -> None:
    """Drop compiled graphs and cached blocks between configurations."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


BACKENDS = ("eager", "inductor", "sparsecc", "inductor-graphs", "sparsecc-graphs")


def compile_with(backend: str, model, spec=None, kernels: str = "auto"):
    """``model`` compiled by ``backend`` (one of :data:`BACKENDS`).

    "eager" is the model itself, "inductor" the default ``torch.compile``,
    "sparsecc" the sparsecc backend; the "-graphs" variants replay CUDA graphs
    (``mode="reduce-overhead"`` for Inductor, ``cudagraphs=True`` for sparsecc).
    """
    import sparsecc

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; expected one of {BACKENDS}")
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model)
    if backend == "inductor-graphs":
        return torch.compile(model, mode="reduce-overhead")
    return sparsecc.compile(model, spec=spec, kernels=kernels, cudagraphs=backend == "sparsecc-graphs")


def rewritten_forms(report) -> Dict[str, int]:
    """Applied sites per ``kind:form`` in a sparsecc report (e.g. {"attention:streaming": 2})."""
    return dict(Counter(f"{s.kind}:{s.form}" for s in report.sites if s.applied))


# ---------------------------------------------------------------- reference semantics

def head_forms(spec, model) -> Dict[str, list]:
    """Per attention site the spec forces, the form in force for each head (None: dense).

    Read from the spec's rules and the model's own module tree, never from the
    compile report, so that the reference does not share the compile's view.
    """
    from spec_sites import intended_sites

    return {path: forms for (kind, path), forms in intended_sites(model, spec).items() if kind == "attention"}


def _static_keep(form, pos: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Causal keep mask of one head for query positions ``pos`` [R, 1] and keys [1, S] (docs/spec.md)."""
    from sparsecc.forms import Streaming

    causal = keys <= pos
    if form is None:
        return causal
    if isinstance(form, Streaming):
        return causal & ((keys < form.sink) | (pos - keys < form.window))
    raise ValueError(f"no static reference for {form}")


def reference_attention(query, key, value, mask, scaling, forms, positions):
    """float64 attention of one layer with each head's form, ``REFERENCE_ROWS`` query rows at a time.

    ``positions`` are the query rows' token positions (prefill: 0..S-1; static-cache
    decode: the tokens' true positions, known to the driver loop). Dynamic forms
    (block_topk) use sparsecc's own reference for their per-input layout.
    """
    from sparsecc.codegen.dynamic_attention import dynamic_attention_ref
    from sparsecc.forms import BlockTopK, VerticalSlash

    b, h, sq, _ = query.shape
    rep = h // key.shape[1]
    dynamic = [f for f in forms if isinstance(f, (BlockTopK, VerticalSlash))]
    if dynamic:
        if len(dynamic) != h:
            raise ValueError("the reference takes dynamic forms only on every head of a layer, as sparsecc does")
        out = dynamic_attention_ref(query.double(), key.double(), value.double(), form=dynamic[0], causal=True,
                                    scale=scaling)
        return out.to(query.dtype)
    k, v = key.double().repeat_interleave(rep, 1), value.double().repeat_interleave(rep, 1)
    keys = torch.arange(k.shape[2], device=query.device)[None, :]
    out = torch.empty(b, h, sq, v.shape[-1], dtype=torch.float64, device=query.device)
    for r0 in range(0, sq, REFERENCE_ROWS):
        r1 = min(sq, r0 + REFERENCE_ROWS)
        pos = positions[r0:r1, None]
        keep = torch.stack([_static_keep(f, pos, keys) for f in forms])[None]
        if mask is not None:
            m = mask[..., r0:r1, :]
            keep = keep & (m if m.dtype == torch.bool else m > -1e4)
        logits = (query[:, :, r0:r1].double() @ k.transpose(-2, -1)) * scaling
        out[:, :, r0:r1] = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1) @ v
    return out.to(query.dtype)


class ReferenceModel:
    """A deep copy of the model whose attention and FFNs follow the spec's forms by hand (float64 attention).

    ``forms`` maps attention module paths to per-head forms; ``gate_taus``
    maps MLP paths to CATS thresholds (act(gate) entries at or below tau are
    zeroed). ``positions`` must be set before each call to the query tokens'
    positions.
    """

    def __init__(self, model, forms: Dict[str, list], gate_taus: Optional[Dict[str, float]] = None):
        from transformers import AttentionInterface

        self.model = copy.deepcopy(model)
        self.positions: Optional[torch.Tensor] = None
        modules = dict(self.model.named_modules())
        paths = {id(m): p for p, m in modules.items()}
        heads = self.model.config.num_attention_heads

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            per_head = forms.get(paths[id(module)], [None] * heads)
            out = reference_attention(query, key, value, attention_mask, scaling, per_head, self.positions)
            return out.transpose(1, 2).contiguous(), None

        AttentionInterface.register("sparsecc_e2e_reference", attention)
        self.model.config._attn_implementation = "sparsecc_e2e_reference"
        for path, tau in (gate_taus or {}).items():
            _threshold_gate(modules[path], tau)

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)


def _threshold_gate(mlp, tau: float) -> None:
    """CATS on an HF LlamaMLP: zero act(gate) entries with |a| <= tau before the up product."""
    def forward(x):
        a = mlp.act_fn(mlp.gate_proj(x))
        return mlp.down_proj(a * (a.abs() > tau) * mlp.up_proj(x))
    mlp.forward = forward


def reference_prefill_diff(model, spec, ids: torch.Tensor, compiled_logits: torch.Tensor) -> float:
    """max |compiled - reference semantics| of the last-position logits of a prefill of ``ids``."""
    forms = head_forms(spec, model)
    ref = ReferenceModel(model, forms)
    ref.positions = torch.arange(ids.shape[1], device=ids.device)
    expected = ref(ids, use_cache=False, logits_to_keep=1).logits
    del ref
    # Compiled runs may keep every position's logits; the reference computes the last one.
    return (compiled_logits[:, -1:].float() - expected.float()).abs().max().item()


# ---------------------------------------------------------------- the example

def main(argv: Optional[List[str]] = None) -> None:
    """Compile, time against eager and Inductor, print the report and the check against the reference."""
    import sparsecc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small Llama on CPU (seconds)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; --tiny: 6)")
    parser.add_argument("--seq", type=int, default=None, help="prefill length (default 32768; --tiny: 256)")
    parser.add_argument("--spec", default=None, help="spec path (default: specs/llama3_long_context.toml, "
                        "--tiny: specs/llama_tiny_long_context.toml)")
    parser.add_argument("--check-seq", type=int, default=None,
                        help="length of the reference check (default min(seq, 8192): float64 reference attention)")
    parser.add_argument("--backends", default="eager,inductor,sparsecc", help="comma-separated subset to time")
    parser.add_argument("--calls", type=int, default=TIMED_CALLS, help="timed calls per backend (median)")
    args = parser.parse_args(argv)
    if "sparsecc" not in args.backends.split(","):
        parser.error("--backends must include sparsecc (the report and the reference check come from it)")

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    layers = args.layers or (4 if not args.tiny else 6)
    seq = args.seq or (32768 if not args.tiny else 256)
    spec_path = args.spec or os.path.join(SPEC_DIR, "llama_tiny_long_context.toml" if args.tiny
                                          else "llama3_long_context.toml")
    check_seq = min(seq, args.check_seq or (8192 if not args.tiny else seq))
    kernels = "auto" if cuda else "reference"

    model = build_llama(layers, tiny=args.tiny or not cuda, device=device, dtype=dtype)
    spec = sparsecc.load_spec(spec_path)
    from spec_sites import intended_sites, require_rewrites
    ids = random_ids(model, seq)
    print(f"model: LlamaForCausalLM, {layers} layers, {'tiny' if (args.tiny or not cuda) else 'Llama-3-8B'} shape, "
          f"{dtype}, {device}; prefill {seq} tokens, last-position logits")
    print(f"spec: {spec_path}\n{spec}\n")

    results = {}
    with torch.no_grad():
        for backend in [b for b in ("eager", "inductor", "sparsecc") if b in args.backends.split(",")]:
            free_memory()
            fn = compile_with(backend, model, spec, kernels)
            call = prefill_call(fn)
            t0 = time.perf_counter()
            logits = call(ids)
            synchronize(device)
            first_s = time.perf_counter() - t0
            ms = time_ms(lambda: call(ids), device, calls=args.calls, warmup=1)
            results[backend] = dict(ms=ms, first_s=first_s, peak=peak_gib(lambda: call(ids), device))
            if backend == "sparsecc":
                report = sparsecc.last_report()
                print(report)
                require_rewrites(report, spec, intended_sites(model, spec))
                if check_seq == seq:  # the timed graph serves the check too
                    diff = reference_prefill_diff(model, spec, ids, logits)
            del fn, call, logits

        if check_seq != seq:
            free_memory()
            check_ids = ids[:, :check_seq]
            compiled = sparsecc.compile(model, spec=spec, kernels=kernels)
            got = prefill_call(compiled)(check_ids)
            diff = reference_prefill_diff(model, spec, check_ids, got)

    eager_ms = results.get("eager", {}).get("ms")
    print(f"\n{'backend':10} {'ms':>10} {'x eager':>8} {'first call s':>13} {'peak GiB':>9}")
    for backend, r in results.items():
        peak = f"{r['peak']:.2f}" if r["peak"] is not None else "-"
        ratio = f"{eager_ms / r['ms']:.2f}" if eager_ms else "-"
        print(f"{backend:10} {r['ms']:10.2f} {ratio:>8} {r['first_s']:13.1f} {peak:>9}")
    print(f"sites rewritten: {rewritten_forms(report)}")
    print(f"max |sparsecc - reference semantics| (last-position logits, {check_seq} tokens) = {diff:.2e}")
    tolerance = 5e-2 if dtype == torch.bfloat16 else 1e-3
    if not diff < tolerance:
        raise SystemExit(f"compiled output does not match the reference semantics (tolerance {tolerance:g})")


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
