"""Importers: MInference, DuoAttention and compressed-tensors files -> sparsecc specs."""

import fnmatch
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc import importers
from sparsecc.importers import (import_compressed_tensors, import_duo_attention, import_minference,
                                import_spec, minference_tables)
from sparsecc.spec import SpecError, load_spec
from tests import zoo

DATA = Path(__file__).parent / "data" / "importers"

def streaming_keep(s, sink, window):
    """Causal sink + window keep mask [s, s] (docs/spec.md)."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


class AttentionStack(nn.Module):
    """GQA attention layers (4 query heads, 2 KV heads) at module paths layers.0, layers.1, ..."""

    def __init__(self, n_layers):
        super().__init__()
        self.layers = nn.ModuleList([zoo.SdpaAttention(hidden=32, heads=4, kv_heads=2) for _ in range(n_layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x

    def expected(self, x, keeps):
        """Output with layer i restricted to keep mask keeps[i] ([heads, S, S])."""
        for layer, keep in zip(self.layers, keeps):
            x = x + layer.expected(x, keep)
        return x


def keeps_from_spec(spec, n_layers, heads, s):
    """Per-layer [heads, s, s] masks from the streaming rules of an imported spec (dense elsewhere)."""
    keeps = []
    for layer in range(n_layers):
        keep = torch.ones(heads, s, s, dtype=torch.bool)
        for head in range(heads):
            rule = spec.resolve("attention", f"layers.{layer}", head)
            if rule is not None:
                keep[head] = streaming_keep(s, rule.form.sink, rule.form.window)
        keeps.append(keep)
    return keeps


def assert_round_trip(spec, tmp_path):
    for suffix in (".toml", ".json"):
        path = tmp_path / f"imported{suffix}"
        spec.save(path)
        assert load_spec(str(path)) == spec


def test_meta_records_provenance():
    spec = import_minference(DATA / "minference_streaming.json")
    meta = spec.meta["import"]
    assert meta["format"] == "minference"
    assert meta["file"] == "minference_streaming.json"
    assert meta["sha256"] == hashlib.sha256((DATA / "minference_streaming.json").read_bytes()).hexdigest()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", meta["date"])
    assert meta["options"]["modules_template"] == "model.layers.{layer}.self_attn"


# ------------------------------------------------------------------------------ MInference

def test_minference_tables_map_every_pattern():
    rules = minference_tables(DATA / "minference_mixed.json")["attention"]
    # MInference sparsifies prefill only: every imported rule says so.
    vs = {"form": "vertical_slash", "last_q": 64, "block": 64, "phase": "prefill"}
    topk = {"form": "block_topk", "block": 64, "topk": 100, "sink_blocks": 0, "local_blocks": 0, "pool": "mean",
            "phase": "prefill"}
    layer0, layer1 = "model.layers.0.self_attn", "model.layers.1.self_attn"
    assert rules == [
        # vertical_slash takes MInference's budgets as they are (the form applies its minimums itself).
        {"modules": layer0, "heads": [0, 1], **vs, "vertical": 1000, "slash": 6096},
        {"modules": layer0, "heads": [2], "form": "streaming", "sink": 4, "window": 16, "phase": "prefill"},
        {"modules": layer0, "heads": [3], **topk},
        # a_shape and stream_llm are one pattern: heads 0, 1 and 3 share a rule.
        {"modules": layer1, "heads": [0, 1, 3], "form": "streaming", "sink": 2, "window": 8, "phase": "prefill"},
        # budgets below MInference's minimums (30 columns, 50 diagonals) stay as written; the form raises them
        {"modules": layer1, "heads": [2], **vs, "vertical": 10, "slash": 20},
    ]


def test_minference_mixed_loads_and_round_trips(tmp_path):
    spec = import_minference(DATA / "minference_mixed.json")
    assert [type(r.form).__name__ for r in spec.attention] == [
        "VerticalSlash", "Streaming", "BlockTopK", "Streaming", "VerticalSlash"]
    assert spec.attention[0].form.vertical == 1000 and spec.attention[0].form.last_q == 64
    topk = spec.attention[2].form
    assert (topk.topk, topk.cdf, topk.sink_blocks, topk.local_blocks, topk.pool) == (100, None, 0, 0, "mean")
    assert_round_trip(spec, tmp_path)


def test_minference_streaming_spec_and_round_trip(tmp_path):
    spec = import_minference(DATA / "minference_streaming.json", modules_template="layers.{layer}", policy="force")
    assert spec.defaults.policy == "force"
    assert [(r.modules, r.heads, r.form.sink, r.form.window) for r in spec.attention] == [
        ("layers.0", (0, 1, 3), 1, 3), ("layers.0", (2,), 2, 4), ("layers.1", (0, 1, 2, 3), 0, 5)]
    assert_round_trip(spec, tmp_path)


def test_minference_import_compiles_and_applies(eager_lowering):
    torch.manual_seed(0)
    spec = import_minference(DATA / "minference_streaming.json", modules_template="layers.{layer}", policy="force")
    model = AttentionStack(2).eval()
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        out = torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference"})(x)
        expected = model.expected(x, keeps_from_spec(spec, 2, 4, 12))
    sites = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert [(s.module, s.applied) for s in sites] == [("layers.0", True), ("layers.1", True)]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text, key, allowed", [
    ('{"0": ["stream_llm", 1, 2, 0]}', None, "one object per layer"),
    ('[{"x": ["stream_llm", 1, 2, 0]}]', "[0].x", "integer >= 0"),
    ('[{"0": ["stream_llm", 1, 2]}]', '[0]["0"]', "[pattern, size_a, size_b, score]"),
    ('[{"0": ["stream_llm", -1, 2, 0]}]', '[0]["0"][1]', "an integer >= 0"),
    ('[{"0": ["stream_llm", 1, 2.5, 0]}]', '[0]["0"][2]', "an integer >= 0"),
    ('[{"0": ["stream_llm", 4, 0, 0]}]', '[0]["0"][2]', "an integer >= 1"),
    ('[{"0": ["vertical_and_slash", 4, 8, "high"]}]', '[0]["0"][3]', "a number"),
    ('[[1, 2]]', "[0]", "an object mapping head index"),
])
def test_minference_errors_name_file_key_and_allowed(tmp_path, text, key, allowed):
    path = tmp_path / "pattern.json"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        import_minference(path)
    err = info.value
    assert err.file == str(path) and err.key == key and allowed in err.allowed


def test_minference_unknown_pattern_has_line_and_choices():
    with pytest.raises(SpecError) as info:
        import_minference(DATA / "minference_bad_pattern.json")
    err = info.value
    assert err.line == 4 and err.key == '[1]["1"][0]' and err.value == "dilated"
    assert "vertical_and_slash, stream_llm, a_shape, block_sparse" in str(err)


def test_minference_invalid_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"0": ["stream_llm", 1, 2, 0],}\n]')
    with pytest.raises(SpecError, match="invalid JSON") as info:
        import_minference(bad)
    assert info.value.line == 2
    with pytest.raises(SpecError, match="does not exist"):
        import_minference(tmp_path / "nope.json")


@pytest.mark.parametrize("template", ["model.layers.self_attn", "a.{layer}.{layer}", "a {layer}", "a.{layer}.{x}",
                                      "a.[{layer}", "a.{layer}}", 3])
def test_bad_module_template_is_an_error(template):
    with pytest.raises(SpecError) as info:
        import_minference(DATA / "minference_streaming.json", modules_template=template)
    assert info.value.key == "modules_template" and "{layer}" in info.value.allowed


# ---------------------------------------------------------------------------- DuoAttention

def test_duo_expands_kv_heads_to_query_heads(tmp_path):
    spec = import_duo_attention(DATA / "duo", query_heads=4, modules_template="layers.{layer}")
    # Row 0 = [0.6, 0.01]: KV head 1 streams -> query heads 2, 3. Row 1 = [0, 0.99]: KV head 0
    # -> query heads 0, 1. Row 2 is all full attention: no rule.
    assert [(r.modules, r.heads, r.form.sink, r.form.window) for r in spec.attention] == [
        ("layers.0", (2, 3), 2, 3), ("layers.1", (0, 1), 2, 3)]
    meta = spec.meta["import"]["options"]
    assert (meta["kv_heads"], meta["query_heads"], meta["sink"], meta["recent"]) == (2, 4, 2, 3)
    assert_round_trip(spec, tmp_path)


def test_duo_groups_of_four_and_file_path():
    spec = import_duo_attention(DATA / "duo" / "full_attention_heads.tsv", query_heads=8)
    assert [r.heads for r in spec.attention] == [(4, 5, 6, 7), (0, 1, 2, 3)]
    assert spec.attention[0].modules == "model.layers.0.self_attn"


def test_duo_threshold_clipping_and_overrides(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("# gates\n0.5\t0.49\t1.7\t-0.3\n")
    spec = import_duo_attention(tmp_path, query_heads=4, sink=7, recent=9)
    # 0.5 >= 0.5 keeps full attention; 1.7 clips to 1 (full); -0.3 clips to 0 (streaming).
    assert [(r.heads, r.form.sink, r.form.window) for r in spec.attention] == [((1, 3), 7, 9)]
    spec = import_duo_attention(tmp_path, query_heads=4, sink=7, recent=9, threshold=1.0)
    assert spec.attention[0].heads == (0, 1, 3)


def test_duo_import_compiles_and_applies(eager_lowering):
    torch.manual_seed(1)
    spec = import_duo_attention(DATA / "duo", query_heads=4, modules_template="layers.{layer}", policy="force")
    model = AttentionStack(3).eval()
    x = torch.randn(1, 11, 32)
    with torch.no_grad():
        out = torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference"})(x)
        keeps = keeps_from_spec(spec, 3, 4, 11)
        expected = model.expected(x, keeps)
    # The GQA expansion is visible in the masks: both query heads of a streaming KV head stream.
    assert torch.equal(keeps[0][2], streaming_keep(11, 2, 3)) and keeps[0][1].all()
    sites = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert [(s.module, s.applied) for s in sites] == [("layers.0", True), ("layers.1", True), ("layers.2", False)]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_duo_import_for_another_head_count_stays_dense_and_says_so(eager_lowering):
    """Imported for 2 query heads, compiled on sites of 4: KV head 1's rule would name query head 1 (KV head 0's
    group) instead of 2 and 3. Each covered site stays dense with the reason, and the compile's summary warns."""
    spec = import_duo_attention(DATA / "duo", query_heads=2, modules_template="layers.{layer}", policy="force")
    assert [r.heads for r in spec.attention] == [(1,), (0,)]
    model = AttentionStack(3).eval()
    x = torch.randn(1, 11, 32)
    with pytest.warns(sparsecc.SparseccWarning, match=r"imported for 2 query heads .* this attention site has 4"):
        with torch.no_grad():
            out = sparsecc.compile(model, spec=spec, kernels="reference")(x)
    sites = [s for s in sparsecc.last_report().sites if s.kind == "attention"]
    assert [(s.module, s.applied) for s in sites] == [("layers.0", False), ("layers.1", False), ("layers.2", False)]
    assert all("import it again with query_heads=4 (--query-heads 4)" in s.reason for s in sites[:2])
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_duo_errors():
    with pytest.raises(SpecError, match="row 1 has 1 values but row 0 has 2") as info:
        import_duo_attention(DATA / "duo_ragged.tsv", query_heads=4, sink=1, recent=1)
    assert info.value.line == 2 and info.value.file.endswith("duo_ragged.tsv")
    with pytest.raises(SpecError, match="does not exist") as info:
        import_duo_attention(DATA / "duo_noconfig", query_heads=4)
    assert "sink_size" in info.value.allowed
    # with both sizes given, the config is not needed
    assert import_duo_attention(DATA / "duo_noconfig", query_heads=4, sink=1, recent=4).attention
    with pytest.raises(SpecError, match="query_heads = 3") as info:
        import_duo_attention(DATA / "duo", query_heads=3)
    assert "multiple of the 2 KV heads" in info.value.allowed
    with pytest.raises(SpecError) as info:
        import_duo_attention(DATA / "duo", query_heads=4, recent=0)
    assert info.value.key == "recent" and "integer >= 1" in info.value.allowed


