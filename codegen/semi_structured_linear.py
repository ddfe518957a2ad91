"""2:4 semi-structured linear: ``y = x Wᵀ + b``, ``W`` a :class:`~sparsecc.weights.SemiStructuredWeight`.

Layout of this file: module notes, then the reference section, then the cuSPARSELt path
(no Triton: the sparse tensor cores are driven by NVIDIA's cuSPARSELt through torch's private
``_cslt_*`` ops; notes above that section).
"""

from __future__ import annotations

import functools
import statistics
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsecc.activations import BY_NAME
from sparsecc.codegen.cusparselt_plan import compressed_rows, on_device, planned_product, split_mode_code
from sparsecc.codegen.epilogue import EPILOGUES, activation_ref
from sparsecc.weights import GROUP, KEPT, SemiStructuredWeight
from sparsecc.timing import call_seconds

__all__ = ["semi_structured_linear_ref", "semi_structured_linear", "semi_structured_linear_act",
           "cusparselt_available", "prepared_weight", "fastest_algorithm", "FUSED_ACTIVATIONS", "CsltConfig",
           "cslt_operand", "cslt_operand_reason", "search_settings", "planned_settings", "config_of",
           "steady_call_seconds"]

# ============================================================== reference


def semi_structured_linear_ref(x: Tensor, weight: SemiStructuredWeight, bias: Optional[Tensor] = None) -> Tensor:
    """Reference ``x [..., K] -> [..., N]`` for a 2:4 weight.

    Decompresses the weight and runs a dense product: 2:4 saves work only in
    hardware sparse tensor cores, so a reference gains nothing by gathering.
    Accumulates in float32 (float64 inputs stay float64); the output has ``x.dtype``.
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features; the weight expects K={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to_dense().to(acc)
    out = F.linear(x.to(acc), w, None if bias is None else bias.to(acc))
    return out.to(x.dtype)


# ============================================================== cuSPARSELt path
#
# torch exposes cuSPARSELt as two private ops (present in torch 2.1+; torch 2.11 signature):
#   torch._cslt_compress(dense [R, C]) -> packed values + metadata, one buffer;
#   torch._cslt_sparse_mm(packed, dense_B, bias=None, alpha=None, out_dtype=None,
#                         transpose_result=False, alg_id=0, split_k=1, split_k_mode=-1).
# The sparse operand is the left one, so a linear runs as yᵀ = W @ xᵀ with W [N, K] 2:4 along K
# (the layout of SemiStructuredWeight); ``transpose_result=True`` writes y [M, N] row-major
# directly, and ``bias`` (length N, one per row of W @ xᵀ) is added inside the matmul.
# Limits (torch.sparse.semi_structured, cuSPARSELt backend): float16 / bfloat16 (also int8 /
# float8, unused here), both sparse dims multiples of 16, the dense operand's dims multiples of 8
# (x is zero-padded to a multiple of 8 tokens; padded rows are dropped from the result).
# cuSPARSELt itself has fused ReLU / GELU epilogues, but ``_cslt_sparse_mm`` does not expose them
# and cuSPARSELt has no SiLU, so activations run as one in-place pass over y after the matmul.
#
# A compiled model passes the operand bound at compile time (``packed``, see passes/linear.py), so
# nothing is built on its calls. Otherwise (direct calls, another dtype than the bound one) the
# compressed buffer is built once per weight and cached by the identity of the (values,
# indices) tensors and their ``_version``: an in-place recompression at a weight update bumps the
# version and the next call rebuilds. A weight cuSPARSELt refuses is remembered as dense (its
# decompressed copy), so it pays the refusal once and then runs cuBLAS.

SPARSE_MULTIPLE = 16  # both dims of the 2:4 operand (torch's cuSPARSELt constraints, fp16/bf16)
DENSE_MULTIPLE = 8    # both dims of the dense operand
CSLT_DTYPES = (torch.float16, torch.bfloat16)
SEARCH_DTYPES = (torch.bfloat16,)  # dtypes whose cuSPARSELt algorithm search is safe (see search_settings)
FUSED_ACTIVATIONS = tuple(EPILOGUES)  # "none" and every activation of sparsecc.activations


def cusparselt_available() -> bool:
    """True when this torch build has cuSPARSELt and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    return bool(backend is not None and backend.is_available())


