"""Importers: published per-model sparsity files turned into sparsecc specs (v1).

Three formats are understood (exact mappings, sources and examples in ``docs/importers.md``):

* ``minference``: MInference's per-model pattern config (JSON, one object per layer
  mapping a query-head index to ``[pattern, size_a, size_b, score]``);
* ``duo_attention``: DuoAttention's ``full_attention_heads.tsv`` (one row per layer, one
  learned gate value per KV head) with the ``config.json`` saved beside it;
* ``compressed_tensors``: the ``sparsity_config`` of a compressed-tensors checkpoint,
  inside a Hugging Face ``config.json``.

Each ``import_*`` function returns a validated :class:`sparsecc.spec.Spec`; the matching
``*_tables`` function returns the same spec as plain v1 data (a dict that
:func:`sparsecc.spec.load_spec` accepts). :func:`import_spec` dispatches by format name.
Every problem is a :class:`SpecError` naming the file, the key inside it and what is
allowed. The spec's ``[meta]`` records where it came from: file name, sha256, format,
date and the importer options.

One module per format (``minference``, ``duo_attention``, ``compressed_tensors``) and the
shared plumbing (``common``); every public name is re-exported here.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from sparsecc.spec import SpecError, load_spec
from sparsecc.spec.schema import Spec
from sparsecc.importers.common import DEFAULT_ATTENTION_TEMPLATE, _option_error
from sparsecc.importers.minference import (MINFERENCE_BLOCK, MINFERENCE_BLOCK_TOPK, MINFERENCE_LAST_Q,
                                           MINFERENCE_PATTERNS, import_minference, minference_tables)
from sparsecc.importers.duo_attention import (DUO_CONFIG, DUO_DEFAULT_THRESHOLD, DUO_DEPLOY_RECENT,
                                              DUO_DEPLOY_SINK, DUO_DEPLOY_SPARSITY, DUO_TSV, duo_attention_tables,
                                              import_duo_attention, select_streaming, streaming_count)
from sparsecc.importers.compressed_tensors import (ALLOWED_TARGET, CT_CONTAINERS, CT_SUPPORTED_STRUCTURES,
                                                   MAX_GLOBS_PER_REGEX, _regex_to_globs,
                                                   compressed_tensors_tables, import_compressed_tensors)

FORMAT_NAMES = ("minference", "duo_attention", "compressed_tensors")

__all__ = ["import_spec", "check_import_options", "import_minference", "import_duo_attention", "import_compressed_tensors",
           "minference_tables", "duo_attention_tables", "compressed_tensors_tables", "IMPORTERS",
           "IMPORT_OPTIONS", "FORMAT_NAMES", "DEFAULT_ATTENTION_TEMPLATE", "MINFERENCE_LAST_Q", "MINFERENCE_BLOCK",
           "MINFERENCE_BLOCK_TOPK",
           "MINFERENCE_PATTERNS", "DUO_TSV", "DUO_CONFIG", "DUO_DEFAULT_THRESHOLD", "DUO_DEPLOY_SPARSITY",
           "DUO_DEPLOY_SINK", "DUO_DEPLOY_RECENT", "select_streaming", "streaming_count", "CT_CONTAINERS",
           "CT_SUPPORTED_STRUCTURES", "MAX_GLOBS_PER_REGEX", "ALLOWED_TARGET", "Spec", "SpecError", "load_spec"]


IMPORTERS: Dict[str, Callable[..., Spec]] = {
    "minference": import_minference,
    "duo_attention": import_duo_attention,
    "compressed_tensors": import_compressed_tensors,
}
# The options each importer takes (the CLI passes only those given).
IMPORT_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "minference": ("modules_template", "policy"),
    "duo_attention": ("query_heads", "threshold", "sparsity", "sink", "recent", "modules_template", "policy"),
    "compressed_tensors": ("policy", "model"),
}


def check_import_options(fmt: str, options: Dict[str, Any]) -> str:
    """The importer name of ``fmt`` (dashes are accepted for underscores) once every key of ``options`` is an
    option it takes; a SpecError naming the format or the first option it does not take otherwise. The command
    line checks with this before it builds a model for ``model``."""
    name = fmt.replace("-", "_").lower() if isinstance(fmt, str) else fmt
    if name not in IMPORTERS:
        raise SpecError("is not an import format", key="format", value=fmt,
                        allowed="one of " + ", ".join(FORMAT_NAMES))
    allowed = IMPORT_OPTIONS[name]
    for key, value in options.items():
        if key not in allowed:
            raise _option_error(name, key, value, f"only these options for {name}: " + ", ".join(allowed))
    return name


def import_spec(fmt: str, path: Any, **options: Any) -> Spec:
    """Import ``path`` in format ``fmt`` (``minference``, ``duo_attention``, ``compressed_tensors``;
    dashes are accepted for underscores) with that importer's keyword ``options``."""
    name = check_import_options(fmt, options)
    if name == "duo_attention" and "query_heads" not in options:
        raise SpecError("is missing", file=f"<{name} import>", key="query_heads",
                        allowed="the model's num_attention_heads (DuoAttention's columns are KV heads)")
    return IMPORTERS[name](path, **options)
