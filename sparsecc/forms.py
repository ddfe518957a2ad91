"""Sparse forms: one frozen, validated dataclass per form.

A form is *what* sparsity is applied, independent of where (the spec decides
where) and of how it runs (codegen holds the kernels and their references).
Every form validates its fields in ``__post_init__`` and raises ``ValueError``
with the field name and the allowed values; the spec loader turns those into
``SpecError`` with the file and key path.

Exact semantics (the references in ``sparsecc.codegen`` implement these):

* ``Streaming(sink, window)``: with query position p and key position j,
  causal attention keeps (p, j) iff ``j <= p and (j < sink or p - j < window)``;
  bidirectional attention keeps it iff ``j < sink or p < sink or |p - j| < window``.
  When the query length Sq is shorter than the key length Sk, query row i has
  position ``p = i + Sk - Sq`` (queries are the last Sq positions).
* ``BlockSparse(block, local_blocks, global_blocks, random_blocks, seed)``:
  blocks are blocks of positions (query row i, at position ``p = i + Sk - Sq``,
  is in query block ``p // block``; key j in key block ``j // block``);
  query block a keeps key block b iff ``|a - b| < local_blocks``, or
  ``a < global_blocks`` or ``b < global_blocks``, or b is one of the
  ``random_blocks`` blocks drawn for (head, a) from ``seed``. Causality and the
  model's own mask are intersected afterwards, at token granularity.
* ``BlockTopK`` and ``VerticalSlash``: dynamic (per-input) block layouts; their
  exact estimate and selection rules are in the class docstrings below and in
  docs/spec.md, and ``sparsecc.codegen.dynamic_attention`` implements them.
* ``ActivationThreshold``: an input x of a chosen projection is replaced by
  ``x * (score > tau)``, where the score of channel i is ``|x_i|`` with
  ``criterion="magnitude"`` (the default) and ``|x_i| * ||W[:, i]||_2`` with
  ``criterion="weighted"`` (W the projection that consumes x, ``[out, in]``).
* ``TwoFour``: in every group of 4 consecutive input-dimension weights the 2
  with the largest magnitude are kept.
* ``BlockWeights(block=(bm, bk), density)``: the ``ceil(density * n_blocks)``
  (bm x bk) weight blocks with the largest Frobenius norm are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple, Union

ATTENTION_FORMS = ("dense", "streaming", "block_sparse", "block_topk", "vertical_slash")
# The attention forms whose layout is chosen per input, at run time.
DYNAMIC_ATTENTION_FORMS = ("block_topk", "vertical_slash")
# Block sizes of the dynamic forms: powers of two that the block-table kernel tiles (tl.dot needs >= 16).
DYNAMIC_BLOCK_SIZES = (16, 32, 64, 128, 256)
POOL_MODES = ("mean", "max", "rows")
# Query rows per block that block_topk's ``pool = "rows"`` estimate reads (powers of two, at most the block size).
SAMPLE_ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_SAMPLE_ROWS = 4
FFN_FORMS = ("dense", "activation_threshold")
LINEAR_FORMS = ("dense", "2:4", "block_weights")
FORMS_BY_KIND = {"attention": ATTENTION_FORMS, "ffn": FFN_FORMS, "linear": LINEAR_FORMS}

PRUNE_MODES = ("magnitude", "keep")
THRESHOLD_MODES = ("input", "gate")
# How a channel is scored against tau: |x_i| alone, or |x_i| times the norm of the weight column it multiplies.
THRESHOLD_CRITERIA = ("magnitude", "weighted")
# Which projections a threshold may name, per mode.
THRESHOLD_KEYS = {"input": ("input", "down"), "gate": ("gate",)}
WEIGHT_BLOCK_SIZES = (16, 32, 64, 128)


# Integers in a spec are signed 64-bit (TOML's own limit, docs/spec.md); forms hold every integer field to it.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
# docs/spec.md: an additive mask value (or a masked_fill value) at or below this hides its key. Models write -inf,
# finfo.min or -1e9 there; exp(-1e4) underflows to exactly 0 in float32, so such a key takes no part.
MASKED_LOGIT_MAX = -1.0e4


def _require(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
            allowed += " within the signed 64-bit range"
        raise ValueError(f"{name}={value!r} is not allowed; expected {allowed}")


def _is_int(value) -> bool:
    """A real integer (bools are not) within the signed 64-bit range."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def _is_number(value) -> bool:
    """A float, or an integer within the signed 64-bit range (where a number is expected, ints are accepted)."""
    return isinstance(value, float) or _is_int(value)


@dataclass(frozen=True)
class Dense:
    """The dense form: leave the site as the model wrote it."""

    name: str = field(default="dense", init=False)

    def __str__(self) -> str:
        return "dense"


