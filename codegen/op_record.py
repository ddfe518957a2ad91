"""One declarative record per ``torch.ops.sparsecc`` op.

An :class:`OpRecord` says everything about one op in one place, and lives in
the file of the op's kernel:

* ``name`` and the typed argument dataclass ``args`` (its fields are the op's
  non-tensor arguments), plus the tensor inputs, in schema order;
* ``body``: the real implementation, which dispatches on the device, the
  input and the ``impl`` argument the compiler baked in;
* ``reference``: the pure-PyTorch semantics (the CPU path and the test
  oracle's neighbour);
* ``fake``: the output's shape and dtype, for tracing;
* ``kernel``: where the Triton kernel wrapper lives, loaded on first use (so
  importing sparsecc never imports Triton), and the device types it serves;
* ``kernel_check``: why the kernel cannot take some inputs (a reason, or None);
* ``always_opaque``: why the op is never traced into Inductor's graph (a
  reason), or None; then ``opaque_reason(args, device, symbolic)`` says, per
  call, why that one call must stay an opaque op (a reason, or None). It sees
  only what the compiler knows before tracing (the typed arguments, the device,
  whether a shape is symbolic), so the plan the report shows is the one that runs.

**How a call runs.** Eagerly the op is a ``torch.library`` op with one
``CompositeExplicitAutograd`` kernel, ``body``. Under ``torch.compile`` the
record's op is *decomposed* while AOTAutograd functionalizes the graph: the
body runs on fake tensors, its kernel wrappers launch through
:func:`torch.library.wrap_triton` (:mod:`sparsecc.codegen.launch`), and
Inductor emits those launches in its own generated code, beside its own
kernels, with no Python dispatch per call and inside its CUDA graphs. A call
whose ``opaque_reason`` is not None (a host-side decision that depends on
device values, or a runtime branch on a symbolic length) stays one opaque op
that Inductor calls through the dispatcher: same numbers, more host time.

Rewrites emit through the record (:meth:`OpRecord.emit`) with a typed
argument object; nobody packs positional arguments by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["NAMESPACE", "IMPL_CHOICES", "TensorInput", "OpRecord", "check_impl", "pick", "no_kernel_reason"]

NAMESPACE = "sparsecc"
IMPL_CHOICES = ("auto", "triton", "reference")

# Schema types of the argument dataclasses' field annotations (written as strings by
# ``from __future__ import annotations``, so they are matched as written).
_SCHEMA_TYPES = {"float": "float", "int": "int", "bool": "bool", "str": "str", "Tuple[int, ...]": "int[]"}


def check_impl(op: str, impl: str) -> None:
    """Raise a ValueError naming the allowed values when ``impl`` is not one of :data:`IMPL_CHOICES`."""
    if impl not in IMPL_CHOICES:
        raise ValueError(f"sparsecc op {op}: impl={impl!r} is not one of {IMPL_CHOICES}")


@dataclass(frozen=True)
class TensorInput:
    """One tensor input of an op: its name, and whether it may be None."""

    name: str
    optional: bool = False

    def schema(self) -> str:
        """This input in a ``torch.library`` schema (``Tensor q`` or ``Tensor? mask``)."""
        return f"Tensor{'?' if self.optional else ''} {self.name}"


@dataclass(frozen=True)
class OpRecord:
    """The one definition of a ``torch.ops.sparsecc`` op (see the module notes)."""

    name: str
    tensors: Tuple[TensorInput, ...]
    args: type
    body: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    fake: Callable[..., torch.Tensor]
    kernel: Optional[str] = None           # "module:function" of the kernel wrapper (same arguments as body)
    devices: Tuple[str, ...] = ("cuda",)   # device types the kernel serves
    kernel_check: Optional[Callable[..., Optional[str]]] = None
    always_opaque: Optional[str] = None
    opaque_reason: Optional[Callable[[Any, torch.device, bool], Optional[str]]] = None
    order: Optional[Tuple[str, ...]] = None  # schema order when tensors and arguments interleave
    doc: str = ""

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.args):
            raise TypeError(f"OpRecord {self.name}: args must be a dataclass, got {self.args!r}")
        for f in fields(self.args):
            if f.type not in _SCHEMA_TYPES:
                raise TypeError(f"OpRecord {self.name}: field {f.name} has type {f.type!r}; "
                                f"allowed: {sorted(_SCHEMA_TYPES)}")
        names = self.param_names()
        known = {t.name for t in self.tensors} | {f.name for f in fields(self.args)}
        if sorted(names) != sorted(known):
            raise TypeError(f"OpRecord {self.name}: order {names} must list each tensor and field once")

    # ------------------------------------------------------------ schema

    def param_names(self) -> Tuple[str, ...]:
        """Every argument's name in schema order (tensors first unless ``order`` interleaves them)."""
        if self.order is not None:
            return self.order
        return tuple(t.name for t in self.tensors) + tuple(f.name for f in fields(self.args))

    def schema(self) -> str:
        """The op's ``torch.library`` schema, without its name (``(Tensor q, ...) -> Tensor``)."""
        tensors = {t.name: t for t in self.tensors}
        arg_fields = {f.name: f for f in fields(self.args)}
        parts = []
        for name in self.param_names():
            if name in tensors:
                text = tensors[name].schema() + ("=None" if name in self.defaults else "")
            else:
                f = arg_fields[name]
                text = f"{_SCHEMA_TYPES[f.type]} {name}"
                if name in self.defaults:
                    text += "=" + _schema_default(f.default)
            parts.append(text)
        return "(" + ", ".join(parts) + ") -> Tensor"

    @property
    def qualname(self) -> str:
        """``sparsecc::<name>``."""
        return f"{NAMESPACE}::{self.name}"

    def flatten(self, tensors: Mapping[str, Any], args: Any) -> tuple:
        """The positional arguments of one call: ``tensors`` by name and the fields of ``args``, in schema order."""
        if not isinstance(args, self.args):
            raise TypeError(f"sparsecc op {self.name}: args must be a {self.args.__name__}, got {type(args).__name__}")
        expected = {t.name for t in self.tensors}
        unknown = set(tensors) - expected
        if unknown:
            raise TypeError(f"sparsecc op {self.name}: unknown tensor inputs {sorted(unknown)}; "
                            f"expected {sorted(expected)}")
        missing = [t.name for t in self.tensors if not t.optional and tensors.get(t.name) is None]
        if missing:
            raise TypeError(f"sparsecc op {self.name}: missing tensor inputs {missing}")
        values = {f.name: _schema_value(getattr(args, f.name)) for f in fields(self.args)}
        values.update({t.name: tensors.get(t.name) for t in self.tensors})
        return tuple(values[name] for name in self.param_names())

    def unflatten(self, flat: Sequence[Any]) -> Tuple[Dict[str, Any], Any]:
        """(tensors by name, args object) of positional arguments in schema order (defaults filled in)."""
        names = self.param_names()
        values = dict(zip(names, flat))
        tensor_names = {t.name for t in self.tensors}
        tensors = {name: values.get(name) for name in tensor_names}
        kwargs = {name: _from_schema(values[name]) for name in names if name not in tensor_names and name in values}
        return tensors, self.args(**kwargs)

    # ------------------------------------------------------------ calls

    def run(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``body`` on a dispatcher call's arguments, the omitted ones filled with their defaults."""
        return self.body(*self.complete(args, kwargs))

    def complete(self, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
        """Positional arguments in schema order: ``args``, then ``kwargs`` or the defaults."""
        names = self.param_names()
        if len(args) == len(names):
            return tuple(args)
        flat = list(args)
        for name in names[len(args):]:
            if name in kwargs:
                flat.append(kwargs[name])
            elif name in self.defaults:
                flat.append(self.defaults[name])
            else:
                raise TypeError(f"sparsecc op {self.name}: missing argument {name}")
        return tuple(flat)

    def op(self):
        """The registered ``torch.ops.sparsecc.<name>.default`` overload (registers the ops on first use)."""
        from sparsecc.codegen.ops import register_ops
        register_ops()
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    def __call__(self, args: Any, **tensors: Any) -> torch.Tensor:
        """Call the registered op on real tensors: ``record(Args(...), q=q, k=k, ...)``."""
        return self.op()(*self.flatten(tensors, args))

    def emit(self, graph: torch.fx.Graph, args: Any, **tensors: Any) -> torch.fx.Node:
        """Insert one call of this op into ``graph`` (at its current insertion point) and return its node.

        Trailing arguments equal to their defaults are left out, so a call reads as short as it can.
        """
        flat = list(self.flatten(tensors, args))
        names, defaults = self.param_names(), self.defaults
        while flat and names[len(flat) - 1] in defaults and _same(flat[-1], defaults[names[len(flat) - 1]]):
            flat.pop()
        return graph.call_function(self.op(), tuple(flat))

    def arguments(self, node: torch.fx.Node) -> Dict[str, Any]:
        """Every argument of an emitted call ``node`` by name, defaults filled in (what a reader of a graph needs)."""
        return dict(zip(self.param_names(), self.complete(tuple(node.args), dict(node.kwargs))))

    @functools.cached_property
    def defaults(self) -> Dict[str, Any]:
        """The schema's defaults by parameter name, as the op takes them: each argument field's default, and None
        for an optional tensor in the trailing run of defaulted parameters (a schema default may not precede a
        parameter without one). Computed once per record; the schema, ``complete`` and ``emit`` all read it."""
        defaults = {f.name: _schema_value(f.default) for f in fields(self.args) if f.default is not dataclasses.MISSING}
        optional = {t.name for t in self.tensors if t.optional}
        for name in reversed(self.param_names()):
            if name in optional:
                defaults[name] = None
            elif name not in defaults:
                break
        return defaults

    def kernel_function(self, device: torch.device) -> Optional[Callable]:
        """The kernel wrapper for ``device``, or None (no kernel for this device type, or Triton missing)."""
        if self.kernel is None or device.type not in self.devices:
            return None
        module, _, attr = self.kernel.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError:
            return None

    def decompose(self, mode, func, types, args, kwargs):
        """The op under AOTAutograd's functionalization: run ``body`` inside the mode (Inductor sees its
        kernels and ops), unless ``opaque_reason`` names a reason to keep this call one opaque op."""
        from torch._subclasses.fake_tensor import FakeTensor
        from torch._subclasses.functional_tensor import FunctionalTensor

        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented
        flat = self.complete(args, kwargs)
        tensors, typed = self.unflatten(flat)
        present = [t for t in tensors.values() if isinstance(t, torch.Tensor)]
        symbolic = any(not isinstance(d, int) for t in present for d in t.shape)
        if self.launch_mode(typed, present[0].device, symbolic)[0] == "opaque":
            return mode.__torch_dispatch__(func, types, args, kwargs)
        with mode:
            return self.body(*flat)

    def launch_mode(self, args: Any, device: torch.device, symbolic: bool) -> Tuple[str, str]:
        """("inductor", "") when a call with ``args`` on ``device`` is traced into Inductor's graph, else
        ("opaque", reason). ``symbolic``: some input shape is symbolic (dynamic shapes). The compiler's plan
        stage shows this in the report for each op it emits; the decomposition obeys the same answer."""
        if self.always_opaque is not None:
            return "opaque", self.always_opaque
        reason = self.opaque_reason(args, device, symbolic) if self.opaque_reason is not None else None
        return ("opaque", reason) if reason is not None else ("inductor", "")


def pick(record: OpRecord, impl: str, device: torch.device, reference: Callable) -> Callable:
    """The implementation ``impl`` selects for ``device``, wrapped to return a contiguous tensor.

    ``"reference"`` runs ``reference``; ``"triton"`` the record's kernel (an error when there is none for the
    device); ``"auto"`` the kernel where one exists, else ``reference``. Every op's fake implementation
    promises a contiguous result (Inductor asserts the strides); a kernel may write a transposed layout, so
    the contract is enforced here, once, for every op and implementation.
    """
    check_impl(record.name, impl)
    fn = reference
    if impl != "reference":
        kernel = record.kernel_function(device)
        if kernel is not None:
            fn = kernel
        elif impl == "triton":
            raise RuntimeError(f"sparsecc op {record.name}: kernels='triton' but no Triton kernel exists for "
                               f"{device.type}")
    return lambda *args, **kwargs: fn(*args, **kwargs).contiguous()


def no_kernel_reason(record: OpRecord, impl: str, device: torch.device) -> Optional[str]:
    """Why a call on ``device`` with ``impl`` runs no kernel (so it stays one opaque reference op), or None."""
    if impl == "reference":
        return "kernels='reference': the reference runs as one op"
    if record.kernel_function(device) is None:
        return f"no Triton kernel for {device.type}: the reference runs as one op"
    return None


def _schema_default(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return repr(value)


def _same(value: Any, default: Any) -> bool:
    """``value`` is the default (identity for None, equality for plain values; never for a graph node)."""
    if default is None or value is None:
        return value is default
    return not isinstance(value, torch.fx.Node) and type(value) is type(default) and value == default


def _schema_value(value: Any) -> Any:
    """A field value as the op takes it (tuples travel as lists: ``int[]``)."""
    return list(value) if isinstance(value, tuple) else value


def _from_schema(value: Any) -> Any:
    """A schema value as the dataclass field holds it (lists become tuples, so args objects hash)."""
    return tuple(value) if isinstance(value, list) else value
