"""MInference's per-model pattern config -> ``[[attention]]`` rules (see ``docs/importers.md``)."""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

from sparsecc.spec.schema import Spec, is_int
from sparsecc.importers.common import (DEFAULT_ATTENTION_TEMPLATE, _base_spec, _check_policy, _check_template,
                                       _layer_rules, _Source, _to_spec)

# --- MInference (microsoft/MInference, minference/modules/minference_forward.py) -------
# Vertical-slash estimates its indices from the attention of the last 64 queries.
MINFERENCE_LAST_Q = 64
# Its vertical-slash and block-sparse kernels tile queries and keys in 64-token blocks.
MINFERENCE_BLOCK = 64
# vertical_slash takes MInference's budgets as they are: the form itself raises them to at least 30 columns and
# 50 diagonals and forces the first columns and nearest diagonals inside them (sparsecc.forms.VerticalSlash).
# The block-sparse kernel keeps 100 key blocks per query block, whatever the config says.
MINFERENCE_BLOCK_TOPK = 100
MINFERENCE_PATTERNS = ("vertical_and_slash", "stream_llm", "a_shape", "block_sparse")


# MInference sparsifies prefill only; decode runs dense attention (its forward's dense path for one query).
PREFILL = "prefill"


def _minference_form(src: _Source, path: Tuple[Any, ...], entry: Any) -> Dict[str, Any]:
    allowed_entry = "[pattern, size_a, size_b, score] with pattern one of " + ", ".join(MINFERENCE_PATTERNS)
    if not isinstance(entry, list) or len(entry) != 4:
        raise src.error(path, value=entry, allowed=allowed_entry)
    name, size_a, size_b, score = entry
    if name not in MINFERENCE_PATTERNS:
        raise src.error(path + (0,), value=name, allowed="one of " + ", ".join(MINFERENCE_PATTERNS))
    for i, size in ((1, size_a), (2, size_b)):
        if not (is_int(size) and size >= 0):
            raise src.error(path + (i,), value=size, allowed="an integer >= 0")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise src.error(path + (3,), value=score, allowed="a number (the search score; not used)")
    if name == "vertical_and_slash":
        return {"form": "vertical_slash", "last_q": MINFERENCE_LAST_Q,
                "vertical": size_a, "slash": size_b,
                "block": MINFERENCE_BLOCK, "phase": PREFILL}
    if name in ("stream_llm", "a_shape"):
        if size_b < 1:
            raise src.error(path + (2,), value=size_b, allowed="an integer >= 1 (the local window of stream_llm)")
        return {"form": "streaming", "sink": size_a, "window": size_b, "phase": PREFILL}
    # block_sparse: the kernel ignores both sizes (see MINFERENCE_BLOCK_TOPK).
    return {"form": "block_topk", "block": MINFERENCE_BLOCK, "topk": MINFERENCE_BLOCK_TOPK,
            "sink_blocks": 0, "local_blocks": 0, "pool": "mean", "phase": PREFILL}


def minference_tables(path: Any, *, modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                      policy: Optional[str] = None) -> Dict[str, Any]:
    """The spec (plain v1 data) for an MInference pattern config; see :func:`import_minference`."""
    fmt = "minference"
    _check_template(fmt, modules_template)
    _check_policy(fmt, policy)
    src = _Source(path)
    data = src.json()
    if not isinstance(data, list):
        raise src.error((), f"has a top level that is a {type(data).__name__}, not an array",
                        show_value=False, allowed="one object per layer mapping head index to "
                        "[pattern, size_a, size_b, score]")
    layers = []
    for layer, heads in enumerate(data):
        if not isinstance(heads, dict):
            raise src.error((layer,), value=heads, allowed="an object mapping head index (a string) to a pattern")
        forms: Dict[int, Dict[str, Any]] = {}
        for key, entry in heads.items():
            if not re.fullmatch(r"0|[1-9][0-9]*", key):
                raise src.error((layer, key), "is not a head index", show_value=False,
                                allowed='a string holding an integer >= 0, e.g. "0"')
            forms[int(key)] = _minference_form(src, (layer, key), entry)
        layers.append(forms)
    options = {"modules_template": modules_template, "policy": policy}
    tables = _base_spec(policy, src.provenance(fmt, options))
    rules = _layer_rules(modules_template, layers)
    if rules:
        tables["attention"] = rules
    return tables


def import_minference(path: Any, *, modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                      policy: Optional[str] = None) -> Spec:
    """Import an MInference per-model pattern config (``*_best_pattern*.json``).

    The file is a JSON array with one object per layer (layer ``i`` -> module
    ``modules_template.format(layer=i)``); each maps a *query* head index (a string; MInference
    runs its patterns per head after ``repeat_kv``) to ``[pattern, size_a, size_b, score]``.
    Heads of a layer with identical settings share one ``[[attention]]`` rule with their
    ``heads`` list. Mapping:

    * ``vertical_and_slash`` -> ``vertical_slash`` with ``last_q = 64``, ``vertical = size_a``,
      ``slash = size_b`` (the sizes as written), ``block = 64``: sparsecc's ``vertical_slash`` is
      MInference's pattern, which raises the budgets to at least 30 columns and 50 diagonals
      itself (docs/spec.md, docs/importers.md);
    * ``stream_llm`` -> ``streaming`` with ``sink = size_a`` (``n_init``) and ``window = size_b``
      (``n_local``). sparsecc also reads ``a_shape`` here, the name of MInference's whole-model
      streaming mode, which MInference's per-head dispatch does not accept;
    * ``block_sparse`` -> ``block_topk`` with ``block = 64``, ``topk = 100``,
      ``sink_blocks = 0``, ``local_blocks = 0``, ``pool = "mean"``: MInference's kernel keeps
      the 100 key blocks of largest mean-pooled score per query block and ignores both sizes.

    The score is the search metric and is not used. Heads and layers missing from the file
    get no rule (they stay dense). ``policy`` sets ``defaults.policy`` when given.
    """
    return _to_spec(minference_tables(path, modules_template=modules_template, policy=policy), os.fspath(path))