@dataclass
class _Entry:
    """One cached weight: weakrefs to its tensors, their versions, and the prepared operand. For an operand bound
    at compile time (:func:`_bound_entry`) ``values`` refers to the operand and only ``algs`` is used."""

    values: weakref.ref
    indices: weakref.ref
    versions: Tuple[int, int]
    dtype: torch.dtype
    packed: Optional[Tensor]  # cuSPARSELt buffer, or None when the weight runs dense
    dense: Optional[Tensor]   # decompressed weight when cuSPARSELt refused it
    reason: str = ""
    # cuSPARSELt settings (CsltConfig) per power-of-two token bucket, searched on first use (see _algorithm).
    algs: Dict[int, "CsltConfig"] = field(default_factory=dict)


_CACHE: Dict[Tuple[int, torch.dtype], _Entry] = {}
_CACHE_MAX = 512  # distinct (weight, dtype) pairs held at once; the oldest is dropped beyond this


def _forget(key: Tuple[int, torch.dtype], dead: weakref.ref) -> None:
    """Drop the prepared operand of a weight whose values tensor died (unless a newer weight owns the key)."""
    hit = _CACHE.get(key)
    if hit is not None and hit.values is dead:
        del _CACHE[key]


def _unsupported_reason(n: int, k: int, dtype: torch.dtype, device: torch.device) -> str:
    """Why cuSPARSELt cannot take this weight ('' when it can)."""
    if device.type != "cuda":
        return f"device {device.type} (cuSPARSELt is CUDA only)"
    if dtype not in CSLT_DTYPES:
        return f"dtype {dtype} (cuSPARSELt path takes {CSLT_DTYPES})"
    if n % SPARSE_MULTIPLE or k % SPARSE_MULTIPLE:
        return f"shape {n}x{k}: both dims must be multiples of {SPARSE_MULTIPLE}"
    if not cusparselt_available():
        return "this torch build has no cuSPARSELt"
    return ""


def prepared_weight(values: Tensor, indices: Tensor, n: int, k: int, dtype: torch.dtype) -> _Entry:
    """The cached cuSPARSELt operand (or dense fallback) of one 2:4 weight in ``dtype``.

    Built on the first call for these (values, indices) tensors and rebuilt
    when either is updated in place (its ``_version`` changes) or replaced.
    """
    key = (id(values), dtype)
    hit = _CACHE.get(key)
    if hit is not None and hit.values() is values and hit.indices() is indices \
            and hit.versions == (values._version, indices._version):
        return hit
    dense = SemiStructuredWeight(values=values, indices=indices, shape=(n, k)).to_dense().to(dtype).contiguous()
    reason = _unsupported_reason(n, k, dtype, values.device)
    packed = None
    if not reason:
        try:
            packed = torch._cslt_compress(dense)
        except RuntimeError as err:  # a shape or build cuSPARSELt rejects: run dense, correctly
            reason = f"cuSPARSELt refused the weight ({err})"
    entry = _Entry(values=weakref.ref(values, functools.partial(_forget, key)), indices=weakref.ref(indices),
                   versions=(values._version, indices._version), dtype=dtype, packed=packed,
                   dense=None if packed is not None else dense, reason=reason)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = entry
    return entry


class CsltConfig(NamedTuple):
    """How cuSPARSELt runs one product: its algorithm id and split-K settings (the defaults: id 0, no split).

    ``split_k_mode`` is the build's third setting as its search returns it (torch 2.11 and 2.13:
    ``split_k_mode``, an int, -1 its default; some builds name it ``split_k_one_kernel``, a bool); None leaves
    the op's default.
    """

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: object = None


