"""Generated epilogues for the linear kernels, and the lazy Triton binding they share.

Notation: a kernel accumulates ``acc = x @ Wᵀ`` in float32; the epilogue then
applies a short chain of pointwise steps to the tile and the kernel casts once
to the output dtype.

**Chains.** :class:`EpilogueChain` is the description the compiler builds when
it folds the pointwise nodes after a linear (``passes/epilogue.py``) and the
``sparsecc::block_sparse_linear`` op carries as a string: ordered
:class:`EpilogueStep` s, each one of

* ``bias``          add the bias vector ``[N]`` (broadcast over rows);
* ``act:<name>``    an activation of ``sparsecc.activations`` (gelu, gelu_tanh, relu, relu2, silu);
* ``mul:gate``      multiply by an extra ``[M, N]`` tensor (e.g. the up projection's output);
* ``mul:up``        multiply by a second accumulator ``x W_upᵀ`` of the same kernel (fused gate/up);
* ``add:residual``  add an extra ``[M, N]`` tensor (a residual stream);
* ``cast:<dtype>``  the result's dtype (float16, bfloat16, float32); only as the last step.

Each extra input appears at most once. The string form joins the steps with
``;`` (``"bias;act:silu;mul:gate"``); the empty string is the empty chain.

**Generation.** :func:`epilogue_source` writes a ``@triton.jit`` function for
a chain; :func:`epilogue_function` loads it. An ``act`` step's lines are the
table's (``Activation.triton``), and so are those of the activation switch
(:func:`activation_switch`) that kernels branching on an activation constexpr
call, so every kernel computes an activation with the same code. Generated modules are cached by a
hash of their source, in memory and on disk (``<cache dir>/epilogues``, the
user cache directory of :func:`sparsecc.cache.cache_dir`, so
``$SPARSECC_CACHE_DIR`` moves it). Triton reads a kernel's source through
``inspect``, so a generated function must live in a real file: the disk cache
is also where it is imported from. With ``$SPARSECC_DEBUG_DIR`` set, each
source is dumped there too. The kernel receives the function as a constexpr
argument, so Triton compiles one specialisation per chain.

**Lazy Triton.** ``import sparsecc`` must neither import Triton nor compile
anything, and ``TRITON_INTERPRET`` is read by Triton when a function is
decorated. So kernel functions are written as plain module-level functions
(their ``tl.constexpr`` annotations stay strings thanks to
``from __future__ import annotations``), and :func:`bind_triton` turns them into
Triton JIT functions in place, on first use. Generated modules import Triton
when they are loaded, which is also at first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch
from torch import Tensor

from sparsecc.activations import ACTIVATION_TABLE, BY_NAME

__all__ = ["EPILOGUES", "check_activation", "activation_ref", "bind_triton", "EpilogueStep", "EpilogueChain",
           "CAST_DTYPES", "epilogue_source", "epilogue_function", "epilogue_cache_dir", "activation_switch_source",
           "activation_switch"]

EPILOGUES: Mapping[str, str] = MappingProxyType(
    {"none": "identity", **{act.name: act.definition for act in ACTIVATION_TABLE}})
"""Epilogue activations by name, with their definitions: ``none`` and the names of ``sparsecc.activations``
(a read-only view of its table)."""

CAST_DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                                       "float32": torch.float32}
"""Dtypes a ``cast`` step may produce (the kernel stores them directly)."""

# Where each step kind's extra input comes from, and the arguments each kind accepts.
_STEP_ARGS = {"bias": ("",), "act": tuple(n for n in EPILOGUES if n != "none"), "mul": ("gate", "up"),
              "add": ("residual",), "cast": tuple(CAST_DTYPES)}

DEBUG_DIR_ENV = "SPARSECC_DEBUG_DIR"  # the variable sparsecc.pipeline dumps stage graphs to
CACHE_SUBDIR = "epilogues"


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known epilogue, else raise ``ValueError`` listing the choices."""
    if name not in EPILOGUES:
        raise ValueError(f"activation={name!r} is not a fused epilogue; expected one of {sorted(EPILOGUES)}")
    return name


