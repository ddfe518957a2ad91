"""Which prefill calls run the Gluon programs for sm_90, and how they are launched.

``codegen/streaming_prefill_hopper.py`` holds three Gluon programs for the causal streaming layout and for
causal block tables on Hopper, the warp-specialised ones also persistent. In four runs (bench/RESULTS.md,
"Persistent programs") the persistent ping-pong program at 3 stages took less summed time than the one-tile
warp-specialised program the compiler ran before, 0.6-2.9% over the streaming lengths 16K-128K and 0.4-16% over
the random layouts (gains of the size of one figure's run-to-run noise), so :data:`VARIANT` is the one the
compiler dispatches to.

**Streaming.** A streaming call runs it when ``streaming_rules.streaming_runs_hopper_program`` says so (SDPA
keeps the exactly dense layouts) and, within that, :func:`hopper_prefill_fits`: an sm_90 GPU with Gluon's
Hopper module, a causal call without a mask or a log-sum-exp request, float16 / bfloat16, head dim 128 for q, k
and v, a static query count of at least :data:`MIN_ROWS` and no more queries than keys. The heads may have
different sinks and windows (dense heads among them): each query tile then reads its head's rule. Everything else
keeps the Triton kernels (decode-sized and short calls among them: traced into Inductor's graph, they launch with
no host work). The program takes TMA descriptors made on the host, which
Inductor's traced launches cannot carry, so under ``torch.compile`` the call is the opaque op
``torch.ops.sparsecc.streaming_prefill_sm90`` (its record is in ``attention_ops.py``): Inductor calls it through
the dispatcher, host work on calls that take milliseconds (which is why short calls keep the traced kernels).
Eager calls launch the program directly.

**Block tables.** ``block_sparse_attention`` runs the same program over a causal table of 128 x 128 blocks with
``Sq == Sk`` and no mask (:func:`hopper_table_fits`); the block-table op is always opaque, so these calls are
eager. The dynamic forms' per-call tables keep the Triton kernel.

The programs' argument checks (:func:`check_arguments`, :func:`check_table`) live here too, beside the rules, so
that they read without Gluon.

Nothing here imports Triton: the module is read on every streaming call, on every machine.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

__all__ = ["TILE", "HEAD_DIM", "MIN_ROWS", "VARIANT", "sm90_gluon", "program_takes", "hopper_prefill_fits",
           "check_arguments", "check_table",
           "hopper_prefill", "streaming_prefill_sm90_kernel", "hopper_table_fits", "hopper_table_runs",
           "hopper_table_prefill", "program_blocks"]

TILE = 128
"""The programs' query tile (rows) and key tile (keys); a block table's blocks must be this size."""

HEAD_DIM = 128
"""The one head dim the programs take (their key tile is one head dim wide)."""

MIN_ROWS = TILE
"""Fewest query rows that run the Gluon program: one query tile. Shorter calls (chunks, decode) keep the traced
Triton kernels, which Inductor launches with no host work."""

VARIANT = dict(stages=3, warp_specialized=True, pingpong=True, persistent=True)
"""The Gluon program streaming and block-table prefill run on sm_90 (bench/RESULTS.md, "Persistent programs")."""

_DTYPES = (torch.float16, torch.bfloat16)


def sm90_gluon(device: torch.device) -> bool:
    """True when ``device`` is an sm_90 GPU and the installed Triton has Gluon's Hopper module (cached per GPU;
    ``cuda`` without an index is the current one)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return _sm90_gluon(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _sm90_gluon(index: int) -> bool:
    if torch.cuda.get_device_capability(index) != (9, 0):
        return False
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


def program_takes(dtypes: Sequence[torch.dtype], head_dims: Sequence[int]) -> bool:
    """Whether the Gluon program takes q, k and v of these dtypes and head dims (one of float16 / bfloat16, 128)."""
    return all(d == dtypes[0] for d in dtypes) and dtypes[0] in _DTYPES and all(d == HEAD_DIM for d in head_dims)


def hopper_prefill_fits(device: torch.device, dtypes: Sequence[torch.dtype], head_dims: Sequence[int],
                        seq_q, seq_k, *, causal: bool, masked: bool, return_lse: bool,
                        sinks: Sequence[int], windows: Sequence[int]) -> bool:
    """Whether a streaming call with these facts runs the Gluon program (module notes).

    ``dtypes`` and ``head_dims`` are q's, k's and v's; ``seq_q`` / ``seq_k`` may be symbolic, and a symbolic
    query count keeps the Triton kernel (deciding on it would add a guard); ``sinks`` / ``windows`` are per
    head, as the kernels take them (``kernel_rules``)."""
    if type(seq_q) is not int or type(seq_k) is not int or not MIN_ROWS <= seq_q <= seq_k:
        return False   # first: a symbolic length also makes the per-head rules symbolic (unhashable)
    if not (causal and not masked and not return_lse) or not program_takes(dtypes, head_dims):
        return False
    return sm90_gluon(device)


def hopper_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: Sequence[int], windows: Sequence[int],
                   scale: float) -> torch.Tensor:
    """Run the Gluon program on a call :func:`hopper_prefill_fits` accepted (``sinks`` / ``windows``: one entry, or
    one per query head, in kernel form): directly on real tensors, as the opaque op ``streaming_prefill_sm90``
    while traced."""
    from sparsecc.codegen.launch import tracing

    sinks, windows = tuple(int(x) for x in sinks), tuple(int(x) for x in windows)
    if tracing(q, k, v):
        from sparsecc.codegen.attention_ops import STREAMING_PREFILL_SM90, HopperPrefillArgs

        return STREAMING_PREFILL_SM90.op()(*STREAMING_PREFILL_SM90.flatten(
            dict(q=q, k=k, v=v), HopperPrefillArgs(scale=scale, sink=sinks, window=windows)))
    return streaming_prefill_sm90_kernel(q, k, v, scale, sinks, windows)