@functools.lru_cache(maxsize=1)
def _split_mode_argument() -> str:
    """The name of ``_cslt_sparse_mm``'s last argument in this build (``split_k_mode`` or ``split_k_one_kernel``)."""
    return torch.ops.aten._cslt_sparse_mm.default._schema.arguments[-1].name


def _cslt_matmul(x2: Tensor, packed: Tensor, bias: Optional[Tensor], config: CsltConfig,
                 n: Optional[int] = None) -> Tensor:
    """``x2 [M, K] @ Wᵀ (+ bias)`` through cuSPARSELt, padding M to the dense operand's multiple.

    Runs a plan made once per shape and settings (:mod:`sparsecc.codegen.cusparselt_plan`) where the library can be
    used that way, else torch's ``_cslt_sparse_mm``, which makes the plan again on every call. ``n`` is W's row
    count (default: read from the buffer's length, ``compressed_rows``).
    """
    m, k = x2.shape
    pad = (-m) % DENSE_MULTIPLE
    xp = (torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2).contiguous()
    rows = n if n is not None else compressed_rows(packed, k)
    y = planned_product(packed, xp, rows, bias, (config.alg_id, config.split_k, config.split_k_mode))
    if y is None:
        settings = {"alg_id": config.alg_id}
        if config.split_k != 1:
            settings["split_k"] = config.split_k
        mode = split_mode_code(config.split_k_mode)
        if mode is not None:
            name = _split_mode_argument()
            settings[name] = (mode == 1) if name == "split_k_one_kernel" else mode
        # xp.t() is the [K, M] operand in column-major order, which cuSPARSELt takes without a copy.
        y = torch._cslt_sparse_mm(packed, xp.t(), bias=bias, transpose_result=True, **settings)
    return y.narrow(0, 0, m) if pad else y


def _search_once(packed: Tensor, xt: Tensor, bias: Optional[Tensor]) -> CsltConfig:
    """One cuSPARSELt search: ``torch._C._cusparselt.mm_search`` where the build has it (algorithm and split-K),
    else ``torch._cslt_sparse_mm_search`` (the algorithm only; deprecated in torch 2.11). RuntimeError or
    TypeError when the build cannot search."""
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is not None:
        alg_id, split_k, split_k_mode, _ = mm_search(packed, xt, bias, None, None, True)
        if int(split_k) == 1 and split_k_mode == -1:   # no split, the op's own defaults: the same as CsltConfig()
            split_k_mode = None
        return CsltConfig(int(alg_id), int(split_k), split_k_mode)
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        raise RuntimeError("this torch build has no cuSPARSELt search")
    return CsltConfig(int(search(packed, xt, bias=bias, transpose_result=True)))


SEARCH_ROUNDS = 3   # cuSPARSELt's search times each candidate once: its pick differs between runs
TIMED_CALLS = 5     # samples per candidate when the picks are timed against each other (median)
CALLS_PER_SAMPLE = 10   # back-to-back calls in one sample: the device's steady-state time, not one call's host setup


def steady_call_seconds(fn: Callable[[], object]) -> float:
    """Seconds per call of ``fn`` over :data:`CALLS_PER_SAMPLE` back-to-back calls on the current CUDA device.

    One call timed alone between two events also counts the host's set-up of that call while the device waits
    (cuSPARSELt builds its plan on every ``_cslt_sparse_mm`` call); such single calls read 50-100% above the
    steady state on an H100 at 8192 tokens (bench/RESULTS.md, 2026-12-07), which made the pick close to arbitrary.
    """
    def calls():
        for _ in range(CALLS_PER_SAMPLE):
            fn()
    return call_seconds(calls, torch.device("cuda", torch.cuda.current_device())) / CALLS_PER_SAMPLE


