"""Property tests: valid specs round-trip exactly; malformed input only ever raises SpecError."""

from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecc.spec import Spec, SpecError, load_spec

# File I/O makes single examples slow now and then; the tests still stay within seconds.
FUZZ = settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64_MAX = 2 ** 63 - 1

# ---------------------------------------------------------------------------------------
# Valid specs
# ---------------------------------------------------------------------------------------

_glob_atoms = st.sampled_from(["model", "layers", "*", "?", "mlp", "self_attn", "o_proj", "[0-3]",
                               "[!x]", "[]]", "7", "q-k_v"])
globs = st.lists(_glob_atoms, min_size=1, max_size=5).map(".".join)
policies = st.sampled_from(["auto", "force", "off"])
positive_floats = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
fractions = st.floats(min_value=1e-3, max_value=0.999, allow_nan=False)


def _maybe(draw, key, strategy, out):
    if draw(st.booleans()):
        out[key] = draw(strategy)


@st.composite
def attention_rules(draw):
    form = draw(st.sampled_from(["dense", "streaming", "block_sparse"]))
    rule = {}
    _maybe(draw, "modules", globs, rule)
    _maybe(draw, "heads", st.lists(st.integers(0, 127), min_size=1, max_size=6, unique=True), rule)
    _maybe(draw, "phase", st.sampled_from(["prefill", "decode", "both"]), rule)
    rule["form"] = form
    if form == "streaming":
        rule["sink"] = draw(st.integers(0, 10_000))
        rule["window"] = draw(st.integers(1, 1 << 20))
    elif form == "block_sparse":
        _maybe(draw, "block", st.sampled_from([1, 16, 64, 128, 256]), rule)
        _maybe(draw, "local_blocks", st.integers(1, 16), rule)
        _maybe(draw, "global_blocks", st.integers(0, 16), rule)
        _maybe(draw, "random_blocks", st.integers(0, 16), rule)
        _maybe(draw, "seed", st.integers(0, INT64_MAX), rule)
    _maybe(draw, "policy", policies, rule)
    return rule


@st.composite
def ffn_rules(draw):
    rule = {}
    _maybe(draw, "modules", globs, rule)
    if draw(st.booleans()):
        rule["form"] = "dense"
    else:
        rule["form"] = "activation_threshold"
        mode = draw(st.sampled_from(["input", "gate"]))
        if mode != "input" or draw(st.booleans()):
            rule["mode"] = mode
        taus = st.one_of(st.integers(0, 100), st.floats(0, 100, allow_nan=False))
        keys = ["input", "down"] if mode == "input" else ["gate"]
        threshold = draw(st.one_of(st.none(), taus, st.dictionaries(st.sampled_from(keys), taus, min_size=1)))
        if threshold is not None:
            rule["threshold"] = threshold
        if threshold is None or draw(st.booleans()):
            rule["sparsity"] = draw(fractions)
    _maybe(draw, "policy", policies, rule)
    return rule


@st.composite
def linear_rules(draw):
    rule = {}
    _maybe(draw, "modules", globs, rule)
    form = draw(st.sampled_from(["dense", "2:4", "block_weights"]))
    rule["form"] = form
    if form in ("2:4", "block_weights"):
        _maybe(draw, "prune", st.sampled_from(["magnitude", "keep"]), rule)
    if form == "block_weights":
        _maybe(draw, "block", st.lists(st.sampled_from([16, 32, 64, 128]), min_size=2, max_size=2), rule)
        _maybe(draw, "density", st.one_of(st.just(1), fractions), rule)
    _maybe(draw, "policy", policies, rule)
    return rule


meta_scalars = st.one_of(st.text(max_size=12), st.booleans(), st.integers(-(2 ** 63), INT64_MAX),
                         st.floats(allow_nan=False, allow_infinity=False))
meta_values = st.recursive(
    meta_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=12)


