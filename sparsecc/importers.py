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
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
from itertools import product
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from sparsecc.spec import SpecError, load_spec
from sparsecc.spec.locate import DuplicateKey, line_at, parse_json
from sparsecc.spec.schema import POLICIES, Spec, check_glob, is_int

# HF Llama, Mistral, Qwen2/3 and most decoder-only families name their attention this way;
# the path is relative to the module that is compiled (a *ForCausalLM here).
DEFAULT_ATTENTION_TEMPLATE = "model.layers.{layer}.self_attn"

# --- MInference (microsoft/MInference, minference/modules/minference_forward.py) -------
# Vertical-slash estimates its indices from the attention of the last 64 queries.
MINFERENCE_LAST_Q = 64
# Its vertical-slash and block-sparse kernels tile queries and keys in 64-token blocks.
MINFERENCE_BLOCK = 64
# The vertical-slash kernel raises the budgets to at least 30 columns and 50 diagonals.
MINFERENCE_MIN_VERTICAL = 30
MINFERENCE_MIN_SLASH = 50
# MInference's budgets count every kept column / diagonal, including column 0 and the main
# diagonal (forced in); sparsecc's vertical_slash keeps those two besides its budgets.
ALWAYS_KEPT_LINES = 1
# The block-sparse kernel keeps 100 key blocks per query block, whatever the config says.
MINFERENCE_BLOCK_TOPK = 100
MINFERENCE_PATTERNS = ("vertical_and_slash", "stream_llm", "a_shape", "block_sparse")

# --- DuoAttention (mit-han-lab/duo-attention, duo_attn/utils.py) ------------------------
DUO_TSV = "full_attention_heads.tsv"
DUO_CONFIG = "config.json"
# sparsify_attention_heads' default: heads with a gate value >= 0.5 keep full attention.
DUO_DEFAULT_THRESHOLD = 0.5

# --- compressed-tensors (vllm-project/compressed-tensors) -------------------------------
CT_CONTAINERS = ("quantization_config", "compression_config")
CT_SUPPORTED_STRUCTURES = ("2:4",)
# A regex target can expand into several globs (one per alternative); past this many the
# spec would be unreadable, and the pattern is better rewritten by hand.
MAX_GLOBS_PER_REGEX = 64

FORMAT_NAMES = ("minference", "duo_attention", "compressed_tensors")


# ---------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------

class _Source:
    """One input file: its name for errors, its text, sha256 and (for JSON) a line locator."""

    def __init__(self, path: Any):
        try:
            self.name = os.fsdecode(os.fspath(path))
        except TypeError:
            raise SpecError(f"cannot read a file from a {type(path).__name__}",
                            allowed="a path (str or os.PathLike)") from None
        file = Path(self.name)
        if file.is_dir():
            raise SpecError("is a directory, not a file", file=self.name)
        try:
            raw = file.read_bytes()
        except FileNotFoundError:
            raise SpecError("does not exist", file=self.name) from None
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot be read: {getattr(exc, 'strerror', None) or exc}", file=self.name) from None
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self.text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"is not UTF-8 text (byte {exc.start})", file=self.name,
                            line=raw.count(b"\n", 0, exc.start) + 1) from None
        self._locator = None

    def json(self) -> Any:
        """The parsed JSON (duplicate keys are errors, as in spec files)."""
        try:
            data, self._locator = parse_json(self.text)
        except DuplicateKey as exc:
            line = line_at(self.text, exc.pos) if exc.pos is not None else None
            raise SpecError(f"invalid JSON: the key {exc.key!r} appears twice in one object",
                            file=self.name, line=line) from None
        except (ValueError, RecursionError) as exc:
            line = getattr(exc, "lineno", None)
            raise SpecError(f"invalid JSON: {getattr(exc, 'msg', None) or exc}", file=self.name, line=line) from None
        return data

    def error(self, path: Tuple[Any, ...], problem: str = "is not allowed", *, value: Any = None,
              allowed: Optional[str] = None, show_value: bool = True) -> SpecError:
        """A SpecError at ``path`` inside this file (rendered like ``[3]["5"][0]``)."""
        key = "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if part.isidentifier() else
                      f"[{json.dumps(part)}]") for part in path).lstrip(".") or None
        line = self._locator.line(path) if (self._locator is not None and path) else None
        if show_value:
            return SpecError(problem, file=self.name, key=key, line=line, value=value, allowed=allowed)
        return SpecError(problem, file=self.name, key=key, line=line, allowed=allowed)

    def provenance(self, fmt: str, options: Mapping[str, Any]) -> Dict[str, Any]:
        """The ``[meta.import]`` table: what was imported, from which bytes, when and how."""
        return {"import": {
            "format": fmt,
            "file": Path(self.name).name,
            "sha256": self.sha256,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "options": {k: v for k, v in options.items() if v is not None},
        }}


