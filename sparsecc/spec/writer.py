"""Turning a Spec back into v1 data, and writing it as TOML or JSON.

Python's standard library reads TOML (``tomllib``) but does not write it, and sparsecc
takes no dependency for that, so :func:`dumps_toml` is a small writer for plain data:
tables, arrays, strings, ints, finite floats and bools (exactly what a v1 spec holds).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from .errors import SpecError
from .files import write_regular
from .registry import KINDS, entry_for
from .schema import DEFAULT_MARGIN, DEFAULT_POLICY, thaw

SUFFIXES = (".toml", ".json")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# TOML's short escapes; every other control character is written as \uXXXX.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


# ---------------------------------------------------------------------------------------
# Spec -> plain data
# ---------------------------------------------------------------------------------------

def rule_to_dict(rule: Any) -> Dict[str, Any]:
    """One rule as its minimal table: modules, heads, form, the form's non-default keys, policy."""
    out: Dict[str, Any] = {}
    if rule.modules != "*":
        out["modules"] = rule.modules
    if rule.heads is not None:
        out["heads"] = list(rule.heads)
    entry = entry_for(rule.kind, rule.form)
    out["form"] = entry.name
    out.update(entry.dump(rule.form))
    if rule.policy is not None:
        out["policy"] = rule.policy
    if rule.phase != "both":
        out["phase"] = rule.phase
    return out


def spec_to_dict(spec: Any) -> Dict[str, Any]:
    """The whole spec as plain v1 data that :func:`sparsecc.spec.load_spec` turns back into an equal Spec."""
    out: Dict[str, Any] = {"version": spec.version}
    defaults: Dict[str, Any] = {}
    if spec.defaults.policy != DEFAULT_POLICY:
        defaults["policy"] = spec.defaults.policy
    if spec.defaults.margin != DEFAULT_MARGIN:
        defaults["margin"] = spec.defaults.margin
    if defaults:
        out["defaults"] = defaults
    for kind in KINDS:
        rules = spec.rules(kind)
        if rules:
            out[kind] = [rule_to_dict(rule) for rule in rules]
    if spec.meta:
        out["meta"] = thaw(spec.meta)
    return out


# ---------------------------------------------------------------------------------------
# TOML
# ---------------------------------------------------------------------------------------

def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_path(path: Tuple[str, ...]) -> str:
    return ".".join(_toml_key(k) for k in path)


def _toml_value(value: Any) -> str:
    """A value written on one line (inline tables must be one line in TOML 1.0)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r}: specs hold finite numbers only")
        return repr(value)  # repr is the shortest exact form, and valid TOML (1.0, 1e-05)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} values to TOML")


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, Mapping) for v in value))


def _write_table(lines: List[str], path: Tuple[str, ...], table: Mapping[str, Any]) -> None:
    """Write a table body: plain keys first (TOML requires them before any sub-table), then sub-tables in order."""
    for key, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines.extend(["", f"[{_toml_path(path + (key,))}]"])
            _write_table(lines, path + (key,), value)
        elif _is_table_array(value):
            for item in value:
                lines.extend(["", f"[[{_toml_path(path + (key,))}]]"])
                # Entries of an array of tables are written flat, with inline nested tables:
                # rules read best that way ({input = 0.1, down = 0.2}).
                lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items())


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Plain data (as from ``Spec.to_dict``) as TOML text that ``tomllib`` reads back to equal data."""
    lines: List[str] = []
    _write_table(lines, (), data)
    return "\n".join(lines).lstrip("\n") + "\n"


def dumps_json(data: Mapping[str, Any]) -> str:
    """Plain data as indented JSON."""
    return json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _spec_file_name(path: Any) -> str:
    """``path`` as a str when its suffix names a spec format; else SpecError."""
    try:
        name = os.fsdecode(os.fspath(path))
    except TypeError:
        raise SpecError(file=None, key="path", value=path, allowed="a str or os.PathLike") from None
    suffix = Path(name).suffix.lower()
    if suffix not in SUFFIXES:
        raise SpecError(f"cannot be saved: the suffix {suffix or '(none)'!r} is not known",
                        file=name, value=suffix, allowed=" or ".join(SUFFIXES))
    return name


def check_spec_path(path: Any) -> str:
    """``path`` as a str when a spec can be saved there (a known suffix, an existing folder); else SpecError.

    Callers that run for long before saving (``sparsecc.tune``) check their output path first with it.
    """
    name = _spec_file_name(path)
    folder = os.path.dirname(name) or "."
    if not os.path.isdir(folder):
        raise SpecError(f"cannot be saved: the folder {folder!r} does not exist", file=name,
                        allowed="a path in an existing folder")
    return name


def save_spec(spec: Any, path: Any) -> None:
    """Write ``spec`` to ``path`` as TOML or JSON, chosen by the suffix."""
    name = _spec_file_name(path)
    suffix = Path(name).suffix.lower()
    data = spec_to_dict(spec)
    text = dumps_toml(data) if suffix == ".toml" else dumps_json(data)
    # A regular file only: opening a FIFO for writing would block until a reader came.
    write_regular(name, text.encode("utf-8"))
