"""Shared plumbing of the importers: reading a source file, option checks, rule grouping, provenance."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from sparsecc.spec import SpecError, load_spec
from sparsecc.spec.locate import DuplicateKey, line_at, parse_json
from sparsecc.spec.schema import POLICIES, Spec, check_glob
from sparsecc.tune.provenance import library_versions

# HF Llama, Mistral, Qwen2/3 and most decoder-only families name their attention this way;
# the path is relative to the module that is compiled (a *ForCausalLM here).
DEFAULT_ATTENTION_TEMPLATE = "model.layers.{layer}.self_attn"


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
        """The ``[meta.import]`` table: what was imported, from which bytes, when, how and with which libraries."""
        return {"import": {
            "format": fmt,
            "file": Path(self.name).name,
            "sha256": self.sha256,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "options": {k: v for k, v in options.items() if v is not None},
            "versions": library_versions(),
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
