"""Per-head attention forms chosen by the attention mass they recall on calibration data.

Recording: the model is captured by Dynamo with a backend that runs sparsecc's
normalize and match stages and, before each attention site's output, calls
:func:`_record` with the site's q, k, masks, scale and causality. The graph then
runs eagerly, so every calibration batch feeds the statistics.

Scoring, per head h and candidate form c (exact definitions):

* P = softmax(scale * q k^T + model masks, causal when the site is causal) in
  float32 (queries at positions p_i = i + Sk - Sq); an entry is *allowed* when
  the model's masks and causality let it take part (additive values above -1e4).
* A query row counts when its own position is an allowed key (padding queries
  of self-attention drop out; rows with Sq > Sk count all).
* K_c is the kept-entry mask of c: the token mask of ``streaming``, or the block
  table of ``block_topk`` / the kept pairs of ``vertical_slash`` (from their references) expanded
  to tokens.
* recall(h, c) = sum over counted rows of sum_j P * K_c, divided by the number
  of counted rows (the mean kept attention mass per query);
* density(h, c) = |K_c and allowed| / |allowed| over counted rows.

Choice under a budget B on the mean density over all heads (dense heads have
density 1): maximise the total recall. The compiler runs one sparse family per
site (other heads dense), with per-head sink/window for streaming and one shared
layout for the other families, so a site's option is a family plus per-head
choices within it. The problem is solved by its Lagrangian: for a price
lambda, every site takes the option maximising sum_h (recall - lambda *
density); the smallest lambda whose choice meets B (bisection) is used. Ties
go to the lower density.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sparsecc.forms import DYNAMIC_BLOCK_SIZES, MASKED_LOGIT_MAX, Dense, Streaming

# Bisection steps on the density price: 60 halvings of [0, 2^10] resolve it far below any recall difference.
_PRICE_STEPS = 60
_PRICE_MAX = 1024.0
# Prefer the lower density between options of equal value.
_TIE_PRICE = 1e-9

_RECORDERS: Dict[int, "AttentionStats"] = {}


def default_candidates(seq_k: int) -> List[object]:
    """The candidate grid for a calibration key length ``seq_k`` (see docs/tune.md).

    streaming: sink 0 or 4, window Sk/8, Sk/4, Sk/2; block_topk (when its
    reference exists): the largest block <= Sk/4, topk of 1/8, 1/4, 1/2 of the key
    blocks, or cdf 0.9 / 0.95; vertical_slash: last_q 64, vertical and slash
    Sk/16 or Sk/8.
    """
    out: List[object] = []
    for sink, frac in itertools.product((0, 4), (8, 4, 2)):
        window = max(1, math.ceil(seq_k / frac))
        if sink < seq_k and Streaming(sink, window) not in out:
            out.append(Streaming(sink, window))
    try:
        from sparsecc.codegen import dynamic_attention  # noqa: F401 - the references of the dynamic forms
        from sparsecc.forms import BlockTopK, VerticalSlash
    except ImportError:
        return out
    fitting = [b for b in DYNAMIC_BLOCK_SIZES if b <= max(DYNAMIC_BLOCK_SIZES[0], seq_k // 4)]
    block = fitting[-1]
    n_blocks = math.ceil(seq_k / block)
    for frac in (8, 4, 2):
        form = BlockTopK(block=block, topk=max(1, n_blocks // frac))
        if form not in out:
            out.append(form)
    out.extend(BlockTopK(block=block, cdf=c) for c in (0.9, 0.95))
    for v, s in itertools.product((16, 8), (16, 8)):
        out.append(VerticalSlash(last_q=min(64, seq_k), vertical=max(1, seq_k // v), slash=max(1, seq_k // s),
                                 block=block))
    return out


def streaming_mask(form: Streaming, seq_q: int, seq_k: int, causal: bool, device) -> torch.Tensor:
    """The [Sq, Sk] kept mask of a streaming form (the semantics in sparsecc.forms)."""
    p = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device)[None, :]
    if causal:
        return (j <= p) & ((j < form.sink) | (p - j < form.window))
    return (j < form.sink) | (p < form.sink) | ((p - j).abs() < form.window)


def dynamic_mask(form, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """The token-level kept mask [B, H, Sq, Sk] of a block_topk / vertical_slash form, from its reference."""
    from sparsecc.codegen import dynamic_attention as dyn

    if form.name == "vertical_slash":
        # Token-level (ranges start anywhere, no block table); a non-causal call attends densely (docs/spec.md).
        if not causal:
            return torch.ones(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        from sparsecc.codegen.vertical_slash import vertical_slash_keep_ref
        return vertical_slash_keep_ref(q, k, form, scale)
    table = dyn.block_topk_table_ref(q, k, block=form.block, topk=form.topk, cdf=form.cdf,
                                     sink_blocks=form.sink_blocks, local_blocks=form.local_blocks,
                                     pool=form.pool, causal=causal, scale=scale)
    blocks = table.to_dense_block_mask()
    tokens = blocks.repeat_interleave(table.block_q, dim=-2).repeat_interleave(table.block_k, dim=-1)
    return tokens[..., : q.shape[-2], : k.shape[-2]]


@dataclass
class AttentionStats:
    """Recall and density sums per (site, head, candidate), filled by the recording graph."""

    candidates: Optional[Sequence[object]] = None
    sites: Dict[str, dict] = field(default_factory=dict)

    def record(self, site: str, q, k, masks, flags, scale: float, causal: bool) -> None:
        """Add one call's statistics (q [B, H, Sq, D], k [B, Hkv, Sk, D])."""
        q, k = q.float(), k.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        b, h, sq, _ = q.shape
        sk = k.shape[2]
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        allowed = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=q.device)
        for mask, (additive, keep) in zip(masks, flags):
            if additive:
                logits = logits + mask.float()
                allowed = allowed & (mask > MASKED_LOGIT_MAX)
            else:
                allowed = allowed & (mask if keep else ~mask)
        if causal:
            allowed = allowed & streaming_mask(Streaming(0, sk + sq), sq, sk, True, q.device)
        allowed = allowed.expand(b, h, sq, sk)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        positions = torch.arange(sq, device=q.device) + (sk - sq)
        rows = allowed.gather(-1, positions.clamp(0, sk - 1).expand(b, h, sq)[..., None])[..., 0]
        if sq > sk:
            rows = allowed.any(-1)
        entry = self.sites.setdefault(site, {"heads": h, "seq_k": sk, "causal": causal, "calls": 0})
        if "candidates" not in entry:
            entry["candidates"] = list(self.candidates) if self.candidates is not None else default_candidates(sk)
            n = len(entry["candidates"])
            entry.update(mass=torch.zeros(h, n, dtype=torch.float64), kept=torch.zeros(h, n, dtype=torch.float64),
                         rows=torch.zeros(h, dtype=torch.float64), allowed=torch.zeros(h, dtype=torch.float64))
        entry["calls"] += 1
        row_w = rows.double()
        entry["rows"] += row_w.sum((0, 2))
        entry["allowed"] += (allowed & rows[..., None]).double().sum((0, 2, 3))
        for c, form in enumerate(entry["candidates"]):
            if isinstance(form, Streaming):
                keep = streaming_mask(form, sq, sk, causal, q.device).expand(b, h, sq, sk)
            else:
                keep = dynamic_mask(form, q, k, causal, scale).expand(b, h, sq, sk)
            kept = keep & allowed & rows[..., None]
            entry["mass"][:, c] += (probs * kept).double().sum((0, 2, 3))
            entry["kept"][:, c] += kept.double().sum((0, 2, 3))

    def table(self, site: str) -> Tuple[List[object], torch.Tensor, torch.Tensor]:
        """(candidates, recall [H, C], density [H, C]) of one site."""
        e = self.sites[site]
        recall = e["mass"] / e["rows"].clamp_min(1)[:, None]
        density = e["kept"] / e["allowed"].clamp_min(1)[:, None]
        return e["candidates"], recall, density