def _identity(v: Tensor) -> Tensor:
    return v


def activation_ref(name: str) -> Callable[[Tensor], Tensor]:
    """The PyTorch function an epilogue name stands for: the table's reference (the oracle in tests)."""
    check_activation(name)
    return _identity if name == "none" else BY_NAME[name].torch


# ------------------------------------------------------------------ chain description


@dataclass(frozen=True)
class EpilogueStep:
    """One step of an epilogue chain: ``kind`` (bias, act, mul, add, cast) and its argument."""

    kind: str
    arg: str = ""

    def __post_init__(self):
        if self.kind not in _STEP_ARGS:
            raise ValueError(f"epilogue step {self.kind!r}: kind must be one of {sorted(_STEP_ARGS)}")
        if self.arg not in _STEP_ARGS[self.kind]:
            raise ValueError(f"epilogue step {self.kind!r}: argument {self.arg!r} is not one of "
                             f"{list(_STEP_ARGS[self.kind])}")

    @property
    def extra_input(self) -> Optional[str]:
        """The op input the step reads (bias, gate, up, residual), or None."""
        if self.kind == "bias":
            return "bias"
        return self.arg if self.kind in ("mul", "add") else None

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


@dataclass(frozen=True)
class EpilogueChain:
    """Ordered pointwise steps applied to a linear's float32 accumulator (see the module notes).

    Validated on construction: each extra input at most once, a cast only last.
    """

    steps: Tuple[EpilogueStep, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))
        seen = set()
        for index, step in enumerate(self.steps):
            if not isinstance(step, EpilogueStep):
                raise TypeError(f"epilogue chain: step {index} is {step!r}, not an EpilogueStep")
            extra = step.extra_input
            if extra is not None:
                if extra in seen:
                    raise ValueError(f"epilogue chain {self}: input {extra!r} is used twice")
                seen.add(extra)
            if step.kind == "cast" and index != len(self.steps) - 1:
                raise ValueError(f"epilogue chain {self}: a cast must be the last step")

    @classmethod
    def parse(cls, text: str) -> "EpilogueChain":
        """The chain of its string form (``"bias;act:silu;mul:gate"``; ``""`` is empty)."""
        if isinstance(text, EpilogueChain):
            return text
        steps = []
        for token in (t.strip() for t in str(text).split(";")):
            if token:
                kind, _, arg = token.partition(":")
                steps.append(EpilogueStep(kind.strip(), arg.strip()))
        return cls(tuple(steps))

    @classmethod
    def of_activation(cls, activation: str, has_bias: bool) -> "EpilogueChain":
        """``act(acc + bias)``: the fixed epilogue of the activation-name interface."""
        check_activation(activation)
        steps = ((EpilogueStep("bias"),) if has_bias else ()) + \
            ((EpilogueStep("act", activation),) if activation != "none" else ())
        return cls(steps)

    @property
    def inputs(self) -> frozenset:
        """The extra inputs the chain reads (subset of bias, gate, up, residual)."""
        return frozenset(s.extra_input for s in self.steps if s.extra_input is not None)

    def with_bias(self, has_bias: bool) -> "EpilogueChain":
        """The chain an op runs: a bias the chain does not place is added first (the linear's own bias)."""
        if has_bias and "bias" not in self.inputs:
            return EpilogueChain((EpilogueStep("bias"),) + self.steps)
        return self

    def check_inputs(self, **given: bool) -> None:
        """Raise ``ValueError`` unless exactly the chain's extra inputs are given (``bias=True, gate=False...``)."""
        for name, present in given.items():
            if present != (name in self.inputs):
                need = "needs" if name in self.inputs else "does not use"
                raise ValueError(f"epilogue {str(self)!r} {need} the input {name!r}")

    def out_dtype(self, in_dtype: torch.dtype) -> torch.dtype:
        """The result's dtype: the cast's, else the input's."""
        if self.steps and self.steps[-1].kind == "cast":
            return CAST_DTYPES[self.steps[-1].arg]
        return in_dtype

    def apply_ref(self, acc: Tensor, bias: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                  residual: Optional[Tensor] = None, up: Optional[Tensor] = None) -> Tensor:
        """The chain in PyTorch on ``acc`` (float32/64, ``[..., N]``), extra inputs upcast to ``acc``'s dtype.

        Returns the value before the final cast (``acc``'s dtype), as the kernel holds it.
        """
        extra = {"bias": bias, "gate": gate, "residual": residual, "up": up}
        v = acc
        for step in self.steps:
            if step.kind == "act":
                v = activation_ref(step.arg)(v)
            elif step.kind in ("bias", "mul", "add"):
                operand = extra[step.extra_input]
                if operand is None:
                    raise ValueError(f"epilogue {str(self)!r} needs the input {step.extra_input!r}")
                operand = operand.to(acc.dtype)
                v = v * operand if step.kind == "mul" else v + operand
        return v

    def __str__(self) -> str:
        return ";".join(str(s) for s in self.steps)


