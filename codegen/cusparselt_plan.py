"""cuSPARSELt products whose plan is made once per shape, called through the library's C API.

torch's private ``torch._cslt_sparse_mm`` describes the operands, picks the algorithm, builds cuSPARSELt's plan
and allocates its workspace on every call, then runs the product and throws the plan away. On an H100 (torch
2.11, cuSPARSELt 0.8.0) that host work took 450-690 us per call at 4096 -> 14336 in bf16, against 0.055 ms of
device time at 64 tokens and 0.95 ms at 8192 (bench/RESULTS.md, 2026-12-07): plain calls were bound by the host
below about 8192 tokens. Here the descriptors and the plan of one (shape, dtype, settings, bias) are made on the
first call and kept, and each call is one ``cusparseLtMatmul`` on the current stream (about 20-25 us of host
time through ctypes, the same numbers bit for bit, and capturable in a CUDA graph).

The operand is torch's compressed buffer (``torch._cslt_compress``): the sparse descriptor below is the one
torch compresses with (N rows, K columns, leading dimension K, row major, 16-byte alignment, 50% sparsity), so
the buffer's layout is the one the product expects. The product is torch's too: ``y [M, N] = x [M, K] Wᵀ (+ b)``
run as ``W xᵀ`` with the dense operand ``xᵀ`` read transposed from row-major ``x`` and the result written
column-major ``[N, M]`` (that is row-major ``[M, N]``), accumulation in float32, the bias fused.

The enum values used here are those of cuSPARSELt's public header (``cusparseLt.h``), the same in 0.6.3, 0.7.1 and
0.10; its opaque structs are 13,072 bytes in 0.6.3, 1,024 in 0.7.1 and 512 in 0.10, so libraries older than
:data:`MIN_VERSION` (0.7.1) are not used (the structs here hold 2,048 bytes). Run on a GPU with 0.8.0. A library older
than that, or none that ctypes can load, leaves every product to torch's op (:func:`plans_unavailable_reason` says
why). Nothing is loaded at import.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import logging
import os
import threading
from collections import Counter
from ctypes import byref, c_float, c_int, c_int64, c_size_t, c_uint32, c_void_p
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["MIN_VERSION", "plans_unavailable_reason", "planned_product", "PLAN_LIMIT", "plan_count",
           "fallback_counts", "split_mode_code", "TORCH_OP_HOST_S", "compressed_rows", "on_device"]

MIN_VERSION = 701   # cuSPARSELt 0.7.1: the oldest header checked whose opaque structs fit in _Opaque (0.6.3's do not)
PLAN_LIMIT = 1024   # distinct plans kept per process; past it, new shapes run torch's op (plans are never freed:
#                     a CUDA graph captured with one may replay it at any time)
# Host time of one call of torch's ``_cslt_sparse_mm`` (its plan made per call): the largest of the calls measured on
# an H100 at 4096 -> 14336, bf16, 64-8192 tokens (448-686 us, bench/RESULTS.md 2026-12-07). A 2:4 call costs at least
# this where plans are not kept; the cost model's gemm_2to4 floor (58 us) was fitted with plans kept.
TORCH_OP_HOST_S = 6.9e-4
_LOG = logging.getLogger("sparsecc")

# cuSPARSELt's and CUDA's enum values (cusparseLt.h, library_types.h).
_CUDA_R_16F, _CUDA_R_16BF = 2, 14
_DATA_TYPES = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_NON_TRANSPOSE, _OP_TRANSPOSE = 0, 1
_COMPUTE_32F = 2
_SPARSITY_50_PERCENT = 0
_ALG_DEFAULT = 0
_MATMUL_BIAS_POINTER = 8
_ALG_CONFIG_ID, _ALG_SPLIT_K, _ALG_SPLIT_K_MODE = 0, 3, 4
_ALIGNMENT = 16     # bytes; every data pointer handed to a product must be aligned to it


class _Opaque(ctypes.Structure):
    """One of cuSPARSELt's opaque structs (1,024 bytes in 0.7.1, 512 in 0.10), with room to spare, 16-byte aligned."""

    _fields_ = [("data", ctypes.c_longdouble * 128)]


