"""Tensor parallelism (CPU, gloo, 2 processes) on HF's LlamaForCausalLM, and through Inductor: the localized graph,
its DTensor hooks and the sparse ops lower like any graph. Both equal the unsharded model compiled with the same
spec (one spawn for the file)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.distributed import harness as H

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")

LLAMA = {"version": 1, "defaults": {"policy": "force"},
         "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 2, "window": 6,
                        "heads": [1, 2]}],
         "ffn": [{"modules": "model.layers.1.mlp", "form": "activation_threshold", "mode": "gate", "threshold": 0.02}],
         "linear": [{"modules": "*.o_proj", "form": "2:4"},
                    {"modules": "model.layers.0.mlp.gate_proj", "form": "block_weights", "block": [32, 32],
                     "density": 0.5}]}

SPEC = {"version": 1, "defaults": {"policy": "force"},
        "attention": [{"modules": "layers.*.attn", "form": "streaming", "sink": 2, "window": 6, "heads": [1, 2]}],
        "ffn": [{"modules": "layers.1.mlp", "form": "activation_threshold", "mode": "gate", "threshold": 0.1}],
        "linear": [{"modules": "*.o_proj", "form": "2:4"},
                   {"modules": "layers.0.mlp.down_proj", "form": "block_weights", "block": [32, 32],
                    "density": 0.4}]}


CASES = {"llama": functools.partial(H.run_case, LLAMA, model="llama"),
         "inductor": functools.partial(H.run_case, SPEC, lowering="inductor")}


def _records(ranks, name):
    out = H.records(ranks, name)
    for rank, r in enumerate(out):
        torch.testing.assert_close(r["out"], r["ref"], atol=2e-5, rtol=0, msg=lambda m: f"rank {rank}: {m}")
    return out


def test_sparse_sites_lower_through_inductor(ranks):
    for rank, r in enumerate(_records(ranks, "inductor")):
        applied = sorted(s["module"] for s in r["sites"] if s["applied"])
        assert applied == ["layers.0.attn", "layers.0.attn.o_proj", "layers.0.mlp.down_proj", "layers.1.attn",
                           "layers.1.attn.o_proj", "layers.1.mlp"], f"rank {rank}: {applied}"


def test_transformers_llama(ranks):
    """HF's LlamaForCausalLM (rotary embeddings, its own attention spelling) under the same plan."""
    pytest.importorskip("transformers")
    for rank, r in enumerate(_records(ranks, "llama")):
        applied = sorted(s["module"] for s in r["sites"] if s["applied"])
        assert applied == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn", "model.layers.0.self_attn.o_proj",
                           "model.layers.1.mlp", "model.layers.1.self_attn", "model.layers.1.self_attn.o_proj"], \
            f"rank {rank}: {applied}"
        attention = {s["module"]: s for s in r["sites"] if s["kind"] == "attention"}
        assert attention["model.layers.0.self_attn"]["attrs"]["holds_heads"] == ("0-1", "2-3")[rank]
