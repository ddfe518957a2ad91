"""The import layering the package docstrings state (passes/__init__.py, codegen/__init__.py): an AST scan of
every import statement, at module level and inside functions, so a lazy import cannot hide a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ["sparsecc/forms.py", "sparsecc/spec", "sparsecc/layouts.py", "sparsecc/weights.py",
        "sparsecc/kernel_tiles.py", "sparsecc/cache.py", "sparsecc/cost", "sparsecc/activations.py",
        "sparsecc/sharding.py", "sparsecc/timing.py"]
ABOVE = ("sparsecc.pipeline", "sparsecc.backend", "sparsecc.api", "sparsecc.cli", "sparsecc.tune", "sparsecc.report",
         "sparsecc.importers", "sparsecc.distributed")
# layer -> (its files, the module prefixes it must not import)
RULES = {
    "core": (CORE, ("sparsecc.passes", "sparsecc.codegen") + ABOVE),
    "codegen": (["codegen"], ("sparsecc.passes", "sparsecc.cost") + ABOVE),
    "passes": (["passes"], ABOVE),
}


def _files(paths):
    for p in paths:
        path = ROOT / p
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_nothing_above_it(layer):
    paths, banned = RULES[layer]
    files = list(_files(paths))
    assert files, f"no files for layer {layer}"
    bad = [f"{f.relative_to(ROOT)}:{line} imports {mod}" for f in files for line, mod in _imports(f)
           if mod.startswith(banned)]
    assert not bad, "\n".join(bad)


def test_the_scan_sees_lazy_imports(tmp_path):
    """The scan is not vacuous: an import inside a function is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sparsecc.passes import site\n")
    assert list(_imports(probe)) == [(2, "sparsecc.passes")]
