"""How the kernel wrappers launch Triton kernels so that Inductor can trace them.

A wrapper runs in two situations:

* **called on real tensors** (eagerly, by a test, a benchmark, or an op that
  stays opaque): it launches the kernel itself, through Triton's launcher;
* **traced** by ``torch.compile`` (AOTAutograd's functionalization hands the op
  fake tensors): every launch must go through :func:`torch.library.wrap_triton`,
  which records the kernel, its grid and its arguments in the graph, and
  Inductor then launches it from its own generated wrapper code.

:func:`launcher` picks the right form from the tensors the wrapper was given,
so one wrapper serves both. Wrapping in the first case would go through the
tracing machinery on every call (about a millisecond) for nothing.

While tracing, a wrapper must not keep device tensors in a host-side cache
(they would be fake) nor read device values back: :func:`tracing` lets it tell,
and :func:`round_to_dtype` rounds a threshold without creating a tensor.

A pointer argument that a launch never reads (an absent optional input) still reaches Inductor's copy of the
launch: give it a tensor the launch only reads (its input), never one it writes. An output passed as such a dummy
is one more alias of a mutated tensor, and Inductor's functionalization of the launch then returned wrong results
on the H200 (bench/RESULTS.md, "The weighted criterion on the same kernels"). The interpreter tests check the
rule on every launch they run (tests/launch_guard.py: a storage passed through two arguments must come out of
the launch unchanged).

Inductor's functionalization copies, before every launch, each tensor torch's analysis of the kernel's TTIR reads
as written, and that analysis takes a ``@triton.jit`` helper's results to depend on *all* the helper's arguments.
So a kernel loads its inputs in its own body (or in helpers whose results only feed stored values): an input
pointer handed to a helper whose result places a store would be copied on every call of the compiled graph.
tests/codegen/test_inductor_launch.py checks every traced launch path for such copies.

Kernels that split a reduction over several programs and merge in the same
launch (the last program to finish a group merges it) draw tickets from
:func:`ticket_counters`.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

import torch

__all__ = ["tracing", "launcher", "round_to_dtype", "ticket_counters", "sm_count"]


def tracing(*tensors: Any) -> bool:
    """True when any of ``tensors`` is a fake (or functionalized fake) tensor: the op is being traced."""
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, torch.Tensor) and is_fake(t) for t in tensors)


def launcher(kernel: Any, *like: Any) -> Any:
    """``kernel`` itself for real tensors ``like``, ``torch.library.wrap_triton(kernel)`` while tracing.

    Index the result with the grid and call it with the kernel's arguments, as
    one would the kernel. Under ``TRITON_INTERPRET=1`` kernels are never traced
    (the interpreter runs on the CPU, where the compiler emits the references).
    """
    if tracing(*like):
        return torch.library.wrap_triton(kernel)
    return kernel


def round_to_dtype(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (round to nearest, ties to even), as a Python float.

    torch compares ``|x| > tau`` with ``tau`` converted to x's dtype; the
    kernels compare in float32 against this same rounded value, so both keep
    exactly the same channels. Computed without a tensor, so it also runs while
    the op is traced.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return float(value)
    # torch converts a Python float to float32 first, then to the narrower type (two roundings).
    try:
        as_float32 = struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except OverflowError:
        as_float32 = float("inf") if value > 0 else float("-inf")
    if dtype == torch.float16:
        try:
            return struct.unpack("<e", struct.pack("<e", as_float32))[0]
        except OverflowError:
            return float("inf") if as_float32 > 0 else float("-inf")
    if dtype == torch.bfloat16:
        bits = struct.unpack("<I", struct.pack("<f", as_float32))[0]
        if (bits & 0x7F800000) != 0x7F800000:   # finite: round the low 16 bits to nearest, ties to even
            bits += 0x7FFF + ((bits >> 16) & 1)
        return struct.unpack("<f", struct.pack("<I", bits & 0xFFFF0000))[0]
    return as_float32


# Eager calls' ticket counters: per (device, stream), a list of zeroed int32 buffers, the last one in use. Every
# kernel that draws tickets resets each counter it used to zero before it exits, so a buffer is zeroed once, when it
# is made, and any op may use it after any other on the same stream (launches on one stream never overlap). Buffers
# are never freed: a CUDA graph captured with one keeps its address, so a larger one is added beside it.
_COUNTERS: dict = {}
_MIN_COUNTERS = 4096


def ticket_counters(n: int, like: torch.Tensor, zeroed_by_earlier_launch: bool = False) -> torch.Tensor:
    """``n`` zeroed int32 ticket counters on ``like``'s device for one launch of a split-and-merge kernel.

    Traced (Inductor), a fresh zeroed tensor: no device tensor may be cached across traces, and Inductor
    allocates it like any other buffer (and zeroes it with a kernel of its own). With
    ``zeroed_by_earlier_launch`` the caller's earlier launch on the same stream stores the zeros instead, so a
    traced call gets an uninitialised buffer and no fill kernel. Eagerly, the cached buffer of the current stream
    (two launches on one stream never overlap; launches on different streams use different buffers); counters
    that an earlier launch zeroes come from a second cached buffer, so that launch may use the first one's
    counters meanwhile. The kernel must leave every counter it used at zero.
    """
    if tracing(like):
        if zeroed_by_earlier_launch:
            return torch.empty(n, dtype=torch.int32, device=like.device)
        return torch.zeros(n, dtype=torch.int32, device=like.device)
    stream = torch.cuda.current_stream(like.device).cuda_stream if like.is_cuda else 0
    bufs = _COUNTERS.setdefault((like.device, stream, zeroed_by_earlier_launch), [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=like.device))
    return bufs[-1]


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SM count of ``device``, which sizes split and persistent grids (cached: the property query is slow next to
    a decode step); 1 off CUDA, where the interpreter runs programs one by one and few splits keep tests fast."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