# ------------------------------------------------------------------ source generation

_SIGNATURE = "acc, up, offs_m, cols, mask, bias_ptr, gate_ptr, stride_gate, residual_ptr, stride_residual"


def _step_code(step: EpilogueStep) -> list:
    if step.kind == "act":
        return list(BY_NAME[step.arg].triton)
    if step.kind == "bias":
        return ["v = v + tl.load(bias_ptr + cols).to(tl.float32)"]
    if step.kind == "mul" and step.arg == "up":
        return ["v = v * up"]
    if step.kind == "mul":
        return ["v = v * tl.load(gate_ptr + offs_m * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)"]
    if step.kind == "add":
        return ["v = v + tl.load(residual_ptr + offs_m * stride_residual + cols, mask=mask, "
                "other=0.0).to(tl.float32)"]
    return [f"# cast: the kernel stores {step.arg}"]


def epilogue_source(chain: EpilogueChain) -> str:
    """Python source of a module defining ``epilogue(...)``, the ``@triton.jit`` function for ``chain``.

    Arguments of the generated function: ``acc`` (float32 tile), ``up`` (the
    second accumulator, or ``acc`` when there is none), ``offs_m`` / ``cols``
    (int64 row and column indices, already broadcast to the tile's
    orientation), ``mask`` (rows in range), then the bias / gate / residual
    pointers and the row strides of gate and residual.
    """
    chain = EpilogueChain.parse(chain)
    lines = [f'"""sparsecc generated epilogue: {str(chain) or "(empty)"}."""',
             "import triton", "import triton.language as tl", "", "",
             "@triton.jit", f"def epilogue({_SIGNATURE}):",
             f'    """Apply {str(chain) or "nothing"} to the float32 tile ``acc``."""',
             "    v = acc"]
    for step in chain.steps:
        lines.extend("    " + line for line in _step_code(step))
    lines.append("    return v")
    return "\n".join(lines) + "\n"


def epilogue_cache_dir() -> str:
    """Directory of the generated epilogue modules (under the user cache dir)."""
    from sparsecc.cache import cache_dir
    return os.path.join(cache_dir(), CACHE_SUBDIR)


