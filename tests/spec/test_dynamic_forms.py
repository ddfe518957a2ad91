"""Spec tests for the dynamic attention forms and the activation_threshold ``criterion`` key."""

from __future__ import annotations

import pytest

from sparsecc.forms import ActivationThreshold
from sparsecc.spec import SpecError, load_spec


def _ffn(**keys):
    return {"version": 1, "ffn": [{"form": "activation_threshold", **keys}]}


def test_criterion_defaults_to_magnitude():
    spec = load_spec(_ffn(threshold=0.1))
    assert spec.ffn[0].form.criterion == "magnitude"
    assert "criterion" not in spec.to_dict()["ffn"][0]


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_criterion_weighted_round_trips(tmp_path, suffix):
    spec = load_spec(_ffn(threshold={"input": 0.1, "down": 0.2}, criterion="weighted"))
    form = spec.ffn[0].form
    assert form.criterion == "weighted" and form.tau("down") == 0.2
    assert "criterion=weighted" in str(form)
    path = tmp_path / f"spec{suffix}"
    spec.save(path)
    again = load_spec(path)
    assert again == spec and again.ffn[0].form.criterion == "weighted"
    # A single threshold with a non-default criterion is still written as one number.
    scalar = load_spec(_ffn(threshold=0.3, criterion="weighted"))
    assert scalar.to_dict()["ffn"][0] == {"form": "activation_threshold", "threshold": 0.3, "criterion": "weighted"}


def test_weighted_criterion_in_gate_mode_is_a_spec_error():
    """Gate mode thresholds |act(x W_gate)| itself, which no projection column weighs: the loader refuses the
    pair up front, naming the key and what gate mode allows (it used to load, then stay dense when compiled)."""
    with pytest.raises(SpecError) as info:
        load_spec(_ffn(threshold=0.3, criterion="weighted", mode="gate"))
    assert info.value.key == "ffn[0].criterion"
    assert "'magnitude' in mode 'gate'" in str(info.value)


@pytest.mark.parametrize("value", ["l2", "", None, 1, True])
def test_bad_criterion_names_the_key_and_allowed_values(value):
    with pytest.raises(SpecError) as info:
        load_spec(_ffn(threshold=0.1, criterion=value))
    err = info.value
    assert err.key == "ffn[0].criterion"
    assert "magnitude" in str(err) and "weighted" in str(err)