def _record(key: int, site: str, q, k, masks, flags, scale: float, causal: bool):
    """Graph hook: forward one attention call's operands to the statistics ``key`` names."""
    _RECORDERS[key].record(site, q, k, masks, flags, scale, causal)
    return None


def recording_backend(stats: AttentionStats):
    """A torch.compile backend that records attention statistics and otherwise runs the graph eagerly."""
    from sparsecc.backend import make_context, parse_options
    from sparsecc.pipeline import run_stages, stage_match, stage_normalize

    key = id(stats)
    _RECORDERS[key] = stats

    def backend(gm, example_inputs, **_):
        ctx = make_context(gm, example_inputs, parse_options({}))
        run_stages(gm, ctx, (("normalize", stage_normalize), ("match", stage_match)))
        graph = gm.graph
        for site in ctx.sites:
            if site.kind != "attention" or site.match is None or site.attrs.get("folded_heads"):
                continue   # refused sites cannot be rewritten; folded (3-D) heads cannot take per-head forms
            m = site.match
            with graph.inserting_before(site.output):
                q, k = m.q, m.k
                if m.layout is not None:   # operands held [B, S, H, D]: the statistics read [B, H, S, D]
                    q, k = (graph.call_method("permute", (t, *m.layout)) for t in (q, k))
                graph.call_function(_record, (key, site.module, q, k, [t.node for t in m.masks],
                                              [(t.additive, t.keep) for t in m.masks],
                                              float(site.attrs["scale"]), bool(m.causal)))
        graph.lint()
        gm.recompile()
        return gm.forward

    return backend


