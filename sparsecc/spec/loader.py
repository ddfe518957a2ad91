"""Loading a v1 spec from a TOML or JSON file, or a mapping, into a validated :class:`Spec`.

Every problem becomes a :class:`SpecError` naming the file, the key path, the line (TOML;
JSON best effort), the bad value and what is allowed. Checks run in the order a reader
would fix things: the version first, then unknown keys, then each value.
"""

from __future__ import annotations

import numbers
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import tomllib   # Python >= 3.11 (pyproject.toml's requires-python)

from .errors import _UNSET, KeyPath, SpecError, format_key
from .files import read_regular
from .locate import DuplicateKey, TomlLocator, line_at, parse_json
from .registry import COMMON_KEYS, FORMS, KINDS, THRESHOLD_TABLE_KEYS
from .schema import (ALLOWED_GLOB, ALLOWED_HEADS, ALLOWED_INT64, ALLOWED_PHASE, ALLOWED_POLICY, MAX_META_DEPTH,
                     SPEC_VERSION, Defaults, Rule, Spec, check_glob, check_heads, check_margin, check_phase,
                     check_policy,
                     find_meta_problem, is_int, out_of_int64)
from .writer import SUFFIXES

TOP_KEYS = ("version", "defaults", "attention", "ffn", "linear", "meta")
DEFAULTS_KEYS = ("policy", "margin")
DICT_SOURCE = "<dict>"
THRESHOLD_MODES = tuple(THRESHOLD_TABLE_KEYS)
# The forms' ValueError text: "name=value is not allowed; expected ..." (see sparsecc.forms).
_FORM_ERROR = re.compile(r"^(?P<name>[^=]+)=(?P<value>.*) is not allowed; expected (?P<allowed>.*)$", re.S)
_TOML_LINE = re.compile(r"at line (\d+)")
# Deepest nesting anywhere in the data: [meta] may nest MAX_META_DEPTH levels below its own table, which sits
# one level below the top; rules need far less. Checked without recursion before anything else recurses.
MAX_DEPTH = MAX_META_DEPTH + 1

SpecSource = Union[str, "os.PathLike[str]", Mapping[str, Any], Spec, None]


class _Context:
    """Where the data came from, to turn a key path into a located SpecError."""

    def __init__(self, file: str, text: Optional[str] = None, locator: Any = None):
        self.file = file
        self._text = text
        self._locator = locator

    def line(self, path: KeyPath) -> Optional[int]:
        if self._locator is None and self._text is not None:
            # Built on the first error only: a spec that loads cleanly never pays for it.
            self._locator = TomlLocator(self._text)
        return self._locator.line(path) if (self._locator is not None and path) else None

    def error(self, path: KeyPath, problem: str = "is not allowed", value: Any = _UNSET,
              allowed: Optional[str] = None) -> SpecError:
        return SpecError(problem, file=self.file, key=format_key(path), line=self.line(path),
                         value=value, allowed=allowed)


def _one_of(names) -> str:
    return "one of " + ", ".join(names)


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------

def load_spec(src: SpecSource) -> Optional[Spec]:
    """Load and validate a spec.

    ``None`` gives None (no spec: every site stays dense); a :class:`Spec` is returned as is;
    a mapping is validated (errors name the file ``"<dict>"``; numpy's integer and float scalars count as
    numbers); a path must end in ``.toml``
    or ``.json``. Raises :class:`SpecError` for every problem, and nothing else.
    """
    if src is None:
        return None
    if isinstance(src, Spec):
        return src
    if isinstance(src, Mapping):
        return _guarded(lambda: build_spec(_plain_numbers(src), _Context(DICT_SOURCE)), DICT_SOURCE)
    if isinstance(src, (str, os.PathLike)):
        return _load_file(src)
    raise SpecError(f"cannot load a spec from a {type(src).__name__}",
                    allowed="a path (.toml or .json), a mapping, a sparsecc.spec.Spec or None")


