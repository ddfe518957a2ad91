"""The ``sparsity_config`` of a compressed-tensors checkpoint -> ``[[linear]]`` rules (see ``docs/importers.md``)."""

from __future__ import annotations

import math
import os
import re
from itertools import product
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from sparsecc.spec import SpecError
from sparsecc.spec.schema import Spec
from sparsecc.importers.common import _base_spec, _check_policy, _Source, _to_spec

# --- compressed-tensors (vllm-project/compressed-tensors) -------------------------------
CT_CONTAINERS = ("quantization_config", "compression_config")
CT_SUPPORTED_STRUCTURES = ("2:4",)
# A regex target can expand into several globs (one per alternative); past this many the
# spec would be unreadable, and the pattern is better rewritten by hand.
MAX_GLOBS_PER_REGEX = 64


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
