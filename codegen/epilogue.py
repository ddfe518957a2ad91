"""Fused epilogues for the linear kernels, and the lazy Triton binding they share.

Notation: a kernel accumulates ``acc = x @ Wᵀ`` in float32, then the epilogue
computes ``act(acc + bias)`` and the kernel casts once to the output dtype.

**Selection, not generation.** The epilogue is chosen by a string constexpr
(``ACTIVATION``) that picks one branch of :func:`apply_activation` at compile
time; no kernel source is generated, so there is nothing to cache by hash or
dump to ``SPARSECC_DEBUG_DIR``. Triton specialises the kernel per activation
name, so each choice compiles to straight-line code with no run-time switch.
The table :data:`EPILOGUES` documents each name and gives its PyTorch
reference; :func:`check_activation` validates a name before launch.

**Lazy Triton.** ``import sparsecc`` must neither import Triton nor compile
anything, and ``TRITON_INTERPRET`` is read by Triton when a function is
decorated. So kernel functions are written as plain module-level functions
(their ``tl.constexpr`` annotations stay strings thanks to
``from __future__ import annotations``), and :func:`bind_triton` turns them into
Triton JIT functions in place, on first use. Call it from every wrapper before
a launch; it is cheap after the first call.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Dict, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EPILOGUES", "check_activation", "activation_ref", "bind_triton", "apply_activation"]

# Constants the Triton epilogue reads; bind_triton turns them into tl.constexpr globals, which is
# the only kind of global a Triton kernel may read.
_KERNEL_CONSTANTS = {
    "GELU_TANH_SCALE": math.sqrt(2.0 / math.pi),  # sqrt(2/pi) of the tanh approximation of GELU
    "GELU_TANH_CUBIC": 0.044715,                  # its cubic coefficient (Hendrycks & Gimpel)
    "INV_SQRT2": 1.0 / math.sqrt(2.0),            # exact GELU: 0.5 v (1 + erf(v / sqrt 2))
}

EPILOGUES: Dict[str, str] = {
    "none": "identity: acc + bias",
    "relu": "max(v, 0)",
    "relu2": "max(v, 0)^2 (squared ReLU)",
    "gelu": "0.5 v (1 + erf(v / sqrt 2)) (exact GELU)",
    "gelu_tanh": "v * sigmoid(2 sqrt(2/pi) (v + 0.044715 v^3)), which equals the tanh form of GELU",
    "silu": "v * sigmoid(v)",
}
"""Epilogue activations by name (the names of ``activation_sparse.ACTIVATIONS`` plus ``none``)."""


def check_activation(name: str) -> str:
    """Return ``name`` if it is a known epilogue, else raise ``ValueError`` listing the choices."""
    if name not in EPILOGUES:
        raise ValueError(f"activation={name!r} is not a fused epilogue; expected one of {sorted(EPILOGUES)}")
    return name


def activation_ref(name: str) -> Callable[[Tensor], Tensor]:
    """The PyTorch function an epilogue name stands for (the oracle in tests)."""
    check_activation(name)
    if name == "none":
        return lambda v: v
    if name == "gelu_tanh":
        return lambda v: F.gelu(v, approximate="tanh")
    if name == "relu2":
        return lambda v: torch.relu(v).square()
    return {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}[name]


# ------------------------------------------------------------------ lazy binding

_bind_lock = threading.Lock()


def bind_triton(namespace: dict, names: Iterable[str]) -> None:
    """Import Triton into ``namespace`` (as ``triton`` and ``tl``) and JIT the functions ``names`` in place.

    ``namespace`` is a kernel module's ``globals()``. Triton resolves names in a
    kernel through that dict at compile time, so after this call a kernel's
    calls to other JIT functions (such as :func:`apply_activation`) find
    compiled functions rather than plain ones. Idempotent and thread-safe.
    """
    import triton
    import triton.language as tl

    with _bind_lock:
        _bind_self(triton, tl)
        namespace.setdefault("triton", triton)
        namespace.setdefault("tl", tl)
        for name in names:
            fn = namespace[name]
            if not getattr(fn, "_sparsecc_jit", False):
                jitted = triton.jit(fn)
                jitted._sparsecc_jit = True
                namespace[name] = jitted


def _bind_self(triton, tl) -> None:
    g = globals()
    g.setdefault("triton", triton)
    g.setdefault("tl", tl)
    for name, value in _KERNEL_CONSTANTS.items():
        g.setdefault(name, tl.constexpr(value))
    if not getattr(g["apply_activation"], "_sparsecc_jit", False):
        jitted = triton.jit(g["apply_activation"])
        jitted._sparsecc_jit = True
        g["apply_activation"] = jitted


# ------------------------------------------------------------------ Triton epilogue


def apply_activation(v, ACTIVATION: tl.constexpr):  # noqa: F821 - tl is bound by bind_triton
    """Apply the epilogue activation ``ACTIVATION`` (a name of :data:`EPILOGUES`) to float32 ``v``.

    A Triton JIT function once :func:`bind_triton` has run; the branch is chosen
    at compile time.
    """
    if ACTIVATION == "relu":
        v = tl.maximum(v, 0.0)
    elif ACTIVATION == "relu2":
        v = tl.maximum(v, 0.0)
        v = v * v
    elif ACTIVATION == "gelu":
        v = 0.5 * v * (1.0 + tl.math.erf(v * INV_SQRT2))  # noqa: F821
    elif ACTIVATION == "gelu_tanh":
        # 0.5 (1 + tanh(u)) == sigmoid(2u): one exp instead of a tanh, which Triton 3.6 lacks in tl.math.
        u = GELU_TANH_SCALE * (v + GELU_TANH_CUBIC * v * v * v)  # noqa: F821
        v = v * tl.sigmoid(2.0 * u)
    elif ACTIVATION == "silu":
        v = v * tl.sigmoid(v)
    return v