def _load_library() -> ctypes.CDLL:
    """The cuSPARSELt library torch uses: already loaded by torch's CUDA libraries, else found beside them."""
    try:
        return ctypes.CDLL("libcusparseLt.so.0")
    except OSError:
        pass
    roots = [os.path.dirname(os.path.dirname(torch.__file__))]
    for pattern in ("nvidia/cu*/lib/libcusparseLt.so.0", "nvidia/cusparselt/lib/libcusparseLt.so.0"):
        for root in roots:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                return ctypes.CDLL(path)
    raise OSError("libcusparseLt.so.0 not found (neither loaded nor beside torch)")


class _Library:
    """The loaded library and one handle per CUDA device."""

    def __init__(self):
        self.lib = _load_library()
        self.lib.cusparseLtGetErrorString.restype = ctypes.c_char_p
        self.handles: Dict[int, _Opaque] = {}
        probe = self.handle(torch.cuda.current_device())
        version = c_int()
        self.check(self.lib.cusparseLtGetVersion(byref(probe), byref(version)), "cusparseLtGetVersion")
        self.version = version.value

    def check(self, status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed: {self.lib.cusparseLtGetErrorString(status).decode()} ({status})")

    def handle(self, device: int) -> _Opaque:
        if device not in self.handles:
            handle = _Opaque()
            with torch.cuda.device(device):
                self.check(self.lib.cusparseLtInit(byref(handle)), "cusparseLtInit")
            self.handles[device] = handle
        return self.handles[device]


@functools.lru_cache(maxsize=1)
def _library() -> Tuple[Optional[_Library], str]:
    """(the library, '') or (None, why it cannot be used)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        library = _Library()
    except (OSError, RuntimeError, AttributeError) as err:
        return None, f"cuSPARSELt's library could not be used through ctypes ({err})"
    if library.version < MIN_VERSION:
        return None, f"cuSPARSELt {library.version} is older than {MIN_VERSION}, the oldest checked"
    return library, ""


def plans_unavailable_reason() -> str:
    """Why products run through torch's ``_cslt_sparse_mm`` instead of cached plans ('' when plans are used)."""
    return _library()[1]


class _Plan:
    """cuSPARSELt's descriptors and plan for one product shape; :meth:`run` launches it."""

    def __init__(self, library: _Library, device: int, dtype: torch.dtype, n: int, k: int, m: int,
                 bias: Optional[Tensor], settings: Tuple[int, int, Optional[int]]):
        lib, check = library.lib, library.check
        self.library, self.handle = library, library.handle(device)
        self.sparse, self.dense, self.result = _Opaque(), _Opaque(), _Opaque()
        self.matmul, self.selection, self.plan = _Opaque(), _Opaque(), _Opaque()
        h, kind = byref(self.handle), _DATA_TYPES[dtype]
        check(lib.cusparseLtStructuredDescriptorInit(h, byref(self.sparse), c_int64(n), c_int64(k), c_int64(k),
                                                     c_uint32(_ALIGNMENT), c_int(kind), c_int(_ORDER_ROW),
                                                     c_int(_SPARSITY_50_PERCENT)), "sparse descriptor")
        # x [m, k] row-major, read transposed: the [k, m] operand of W @ xᵀ
        check(lib.cusparseLtDenseDescriptorInit(h, byref(self.dense), c_int64(m), c_int64(k), c_int64(k),
                                                c_uint32(_ALIGNMENT), c_int(kind), c_int(_ORDER_ROW)),
              "dense descriptor")
        # y [n, m] column-major: row-major [m, n]
        check(lib.cusparseLtDenseDescriptorInit(h, byref(self.result), c_int64(n), c_int64(m), c_int64(n),
                                                c_uint32(_ALIGNMENT), c_int(kind), c_int(_ORDER_COL)),
              "result descriptor")
        check(lib.cusparseLtMatmulDescriptorInit(h, byref(self.matmul), c_int(_OP_NON_TRANSPOSE), c_int(_OP_TRANSPOSE),
                                                 byref(self.sparse), byref(self.dense), byref(self.result),
                                                 byref(self.result), c_int(_COMPUTE_32F)), "matmul descriptor")
        if bias is not None:
            self.bias_pointer = c_void_p(bias.data_ptr())
            check(lib.cusparseLtMatmulDescSetAttribute(h, byref(self.matmul), c_int(_MATMUL_BIAS_POINTER),
                                                       byref(self.bias_pointer), c_size_t(ctypes.sizeof(c_void_p))),
                  "bias pointer")
        check(lib.cusparseLtMatmulAlgSelectionInit(h, byref(self.selection), byref(self.matmul), c_int(_ALG_DEFAULT)),
              "algorithm selection")
        alg_id, split_k, split_k_mode = settings
        self._set_algorithm(_ALG_CONFIG_ID, alg_id, "algorithm id")
        if split_k != 1:   # as torch's op: the split only where one is asked for
            self._set_algorithm(_ALG_SPLIT_K, split_k, "split-K")
            if split_k_mode is not None and split_k_mode > 0:
                self._set_algorithm(_ALG_SPLIT_K_MODE, split_k_mode, "split-K mode")
        check(lib.cusparseLtMatmulPlanInit(h, byref(self.plan), byref(self.matmul), byref(self.selection)), "plan")
        size = c_size_t()
        check(lib.cusparseLtMatmulGetWorkspace(h, byref(self.plan), byref(size)), "workspace size")
        self.workspace_bytes = size.value
        self.shape = (m, n)
        self.alpha, self.beta = c_float(1.0), c_float(0.0)

    def _set_algorithm(self, attribute: int, value: int, what: str) -> None:
        data = c_int(int(value))
        self.library.check(self.library.lib.cusparseLtMatmulAlgSetAttribute(
            byref(self.handle), byref(self.selection), c_int(attribute), byref(data), c_size_t(4)), what)

    def run(self, packed: Tensor, x: Tensor) -> Tensor:
        """``x [m, k] @ Wᵀ (+ bias)`` into a new ``[m, n]`` tensor, on the current stream.

        The workspace is allocated per call through torch's caching allocator, as torch's op does: it is ordered
        on the stream that uses it, and inside a CUDA-graph capture it is one of the graph's temporaries.
        """
        out = torch.empty(self.shape, dtype=x.dtype, device=x.device)
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=x.device) \
            if self.workspace_bytes else None
        stream = c_void_p(torch.cuda.current_stream(x.device).cuda_stream)
        pointer = c_void_p(workspace.data_ptr()) if workspace is not None else c_void_p(None)
        self.library.check(self.library.lib.cusparseLtMatmul(
            byref(self.handle), byref(self.plan), byref(self.alpha), c_void_p(packed.data_ptr()),
            c_void_p(x.data_ptr()), byref(self.beta), c_void_p(out.data_ptr()), c_void_p(out.data_ptr()), pointer,
            byref(stream), c_int(1)), "cusparseLtMatmul")
        return out


