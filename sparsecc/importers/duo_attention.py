"""DuoAttention's ``full_attention_heads.tsv`` -> streaming ``[[attention]]`` rules (see ``docs/importers.md``)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from sparsecc.backend import SparseccWarning
from sparsecc.spec import SpecError
from sparsecc.spec.schema import Spec, is_int
from sparsecc.importers.common import (DEFAULT_ATTENTION_TEMPLATE, _base_spec, _check_policy, _check_template,
                                       _layer_rules, _option_error, _Source, _to_spec)

# --- DuoAttention (mit-han-lab/duo-attention @ fe93c31, duo_attn/utils.py) --------------
DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
# sparsify_attention_heads' default threshold (heads with a gate >= 0.5 keep full attention).
# It is no longer applied implicitly: the caller picks threshold or sparsity.
DUO_DEFAULT_THRESHOLD = 0.5
# DuoAttention's evaluation scripts and README deploy with sparsity 0.5, sink 64, recent 256.
DUO_DEPLOY_SPARSITY = 0.5
DUO_DEPLOY_SINK = 64
DUO_DEPLOY_RECENT = 256
# DuoAttention breaks ties with uniform noise in [0, 1e-6): its mean, and the mean distance
# of two such draws (what separates two tied gates).
_MEAN_NOISE = 0.5e-6
_NOISE_GAP = 1e-6 / 3

ALLOWED_SELECTION = ("at most one of threshold (a gate value: KV heads with a clipped gate >= it keep full "
                     "attention; DuoAttention's default 0.5) or sparsity (a number in [0, 1]: that quantile of "
                     "all gates of all layers is the threshold; DuoAttention's scripts use 0.5)")


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
        # Cells are split on tabs, as DuoAttention's numpy.loadtxt(delimiter="\t") splits them: an empty cell
        # (two tabs in a row) is an error there, never a head dropped and the row's later heads shifted.
        for col, cell in enumerate(c.strip() for c in text.split("\t")):
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


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def streaming_count(sorted_gates: List[float], sparsity: float) -> int:
    """How many of the gates become streaming heads at ``sparsity`` under DuoAttention's rule.

    ``sorted_gates`` are all clipped gate values of the model, ascending. DuoAttention takes
    the ``sparsity`` quantile of them (numpy's default linear interpolation, over all layers at
    once), after adding noise below 1e-6 to break ties, and streams the heads strictly below
    it; ``sparsity >= 1`` streams all heads, ``<= 0`` none. With the noise the gates are
    distinct, so the count is the position ``(n - 1) * sparsity`` rounded up, except where
    the interpolated value rounds back onto the lower gate (a float rounding residue in the
    position, e.g. ``25 * 0.28 = 7.000000000000001``); that is reproduced by interpolating
    the same way between gates that carry the noise's typical size (not its random draw).
    """
    n = len(sorted_gates)
    if sparsity >= 1:
        return n
    if sparsity <= 0:
        return 0
    position = (n - 1) * sparsity       # numpy's virtual index for "linear", computed in float64 as numpy does
    low = math.floor(position)
    weight = position - low
    if weight == 0:
        return low                      # the quantile is the low-th gate itself, which is not below itself
    a, b = sorted_gates[low], sorted_gates[low + 1]
    # DuoAttention interpolates between the noisy gates: both carry noise (on average half its
    # bound), and tied or nearly tied gates lie about a third of the bound apart. numpy
    # interpolates from the nearer end; a step too small for the floats rounds back onto a,
    # and then a is the quantile and does not stream.
    lower = a + _MEAN_NOISE
    step = (b - a) + _NOISE_GAP
    quantile = lower + step * weight if weight < 0.5 else (lower + step) - step * (1 - weight)
    return low + 1 if quantile > lower else low


def select_streaming(gates: List[List[float]], *, threshold: Optional[float] = None,
                     sparsity: Optional[float] = None) -> List[List[int]]:
    """The streaming KV heads of each layer, for clipped ``gates[layer][kv_head]`` and one rule.

    ``threshold``: a KV head streams iff its gate is ``< threshold``. ``sparsity``: the
    :func:`streaming_count` lowest gates over all layers stream; DuoAttention breaks ties at
    random (its noise), sparsecc breaks them by position: the earlier layer, then the lower
    KV head, streams first, so the result is one that DuoAttention's rule can produce.
    """
    if (threshold is None) == (sparsity is None):
        raise ValueError("give exactly one of threshold or sparsity")
    if threshold is not None:
        return [[kv for kv, g in enumerate(row) if g < threshold] for row in gates]
    order = sorted(((g, layer, kv) for layer, row in enumerate(gates) for kv, g in enumerate(row)))
    chosen = order[:streaming_count([g for g, _, _ in order], sparsity)]
    out: List[List[int]] = [[] for _ in gates]
    for _, layer, kv in sorted(chosen, key=lambda item: (item[1], item[2])):
        out[layer].append(kv)
    return out


def duo_attention_tables(path: Any, *, query_heads: int, threshold: Optional[float] = None,
                         sparsity: Optional[float] = None, sink: Optional[int] = None, recent: Optional[int] = None,
                         modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                         policy: Optional[str] = None) -> Dict[str, Any]:
    """The spec (plain v1 data) for a DuoAttention pattern; see :func:`import_duo_attention`."""
    fmt = "duo_attention"
    _check_template(fmt, modules_template)
    _check_policy(fmt, policy)
    if not (is_int(query_heads) and query_heads >= 1):
        raise _option_error(fmt, "query_heads", query_heads,
                            "the model's number of query heads per layer (num_attention_heads), an integer >= 1")
    if threshold is not None and sparsity is not None:
        raise SpecError(f"are both given (threshold = {threshold!r}, sparsity = {sparsity!r})", file=f"<{fmt} import>",
                        key="threshold and sparsity", allowed=ALLOWED_SELECTION)
    if threshold is not None and not _is_number(threshold):
        raise _option_error(fmt, "threshold", threshold, "a finite number (gate values are clipped to [0, 1])")
    if sparsity is not None and not (_is_number(sparsity) and 0 <= sparsity <= 1):
        raise _option_error(fmt, "sparsity", sparsity, "a number in [0, 1]: the quantile of all gate values "
                            "below which KV heads become streaming heads (DuoAttention's scripts use 0.5)")
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
    # Clip like load_attn_pattern, then select like sparsify_attention_heads.
    clipped = [[min(max(alpha, 0.0), 1.0) for alpha in row] for row in gates]
    if threshold is None and sparsity is None:
        # Kept for specs imported before sparsity existed; the warning says what DuoAttention would deploy.
        threshold = DUO_DEFAULT_THRESHOLD
        at_default = sum(len(kvs) for kvs in select_streaming(clipped, threshold=threshold))
        deployed = sum(len(kvs) for kvs in select_streaming(clipped, sparsity=DUO_DEPLOY_SPARSITY))
        warnings.warn(f"{src.name}: neither threshold nor sparsity given, so threshold = {threshold} "
                      f"({at_default} of {kv_heads * len(gates)} KV heads stream); DuoAttention's scripts deploy "
                      f"with sparsity = {DUO_DEPLOY_SPARSITY} ({deployed} stream). Pass threshold= or sparsity= "
                      "(--threshold / --sparsity) to choose.", SparseccWarning, stacklevel=3)
    chosen = select_streaming(clipped, threshold=None if threshold is None else float(threshold),
                              sparsity=None if sparsity is None else float(sparsity))
    layers = []
    for streaming_kv in chosen:
        # Query head h reads KV head h // group: the group of KV head kv is kv*group .. kv*group+group-1.
        layers.append({h: streaming for kv in streaming_kv for h in range(kv * group, (kv + 1) * group)})
    n_streaming = sum(len(kvs) for kvs in chosen)
    options = {"modules_template": modules_template, "policy": policy,
               "threshold": None if threshold is None else float(threshold),
               "sparsity": None if sparsity is None else float(sparsity),
               "sink": sink, "recent": recent, "query_heads": query_heads, "kv_heads": kv_heads,
               "streaming_kv_heads": n_streaming, "total_kv_heads": kv_heads * len(gates),
               "config_sha256": config_sha}
    tables = _base_spec(policy, src.provenance(fmt, options))
    rules = _layer_rules(modules_template, layers)
    if rules:
        tables["attention"] = rules
    return tables


def import_duo_attention(path: Any, *, query_heads: int, threshold: Optional[float] = None,
                         sparsity: Optional[float] = None, sink: Optional[int] = None, recent: Optional[int] = None,
                         modules_template: str = DEFAULT_ATTENTION_TEMPLATE,
                         policy: Optional[str] = None) -> Spec:
    """Import a DuoAttention pattern: ``full_attention_heads.tsv`` (or the directory holding it).

    Row ``i`` of the TSV is layer ``i`` (module ``modules_template.format(layer=i)``); its
    columns are the learned gate values of the layer's *KV* heads. Each value is clipped to
    [0, 1]. Give one selection rule (both are DuoAttention's ``sparsify_attention_heads``;
    giving both is an error; giving neither uses ``threshold = 0.5`` with a SparseccWarning that
    says how many heads DuoAttention's deploy setting, ``sparsity = 0.5``, would stream):

    * ``threshold``: a KV head whose gate is ``>= threshold`` keeps full attention (no rule:
      dense), the others become streaming heads;
    * ``sparsity``: the ``sparsity`` quantile of all gates of all layers (numpy's linear
      interpolation) is the threshold, so that about that fraction of all KV heads stream
      (:func:`streaming_count` gives the exact number). Ties are broken by position (earlier
      layer, then lower KV head, streams first); DuoAttention breaks them at random.
      DuoAttention's own scripts deploy with ``sparsity = 0.5``.

    The streaming KV heads are expanded to query heads the
    way DuoAttention does: with ``group = query_heads // kv_heads``, KV head ``kv`` serves
    query heads ``kv*group .. kv*group + group - 1`` (sparsecc's ``heads`` are query heads).
    Each layer with streaming heads gets one rule ``form = "streaming"``, ``sink = sink_size``,
    ``window = recent_size``, ``heads = [...]``. ``sink``/``recent`` default to ``sink_size``
    and ``recent_size`` of the ``config.json`` beside the TSV. ``query_heads`` is the model's
    ``num_attention_heads`` and must be a multiple of the number of columns.
    """
    tables = duo_attention_tables(path, query_heads=query_heads, threshold=threshold, sparsity=sparsity, sink=sink,
                                  recent=recent, modules_template=modules_template, policy=policy)
    return _to_spec(tables, str(_duo_paths(path)[0]))
