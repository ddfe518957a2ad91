"""``torch.ops.sparsecc.*``: the registry of the custom ops rewritten graphs call.

Each op is one :class:`~sparsecc.codegen.op_record.OpRecord` (name, typed arguments, body,
reference, fake, kernel, checks), defined beside its kernels: the attention ops in
``attention_ops.py``, the FFN and linear ops in ``linear_ops.py``. This module lists them
(:data:`RECORDS`, no registration by import side effect) and registers them with torch:
:func:`register_ops`, which the backend calls; it is idempotent.

The ``impl`` argument the compiler bakes into each call selects the implementation:

* ``"reference"``: the pure-PyTorch reference beside each kernel (the test oracle and the CPU path);
* ``"triton"``: the op's Triton kernel (an error if none);
* ``"auto"``: the Triton kernel where one exists for the tensor's device, the reference otherwise.

Kernel wrappers import Triton only when first used, so importing sparsecc never compiles or
imports Triton.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional

import torch

from sparsecc.codegen.attention_ops import (  # noqa: F401 - the op bodies are part of this module's interface
    ATTENTION_RECORDS, dense_attention, block_sparse_attention, dynamic_block_attention, layout_table,
    mixed_head_attention, mixed_head_attention_by_groups, streaming_attention, streaming_attention_from_mask)
from sparsecc.codegen.linear_ops import (  # noqa: F401
    LINEAR_RECORDS, block_sparse_linear, gate_sparse_ffn, semi_structured_linear, threshold_ffn, threshold_linear)
# The mask position rule lives in its own module; these names are part of this module's interface too.
from sparsecc.codegen.mask_positions import (  # noqa: F401
    block_sparse_attention_from_mask_ref, mask_4d, mask_is_causal, mask_query_end, mask_query_positions,
    mask_rows_moved, streaming_attention_from_mask_ref)
from sparsecc.codegen.op_record import IMPL_CHOICES, NAMESPACE, OpRecord  # noqa: F401

RECORDS: Dict[str, OpRecord] = {record.name: record for record in (*ATTENTION_RECORDS, *LINEAR_RECORDS)}
"""Every ``torch.ops.sparsecc`` op by name."""

_registered = False
_library: Optional[torch.library.Library] = None
_lock = threading.Lock()


def record(name: str) -> OpRecord:
    """The record of op ``name`` (a KeyError naming the ops when there is none)."""
    try:
        return RECORDS[name]
    except KeyError:
        raise KeyError(f"no sparsecc op {name!r}; the ops are {sorted(RECORDS)}") from None


def triton_kernel(op: str, device: torch.device) -> Optional[Callable]:
    """The Triton kernel wrapper of ``op`` on ``device``, or None when there is none (or Triton is missing)."""
    return record(op).kernel_function(device)


def has_triton_kernel(op: str, device: torch.device) -> bool:
    """True when ``op`` has a Triton kernel for ``device``."""
    return triton_kernel(op, device) is not None


def register_ops() -> None:
    """Define every ``torch.ops.sparsecc`` op from its record (idempotent).

    Each op gets one ``CompositeExplicitAutograd`` kernel (its body: eager calls
    and opaque calls run it), its fake implementation, and, unless the record
    says it is always opaque, a rule for AOTAutograd's functionalization that
    traces the body, so that Inductor launches the op's kernels from its own
    generated code (``OpRecord.decompose``). ``torch.library.Library`` is used
    rather than ``custom_op``, whose per-call Python dispatch costs tens of
    microseconds in eager calls. The ops have no autograd formula (inference only).
    """
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    global _registered, _library
    with _lock:
        if _registered:
            return
        library = torch.library.Library(NAMESPACE, "DEF")
        for rec in RECORDS.values():
            library.define(rec.name + rec.schema())
            library.impl(rec.name, rec.run, "CompositeExplicitAutograd")
            torch.library.register_fake(rec.qualname, rec.fake, lib=library)
            if rec.always_opaque is None:
                torch.library.register_torch_dispatch(rec.qualname, FunctionalTensorMode, rec.decompose, lib=library)
        _library = library  # the registrations live as long as this object
        _registered = True


def op(name: str):
    """The registered ``torch.ops.sparsecc.<name>.default`` overload."""
    return record(name).op()
