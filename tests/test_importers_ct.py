"""compressed-tensors import: what the file holds beyond 2:4 sparsity, class-name entries, missing targets.

The matching rule checked here is compressed-tensors' (vllm-project/compressed-tensors @ 52792be,
``src/compressed_tensors/utils/match.py``): a module is selected when its name or one of its
classes matches a ``targets`` entry and neither matches an ``ignore`` entry; missing targets
select nothing. The layouts of the data files follow ``ModelCompressor.update_config`` there.
"""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsecc
from sparsecc.importers import import_compressed_tensors, import_spec
from sparsecc.spec import SpecError

DATA = Path(__file__).parent / "data" / "importers"


# ------------------------------------------------------------------ quantization and transforms

def test_quantization_is_a_warning_and_recorded():
    with pytest.warns(sparsecc.SparseccWarning, match="applies only the 2:4 sparsity") as record:
        spec = import_compressed_tensors(DATA / "ct_two_four_fp8.json")
    dropped = spec.meta["import"]["dropped"]
    assert [d.split(" (")[0] for d in dropped] == [
        "quantization: quantization_config.config_groups.group_0",
        "quantization: quantization_config.config_groups.W4A16",
        "quantization: quantization_config.kv_cache_scheme"]
    assert "weights float8 strategy channel" in dropped[0] and "input_activations float8" in dropped[0]
    assert "format float-quantized" in dropped[0] and "preset, targets ['re:.*down_proj$']" in dropped[1]
    message = str(record[0].message)
    assert all(d in message for d in dropped)
    # the sparsity itself is still imported
    assert [(r.modules, r.form.name) for r in spec.linear] == [("*", "2:4"), ("lm_head", "dense")]


def test_sparse_only_checkpoint_drops_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = import_compressed_tensors(DATA / "ct_sparse_only.json")
        # empty config_groups and a "dense" format quantize nothing
        import_compressed_tensors(DATA / "ct_two_four.json")
    assert "dropped" not in spec.meta["import"]


def _write(tmp_path, container):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": container}))
    return path


def test_transform_and_foreign_quantization_keys_are_recorded(tmp_path):
    sparsity = {"sparsity_structure": "2:4", "targets": ["Linear"]}
    path = _write(tmp_path, {"quant_method": "compressed-tensors", "sparsity_config": sparsity,
                             "transform_config": {"config_groups": {"R1": {"type": "hadamard"}}}})
    with pytest.warns(sparsecc.SparseccWarning):
        spec = import_compressed_tensors(path)
    assert list(spec.meta["import"]["dropped"]) == [
        "transform: quantization_config.transform_config (transforms applied online at inference)"]
    path = _write(tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 128, "sparsity_config": sparsity})
    with pytest.warns(sparsecc.SparseccWarning):
        spec = import_compressed_tensors(path)
    assert list(spec.meta["import"]["dropped"]) == [
        "quantization: quantization_config keys bits, group_size (quant_method gptq)"]


# ------------------------------------------------------------------ targets

def test_no_targets_selects_nothing(tmp_path):
    for sparsity in ({"sparsity_structure": "2:4"}, {"sparsity_structure": "2:4", "targets": [], "ignore": ["x"]}):
        with pytest.warns(sparsecc.SparseccWarning, match="no targets: compressed-tensors then selects nothing"):
            spec = import_compressed_tensors(_write(tmp_path, {"sparsity_config": sparsity}))
        assert spec.linear == ()


class MyLinear(nn.Linear):
    """A Linear subclass: compressed-tensors matches both "MyLinear" and "Linear" (its MRO)."""


class TinyRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))   # 1-D: a norm owns no linear site


class TinyMLP(nn.Module):
    def __init__(self, d, special):
        super().__init__()
        self.up_proj = (MyLinear if special else nn.Linear)(d, 2 * d)
        self.down_proj = nn.Linear(2 * d, d)
        self.norm = TinyRMSNorm(d)


class TinyLM(nn.Module):
    """Named modules of every kind a class entry can meet: Linear, a Linear subclass, Embedding, a norm, a block."""

    def __init__(self, d=8, layers=3):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, d)
        self.layers = nn.ModuleList(TinyMLP(d, special=(i == 1)) for i in range(layers))
        self.lm_head = nn.Linear(d, 16)


def ct_selected(model, targets, ignore):
    """compressed-tensors' selection, written from its match rule: name (re: -> re.match, else ==) or MRO class name."""
    def hit(name, module, entry):
        if entry.startswith("re:"):
            return re.match(entry[3:], name) is not None
        return entry == name or any(cls.__name__ == entry for cls in type(module).__mro__)
    return {name for name, module in model.named_modules()
            if any(hit(name, module, t) for t in targets) and not any(hit(name, module, i) for i in ignore)}


CASES = [
    (["Linear"], ["lm_head", "MyLinear"]),
    (["MyLinear"], []),
    (["Linear"], ["TinyRMSNorm", "Embedding"]),
    (["TinyMLP"], []),                                   # a block owns no 2-D parameter itself: nothing
    (["re:layers\\.[02]\\..*", "MyLinear"], ["re:.*down_proj$"]),
    (["lm_head", "Embedding"], []),
]


@pytest.mark.parametrize("targets, ignore", CASES)
def test_class_entries_select_what_compressed_tensors_selects(tmp_path, targets, ignore):
    model = TinyLM()
    path = _write(tmp_path, {"sparsity_config": {"sparsity_structure": "2:4", "targets": targets, "ignore": ignore}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsecc.SparseccWarning)   # TinyMLP selects nothing: warned
        spec = import_compressed_tensors(path, model=model)
    expected = ct_selected(model, targets, ignore)
    # Every module that can own a linear site (a 2-D parameter of its own) resolves as compressed-tensors selects it.
    # Spec "*" (from "Linear") also reaches non-Linear owners such as the embedding: compare the others.
    linear_owners = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in linear_owners + ([] if "Linear" in targets else ["embed_tokens"]):
        rule = spec.resolve("linear", name)
        assert (rule is not None and rule.form.name == "2:4") == (name in expected), name


def test_class_matches_are_recorded(tmp_path):
    path = _write(tmp_path, {"sparsity_config": {"sparsity_structure": "2:4", "targets": ["MyLinear"],
                                                 "ignore": ["TinyRMSNorm"]}})
    spec = import_compressed_tensors(path, model=TinyLM())
    options = spec.meta["import"]["options"]
    assert options["class_matches"] == {"MyLinear": 1, "TinyRMSNorm": 0}
    assert options["model_class"].endswith("TinyLM")
    assert [(r.modules, r.form.name) for r in spec.linear] == [("layers.1.up_proj", "2:4")]
    assert import_spec("compressed_tensors", path, model=TinyLM()) == spec


def test_class_name_without_model_is_an_error(tmp_path):
    path = _write(tmp_path, {"sparsity_config": {"sparsity_structure": "2:4", "targets": ["Linear"],
                                                 "ignore": ["LlamaRMSNorm"]}})
    with pytest.raises(SpecError) as info:
        import_compressed_tensors(path)
    err = info.value
    assert err.file == str(path) and err.key == "quantization_config.sparsity_config.ignore[0]"
    assert err.value == "LlamaRMSNorm" and "pass model=" in err.allowed and "is a class name" in str(err)
    with pytest.raises(SpecError) as info:
        import_compressed_tensors(path, model="TinyLM")
    assert info.value.key == "model" and "torch.nn.Module" in info.value.allowed