def streaming_prefill_sm90_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                  sink: Sequence[int], window: Sequence[int]) -> torch.Tensor:
    """The ``streaming_prefill_sm90`` op's kernel callable (its argument order): the :data:`VARIANT` program;
    ``sink`` / ``window`` one entry each (every head) or one per query head."""
    from sparsecc.codegen.streaming_prefill_hopper import streaming_prefill_hopper

    return streaming_prefill_hopper(q, k, v, list(sink), list(window), scale, **VARIANT)


def check_arguments(q, k, v, sink, window, scale: float, stages: int, warp_specialized: bool = False,
                    persistent: bool = False) -> None:
    """Raise ValueError naming what the Gluon programs do not take (nothing is launched before this passes).
    ``sink`` and ``window`` are one integer each, or 1 or H of them (one per query head)."""
    # Imported here: streaming_rules imports this module.
    from sparsecc.codegen.streaming_rules import per_head_values

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"streaming_prefill_hopper takes 4-D q, k, v ([B, H, S, D]); got {q.dim()}-D, "
                         f"{k.dim()}-D, {v.dim()}-D")
    B, H, _, D = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"streaming_prefill_hopper takes float16 or bfloat16 q, k, v of one dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if D != HEAD_DIM or k.shape[3] != D or v.shape[3] != D:
        raise ValueError(f"streaming_prefill_hopper takes head dim {HEAD_DIM} for q, k and v; got {D}, {k.shape[3]}, "
                         f"{v.shape[3]}")
    if k.shape != v.shape or k.shape[0] != B or H % k.shape[1]:
        raise ValueError(f"streaming_prefill_hopper takes k and v of one shape [B, Hkv, Sk, D] with H % Hkv == 0; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    for s_ in per_head_values(sink, H, "sink"):
        if isinstance(s_, bool) or not isinstance(s_, int) or s_ < 0:
            raise ValueError(f"sink={s_!r} is not allowed; expected an integer >= 0")
    for w_ in per_head_values(window, H, "window"):
        if isinstance(w_, bool) or not isinstance(w_, int) or w_ < 1:
            raise ValueError(f"window={w_!r} is not allowed; expected an integer >= 1")
    if not scale > 0:   # the row max is taken on raw scores and scaled once per row (one FMA per score)
        raise ValueError(f"scale={scale!r} is not allowed; expected a number > 0")
    if stages < 2:      # a trip's stage is refilled only after the previous trip's P V: one stage would wait forever
        raise ValueError(f"stages={stages!r} is not allowed; expected an integer >= 2")
    if persistent and not warp_specialized:   # the software-pipelined program refills its ring within one tile
        raise ValueError("persistent=True is allowed only with warp_specialized=True")
    if not (q.is_cuda and k.device == q.device and v.device == q.device):
        raise ValueError(f"streaming_prefill_hopper runs on one CUDA device; got {q.device}, {k.device}, {v.device}")


def check_table(table, q, k) -> None:
    """Raise ValueError naming what the table programs do not take: a table that is not causal, blocks other than
    128 x 128, lengths other than the inputs' ``Sq == Sk``, a batch or head count that does not broadcast."""
    B, H, Sq = q.shape[:3]
    if not table.causal:
        raise ValueError("block_table_prefill_hopper takes a causal table")
    if (table.block_q, table.block_k) != (TILE, TILE):
        raise ValueError(f"block_table_prefill_hopper takes {TILE} x {TILE} table blocks; got "
                         f"{table.block_q} x {table.block_k}")
    if not (table.seq_q == table.seq_k == Sq == k.shape[2]):
        raise ValueError(f"block_table_prefill_hopper takes Sq == Sk and a table of those lengths; got Sq {Sq}, "
                         f"Sk {k.shape[2]}, table {table.seq_q} x {table.seq_k}")
    bt, ht = table.kv_num_blocks.shape[:2]
    if bt not in (1, B) or ht not in (1, H):
        raise ValueError(f"table batch/heads ({bt}, {ht}) must be 1 or the inputs' ({B}, {H})")


def hopper_table_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, *, masked: bool,
                      return_lse: bool) -> bool:
    """Whether a block-table call runs the Gluon program: an eager call (the block-table op is always opaque), a
    table of ``q`` and ``k``'s lengths, and what :func:`hopper_table_runs` takes."""
    from sparsecc.codegen.launch import tracing

    sq, sk = q.shape[2], k.shape[2]
    return (not tracing(q, k, v) and table.seq_q == sq and table.seq_k == sk and table.block_q == table.block_k
            and hopper_table_runs(q.device, (q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]),
                                  sq, sk, block=table.block_q, causal=table.causal, masked=masked,
                                  return_lse=return_lse))