def _option_error(fmt: str, name: str, value: Any, allowed: str) -> SpecError:
    return SpecError(file=f"<{fmt} import>", key=name, value=value, allowed=allowed)


def _check_template(fmt: str, template: Any) -> str:
    """A module-path template must hold ``{layer}`` once and give a valid glob."""
    ok = isinstance(template, str) and template.count("{layer}") == 1
    rest = template.replace("{layer}", "") if ok else ""
    if not ok or "{" in rest or "}" in rest or check_glob(template.replace("{layer}", "0")):
        raise _option_error(fmt, "modules_template", template,
                            'a module-path glob with one "{layer}", e.g. "model.layers.{layer}.self_attn"')
    return template


def _check_policy(fmt: str, policy: Optional[str]) -> None:
    if policy is not None and policy not in POLICIES:
        raise _option_error(fmt, "policy", policy, "one of " + ", ".join(POLICIES))


def _base_spec(policy: Optional[str], meta: Dict[str, Any]) -> Dict[str, Any]:
    spec: Dict[str, Any] = {"version": 1}
    if policy is not None:
        spec["defaults"] = {"policy": policy}
    spec["meta"] = meta
    return spec


def _to_spec(tables: Dict[str, Any], source: str) -> Spec:
    """Validate importer output; a failure here names the generated rule and the source file."""
    try:
        spec = load_spec(tables)
    except SpecError as err:
        raise SpecError(err.problem, file=f"{source} (imported)", key=err.key,
                        value=err.value, allowed=err.allowed) from None
    return spec


def _group_heads(layer_forms: Mapping[int, Dict[str, Any]]) -> List[Tuple[List[int], Dict[str, Any]]]:
    """Heads with identical forms share one rule; rules come in order of their first head."""
    groups: Dict[Tuple, Tuple[List[int], Dict[str, Any]]] = {}
    for head in sorted(layer_forms):
        table = layer_forms[head]
        groups.setdefault(tuple(sorted(table.items())), ([], table))[0].append(head)
    return list(groups.values())


