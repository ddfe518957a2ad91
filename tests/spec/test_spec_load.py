"""Loading, round trips and querying of specs, and the exact shape of SpecError messages (files that cannot be
read and saving: test_spec_files.py)."""

from __future__ import annotations

import json
import pickle

import pytest

from sparsecc.forms import ActivationThreshold, BlockSparse, BlockWeights, Dense, Streaming, TwoFour
from sparsecc.spec import Defaults, Rule, Spec, SpecError, load_spec

EXAMPLE_TOML = """\
version = 1
[defaults]
policy = "auto"              # auto: the cost model decides; force: always apply; off: never
margin = 1.05

[[attention]]
modules = "model.layers.*.self_attn"
heads = [0, 1, 2]
form = "streaming"
sink = 128
window = 4096
policy = "force"

[[attention]]
form = "block_sparse"
block = 64
local_blocks = 2
global_blocks = 1
random_blocks = 0
seed = 0

[[ffn]]
modules = "model.layers.*.mlp"
form = "activation_threshold"
mode = "input"
threshold = 0.1

[[linear]]
modules = "*.o_proj"
form = "2:4"
prune = "magnitude"

[[linear]]
form = "block_weights"
block = [64, 64]
density = 0.25
prune = "magnitude"

[meta]
model = "llama-3-8b"
calibration = { samples = 128, seed = 7 }
"""

