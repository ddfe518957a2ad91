"""FLOPs, bytes, inner-loop steps and programs of every form and its dense counterpart, as sympy expressions.

Shapes are sympy symbols (or numbers), so one formula serves static shapes
(substitute and evaluate) and symbolic ones (keep the sequence length free and
search for the crossover). Attention work is counted in key/value blocks of
``ATTENTION_BLOCK`` tokens, the granularity the kernels work at: that is where
causality, the sink and window geometry and block rounding enter.

Time is not a sympy expression: the work is evaluated to plain numbers first
(``Cost.kernels``, ``Cost.kernels_along``) and each kernel's time comes from
the one definition, ``sparsecc.cost.efficiency.kernel_seconds``::

    max(max(FLOPs * (1 + tile_overhead / steps) / (peak * eff_compute * occupancy),
            bytes / (bandwidth * eff_memory * occupancy)) + fixed, floor) + launches * launch_overhead
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import sympy as sp
import torch

from sparsecc.cost.efficiency import efficiency, side_seconds
from sparsecc.cost.hardware import HardwareProfile
from sparsecc.forms import BlockSparse, BlockTopK, BlockWeights, Streaming, TwoFour, VerticalSlash
from sparsecc.kernel_tiles import CONFIGS, ROW_MASS_TILE, pick_config

# Tokens per attention block: the kernels' key-block granularity (BLOCK_N = 128 on Hopper).
ATTENTION_BLOCK = 128
# A cdf-budget block_topk keeps an input-dependent number of blocks. Assumed: this fraction of the causal
# blocks times cdf (XAttention and FlexPrefill report roughly 10-30% block density at thresholds near 0.9
# on long contexts), and this fraction for a min_mass budget (calibrated to a budget of that order). It only steers policy "auto"; the report shows the estimate.
ASSUMED_CDF_BLOCK_FRACTION = 0.25

B, H, HKV, SQ, SK, D = sp.symbols("batch heads kv_heads seq_q seq_k head_dim", positive=True, integer=True)
M, N, K = sp.symbols("tokens out_features in_features", positive=True, integer=True)
ELEM = sp.Symbol("elem_bytes", positive=True)


@dataclass(frozen=True)
class Cost:
    """One kernel's work: FLOPs and bytes (sympy expressions), launches, and its efficiency family.

    ``steps`` is the inner-loop trip count of one output tile and ``programs``
    the number of output tiles launched (None: not modelled, e.g. library
    kernels); see ``sparsecc.cost.efficiency``. ``extra`` holds kernels that
    run before this one on every call (a dynamic form's estimate pass); their
    times add.
    """

    flops: sp.Expr
    bytes: sp.Expr
    launches: int
    family: str
    steps: Optional[sp.Expr] = None
    programs: Optional[sp.Expr] = None
    extra: Tuple["Cost", ...] = ()

    def chain(self) -> List["Cost"]:
        """This kernel, then its extra kernels (depth first): the order of ``kernels``."""
        return [self] + [k for e in self.extra for k in e.chain()]

    def kernels(self, values: Dict[sp.Symbol, float]) -> List[dict]:
        """This kernel and its extra kernels as plain numbers (``values`` substituted), for the refit."""
        def num(expr):
            return None if expr is None else float(expr.subs(values) if hasattr(expr, "subs") else expr)
        return [dict(family=c.family, flops=num(c.flops), nbytes=num(c.bytes), launches=c.launches,
                     steps=num(c.steps), programs=num(c.programs)) for c in self.chain()]

    def kernels_along(self, values: Dict[sp.Symbol, float],
                      along: Sequence[sp.Symbol]) -> Callable[[int], List[dict]]:
        """``kernels`` as a function of one size: every symbol in ``along`` takes its argument, ``values`` the rest.

        The crossover search evaluates a site at a few dozen lengths; each work
        expression is substituted once and compiled (``sympy.lambdify``), so a
        call costs microseconds where ``kernels`` (a ``subs`` per expression)
        costs tens of milliseconds.
        """
        size = sp.Symbol("size", positive=True, integer=True)
        subs = {**{k: v for k, v in values.items() if k not in along}, **{a: size for a in along}}

        def compiled(expr):
            if expr is None:
                return None
            fn = sp.lambdify(size, sp.sympify(expr).subs(subs), modules=[_LAMBDIFY_NAMES, "math"])
            return lambda v: float(fn(v))

        parts = [(c.family, c.launches, compiled(c.flops), compiled(c.bytes), compiled(c.steps),
                  compiled(c.programs)) for c in self.chain()]

        def at(v: int) -> List[dict]:
            return [dict(family=family, flops=flops(v), nbytes=nbytes(v), launches=launches,
                         steps=None if steps is None else steps(v), programs=None if programs is None else programs(v))
                    for family, launches, flops, nbytes, steps, programs in parts]
        return at


# How lambdify's generated code evaluates the functions the work expressions use (plain Python numbers).
_LAMBDIFY_NAMES = {"ceiling": math.ceil, "Max": max, "Min": min}


def kernels_seconds(kernels: Sequence[dict], hw: HardwareProfile, dtype: torch.dtype, host: bool = True) -> float:
    """Predicted seconds of ``kernels`` (``Cost.kernels`` dicts) on ``hw`` with the shipped efficiency table
    (``host`` False: replayed from a CUDA graph, without the per-call host floors)."""
    return side_seconds(kernels, efficiency, peak=hw.peak(dtype), bandwidth=hw.bandwidth,
                        launch_overhead_s=hw.launch_overhead_s, sm_count=hw.sm_count, host=host)


def _prefix_min(n, per_row):
    """sum over j = 1..n of min(j, per_row)."""
    return sp.Piecewise((n * (n + 1) / 2, n <= per_row), (per_row * (per_row + 1) / 2 + (n - per_row) * per_row,
                                                           True))


def _kept_causal_rows(nq, nk, per_row):
    """Kept blocks over causal query blocks, each keeping at most ``per_row``.

    Queries are the last ``nq`` blocks of ``nk`` (bottom-right alignment), so
    query block a may see ``nk - nq + a + 1`` key blocks.
    """
    offset = nk - nq
    return _prefix_min(offset + nq, per_row) - _prefix_min(offset, per_row)


def attention_blocks(form, seq_q, seq_k, causal: bool, dense_head_fraction=0) -> sp.Expr:
    """Kept (query block, key block) pairs per head, for ``form`` (None: dense)."""
    nq = sp.ceiling(seq_q / ATTENTION_BLOCK)
    nk = sp.ceiling(seq_k / ATTENTION_BLOCK)
    if causal:
        dense = nq * (nq + 1) / 2 if seq_q == seq_k else nq * nk - nq * (nq - 1) / 2
    else:
        dense = nq * nk
    if form is None:
        return dense
    if isinstance(form, Streaming):
        if form.window < 0:
            return dense
        sink_blocks = math.ceil(form.sink / ATTENTION_BLOCK)
        # a window of w tokens ending anywhere inside a query block spans this many key blocks
        window_blocks = math.ceil((form.window - 1) / ATTENTION_BLOCK) + 1
        per_row = sink_blocks + window_blocks if causal else sink_blocks + 2 * window_blocks - 1
    elif isinstance(form, BlockSparse):
        scale = form.block / ATTENTION_BLOCK   # the form's own blocks in kernel-block units
        band = (form.local_blocks if causal else 2 * form.local_blocks - 1) + form.global_blocks
        per_row = max(1, math.ceil((band + form.random_blocks) * scale))
    elif isinstance(form, BlockTopK) and form.cdf is not None:
        sparse = sp.Min(dense, sp.Max(nq, ASSUMED_CDF_BLOCK_FRACTION * form.cdf * dense))
        return dense_head_fraction * dense + (1 - dense_head_fraction) * sparse
    elif isinstance(form, BlockTopK) and form.min_mass is not None:
        # Input-dependent as well; assumed the cdf rule's fraction (a shared min_mass is calibrated to a budget).
        sparse = sp.Min(dense, sp.Max(nq, ASSUMED_CDF_BLOCK_FRACTION * dense))
        return dense_head_fraction * dense + (1 - dense_head_fraction) * sparse
    elif isinstance(form, BlockTopK):
        # sink + topk + the local band (one block wider when queries are not block-aligned), in kernel blocks
        kept = form.sink_blocks + form.topk + form.local_blocks + 1
        per_row = max(1, math.ceil(kept * form.block / ATTENTION_BLOCK))
    elif isinstance(form, VerticalSlash):
        # Budget-based estimate (docs/spec.md, vertical_slash). Assumed: the kept diagonals cluster (as in
        # MInference's measured patterns), so one query block's ranges span about S + block keys, read in
        # kernel tiles (one more for a range that starts off a tile boundary); the V kept columns are gathered
        # ATTENTION_BLOCK at a time. V and S are the budgets after MInference's minimums (30 and 50).
        n_cols = max(form.vertical, 30)
        n_diags = max(form.slash, 50)
        per_row = math.ceil(n_cols / ATTENTION_BLOCK) + math.ceil((n_diags + form.block) / ATTENTION_BLOCK) + 1
    else:
        raise TypeError(f"not an attention form: {form}")
    sparse = _kept_causal_rows(nq, nk, per_row) if causal else nq * sp.Min(nk, per_row)
    sparse = sp.Min(sparse, dense)
    return dense_head_fraction * dense + (1 - dense_head_fraction) * sparse


PROGRAMS = ("triton", "sm90", "decode")
"""Which kernels run a sparse attention call: ``"triton"``, the Triton kernels (every device); ``"sm90"``, the
Gluon programs for Hopper (``codegen/hopper_prefill.py``); ``"decode"``, the split-KV decode kernel of streaming
calls of at most 16 query rows (``codegen/decode_attention.py``), which reads only the kept K/V and is bound by
reading it (its dense counterpart, SDPA at a few query rows, is bound by reading all of K/V). The compiler knows
which will run a site when the kernels' own rules take its facts; each has its own efficiency families."""

# The families of the sm_90 Gluon programs: streaming windows, and the block-table program over static tables.
SM90_FAMILIES = {Streaming: "attention_sparse_sm90", BlockSparse: "attention_table_sm90"}


def attention_family(form, program: str = "triton") -> str:
    """Efficiency family of the kernel that runs ``form``: the layout decides how the kernel walks K/V.

    Streaming windows walk contiguous key blocks (L2 reuse between neighbouring
    query blocks); static block tables without random blocks are bands of a
    few blocks; random blocks and the tables a dynamic form builds per call
    scatter over the keys and have short rows. ``program`` "sm90": the Gluon
    program that runs streaming windows and static block tables on Hopper
    (one family per layout it takes; ValueError for a form it does not run).
    """
    if program not in PROGRAMS:
        raise ValueError(f"attention program {program!r} is not one of {list(PROGRAMS)}")
    if form is None:
        return "attention_dense_decode" if program == "decode" else "attention_dense"
    if program == "sm90":
        family = SM90_FAMILIES.get(type(form))
        if family is None:
            raise ValueError(f"no sm_90 Gluon program runs {form}; it runs {sorted(SM90_FAMILIES.values())}")
        return family
    if program == "decode":
        if not isinstance(form, Streaming):
            raise ValueError(f"the decode kernel runs streaming forms only, not {form}")
        return "attention_decode"
    if isinstance(form, Streaming):
        return "attention_sparse"
    if isinstance(form, BlockSparse) and form.random_blocks == 0:
        return "attention_block"
    return "attention_random"


def decode_kept_keys(form, seq_q, seq_k):
    """Keys of one kv head the decode kernel reads for ``form`` (None: dense, every key), never more than there are.

    The kernel reads whole key tiles: the sink's, and those the last query rows' window keys touch. A run of ``L =
    window + Sq - 1`` keys starting at a uniformly placed key touches ``(L - 1) / tile + 1`` tiles on average
    (``L / tile`` when it starts on a tile boundary, one more otherwise), so that expectation is taken: the cache
    length moves the window's alignment every step. Tiles of ``ATTENTION_BLOCK`` keys (the kernel's tile at decode
    up to head dim 128; 64-key tiles above it change the count by less than one tile).
    """
    if form is None:
        return seq_k
    window_tiles = (form.window + seq_q - 2) / sp.Integer(ATTENTION_BLOCK) + 1
    tiles = math.ceil(form.sink / ATTENTION_BLOCK) + window_tiles
    return sp.Min(seq_k, tiles * ATTENTION_BLOCK)


def attention_cost(form, causal: bool, dense_head_fraction=0, shapes=None, blocks=None,
                   program: str = "triton", kept_keys=None) -> Cost:
    """Cost of one attention call; ``form`` None is dense flash attention.

    ``blocks`` overrides the kept (query block, key block) pairs per head
    (the per-head mean a site computes); a dynamic form's estimate pass is
    attached as an extra kernel. ``program`` picks the kernels' efficiency
    families (:data:`PROGRAMS`, :func:`attention_family`); with "decode" the
    sparse side reads ``kept_keys`` keys per kv head (default
    :func:`decode_kept_keys`; a per-head mean for sites of several forms)
    instead of every key, and the dense side is SDPA's decode family.
    """
    s = {**dict(batch=B, heads=H, kv_heads=HKV, seq_q=SQ, seq_k=SK, head_dim=D), **(shapes or {})}
    if blocks is None:
        blocks = attention_blocks(form, s["seq_q"], s["seq_k"], causal, dense_head_fraction)
    # QK^T and PV: 2 * 2 * block^2 * D multiply-adds per kept block pair
    flops = 4 * s["batch"] * s["heads"] * blocks * ATTENTION_BLOCK**2 * s["head_dim"]
    keys = s["seq_k"]
    if program == "decode":
        if form is not None:
            keys = decode_kept_keys(form, s["seq_q"], s["seq_k"]) if kept_keys is None else kept_keys
        # A few query rows, not 128-row query blocks: QK^T and PV over the keys read, for each row.
        flops = 4 * s["batch"] * s["heads"] * s["seq_q"] * keys * s["head_dim"]
    nbytes = ELEM * s["head_dim"] * s["batch"] * (2 * s["heads"] * s["seq_q"] + 2 * s["kv_heads"] * keys)
    if form is None:
        return Cost(flops, nbytes, 1, attention_family(None, program))
    # one program per (head, query block) walks that row's kept key blocks
    steps = blocks / sp.ceiling(s["seq_q"] / ATTENTION_BLOCK)
    estimate = dynamic_estimate_cost(form, shapes)
    extra = () if estimate is None else (estimate,)
    return Cost(flops, nbytes, 1, attention_family(form, program), steps=steps, extra=extra)


def dynamic_estimate_cost(form, shapes=None) -> Optional[Cost]:
    """The per-call estimate and table build of a dynamic form (family "attention_estimate"); None when static.

    block_topk: pool q and k (one read of each), then ``qbar @ kbarᵀ`` over the
    (Sq / block) x (Sk / block) block grid and the table write (int32 per cell).
    With ``pool = "rows"``: two passes of the ``rows`` sampled rows of each query
    block over the keys they may see (half of them on average when causal,
    ``Sq = Sk``), each tile of sampled rows reading those keys once per pass,
    and a float32 score per cell (written, then read by the table kernel).
    vertical_slash: two passes of the last ``last_q`` queries over every key
    (softmax statistics, then column/diagonal sums), plus the per-query-block
    index (range starts/ends and columns, int32).
    """
    s = {**dict(batch=B, heads=H, kv_heads=HKV, seq_q=SQ, seq_k=SK, head_dim=D), **(shapes or {})}
    b, h, hkv, sq, sk, d = (s[n] for n in ("batch", "heads", "kv_heads", "seq_q", "seq_k", "head_dim"))
    if isinstance(form, BlockTopK) and form.pool == "rows":
        n_q = sp.ceiling(sq / form.block)
        cells = b * h * n_q * sp.ceiling(sk / form.block)
        seen = sk - sq / 2
        flops = 2 * 2 * b * h * n_q * form.rows * seen * d
        tiles = b * hkv * n_q * form.rows * (h / hkv) / ROW_MASS_TILE
        nbytes = 2 * ELEM * d * seen * sp.Max(b * hkv, tiles) + 8 * cells
        return Cost(flops, nbytes, 2, "attention_estimate")
    if isinstance(form, BlockTopK):
        cells = b * h * sp.ceiling(sq / form.block) * sp.ceiling(sk / form.block)
        flops = 2 * cells * d
        nbytes = ELEM * d * b * (h * sq + hkv * sk) + 4 * cells
        return Cost(flops, nbytes, 2, "attention_estimate")
    if isinstance(form, VerticalSlash):
        rows = sp.Min(sq, form.last_q)
        flops = 2 * 2 * b * h * rows * sk * d
        lanes = b * h * sp.ceiling(sq / form.block)
        nbytes = 2 * ELEM * d * b * h * sk + 4 * lanes * (2 * max(form.slash, 50) + max(form.vertical, 30) + 2)
        return Cost(flops, nbytes, 4, "attention_estimate")
    return None


def block_linear_programs(tokens, out_features, form: BlockWeights):
    """Programs the block-sparse linear kernel launches: token tiles x block rows (its ``pick_config`` tile)."""
    bm, bk = form.block
    rows = sp.ceiling(out_features / bm)
    if isinstance(tokens, (int, float)) or getattr(tokens, "is_number", False):
        tile = pick_config(int(tokens), bm, bk).BLOCK_M
        return sp.ceiling(sp.Integer(int(tokens)) / tile) * rows
    pieces = [(sp.ceiling(tokens / cfg.BLOCK_M) * rows, tokens >= m_min)
              for m_min, area, bm_min, cfg in CONFIGS if bm * bk <= area and bm >= bm_min]
    return sp.Piecewise(*pieces, (sp.ceiling(tokens / CONFIGS[-1][3].BLOCK_M) * rows, True))


def block_linear_family(tokens, form: BlockWeights) -> str:
    """"gemm_block_sparse_decode" when the kernel runs its decode tile (the smallest token tile, for few
    tokens: a different, latency-bound inner loop), else "gemm_block_sparse"; a symbolic count takes the latter."""
    if isinstance(tokens, (int, float)) or getattr(tokens, "is_number", False):
        smallest = min(cfg.BLOCK_M for *_, cfg in CONFIGS)
        if pick_config(int(tokens), *form.block).BLOCK_M == smallest:
            return "gemm_block_sparse_decode"
    return "gemm_block_sparse"


def linear_cost(form=None, activation_sparsity=None, shapes=None) -> Cost:
    """Cost of ``x[tokens, in] @ W[out, in]ᵀ`` dense, with a weight form, or with input activation sparsity."""
    s = {**dict(tokens=M, out_features=N, in_features=K), **(shapes or {})}
    t, n, k = s["tokens"], s["out_features"], s["in_features"]
    flops = 2 * t * n * k
    w_bytes = ELEM * n * k
    act_bytes = ELEM * t * (n + k)
    if form is None and activation_sparsity is None:
        return Cost(flops, w_bytes + act_bytes, 1, "gemm_dense")
    if isinstance(form, BlockWeights):
        # kept blocks plus one int32 column index per block
        index = 4 * n * k * form.density / (form.block[0] * form.block[1])
        steps = form.density * k / form.block[1]   # kept blocks per block row
        return Cost(flops * form.density, w_bytes * form.density + index + act_bytes, 1,
                    block_linear_family(t, form), steps=steps, programs=block_linear_programs(t, n, form))
    if isinstance(form, TwoFour):
        # half the values plus 2-bit metadata per kept value
        return Cost(flops / 2, w_bytes * sp.Rational(1, 2) + n * k / 8 + act_bytes, 1, "gemm_2to4")
    # activation sparsity: a weight row is read when any token keeps that input channel
    keep = 1 - sp.Float(activation_sparsity) ** t
    return Cost(flops * keep, w_bytes * keep + act_bytes, 1, "gemv_activation_sparse")


def gate_ffn_cost(d_model, d_ff, tokens, sparsity: float, gated: bool) -> Cost:
    """Gate-mode (CATS) FFN: the gate GEMV reads all of W_gate; up rows and down columns are read only for the
    neurons some token keeps (``1 - sparsity^tokens`` of them).

    Two parts with their own families, because they run at different rates
    on the H100 (``bench/crossover_h100.json``: at M = 1 the time is about
    0.086 ms + 0.094 ms x kept share, i.e. ~1.4 TB/s on the gate against
    ~2.5 TB/s on the kept rows): ``ffn_gate`` (the gate GEMV and threshold,
    fused with the up rows in the first launch) and ``ffn_gate_kept`` (the kept
    up rows and the compacted down GEMV, the second launch).
    """
    keep = 1 - sp.Float(sparsity) ** tokens
    gate = Cost(2 * tokens * d_model * d_ff, ELEM * (d_model * d_ff + tokens * (d_model + d_ff)), 1, "ffn_gate")
    kept_weights = d_model * d_ff * keep * (2 if gated else 1)
    kept = Cost(2 * tokens * kept_weights, ELEM * (kept_weights + tokens * (d_model + d_ff)), 1, "ffn_gate_kept")
    return Cost(gate.flops, gate.bytes, gate.launches, gate.family, extra=(kept,))