def _layer_rules(template: str, layers: Sequence[Mapping[int, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    rules = []
    for layer, forms in enumerate(layers):
        for heads, table in _group_heads(forms):
            rules.append({"modules": template.format(layer=layer), "heads": heads, **table})
    return rules


# ---------------------------------------------------------------------------------------
# MInference
# ---------------------------------------------------------------------------------------

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
                "vertical": max(size_a, MINFERENCE_MIN_VERTICAL) - ALWAYS_KEPT_LINES,
                "slash": max(size_b, MINFERENCE_MIN_SLASH) - ALWAYS_KEPT_LINES,
                "block": MINFERENCE_BLOCK}
    if name in ("stream_llm", "a_shape"):
        if size_b < 1:
            raise src.error(path + (2,), value=size_b, allowed="an integer >= 1 (the local window of stream_llm)")
        return {"form": "streaming", "sink": size_a, "window": size_b}
    # block_sparse: the kernel ignores both sizes (see MINFERENCE_BLOCK_TOPK).
    return {"form": "block_topk", "block": MINFERENCE_BLOCK, "topk": MINFERENCE_BLOCK_TOPK,
            "sink_blocks": 0, "local_blocks": 0, "pool": "mean"}


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

    * ``vertical_and_slash`` -> ``vertical_slash`` with ``last_q = 64``, ``vertical =
      max(size_a, 30) - 1``, ``slash = max(size_b, 50) - 1``, ``block = 64``: MInference
      raises the budgets to those lower bounds and counts column 0 and the main diagonal in
      them, which sparsecc keeps besides its budgets, so the totals are equal;
    * ``stream_llm`` (also spelled ``a_shape``) -> ``streaming`` with ``sink = size_a``
      (``n_init``) and ``window = size_b`` (``n_local``);
    * ``block_sparse`` -> ``block_topk`` with ``block = 64``, ``topk = 100``,
      ``sink_blocks = 0``, ``local_blocks = 0``, ``pool = "mean"``: MInference's kernel keeps
      the 100 key blocks of largest mean-pooled score per query block and ignores both sizes.

    The score is the search metric and is not used. Heads and layers missing from the file
    get no rule (they stay dense). ``policy`` sets ``defaults.policy`` when given.
    """
    return _to_spec(minference_tables(path, modules_template=modules_template, policy=policy), os.fspath(path))


# ---------------------------------------------------------------------------------------
# DuoAttention
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# compressed-tensors
# ---------------------------------------------------------------------------------------

ALLOWED_TARGET = ('"Linear", an exact module name (e.g. "lm_head"), or "re:<regex>" using only literals, '
                  '".", ".*", ".+", "\\d", [...] classes, (a|b) groups, "^" and a final "$"')


def _glob_literal(text: str) -> str:
    """Escape glob metacharacters so that ``text`` matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in text)


def _regex_pieces(pattern: str, fail: Callable[[str], SpecError]) -> List[List[str]]:
    """Cut a regex into pieces, each a list of alternative glob fragments (a product gives the globs)."""
    pieces: List[List[str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        nxt = pattern[i + 1:i + 2]
        end = i + 1                      # one past the token
        if c == "." and nxt and nxt in "*+":
            pieces.append(["*" if nxt == "*" else "?*"])
            end = i + 2
        elif c == ".":
            pieces.append(["?"])
        elif c == "\\":
            if nxt == "d":
                pieces.append(["[0-9]"])
            elif nxt and not nxt.isalnum():
                pieces.append([_glob_literal(nxt)])
            else:
                raise fail(f"the escape \\{nxt} has no glob equivalent")
            end = i + 2
        elif c == "[":
            # As in both regex and glob, a "]" right after "[" (or "[^") is a literal.
            start = i + 1 + (pattern[i + 1:i + 2] == "^")
            close = pattern.find("]", start + (pattern[start:start + 1] == "]"))
            body = pattern[i + 1:close]
            # A leading "!" is literal in a regex class but negates a glob class.
            if close < 0 or "\\" in body or "[" in body or body.startswith("!"):
                raise fail("only simple [...] classes are supported")
            pieces.append(["[" + ("!" + body[1:] if body.startswith("^") else body) + "]"])
            end = close + 1
        elif c == "(":
            close = pattern.find(")", i)
            body = pattern[i + 1:close]
            if body.startswith("?:"):
                body = body[2:]
            if close < 0 or any(ch in body for ch in "()[]\\.*+?{^$"):
                raise fail("only (a|b) groups of plain names are supported")
            pieces.append([_glob_literal(alt) for alt in body.split("|")])
            end = close + 1
        elif c in "*+?{}()|^$]":
            raise fail(f"{c!r} at position {i} has no glob equivalent here")
        else:
            pieces.append([_glob_literal(c)])
        quantifier = pattern[end:end + 1]
        if quantifier and quantifier in "*+?{":
            raise fail(f"the quantifier {quantifier!r} after {pattern[i:end]!r} has no glob equivalent")
        i = end
    return pieces


def _regex_to_globs(pattern: str, fail: Callable[[str], SpecError]) -> List[str]:
    """Globs matching exactly the module names ``re.match(pattern, name)`` accepts (a supported subset)."""
    anchored = pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1:] if pattern.startswith("^") else pattern
    body = body[:-1] if anchored else body
    pieces = _regex_pieces(body, fail)
    count = math.prod(len(p) for p in pieces)
    if count > MAX_GLOBS_PER_REGEX:
        raise fail(f"it expands into {count} globs (at most {MAX_GLOBS_PER_REGEX})")
    globs = []
    for combo in product(*pieces):
        glob = "".join(combo)
        # re.match only anchors at the start: without "$", anything may follow.
        if not anchored and not glob.endswith("*"):
            glob += "*"
        if glob and glob not in globs:
            globs.append(glob)
    if not globs:
        raise fail("it matches no module name")
    return globs


def _target_globs(src: _Source, path: Tuple[Any, ...], target: Any) -> List[str]:
    """The module globs of one compressed-tensors target or ignore entry."""
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise src.error(path, value=target, allowed=ALLOWED_TARGET)
    if target.startswith("re:"):
        def fail(reason: str) -> SpecError:
            return src.error(path, f"is not supported: {reason}", value=target, allowed=ALLOWED_TARGET)
        try:
            re.compile(target[3:])
        except re.error as exc:
            raise src.error(path, f"is not a valid regex: {exc}", value=target, allowed=ALLOWED_TARGET) from None
        return _regex_to_globs(target[3:], fail)
    if target == "Linear":
        return ["*"]  # sparsecc's [[linear]] rules only ever reach linear sites
    if target.isidentifier() and target[0].isupper():
        raise src.error(path, "is a class name sparsecc cannot select by", value=target, allowed=ALLOWED_TARGET)
    return [_glob_literal(target)]


def _find_sparsity_config(src: _Source, data: Any) -> Tuple[Tuple[str, ...], Mapping[str, Any]]:
    allowed = ('a "sparsity_config" object under "quantization_config" or "compression_config" '
               "(a Hugging Face config.json of a compressed-tensors checkpoint)")
    if not isinstance(data, dict):
        raise src.error((), f"has a top level that is a {type(data).__name__}, not an object",
                        show_value=False, allowed=allowed)
    candidates = [(c, "sparsity_config") for c in CT_CONTAINERS] + [("sparsity_config",)]
    for keys in candidates:
        node: Any = data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            if not isinstance(node, dict):
                raise src.error(keys, value=node, allowed="an object with format, sparsity_structure, targets, ignore")
            return keys, node
    raise src.error(("quantization_config", "sparsity_config"), "is missing", show_value=False, allowed=allowed)


def compressed_tensors_tables(path: Any, *, policy: Optional[str] = None) -> Dict[str, Any]:
    """The spec (plain v1 data) for a compressed-tensors config; see :func:`import_compressed_tensors`."""
    fmt = "compressed_tensors"
    _check_policy(fmt, policy)
    src = _Source(path)
    where, config = _find_sparsity_config(src, src.json())
    structure = config.get("sparsity_structure")
    supported = "one of " + ", ".join(repr(s) for s in CT_SUPPORTED_STRUCTURES) + " (sparsecc has no unstructured form)"
    if not isinstance(structure, str) or structure.lower() not in CT_SUPPORTED_STRUCTURES:
        problem = "is not supported" if structure is not None else "is missing (compressed-tensors reads that as 'unstructured')"
        raise src.error(where + ("sparsity_structure",), problem, value=structure, allowed=supported,
                        show_value=structure is not None)
    lists = {}
    for key in ("targets", "ignore"):
        value = config.get(key) or []
        if not isinstance(value, list):
            raise src.error(where + (key,), value=value, allowed="an array of targets: " + ALLOWED_TARGET)
        lists[key] = value
    fmt_name = config.get("format")
    if fmt_name is not None and not isinstance(fmt_name, str):
        raise src.error(where + ("format",), value=fmt_name, allowed='a string such as "sparse-24-bitmask"')
    sparsity = config.get("global_sparsity")

    # No targets: compressed-tensors documents that every layer is targeted.
    target_globs = ["*"] if not lists["targets"] else []
    for i, target in enumerate(lists["targets"]):
        target_globs += [g for g in _target_globs(src, where + ("targets", i), target) if g not in target_globs]
    ignore_globs: List[str] = []
    for i, target in enumerate(lists["ignore"]):
        ignore_globs += [g for g in _target_globs(src, where + ("ignore", i), target) if g not in ignore_globs]
    rules = [{"modules": g, "form": "2:4", "prune": "keep"} for g in target_globs]
    # Ignored modules come later, so that they override the targets (later rules win).
    rules += [{"modules": g, "form": "dense"} for g in ignore_globs]

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        sparsity = None  # recorded only when it is a usable number
    options = {"policy": policy, "config_key": ".".join(where), "sparsity_format": fmt_name,
               "sparsity_structure": structure, "global_sparsity": sparsity}
    tables = _base_spec(policy, src.provenance(fmt, options))
    tables["linear"] = rules
    return tables


def import_compressed_tensors(path: Any, *, policy: Optional[str] = None) -> Spec:
    """Import the ``sparsity_config`` of a compressed-tensors checkpoint's ``config.json``.

    The config is read from ``quantization_config.sparsity_config`` (or
    ``compression_config.sparsity_config``, or a top-level ``sparsity_config``). Only
    ``sparsity_structure = "2:4"`` is supported (case-insensitive); anything else is a
    SpecError. Mapping, in order (later rules override earlier ones):

    * every ``targets`` entry -> one ``[[linear]]`` rule ``form = "2:4"``, ``prune = "keep"``
      (the checkpoint's weights are already pruned; sparsecc checks the pattern);
    * every ``ignore`` entry -> a later ``form = "dense"`` rule for the same modules.

    Entries map to ``modules`` globs: ``"Linear"`` -> ``"*"`` (all linear sites); an exact
    module name -> that name (glob characters escaped); ``"re:<regex>"`` -> the globs that
    accept exactly the names ``re.match`` accepts, for a supported regex subset (``.*``,
    ``.+``, ``.``, ``\\d``, escaped punctuation, ``[...]``, ``(a|b)``, ``^``, a final
    ``$``; anything else is a SpecError). Missing or empty ``targets`` means every linear
    layer. Module names are used as they are in the checkpoint, so compile the same
    top-level model class (e.g. ``*ForCausalLM``).
    """
    return _to_spec(compressed_tensors_tables(path, policy=policy), os.fspath(path))


# ---------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------

IMPORTERS: Dict[str, Callable[..., Spec]] = {
    "minference": import_minference,
    "duo_attention": import_duo_attention,
    "compressed_tensors": import_compressed_tensors,
}
# The options each importer takes (the CLI passes only those given).
IMPORT_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "minference": ("modules_template", "policy"),
    "duo_attention": ("query_heads", "threshold", "sink", "recent", "modules_template", "policy"),
    "compressed_tensors": ("policy",),
}


def import_spec(fmt: str, path: Any, **options: Any) -> Spec:
    """Import ``path`` in format ``fmt`` (``minference``, ``duo_attention``, ``compressed_tensors``;
    dashes are accepted for underscores) with that importer's keyword ``options``."""
    name = fmt.replace("-", "_").lower() if isinstance(fmt, str) else fmt
    if name not in IMPORTERS:
        raise SpecError("is not an import format", key="format", value=fmt,
                        allowed="one of " + ", ".join(FORMAT_NAMES))
    allowed = IMPORT_OPTIONS[name]
    for key, value in options.items():
        if key not in allowed:
            raise _option_error(name, key, value, f"only these options for {name}: " + ", ".join(allowed))
    if name == "duo_attention" and "query_heads" not in options:
        raise SpecError("is missing", file=f"<{name} import>", key="query_heads",
                        allowed="the model's num_attention_heads (DuoAttention's columns are KV heads)")
    return IMPORTERS[name](path, **options)
