"""Library versions in [meta.import] (every importer) and [meta.tune]: present, equal to the running ones."""

from importlib import metadata
from pathlib import Path

import pytest
import torch

import sparsecc
from sparsecc.importers import import_compressed_tensors, import_duo_attention, import_minference
from sparsecc.spec import load_spec
from tests.tune import models

DATA = Path(__file__).parent / "data" / "importers"


def running_versions():
    """What is installed here, read independently of sparsecc's helper."""
    expected = {"sparsecc": sparsecc.__version__, "torch": torch.__version__}
    try:
        expected["transformers"] = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        pass
    return expected


@pytest.mark.parametrize("importer", [
    lambda: import_minference(DATA / "minference_streaming.json"),
    lambda: import_duo_attention(DATA / "duo", query_heads=4, threshold=0.5),
    lambda: import_compressed_tensors(DATA / "ct_two_four.json"),
])
def test_import_records_library_versions(tmp_path, importer):
    spec = importer()
    assert dict(spec.meta["import"]["versions"]) == running_versions()
    path = tmp_path / "spec.toml"
    spec.save(path)
    assert dict(load_spec(str(path)).meta["import"]["versions"]) == running_versions()


def test_tune_records_library_versions():
    spec = sparsecc.tune(models.AttnStack().eval(), models.batches(1), target=0.4, step=0.2, progress=False)
    versions = dict(spec.meta["tune"]["versions"])
    assert versions == running_versions()
    assert ("transformers" in versions) == ("transformers" in running_versions())