@pytest.mark.parametrize("text, line, column", [("0.9\t\t0.1\n", 1, 1), ("0.9\t0.5\t0.1\n0.9 0.5\t0.1\n", 2, 0)])
def test_duo_cells_are_tab_separated(tmp_path, text, line, column):
    """An empty cell, or two values in one cell, is an error naming the row and column, as DuoAttention's
    numpy.loadtxt(delimiter="\\t") refuses the file: splitting on any whitespace read [0.9, 0.1] as two KV heads and
    streamed the wrong query heads."""
    (tmp_path / "full_attention_heads.tsv").write_text(text)
    with pytest.raises(SpecError, match=f"column {column} = ") as info:
        import_duo_attention(tmp_path, query_heads=6, sink=1, recent=1)
    assert info.value.line == line


def test_duo_bad_values_and_config(tmp_path):
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\t0.2\n0.3\tnan\n")
    with pytest.raises(SpecError, match="row 1, column 1") as info:
        import_duo_attention(tmp_path, query_heads=2, sink=1, recent=1)
    assert info.value.line == 2
    (tmp_path / "full_attention_heads.tsv").write_text("0.1\t0.2\n")
    (tmp_path / "config.json").write_text(json.dumps({"sink_size": 4, "recent_size": 2.5}))
    with pytest.raises(SpecError) as info:
        import_duo_attention(tmp_path, query_heads=2)
    assert info.value.key == "recent_size" and info.value.file.endswith("config.json")
    (tmp_path / "config.json").write_text(json.dumps({"recent_size": 2}))
    with pytest.raises(SpecError, match="has no sink_size"):
        import_duo_attention(tmp_path, query_heads=2)


