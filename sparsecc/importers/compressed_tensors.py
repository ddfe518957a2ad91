"""The ``sparsity_config`` of a compressed-tensors checkpoint -> ``[[linear]]`` rules (see ``docs/importers.md``)."""

from __future__ import annotations

import math
import os
import re
import warnings
from itertools import product
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from sparsecc.backend import SparseccWarning
from sparsecc.spec import SpecError
from sparsecc.spec.schema import Spec
from sparsecc.importers.common import _base_spec, _check_policy, _Source, _to_spec

# --- compressed-tensors (vllm-project/compressed-tensors) -------------------------------
CT_CONTAINERS = ("quantization_config", "compression_config")
CT_SUPPORTED_STRUCTURES = ("2:4",)
# A regex target can expand into several globs (one per alternative); past this many the
# spec would be unreadable, and the pattern is better rewritten by hand.
MAX_GLOBS_PER_REGEX = 64


ALLOWED_TARGET = ('"Linear", another module class name (needs model=), an exact module name (e.g. "lm_head"), '
                  'or "re:<regex>" using only literals, ".", ".*", ".+", "\\d", [...] classes, (a|b) groups, '
                  '"^" and a final "$"')
# Keys of the container (quantization_config / compression_config) that are not quantization:
# compressed-tensors' parse_quantization_config removes exactly these before it looks for one.
CT_NOT_QUANTIZATION = ("sparsity_config", "transform_config", "quant_method", "version")
# Keys a QuantizationConfig holds besides its groups; alone (no groups, no kv-cache scheme)
# they quantize nothing.
CT_QUANTIZATION_BOOKKEEPING = ("format", "quantization_status", "global_compression_ratio", "ignore",
                               "kv_cache_scheme", "config_groups", "run_compressed")


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


def _class_names(module: Any) -> List[str]:
    """The class names compressed-tensors compares a target with: every nn.Module class in the MRO."""
    import torch
    names = [cls.__name__ for cls in type(module).__mro__ if isinstance(cls, type) and issubclass(cls, torch.nn.Module)]
    # compressed-tensors lets vLLM's LinearBase match "Linear".
    return names + (["Linear"] if "LinearBase" in names else [])


def _weight_modules(model: Any) -> List[Tuple[str, Any]]:
    """Modules that can own a linear site: a linear site's weight is a 2-D parameter of its module."""
    return [(name, module) for name, module in model.named_modules()
            if name and any(p.dim() == 2 for p in module.parameters(recurse=False))]


def _target_globs(src: _Source, path: Tuple[Any, ...], target: Any, model: Any = None,
                  resolved: Optional[Dict[str, int]] = None) -> List[str]:
    """The module globs of one compressed-tensors target or ignore entry.

    compressed-tensors matches an entry against a module's name (``re:`` -> ``re.match``,
    else equality) *or* its classes (any nn.Module class in its MRO by ``__name__``).
    Names become globs; ``"Linear"`` becomes ``"*"`` (``[[linear]]`` rules only reach linear
    sites); any other class name is resolved against ``model`` to the paths of its modules
    that own a 2-D parameter, and is an error without ``model``.
    """
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise src.error(path, value=target, allowed=ALLOWED_TARGET)
    if target.startswith("re:"):
        # A regex never names a class: ":" cannot occur in a class name.
        def fail(reason: str) -> SpecError:
            return src.error(path, f"is not supported: {reason}", value=target, allowed=ALLOWED_TARGET)
        try:
            re.compile(target[3:])
        except re.error as exc:
            raise src.error(path, f"is not a valid regex: {exc}", value=target, allowed=ALLOWED_TARGET) from None
        return _regex_to_globs(target[3:], fail)
    if target == "Linear":
        return ["*"]  # sparsecc's [[linear]] rules only ever reach linear sites
    if not target.isidentifier():
        return [_glob_literal(target)]   # a dotted module path cannot be a class name
    if model is None:
        if target[0].isupper():
            raise src.error(path, "is a class name: compressed-tensors matches it against each module's classes, "
                            "but a spec selects modules by path", value=target,
                            allowed="pass model= (the model to compile, e.g. built on the meta device) so that "
                            "sparsecc can find its modules of that class, or list module names or re: patterns "
                            "instead; without a model only " + ALLOWED_TARGET)
        return [_glob_literal(target)]
    # With the model, an identifier is tried both ways, as compressed-tensors does.
    modules = dict(model.named_modules())
    of_class = [name for name, module in modules.items() if name and target in _class_names(module)]
    by_class = [name for name, _ in _weight_modules(model) if name in set(of_class)]
    if resolved is not None and of_class:
        resolved[target] = len(by_class)
    # A name that is neither a module nor a class of the model still becomes its glob, so
    # that the compile report lists it as a rule that matches nothing.
    globs = [_glob_literal(target)] if (target in modules or not of_class) else []
    return globs + [_glob_literal(name) for name in by_class if name != target]


def _dropped(data: Mapping[str, Any]) -> List[str]:
    """What the file holds besides the sparsity config that sparsecc does not apply (quantization, transforms)."""
    dropped: List[str] = []
    for name in [c for c in CT_CONTAINERS if isinstance(data.get(c), dict)]:
        container = data[name]
        groups = container.get("config_groups")
        if isinstance(groups, dict):
            for group, scheme in groups.items():
                dropped.append(f"quantization: {name}.config_groups.{group} ({_describe_scheme(scheme, container)})")
        elif groups is not None:
            dropped.append(f"quantization: {name}.config_groups ({groups!r})")
        if container.get("kv_cache_scheme") is not None:
            dropped.append(f"quantization: {name}.kv_cache_scheme ({_describe_args(container['kv_cache_scheme'])})")
        other = sorted(k for k in container if k not in CT_NOT_QUANTIZATION + CT_QUANTIZATION_BOOKKEEPING)
        if other:
            method = container.get("quant_method")
            dropped.append(f"quantization: {name} keys {', '.join(other)}" + (f" (quant_method {method})" if method else ""))
        if container.get("transform_config"):
            dropped.append(f"transform: {name}.transform_config (transforms applied online at inference)")
    return dropped


