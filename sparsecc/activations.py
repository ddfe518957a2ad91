"""The activation table: every activation sparsecc knows, each defined once.

One :class:`Activation` per name holds all the compiler needs about it:

* ``name``        what sites record (``activation``), epilogue chains say (``act:<name>``) and the ops take
  (``act=`` / ``activation=``);
* ``definition``  one line, for the docs and the error messages;
* ``torch``       the reference: a PyTorch function of one tensor. It is the ops' CPU path, the oracle the
  kernels are tested against, and what a probed FX subgraph is compared with;
* ``inplace``     the same, computed in place where PyTorch has an in-place form (None where it has not);
* ``triton``      Triton source lines computing it on a float32 variable ``v``, reading only ``tl`` and inlined
  literals; ``codegen/epilogue.py`` generates them into the linear kernels' epilogues and into the gate
  kernel's activation switch;
* the FX spellings the passes match, as Dynamo records them: ``functions`` (``call_function`` targets) and
  ``methods`` (``call_method`` names), with the ``fixed`` non-tensor arguments those calls must have
  (``approximate``); ``modules``, constructors of the ``nn.Module`` s that spell it (Dynamo inlines them into
  those calls, so the passes never see them; the tests check each one); ``squares``, the activation this one
  is when followed by a square (``relu2`` is ``relu`` then ``** 2`` / ``square`` / ``pow(., 2)``).

Hand-written forms (``x * sigmoid(x)``, GPT-2's tanh GELU, ``0.5 x (1 + erf(x / sqrt 2))``, ...) have no
entries: the passes evaluate a pointwise subgraph on :func:`probe` and name it with :func:`named_by_probe`,
which compares the result with each reference.

Readers: ``codegen/activation_sparse.py`` (``ACTIVATIONS``, a view), ``codegen/epilogue.py`` (``EPILOGUES``,
``activation_ref``, generated sources), ``codegen/gate_sparse_ffn.py`` (the generated switch),
``codegen/semi_structured_linear.py`` (``inplace``), ``passes/normalize.py`` (the pointwise calls),
``passes/epilogue.py`` (:func:`spelled_by`, :func:`is_square`, :func:`squared`) and ``passes/ffn.py``
(:func:`named_by_probe`). A core module: it imports torch only.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "Argument", "ACTIVATION_TABLE", "BY_NAME", "activation", "spelled_by", "is_square",
           "squared", "FX_FUNCTIONS", "FX_METHODS", "probe", "named_by_probe", "PROBE_TOLERANCE"]


class Argument(NamedTuple):
    """A keyword argument a spelling's call must have: ``name`` = ``value`` (``default`` when the call leaves it out)."""

    name: str
    value: Any
    default: Any


@dataclass(frozen=True)
class Activation:
    """One activation: its name, definition, references, Triton lines and FX spellings (see the module notes)."""

    name: str
    definition: str
    torch: Callable[[Tensor], Tensor]
    triton: Tuple[str, ...]
    functions: Tuple[Callable, ...] = ()
    methods: Tuple[str, ...] = ()
    fixed: Tuple[Argument, ...] = ()
    modules: Tuple[Callable[[], nn.Module], ...] = ()
    squares: Optional[str] = None
    inplace: Optional[Callable[[Tensor], Tensor]] = None

    def spelled_by(self, kind: str, target, args: tuple, kwargs: Mapping) -> bool:
        """True when one FX call (``kind`` ``call_function`` / ``call_method``) applies this activation to ``args[0]``."""
        if kind == "call_function":
            hit = any(target is fn for fn in self.functions)
        elif kind == "call_method":
            hit = target in self.methods
        else:
            return False
        return hit and all(_argument(kwargs, a) == a.value for a in self.fixed)


def _argument(kwargs: Mapping, arg: Argument):
    return kwargs.get(arg.name, arg.default)