_PLANS: Dict[tuple, _Plan] = {}
_REFUSED: Dict[tuple, str] = {}   # shapes whose plan cuSPARSELt refused (they run torch's op), with the error
_FALLBACKS: Counter = Counter()   # products that ran torch's op although the library is usable, by reason
_LOCK = threading.Lock()


def plan_count() -> int:
    """How many plans this process has made (each one product shape, dtype, settings and bias)."""
    return len(_PLANS)


def fallback_counts() -> Dict[str, int]:
    """Products that ran torch's per-call op although plans are available, by reason (empty when none did)."""
    return dict(_FALLBACKS)


def _fall_back(reason: str) -> None:
    """Count a product left to torch's op; the first of each reason is logged (the report shows the library's
    state, not each call's)."""
    if reason not in _FALLBACKS:
        _LOG.warning("sparsecc: a 2:4 product runs torch's _cslt_sparse_mm (a cuSPARSELt plan per call): %s", reason)
    _FALLBACKS[reason] += 1


def split_mode_code(mode) -> Optional[int]:
    """cuSPARSELt's split-K mode as its enum value (1 one kernel, 2 two kernels) from a search's answer: an int as
    torch 2.11 reports it, or a bool ``split_k_one_kernel`` as older builds do; None for the library's default."""
    if mode is None:
        return None
    if isinstance(mode, bool):
        return 1 if mode else 2
    return int(mode) if int(mode) > 0 else None