def _plain_numbers(value: Any, depth: int = 0) -> Any:
    """A mapping spec with other libraries' number scalars (``numpy.int64(2)``, ``numpy.float32(0.5)``) as Python
    ints and floats, which is what the rules check for; bools and everything else are left as they are. Deeper
    than any spec may nest, values are left for the nesting check to refuse."""
    if depth > MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {k: _plain_numbers(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_numbers(v, depth + 1) for v in value)
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _guarded(build, file: str) -> Spec:
    """Run ``build``; a RecursionError that escapes the nesting check still becomes a SpecError."""
    try:
        return build()
    except RecursionError:
        raise SpecError("is nested too deeply to load", file=file,
                        allowed=f"at most {MAX_DEPTH} levels of tables and arrays") from None


def _load_file(src: Any) -> Spec:
    try:
        name = os.fsdecode(os.fspath(src))
    except (TypeError, ValueError) as exc:
        raise SpecError(f"is not a usable path: {exc}", allowed="a str or os.PathLike") from None
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise SpecError(f"has the suffix {suffix or '(none)'!r}, which is not a spec format",
                        file=name, value=suffix, allowed=" or ".join(SUFFIXES))
    raw = read_regular(name)
    try:
        # utf-8-sig: a byte-order mark (some editors write one) is not part of the spec
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError(f"is not valid UTF-8 text (byte {exc.start})", file=name, line=line) from None
    if suffix == ".toml":
        data, ctx = _parse_toml(text, name)
    else:
        data, ctx = _parse_json(text, name)
    return _guarded(lambda: build_spec(data, ctx, source=name), name)


def _parse_toml(text: str, name: str) -> Tuple[Dict[str, Any], _Context]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_LINE.search(str(exc))
        raise SpecError(f"invalid TOML: {exc}", file=name,
                        line=int(match.group(1)) if match else None) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise SpecError(f"invalid TOML: {type(exc).__name__}: {exc}", file=name) from None
    return data, _Context(name, text=text)


def _parse_json(text: str, name: str) -> Tuple[Any, _Context]:
    try:
        data, locator = parse_json(text)
    except DuplicateKey as exc:
        line = line_at(text, exc.pos) if exc.pos is not None else None
        raise SpecError(f"invalid JSON: the key {exc.key!r} appears twice in one object",
                        file=name, line=line) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        line = getattr(exc, "lineno", None)
        message = getattr(exc, "msg", None) or f"{type(exc).__name__}: {exc}"
        where = f" (line {line}, column {exc.colno})" if line is not None else ""
        raise SpecError(f"invalid JSON: {message}{where}", file=name, line=line) from None
    return data, _Context(name, locator=locator)


# ---------------------------------------------------------------------------------------
# Validation and building
# ---------------------------------------------------------------------------------------

def build_spec(data: Any, ctx: _Context, source: Optional[str] = None) -> Spec:
    """Validate parsed data and build the Spec (``ctx`` locates errors)."""
    if not isinstance(data, Mapping):
        raise ctx.error((), f"has a top level that is a {type(data).__name__}, not a table",
                        allowed="a table with version = 1 and [[attention]], [[ffn]], [[linear]] rules")
    _check_depth(data, ctx)
    _check_string_keys(data, (), ctx)
    if "version" not in data:
        raise ctx.error(("version",), "is missing", allowed=f"version = {SPEC_VERSION} at the top of the spec")
    version = data["version"]
    if not (is_int(version) and version == SPEC_VERSION):
        raise ctx.error(("version",), value=version, allowed=f"{SPEC_VERSION} (the only spec version)")
    _check_keys(data, (), TOP_KEYS, ctx)
    defaults = _build_defaults(data["defaults"], ctx) if "defaults" in data else Defaults()
    rules: Dict[str, Tuple[Rule, ...]] = {}
    for kind in KINDS:
        rules[kind] = _build_rules(kind, data[kind], ctx) if kind in data else ()
    meta = _check_meta(data["meta"], ctx) if "meta" in data else {}
    return Spec(version=SPEC_VERSION, defaults=defaults, meta=meta, source=source, **rules)


def _check_depth(data: Mapping, ctx: _Context) -> None:
    """Refuse tables and arrays nested deeper than MAX_DEPTH, iteratively (so that later recursion is safe).

    A Python mapping may even contain itself; the walk stops at the limit all the same.
    """
    stack = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, (list, tuple)):
            items = list(enumerate(value))
        else:
            continue
        if len(path) > MAX_DEPTH:
            raise ctx.error(path, value=value, allowed=f"at most {MAX_META_DEPTH} levels of nesting")
        # Reversed, so that the first bad entry in reading order is the one reported.
        stack.extend((item, path + (key,)) for key, item in reversed(items))


def _check_string_keys(table: Mapping, path: KeyPath, ctx: _Context) -> None:
    # Only Python mappings can have non-string keys; TOML and JSON keys are always strings.
    for key in table:
        if not isinstance(key, str):
            raise ctx.error(path, f"has the key {key!r}, which is not a string", allowed="string keys")