def _gelu_tanh(v: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2, Gemma)."""
    return F.gelu(v, approximate="tanh")


def _relu2(v: Tensor) -> Tensor:
    """Squared ReLU (Primer, Nemotron)."""
    return torch.relu(v).square()


def _relu_(v: Tensor) -> Tensor:
    return v.relu_()


def _relu2_(v: Tensor) -> Tensor:
    return v.relu_().square_()


def _silu_(v: Tensor) -> Tensor:
    return F.silu(v, inplace=True)


# Literals of the Triton lines, inlined: a generated function reads no globals but tl.
_INV_SQRT2 = 1.0 / math.sqrt(2.0)           # exact GELU: 0.5 v (1 + erf(v / sqrt 2))
_GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)  # tanh GELU: tanh(sqrt(2/pi) (v + 0.044715 v^3))
_GELU_TANH_CUBIC = 0.044715                  # its cubic coefficient (Hendrycks & Gimpel)
_APPROXIMATE = "approximate"                 # F.gelu's keyword-only argument, "none" when left out

ACTIVATION_TABLE: Tuple[Activation, ...] = (
    Activation(
        "gelu", "0.5 v (1 + erf(v / sqrt 2)) (exact GELU)", F.gelu,
        (f"v = 0.5 * v * (1.0 + tl.math.erf(v * {_INV_SQRT2!r}))",),
        functions=(F.gelu,), fixed=(Argument(_APPROXIMATE, "none", "none"),), modules=(nn.GELU,)),
    Activation(
        "gelu_tanh", "0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))) (tanh GELU)", _gelu_tanh,
        # 0.5 (1 + tanh(u)) == sigmoid(2u): one exp instead of a tanh, which Triton 3.6 lacks in tl.math.
        (f"v = v * tl.sigmoid(2.0 * {_GELU_TANH_SCALE!r} * (v + {_GELU_TANH_CUBIC!r} * v * v * v))",),
        functions=(F.gelu,), fixed=(Argument(_APPROXIMATE, "tanh", "none"),),
        modules=(functools.partial(nn.GELU, approximate="tanh"),)),
    Activation(
        "relu", "max(v, 0)", torch.relu, ("v = tl.maximum(v, 0.0)",),
        functions=(F.relu, torch.relu), methods=("relu",), modules=(nn.ReLU,), inplace=_relu_),
    Activation(
        "relu2", "max(v, 0)^2 (squared ReLU)", _relu2, ("v = tl.maximum(v, 0.0)", "v = v * v"),
        squares="relu", inplace=_relu2_),
    Activation(
        "silu", "v sigmoid(v) (SiLU, swish)", F.silu, ("v = v * tl.sigmoid(v)",),
        functions=(F.silu,), modules=(nn.SiLU,), inplace=_silu_),
)
"""Every activation, in name order (the order :func:`named_by_probe` tries them)."""

BY_NAME: Mapping[str, Activation] = MappingProxyType({a.name: a for a in ACTIVATION_TABLE})
"""The table by name."""


def activation(name: str) -> Activation:
    """The table's entry for ``name``; ``ValueError`` listing the names when there is none."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(BY_NAME)}") from None


def spelled_by(kind: str, target, args: tuple, kwargs: Mapping) -> Optional[str]:
    """The activation one FX call applies to ``args[0]``, or None (the caller checks that it is the only tensor)."""
    return next((a.name for a in ACTIVATION_TABLE if a.spelled_by(kind, target, args, kwargs)), None)


# The square step of ``squares`` entries: square(v), v ** 2, pow(v, 2).
_SQUARE_FUNCTIONS = (torch.square,)
_SQUARE_METHODS = ("square",)
_POWER_FUNCTIONS = (torch.pow, operator.pow)
_POWER_METHODS = ("pow", "__pow__")
_SQUARE_EXPONENTS = (2, 2.0)


def is_square(kind: str, target, args: tuple) -> bool:
    """True when one FX call squares ``args[0]`` (``square``, ``** 2``, ``pow(., 2)``; the caller checks ``args[0]``)."""
    square = target in _SQUARE_METHODS if kind == "call_method" else any(target is f for f in _SQUARE_FUNCTIONS)
    power = target in _POWER_METHODS if kind == "call_method" else any(target is f for f in _POWER_FUNCTIONS)
    if square:
        return len(args) == 1
    return power and len(args) == 2 and args[1] in _SQUARE_EXPONENTS


def squared(name: str) -> Optional[str]:
    """The activation that ``name`` followed by a square is (``relu`` -> ``relu2``), or None."""
    return next((a.name for a in ACTIVATION_TABLE if a.squares == name), None)


FX_FUNCTIONS: frozenset = frozenset(
    [f for a in ACTIVATION_TABLE for f in a.functions] + list(_SQUARE_FUNCTIONS + _POWER_FUNCTIONS))
"""Every ``call_function`` target the table spells an activation (or its square step) with."""

FX_METHODS: frozenset = frozenset([m for a in ACTIVATION_TABLE for m in a.methods] +
                                  list(_SQUARE_METHODS + _POWER_METHODS))
"""Every ``call_method`` name the table spells an activation (or its square step) with."""

# Probe points: dense enough on [-6, 6] to tell GELU from tanh GELU (they differ by ~1e-3), and a few far points,
# where every activation of the table is ~0 or ~v, so that a clamp (relu6 equals relu on [-6, 6]) is not named.
_FAR = torch.tensor([8.0, 12.0, 20.0, 50.0, 100.0], dtype=torch.float64)
_PROBE = torch.cat([-_FAR.flip(0), torch.linspace(-6.0, 6.0, 241, dtype=torch.float64), _FAR])
PROBE_TOLERANCE = 1e-6
"""Absolute and relative tolerance of :func:`named_by_probe`."""


def probe() -> Tensor:
    """A fresh float64 copy of the probe points (a subgraph may write into its input)."""
    return _PROBE.clone()


def named_by_probe(values) -> Optional[str]:
    """The activation whose reference gives ``values`` on :func:`probe`'s points, or None."""
    if not isinstance(values, Tensor) or values.shape != _PROBE.shape:
        return None
    for act in ACTIVATION_TABLE:
        if torch.allclose(values.double(), act.torch(probe()).double(), atol=PROBE_TOLERANCE, rtol=PROBE_TOLERANCE):
            return act.name
    return None
