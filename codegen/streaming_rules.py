"""The streaming rule as the kernels take it, and which kernel a streaming call runs.

Per-head sinks and windows (validated), capped so that the kernels' bounds stay within int32 without changing the
kept keys (:func:`kernel_rules`), as device vectors (:func:`rule_vectors`); and the dispatch questions of
``block_attention.streaming_attention``: is the layout exactly dense, so SDPA serves the call (:func:`runs_sdpa`),
and does the call run the Gluon program for sm_90 (:func:`streaming_runs_hopper_program`, which the compiler's
plan asks too, with ``hopper_prefill.hopper_prefill_fits``) or the split-KV decode kernel
(:func:`streaming_runs_decode_kernel`, with the kernel's layout rule :func:`decode_supported`); the compiler's check
asks both with a site's facts, so that the cost model times the kernel that will run. Nothing here imports Triton.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from torch import Tensor

from sparsecc.codegen.hopper_prefill import hopper_prefill_fits
from sparsecc.codegen.launch import tracing
from sparsecc.layouts import FULL_WINDOW

__all__ = ["per_head_values", "per_head_rules", "streaming_rules_per_head", "streaming_is_dense", "runs_sdpa",
           "streaming_runs_hopper_program", "kernel_rules", "rule_vectors", "kernels_take", "decode_supported",
           "streaming_runs_decode_kernel", "KERNEL_DTYPES", "MAX_KERNEL_HEAD_DIM", "DECODE_MAX_Q", "MAX_PACKED_ROWS"]

# Dtypes the Triton kernels take; others (fp32, fp64) run the reference, whose fp32 math is exact enough.
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# Largest head dim with a kernel config (bigger tiles would not fit in registers / shared memory).
MAX_KERNEL_HEAD_DIM = 256
# Queries of at most this many rows go to the split-KV decode kernel instead of the prefill kernel.
DECODE_MAX_Q = 16
# Rows of one packed decode tile at most (G * Sq); wider groups use the prefill kernel.
MAX_PACKED_ROWS = 128


def per_head_values(values: Union[int, Sequence[int]], n_heads: int, name: str) -> list[int]:
    """``values`` (an int, or 1 or ``n_heads`` ints) as one int per head; ValueError names ``name`` otherwise."""
    vals = [values] if isinstance(values, int) else [int(x) for x in values]
    if len(vals) == 1:
        vals = vals * n_heads
    if len(vals) != n_heads:
        raise ValueError(f"{name} has {len(vals)} entries; expected 1 or H = {n_heads}")
    return vals


def per_head_rules(sinks: Sequence[int], windows: Sequence[int]) -> bool:
    """True when the heads' rules differ (the kernels then read per-head vectors instead of one rule's scalars)."""
    return len(set(sinks)) > 1 or len(set(windows)) > 1


def streaming_rules_per_head(sink, window, n_heads: int) -> tuple[list[int], list[int]]:
    """Per-head sink and window lists, validated (sink >= 0; window >= 1 or FULL_WINDOW)."""
    sinks, windows = per_head_values(sink, n_heads, "sink"), per_head_values(window, n_heads, "window")
    for s_, w_ in zip(sinks, windows):
        if s_ < 0 or (w_ < 1 and w_ != FULL_WINDOW):
            raise ValueError(f"sink={s_}, window={w_} is not allowed; expected sink >= 0 and window >= 1 "
                             f"or FULL_WINDOW ({FULL_WINDOW})")
    return sinks, windows


def streaming_is_dense(sinks: Sequence[int], windows: Sequence[int], sq: int, sk: int, causal: bool) -> bool:
    """True when every head keeps every (causally allowed) element, so the layout is plain dense attention."""
    # Causal distances p - j stay below Sk; bidirectional ones below Sk + Sq (queries may start before 0).
    reach = sk if causal else sk + sq
    return all(w == FULL_WINDOW or w >= reach or s >= sk for s, w in zip(sinks, windows))


def runs_sdpa(sinks: Sequence[int], windows: Sequence[int], sq, sk, causal: bool, masked: bool, return_lse: bool,
               device: torch.device) -> bool:
    """Whether a streaming call hands over to SDPA: an exactly dense layout, no mask or lse, aligned causality."""
    return (streaming_is_dense(sinks, windows, sq, sk, causal) and not masked and not return_lse
            and (sq == sk or not causal) and device.type == "cuda")


def streaming_runs_hopper_program(device: torch.device, dtypes: Sequence[torch.dtype], head_dims: Sequence[int],
                                  sq, sk, *, scale: float, causal: bool, masked: bool, return_lse: bool,
                                  sinks: Sequence[int], windows: Sequence[int]) -> bool:
    """Whether ``block_attention.streaming_attention`` sends a call with these facts to the Gluon program for
    sm_90: not a call for the reference (``scale <= 0``) or for SDPA (an exactly dense layout), and what
    :func:`~sparsecc.codegen.hopper_prefill.hopper_prefill_fits` takes. ``sinks`` / ``windows`` are per head as the
    op takes them. The wrapper takes these steps in this order (asking the fit with the rules it has already
    capped); the compiler's plan asks this function for its report."""
    if type(sq) is not int or type(sk) is not int or not scale > 0:   # symbolic lengths keep the traced kernels
        return False
    if runs_sdpa(sinks, windows, sq, sk, causal, masked, return_lse, device):
        return False
    snk, win = kernel_rules(sinks, windows, sq, sk)
    return hopper_prefill_fits(device, dtypes, head_dims, sq, sk, causal=causal, masked=masked,
                               return_lse=return_lse, sinks=snk, windows=win)


