"""Compile a small Llama-style model from a sparsity spec, print the report and the error against the reference.

    python examples/quickstart.py [--spec examples/specs/llama.toml] [--seq 96]

The model is an HF ``LlamaForCausalLM`` built from a config with random weights
(nothing is downloaded). The spec asks for streaming / block-sparse attention,
gate-thresholded MLPs and sparse weights. With ``kernels="reference"`` every
rewritten site runs its pure-PyTorch reference, so the compiled model must
match the reference semantics computed independently here: each sparse form
applied by hand to a copy of the model, at the sites the spec names (not the
sites the report lists). It exits non-zero when a site the spec forces was not
rewritten, or when the numbers differ.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import sparsecc

HERE = os.path.dirname(os.path.abspath(__file__))


def build_model(layers: int = 4):
    """A small Llama (random weights): 4 layers, 8 heads, 4 KV heads (GQA), SiLU-gated MLP."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def main(argv=None) -> None:
    """Compile, run, and compare against the reference semantics and against dense."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=os.path.join(HERE, "specs", "llama.toml"))
    parser.add_argument("--seq", type=int, default=96)
    args = parser.parse_args(argv)

    model = build_model()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq))
    spec = sparsecc.load_spec(args.spec)
    print(f"spec: {args.spec}\n{spec}\n")

    with torch.no_grad():
        dense = model(ids).logits
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")
        start = time.perf_counter()
        out = compiled(ids).logits
        compile_s = time.perf_counter() - start
    report = sparsecc.last_report()
    print(report)

    from reference_semantics import sparse_reference_logits
    from spec_sites import intended_sites, require_rewrites
    require_rewrites(report, spec, intended_sites(model, spec))
    reference = sparse_reference_logits(model, ids, spec)
    err = (out - reference).abs().max().item()
    drift = (out - dense).abs().max().item()
    print(f"\ncompile + first call: {compile_s:.1f} s")
    print(f"max |compiled - reference semantics| = {err:.2e}   (the check: should be ~1e-5)")
    print(f"max |compiled - dense model|         = {drift:.2e}   (what the sparsity changes)")
    if not err < 1e-3:
        raise SystemExit("compiled output does not match the reference semantics")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, HERE)
    main()