def source_hash(source: str) -> str:
    """The cache key of a generated source: 16 hex digits of its SHA-256."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


_cache_lock = threading.Lock()
_functions: Dict[str, object] = {}   # source hash -> loaded JIT function
CACHE_STATS = {"memory_hits": 0, "disk_loads": 0, "disk_writes": 0}
"""Counters of :func:`epilogue_function` (tests read them)."""


def clear_memory_cache() -> None:
    """Forget loaded functions (the disk cache stays); the next call loads from disk."""
    with _cache_lock:
        _functions.clear()


def epilogue_function(chain):
    """The Triton JIT function of ``chain`` (an :class:`EpilogueChain` or its string), cached by source hash.

    Imports Triton (the generated module does). Thread-safe; a file another
    process is writing is never read half-written (written to a temporary name, then renamed).
    """
    return _load_generated(epilogue_source(EpilogueChain.parse(chain)), "epilogue", "epilogue")


def activation_switch_source(name: str = "activation") -> str:
    """Python source of a module defining ``@triton.jit def <name>(v, ACTIVATION: tl.constexpr)``.

    The function applies the table's activation named ``ACTIVATION`` to the
    float32 ``v`` with the table's lines, one constexpr branch per activation
    (Triton compiles only the taken one); another name returns ``v`` unchanged,
    so callers check the name first. Inductor copies a traced kernel's helper
    functions into its own code under the name the kernel calls them by, so
    ``name`` must be that name.
    """
    if not name.isidentifier():
        raise ValueError(f"activation switch: {name!r} is not a Python identifier")
    lines = [f'"""sparsecc generated activation switch: {", ".join(BY_NAME)}."""',
             "import triton", "import triton.language as tl", "", "",
             "@triton.jit", f"def {name}(v, ACTIVATION: tl.constexpr):",
             '    """The activation named ``ACTIVATION`` (sparsecc.activations) on the float32 ``v``."""']
    for index, act in enumerate(ACTIVATION_TABLE):
        lines.append(f"    {'elif' if index else 'if'} ACTIVATION == {act.name!r}:")
        lines.extend("        " + line for line in act.triton)
    lines.append("    return v")
    return "\n".join(lines) + "\n"


def activation_switch(name: str = "activation"):
    """The Triton JIT function of :func:`activation_switch_source` (``name``), cached like the epilogues."""
    return _load_generated(activation_switch_source(name), "activation", name)


def _load_generated(source: str, prefix: str, attr: str):
    """The function ``attr`` of the generated module ``source``, from the memory cache or ``<prefix>_<hash>.py``."""
    key = source_hash(source)
    with _cache_lock:
        fn = _functions.get(key)
        if fn is not None:
            CACHE_STATS["memory_hits"] += 1
            return fn
        path = _write_source(source, key, prefix)
        _dump_debug(source, key, prefix)
        spec = importlib.util.spec_from_file_location(f"sparsecc_{prefix}_{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        CACHE_STATS["disk_loads"] += 1
        _functions[key] = getattr(module, attr)
        return _functions[key]


def _write_source(source: str, key: str, prefix: str) -> str:
    """The cached file for ``key``, (re)written when missing or not exactly ``source``."""
    directory = epilogue_cache_dir()
    path = os.path.join(directory, f"{prefix}_{key}.py")
    try:
        with open(path) as fh:
            if fh.read() == source:
                return path
    except OSError:
        pass
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as fh:
        fh.write(source)
    os.replace(tmp, path)
    CACHE_STATS["disk_writes"] += 1
    return path


def _dump_debug(source: str, key: str, prefix: str) -> None:
    directory = os.environ.get(DEBUG_DIR_ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"{prefix}_{key}.py"), "w") as fh:
            fh.write(source)


# ------------------------------------------------------------------ lazy binding

_bind_lock = threading.Lock()


def bind_triton(namespace: dict, names: Iterable[str]) -> None:
    """Import Triton into ``namespace`` (as ``triton`` and ``tl``) and JIT the functions ``names`` in place.

    ``namespace`` is a kernel module's ``globals()``. Triton resolves names in a
    kernel through that dict at compile time, so after this call a kernel's
    calls to other JIT functions of the module find compiled functions rather
    than plain ones. Idempotent and thread-safe.
    """
    import triton
    import triton.language as tl

    with _bind_lock:
        namespace.setdefault("triton", triton)
        namespace.setdefault("tl", tl)
        for name in names:
            fn = namespace[name]
            if not getattr(fn, "_sparsecc_jit", False):
                jitted = triton.jit(fn)
                jitted._sparsecc_jit = True
                namespace[name] = jitted