# ---------------------------------------------------------------------- compressed-tensors

def test_compressed_tensors_targets_then_ignores(tmp_path):
    spec = import_compressed_tensors(DATA / "ct_two_four.json")
    assert [(r.modules, str(r.form)) for r in spec.linear] == [
        ("*", "2:4(prune=keep)"), ("lm_head", "dense"), ("*self_attn*", "dense"),
        ("model.layers.0.mlp.gate_proj", "dense"), ("model.layers.0.mlp.up_proj", "dense")]
    assert spec.resolve("linear", "model.layers.3.mlp.down_proj").form.name == "2:4"
    assert spec.resolve("linear", "model.layers.0.mlp.up_proj").form.name == "dense"
    assert spec.resolve("linear", "model.layers.1.mlp.up_proj").form.name == "2:4"
    assert spec.resolve("linear", "model.layers.1.self_attn.q_proj").form.name == "dense"
    options = spec.meta["import"]["options"]
    assert options["global_sparsity"] == 0.4512 and options["sparsity_format"] == "sparse-24-bitmask"
    assert_round_trip(spec, tmp_path)


def _write_ct(tmp_path, sparsity_config, container="quantization_config"):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", container: {"sparsity_config": sparsity_config}}))
    return path


def test_compressed_tensors_named_targets_and_defaults(tmp_path):
    path = _write_ct(tmp_path, {"sparsity_structure": "2:4", "targets": ["re:.*mlp\\.down_proj$", "lm_head"]},
                     container="compression_config")
    spec = import_compressed_tensors(path)
    assert [r.modules for r in spec.linear] == ["*mlp.down_proj", "lm_head"]
    # no targets: compressed-tensors' match_named_modules selects nothing, and so does the spec
    with pytest.warns(sparsecc.SparseccWarning, match="no targets"):
        spec = import_compressed_tensors(_write_ct(tmp_path, {"sparsity_structure": "2:4", "ignore": ["lm_head"]}))
    assert spec.linear == () and spec.resolve("linear", "model.layers.0.mlp.down_proj") is None