EXAMPLE_DICT = {
    "version": 1,
    "defaults": {"policy": "auto", "margin": 1.05},
    "attention": [
        {"modules": "model.layers.*.self_attn", "heads": [0, 1, 2], "form": "streaming",
         "sink": 128, "window": 4096, "policy": "force"},
        {"form": "block_sparse", "block": 64, "local_blocks": 2, "global_blocks": 1,
         "random_blocks": 0, "seed": 0},
    ],
    "ffn": [{"modules": "model.layers.*.mlp", "form": "activation_threshold", "mode": "input",
             "threshold": 0.1}],
    "linear": [
        {"modules": "*.o_proj", "form": "2:4", "prune": "magnitude"},
        {"form": "block_weights", "block": [64, 64], "density": 0.25, "prune": "magnitude"},
    ],
    "meta": {"model": "llama-3-8b", "calibration": {"samples": 128, "seed": 7}},
}


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def toml_error(tmp_path, old: str, new: str) -> SpecError:
    """Load the example with one edit and return the SpecError it must raise."""
    assert old in EXAMPLE_TOML, old
    path = write(tmp_path, "llama.toml", EXAMPLE_TOML.replace(old, new, 1))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def line_of(text: str, needle: str) -> int:
    """1-based line of the one line containing ``needle``."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


# ---------------------------------------------------------------------------------------
# Loading the example
# ---------------------------------------------------------------------------------------

def test_example_toml_builds_the_documented_forms(tmp_path):
    spec = load_spec(write(tmp_path, "llama.toml", EXAMPLE_TOML))
    assert spec.defaults == Defaults("auto", 1.05)
    assert spec.attention[0] == Rule("attention", 0, Streaming(128, 4096), "model.layers.*.self_attn",
                                     (0, 1, 2), "force")
    assert spec.attention[1].form == BlockSparse(block=64, local_blocks=2, global_blocks=1)
    assert spec.attention[1].modules == "*" and spec.attention[1].heads is None
    assert spec.ffn[0].form == ActivationThreshold.from_value("input", 0.1)
    assert spec.linear[0].form == TwoFour("magnitude")
    assert spec.linear[1].form == BlockWeights(block=(64, 64), density=0.25)
    assert spec.meta["calibration"]["samples"] == 128
    assert spec.source == str(tmp_path / "llama.toml")


def test_toml_json_and_dict_give_equal_specs(tmp_path):
    from_toml = load_spec(write(tmp_path, "a.toml", EXAMPLE_TOML))
    from_json = load_spec(write(tmp_path, "a.json", json.dumps(EXAMPLE_DICT, indent=1)))
    from_dict = load_spec(EXAMPLE_DICT)
    assert from_toml == from_json == from_dict
    assert hash(from_toml) == hash(from_dict)
    assert from_dict.source is None


def test_none_and_spec_pass_through():
    spec = load_spec(EXAMPLE_DICT)
    assert load_spec(None) is None
    assert load_spec(spec) is spec


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_save_and_load_back(tmp_path, suffix):
    spec = load_spec(EXAMPLE_DICT)
    path = tmp_path / f"out{suffix}"
    spec.save(path)
    again = load_spec(path)
    assert again == spec
    assert again.meta == spec.meta
    assert load_spec(spec.to_dict()) == spec


def test_to_dict_is_minimal_and_exact():
    data = load_spec(EXAMPLE_DICT).to_dict()
    assert "defaults" not in data  # both values are the defaults
    assert data["attention"][1] == {"form": "block_sparse", "local_blocks": 2, "global_blocks": 1}
    assert data["ffn"][0] == {"modules": "model.layers.*.mlp", "form": "activation_threshold", "threshold": 0.1}
    assert data["linear"][1] == {"form": "block_weights"}


def test_threshold_tables_and_sparsity_round_trip(tmp_path):
    spec = load_spec({"version": 1, "ffn": [
        {"form": "activation_threshold", "threshold": {"input": 0.2, "down": 0.1}},
        {"form": "activation_threshold", "threshold": {"down": 0.3}, "sparsity": 0.5},
        {"form": "activation_threshold", "mode": "gate", "sparsity": 0.4},
        {"form": "activation_threshold", "mode": "gate", "threshold": {"gate": 1}},
    ]})
    assert spec.ffn[0].form.tau("input") == 0.2 and spec.ffn[0].form.tau("down") == 0.1
    assert spec.ffn[1].form.tau("input") is None and spec.ffn[1].form.sparsity == 0.5
    assert not spec.ffn[2].form.calibrated
    assert spec.ffn[3].form.tau("gate") == 1.0
    for name in ("t.toml", "t.json"):
        spec.save(tmp_path / name)
        assert load_spec(tmp_path / name) == spec


def test_ints_are_accepted_where_floats_are_expected():
    spec = load_spec({"version": 1, "defaults": {"margin": 2},
                      "linear": [{"form": "block_weights", "density": 1}]})
    assert spec.defaults.margin == 2.0 and isinstance(spec.defaults.margin, float)
    assert spec.linear[0].form.density == 1.0


def test_meta_is_kept_verbatim_and_frozen(tmp_path):
    meta = {"by": "calibrate", "nested": {"deep": {"x": [1, 2.5, "s", True]}}, "odd key.x": "ü\n\"q\""}
    spec = load_spec({"version": 1, "meta": meta})
    assert spec.to_dict()["meta"] == meta
    with pytest.raises(TypeError):
        spec.meta["by"] = "me"
    spec.save(tmp_path / "m.toml")
    assert load_spec(tmp_path / "m.toml").to_dict()["meta"] == meta


def test_spec_pickles():
    spec = load_spec(EXAMPLE_DICT)
    assert pickle.loads(pickle.dumps(spec)) == spec


# ---------------------------------------------------------------------------------------
# Querying
# ---------------------------------------------------------------------------------------

def test_matching_keeps_spec_order_so_later_rules_win():
    spec = load_spec({"version": 1, "linear": [
        {"modules": "*", "form": "2:4"},
        {"modules": "model.layers.*.mlp.*", "form": "block_weights", "density": 0.5},
        {"modules": "model.layers.0.*", "form": "dense"},
    ]})
    hits = spec.matching("linear", "model.layers.0.mlp.down_proj")
    assert [r.index for r in hits] == [0, 1, 2]
    assert spec.resolve("linear", "model.layers.0.mlp.down_proj").form == Dense()
    assert spec.resolve("linear", "model.layers.3.mlp.down_proj").form == BlockWeights(density=0.5)
    assert spec.resolve("linear", "lm_head").form == TwoFour()
    assert spec.matching("ffn", "model.layers.0.mlp") == []
    assert spec.resolve("ffn", "model.layers.0.mlp") is None


def test_matching_is_case_sensitive_and_star_crosses_dots():
    rule = Rule("linear", 0, TwoFour(), modules="*.o_proj")
    assert rule.matches("model.layers.7.self_attn.o_proj")
    assert not rule.matches("model.layers.7.self_attn.O_PROJ")
    assert Rule("linear", 0, TwoFour(), modules="layer[0-3].fc").matches("layer2.fc")


def test_heads_select_heads_of_an_attention_site():
    spec = load_spec({"version": 1, "attention": [
        {"form": "streaming", "sink": 4, "window": 64},
        {"heads": [3, 1], "form": "dense"},
    ]})
    assert spec.attention[1].heads == (1, 3)
    assert spec.resolve("attention", "a", head=1).form == Dense()
    assert spec.resolve("attention", "a", head=2).form == Streaming(4, 64)
    assert spec.resolve("attention", "a").form == Streaming(4, 64)


def test_policy_for_uses_the_rule_then_the_default():
    spec = load_spec({"version": 1, "defaults": {"policy": "off"}, "linear": [
        {"form": "2:4"}, {"form": "2:4", "policy": "force"}]})
    assert spec.policy_for(spec.linear[0]) == "off"
    assert spec.policy_for(spec.linear[1]) == "force"
    assert load_spec({"version": 1, "linear": [{"form": "2:4"}]}).policy_for(Rule("linear", 0, TwoFour())) == "auto"


def test_str_lists_every_resolved_rule():
    text = str(load_spec(EXAMPLE_DICT))
    lines = text.splitlines()
    assert "policy=auto" in lines[0] and "margin=1.05" in lines[0]
    assert ("attention[0]  model.layers.*.self_attn  heads=0,1,2  streaming(sink=128, window=4096)  policy=force"
            in lines)
    assert any(line.startswith("attention[1]  *  heads=all  block_sparse(") and line.endswith("policy=auto")
               for line in lines)
    assert "linear[0]  *.o_proj  2:4(prune=magnitude)  policy=auto" in lines
    assert len(lines) == 1 + 5
    assert "no rules" in str(Spec())


def test_with_rules_reindexes():
    spec = load_spec(EXAMPLE_DICT)
    swapped = spec.with_rules("linear", list(reversed(spec.linear)))
    assert [r.index for r in swapped.linear] == [0, 1]
    assert swapped.linear[0].form == spec.linear[1].form
    assert swapped.attention == spec.attention
    assert spec.with_rules("ffn", []).ffn == ()


def test_objects_built_in_code_are_validated():
    with pytest.raises(SpecError, match=r"<Spec>: linear\[0\]\.form"):
        Rule("linear", 0, Streaming(1, 2))
    with pytest.raises(SpecError, match="heads"):
        Rule("ffn", 0, Dense(), heads=(0,))
    with pytest.raises(SpecError, match="defaults.margin"):
        Defaults(margin=float("nan"))
    with pytest.raises(SpecError, match=r"attention\[0\]"):
        Spec(attention=(Rule("attention", 1, Dense()),))
    with pytest.raises(SpecError, match="kind"):
        Spec().rules("conv")


# ---------------------------------------------------------------------------------------
# Errors: every one names the file, key path, line, value and what is allowed
# ---------------------------------------------------------------------------------------

BAD_EDITS = [
    # (old text, new text, key path, line needle, shown value, allowed substring)
    ("window = 4096", "window = -3", "attention[0].window", "window", "-3", "an integer >= 1"),
    ("window = 4096", "window = 4096.0", "attention[0].window", "window", "4096.0", "an integer >= 1"),
    ("window = 4096", "window = true", "attention[0].window", "window", "True", "an integer >= 1"),
    ("sink = 128", "sink = 2e3", "attention[0].sink", "sink", "2000.0", "an integer >= 0"),
    ("sink = 128", "sink = 128\nhead = 2", "attention[0].head", "head = 2", "2", "heads"),
    ("seed = 0", "seed = 0\nsink = 7", "attention[1].sink", "sink = 7", "7", "block_sparse"),
    ("block = 64", "block = 48", "attention[1].block", "block = 48", "48", "a power of two"),
    ("heads = [0, 1, 2]", "heads = [0, 0]", "attention[0].heads", "heads", "[0, 0]", "distinct integers >= 0"),
    ("heads = [0, 1, 2]", "heads = [-1]", "attention[0].heads", "heads", "[-1]", "integers >= 0"),
    ('policy = "force"', 'policy = "always"', "attention[0].policy", 'policy = "always"', "'always'",
     "auto, force, off"),
    ('modules = "model.layers.*.self_attn"', 'modules = "model layers"', "attention[0].modules",
     "model layers", "'model layers'", "no whitespace"),
    ('modules = "*.o_proj"', 'modules = "*.o_proj]"', "linear[0].modules", "o_proj]", "'*.o_proj]'", "balanced"),
    ('threshold = 0.1', 'threshold = -0.5', "ffn[0].threshold", "threshold =", "-0.5", ">= 0"),
    ('threshold = 0.1', 'threshold = {gate = 0.1}', "ffn[0].threshold.gate", "threshold =", "0.1", "input, down"),
    ('threshold = 0.1', 'threshold = 0.1\nsparsity = 1.5', "ffn[0].sparsity", "sparsity =", "1.5", "(0, 1)"),
    ('mode = "input"', 'mode = "both"', "ffn[0].mode", 'mode = "both"', "'both'", "input, gate"),
    ('prune = "magnitude"', 'prune = "random"', "linear[0].prune", 'prune = "random"', "'random'", "magnitude"),
    ('prune = "magnitude"', 'prune = "magnitude"\ndensity = 0.5', "linear[0].density", "density = 0.5",
     "0.5", "modules, form, policy, prune"),
    ("block = [64, 64]", "block = [64, 48]", "linear[1].block", "block = [", "[64, 48]", "(16, 32, 64, 128)"),
    ("density = 0.25", "density = 0", "linear[1].density", "density = 0", "0", "(0, 1]"),
    ('form = "2:4"', 'form  =  "streaming"', "linear[0].form", 'form  =  "streaming"', "'streaming'",
     "dense, 2:4, block_weights"),
    ("margin = 1.05", "margin = -1", "defaults.margin", "margin", "-1", "> 0"),
    ('policy = "auto"', 'policy = "sometimes"', "defaults.policy", "sometimes", "'sometimes'", "auto, force, off"),
    ("version = 1", "version = 2", "version", "version", "2", "1"),
    ("version = 1", "version = 1\ncolour = 3", "colour", "colour", "3",
     "version, defaults, attention, ffn, linear, meta"),
    ('model = "llama-3-8b"', "when = 1979-05-27", "meta.when", "when", "1979", "string"),
]


@pytest.mark.parametrize("old,new,key,needle,shown,allowed", BAD_EDITS, ids=[e[2] for e in BAD_EDITS])
def test_errors_name_file_key_line_value_and_allowed(tmp_path, old, new, key, needle, shown, allowed):
    err = toml_error(tmp_path, old, new)
    text = EXAMPLE_TOML.replace(old, new, 1)
    line = line_of(text, needle)
    message = str(err)
    assert err.file == str(tmp_path / "llama.toml")
    assert err.key == key
    assert err.line == line
    assert message.startswith(f"{tmp_path / 'llama.toml'}:{line}: {key}")
    assert shown in message
    assert allowed in message and allowed in err.allowed


def test_missing_required_keys(tmp_path):
    err = toml_error(tmp_path, 'form = "2:4"\n', "")
    assert err.key == "linear[0].form" and "is missing" in str(err)
    first_linear = [i + 1 for i, line in enumerate(EXAMPLE_TOML.splitlines()) if line == "[[linear]]"][0]
    assert err.line == first_linear
    assert "dense, 2:4, block_weights" in str(err)
    err = toml_error(tmp_path, "sink = 128\n", "")
    assert err.key == "attention[0].sink" and "is missing" in str(err)
    err = toml_error(tmp_path, "version = 1\n", "")
    assert err.key == "version" and "is missing" in str(err)
    err = toml_error(tmp_path, "threshold = 0.1\n", "")
    assert err.key == "ffn[0].threshold" and "sparsity" in str(err)


def test_error_on_a_rule_that_is_not_a_table():
    with pytest.raises(SpecError, match=r"<dict>: attention\[0\] = 'dense' is not a table"):
        load_spec({"version": 1, "attention": ["dense"]})
    with pytest.raises(SpecError, match=r"linear = \{'form': '2:4'\} is not an array of tables"):
        load_spec({"version": 1, "linear": {"form": "2:4"}})


@pytest.mark.parametrize("value", [True, 1.0, "1", None])
def test_version_must_be_the_integer_one(value):
    with pytest.raises(SpecError, match=r"<dict>: version = .* is not allowed; expected 1"):
        load_spec({"version": value})


def test_bools_are_not_ints_and_floats_are_not_ints():
    for bad in (True, 2.0):
        with pytest.raises(SpecError, match=r"attention\[0\]\.sink"):
            load_spec({"version": 1, "attention": [{"form": "streaming", "sink": bad, "window": 8}]})
    with pytest.raises(SpecError, match=r"density = True"):
        load_spec({"version": 1, "linear": [{"form": "block_weights", "density": True}]})


def test_none_is_never_a_value():
    with pytest.raises(SpecError, match=r"ffn\[0\]\.threshold = None"):
        load_spec({"version": 1, "ffn": [{"form": "activation_threshold", "threshold": None, "sparsity": 0.5}]})
    with pytest.raises(SpecError, match=r"ffn\[0\]\.sparsity = None"):
        load_spec({"version": 1, "ffn": [{"form": "activation_threshold", "threshold": 0.1, "sparsity": None}]})


def test_wrong_suffix(tmp_path):
    path = write(tmp_path, "spec.yaml", "version: 1")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value) and "'.yaml'" in str(info.value)
    assert ".toml or .json" in str(info.value)
    with pytest.raises(SpecError, match=r"\.toml or \.json"):
        load_spec(EXAMPLE_DICT).save(tmp_path / "spec.yml")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.toml: does not exist"):
        load_spec(tmp_path / "nope.toml")
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(SpecError, match=r"dir\.json: is a directory"):
        load_spec(str(tmp_path / "dir.json"))


def test_bad_toml_syntax_names_the_line(tmp_path):
    err = toml_error(tmp_path, "window = 4096", "window = = 4096")
    assert err.line == line_of(EXAMPLE_TOML, "window")
    assert f"llama.toml:{err.line}: invalid TOML" in str(err)


def test_bad_json_syntax_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "s.json", '{"version": 1,\n "linear": [\n  {"form": "2:4",}\n ]}')
    with pytest.raises(SpecError, match=r"s\.json:3: invalid JSON"):
        load_spec(path)
    path = write(tmp_path, "d.json", '{"version": 1,\n "linear": [\n  {"form": "2:4",\n   "form": "dense"}]}')
    with pytest.raises(SpecError, match=r"d\.json:4: invalid JSON: the key 'form' appears twice"):
        load_spec(path)     # the line of the second "form", not of the object's start
    # A nested object's own key of the same name, before the duplicate, is not the duplicate.
    path = write(tmp_path, "n.json", '{"version": 1,\n "meta": {"version": 2},\n "linear": [],\n "version": 1}')
    with pytest.raises(SpecError, match=r"n\.json:4: invalid JSON: the key 'version' appears twice"):
        load_spec(path)


def test_json_errors_carry_a_best_effort_line(tmp_path):
    path = write(tmp_path, "w.json", json.dumps(EXAMPLE_DICT, indent=2).replace('"window": 4096', '"window": 0'))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.key == "attention[0].window"
    assert info.value.line == line_of(path.read_text(), '"window": 0')


def test_invalid_utf8(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"version = 1\n# \xff\xfe\n")
    with pytest.raises(SpecError, match=r"bin\.toml:2: is not valid UTF-8"):
        load_spec(path)


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'version = 1\n[[attention]]\nform = "streaming"\nsink = 4\nwindow = 8\n'),
    (".json", '{"version": 1, "attention": [{"form": "streaming", "sink": 4, "window": 8}]}')])
def test_a_byte_order_mark_is_not_part_of_the_spec(tmp_path, suffix, text):
    """Editors on Windows start UTF-8 files with a byte-order mark: the spec is the same without it."""
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    plain = tmp_path / f"plain{suffix}"
    plain.write_text(text)
    assert load_spec(path) == load_spec(plain)


def test_unsupported_source_type():
    with pytest.raises(SpecError, match="a path"):
        load_spec(42)


def test_the_example_in_the_docs_loads(tmp_path):
    """docs/spec.md's full example must stay a valid spec."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "spec.md").read_text(encoding="utf-8")
    example = docs.split("```toml\n", 1)[1].split("```", 1)[0]
    spec = load_spec(write(tmp_path, "docs.toml", example))
    assert spec.resolve("attention", "model.layers.1.self_attn", head=0).form == Dense()
    assert spec.resolve("attention", "model.layers.5.self_attn", head=0).form == Streaming(128, 4096)
    assert spec.resolve("attention", "model.layers.5.self_attn", head=5) is None
    assert not spec.ffn[0].form.calibrated