def _check_keys(table: Mapping, path: KeyPath, allowed: Tuple[str, ...], ctx: _Context,
                foreign: Optional[Dict[str, str]] = None, form: Optional[str] = None) -> None:
    """Refuse keys outside ``allowed``; ``foreign`` names the form a misplaced key belongs to."""
    for key, value in table.items():
        if key in allowed:
            continue
        if foreign and key in foreign:
            problem = f"belongs to form {foreign[key]!r}, not to form {form!r}"
            expected = f"only these keys for form {form!r}: " + ", ".join(allowed)
        else:
            problem = "is not an allowed key"
            expected = _one_of(allowed)
        raise ctx.error(path + (key,), problem, value=value, allowed=expected)


def _build_defaults(raw: Any, ctx: _Context) -> Defaults:
    path: KeyPath = ("defaults",)
    if not isinstance(raw, Mapping):
        raise ctx.error(path, "is not a table", value=raw, allowed="a [defaults] table with policy and margin")
    _check_string_keys(raw, path, ctx)
    _check_keys(raw, path, DEFAULTS_KEYS, ctx)
    _check_int_range(raw, path, ctx)
    policy = raw.get("policy", "auto")
    if check_policy(policy):
        raise ctx.error(path + ("policy",), value=policy, allowed=ALLOWED_POLICY)
    margin = raw.get("margin", Defaults.margin)
    allowed = check_margin(margin)
    if allowed:
        raise ctx.error(path + ("margin",), value=margin, allowed=allowed)
    return Defaults(policy=policy, margin=margin)


def _build_rules(kind: str, raw: Any, ctx: _Context) -> Tuple[Rule, ...]:
    if not isinstance(raw, (list, tuple)):
        raise ctx.error((kind,), "is not an array of tables", value=raw,
                        allowed=f"a list of rule tables (in TOML, [[{kind}]] with two brackets)")
    return tuple(_build_rule(kind, i, item, ctx) for i, item in enumerate(raw))


def _build_rule(kind: str, index: int, raw: Any, ctx: _Context) -> Rule:
    path: KeyPath = (kind, index)
    forms = FORMS[kind]
    if not isinstance(raw, Mapping):
        raise ctx.error(path, "is not a table", value=raw, allowed=f"a rule table with a form key ({_one_of(forms)})")
    _check_string_keys(raw, path, ctx)
    if "form" not in raw:
        raise ctx.error(path + ("form",), "is missing", allowed=_one_of(forms))
    form_name = raw["form"]
    if not (isinstance(form_name, str) and form_name in forms):
        other = [k for k in KINDS if k != kind and isinstance(form_name, str) and form_name in FORMS[k]]
        hint = f" ({form_name!r} is a form for [[{other[0]}]] rules)" if other else ""
        raise ctx.error(path + ("form",), value=form_name, allowed=_one_of(forms) + hint)
    entry = forms[form_name]
    allowed = COMMON_KEYS[kind] + entry.keys
    foreign = {key: other.name for other in forms.values() if other is not entry
               for key in other.keys if key not in allowed}
    _check_keys(raw, path, allowed, ctx, foreign=foreign, form=form_name)
    for key in entry.required:
        if key not in raw:
            raise ctx.error(path + (key,), "is missing", allowed=f"{key} for form {form_name!r}")
    _check_int_range(raw, path, ctx)

    modules = raw.get("modules", "*")
    if check_glob(modules):
        raise ctx.error(path + ("modules",), value=modules, allowed=ALLOWED_GLOB)
    heads = None
    if "heads" in raw:
        heads = raw["heads"]
        if check_heads(heads):
            raise ctx.error(path + ("heads",), value=heads, allowed=ALLOWED_HEADS)
        heads = tuple(heads)
    policy = None
    if "policy" in raw:
        policy = raw["policy"]
        if check_policy(policy):
            raise ctx.error(path + ("policy",), value=policy, allowed=ALLOWED_POLICY)

    phase = raw.get("phase", "both")
    if check_phase(phase):
        raise ctx.error(path + ("phase",), value=phase, allowed=ALLOWED_PHASE)

    form_raw = {key: raw[key] for key in entry.keys if key in raw}
    if form_name == "activation_threshold":
        _check_threshold(form_raw, path, ctx)
    if form_name == "block_topk":
        _check_block_topk(form_raw, path, ctx)
    try:
        form = entry.build(form_raw)
    except (ValueError, TypeError) as exc:
        # TypeError too: whatever a form makes of a strange value, the user gets a SpecError.
        raise _form_error(exc, path, form_raw, ctx) from None
    return Rule(kind=kind, index=index, form=form, modules=modules, heads=heads, policy=policy, phase=phase)