def kernel_rules(sinks: Sequence[int], windows: Sequence[int], sq: int, sk: int) -> tuple[list, list]:
    """Per-head sinks and windows as the kernels take them, keeping the same keys: a window longer than any
    distance, or FULL_WINDOW, becomes one window of ``sk + sq + 1`` (so the kernels' bounds arithmetic stays
    within int32), and a sink is clamped to the key length (0 for a FULL_WINDOW head)."""
    unlimited = sk + sq + 1
    win = [unlimited if w == FULL_WINDOW or w > unlimited else w for w in windows]
    snk = [0 if w == FULL_WINDOW else min(s_, sk) for s_, w in zip(sinks, windows)]
    return snk, win


def rule_vectors(sinks: tuple, windows: tuple, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head sink/window as int32 vectors on ``like``'s device.

    Eagerly they are cached per device (a host-to-device copy per call would stall launches); while the op
    is traced they become constants of Inductor's graph, made once when the compiled code loads.
    """
    if tracing(like):
        return _rule_vectors.__wrapped__(sinks, windows, like.device)   # the same vectors, uncached
    return _rule_vectors(sinks, windows, like.device)


@functools.lru_cache(maxsize=64)
def _rule_vectors(sinks: tuple, windows: tuple, device: torch.device) -> tuple[Tensor, Tensor]:
    return (torch.tensor(sinks, dtype=torch.int32, device=device),
            torch.tensor(windows, dtype=torch.int32, device=device))


def kernels_take(dtypes: Sequence[torch.dtype], head_dims: Sequence[int], scale: float, sq: int, sk: int) -> bool:
    """Whether the Triton attention kernels take q, k and v of these dtypes and head dims (else the reference runs):
    one dtype of :data:`KERNEL_DTYPES`, q's head dim equal to v's and at most :data:`MAX_KERNEL_HEAD_DIM`, a positive
    scale (the kernels fold it into the exponent after the row max) and no empty axis."""
    return (dtypes[0] in KERNEL_DTYPES and all(d == dtypes[0] for d in dtypes) and scale > 0
            and head_dims[0] == head_dims[2] and head_dims[0] <= MAX_KERNEL_HEAD_DIM and min(sq, sk) > 0)


def decode_supported(group: int, sq: int = 1) -> bool:
    """True when the decode kernel takes the layout: at most :data:`MAX_PACKED_ROWS` packed rows (``group * sq``:
    the query rows of one kv group's heads). The heads' rules may differ, within a kv group too (each kv head reads
    the keys of its group's widest rule once, each row keeps its own head's)."""
    return group * sq <= MAX_PACKED_ROWS


def streaming_runs_decode_kernel(device: torch.device, dtypes: Sequence[torch.dtype], head_dims: Sequence[int], sq,
                                 sk, *, scale: float, causal: bool, masked: bool, return_lse: bool,
                                 sinks: Sequence[int], windows: Sequence[int], kv_heads: int,
                                 positions_from_mask: bool = False, mask_heads: int = 1) -> bool:
    """Whether a streaming call with these facts runs the split-KV decode kernel (``codegen/decode_attention.py``).

    ``block_attention.streaming_attention`` takes these steps in this order: the Triton kernels take the inputs
    (:func:`kernels_take`, on CUDA), the layout is not exactly dense (:func:`runs_sdpa`), at most
    :data:`DECODE_MAX_Q` query rows (the Gluon prefill program takes none so short) and :func:`decode_supported`.
    ``positions_from_mask``: the op that reads the queries' positions from the mask
    (``streaming_decode_from_mask_op``), which runs the kernel for one query row before more keys and a mask
    shared by the heads (``mask_heads``, its head axis, is 1). ``sinks`` / ``windows`` are per head as the op takes
    them. ``sk`` None: a key
    length only known at run time (a growing cache), where the layout is taken as sparse unless every head is dense
    at any length. The compiler asks this with a site's facts, so that its cost estimate times the kernel that will
    run."""
    if type(sq) is not int or (sk is not None and type(sk) is not int) or device.type != "cuda":
        return False
    if not kernels_take(dtypes, head_dims, scale, sq, sq if sk is None else sk) or len(sinks) % kv_heads:
        return False
    group = len(sinks) // kv_heads
    if positions_from_mask:
        return sq == 1 and (sk is None or sq < sk) and mask_heads == 1 and decode_supported(group, sq)
    if sq > DECODE_MAX_Q:
        return False
    if sk is None:
        hands_over = not causal and not masked and not return_lse and all(w == FULL_WINDOW for w in windows)
    else:
        hands_over = runs_sdpa(sinks, windows, sq, sk, causal, masked, return_lse, device)
    return not hands_over and decode_supported(group, sq)