def fastest_algorithm(candidates: Sequence, call: Callable[[object], object],
                      time_call: Optional[Callable[[Callable[[], object]], float]] = None):
    """The candidate whose ``call(alg)`` takes the least median time over :data:`TIMED_CALLS` samples.

    Each candidate is called once first (its set-up), then the candidates are timed in turns, one sample each
    per round: the first call of a compiled model comes after a compile that left the GPU idle, and its
    clocks ramp up while the candidates are timed, which must not favour the ones timed last.
    ``time_call(fn)`` times ``fn`` (default: :func:`steady_call_seconds`); ties keep the earlier candidate.
    """
    time_call = time_call or steady_call_seconds
    for alg in candidates:
        call(alg)
    times = {alg: [] for alg in candidates}
    for _ in range(TIMED_CALLS):
        for alg in candidates:
            times[alg].append(time_call(lambda: call(alg)))
    medians = {alg: statistics.median(t) for alg, t in times.items()}
    return min(candidates, key=lambda alg: medians[alg])   # min keeps the first of equal medians


def search_settings(packed: Tensor, x2: Tensor, bias: Optional[Tensor], n: Optional[int] = None) -> CsltConfig:
    """cuSPARSELt's fastest settings for ``x2 [M, K] @ Wᵀ (+ bias)`` with the operand ``packed``, found on the device.

    The default algorithm (id 0) is far from the best at large M on an H100:
    at M = 8192, 4096 -> 14336, bf16 the searched id ran the fused product in
    1.13 ms against 1.88 ms (bench/ffn.py, bench/RESULTS.md). One search times
    each candidate once and its pick varies between runs (on an H200 at
    M = 8192 a pick ran the fused product in 1.12 ms where another pick of the
    same weight ran it in 1.04 ms), so the search runs :data:`SEARCH_ROUNDS`
    times and the distinct picks and id 0 are timed against each other
    (:func:`fastest_algorithm`). A pick carries the split-K settings the
    search chose where the build reports them (:func:`_search_once`); the
    older search reports only the id, which then runs without a split. A
    build without a search, or a search that fails, leaves id 0 (correct).

    Only bfloat16 operands are searched (:data:`SEARCH_DTYPES`): with float16
    operands the search itself fails inside cuSPARSELt on the H100 (torch
    2.11: "internal error when calling cusparseLtMatmulSearch" at M = 1, 16
    and 128, 14336 x 4096), and without CUDA_LAUNCH_BLOCKING the failure
    surfaces later as an illegal instruction that poisons the CUDA context, so
    it cannot be caught and retried. Float16 keeps the default algorithm.
    Never searches while a CUDA graph is being captured (the default then). Runs and times on the operand's
    device. ``n`` is W's row count (see :func:`_cslt_matmul`).
    """
    config = CsltConfig()
    if x2.dtype not in SEARCH_DTYPES or torch.cuda.is_current_stream_capturing():
        return config
    m = x2.shape[0]
    xp = torch.nn.functional.pad(x2, (0, 0, 0, (-m) % DENSE_MULTIPLE)).contiguous()
    candidates = [config]
    with on_device(packed.device):
        for _ in range(SEARCH_ROUNDS):
            try:
                pick = _search_once(packed, xp.t(), bias)
            except (RuntimeError, TypeError):  # no search in this build: the default algorithm is correct
                break
            if pick not in candidates:
                candidates.append(pick)
        if len(candidates) > 1:
            config = fastest_algorithm(candidates, lambda c: _cslt_matmul(x2, packed, bias, c, n))
    return config


