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
    scalar = load_spec(_ffn(threshold=0.3, criterion="weighted", mode="gate"))
    assert scalar.to_dict()["ffn"][0] == {"form": "activation_threshold", "mode": "gate",
                                          "threshold": 0.3, "criterion": "weighted"}


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