def test_bad_criterion_in_toml_names_the_line(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('version = 1\n\n[[ffn]]\nform = "activation_threshold"\nthreshold = 0.1\ncriterion = "max"\n')
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.line == 6 and str(path) in str(info.value)


def test_criterion_belongs_to_activation_threshold_only():
    with pytest.raises(SpecError, match="belongs to form 'activation_threshold'"):
        load_spec({"version": 1, "ffn": [{"form": "dense", "criterion": "weighted"}]})


def test_criterion_validated_in_code():
    with pytest.raises(ValueError, match="criterion"):
        ActivationThreshold(mode="input", thresholds=(("input", 0.1),), criterion="weighed")


# ---------------------------------------------------------------- block_topk / vertical_slash

from sparsecc.forms import BlockTopK, VerticalSlash  # noqa: E402

TOML = '''version = 1

[[attention]]
modules = "model.layers.*.self_attn"
form = "block_topk"
block = 64
topk = 8
sink_blocks = 1
local_blocks = 1
pool = "mean"

[[attention]]
modules = "model.layers.0.self_attn"
form = "block_topk"
block = 128
cdf = 0.9
pool = "max"

[[attention]]
modules = "model.layers.1.self_attn"
form = "vertical_slash"
last_q = 64
vertical = 1000
slash = 6096
block = 64
'''


def test_dynamic_forms_load_from_toml(tmp_path):
    path = tmp_path / "dyn.toml"
    path.write_text(TOML)
    spec = load_spec(path)
    forms = [r.form for r in spec.attention]
    assert forms == [BlockTopK(block=64, topk=8), BlockTopK(block=128, cdf=0.9, pool="max"),
                     VerticalSlash(last_q=64, vertical=1000, slash=6096)]
    assert str(forms[1]) == "block_topk(block=128, cdf=0.9, sink=1, local=1, pool=max)"
    assert str(forms[2]) == "vertical_slash(last_q=64, vertical=1000, slash=6096, block=64)"


def test_sampled_row_pool_defaults_to_four_rows_and_round_trips(tmp_path):
    spec = load_spec({"version": 1, "attention": [{"form": "block_topk", "topk": 15, "pool": "rows"},
                                                  {"form": "block_topk", "cdf": 0.9, "pool": "rows", "rows": 16},
                                                  {"form": "block_topk", "min_mass": 0.004, "pool": "rows"}]})
    forms = [r.form for r in spec.attention]
    assert forms == [BlockTopK(topk=15, pool="rows", rows=4), BlockTopK(cdf=0.9, pool="rows", rows=16),
                     BlockTopK(min_mass=0.004, pool="rows", rows=4)]
    assert str(forms[2]) == "block_topk(block=64, min_mass=0.004, sink=1, local=1, pool=rows, rows=4)"
    assert str(forms[0]) == "block_topk(block=64, topk=15, sink=1, local=1, pool=rows, rows=4)"
    assert spec.to_dict()["attention"][0] == {"form": "block_topk", "topk": 15, "pool": "rows", "rows": 4}
    path = tmp_path / "rows.toml"
    spec.save(path)
    assert load_spec(path) == spec


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_dynamic_forms_round_trip(tmp_path, suffix):
    spec = load_spec({"version": 1, "attention": [
        {"form": "block_topk", "topk": 3, "sink_blocks": 0, "local_blocks": 2, "block": 32},
        {"form": "block_topk", "cdf": 1},
        {"form": "vertical_slash", "last_q": 16, "vertical": 0, "slash": 0, "block": 256, "heads": [0, 2]}]})
    assert spec.to_dict()["attention"][1] == {"form": "block_topk", "cdf": 1.0}
    assert spec.to_dict()["attention"][2]["last_q"] == 16   # required keys are always written
    path = tmp_path / f"spec{suffix}"
    spec.save(path)
    assert load_spec(path) == spec


@pytest.mark.parametrize("rule,key,allowed", [
    ({"form": "block_topk"}, "topk", "exactly one of topk"),
    ({"form": "block_topk", "topk": 2, "cdf": 0.5}, "cdf", "exactly one of topk"),
    ({"form": "block_topk", "cdf": 0.5, "min_mass": 0.01}, "min_mass", "exactly one of topk"),
    ({"form": "block_topk", "min_mass": 0}, "min_mass", "(0, 1]"),
    ({"form": "block_topk", "min_mass": 1.5}, "min_mass", "(0, 1]"),
    ({"form": "block_topk", "topk": 0}, "topk", "an integer >= 1"),
    ({"form": "block_topk", "topk": 2.0}, "topk", "an integer >= 1"),
    ({"form": "block_topk", "cdf": 0}, "cdf", "(0, 1]"),
    ({"form": "block_topk", "cdf": 1.01}, "cdf", "(0, 1]"),
    ({"form": "block_topk", "topk": 1, "block": 512}, "block", "16..256"),
    ({"form": "block_topk", "topk": 1, "block": 48}, "block", "16..256"),
    ({"form": "block_topk", "topk": 1, "sink_blocks": -1}, "sink_blocks", ">= 0"),
    ({"form": "block_topk", "topk": 1, "local_blocks": True}, "local_blocks", ">= 0"),
    ({"form": "block_topk", "topk": 1, "pool": "min"}, "pool", "'mean', 'max', 'rows'"),
    ({"form": "block_topk", "topk": 1, "rows": 4}, "rows", 'only with pool = "rows"'),
    ({"form": "block_topk", "topk": 1, "pool": "max", "rows": 4}, "rows", 'only with pool = "rows"'),
    ({"form": "block_topk", "topk": 1, "pool": "rows", "rows": 3}, "rows", "(1, 2, 4, 8, 16, 32, 64)"),
    ({"form": "block_topk", "topk": 1, "pool": "rows", "rows": 0}, "rows", "(1, 2, 4, 8, 16, 32, 64)"),
    ({"form": "block_topk", "topk": 1, "pool": "rows", "rows": 128, "block": 256}, "rows", "(1, 2, 4, 8"),
    ({"form": "block_topk", "topk": 1, "pool": "rows", "rows": 32, "block": 16}, "rows", "at most block=16"),
    ({"form": "block_topk", "topk": 1, "pool": "rows", "rows": 4.0}, "rows", "(1, 2, 4, 8, 16, 32, 64)"),
    ({"form": "vertical_slash", "vertical": 1, "slash": 1}, "last_q", "last_q"),
    ({"form": "vertical_slash", "last_q": 0, "vertical": 1, "slash": 1}, "last_q", ">= 1"),
    ({"form": "vertical_slash", "last_q": 4, "vertical": -1, "slash": 1}, "vertical", ">= 0"),
    ({"form": "vertical_slash", "last_q": 4, "vertical": 1, "slash": 1, "block": 8}, "block", "16..256"),
    ({"form": "vertical_slash", "last_q": 4, "vertical": 1, "slash": 1, "topk": 2}, "topk", "block_topk"),
])
def test_dynamic_form_errors_name_key_and_allowed(rule, key, allowed):
    with pytest.raises(SpecError) as info:
        load_spec({"version": 1, "attention": [rule]})
    assert info.value.key == f"attention[0].{key}"
    assert allowed in str(info.value)


def test_dynamic_form_error_in_toml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(TOML.replace("cdf = 0.9", "cdf = 1.5"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.line == TOML.splitlines().index("cdf = 0.9") + 1
    assert str(path) in str(info.value) and "(0, 1]" in str(info.value)


def test_dynamic_forms_are_validated_in_code():
    with pytest.raises(ValueError, match="exactly one of topk"):
        BlockTopK(block=64)
    with pytest.raises(ValueError, match="last_q"):
        VerticalSlash(last_q=-1, vertical=1, slash=1)