def _algorithm(entry: _Entry, x2: Tensor, bias: Optional[Tensor], packed: Optional[Tensor] = None,
               n: Optional[int] = None) -> CsltConfig:
    """:func:`search_settings` for this weight at this token count, searched once per power-of-two bucket (on the
    first call of a shape, never per call). ``packed`` is the operand to search with (default: the entry's own),
    ``n`` W's row count."""
    packed = entry.packed if packed is None else packed
    bucket = 1 << max(0, x2.shape[0] - 1).bit_length()
    config = entry.algs.get(bucket)
    if config is None:
        if entry.dtype not in SEARCH_DTYPES:
            config = entry.algs[bucket] = CsltConfig()
        elif torch.cuda.is_current_stream_capturing():
            return CsltConfig()     # not cached: searched on the first call outside a capture
        else:
            config = entry.algs[bucket] = search_settings(packed, x2, bias, n)
    return config


# Settings planned at compile time, by (operand rows, operand length, dtype, device, tokens, has bias).
_PLANNED: Dict[tuple, CsltConfig] = {}


def planned_settings(packed: Tensor, tokens: int, out_features: int, in_features: int,
                     has_bias: bool) -> Tuple[CsltConfig, str]:
    """The settings a compiled call of ``tokens`` x ``in_features`` -> ``out_features`` runs with, and how they were
    chosen (for the report).

    Searched once per shape on the operand's device with random inputs of that shape (the settings depend on the
    shapes and dtype only, not on the values), then cached for every site of the same shape.
    """
    n = out_features
    key = (n, packed.numel(), packed.dtype, packed.device, tokens, has_bias)
    if packed.dtype not in SEARCH_DTYPES:
        return CsltConfig(), f"cuSPARSELt's default algorithm ({packed.dtype} operands are not searched)"
    config = _PLANNED.get(key)
    if config is None:
        generator = torch.Generator(device=packed.device).manual_seed(0)
        x2 = torch.randn(tokens, in_features, device=packed.device, dtype=packed.dtype, generator=generator)
        bias = torch.randn(n, device=packed.device, dtype=packed.dtype, generator=generator) if has_bias else None
        config = _PLANNED[key] = search_settings(packed, x2, bias, n)
    return config, f"searched at compile time for {tokens} tokens"


def config_of(alg_id: int, split_k: int, split_k_mode: int) -> Optional[CsltConfig]:
    """The :class:`CsltConfig` of an op's planned arguments (None for ``alg_id`` -1: searched on the first call)."""
    if alg_id < 0:
        return None
    return CsltConfig(alg_id, split_k, split_mode_code(split_k_mode))


def semi_structured_linear_act(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None,
                               activation: str = "none", alg_id: Optional[int] = None,
                               packed: Optional[Tensor] = None, config: Optional[CsltConfig] = None) -> Tensor:
    """``act(x Wᵀ + b)`` for a 2:4 weight: cuSPARSELt matmul with the bias fused, then ``act`` in place.

    ``values`` / ``indices`` are a :class:`SemiStructuredWeight`'s tensors
    (N = ``values.shape[0]``, K = ``x.shape[-1]``). On CUDA with float16 /
    bfloat16 and dims that are multiples of 16, the weight is compressed for
    cuSPARSELt once (cached) and the product runs on sparse tensor cores; any
    other CUDA case (float32, other dims) runs the decompressed weight, cached
    the same way, through cuBLAS; CPU and float64 run the reference. Every
    input gets the right answer.
    ``activation`` is one of :data:`FUSED_ACTIVATIONS`; ``config`` (or, for
    benchmarks, ``alg_id`` alone) gives cuSPARSELt's settings; with neither,
    the settings cuSPARSELt's search picked for this weight and token count
    are used (searched once, cached).
    ``packed`` is the weight's cuSPARSELt operand made ahead (:func:`cslt_operand`); when its dtype and device
    are ``x``'s, it runs as it is (nothing is allocated and kept on the first call, so the call may be captured
    by a CUDA graph), else the cached operand of ``x``'s dtype is used, compressed on the first call.
    With both ``packed`` and ``config`` the call is only the product (and the activation): what a compiled call
    with settings planned at compile time runs. ``config`` applies to ``packed`` only: when ``packed`` cannot be
    used (another dtype or device than ``x``), the cached operand's settings are searched instead.
    """
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not allowed; expected one of {FUSED_ACTIVATIONS}")
    n, k = values.shape[0], x.shape[-1]
    if values.shape[1] * GROUP != k * KEPT:
        raise ValueError(f"x has {k} input features; the 2:4 weight stores {values.shape[1]} values per row "
                         f"(K = {values.shape[1] * GROUP // KEPT})")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x.device.type != "cuda" or x.dtype == torch.float64 or x2.shape[0] == 0:
        weight = SemiStructuredWeight(values=values, indices=indices, shape=(n, k))
        y = activation_ref(activation)(semi_structured_linear_ref(x2, weight, bias).to(
            torch.float64 if x.dtype == torch.float64 else torch.float32)).to(x.dtype)
        return y.reshape(*lead, n)
    b = bias.to(x.dtype).contiguous() if bias is not None else None
    if packed is not None and packed.dtype == x.dtype and packed.device == x.device:
        entry, operand = None, packed
    else:   # not the bound operand: settings planned for it do not apply to this one
        entry, config = prepared_weight(values, indices, n, k, x.dtype), None
        operand = entry.packed
    if config is None and alg_id is not None:
        config = CsltConfig(alg_id)
    if operand is not None:
        if config is None:
            config = _algorithm(entry if entry is not None else _bound_entry(packed), x2, b, operand, n)
        y = _cslt_matmul(x2, operand, b, config, n)
    else:
        y = torch.nn.functional.linear(x2, entry.dense, b)
    if activation != "none":
        y = _activation_inplace(y, activation)
    return y.reshape(*lead, n)