@dataclass(frozen=True)
class Streaming:
    """Attention sink + sliding window (StreamingLLM)."""

    sink: int
    window: int
    name: str = field(default="streaming", init=False)

    def __post_init__(self):
        _require(_is_int(self.sink) and self.sink >= 0, "sink", self.sink, "an integer >= 0")
        _require(_is_int(self.window) and self.window >= 1, "window", self.window, "an integer >= 1")

    def __str__(self) -> str:
        return f"streaming(sink={self.sink}, window={self.window})"


@dataclass(frozen=True)
class BlockSparse:
    """BigBird-style static block layout: local band, global blocks, random blocks."""

    block: int = 64
    local_blocks: int = 1
    global_blocks: int = 0
    random_blocks: int = 0
    seed: int = 0
    name: str = field(default="block_sparse", init=False)

    def __post_init__(self):
        _require(_is_int(self.block) and self.block >= 1 and self.block & (self.block - 1) == 0,
                 "block", self.block, "a power of two >= 1 (e.g. 64 or 128)")
        _require(_is_int(self.local_blocks) and self.local_blocks >= 1,
                 "local_blocks", self.local_blocks, "an integer >= 1")
        _require(_is_int(self.global_blocks) and self.global_blocks >= 0,
                 "global_blocks", self.global_blocks, "an integer >= 0")
        _require(_is_int(self.random_blocks) and self.random_blocks >= 0,
                 "random_blocks", self.random_blocks, "an integer >= 0")
        _require(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")

    def __str__(self) -> str:
        return (f"block_sparse(block={self.block}, local={self.local_blocks}, "
                f"global={self.global_blocks}, random={self.random_blocks}, seed={self.seed})")


def _check_dynamic_block(block) -> None:
    _require(_is_int(block) and block in DYNAMIC_BLOCK_SIZES, "block", block,
             f"a power of two in 16..256 (one of {DYNAMIC_BLOCK_SIZES})")


@dataclass(frozen=True)
class BlockTopK:
    """Dynamic block sparsity: per (batch, head, query block), the key blocks with the highest estimated scores.

    Queries and keys are cut into blocks of ``block`` tokens (query blocks over
    rows, key blocks over positions; queries are the last Sq positions). The
    *estimate* of block pair (a, b) is ``scale * pool(q[a]) . pool(k[b])``,
    computed in float32, where ``pool`` is the mean (``pool="mean"``) or the
    per-feature maximum (``pool="max"``) over the block's real tokens (a ragged
    last block pools only the tokens it has), and k is the query head's GQA kv
    head. With ``pool="rows"`` it is instead the log of the attention mass that
    ``rows`` sampled query rows of block a put on key block b: exact float32
    softmax probabilities of those rows (the block's last real row, then every
    ``block // rows``-th row before it), summed over b's keys and averaged over
    the rows. In causal attention a pair with no causally allowed element is never
    a candidate and gets no probability mass.

    Always kept (when causally allowed): the *sink* blocks ``b < sink_blocks``
    and the *local* band ``lo(a) - local_blocks + 1 <= b <= hi(a)``, where
    ``lo(a)``/``hi(a)`` are the key blocks holding the first/last position of
    query block a (both equal a when Sq == Sk; ``local_blocks = 0`` keeps no band).
    The remaining candidates are ranked by estimate, highest first, ties to the
    lower block index; then

    * ``topk``: the first ``topk`` candidates are kept (all when fewer remain);
    * ``cdf``: with p the softmax of the estimates over all allowed key blocks
      of a, a candidate is kept iff the mass of the always-kept blocks plus the
      candidates ranked before it is below ``cdf`` (the shortest ranked prefix
      whose mass, with the always-kept blocks, reaches cdf);
    * ``min_mass``: a candidate is kept iff its p is at least ``min_mass`` (one
      threshold that any head, layer and query block can share, so the number
      kept follows the input).

    Exactly one of ``topk``, ``cdf`` and ``min_mass`` is set.
    """

    block: int = 64
    topk: Optional[int] = None
    cdf: Optional[float] = None
    min_mass: Optional[float] = None
    sink_blocks: int = 1
    local_blocks: int = 1
    pool: str = "mean"
    rows: Optional[int] = None
    name: str = field(default="block_topk", init=False)

    def __post_init__(self):
        _check_dynamic_block(self.block)
        budgets = (self.topk, self.cdf, self.min_mass)
        _require(sum(b is not None for b in budgets) == 1, "topk/cdf/min_mass", budgets,
                 "exactly one of topk (an integer >= 1), cdf (a number in (0, 1]) and min_mass (a number in (0, 1])")
        if self.topk is not None:
            _require(_is_int(self.topk) and self.topk >= 1, "topk", self.topk, "an integer >= 1")
        if self.cdf is not None:
            _require(_is_number(self.cdf) and 0.0 < self.cdf <= 1.0, "cdf", self.cdf, "a number in (0, 1]")
        if self.min_mass is not None:
            _require(_is_number(self.min_mass) and 0.0 < self.min_mass <= 1.0, "min_mass", self.min_mass,
                     "a number in (0, 1]")
        _require(_is_int(self.sink_blocks) and self.sink_blocks >= 0, "sink_blocks", self.sink_blocks,
                 "an integer >= 0")
        _require(_is_int(self.local_blocks) and self.local_blocks >= 0, "local_blocks", self.local_blocks,
                 "an integer >= 0")
        _require(isinstance(self.pool, str) and self.pool in POOL_MODES, "pool", self.pool,
                 f"one of {POOL_MODES}")
        if self.pool != "rows":
            _require(self.rows is None, "rows", self.rows, 'no value: rows is read only with pool = "rows"')
            return
        if self.rows is None:
            object.__setattr__(self, "rows", DEFAULT_SAMPLE_ROWS)
        _require(_is_int(self.rows) and self.rows in SAMPLE_ROW_COUNTS and self.rows <= self.block, "rows",
                 self.rows, f"one of {SAMPLE_ROW_COUNTS}, at most block={self.block}")

    def __str__(self) -> str:
        budget = (f"topk={self.topk}" if self.topk is not None else f"cdf={self.cdf:g}" if self.cdf is not None
                  else f"min_mass={self.min_mass:g}")
        pool = f"rows, rows={self.rows}" if self.pool == "rows" else self.pool
        return (f"block_topk(block={self.block}, {budget}, sink={self.sink_blocks}, "
                f"local={self.local_blocks}, pool={pool})")


@dataclass(frozen=True)
class VerticalSlash:
    """MInference's vertical-and-slash sparsity: kept key columns and diagonals, per input (docs/spec.md).

    Causal attention only (a non-causal call attends densely). Budgets
    ``V = min(Sk, max(vertical, 30))`` columns and ``S = min(Sk, max(slash, 50))``
    diagonals ``t = p - j``. The last ``min(last_q, Sq)`` rows (positions
    ``p = i + Sk - Sq``) give float32 causal softmax probabilities; columns score
    their sums, diagonals the sums along them. Columns ``j < 30`` and diagonals
    ``t < 100`` rank first (lower index first), then the others by score (ties
    to the lower index); the first V / S are kept. Per query block of ``block``
    rows (``end`` = its first position + block), the kept diagonals in
    descending t (those with ``t >= end`` skipped) become key ranges ``[e - block,
    e)`` with ``e = max(end - t, block)``, merged as MInference's
    ``convert_vertical_slash_indexes`` merges them (a range grows by ``block``
    when the next e is within one block of its end); kept columns in no range
    and before the last range's end are single keys. Row p attends those keys
    with ``j <= p``.
    """

    last_q: int
    vertical: int
    slash: int
    block: int = 64
    name: str = field(default="vertical_slash", init=False)

    def __post_init__(self):
        _require(_is_int(self.last_q) and self.last_q >= 1, "last_q", self.last_q, "an integer >= 1")
        _require(_is_int(self.vertical) and self.vertical >= 0, "vertical", self.vertical, "an integer >= 0")
        _require(_is_int(self.slash) and self.slash >= 0, "slash", self.slash, "an integer >= 0")
        _check_dynamic_block(self.block)

    def __str__(self) -> str:
        return (f"vertical_slash(last_q={self.last_q}, vertical={self.vertical}, slash={self.slash}, "
                f"block={self.block})")


ThresholdValue = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class ActivationThreshold:
    """Activation thresholding of FFN inputs (TEAL, mode="input") or gate activations (CATS, mode="gate").

    ``thresholds`` maps projection names to tau: ``input``/``down`` in input
    mode, ``gate`` in gate mode. A rule may instead give a target ``sparsity``
    in (0, 1); ``sparsecc.calibrate`` turns that into thresholds. A form with a
    sparsity target and no thresholds is not applicable until calibrated.
    ``criterion`` chooses the channel score compared with tau: ``"magnitude"``
    (``|x_i|``) or ``"weighted"`` (``|x_i| * ||W[:, i]||_2``).
    """

    mode: str = "input"
    thresholds: Tuple[Tuple[str, float], ...] = ()
    sparsity: Optional[float] = None
    criterion: str = "magnitude"
    name: str = field(default="activation_threshold", init=False)

    def __post_init__(self):
        _require(self.mode in THRESHOLD_MODES, "mode", self.mode, f"one of {THRESHOLD_MODES}")
        _require(isinstance(self.criterion, str) and self.criterion in THRESHOLD_CRITERIA,
                 "criterion", self.criterion, f"one of {THRESHOLD_CRITERIA}")
        # Gate mode thresholds |act(x W_gate)| itself: no projection column weighs its entries.
        _require(self.mode == "input" or self.criterion == "magnitude", "criterion", self.criterion,
                 "'magnitude' in mode 'gate' ('weighted' is defined for mode 'input' only)")
        allowed = THRESHOLD_KEYS[self.mode]
        for key, tau in self.thresholds:
            _require(key in allowed, "threshold key", key, f"one of {allowed} in mode {self.mode!r}")
            _require(_is_number(tau) and math.isfinite(tau) and tau >= 0, f"threshold.{key}", tau,
                     "a finite number >= 0")
        if self.sparsity is not None:
            _require(_is_number(self.sparsity) and 0.0 < self.sparsity < 1.0, "sparsity", self.sparsity,
                     "a number in (0, 1)")
        _require(bool(self.thresholds) or self.sparsity is not None, "threshold", None,
                 "a threshold or a target sparsity")

    @staticmethod
    def from_value(mode: str, threshold: Optional[ThresholdValue] = None,
                   sparsity: Optional[float] = None,
                   criterion: str = "magnitude") -> "ActivationThreshold":
        """Build from the spec's ``threshold`` (a float applies to every projection of the mode, or a table)."""
        if threshold is None:
            pairs: Tuple[Tuple[str, float], ...] = ()
        elif isinstance(threshold, Mapping):
            pairs = tuple(sorted((str(k), v) for k, v in threshold.items()))
        else:
            _require(mode in THRESHOLD_KEYS, "mode", mode, f"one of {THRESHOLD_MODES}")
            pairs = tuple((key, threshold) for key in THRESHOLD_KEYS[mode])
        return ActivationThreshold(mode=mode, thresholds=pairs, sparsity=sparsity, criterion=criterion)

    def tau(self, projection: str) -> Optional[float]:
        """Threshold for one projection, or None when the form leaves it dense."""
        return dict(self.thresholds).get(projection)

    @property
    def calibrated(self) -> bool:
        """True when at least one projection has a threshold (a bare sparsity target needs calibration)."""
        return bool(self.thresholds)

    @staticmethod
    def uncalibrated_note(rule_key: str) -> str:
        """What check-spec and the compile's summary say of a rule whose form is not :attr:`calibrated`."""
        return (f"{rule_key} gives a target sparsity but no threshold: the FFN sites it decides stay dense until "
                "sparsecc.calibrate fills it in")

    def __str__(self) -> str:
        taus = ", ".join(f"{k}={v:g}" for k, v in self.thresholds)
        target = f", sparsity={self.sparsity:g}" if self.sparsity is not None else ""
        criterion = f", criterion={self.criterion}" if self.criterion != "magnitude" else ""
        return f"activation_threshold(mode={self.mode}{', ' + taus if taus else ''}{target}{criterion})"


@dataclass(frozen=True)
class TwoFour:
    """2:4 semi-structured weight sparsity along the input dimension."""

    prune: str = "magnitude"
    name: str = field(default="2:4", init=False)

    def __post_init__(self):
        _require(self.prune in PRUNE_MODES, "prune", self.prune, f"one of {PRUNE_MODES}")

    def __str__(self) -> str:
        return f"2:4(prune={self.prune})"


@dataclass(frozen=True)
class BlockWeights:
    """Block-sparse weights: keep the densest fraction of (bm x bk) blocks by Frobenius norm."""

    block: Tuple[int, int] = (64, 64)
    density: float = 0.25
    prune: str = "magnitude"
    name: str = field(default="block_weights", init=False)

    def __post_init__(self):
        ok = (isinstance(self.block, tuple) and len(self.block) == 2
              and all(_is_int(b) and b in WEIGHT_BLOCK_SIZES for b in self.block))
        _require(ok, "block", self.block, f"[bm, bk] with each in {WEIGHT_BLOCK_SIZES}")
        _require(_is_number(self.density) and 0.0 < self.density <= 1.0, "density", self.density,
                 "a number in (0, 1]")
        _require(self.prune in PRUNE_MODES, "prune", self.prune, f"one of {PRUNE_MODES}")

    def kept_blocks(self, n_blocks: int) -> int:
        """Number of blocks kept out of ``n_blocks`` (ceil, at least one)."""
        # The epsilon keeps float noise (0.3 * 10 == 3.0000000000000004) from adding a block.
        return max(1, math.ceil(self.density * n_blocks - 1e-9))

    def __str__(self) -> str:
        return f"block_weights(block={self.block[0]}x{self.block[1]}, density={self.density:g}, prune={self.prune})"


Form = Union[Dense, Streaming, BlockSparse, BlockTopK, VerticalSlash, ActivationThreshold, TwoFour, BlockWeights]
