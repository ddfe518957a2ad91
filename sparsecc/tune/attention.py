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
  to tokens. The dynamic forms select causally in a non-causal call for the batch
  elements whose masks remove every later key (HF's mask tensor of a padded batch),
  as the compiled op does (docs/spec.md).
* recall(h, c) = sum over counted rows of sum_j P * K_c, divided by the number
  of counted rows (the mean kept attention mass per query);
* density(h, c) = |K_c and allowed| / |allowed| over counted rows.

Choice under a budget B on the mean density over all heads (dense heads have
density 1): maximise the total recall. The compiler runs one sparse family per
site (other heads dense), with per-head sink/window for streaming and one shared
layout for the other families, so a site's option is a family plus per-head
choices within it; ``block_topk`` needs one rule for every head, so it goes to all
of a site's heads or to none. The problem is solved by its Lagrangian: for a price
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

from sparsecc.forms import DYNAMIC_BLOCK_SIZES, MASKED_LOGIT_MAX, BlockTopK, Dense, Streaming

# Bisection steps on the density price: 60 halvings of [0, 2^10] resolve it far below any recall difference.
_PRICE_STEPS = 60
_PRICE_MAX = 1024.0
# Prefer the lower density between options of equal value.
_TIE_PRICE = 1e-9

_RECORDERS: Dict[int, "AttentionStats"] = {}


# Above this many keys the default grid leaves vertical_slash out: its kept set is token-level (recording it costs
# an Sq x Sk mask per head and candidate), and its kernel ran at 0.67-0.78x dense SDPA at 32K-128K keys on the H200
# (bench/RESULTS.md), so choosing it there cannot pay. Explicit candidates may still name it.
VERTICAL_SLASH_MAX_KEYS = 2048
# Sampled rows of the block_topk candidates with the sampled-row estimate: 16 of 64 came within 0.06 points of
# exact masses on SmolLM2 at 8K (docs/quality.md).
SAMPLED_ROWS = 16


def default_candidates(seq_k: int) -> List[object]:
    """The candidate grid for a calibration key length ``seq_k`` (see docs/tune.md).

    streaming: sink 4 or 64, window Sk/32, Sk/16, Sk/8, Sk/4, Sk/2; block_topk
    (when its reference exists): the largest block <= Sk/4, topk of 1/8, 1/4,
    1/2 of the key blocks, or cdf 0.9 / 0.95, each with the mean-pooled estimate
    and with the sampled-row one (``pool = "rows"``, ``SAMPLED_ROWS`` rows, at most
    the block); vertical_slash (up to
    ``VERTICAL_SLASH_MAX_KEYS`` keys): last_q 64, vertical and slash Sk/16 or Sk/8.
    """
    out: List[object] = []
    for sink, frac in itertools.product((4, 64), (32, 16, 8, 4, 2)):
        window = max(1, math.ceil(seq_k / frac))
        if sink < seq_k and Streaming(sink, window) not in out:
            out.append(Streaming(sink, window))
    try:
        from sparsecc.codegen import dynamic_attention  # noqa: F401 - the references of the dynamic forms
        from sparsecc.forms import VerticalSlash
    except ImportError:
        return out
    fitting = [b for b in DYNAMIC_BLOCK_SIZES if b <= max(DYNAMIC_BLOCK_SIZES[0], seq_k // 4)]
    block = fitting[-1]
    n_blocks = math.ceil(seq_k / block)
    for estimate in ({}, {"pool": "rows", "rows": min(SAMPLED_ROWS, block)}):
        for frac in (8, 4, 2):
            form = BlockTopK(block=block, topk=max(1, n_blocks // frac), **estimate)
            if form not in out:
                out.append(form)
        out.extend(BlockTopK(block=block, cdf=c, **estimate) for c in (0.9, 0.95))
    if seq_k <= VERTICAL_SLASH_MAX_KEYS:
        for v, s in itertools.product((16, 8), (16, 8)):
            out.append(VerticalSlash(last_q=min(64, seq_k), vertical=max(1, seq_k // v), slash=max(1, seq_k // s),
                                     block=block))
    return out


def streaming_mask(form: Streaming, seq_q: int, seq_k: int, causal: bool, device) -> torch.Tensor:
    """The [Sq, Sk] kept mask of a streaming form (the semantics in sparsecc.forms)."""
    return streaming_rows(form, torch.arange(seq_q, device=device) + (seq_k - seq_q), seq_k, causal)


def streaming_rows(form: Streaming, positions: torch.Tensor, seq_k: int, causal: bool) -> torch.Tensor:
    """The [R, Sk] kept mask of a streaming form for query rows at ``positions``."""
    p = positions[:, None]
    j = torch.arange(seq_k, device=positions.device)[None, :]
    if causal:
        return (j <= p) & ((j < form.sink) | (p - j < form.window))
    return (j < form.sink) | (p < form.sink) | ((p - j).abs() < form.window)


def any_blocks(mask: torch.Tensor, block: int) -> torch.Tensor:
    """[..., R, Sk] bool -> [..., ceil(R/block), ceil(Sk/block)]: whether each block holds a True entry."""
    rows, cols = mask.shape[-2:]
    n_r, n_c = -(-rows // block), -(-cols // block)
    mask = torch.nn.functional.pad(mask, (0, n_c * block - cols, 0, n_r * block - rows))
    return mask.view(*mask.shape[:-2], n_r, block, n_c * block).any(-2).view(
        *mask.shape[:-2], n_r, n_c, block).any(-1)


def dynamic_mask(form, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """The token-level kept mask [B, H, Sq, Sk] of a block_topk / vertical_slash form, from its reference."""
    from sparsecc.codegen import dynamic_attention as dyn

    if form.name == "vertical_slash":
        # Token-level (ranges start anywhere, no block table); a non-causal call attends densely (docs/spec.md).
        if not causal:
            return torch.ones(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
        from sparsecc.codegen.vertical_slash import vertical_slash_keep_ref
        return vertical_slash_keep_ref(q, k, form, scale)
    table = dyn.block_topk_table_ref(q, k, block=form.block, topk=form.topk, cdf=form.cdf, min_mass=form.min_mass,
                                     sink_blocks=form.sink_blocks, local_blocks=form.local_blocks,
                                     pool=form.pool, rows=form.rows, causal=causal, scale=scale)
    blocks = table.to_dense_block_mask()
    tokens = blocks.repeat_interleave(table.block_q, dim=-2).repeat_interleave(table.block_k, dim=-1)
    return tokens[..., : q.shape[-2], : k.shape[-2]]


# Density is counted in blocks of this many queries x keys: the tile the attention kernels keep or skip whole.
DENSITY_BLOCK = 64
# Query rows per recording chunk: the float32 working set of one call is H x rows x Sk, not H x Sq x Sk
# (at 8K keys and 9 heads, 150 MB per chunk instead of 2.4 GB per call).
RECORD_ROWS = 512


def _streaming_sums(form: Streaming, positions: torch.Tensor, cum: torch.Tensor, causal: bool) -> torch.Tensor:
    """Per-row sums [B, H, R] of a row quantity over the keys ``form`` keeps, from its prefix sums ``cum``.

    ``cum[..., j]`` is the sum over keys < j (``cum[..., 0] = 0``). A streaming row at
    position p keeps the union of the sink ``[0, sink)`` and the band
    ``[p - window + 1, hi]`` (hi = p when causal, p + window - 1 otherwise), clipped to
    the keys; a non-causal row with ``p < sink`` keeps every key (docs/spec.md).
    """
    sk = cum.shape[-1] - 1
    hi = (positions if causal else positions + form.window - 1).clamp(-1, sk - 1)
    lo = (positions - form.window + 1).clamp(0, sk)
    sink_end = torch.minimum(torch.full_like(hi, form.sink), hi + 1).clamp(0, sk)
    band_start = torch.maximum(lo, torch.full_like(lo, form.sink)).clamp(max=sk)

    def at(index):   # cum[..., r, index[r]] for every row r
        return cum.gather(-1, index.view(1, 1, -1, 1).expand(*cum.shape[:-1], 1))[..., 0]

    sums = at(sink_end) + torch.where(band_start <= hi, at((hi + 1).clamp(0, sk)) - at(band_start),
                                      torch.zeros((), dtype=cum.dtype, device=cum.device))
    if not causal:
        sums = torch.where(positions < form.sink, at(torch.full_like(hi, sk)), sums)
    return sums


@dataclass
class AttentionStats:
    """Recall and density sums per (site, head, candidate), filled by the recording graph.

    ``density_block``: density counts kept blocks of ``density_block`` x
    ``density_block`` entries (a block is kept when a kept, allowed entry lies in
    it; the kernels skip whole blocks, so that is what sparsity saves); 1 counts
    entries. ``rows_per_chunk`` query rows (rounded up to whole blocks) are scored
    at a time (memory ~ H x rows x Sk); the sums do not depend on it.
    """

    candidates: Optional[Sequence[object]] = None
    sites: Dict[str, dict] = field(default_factory=dict)
    rows_per_chunk: int = RECORD_ROWS
    density_block: int = DENSITY_BLOCK

    def record(self, site: str, q, k, masks, flags, scale: float, causal: bool) -> None:
        """Add one call's statistics (q [B, H, Sq, D], k [B, Hkv, Sk, D])."""
        q, k = q.float(), k.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        b, h, sq, _ = q.shape
        sk = k.shape[2]
        entry = self.sites.setdefault(site, {"heads": h, "seq_k": sk, "causal": causal, "calls": 0})
        if "candidates" not in entry:
            entry["candidates"] = list(self.candidates) if self.candidates is not None else default_candidates(sk)
            n = len(entry["candidates"])
            entry.update(mass=torch.zeros(h, n, dtype=torch.float64), kept=torch.zeros(h, n, dtype=torch.float64),
                         rows=torch.zeros(h, dtype=torch.float64), allowed=torch.zeros(h, dtype=torch.float64),
                         density_block=self.density_block)
            if self.density_block > 1:
                entry.update(kept_blocks=torch.zeros(h, n, dtype=torch.float64),
                             allowed_blocks=torch.zeros(h, dtype=torch.float64))
        entry["calls"] += 1
        if not causal and masks:
            cuts = _padding_cuts(masks, flags, b, sq, sk)
            if cuts is not None:   # docs/spec.md, "Left padding", "Right padding": each element as the forms run it
                from sparsecc.codegen.mask_positions import cut_element, mask_4d
                masks_4d = [mask_4d(m) for m in masks]
                for i, (start, rows, end, end_rows) in enumerate(cuts):
                    if rows < end_rows:
                        parts = [cut_element(m[i:i + 1] if m.shape[0] > 1 else m, rows, start, end_rows, end)
                                 for m in masks_4d]
                        self._record_call(entry, q[i:i + 1, :, rows:end_rows], k[i:i + 1, :, start:end], parts,
                                          flags, scale, causal)
                return
        self._record_call(entry, q, k, masks, flags, scale, causal)

    def _record_call(self, entry, q, k, masks, flags, scale: float, causal: bool) -> None:
        """Add the statistics of one call (or one padded element of it, cut as docs/spec.md says)."""
        sq, sk = q.shape[2], k.shape[2]
        cands = entry["candidates"]
        # The dynamic forms' selections depend on the whole call: made once, then read chunk by chunk.
        estimates: Dict[tuple, torch.Tensor] = {}
        causal_rows = None if causal else _mask_causal_rows(masks, flags, sq, sk)
        selections = {c: _call_selection(form, q, k, causal, causal_rows, scale, estimates)
                      for c, form in enumerate(cands) if not isinstance(form, Streaming)}
        step = -(-self.rows_per_chunk // self.density_block) * self.density_block   # chunks hold whole blocks
        for r0 in range(0, sq, step):
            r1 = min(sq, r0 + step)
            self._record_rows(entry, cands, selections, q[:, :, r0:r1], k, r0, sq, masks, flags, scale, causal)

    def _record_rows(self, entry, cands, selections, q, k, r0, sq, masks, flags, scale, causal) -> None:
        """Add the statistics of query rows ``r0 .. r0 + q.shape[-2]`` of a call with ``sq`` rows."""
        b, h, rows, _ = q.shape
        sk = k.shape[2]
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        allowed = torch.ones(1, 1, rows, sk, dtype=torch.bool, device=q.device)
        for mask, (additive, keep) in zip(masks, flags):
            if mask.dim() >= 2 and mask.shape[-2] == sq:
                mask = mask[..., r0:r0 + rows, :]
            if additive:
                logits = logits + mask.float()
            allowed = allowed & _takes_part(mask, additive, keep)
        positions = torch.arange(r0, r0 + rows, device=q.device) + (sk - sq)
        if causal:
            allowed = allowed & (torch.arange(sk, device=q.device)[None, :] <= positions[:, None])
        # The masks usually broadcast over batch and heads: the block counts run on that small mask and are
        # expanded afterwards (9x less work for a causal model with 9 heads).
        if sq > sk:
            counted_small = allowed.any(-1)
        else:
            counted_small = allowed[..., torch.arange(rows, device=q.device), positions.clamp(0, sk - 1)]
        present_small = allowed & counted_small[..., None]
        allowed = allowed.expand(b, h, rows, sk)
        counted = counted_small.expand(b, h, rows)
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
        del logits
        probs = probs * counted[..., None]
        present = present_small.expand(b, h, rows, sk).float()
        entry["rows"] += counted.double().sum((0, 2))
        entry["allowed"] += present.sum((0, 2, 3), dtype=torch.float64)
        blk = entry["density_block"]

        def block_count(mask):   # [b' <= B, h' <= H, R, Sk] -> blocks holding a True entry, per head [H]
            return any_blocks(mask, blk).sum((2, 3), dtype=torch.float64).expand(b, h).sum(0)

        if blk > 1:
            entry["allowed_blocks"] += block_count(present_small)

        def count_blocks(c, keep):   # kept blocks of candidate c, from its token keep mask (broadcast to B, H)
            if blk > 1:
                entry["kept_blocks"][:, c] += block_count(keep & present_small)
        zero = torch.zeros(b, h, rows, 1, device=q.device)
        cum_mass = cum_kept = None
        # Candidate-independent block sums, made once per chunk: the mass and the present entries of every
        # (row, key block) per key-block size, and which density tiles hold a present entry.
        block_sums: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        present_tiles: Optional[torch.Tensor] = None
        for c, form in enumerate(cands):
            if isinstance(form, Streaming):
                if cum_mass is None:
                    cum_mass = torch.cat([zero, probs.cumsum(-1)], -1)
                    cum_kept = torch.cat([zero, present.cumsum(-1)], -1)
                mass = _streaming_sums(form, positions, cum_mass, causal)
                kept = _streaming_sums(form, positions, cum_kept, causal)
                entry["mass"][:, c] += mass.sum((0, 2), dtype=torch.float64)
                entry["kept"][:, c] += kept.sum((0, 2), dtype=torch.float64)
                if blk > 1:
                    count_blocks(c, streaming_rows(form, positions, sk, causal))
                continue
            kind, keep = selections[c]
            if kind == "blocks":
                blocks, block_q, block_k = keep
                n_k = blocks.shape[-1]
                if block_k not in block_sums:
                    pad = n_k * block_k - sk
                    block_sums[block_k] = tuple(
                        torch.nn.functional.pad(values, (0, pad)).view(b, h, rows, n_k, block_k).sum(-1)
                        for values in (probs, present))
                row_blocks = blocks[:, :, torch.arange(r0, r0 + rows, device=q.device) // block_q].float()
                for total, per_block in zip((entry["mass"], entry["kept"]), block_sums[block_k]):
                    total[:, c] += (per_block * row_blocks).sum((0, 2, 3), dtype=torch.float64)
                if blk > 1 and block_q == blk and block_k == blk:
                    # The selection's tiles are the density tiles (and chunks start on them): a kept tile counts
                    # when it holds a present entry.
                    if present_tiles is None:
                        present_tiles = any_blocks(present_small, blk)
                    tiles = blocks[:, :, r0 // blk: r0 // blk + present_tiles.shape[-2]]
                    entry["kept_blocks"][:, c] += (tiles & present_tiles).sum(
                        (2, 3), dtype=torch.float64).expand(b, h).sum(0)
                elif blk > 1:
                    count_blocks(c, row_blocks.bool().repeat_interleave(block_k, -1)[..., :sk])
            else:
                tokens = keep[..., r0:r0 + rows, :].expand(b, h, rows, sk)
                entry["mass"][:, c] += (probs * tokens).sum((0, 2, 3), dtype=torch.float64)
                entry["kept"][:, c] += (present * tokens).sum((0, 2, 3), dtype=torch.float64)
                count_blocks(c, tokens)

    def table(self, site: str) -> Tuple[List[object], torch.Tensor, torch.Tensor]:
        """(candidates, recall [H, C], density [H, C]) of one site (density in blocks of ``density_block``)."""
        e = self.sites[site]
        recall = e["mass"] / e["rows"].clamp_min(1)[:, None]
        if e.get("density_block", 1) > 1:
            density = e["kept_blocks"] / e["allowed_blocks"].clamp_min(1)[:, None]
        else:
            density = e["kept"] / e["allowed"].clamp_min(1)[:, None]
        return e["candidates"], recall, density


def _mask_causal_rows(masks, flags, seq_q: int, seq_k: int) -> Optional[torch.Tensor]:
    """Per batch element (bool ``[B|1]``), whether a non-causal call's masks remove every key after each query's
    position, or None without masks (or with more queries than keys).

    The compiled dynamic forms run such a call causally, batch element by batch element
    (``codegen/attention_ops.py``, docs/spec.md: "a mask that removes every later key makes the attention
    causal"): HF passes its causal mask as a tensor whenever a batch is padded, so the recording must too.
    """
    if not masks or seq_q > seq_k:
        return None
    from sparsecc.codegen.mask_positions import mask_is_causal

    combined = None
    for mask, (additive, keep) in zip(masks, flags):
        part = _takes_part(mask, additive, keep)
        combined = part if combined is None else combined & part
    return mask_is_causal(combined, seq_q, seq_k)


def _padding_cuts(masks, flags, batch: int, seq_q: int, seq_k: int) -> Optional[list]:
    """``padding_cuts`` (codegen/mask_positions.py) of what a non-causal call's masks let take part together."""
    from sparsecc.codegen.mask_positions import mask_4d, padding_cuts

    combined = None
    for mask, (additive, keep) in zip(masks, flags):
        part = mask_4d(_takes_part(mask, additive, keep))
        combined = part if combined is None else combined & part
    return padding_cuts(combined, batch, seq_q, seq_k)


def _takes_part(mask: torch.Tensor, additive: bool, keep: bool) -> torch.Tensor:
    """Bool: the entries a model mask lets take part (additive values above -1e4; a bool mask that keeps, or the
    complement of one that removes)."""
    if additive:
        return mask > MASKED_LOGIT_MAX
    return mask if keep else ~mask


def _call_selection(form, q: torch.Tensor, k: torch.Tensor, causal: bool, causal_rows: Optional[torch.Tensor],
                    scale: float, estimates: Dict[tuple, torch.Tensor]):
    """:func:`_selection` for one call, causal for the batch elements whose masks are (``causal_rows``)."""
    if causal or causal_rows is None or not bool(causal_rows.any()):
        return _selection(form, q, k, causal, scale, estimates)
    if bool(causal_rows.all()):
        return _selection(form, q, k, True, scale, estimates)
    # A mixed batch: each group of batch elements selects with its own causality (as the compiled op splits it).
    # The estimates cache keys on causality, and within one call each causality is one group of elements.
    b = q.shape[0]
    rows = causal_rows.expand(b)
    kind, keep, extra = None, None, ()
    for flag, batch in ((True, rows.nonzero().flatten()), (False, (~rows).nonzero().flatten())):
        kind, selected = _selection(form, q[batch], k[batch], flag, scale, estimates)
        part, extra = (selected[0], selected[1:]) if kind == "blocks" else (selected, ())
        if keep is None:
            keep = part.new_zeros(b, *part.shape[1:])
        keep[batch] = part.expand(len(batch), *part.shape[1:])
    return kind, ((keep, *extra) if kind == "blocks" else keep)


def _selection(form, q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float,
               estimates: Optional[Dict[tuple, torch.Tensor]] = None):
    """A dynamic form's kept set for one call: ("blocks", (mask [B, H, nQ, nK], block_q, block_k)) or ("tokens", mask).

    ``estimates`` caches block_topk estimates by (block, pool, rows, causality) within the call: candidates that
    differ only in their budget (a ``min_mass`` grid, several ``topk``) compute the estimate once.
    """
    from sparsecc.codegen import dynamic_attention as dyn

    if form.name == "block_topk":
        key = (form.block, form.pool, form.rows, causal)
        scores = None if estimates is None else estimates.get(key)
        if scores is None:
            scores = dyn.block_topk_scores_ref(q, k, form, causal, scale)
            if estimates is not None:
                estimates[key] = scores
        table = dyn.block_topk_table_ref(q, k, block=form.block, topk=form.topk, cdf=form.cdf, min_mass=form.min_mass,
                                         sink_blocks=form.sink_blocks, local_blocks=form.local_blocks,
                                         pool=form.pool, rows=form.rows, causal=causal, scale=scale, scores=scores)
        return "blocks", (table.to_dense_block_mask(), table.block_q, table.block_k)
    return "tokens", dynamic_mask(form, q, k, causal, scale)


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


def _families(cands) -> Dict[object, List[int]]:
    """The candidates a site may combine: streaming heads may differ in sink/window; each other form is a family
    of its own (one layout per site)."""
    families: Dict[object, List[int]] = {}
    for c, form in enumerate(cands):
        families.setdefault("streaming" if isinstance(form, Streaming) else form, []).append(c)
    return families


def _site_lowest(cands, density) -> float:
    """The smallest summed density over one site's heads that any option reaches (dense heads count 1)."""
    lowest = float(density.shape[0])
    for family, members in _families(cands).items():
        per_head = density[:, members].min(dim=1).values
        if isinstance(family, BlockTopK):    # every head or none (see _site_option)
            lowest = min(lowest, float(per_head.sum()))
        else:
            lowest = min(lowest, float(per_head.clamp(max=1.0).sum()))
    return lowest


def _site_option(cands, recall, density, price: float):
    """The best (value, per-head candidate index or -1 for dense) of one site at a density price."""
    heads = recall.shape[0]
    dense_value = 1.0 - price - _TIE_PRICE
    value = recall - (price + _TIE_PRICE) * density          # [H, C]
    best_total, best_pick = heads * dense_value, [-1] * heads
    for family, members in _families(cands).items():
        sub = value[:, members]
        top, arg = sub.max(dim=1)
        if isinstance(family, BlockTopK):
            # docs/spec.md: block_topk applies only with one rule for every head (dense heads beside it keep the
            # whole site dense), so the site takes it for all heads or for none.
            pick = [members[int(a)] for a in arg]
            total = float(top.sum())
        else:
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

    heads = sum(int(dens.shape[0]) for _, _, dens in tables.values())
    lowest = sum(_site_lowest(cands, dens) for cands, _, dens in tables.values()) / max(heads, 1)
    if heads and lowest > budget + 1e-12:
        blocks = {e.get("density_block", 1) for e in stats.sites.values()}
        raise ValueError(f"attention budget={budget!r} cannot be met: every site at its sparsest option still "
                         f"keeps a mean density of {lowest:.4f} (density in blocks of "
                         f"{', '.join(map(str, sorted(blocks)))}; calibration keys shorter than a few blocks leave "
                         "nothing to skip). Raise the budget, calibrate on longer sequences, or give sparser "
                         "candidates or a smaller density block")
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
    if mean > budget + 1e-9:   # the bisection's price cap reached without meeting the budget: never return it
        raise ValueError(f"attention budget={budget!r} was not met: the choice keeps a mean density of {mean:.4f}")
    out = []
    for s, pick in picks.items():
        cands, recall, density = tables[s]
        out.append(HeadChoice(s, [cands[c] if c >= 0 else Dense() for c in pick],
                              [float(recall[h, c]) if c >= 0 else 1.0 for h, c in enumerate(pick)],
                              [float(density[h, c]) if c >= 0 else 1.0 for h, c in enumerate(pick)]))
    return out


def record_attention(model, batches, candidates: Optional[Sequence[object]] = None,
                     density_block: int = DENSITY_BLOCK) -> AttentionStats:
    """Run the calibration batches through the recording graph; return the statistics (density in
    ``density_block`` x ``density_block`` blocks, 1 for entries)."""
    from sparsecc.tune.capture import split_batch

    if not isinstance(density_block, int) or density_block < 1:
        raise ValueError(f"density_block={density_block!r} is not allowed; expected an integer >= 1")
    stats = AttentionStats(candidates, density_block=density_block)
    compiled = torch.compile(model, backend=recording_backend(stats), dynamic=False)
    try:
        with torch.no_grad():
            for batch in batches:
                args, kwargs = split_batch(batch)
                compiled(*args, **kwargs)
    finally:
        _RECORDERS.pop(id(stats), None)
    return stats