def _check_int_range(value: Any, path: KeyPath, ctx: _Context) -> None:
    """Refuse every integer outside the signed 64-bit range in ``value``, at any depth (docs/spec.md, Types).

    One check for every numeric key, integer or number, scalar or inside a table or array, before any
    key-specific check can turn the value into a float (``margin = 2**70`` would pass as 1.2e21).
    Nesting is bounded by :func:`_check_depth`, so the recursion is shallow.
    """
    if out_of_int64(value):
        raise ctx.error(path, value=value, allowed=ALLOWED_INT64)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_int_range(item, path + (key,), ctx)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_int_range(item, path + (i,), ctx)


def _check_threshold(raw: Mapping[str, Any], path: KeyPath, ctx: _Context) -> None:
    """The activation_threshold checks the form cannot phrase in spec terms."""
    mode = raw.get("mode", "input")
    if not (isinstance(mode, str) and mode in THRESHOLD_MODES):
        raise ctx.error(path + ("mode",), value=mode, allowed=_one_of(THRESHOLD_MODES))
    if "threshold" not in raw and "sparsity" not in raw:
        raise ctx.error(path + ("threshold",), "is missing",
                        allowed="a threshold, a target sparsity, or both")
    keys = THRESHOLD_TABLE_KEYS[mode]
    table_allowed = f"a number >= 0, or a table with keys from {', '.join(keys)} (mode {mode!r})"
    # A spec has no null: None (from a dict or JSON null) never means "absent".
    if "threshold" in raw and raw["threshold"] is None:
        raise ctx.error(path + ("threshold",), value=None, allowed=table_allowed)
    if "sparsity" in raw and raw["sparsity"] is None:
        raise ctx.error(path + ("sparsity",), value=None, allowed="a number in (0, 1)")
    threshold = raw.get("threshold")
    if isinstance(threshold, Mapping):
        if not threshold:
            raise ctx.error(path + ("threshold",), value=threshold, allowed=table_allowed)
        for key, tau in threshold.items():
            if not isinstance(key, str):
                raise ctx.error(path + ("threshold",), f"has the key {key!r}, which is not a string",
                                allowed=_one_of(keys))
            if key not in keys:
                raise ctx.error(path + ("threshold", key), f"is not an allowed key in mode {mode!r}",
                                value=tau, allowed=_one_of(keys))


def _check_block_topk(raw: Mapping[str, Any], path: KeyPath, ctx: _Context) -> None:
    """block_topk takes exactly one budget: a block count (topk), a probability mass to cover (cdf), or the least
    probability a kept block has (min_mass)."""
    allowed = "exactly one of topk (an integer >= 1), cdf (a number in (0, 1]) and min_mass (a number in (0, 1])"
    given = [key for key in ("topk", "cdf", "min_mass") if key in raw]
    if len(given) > 1:
        raise ctx.error(path + (given[1],), f"cannot be given together with {given[0]}", value=raw[given[1]],
                        allowed=allowed)
    if not given:
        raise ctx.error(path + ("topk",), "is missing", allowed=allowed)


def _form_error(exc: Exception, path: KeyPath, raw: Mapping[str, Any], ctx: _Context) -> SpecError:
    """Re-raise a form's ``"name=value is not allowed; expected ..."`` at its key path."""
    match = _FORM_ERROR.match(str(exc))
    if match is None:
        return ctx.error(path + ("form",), f"cannot be built from these keys: {exc}")
    parts: KeyPath = tuple(match.group("name").strip().split("."))
    if parts[0] == "threshold" and not isinstance(raw.get("threshold"), Mapping):
        parts = ("threshold",)  # one number was given for every projection: point at it
    value: Any = raw
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            value = _UNSET
            break
    return ctx.error(path + parts, value=value, allowed=match.group("allowed"))


def _check_meta(raw: Any, ctx: _Context) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ctx.error(("meta",), "is not a table", value=raw, allowed="a [meta] table of free-form provenance")
    problem = find_meta_problem(raw, ("meta",))
    if problem:
        path, value, allowed = problem
        raise ctx.error(path, value=value, allowed=allowed)
    return raw
