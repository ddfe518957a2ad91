"""Attention forms chosen by the KL of the model's own next-token distribution (docs/tune.md, "KL judge").

The recall tuner (:mod:`sparsecc.tune.attention`) keeps the attention mass a query recalls; on SmolLM2-135M at 8K
tokens that ranked allocations wrongly (bench/RESULTS.md). This module judges a candidate by what it does to the
output instead:

1. one dense forward over a calibration window caches every decoder layer's input hidden states and the dense
   next-token log-probabilities of the scored positions (the top ``topk`` tokens of each position and the log-mass of
   the rest, so the cache stays small; ``topk=None`` keeps the whole vocabulary);
2. for each *group* (a layer, or one KV-head group of a layer) and each candidate form, the layers from that group's
   layer to the last are run again from the cached input with only that group's heads attending under the form
   (:func:`~sparsecc.tune.attention_replay.keep_attention`, plain PyTorch, registered as a transformers
   attention function), and
   KL(dense || candidate) of the next-token distributions is averaged over the scored positions (:func:`kl_table`);
3. :func:`allocate` solves the multiple-choice knapsack exactly: one option per group, the least summed KL with the
   mean block density (weighted by heads) at most the budget;
4. the allocation's KL is then *measured* with every chosen form applied at once, and so is the uniform rule (one
   ``streaming`` form, sink 64, with the largest window whose block density is at most the allocation's); uniform is
   returned when it measures no worse (:func:`tune_by_kl`), so on the calibration data the tuned choice is never worse
   than uniform.

Candidates are ``Dense``, ``Streaming`` and ``BlockTopK`` with a fixed ``topk`` (per-input block selection, the same
count of blocks for every input, so its density is known before the input is). ``BlockTopK`` needs one rule for every
head of a site (docs/spec.md), so it is a candidate with ``grouping="layer"`` only, and not in a layer that holds a
dense head (``dense_heads``).

Density of a form is counted like the recall tuner's: kept 64 x 64 blocks over causal blocks of a ctx x ctx grid
(:func:`streaming_block_density`, :func:`block_topk_density`); a dense head has density 1.

Positions (docs/spec.md): query row i of a call with Sq queries and Sk keys sits at p = i + Sk - Sq. A ``streaming``
head keeps key j for query p iff j <= p and (j < sink or p - j < window).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sparsecc.forms import BlockTopK, Dense, Streaming
from sparsecc.tune.attention import DENSITY_BLOCK, HeadChoice, any_blocks, streaming_mask
from sparsecc.tune.attention_replay import DEFAULT_TOPK, DenseCache, decoder_parts, dense_pass, measure_kl
from sparsecc.tune.knapsack import allocate  # noqa: F401 (part of this module's interface)

UNIFORM_SINK = 64
GROUPINGS = ("layer", "kv")


# ---------------------------------------------------------------------------------------------------------------
# densities and the uniform rule


@functools.lru_cache(maxsize=256)
def streaming_block_density(form: Streaming, ctx: int, block: int = DENSITY_BLOCK) -> float:
    """Kept blocks / causal blocks of a streaming form over a ctx x ctx causal grid (blocks of ``block``; cached:
    at 8192 tokens one count builds a 64 MB mask)."""
    n = math.ceil(ctx / block)
    return float(any_blocks(streaming_mask(form, ctx, ctx, True, "cpu"), block).sum()) / (n * (n + 1) // 2)


def block_topk_density(form: BlockTopK, ctx: int, block: int = DENSITY_BLOCK) -> float:
    """Kept blocks / causal blocks of a fixed-``topk`` block_topk form over a ctx x ctx causal grid.

    Query block ``a`` has ``a + 1`` causally allowed key blocks; the sink blocks and the local band are kept and
    ``topk`` of the others, so it keeps ``min(a + 1, sink_blocks + local_blocks + topk)`` whatever the input (when
    ``a + 1 <= sink_blocks + local_blocks`` the sink and band already cover every allowed block). Needs the form's
    block to equal the density block; ValueError for a ``cdf`` or ``min_mass`` form (its count depends on the input).
    """
    if form.topk is None or form.block != block:
        raise ValueError(f"candidate form {form!r} is not allowed; a block_topk candidate needs topk (not cdf or min_mass) and "
                         f"block = {block} (the density block)")
    n = math.ceil(ctx / block)
    per_row = form.sink_blocks + form.local_blocks + form.topk
    return sum(min(a + 1, per_row) for a in range(n)) / (n * (n + 1) // 2)


def form_density(form, ctx: int, block: int = DENSITY_BLOCK) -> float:
    """Block density of a candidate form at ``ctx`` tokens: 1 for ``Dense``, counted blocks for ``Streaming`` and
    fixed-``topk`` ``BlockTopK``."""
    if isinstance(form, Dense):
        return 1.0
    if isinstance(form, Streaming):
        return streaming_block_density(form, ctx, block)
    if isinstance(form, BlockTopK):
        return block_topk_density(form, ctx, block)
    raise ValueError(f"candidate form {form!r} is not allowed; expected Dense, Streaming or BlockTopK (with topk)")


def uniform_window(target: float, ctx: int, block: int = DENSITY_BLOCK, sink: int = UNIFORM_SINK) -> int:
    """The largest window (a multiple of 16) whose sink-``sink`` streaming block density is at most ``target``
    (16 when none is)."""
    lo, hi = 16, -(-ctx // 16) * 16   # both multiples of 16, so every midpoint lies strictly between them
    while hi - lo > 16:
        mid = (lo + hi) // 32 * 16
        if streaming_block_density(Streaming(sink, mid), ctx, block) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def default_kl_candidates(ctx: int, sink: int = UNIFORM_SINK) -> List[object]:
    """Dense and ``streaming`` sink ``sink`` with window ctx/32, ctx/16, ctx/8, ctx/4 (the KL judge's grid)."""
    return [Dense()] + [Streaming(sink, max(1, ctx // frac)) for frac in (32, 16, 8, 4)]


# ---------------------------------------------------------------------------------------------------------------
# the table


@dataclass
class KLTable:
    """KL(dense || candidate) per group and candidate, with the candidates' block densities.

    ``groups[g] = (layer, query heads)``; ``kl[g, c]`` mean nats per scored position with only group g's heads under
    candidate c (0 for ``Dense``); ``density[g, c]`` its block density; ``weights[g]`` the heads in group g.
    """

    groups: List[Tuple[int, Tuple[int, ...]]]
    candidates: List[object]
    kl: torch.Tensor
    density: torch.Tensor
    weights: List[int]
    seconds: float = 0.0
    runs: int = 0

    def rows(self) -> List[dict]:
        """One dict per group: layer, heads and {form: kl} (for JSON)."""
        return [{"layer": l, "heads": list(h), "kl": {str(c): float(self.kl[g, i]) for i, c in enumerate(self.candidates)}}
                for g, (l, h) in enumerate(self.groups)]


def make_groups(num_layers: int, heads: int, kv_heads: int, grouping: str) -> List[Tuple[int, Tuple[int, ...]]]:
    """(layer, query heads) per group: one per layer (``"layer"``) or per KV head of a layer (``"kv"``)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping={grouping!r} is not allowed; expected one of {GROUPINGS}")
    if grouping == "layer":
        return [(l, tuple(range(heads))) for l in range(num_layers)]
    rep = heads // kv_heads
    return [(l, tuple(range(g * rep, (g + 1) * rep))) for l in range(num_layers) for g in range(kv_heads)]


# Config entries that name the library that wrote the config, not the model: a table stays valid across them.
_VOLATILE_CONFIG_KEYS = ("transformers_version",)


def _fingerprint(model, caches: Sequence[DenseCache], windows: Sequence[torch.Tensor], topk) -> str:
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for w, c in zip(windows, caches):
        h.update(w.to(torch.int64).numpy().tobytes())
        h.update(str(c.score_from).encode())
    h.update(str(topk).encode())
    return h.hexdigest()[:16]


def kl_table(model, caches: Sequence[DenseCache], candidates: Sequence[object], ctx: int, *, grouping: str = "layer",
             block: int = DENSITY_BLOCK, resume: Optional[Path] = None, fingerprint: str = "",
             progress: bool = True, not_allowed: Sequence[Tuple[int, object]] = ()) -> KLTable:
    """Measure every (group, candidate): one replay per pair from the group's layer (docs/tune.md, "KL judge").

    ``resume``: a JSON file holding the entries measured so far (written after every run, read when its
    ``fingerprint`` matches), so a stopped sweep continues where it stopped. Candidates are swept narrowest first.
    ``not_allowed``: (layer, candidate or its name) pairs that are not measured; their KL is ``+inf``, which the knapsack never
    picks.
    """
    from tqdm.auto import tqdm

    layers, _, _ = decoder_parts(model)
    cfg = model.config
    heads = cfg.num_attention_heads
    groups = make_groups(len(layers), heads, getattr(cfg, "num_key_value_heads", None) or heads, grouping)
    candidates = list(candidates)
    if not any(isinstance(c, Dense) for c in candidates):
        candidates = [Dense()] + candidates
    dens = torch.tensor([[form_density(c, ctx, block) for c in candidates]] * len(groups), dtype=torch.float64)
    kl = torch.zeros(len(groups), len(candidates), dtype=torch.float64)
    entries: Dict[str, float] = {}
    if resume is not None and Path(resume).exists():
        saved = json.loads(Path(resume).read_text())
        if saved.get("fingerprint") != fingerprint:   # never overwrite another model's or windows' measurements
            raise ValueError(f"resume={str(resume)!r} holds a KL table for another model, calibration or topk "
                             f"(fingerprint {saved.get('fingerprint')!r}, this run {fingerprint!r}); move it away or "
                             "pass another resume path")
        entries = saved["entries"]
    order = sorted((c for c in range(len(candidates)) if not isinstance(candidates[c], Dense)),
                   key=lambda c: (dens[0, c], str(candidates[c])))
    barred = {(int(layer), str(form)) for layer, form in not_allowed}
    for c in range(len(candidates)):
        for g, (layer, _) in enumerate(groups):
            if (layer, str(candidates[c])) in barred:
                kl[g, c] = math.inf
    todo = [(c, g) for c in order for g in range(len(groups)) if (groups[g][0], str(candidates[c])) not in barred]
    started, runs = time.time(), 0
    for c, g in tqdm(todo, desc="KL table", unit="run", disable=not progress):
        layer, group_heads = groups[g]
        key = f"{layer}:{','.join(map(str, group_heads))}|{candidates[c]}"
        if key not in entries:
            forms = [candidates[c] if h in group_heads else Dense() for h in range(heads)]
            entries[key] = measure_kl(model, caches, {layer: forms})
            runs += 1
            if resume is not None:
                Path(resume).write_text(json.dumps({"fingerprint": fingerprint, "entries": entries}, indent=0))
        kl[g, c] = entries[key]
    return KLTable(groups, candidates, kl, dens, [len(h) for _, h in groups], time.time() - started, runs)


def _barred_by_held_heads(candidates: Sequence[object], dense_heads) -> set:
    """(layer, form name) pairs not allowed because the layer holds a dense head: ``block_topk`` needs one rule for
    every head of a site (docs/spec.md)."""
    held_layers = {int(layer) for layer, _ in dense_heads}
    return {(layer, str(c)) for layer in held_layers for c in candidates if isinstance(c, BlockTopK)}


def hold_dense(table: KLTable, dense_heads: Sequence[Tuple[int, int]], budget: float,
               num_layers: int, num_heads: int) -> Tuple[KLTable, float]:
    """The KL judge's ``table`` without the ``dense_heads`` ((layer, head) kept ``Dense`` whatever the knapsack
    picks: the retrieval heads), and the mean density its remaining heads may spend so that
    the mean over all heads stays at most ``budget``. In a layer holding a dense head, ``block_topk`` options get
    KL ``+inf`` (not allowed: that form needs one rule for every head of the site). A group keeps its measured KL row (measured with all its heads
    under the candidate: an upper estimate once some of them stay dense)."""
    fixed = {(int(l), int(h)) for l, h in dense_heads}
    for l, h in fixed:
        if not (0 <= l < num_layers and 0 <= h < num_heads):
            raise ValueError(f"dense head (layer {l}, head {h}) is not allowed; the model has {num_layers} layers "
                             f"of {num_heads} heads")
    rows, groups = [], []
    for g, (layer, heads) in enumerate(table.groups):
        free = tuple(h for h in heads if (layer, h) not in fixed)
        if free:
            rows.append(g)
            groups.append((layer, free))
    n_free = sum(len(h) for _, h in groups)
    free_budget = (budget * num_layers * num_heads - len(fixed)) / max(n_free, 1)
    if n_free == 0 or free_budget <= 0:
        raise ValueError(f"budget={budget} cannot hold {len(fixed)} dense heads of {num_layers * num_heads}; raise "
                         "the budget or hold fewer heads dense")
    index = torch.tensor(rows)
    kl = table.kl[index].clone()
    barred = _barred_by_held_heads(table.candidates, fixed)
    for g, (layer, _) in enumerate(groups):
        for c, form in enumerate(table.candidates):
            if (layer, str(form)) in barred:
                kl[g, c] = math.inf
    reduced = KLTable(groups, table.candidates, kl, table.density[index], [len(h) for _, h in groups],
                      table.seconds, table.runs)
    return reduced, min(free_budget, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# the decision against uniform, and the public entry points


@dataclass
class KLTuning:
    """The KL judge's result: ``choices`` (what :func:`sparsecc.tune.attention_rules` consumes) and its evidence.

    ``used`` is ``"allocation"``, ``"uniform"`` (the uniform streaming rule measured no worse) or
    ``"uniform_topk"`` (with ``block_topk`` candidates: one ``block_topk`` rule on every layer, the largest topk at
    the allocation's density or lower, measured no worse than both); ``allocation_kl``, ``uniform_kl`` and
    ``uniform_topk_kl`` are the measured mean KL per scored position with every chosen form applied at once (NaN
    when no such uniform rule fits the allocation's density, or no ``block_topk`` candidate was given);
    ``density`` the mean block density over heads of what was returned.
    """

    choices: List[HeadChoice]
    used: str
    allocation: Dict[int, List[object]]
    allocation_kl: float
    allocation_density: float
    uniform_window: int
    uniform_kl: float
    uniform_density: float
    table: KLTable
    seconds: Dict[str, float] = field(default_factory=dict)
    uniform_topk: Optional[BlockTopK] = None
    uniform_topk_kl: float = float("nan")
    uniform_topk_density: float = float("nan")

    @property
    def density(self) -> float:
        """Mean block density over all heads of the returned choice."""
        return {"allocation": self.allocation_density, "uniform": self.uniform_density,
                "uniform_topk": self.uniform_topk_density}[self.used]


def _choices(forms_by_layer: Dict[int, List[object]], num_layers: int, heads: int, ctx: int, block: int,
             site: str) -> List[HeadChoice]:
    out = []
    for layer in range(num_layers):
        forms = forms_by_layer.get(layer, [Dense()] * heads)
        out.append(HeadChoice(site.format(layer), list(forms), [float("nan")] * heads,
                              [form_density(f, ctx, block) for f in forms]))
    return out


def uniform_topk_form(candidates: Sequence[object], target: float, ctx: int,
                      block: int = DENSITY_BLOCK) -> Optional[BlockTopK]:
    """The uniform ``block_topk`` rule to compare with: the candidates' ``block_topk`` form (sink, band and pool of
    the one with the largest topk) with the largest topk whose density is at most ``target``; None without
    ``block_topk`` candidates or when even topk 1 keeps more."""
    forms = [c for c in candidates if isinstance(c, BlockTopK)]
    if not forms:
        return None
    base = max(forms, key=lambda f: f.topk)
    best = None
    for k in range(1, math.ceil(ctx / block) + 1):
        form = replace(base, topk=k)
        if block_topk_density(form, ctx, block) > target + 1e-12:
            break
        best = form
    return best


def decide(table: KLTable, budget: float, ctx: int, num_layers: int, heads: int,
           measure: Callable[[Dict[int, List[object]]], float], *, block: int = DENSITY_BLOCK,
           sink: int = UNIFORM_SINK, site: str = "model.layers.{}.self_attn") -> KLTuning:
    """Allocate from ``table`` at ``budget``, measure the allocation and the uniform rules at equal or lower density
    (streaming; and ``block_topk`` when the table has such candidates) with ``measure(forms_by_layer) -> KL``, and
    return a uniform rule when it measures no worse than the allocation (and than the other uniform rule)."""
    picks = allocate(table.kl, table.density, table.weights, budget)
    forms_by_layer: Dict[int, List[object]] = {}
    for (layer, group_heads), c in zip(table.groups, picks):
        forms = forms_by_layer.setdefault(layer, [Dense()] * heads)
        for h in group_heads:
            forms[h] = table.candidates[c]
    dens = [form_density(f, ctx, block) for layer in range(num_layers)
            for f in forms_by_layer.get(layer, [Dense()] * heads)]
    allocation_density = sum(dens) / len(dens)
    window = uniform_window(allocation_density, ctx, block, sink)
    uniform = {layer: [Streaming(sink, window)] * heads for layer in range(num_layers)}
    uniform_density = streaming_block_density(Streaming(sink, window), ctx, block)
    t0 = time.time()
    allocation_kl = measure(forms_by_layer)
    if uniform_density <= allocation_density + 1e-12:
        uniform_kl = measure(uniform)
    else:   # even the narrowest window keeps more blocks than the allocation: no uniform rule to compare with
        uniform_kl = float("nan")
    topk_form = uniform_topk_form(table.candidates, allocation_density, ctx, block)
    topk_kl, topk_density, uniform_topk = float("nan"), float("nan"), {}
    if topk_form is not None:
        uniform_topk = {layer: [topk_form] * heads for layer in range(num_layers)}
        topk_kl, topk_density = measure(uniform_topk), block_topk_density(topk_form, ctx, block)
    # The least measured KL wins; on a tie the uniform rules come first (NaN: not measured, never chosen).
    ranked = [(kl, name, forms) for kl, name, forms in ((uniform_kl, "uniform", uniform),
                                                         (topk_kl, "uniform_topk", uniform_topk),
                                                         (allocation_kl, "allocation", forms_by_layer))
              if not math.isnan(kl)]
    _, used, chosen = min(ranked, key=lambda r: r[0])
    return KLTuning(_choices(chosen, num_layers, heads, ctx, block, site), used, forms_by_layer, allocation_kl,
                    allocation_density, window, uniform_kl, uniform_density, table,
                    {"measure": time.time() - t0}, topk_form, topk_kl, topk_density)


def tune_by_kl(model, windows: Sequence[torch.Tensor], budget: float, *, candidates: Optional[Sequence] = None,
               grouping: str = "layer", topk: Optional[int] = DEFAULT_TOPK, score_from: int = 1,
               block: int = DENSITY_BLOCK, uniform_sink: int = UNIFORM_SINK, resume: Optional[Path] = None,
               dense_heads: Sequence[Tuple[int, int]] = (), progress: bool = True) -> KLTuning:
    """Per-layer (``grouping="layer"``) or per-KV-head-group (``"kv"``) attention forms judged by next-token KL.

    ``windows``: calibration token ids (1-D tensors of one length, ctx); ``budget``: mean block density over all
    heads (blocks of ``block``); ``candidates``: ``Dense``/``Streaming`` forms, and ``BlockTopK`` with ``topk`` and
    ``block`` = ``block`` when ``grouping="layer"`` (default :func:`default_kl_candidates`); ``topk``: dense tokens
    per position kept for the KL (None: the whole vocabulary); ``uniform_sink``: the sink of the uniform rule compared with (``streaming``, the largest window, a
    multiple of 16, at the allocation's density or lower; none when no window fits, then the allocation is
    returned); ``resume``: JSON file of the table's entries, so a stopped sweep continues; ``dense_heads``:
    (layer, head) pairs the allocation keeps dense (:func:`hold_dense`; the uniform rules it is compared with do
    not, so a uniform result drops them); ``block_topk`` candidates need every head of a layer, so they are neither
    measured nor chosen in a layer that holds a dense head.
    Costs one dense
    forward per window, then per group and non-dense candidate one replay from the group's layer (about half a
    forward on average), then two forwards per window to compare with uniform. See :class:`KLTuning`.
    """
    if not windows:
        raise ValueError("windows=[] is not allowed; expected at least one calibration window of token ids")
    ctx = int(windows[0].numel())
    if any(int(w.numel()) != ctx for w in windows):
        raise ValueError("windows must all hold ctx tokens; got lengths "
                         f"{sorted({int(w.numel()) for w in windows})}")
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping={grouping!r} is not allowed; expected one of {GROUPINGS}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} is not allowed; expected a mean block density in (0, 1]")
    candidates = list(candidates) if candidates is not None else default_kl_candidates(ctx)
    for c in candidates:
        if not isinstance(c, (Dense, Streaming, BlockTopK)):
            raise ValueError(f"candidate {c!r} is not allowed; expected Dense, Streaming or BlockTopK forms")
        if isinstance(c, BlockTopK) and grouping != "layer":
            raise ValueError(f"candidate {c!r} is not allowed with grouping={grouping!r}: block_topk needs one rule "
                             "for every head of a site, so it is a per-layer candidate (grouping='layer')")
        form_density(c, ctx, block)   # ValueError for a cdf form or another block size
    layers, _, _ = decoder_parts(model)
    t0 = time.time()
    caches = [dense_pass(model, w, score_from=score_from, topk=topk) for w in windows]
    t1 = time.time()
    table = kl_table(model, caches, candidates, ctx, grouping=grouping, block=block, resume=resume,
                     fingerprint=_fingerprint(model, caches, windows, topk), progress=progress,
                     not_allowed=_barred_by_held_heads(candidates, dense_heads))
    heads = model.config.num_attention_heads
    if dense_heads:
        allocated, free_budget = hold_dense(table, dense_heads, budget, len(layers), heads)
    else:
        allocated, free_budget = table, budget
    result = decide(allocated, free_budget, ctx, len(layers), heads,
                    lambda forms: measure_kl(model, caches, forms), block=block, sink=uniform_sink)
    result.seconds.update(dense=t1 - t0, table=table.seconds, total=time.time() - t0)
    return result


def choose_by_kl(model, windows: Sequence[torch.Tensor], budget: float, **kwargs) -> List[HeadChoice]:
    """The :class:`~sparsecc.tune.attention.HeadChoice` list of :func:`tune_by_kl` (same arguments), for
    :func:`sparsecc.tune.attention_rules`: the KL-judged allocation, or the uniform rule when that measured no
    worse on the calibration windows. Dense heads get ``Dense()``; ``recall`` is NaN (not measured)."""
    return tune_by_kl(model, windows, budget, **kwargs).choices


__all__ = ["GROUPINGS", "UNIFORM_SINK", "KLTable", "KLTuning", "allocate", "block_topk_density", "choose_by_kl",
           "decide", "default_kl_candidates", "form_density", "hold_dense", "kl_table", "make_groups",
           "streaming_block_density", "tune_by_kl", "uniform_topk_form", "uniform_window"]