def compressed_rows(packed: Tensor, k: int) -> int:
    """W's row count N read from its compressed buffer of ``k`` columns: cuSPARSELt's buffer of a 16-bit N x K 2:4
    matrix holds 9NK/16 elements (kept values and their metadata), as torch's op reads it."""
    return packed.numel() * 16 // (9 * k)


def on_device(device: torch.device):
    """A context that makes CUDA ``device`` current only where it is not already (a device switch costs host
    time); no context for a device that is not CUDA."""
    if device.type != "cuda" or torch.cuda.current_device() == device.index:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _cuda_index(t: Tensor) -> Optional[int]:
    """The CUDA device index of ``t``; None on another device."""
    if t.device.type != "cuda":
        return None
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def planned_product(packed: Tensor, x: Tensor, n: int, bias: Optional[Tensor],
                    settings: Tuple[int, int, object]) -> Optional[Tensor]:
    """``x [m, k] @ Wᵀ (+ bias)`` through a cached plan, or None when plans are not used for it (the caller then
    runs torch's ``_cslt_sparse_mm``).

    ``packed`` is the weight's compressed buffer (N = ``n`` rows), ``x`` contiguous with ``m`` a multiple of 8,
    ``bias`` a length-N vector of ``x``'s dtype, ``settings`` (algorithm id, split-K, split-K mode as the search
    reports it). The bias's address is part of the plan and of its key: a parameter keeps one plan, a bias made
    anew at another address makes another. None (and counted, :func:`fallback_counts`) when the operands do not
    fit what the plan describes (another device or dtype, a buffer too short for N x K, an operand not 16-byte
    aligned), past :data:`PLAN_LIMIT` plans, or when cuSPARSELt refuses the plan (remembered per shape).
    """
    library, _ = _library()
    if library is None:
        return None
    device = _cuda_index(x)
    m, k = x.shape
    reason = ""
    if device is None or _cuda_index(packed) != device or (bias is not None and _cuda_index(bias) != device):
        reason = "operands on another device"
    elif x.dtype not in _DATA_TYPES or packed.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        reason = f"dtypes {packed.dtype} / {x.dtype} (plans take float16 or bfloat16, one dtype)"
    elif compressed_rows(packed, k) < n:
        reason = f"a compressed buffer of {packed.numel()} elements, short of a {n} x {k} matrix"
    elif any(t is not None and t.data_ptr() % _ALIGNMENT for t in (packed, x, bias)):
        reason = "an operand not 16-byte aligned"
    if reason:
        _fall_back(reason)
        return None
    key = (device, x.dtype, n, k, m, None if bias is None else bias.data_ptr(),
           (int(settings[0]), int(settings[1]), split_mode_code(settings[2])))
    plan = _PLANS.get(key)
    with on_device(x.device):
        if plan is None:
            if key in _REFUSED:
                _fall_back(f"cuSPARSELt refused the plan ({_REFUSED[key]})")
                return None
            if len(_PLANS) >= PLAN_LIMIT:
                _fall_back(f"{PLAN_LIMIT} plans kept already")
                return None
            with _LOCK:
                plan = _PLANS.get(key)
                if plan is None:
                    try:
                        plan = _PLANS[key] = _Plan(library, device, x.dtype, n, k, m, bias, key[-1])
                    except RuntimeError as err:   # settings or a shape this library refuses: torch's op decides
                        _REFUSED[key] = str(err)
                        _fall_back(f"cuSPARSELt refused the plan ({err})")
                        return None
        return plan.run(packed, x)