def _activation_inplace(y: Tensor, activation: str) -> Tensor:
    """Apply an activation of the table to ``y``, in place where it has an in-place form (one pass, no buffer)."""
    entry = BY_NAME[activation]
    return (entry.inplace or entry.torch)(y)


def semi_structured_linear(x: Tensor, values: Tensor, indices: Tensor, bias: Optional[Tensor] = None,
                           packed: Optional[Tensor] = None, config: Optional[CsltConfig] = None) -> Tensor:
    """The ``sparsecc::semi_structured_linear`` kernel: ``x Wᵀ + b`` through cuSPARSELt (see above).

    ``packed`` (optional) is the weight's cuSPARSELt operand bound at compile time (:func:`cslt_operand`);
    ``config`` the settings planned for it (:func:`planned_settings`), None to search on the first call.
    """
    return semi_structured_linear_act(x, values, indices, bias, "none", packed=packed, config=config)


def cslt_operand_reason(n: int, k: int, dtype: torch.dtype, device: torch.device) -> str:
    """Why a 2:4 weight [n, k] of ``dtype`` on ``device`` cannot be bound as a cuSPARSELt operand ('' if it can)."""
    return _unsupported_reason(n, k, dtype, device)


def cslt_operand(weight: SemiStructuredWeight, dtype: torch.dtype) -> Tensor:
    """cuSPARSELt's compressed operand of a 2:4 weight in ``dtype`` (the pruned weight through
    ``torch._cslt_compress``): what the kernel runs when it is passed as ``packed``."""
    return torch._cslt_compress(weight.to_dense().to(dtype).contiguous())


# Entries for bound operands, by id of the operand tensor: the algorithm cache only (the operand is the caller's).
_BOUND: Dict[int, _Entry] = {}


def _bound_entry(packed: Tensor) -> _Entry:
    """The algorithm cache of a bound operand, kept while the operand lives (a weight update refreshes the operand
    in place, which keeps its algorithms: they depend on the shapes only)."""
    key = id(packed)
    hit = _BOUND.get(key)
    if hit is None or hit.values() is not packed:
        hit = _Entry(values=weakref.ref(packed, lambda _, key=key: _BOUND.pop(key, None)), indices=None,
                     versions=(0, 0), dtype=packed.dtype, packed=None, dense=None)
        _BOUND[key] = hit
    return hit