def test_block_sparse_seed_takes_the_whole_signed_64_bit_range(tmp_path):
    """The spec's limit for seed is TOML's (signed 64-bit); the largest one loads and draws a layout."""
    from sparsecc.layouts import block_sparse_table

    text = ('version = 1\n[[attention]]\nform = "block_sparse"\nblock = 16\nrandom_blocks = 2\n'
            'seed = 9223372036854775807\n')
    spec = load_spec(write(tmp_path, "seed.toml", text))
    form = spec.attention[0].form
    assert form.seed == 2**63 - 1
    table = block_sparse_table(form, 2, 64, 64, causal=True)
    assert torch_equal_tables(table, block_sparse_table(form, 2, 64, 64, causal=True))
    with pytest.raises(SpecError, match=r"attention\[0\]\.seed"):
        load_spec({"version": 1, "attention": [{"form": "block_sparse", "seed": 2**63}]})


def test_an_inline_array_of_rules_points_at_the_bad_rule(tmp_path):
    """Rules written as one inline array over several lines: the error names the line of the rule at fault."""
    text = ('version = 1\nattention = [\n  {form = "streaming", sink = 1, window = 8},\n'
            '  {form = "streaming", sink = 1, window = -2},\n]\n')
    with pytest.raises(SpecError, match=r"i\.toml:4: attention\[1\]\.window = -2") as info:
        load_spec(write(tmp_path, "i.toml", text))
    assert info.value.line == 4