def test_compressed_tensors_unsupported_structure_error():
    with pytest.raises(SpecError) as info:
        import_compressed_tensors(DATA / "ct_unstructured.json")
    err = info.value
    assert err.file.endswith("ct_unstructured.json") and err.line == 4
    assert err.key == "compression_config.sparsity_config.sparsity_structure" and err.value == "unstructured"
    assert "'2:4'" in err.allowed


@pytest.mark.parametrize("config, key, fragment", [
    ({"sparsity_structure": "8:16"}, "sparsity_structure", "is not supported"),
    ({"targets": ["Linear"]}, "sparsity_structure", "is missing"),
    ({"sparsity_structure": "2:4", "targets": ["re:model\\.layers\\.\\d+\\.mlp"]}, "targets[0]", "quantifier"),
    ({"sparsity_structure": "2:4", "targets": ["LlamaDecoderLayer"]}, "targets[0]", "class name"),
    ({"sparsity_structure": "2:4", "ignore": ["re:(unclosed"]}, "ignore[0]", "not a valid regex"),
    ({"sparsity_structure": "2:4", "ignore": "lm_head"}, "ignore", "is not allowed"),
])
def test_compressed_tensors_config_errors(tmp_path, config, key, fragment):
    with pytest.raises(SpecError) as info:
        import_compressed_tensors(_write_ct(tmp_path, config))
    assert info.value.key == "quantization_config.sparsity_config." + key
    assert fragment in str(info.value)


def test_compressed_tensors_without_sparsity_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(SpecError, match="is missing") as info:
        import_compressed_tensors(path)
    assert "compression_config" in info.value.allowed


