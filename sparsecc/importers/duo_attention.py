"""DuoAttention's ``full_attention_heads.tsv`` -> streaming ``[[attention]]`` rules (see ``docs/importers.md``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from sparsecc.spec import SpecError
from sparsecc.spec.schema import Spec, is_int
from sparsecc.importers.common import (DEFAULT_ATTENTION_TEMPLATE, _base_spec, _check_policy, _check_template,
                                       _layer_rules, _option_error, _Source, _to_spec)

# --- DuoAttention (mit-han-lab/duo-attention, duo_attn/utils.py) ------------------------
DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
# sparsify_attention_heads' default: heads with a gate value >= 0.5 keep full attention.
DUO_DEFAULT_THRESHOLD = 0.5


def _duo_paths(path: Any) -> Tuple[Path, Path]:
    try:
        given = Path(os.fsdecode(os.fspath(path)))
    except TypeError:
        raise SpecError(f"cannot read a DuoAttention pattern from a {type(path).__name__}",
                        allowed=f"a path to {DUO_TSV} or to its directory") from None
    tsv = given / DUO_TSV if given.is_dir() else given
    return tsv, tsv.parent / DUO_CONFIG


def _duo_gates(src: _Source) -> List[List[float]]:
    rows: List[List[float]] = []
    for line_no, line in enumerate(src.text.splitlines(), start=1):
        text = line.split("#", 1)[0].strip()  # '#' starts a comment, as numpy.loadtxt reads it
        if not text:
            continue
        row = []
        for col, cell in enumerate(text.split()):
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise SpecError(f"row {len(rows)}, column {col} = {cell!r} is not a finite number",
                                file=src.name, line=line_no, allowed="tab-separated gate values, one per KV head")
            row.append(value)
        if rows and len(row) != len(rows[0]):
            raise SpecError(f"row {len(rows)} has {len(row)} values but row 0 has {len(rows[0])}",
                            file=src.name, line=line_no, allowed="the same number of KV heads on every row")
        rows.append(row)
    if not rows:
        raise SpecError("holds no rows", file=src.name, allowed="one row of gate values per layer")
    return rows


def _duo_size(name: str, given: Optional[int], config: Mapping[str, Any], key: str, minimum: int,
              config_name: str) -> int:
    if given is not None:
        if not (is_int(given) and given >= minimum):
            raise _option_error("duo_attention", name, given, f"an integer >= {minimum}")
        return given
    if key not in config or config[key] is None:
        raise SpecError(f"has no {key}", file=config_name, key=key,
                        allowed=f"{key} in {DUO_CONFIG} beside {DUO_TSV}, or pass {name}")
    value = config[key]
    if not (is_int(value) and value >= minimum):
        raise SpecError(file=config_name, key=key, value=value, allowed=f"an integer >= {minimum}")
    return value


def duo_attention_tables(path: Any, *, query_heads: int, threshold: float = DUO_DEFAULT_THRESHOLD,
                         sink: Optional[int] = None, recent: Optional[int] = None,
                         modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                         policy: Optional[str] = None) -> Dict[str, Any]:
    """The spec (plain v1 data) for a DuoAttention pattern; see :func:`import_duo_attention`."""
    fmt = "duo_attention"
    _check_template(fmt, modules_template)
    _check_policy(fmt, policy)
    if not (is_int(query_heads) and query_heads >= 1):
        raise _option_error(fmt, "query_heads", query_heads,
                            "the model's number of query heads per layer (num_attention_heads), an integer >= 1")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise _option_error(fmt, "threshold", threshold, "a finite number (gate values are clipped to [0, 1])")
    tsv_path, config_path = _duo_paths(path)
    src = _Source(tsv_path)
    gates = _duo_gates(src)
    kv_heads = len(gates[0])
    if query_heads % kv_heads:
        raise _option_error(fmt, "query_heads", query_heads,
                            f"a multiple of the {kv_heads} KV heads (columns) of {src.name}")
    config: Mapping[str, Any] = {}
    config_sha = None
    if sink is None or recent is None:
        if not config_path.exists():
            raise SpecError("does not exist", file=str(config_path),
                            allowed=f"the {DUO_CONFIG} saved beside {DUO_TSV} (for sink_size and "
                            "recent_size), or pass both sink and recent")
        config_src = _Source(config_path)
        config = config_src.json()
        config_sha = config_src.sha256
        if not isinstance(config, dict):
            raise SpecError("is not a JSON object", file=config_src.name, allowed="DuoAttention's run config")
    sink = _duo_size("sink", sink, config, "sink_size", 0, str(config_path))
    recent = _duo_size("recent", recent, config, "recent_size", 1, str(config_path))

    group = query_heads // kv_heads
    streaming = {"form": "streaming", "sink": sink, "window": recent}
    layers = []
    for row in gates:
        # Clip like load_attn_pattern, then full iff >= threshold like sparsify_attention_heads.
        streaming_kv = [kv for kv, alpha in enumerate(row) if min(max(alpha, 0.0), 1.0) < threshold]
        # Query head h reads KV head h // group: the group of KV head kv is kv*group .. kv*group+group-1.
        layers.append({h: streaming for kv in streaming_kv for h in range(kv * group, (kv + 1) * group)})
    options = {"modules_template": modules_template, "policy": policy, "threshold": float(threshold),
               "sink": sink, "recent": recent, "query_heads": query_heads, "kv_heads": kv_heads,
               "config_sha256": config_sha}
    tables = _base_spec(policy, src.provenance(fmt, options))
    rules = _layer_rules(modules_template, layers)
    if rules:
        tables["attention"] = rules
    return tables


def import_duo_attention(path: Any, *, query_heads: int, threshold: float = DUO_DEFAULT_THRESHOLD,
                         sink: Optional[int] = None, recent: Optional[int] = None,
                         modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                         policy: Optional[str] = None) -> Spec:
    """Import a DuoAttention pattern: ``full_attention_heads.tsv`` (or the directory holding it).

    Row ``i`` of the TSV is layer ``i`` (module ``modules_template.format(layer=i)``); its
    columns are the learned gate values of the layer's *KV* heads. Each value is clipped to
    [0, 1]; a KV head whose value is ``>= threshold`` keeps full attention (no rule: dense),
    the others become streaming heads. The streaming KV heads are expanded to query heads the
    way DuoAttention does: with ``group = query_heads // kv_heads``, KV head ``kv`` serves
    query heads ``kv*group .. kv*group + group - 1`` (sparsecc's ``heads`` are query heads).
    Each layer with streaming heads gets one rule ``form = "streaming"``, ``sink = sink_size``,
    ``window = recent_size``, ``heads = [...]``. ``sink``/``recent`` default to ``sink_size``
    and ``recent_size`` of the ``config.json`` beside the TSV. ``query_heads`` is the model's
    ``num_attention_heads`` and must be a multiple of the number of columns.
    """
    tables = duo_attention_tables(path, query_heads=query_heads, threshold=threshold, sink=sink,
                                  recent=recent, modules_template=modules_template, policy=policy)
    return _to_spec(tables, str(_duo_paths(path)[0]))