@dataclass
class HeadChoice:
    """The form chosen for every head of one attention site, with its recall and density."""

    site: str
    forms: List[object]
    recall: List[float]
    density: List[float]

    def __str__(self) -> str:
        kinds = ", ".join(f"{h}:{f}" for h, f in enumerate(self.forms))
        return f"{self.site}: {kinds}"


def _site_option(cands, recall, density, price: float):
    """The best (value, per-head candidate index or -1 for dense) of one site at a density price."""
    heads = recall.shape[0]
    dense_value = 1.0 - price - _TIE_PRICE
    value = recall - (price + _TIE_PRICE) * density          # [H, C]
    best_total, best_pick = heads * dense_value, [-1] * heads
    families: Dict[object, List[int]] = {}
    for c, form in enumerate(cands):
        # streaming heads may differ in sink/window; other families share one layout per site
        families.setdefault("streaming" if isinstance(form, Streaming) else form, []).append(c)
    for members in families.values():
        sub = value[:, members]
        top, arg = sub.max(dim=1)
        pick = [members[int(a)] if float(t) > dense_value else -1 for t, a in zip(top, arg)]
        total = sum(max(float(t), dense_value) for t in top)
        if total > best_total + 1e-12:
            best_total, best_pick = total, pick
    return best_pick


def choose_heads(stats: AttentionStats, budget: float) -> List[HeadChoice]:
    """Per-head forms maximising recall with mean density <= ``budget`` (see the module docstring)."""
    if not 0 < budget <= 1:
        raise ValueError(f"attention budget={budget!r} is not allowed; expected a mean density in (0, 1]")
    tables = {s: stats.table(s) for s in stats.sites}

    def assign(price):
        picks = {s: _site_option(c, r, d, price) for s, (c, r, d) in tables.items()}
        dens = [float(tables[s][2][h, c]) if c >= 0 else 1.0 for s, p in picks.items() for h, c in enumerate(p)]
        return picks, (sum(dens) / len(dens) if dens else 0.0)

    picks, mean = assign(0.0)
    if mean > budget:
        lo, hi = 0.0, _PRICE_MAX
        for _ in range(_PRICE_STEPS):
            mid = (lo + hi) / 2
            if assign(mid)[1] <= budget:
                hi = mid
            else:
                lo = mid
        picks, mean = assign(hi)
    out = []
    for s, pick in picks.items():
        cands, recall, density = tables[s]
        out.append(HeadChoice(s, [cands[c] if c >= 0 else Dense() for c in pick],
                              [float(recall[h, c]) if c >= 0 else 1.0 for h, c in enumerate(pick)],
                              [float(density[h, c]) if c >= 0 else 1.0 for h, c in enumerate(pick)]))
    return out


def record_attention(model, batches, candidates: Optional[Sequence[object]] = None) -> AttentionStats:
    """Run the calibration batches through the recording graph; return the statistics."""
    from sparsecc.tune.capture import split_batch

    stats = AttentionStats(candidates)
    compiled = torch.compile(model, backend=recording_backend(stats), dynamic=False)
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = split_batch(batch)
                compiled(*args, **kwargs)
    finally:
        _RECORDERS.pop(id(stats), None)
    return stats
