"""The one table that ties each spec ``form`` string to its dataclass, its keys, its builder and its dumper.

The loader and the writer both dispatch through :data:`FORMS`, so a form is described in
exactly one place: adding a form means adding one :class:`FormEntry` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Tuple

from sparsecc.forms import (FORMS_BY_KIND, THRESHOLD_KEYS, ActivationThreshold, BlockSparse, BlockTopK,
                            BlockWeights, Dense, Form, Streaming, TwoFour, VerticalSlash)

KINDS: Tuple[str, ...] = tuple(FORMS_BY_KIND)
POLICIES: Tuple[str, ...] = ("auto", "force", "off")
# Where an attention rule applies: prefill (more than one query), decode (one query) or both (docs/spec.md).
PHASES: Tuple[str, ...] = ("both", "prefill", "decode")

# Keys every rule of a kind may carry, whatever its form (in the order the writer emits them).
COMMON_KEYS: Dict[str, Tuple[str, ...]] = {
    "attention": ("modules", "heads", "form", "policy", "phase"),
    "ffn": ("modules", "form", "policy"),
    "linear": ("modules", "form", "policy"),
}


@dataclass(frozen=True)
class FormEntry:
    """How one form is spelled in a spec.

    Attributes:
        kind: the site kind that may use it ("attention", "ffn", "linear").
        name: the ``form`` string in the spec, equal to the dataclass's ``name``.
        cls: the form dataclass from :mod:`sparsecc.forms`.
        keys: the form's own keys (besides the common ones), in writing order.
        required: the subset of ``keys`` that must be present.
        build: turns the form's raw keys into the dataclass; raises the form's ``ValueError``.
        dump: turns the dataclass back into its minimal raw keys.
    """

    kind: str
    name: str
    cls: type
    keys: Tuple[str, ...]
    required: Tuple[str, ...]
    build: Callable[[Mapping[str, Any]], Form]
    dump: Callable[[Any], Dict[str, Any]]


def as_float(value: Any) -> Any:
    """Ints become floats (``density = 1`` is fine); anything else is passed on for the form to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            # Too large for a float: infinity is rejected by every form with its own message.
            return math.inf
    return value


def _defaults(cls: type) -> Dict[str, Any]:
    """The dataclass defaults of a form's init fields, so the writer can omit them."""
    return {f.name: f.default for f in fields(cls) if f.init}


def _non_default(form: Any, keys: Tuple[str, ...]) -> Dict[str, Any]:
    defaults = _defaults(type(form))
    return {k: getattr(form, k) for k in keys if getattr(form, k) != defaults.get(k)}


def _build_block_sparse(raw: Mapping[str, Any]) -> BlockSparse:
    return BlockSparse(**dict(raw))


def _build_block_topk(raw: Mapping[str, Any]) -> BlockTopK:
    kwargs = dict(raw)
    for key in ("cdf", "min_mass"):
        if key in kwargs:
            kwargs[key] = as_float(kwargs[key])
    return BlockTopK(**kwargs)


BLOCK_TOPK_KEYS = ("block", "topk", "cdf", "min_mass", "sink_blocks", "local_blocks", "pool", "rows")
VERTICAL_SLASH_KEYS = ("last_q", "vertical", "slash", "block")


def _build_threshold(raw: Mapping[str, Any]) -> ActivationThreshold:
    threshold = raw.get("threshold")
    if isinstance(threshold, Mapping):
        threshold = {k: as_float(v) for k, v in threshold.items()}
    else:
        threshold = as_float(threshold)
    return ActivationThreshold.from_value(raw.get("mode", "input"), threshold,
                                          as_float(raw.get("sparsity")),
                                          raw.get("criterion", "magnitude"))