@st.composite
def valid_specs(draw):
    spec = {"version": 1}
    if draw(st.booleans()):
        defaults = {}
        _maybe(draw, "policy", policies, defaults)
        _maybe(draw, "margin", st.one_of(positive_floats, st.integers(1, 10)), defaults)
        spec["defaults"] = defaults
    for kind, rules in (("attention", attention_rules()), ("ffn", ffn_rules()), ("linear", linear_rules())):
        _maybe(draw, kind, st.lists(rules, max_size=4), spec)
    _maybe(draw, "meta", st.dictionaries(st.text(max_size=8), meta_values, max_size=4), spec)
    return spec


@FUZZ
@given(valid_specs())
def test_valid_specs_round_trip_through_to_dict(data):
    spec = load_spec(data)
    assert isinstance(spec, Spec)
    again = load_spec(spec.to_dict())
    assert again == spec
    assert hash(again) == hash(spec)
    assert again.to_dict() == spec.to_dict()
    assert len(str(spec).splitlines()) == 1 + max(1, sum(len(spec.rules(k)) for k in ("attention", "ffn", "linear")))


@FUZZ
@given(valid_specs())
def test_valid_specs_round_trip_through_files(data):
    spec = load_spec(data)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("spec.toml", "spec.json"):
            path = Path(tmp) / name
            spec.save(path)
            loaded = load_spec(path)
            assert loaded == spec, path.read_text(encoding="utf-8")
            assert loaded.source == str(path)


# ---------------------------------------------------------------------------------------
# Malformed specs: each mutation below makes a valid spec invalid, always
# ---------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
# Values that are wrong for each key whatever the rest of the rule says.
BAD_VALUES = {
    "modules": ["", "a b", "x\t", "[ab", "ab]", "a[]", 1, True, None, ["*"], {"a": 1}],
    "heads": [[], [0, 0], [-1], [1.0], [True], [None], 0, "0", None, {"0": 1}, [2 ** 70]],
    "policy": ["always", "", "AUTO", 1, True, None, ["auto"]],
    "phase": ["prompt", "", "PREFILL", 1, True, None, ["decode"]],
    "sink": [-1, 1.0, 2.5, True, "1", None, [1], {"a": 1}, NAN, INF, 2 ** 70],
    "window": [0, -1, 1.0, True, False, "8", None, [8], NAN, -INF, 2 ** 64],
    "block": [0, 3, 48, -64, 64.0, True, None, "64", [64]],
    "local_blocks": [0, -1, 1.5, True, None, "1"],
    "global_blocks": [-1, 0.5, True, None, "0"],
    "random_blocks": [-1, 0.5, False, None, [0]],
    "seed": [-1, 0.0, True, None, 2 ** 64, "0"],
    "mode": ["both", "INPUT", 1, None, True, ["input"]],
    "threshold": [-0.1, NAN, INF, True, "0.1", None, [0.1], {}, {"bogus": 0.1}, {"input": -1},
                  {"input": True}, {"input": None}, {"input": {"x": 1}}, {"input": NAN}, 10 ** 400],
    "sparsity": [0, 1, 1.0, 0.0, 1.5, -0.1, NAN, True, "0.5", None, [0.5]],
    "prune": ["random", "", None, 1, True, ["keep"]],
    "density": [0, 0.0, 1.5, -1, NAN, INF, True, "0.5", None, [0.5]],
    "form": ["sparse", "DENSE", "", 1, None, True, [], {"form": "dense"}],
}
BLOCK_WEIGHTS_BLOCKS = [[64], [64, 64, 64], [48, 64], 64, [64.0, 64], [True, 64], None, "64x64", [], [0, 0]]
BAD_TOP = {
    "version": [2, 0, -1, "1", 1.0, True, None, [1]],
    "defaults": [1, "auto", [], None, True],
    "attention": [{"form": "dense"}, "x", 1, None, True, [1], ["dense"], [None], [[]]],
    "ffn": [{"form": "dense"}, 0, [True]],
    "linear": ["2:4", [{"form": "2:4"}, 3]],
    "meta": [1, "x", [], None, {"a": None}, {"a": NAN}, {"a": [INF]}, {"a": {"b": None}}, {"a": 2 ** 64},
             {"a": b"bytes"}, {1: "int key"}, {"a": {2: "x"}}, {"a": object()}],
}
BAD_DEFAULTS = {"policy": BAD_VALUES["policy"], "margin": [0, -1, NAN, INF, -INF, True, "1", None, [1], 10 ** 400]}
KINDS = ("attention", "ffn", "linear")
FOREIGN_KEYS = {  # keys that belong to a different form of the same kind (or to another kind)
    ("attention", "dense"): ["sink", "block", "density", "threshold"],
    ("attention", "streaming"): ["block", "seed", "local_blocks"],
    ("attention", "block_sparse"): ["sink", "window"],
    ("ffn", "dense"): ["mode", "threshold", "sparsity", "heads", "phase"],
    ("ffn", "activation_threshold"): ["heads", "prune", "window"],
    ("linear", "dense"): ["prune", "density", "heads"],
    ("linear", "2:4"): ["density", "block", "heads"],
    ("linear", "block_weights"): ["heads", "sink", "threshold"],
}
unknown_keys = st.text(min_size=1, max_size=10).filter(lambda k: k not in {
    "version", "defaults", "attention", "ffn", "linear", "meta", "policy", "margin", "modules", "heads",
    "form", "phase", "sink", "window", "block", "local_blocks", "global_blocks", "random_blocks", "seed", "mode",
    "threshold", "sparsity", "prune", "density", "input", "down", "gate"})


