"""The published MInference pattern files (trimmed copies, tests/data/importers/minference_configs/README.md):
every site of a Llama-shaped model with the file's head count applies under ``policy = "force"``, and the
report's per-head forms are the file's, head by head (docs/importers.md gives the mapping)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import sparsecc
from sparsecc.importers import import_minference

transformers = pytest.importorskip("transformers")

CONFIGS = sorted((Path(__file__).parent / "data" / "importers" / "minference_configs").glob("*.json"))
SEQ = 128   # prefill tokens: two 64-token blocks, the block every imported rule uses


def _expected_form(entry) -> str:
    """The sparsecc form a file entry maps to, written from docs/importers.md's table (not from the importer)."""
    pattern, a, b, _ = entry
    if pattern == "vertical_and_slash":
        return f"vertical_slash(last_q=64, vertical={a}, slash={b}, block=64)"
    if pattern in ("stream_llm", "a_shape"):
        return f"streaming(sink={a}, window={b})"
    raise AssertionError(f"no published config of these uses {pattern}")


def _per_head(detail: str, heads: int) -> list:
    """Each head's form from a report line such as ``A on heads 0-2, 5; B on heads 3-4``."""
    out = [None] * heads
    for group in detail.split("; "):
        form, spans = re.fullmatch(r"(.*) on heads (.*)", group).groups()
        for span in spans.split(", "):
            lo, _, hi = span.partition("-")
            for h in range(int(lo), int(hi or lo) + 1):
                out[h] = form
    return out


def _llama(layers: int, heads: int):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=heads * 4, intermediate_size=32,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=heads // 4, max_position_embeddings=SEQ)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_site_applies_with_the_files_per_head_forms(path):
    layers = json.loads(path.read_text())
    heads = len(layers[0])
    spec = import_minference(path, policy="force")
    report = sparsecc.explain(_llama(len(layers), heads), torch.randint(0, 64, (1, SEQ)), spec=spec)
    sites = {s.module: s for s in report.sites if s.kind == "attention"}
    assert len(sites) == len(layers)
    for i, layer in enumerate(layers):
        site = sites[f"model.layers.{i}.self_attn"]
        assert site.applied, f"layer {i}: {site.reason}"
        expected = [_expected_form(layer[str(h)]) for h in range(heads)]
        got = _per_head(site.form_detail, heads) if " on heads " in site.form_detail else [site.form_detail] * heads
        assert got == expected, f"layer {i}"


def test_phi3_mixed_layers_run_at_prefill_and_stay_dense_at_decode(eager_lowering, tmp_path):
    """Phi-3's layers 8 and 9 mix stream_llm and vertical_and_slash heads: the compiled model runs each as one
    mixed op at prefill; at decode (one query) the prefill-only rules do not apply, and the report says so."""
    path = next(p for p in CONFIGS if p.stem.startswith("Phi_3"))
    trimmed = tmp_path / "phi3_layers_8_9.json"
    trimmed.write_text(json.dumps(json.loads(path.read_text())[8:10]))
    spec = import_minference(trimmed, policy="force")
    model = _llama(2, 32)
    ids = torch.randint(0, 64, (1, SEQ))
    with torch.no_grad():
        dense = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference"})
        out = compiled(ids).logits
    applied = [s for s in sparsecc.last_report().sites if s.kind == "attention" and s.applied]
    assert len(applied) == 2 and all("; " in s.form_detail for s in applied), [s.reason for s in applied]
    assert torch.isfinite(out).all() and out.shape == dense.shape
    decode = sparsecc.explain(model, torch.randint(0, 64, (1, 1)), spec=spec)
    for site in (s for s in decode.sites if s.kind == "attention"):
        assert not site.applied and "prefill only" in site.reason, site.reason
