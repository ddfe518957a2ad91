"""transformers' own tensor parallelism (``from_pretrained(..., tp_plan="auto")``, CPU, gloo, 2 processes): its
layers compute ``F.linear(x, weight.to_local())`` and all-reduce the row-wise outputs themselves; sparsecc maps
the spec's global heads through the weights' shards and equals the unsharded model."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from tests.distributed import harness as H

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")
pytest.importorskip("transformers")

SPEC = {"version": 1, "defaults": {"policy": "force"},
        "attention": [{"modules": "model.layers.*.self_attn", "form": "streaming", "sink": 2, "window": 6,
                       "heads": [1, 2]}],
        "linear": [{"modules": "*.o_proj", "form": "2:4"},
                   {"modules": "model.layers.0.mlp.down_proj", "form": "block_weights", "block": [32, 32],
                    "density": 0.4}]}
CASES = {"hf_auto": functools.partial(H.hf_auto_case, SPEC)}


def test_transformers_tp_plan_auto(ranks):
    for rank, r in enumerate(H.records(ranks, "hf_auto")):
        assert r["sharded"], f"rank {rank}: transformers did not shard the model"
        sites = {s["module"]: s for s in r["sites"]}
        applied = sorted(m for m, s in sites.items() if s["applied"])   # the forms ran before outputs are compared
        assert applied == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn", "model.layers.0.self_attn.o_proj",
                           "model.layers.1.self_attn", "model.layers.1.self_attn.o_proj"], f"rank {rank}: {applied}"
        torch.testing.assert_close(r["out"], r["ref"], atol=2e-5, rtol=0, msg=lambda m: f"rank {rank}: {m}")
        attention = sites["model.layers.0.self_attn"]
        assert attention["attrs"]["holds_heads"] == ("0-1", "2-3")[rank]
        assert attention["detail"] == ("dense on heads 0; streaming(sink=2, window=6) on heads 1",
                                       "streaming(sink=2, window=6) on heads 2; dense on heads 3")[rank]
        assert sites["model.layers.0.mlp.down_proj"]["attrs"]["tp_linear"] == "row-wise"
