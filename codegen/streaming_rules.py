"""The streaming rule as the kernels take it, and which kernel a streaming call runs.

Per-head sinks and windows (validated), capped so that the kernels' bounds stay within int32 without changing the
kept keys (:func:`kernel_rules`), as device vectors (:func:`rule_vectors`); and the dispatch questions of
``block_attention.streaming_attention``: is the layout exactly dense, so SDPA serves the call (:func:`runs_sdpa`),
and does the call run the Gluon program for sm_90 (:func:`streaming_runs_hopper_program`, which the compiler's
plan asks too, with ``hopper_prefill.hopper_prefill_fits``). Nothing here imports Triton.
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from torch import Tensor

from sparsecc.codegen.hopper_prefill import hopper_prefill_fits
from sparsecc.codegen.launch import tracing
from sparsecc.layouts import FULL_WINDOW

__all__ = ["streaming_rules_per_head", "streaming_is_dense", "runs_sdpa", "streaming_runs_hopper_program",
           "kernel_rules", "rule_vectors"]


def _per_head(values: Union[int, Sequence[int]], n_heads: int, name: str) -> list[int]:
    vals = [values] if isinstance(values, int) else [int(x) for x in values]
    if len(vals) == 1:
        vals = vals * n_heads
    if len(vals) != n_heads:
        raise ValueError(f"{name} has {len(vals)} entries; expected 1 or H = {n_heads}")
    return vals


def streaming_rules_per_head(sink, window, n_heads: int) -> tuple[list[int], list[int]]:
    """Per-head sink and window lists, validated (sink >= 0; window >= 1 or FULL_WINDOW)."""
    sinks, windows = _per_head(sink, n_heads, "sink"), _per_head(window, n_heads, "window")
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