def hopper_table_runs(device: torch.device, dtypes: Sequence[torch.dtype], head_dims: Sequence[int], seq_q, seq_k,
                      *, block: int, causal: bool, masked: bool, return_lse: bool) -> bool:
    """Whether a block-table call with these facts runs the Gluon program: an sm_90 GPU with Gluon, a causal table
    of ``TILE`` x ``TILE`` blocks over ``Sq == Sk`` (static, at least :data:`MIN_ROWS`) query rows and keys, no mask
    or lse request, and what :func:`program_takes`. The kernel wrapper asks it through :func:`hopper_table_fits`;
    the compiler asks it with a site's facts, so that the cost model times the program that will run."""
    if type(seq_q) is not int or type(seq_k) is not int or not MIN_ROWS <= seq_q == seq_k:
        return False
    return (causal and not masked and not return_lse and block == TILE and program_takes(dtypes, head_dims)
            and sm90_gluon(device))


def hopper_table_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table, scale: float) -> torch.Tensor:
    """Run the :data:`VARIANT` program over ``table`` on a call :func:`hopper_table_fits` accepted."""
    from sparsecc.codegen.streaming_prefill_hopper import block_table_prefill_hopper

    return block_table_prefill_hopper(q, k, v, table, scale, **VARIANT)


@functools.lru_cache(maxsize=16)
def program_blocks(table, device):
    """One int32 row per (table batch, table head, query block) on ``device``: ``[n_partial, n_trips, partial
    blocks..., full blocks...]``, padded to one width (entries past ``n_trips`` are never read), in the order of
    the table's ``[Bt, Ht, nQ]`` dims. Cached per table (tables are immutable)."""
    import torch.nn.functional as F

    num, idx = table.kv_num_blocks.to(device).int(), table.kv_indices.to(device).int()
    fnum, fidx = table.full_kv_num_blocks.to(device).int(), table.full_kv_indices.to(device).int()
    n_partial, n_full = idx.shape[-1], fidx.shape[-1]
    width = max(n_partial + n_full, 1)
    trip = torch.arange(width, device=device, dtype=torch.int64)
    lead = (*idx.shape[:-1], width)
    # One zero column each, so that an empty list gathers too; the clamped indices only feed masked-off entries.
    from_partial = F.pad(idx, (0, 1)).gather(-1, trip.clamp(max=n_partial).expand(lead))
    from_full = F.pad(fidx, (0, 1)).gather(-1, (trip - num[..., None]).clamp(0, n_full).expand(lead))
    blocks = torch.where(trip < num[..., None], from_partial, from_full)
    rows = torch.cat([num[..., None], (num + fnum)[..., None], blocks], dim=-1)
    return rows.reshape(-1, width + 2).contiguous()