REGEXES = [".*self_attn.*", ".*lm_head", "model\\.layers\\.0\\.mlp\\.(gate|up)_proj$", "a.b", "^a\\.[0-1]\\.",
           ".*(q|k)_proj$", "a\\.\\d\\.b", ".+_x$", "a[.!]b$", "a[^.]b", "[ab]$", "a\\[0\\]", "x[]a]", "[^]a]b$",
           "(?:self|q)_", ""]


@given(st.text(alphabet="ab._01[]!xlm_headselfqkprojtn", max_size=14))
def test_regex_globs_match_exactly_what_re_match_accepts(name):
    for regex in REGEXES:
        globs = importers._regex_to_globs(regex, lambda reason: AssertionError(reason))
        assert any(fnmatch.fnmatchcase(name, g) for g in globs) == bool(re.match(regex, name)), (regex, globs)


def test_regex_examples():
    def globs(rx):
        return importers._regex_to_globs(rx, lambda reason: AssertionError(reason))
    assert globs(".*self_attn.*") == ["*self_attn*"]
    assert globs(".*lm_head") == ["*lm_head*"]
    assert globs("model\\.layers\\.0\\.mlp\\.(gate|up)_proj$") == ["model.layers.0.mlp.gate_proj",
                                                                   "model.layers.0.mlp.up_proj"]


class TwoFourLM(nn.Module):
    """Linear layers at HF-style paths, weights already 2:4 (as a pruned checkpoint has them)."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(2):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.o_proj = nn.Linear(32, 32)
            layer.mlp = nn.Module()
            layer.mlp.gate_proj = nn.Linear(32, 32)
            layer.mlp.down_proj = nn.Linear(32, 32)
            self.model.layers.append(layer)
        self.lm_head = nn.Linear(32, 16)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    w = module.weight.view(module.out_features, -1, 4)
                    drop = w.abs().argsort(-1)[..., :2]
                    w.scatter_(-1, drop, 0.0)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + torch.relu(layer.self_attn.o_proj(x))
            x = x + torch.tanh(layer.mlp.gate_proj(x))
            x = x + torch.sigmoid(layer.mlp.down_proj(x))
        return self.lm_head(x)


def test_compressed_tensors_import_compiles_and_applies(eager_lowering):
    torch.manual_seed(2)
    spec = import_compressed_tensors(DATA / "ct_two_four.json", policy="force")
    model = TwoFourLM().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="sparsecc", options={"spec": spec, "kernels": "reference"})(x)
    applied = {s.module: s.applied for s in sparsecc.last_report().sites if s.kind == "linear"}
    assert applied == {
        "model.layers.0.self_attn.o_proj": False, "model.layers.0.mlp.gate_proj": False,
        "model.layers.0.mlp.down_proj": True, "model.layers.1.self_attn.o_proj": False,
        "model.layers.1.mlp.gate_proj": True, "model.layers.1.mlp.down_proj": True, "lm_head": False}
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ dispatcher

def test_dispatcher_formats_and_options():
    direct = import_duo_attention(DATA / "duo", query_heads=4)
    assert import_spec("duo-attention", DATA / "duo", query_heads=4) == direct
    assert import_spec("compressed-tensors", DATA / "ct_two_four.json") == import_compressed_tensors(
        DATA / "ct_two_four.json")
    with pytest.raises(SpecError, match="not an import format") as info:
        import_spec("flexprefill", DATA / "duo")
    assert "minference, duo_attention, compressed_tensors" in info.value.allowed
    with pytest.raises(SpecError) as info:
        import_spec("minference", DATA / "minference_streaming.json", threshold=0.3)
    assert info.value.key == "threshold" and "modules_template, policy" in info.value.allowed
    with pytest.raises(SpecError, match="query_heads is missing"):
        import_spec("duo_attention", DATA / "duo")
    with pytest.raises(SpecError) as info:
        import_spec("compressed_tensors", DATA / "ct_two_four.json", policy="always")
    assert info.value.key == "policy"


def test_import_from_a_copied_directory_keeps_the_hash(tmp_path):
    shutil.copytree(DATA / "duo", tmp_path / "pattern")
    a = import_duo_attention(tmp_path / "pattern", query_heads=4)
    b = import_duo_attention(DATA / "duo", query_heads=4)
    assert a.meta["import"]["sha256"] == b.meta["import"]["sha256"] and a == b