@st.composite
def malformed_specs(draw):
    """A valid spec with exactly one change that must make it invalid."""
    spec = copy.deepcopy(draw(valid_specs()))
    rules = [(kind, i) for kind in KINDS for i in range(len(spec.get(kind, [])))]
    choices = ["top", "unknown_top", "defaults", "unknown_defaults"]
    if rules:
        choices += ["rule_value", "unknown_rule_key", "foreign_key", "missing", "not_a_table"]
    choice = draw(st.sampled_from(choices))
    if choice == "top":
        key = draw(st.sampled_from(sorted(BAD_TOP)))
        spec[key] = draw(st.sampled_from(BAD_TOP[key]))
    elif choice == "unknown_top":
        spec[draw(unknown_keys)] = draw(meta_scalars)
    elif choice == "defaults":
        key = draw(st.sampled_from(sorted(BAD_DEFAULTS)))
        spec.setdefault("defaults", {})[key] = draw(st.sampled_from(BAD_DEFAULTS[key]))
    elif choice == "unknown_defaults":
        spec.setdefault("defaults", {})[draw(unknown_keys)] = 1
    else:
        kind, index = draw(st.sampled_from(rules))
        rule = spec[kind][index]
        form = rule["form"]
        if choice == "rule_value":
            keys = ["modules", "policy", "form"] + (["heads", "phase"] if kind == "attention" else [])
            keys += {"streaming": ["sink", "window"],
                     "block_sparse": ["block", "local_blocks", "global_blocks", "random_blocks", "seed"],
                     "activation_threshold": ["mode", "threshold", "sparsity"],
                     "2:4": ["prune"], "block_weights": ["block", "density", "prune"]}.get(form, [])
            key = draw(st.sampled_from(keys))
            if form == "block_weights" and key == "block":
                bad = BLOCK_WEIGHTS_BLOCKS
            elif key == "form":  # also a real form name of another kind
                bad = BAD_VALUES["form"] + [f for k, fs in (("attention", ["streaming", "block_sparse"]),
                                                            ("ffn", ["activation_threshold"]),
                                                            ("linear", ["2:4", "block_weights"]))
                                            if k != kind for f in fs]
            else:
                bad = BAD_VALUES[key]
            rule[key] = draw(st.sampled_from(bad))
        elif choice == "unknown_rule_key":
            rule[draw(unknown_keys)] = draw(meta_scalars)
        elif choice == "foreign_key":
            rule[draw(st.sampled_from(FOREIGN_KEYS[(kind, form)]))] = 1
        elif choice == "missing":
            required = ["form"] + {"streaming": ["sink", "window"]}.get(form, [])
            if form == "activation_threshold":
                required.append("threshold and sparsity")  # it needs one of the two
            missing = draw(st.sampled_from(required))
            for key in missing.split(" and "):
                rule.pop(key, None)
        else:
            spec[kind][index] = draw(st.sampled_from([1, "dense", None, [rule], True, 2.5]))
    return spec