def torch_equal_tables(a, b):
    import torch

    return torch.equal(a.to_dense_block_mask(), b.to_dense_block_mask())


# ---------------------------------------------------------------------------------------
# Integers outside the signed 64-bit range, wherever a number is expected
# ---------------------------------------------------------------------------------------

def _with(path, value):
    """A valid spec with ``value`` put at one numeric key (``path`` names where)."""
    rules = {
        "margin": lambda v: {"defaults": {"margin": v}},
        "threshold": lambda v: {"ffn": [{"form": "activation_threshold", "threshold": v}]},
        "threshold.input": lambda v: {"ffn": [{"form": "activation_threshold", "threshold": {"input": v}}]},
        "threshold.gate": lambda v: {"ffn": [{"form": "activation_threshold", "mode": "gate",
                                              "threshold": {"gate": v}}]},
        "sparsity": lambda v: {"ffn": [{"form": "activation_threshold", "sparsity": v}]},
        "density": lambda v: {"linear": [{"form": "block_weights", "density": v}]},
        "block[1]": lambda v: {"linear": [{"form": "block_weights", "block": [64, v]}]},
        "cdf": lambda v: {"attention": [{"form": "block_topk", "cdf": v}]},
        "topk": lambda v: {"attention": [{"form": "block_topk", "topk": v}]},
        "heads[1]": lambda v: {"attention": [{"form": "dense", "heads": [0, v]}]},
        "window": lambda v: {"attention": [{"form": "streaming", "sink": 4, "window": v}]},
        "sink": lambda v: {"attention": [{"form": "streaming", "sink": v, "window": 4}]},
        "seed": lambda v: {"attention": [{"form": "block_sparse", "seed": v}]},
        "last_q": lambda v: {"attention": [{"form": "vertical_slash", "last_q": v, "vertical": 1, "slash": 1}]},
        "meta": lambda v: {"meta": {"nested": {"n": [v]}}},
    }
    return {"version": 1, **rules[path](value)}