def _dump_threshold(form: ActivationThreshold) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if form.mode != "input":
        out["mode"] = form.mode
    if form.thresholds:
        taus = {tau for _, tau in form.thresholds}
        # A single number means "every projection of the mode"; write it so only when the
        # form is exactly what that number builds, so that loading it back gives an equal form.
        if len(taus) == 1:
            scalar = next(iter(taus))
            if ActivationThreshold.from_value(form.mode, scalar, form.sparsity, form.criterion) == form:
                out["threshold"] = scalar
        if "threshold" not in out:
            out["threshold"] = dict(form.thresholds)
    if form.sparsity is not None:
        out["sparsity"] = form.sparsity
    if form.criterion != "magnitude":
        out["criterion"] = form.criterion
    return out


def _build_block_weights(raw: Mapping[str, Any]) -> BlockWeights:
    kwargs = dict(raw)
    if isinstance(kwargs.get("block"), (list, tuple)):
        kwargs["block"] = tuple(kwargs["block"])
    if "density" in kwargs:
        kwargs["density"] = as_float(kwargs["density"])
    return BlockWeights(**kwargs)


def _dump_block_weights(form: BlockWeights) -> Dict[str, Any]:
    out = _non_default(form, ("block", "density", "prune"))
    if "block" in out:
        out["block"] = list(out["block"])
    return out


_ENTRIES = (
    FormEntry("attention", "dense", Dense, (), (), lambda raw: Dense(), lambda form: {}),
    FormEntry("attention", "streaming", Streaming, ("sink", "window"), ("sink", "window"),
              lambda raw: Streaming(raw["sink"], raw["window"]),
              lambda form: {"sink": form.sink, "window": form.window}),
    FormEntry("attention", "block_sparse", BlockSparse,
              ("block", "local_blocks", "global_blocks", "random_blocks", "seed"), (),
              _build_block_sparse,
              lambda form: _non_default(form, ("block", "local_blocks", "global_blocks",
                                               "random_blocks", "seed"))),
    FormEntry("attention", "block_topk", BlockTopK, BLOCK_TOPK_KEYS, (), _build_block_topk,
              lambda form: _non_default(form, BLOCK_TOPK_KEYS)),
    FormEntry("attention", "vertical_slash", VerticalSlash, VERTICAL_SLASH_KEYS, ("last_q", "vertical", "slash"),
              lambda raw: VerticalSlash(**dict(raw)),
              lambda form: {"last_q": form.last_q, "vertical": form.vertical, "slash": form.slash,
                            **_non_default(form, ("block",))}),
    FormEntry("ffn", "dense", Dense, (), (), lambda raw: Dense(), lambda form: {}),
    FormEntry("ffn", "activation_threshold", ActivationThreshold,
              ("mode", "threshold", "sparsity", "criterion"), (),
              _build_threshold, _dump_threshold),
    FormEntry("linear", "dense", Dense, (), (), lambda raw: Dense(), lambda form: {}),
    FormEntry("linear", "2:4", TwoFour, ("prune",), (),
              lambda raw: TwoFour(**dict(raw)), lambda form: _non_default(form, ("prune",))),
    FormEntry("linear", "block_weights", BlockWeights, ("block", "density", "prune"), (),
              _build_block_weights, _dump_block_weights),
)

# FORMS[kind][form name] -> FormEntry
FORMS: Dict[str, Dict[str, FormEntry]] = {
    kind: {e.name: e for e in _ENTRIES if e.kind == kind} for kind in KINDS
}

if any(tuple(FORMS[kind]) != FORMS_BY_KIND[kind] for kind in KINDS):
    # Fail at import rather than let a new form be silently unloadable.
    raise ImportError("sparsecc.spec.registry is out of step with sparsecc.forms.FORMS_BY_KIND")

# The projections a threshold table may name, per mode (re-exported for the loader and docs).
THRESHOLD_TABLE_KEYS = THRESHOLD_KEYS


def entry_for(kind: str, form: Any) -> FormEntry:
    """The entry of a form instance used at a site of ``kind``; KeyError when that kind cannot use it."""
    entry = FORMS[kind][form.name]
    if not isinstance(form, entry.cls):
        raise KeyError(form.name)
    return entry