def _assert_only_spec_error(load):
    with pytest.raises(SpecError) as info:
        load()
    message = str(info.value)
    assert message and isinstance(info.value, ValueError)
    return info.value


@FUZZ
@given(malformed_specs())
def test_malformed_dicts_raise_spec_error(data):
    err = _assert_only_spec_error(lambda: load_spec(data))
    assert err.file == "<dict>"


def _has_non_string_key(value) -> bool:
    if isinstance(value, dict):
        return any(not isinstance(k, str) or _has_non_string_key(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_non_string_key(v) for v in value)
    return False


@FUZZ
@given(malformed_specs())
def test_malformed_json_files_raise_spec_error(data):
    if _has_non_string_key(data):
        return  # json.dumps would turn 1 into "1" and so repair the spec
    try:
        text = json.dumps(data)  # NaN/Infinity are written as JSON extensions Python reads back
    except (TypeError, ValueError):
        return  # bytes, objects: not expressible in JSON at all
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.json"
        path.write_text(text, encoding="utf-8")
        err = _assert_only_spec_error(lambda: load_spec(path))
        assert err.file == str(path)


# ---------------------------------------------------------------------------------------
# Arbitrary file contents
# ---------------------------------------------------------------------------------------

def _load_text(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return load_spec(path)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200)), st.sampled_from([".toml", ".json"]))
def test_random_files_raise_spec_error(content, suffix):
    # Random content never holds "version = 1" plus valid rules, so it must be refused.
    _assert_only_spec_error(lambda: _load_text(content, suffix))


@FUZZ
@given(valid_specs(), st.data())
def test_corrupted_files_load_or_raise_spec_error(data, draw):
    """Damage a valid file (cut, insert, replace a character): it may still load, but never crashes."""
    spec = load_spec(data)
    with tempfile.TemporaryDirectory() as tmp:
        suffix = draw.draw(st.sampled_from([".toml", ".json"]))
        path = Path(tmp) / f"s{suffix}"
        spec.save(path)
        text = path.read_text(encoding="utf-8")
        pos = draw.draw(st.integers(0, len(text)))
        junk = draw.draw(st.text(alphabet='[]{}=",.#\n 0123456789aefnrtu-_*\\\'', max_size=4))
        how = draw.draw(st.sampled_from(["cut", "insert", "replace"]))
        text = {"cut": text[:pos], "insert": text[:pos] + junk + text[pos:],
                "replace": text[:pos] + junk + text[pos + len(junk):]}[how]
        path.write_text(text, encoding="utf-8")
        try:
            loaded = load_spec(path)
        except Exception as exc:  # noqa: BLE001 - the point is to see what escapes
            assert isinstance(exc, SpecError), f"{type(exc).__name__}: {exc}"
        else:
            assert isinstance(loaded, Spec)


@pytest.mark.parametrize("text", [
    "[" * 5000, '{"a":' * 5000, "a = " + "[" * 5000, "version = 1\nx = " + "9" * 5000,
    '{"version": 1, "x": ' + "9" * 5000 + "}", "version = 1\n[meta]\n" + "a." * 3000 + "b = 1",
], ids=["toml-arrays", "json-objects", "toml-value", "toml-huge-int", "json-huge-int", "toml-deep-keys"])
def test_pathological_files_raise_spec_error(text):
    suffix = ".json" if text.startswith("{") else ".toml"
    _assert_only_spec_error(lambda: _load_text(text, suffix))