KEY_OF = {"margin": r"defaults\.margin", "threshold": r"ffn\[0\]\.threshold",
          "threshold.input": r"ffn\[0\]\.threshold\.input", "threshold.gate": r"ffn\[0\]\.threshold\.gate",
          "sparsity": r"ffn\[0\]\.sparsity", "density": r"linear\[0\]\.density", "block[1]": r"linear\[0\]\.block\[1\]",
          "cdf": r"attention\[0\]\.cdf", "topk": r"attention\[0\]\.topk", "heads[1]": r"attention\[0\]\.heads\[1\]",
          "window": r"attention\[0\]\.window", "sink": r"attention\[0\]\.sink", "seed": r"attention\[0\]\.seed",
          "last_q": r"attention\[0\]\.last_q", "meta": r"meta\.nested\.n\[0\]"}


@pytest.mark.parametrize("value", [2**63, 2**70, -(2**63) - 1, -(2**200)])
@pytest.mark.parametrize("path", list(KEY_OF))
def test_integers_outside_int64_are_refused_at_every_numeric_key(path, value):
    """Regression: margin = 2**70 (and a threshold table entry) loaded as a float."""
    with pytest.raises(SpecError, match=KEY_OF[path] + r" = -?\d+ is not allowed; "
                                        r"expected an integer within the 64-bit range"):
        load_spec(_with(path, value))