def _describe_args(args: Any) -> str:
    if not isinstance(args, dict):
        return repr(args)
    kind = f"{args.get('type', '?')}{args.get('num_bits', '')}"
    extra = ", ".join(f"{k} {args[k]}" for k in ("strategy", "group_size", "dynamic") if args.get(k) is not None)
    return kind + (f" {extra}" if extra else "")


def _describe_scheme(scheme: Any, container: Mapping[str, Any]) -> str:
    if isinstance(scheme, list):   # a preset name (the group's key) mapped to its targets
        return f"preset, targets {scheme}"
    if not isinstance(scheme, dict):
        return repr(scheme)
    parts = [f"{role} {_describe_args(scheme[role])}" for role in ("weights", "input_activations", "output_activations")
             if scheme.get(role) is not None]
    parts.append(f"targets {scheme.get('targets')}")
    if container.get("format"):
        parts.append(f"format {container['format']}")
    return "; ".join(parts)


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


def compressed_tensors_tables(path: Any, *, policy: Optional[str] = None, model: Any = None) -> Dict[str, Any]:
    """The spec (plain v1 data) for a compressed-tensors config; see :func:`import_compressed_tensors`."""
    fmt = "compressed_tensors"
    _check_policy(fmt, policy)
    if model is not None and not callable(getattr(model, "named_modules", None)):
        raise SpecError(file=f"<{fmt} import>", key="model", value=type(model).__name__,
                        allowed="a torch.nn.Module (the model to compile; the meta device is enough)")
    src = _Source(path)
    data = src.json()
    where, config = _find_sparsity_config(src, data)
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

    # compressed-tensors' match_named_modules reads missing or empty targets as [] and selects
    # nothing (its config docstring says "all layers", its code does not).
    resolved: Dict[str, int] = {}
    target_globs: List[str] = []
    for i, target in enumerate(lists["targets"]):
        globs = _target_globs(src, where + ("targets", i), target, model, resolved)
        target_globs += [g for g in globs if g not in target_globs]
    ignore_globs: List[str] = []
    for i, target in enumerate(lists["ignore"]):
        globs = _target_globs(src, where + ("ignore", i), target, model, resolved)
        ignore_globs += [g for g in globs if g not in ignore_globs]
    if not target_globs:
        ignore_globs = []   # nothing selected: nothing to exclude
        warnings.warn(f"{src.name}: {'.'.join(where)} selects no module (" +
                      ("no targets: compressed-tensors then selects nothing" if not lists["targets"] else
                       "its class targets match no module of the model") + "), so the spec has no [[linear]] rules",
                      SparseccWarning, stacklevel=3)
    rules = [{"modules": g, "form": "2:4", "prune": "keep"} for g in target_globs]
    # Ignored modules come later, so that they override the targets (later rules win).
    rules += [{"modules": g, "form": "dense"} for g in ignore_globs]

    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        sparsity = None  # recorded only when it is a usable number
    options = {"policy": policy, "config_key": ".".join(where), "sparsity_format": fmt_name,
               "sparsity_structure": structure, "global_sparsity": sparsity,
               "model_class": None if model is None else f"{type(model).__module__}.{type(model).__qualname__}",
               "class_matches": resolved or None}
    meta = src.provenance(fmt, options)
    dropped = _dropped(data)
    if dropped:
        # Never silently: the spec would otherwise look like the whole recipe of the checkpoint.
        meta["import"]["dropped"] = dropped
        warnings.warn(f"{src.name}: sparsecc applies only the 2:4 sparsity of this checkpoint; not applied: "
                      + "; ".join(dropped) + ". Load the model with these handled (e.g. decompressed) before "
                      "compiling; the list is kept in [meta.import] dropped.", SparseccWarning, stacklevel=3)
    tables = _base_spec(policy, meta)
    if rules:
        tables["linear"] = rules
    return tables


def storage_note(spec: Spec) -> Optional[str]:
    """What to do before compiling a model from a compressed-tensors checkpoint whose weights are stored
    compressed (``format`` other than ``dense``), else None. sparsecc reads the dense weights of the model it
    compiles."""
    options = spec.meta.get("import", {}).get("options", {})
    fmt_name = options.get("sparsity_format")
    if spec.meta.get("import", {}).get("format") != "compressed_tensors" or fmt_name in (None, "dense"):
        return None
    return (f"the checkpoint stores its sparse weights as {fmt_name}: load the model decompressed (dense weights "
            "holding the 2:4 zeros) before compiling; a layer that is not 2:4 then stays dense with its reason")


def import_compressed_tensors(path: Any, *, policy: Optional[str] = None, model: Any = None) -> Spec:
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
    ``$``; anything else is a SpecError). Another class name (``"LlamaMLP"``,
    ``"Embedding"``) matches modules by class, as in compressed-tensors: give ``model`` (the
    model you compile; a meta-device copy is enough) and it becomes the paths of that class's
    modules that own a 2-D parameter; without ``model`` it is a SpecError. Missing or empty
    ``targets`` select nothing, as in compressed-tensors (a SparseccWarning says so).
    Quantization or transforms in the file are not applied: a SparseccWarning lists them and
    ``[meta.import] dropped`` keeps the list. Module names are used as they are in the
    checkpoint, so compile the same top-level model class (e.g. ``*ForCausalLM``).
    """
    return _to_spec(compressed_tensors_tables(path, policy=policy, model=model), os.fspath(path))