@pytest.mark.parametrize("path", ["margin", "threshold", "threshold.input", "window", "seed", "sink", "meta"])
def test_the_largest_int64_is_accepted(path):
    spec = load_spec(_with(path, 2**63 - 1))
    assert isinstance(spec, Spec)


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_integers_outside_int64_are_refused_in_files(tmp_path, suffix):
    """tomllib and json read integers of any size: the loader holds them to 64 bits."""
    big = 2**63
    if suffix == ".toml":
        text = f"version = 1\n\n[defaults]\nmargin = {big}\n"
        want = r"m\.toml:4: defaults\.margin = 9223372036854775808 is not allowed; expected an integer"
    else:
        text = json.dumps({"version": 1, "ffn": [{"form": "activation_threshold", "threshold": {"down": big}}]})
        want = r"ffn\[0\]\.threshold\.down = 9223372036854775808 is not allowed; expected an integer"
    with pytest.raises(SpecError, match=want):
        load_spec(write(tmp_path, "m" + suffix, text))


def test_objects_built_in_code_refuse_integers_outside_int64():
    with pytest.raises(SpecError, match=r"<Spec>: defaults\.margin = 1180591620717411303424 is not allowed; "
                                        r"expected an integer within the 64-bit range"):
        Defaults(margin=2**70)
    Defaults(margin=2**63 - 1)
    for build in (lambda: Streaming(1, 2**63), lambda: BlockSparse(seed=2**63),
                  lambda: ActivationThreshold.from_value("input", 2**70),
                  lambda: ActivationThreshold.from_value("input", 0.1, sparsity=-(2**64)),
                  lambda: BlockWeights(density=2**64)):
        with pytest.raises(ValueError, match="within the signed 64-bit range"):
            build()
    with pytest.raises(SpecError, match="heads"):
        Rule(kind="attention", index=0, form=Dense(), heads=(2**63,))


def test_numpy_scalars_in_a_mapping_spec_are_numbers():
    """A spec built in code from computed values: numpy integers and floats are read as the numbers they are
    (they used to be refused with "expected an integer >= 0" for a value that is one)."""
    np = pytest.importorskip("numpy")
    spec = load_spec({"version": 1, "attention": [{"form": "streaming", "sink": np.int64(2), "window": np.int32(8)}],
                      "linear": [{"form": "block_weights", "block": [np.int64(32), 32], "density": np.float32(0.5)}]})
    assert spec.attention[0].form == Streaming(sink=2, window=8)
    assert spec.linear[0].form == BlockWeights(block=(32, 32), density=0.5)
    assert type(spec.attention[0].form.sink) is int
    with pytest.raises(SpecError, match="sink"):
        load_spec({"version": 1, "attention": [{"form": "streaming", "sink": np.float64(2.5), "window": 8}]})
