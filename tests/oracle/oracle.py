"""Expected outputs of sparsecc's forms, computed from the text of docs/spec.md alone.

This module (with its parts oracle_positions.py, oracle_dynamic.py for the dynamic selections and
oracle_weights.py for the FFN and linear forms) imports nothing from
sparsecc (nor from the other tests): every
rule below is read off docs/spec.md and computed element by element in
float64 (except the dynamic estimates, which the spec puts in float32; they
are computed in float64 here and every decision closer than a tolerance to
its boundary is reported as *undefined*, because a float32 computation may
legitimately fall on either side of it).

Conventions

* q is ``[B, H, Sq, D]``, k and v are ``[B, Hkv, Sk, D]``; query head ``h``
  uses kv head ``h // (H // Hkv)``.
* Query row ``i`` has position ``p = i + Sk - Sq`` (spec, "Attention forms").
* A keep mask is boolean ``[B, H, Sq, Sk]`` (True: the key takes part).
* The model's own mask is boolean (True takes part) or additive float (added
  to the logits, ``-inf`` removes the key); it broadcasts to ``[B, H, Sq, Sk]``.
* Functions that return ``valid`` mark the rows (or tokens, or output
  features) whose expected value the spec defines unambiguously: a row with
  no kept key (the spec does not say what it outputs), or a dynamic selection
  within a tolerance of a tie or of the cdf boundary, is not valid.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from tests.oracle.oracle_positions import F64, causal_keep, query_positions  # noqa: F401  (re-exported)
from tests.oracle.oracle_dynamic import _expand_kv, block_topk_keep, vertical_slash_keep  # noqa: F401  (re-exported)

# An additive mask value at or below this takes a key out for the purpose of deciding whether a row is empty
# (HF masks use finfo.min; anything this negative has no weight next to a key that is not masked).
EFFECTIVELY_MASKED = -1.0e4

DYNAMIC_FORMS = ("block_topk", "vertical_slash")


# ---------------------------------------------------------------- which rule applies (spec: "How a site finds its rule")

def covers(rule: dict, path: str) -> bool:
    """A rule covers a site when its ``modules`` glob (default ``*``) matches the module path, case-sensitively."""
    return fnmatch.fnmatchcase(path, rule.get("modules", "*"))


def policy_of(spec: dict, rule: dict) -> str:
    """The rule's own policy wins; without one, ``defaults.policy`` (default ``auto``)."""
    return rule.get("policy", spec.get("defaults", {}).get("policy", "auto"))


@dataclass
class AttentionSiteRule:
    """Per-head forms of one attention site and the policy in force for the site."""

    forms: List[Optional[dict]]   # per head: the deciding sparse rule, or None (dense: no rule or a dense rule)
    policy: Optional[str]         # the policy of the last covering sparse rule; None without one

    @property
    def sparse(self) -> bool:
        """On the CPU only ``force`` applies a form (``auto`` keeps CPU sites dense, ``off`` never applies)."""
        return self.policy == "force" and any(f is not None for f in self.forms)


def attention_site_rule(spec: dict, path: str, heads: int) -> AttentionSiteRule:
    """Rule 3 (later rules override earlier ones) applied per head, plus the site's policy.

    "For an attention site whose heads are covered by several rules, the
    policy of the last covering sparse rule applies to the site."
    """
    covering = [r for r in spec.get("attention", []) if covers(r, path)]
    per_head: List[Optional[dict]] = [None] * heads
    for rule in covering:
        for h in rule.get("heads", range(heads)):
            if h < heads:
                per_head[h] = rule
    forms = [None if r is None or r["form"] == "dense" else r for r in per_head]
    sparse_rules = [r for r in covering if r["form"] != "dense"]
    return AttentionSiteRule(forms, policy_of(spec, sparse_rules[-1]) if sparse_rules else None)


def site_rule(spec: dict, kind: str, path: str) -> Tuple[Optional[dict], Optional[str]]:
    """(deciding rule, its policy) of an FFN or linear site: the last covering rule, or (None, None)."""
    covering = [r for r in spec.get(kind, []) if covers(r, path)]
    if not covering:
        return None, None
    return covering[-1], policy_of(spec, covering[-1])


def site_applies(spec: dict, kind: str, path: str) -> bool:
    """Whether an FFN / linear site gets its form on the CPU: a non-dense deciding rule under ``force``."""
    rule, policy = site_rule(spec, kind, path)
    return rule is not None and rule["form"] != "dense" and policy == "force"


# ---------------------------------------------------------------- attention: static layouts

def mask_positions(mask, b: int, h: int, sq: int, sk: int) -> torch.Tensor:
    """``[B, H, Sq]`` positions of a site that is not causal and has a mask, with Sq < Sk (spec, "Attention
    forms"): ``p = min(i + Sk - Sq, m_i)``, ``m_i`` the last key row i's mask keeps (bool True, or an additive
    value above -1e4); ``i + Sk - Sq`` for a row that keeps none."""
    m = torch.broadcast_to(mask, (b, h, sq, sk))
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    out = torch.empty(b, h, sq, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                kept = torch.nonzero(keeps[bi, hi, i]).flatten()
                default = i + sk - sq
                out[bi, hi, i] = min(default, int(kept[-1])) if kept.numel() else default
    return out


def streaming_keep_at(p: torch.Tensor, sk: int, sink: int, window: int) -> torch.Tensor:
    """Bidirectional streaming at explicit query positions ``p`` (``[..., Sq]``): ``[..., Sq, Sk]``."""
    j = torch.arange(sk)
    p = p[..., None]
    return (j < sink) | (p < sink) | ((p - j).abs() < window)


def streaming_keep(sq: int, sk: int, sink: int, window: int, causal: bool) -> torch.Tensor:
    """``form = "streaming"``, ``[Sq, Sk]``.

    Causal: ``j <= p`` and (``j < sink`` or ``p - j < window``).
    Bidirectional: ``j < sink``, or ``p < sink``, or ``|p - j| < window``.
    """
    p = query_positions(sq, sk)[:, None]
    j = torch.arange(sk)[None, :]
    if causal:
        return (j <= p) & ((j < sink) | (p - j < window))
    return (j < sink) | (p < sink) | ((p - j).abs() < window)


def block_sparse_keep(sq: int, sk: int, block: int, local_blocks: int = 1, global_blocks: int = 0,
                      causal: bool = False, extra_blocks: Sequence[int] = ()) -> torch.Tensor:
    """``form = "block_sparse"`` without random blocks, ``[Sq, Sk]``.

    Query block ``a`` is the block of the query *position* ``p`` (positions are
    what the section's preamble defines; ``|a - b|`` is "a band around the
    diagonal"), key block ``b`` the block of key position ``j``. Kept iff
    ``|a - b| < local_blocks`` or ``a < global_blocks`` or ``b < global_blocks``
    (or ``b`` in ``extra_blocks``: a given set of drawn random blocks, for every query block);
    then causality (and, in ``attention``, the model's mask) token by token.
    """
    keep = block_sparse_keep_at(query_positions(sq, sk), sk, block, local_blocks, global_blocks, extra_blocks)
    return keep & causal_keep(sq, sk) if causal else keep


def block_sparse_keep_at(p: torch.Tensor, sk: int, block: int, local_blocks: int = 1,
                         global_blocks: int = 0, extra_blocks: Sequence[int] = ()) -> torch.Tensor:
    """Bidirectional ``block_sparse`` at explicit query positions ``p`` (``[..., Sq]``): query block
    ``p // block``; ``extra_blocks`` as in :func:`block_sparse_keep`; ``[..., Sq, Sk]``."""
    j = torch.arange(sk)
    a, b = (p // block)[..., None], j // block
    drawn = torch.isin(b, torch.tensor(list(extra_blocks), dtype=b.dtype))
    return ((a - b).abs() < local_blocks) | (a < global_blocks) | (b < global_blocks) | drawn


def static_keep(form: Optional[dict], sq: int, sk: int, causal: bool) -> torch.Tensor:
    """The ``[Sq, Sk]`` keep mask of one head under a static form (None: dense), causality included."""
    if form is None or form["form"] == "dense":
        return causal_keep(sq, sk) if causal else torch.ones(sq, sk, dtype=torch.bool)
    if form["form"] == "streaming":
        return streaming_keep(sq, sk, form["sink"], form["window"], causal)
    if form["form"] == "block_sparse":
        if form.get("random_blocks", 0):
            raise ValueError("random blocks are drawn by sparsecc; the oracle has no layout for them")
        return block_sparse_keep(sq, sk, form.get("block", 64), form.get("local_blocks", 1),
                                 form.get("global_blocks", 0), causal, form.get("extra_blocks", ()))
    raise ValueError(f"{form['form']} is not a static attention form")


# ---------------------------------------------------------------- attention: the whole site

def head_keep(q, k, forms: Sequence[Optional[dict]], *, scale: float, causal: bool,
              dynamic_causal: Optional[bool] = None):
    """(keep_min, keep_max) ``[B, H, Sq, Sk]`` for per-head forms (None: dense head).

    Spec, "Heads with different forms": each head keeps what a site of its form alone keeps, so a dynamic
    head's keys come from that form's selection (made for every head, then read at this head).
    ``dynamic_causal`` overrides ``causal`` for the dynamic heads (their estimate is causal when the mask
    removes every later key; the static heads follow is_causal).
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    keep_min = torch.zeros(b_, h_, sq, sk, dtype=torch.bool)
    keep_max = torch.zeros_like(keep_min)
    selections = {}
    for hi, form in enumerate(forms):
        if form is not None and form["form"] in DYNAMIC_FORMS:
            args = {key: val for key, val in form.items() if key not in ("form", "modules", "heads", "policy",
                                                                          "phase")}
            key = (form["form"], tuple(sorted(args.items())))
            if key not in selections:
                fn = block_topk_keep if form["form"] == "block_topk" else vertical_slash_keep
                selections[key] = fn(q, k, scale=scale, causal=causal if dynamic_causal is None else dynamic_causal,
                                     **args)
            keep_min[:, hi], keep_max[:, hi] = selections[key][0][:, hi], selections[key][1][:, hi]
        else:
            keep_min[:, hi] = keep_max[:, hi] = static_keep(form, sq, sk, causal)
    return keep_min, keep_max


def positions_from_mask(causal: bool, mask, sq: int, sk: int) -> bool:
    """Whether the spec's mask rule places the queries (not causal, a mask, fewer queries than keys)."""
    return not causal and mask is not None and sq < sk


def attend(q, k, v, keep_min, keep_max=None, *, scale: float, mask=None):
    """Dense float64 softmax attention over the kept keys (and the model's mask).

    Returns ``(out [B, H, Sq, Dv], valid [B, H, Sq])``; a row is valid when its
    kept set is defined (keep_min == keep_max after the mask) and it keeps at
    least one key that the mask does not (effectively) remove.
    """
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    keep_max = keep_min if keep_max is None else keep_max
    qd, kd, vd = q.to(F64), _expand_kv(k.to(F64), h_), _expand_kv(v.to(F64), h_)
    logits = scale * qd @ kd.transpose(-1, -2)
    takes_part = torch.ones(b_, h_, sq, sk, dtype=torch.bool)   # not (effectively) removed by the mask
    if mask is not None:
        m = torch.broadcast_to(mask, (b_, h_, sq, sk))
        if m.dtype == torch.bool:
            takes_part = hard = m
        else:
            m = m.to(F64)
            logits = logits + m
            takes_part, hard = m > EFFECTIVELY_MASKED, m > float("-inf")
        keep_min, keep_max = keep_min & hard, keep_max & hard
    probs = torch.softmax(logits.masked_fill(~keep_min, float("-inf")), -1).nan_to_num(0.0)
    out = probs @ vd
    defined = (keep_min == keep_max).all(-1)
    nonempty = (keep_min & takes_part).any(-1)
    return out, defined & nonempty


def _keep_at(form: Optional[dict], p: torch.Tensor, sk: int) -> torch.Tensor:
    """One head's bidirectional keep mask at explicit positions ``p`` (``[B, Sq]``) -> ``[B, Sq, Sk]``."""
    if form is None or form["form"] == "dense":
        return torch.ones(*p.shape, sk, dtype=torch.bool)
    if form["form"] == "streaming":
        return streaming_keep_at(p, sk, form["sink"], form["window"])
    if form.get("random_blocks", 0):
        raise ValueError("random blocks are drawn by sparsecc; the oracle has no layout for them")
    return block_sparse_keep_at(p, sk, form.get("block", 64), form.get("local_blocks", 1),
                                form.get("global_blocks", 0), form.get("extra_blocks", ()))


def _shown_keys(mask, b: int, sq: int, sk: int) -> torch.Tensor:
    """``[Sk]``: the keys batch element ``b``'s mask shows to some query row of some head (bool True, or additive
    above -1e4)."""
    m = mask
    while m.dim() < 4:
        m = m[None]
    m = m[b if m.shape[0] > 1 else 0]                                   # [H|1, Sq|1, Sk|1]
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    return torch.broadcast_to(keeps, (keeps.shape[0], sq, sk)).any(0).any(0)


def left_padding(mask, b: int, sq: int, sk: int) -> int:
    """Spec, "Left padding": how many leading keys batch element ``b``'s mask hides from every query row and head
    (bool False, or additive at or below -1e4); ``sk`` when it hides every key."""
    shown = _shown_keys(mask, b, sq, sk)
    for j in range(sk):
        if shown[j]:
            return j
    return sk


def right_padding(mask, b: int, sq: int, sk: int) -> int:
    """Spec, "Right padding": how many trailing keys batch element ``b``'s mask hides from every query row and head
    (``sk`` when it hides every key)."""
    shown = _shown_keys(mask, b, sq, sk)
    for j in range(sk - 1, -1, -1):
        if shown[j]:
            return sk - 1 - j
    return sk


def _leading_rows(keeps, o: int, end: int, sq: int) -> int:
    """Spec, "Left padding": the leading rows that sit before key ``o`` (at ``i``, or ``i + end - Sq`` with fewer
    queries than keys) or keep no key."""
    rows = min(sq, max(0, o - (end - sq if sq < keeps.shape[-1] else 0)))
    while rows < sq and not keeps[0, :, rows].any():
        rows += 1
    return rows


def _element_mask(mask, b: int):
    m = mask
    while m.dim() < 4:
        m = m[None]
    return m[b:b + 1] if m.shape[0] > 1 else m


def _padding_segments(mask, b_: int, sq: int, sk: int):
    """Spec, "Left padding" and "Right padding": per batch element, ``(m, o, end, rows, end_rows)``: its mask
    ``m`` (4-D), its first shown key ``o``, the end ``end`` of the keys the form sees, its leading padding rows
    ``[0, rows)`` (dense) and the rows the form places ``[rows, end_rows)`` (after them, with as many queries as
    keys, the rows of its right padding: unspecified). None when no element is padded."""
    pads = [(left_padding(mask, b, sq, sk), right_padding(mask, b, sq, sk)) for b in range(b_)]
    if not any(o or r for o, r in pads):
        return None
    segments = []
    for b, (o, r) in enumerate(pads):
        m = _element_mask(mask, b)
        keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
        keeps = torch.broadcast_to(keeps, (1, keeps.shape[1], sq, sk))
        end = max(sk - r, o)
        rows = _leading_rows(keeps, o, end, sq)
        if sq < sk and end < sk:   # cut only if each row after the padding rows then sits where its mask ends
            index = torch.arange(sk)
            last = [int(torch.where(keeps[0, :, i], index, -1).max()) for i in range(sq)]
            if any(last[i] != i + end - sq for i in range(rows, sq)):
                end = sk
                rows = _leading_rows(keeps, o, end, sq)
        end_rows = max(end, rows) if sq == sk else sq  # with Sq == Sk the rows of the right padding's keys follow
        segments.append((m, o, end, rows, end_rows))
    return segments


def _segment_mask(m, o: int, end: int, rows: int, end_rows: int):
    """The part of an element's mask ``m`` over its placed rows and the keys the form sees."""
    m_rest = m if m.shape[2] == 1 else m[:, :, rows:end_rows]
    return m_rest if m_rest.shape[3] == 1 else m_rest[..., o:end]


def _by_padding(q, k, v, forms, *, causal: bool, mask, scale: float, flag: bool):
    """Spec, "Left padding" and "Right padding": per batch element, the form sees its keys from its first shown key
    ``o`` to its right padding (and, with as many queries as keys, the rows of those keys); its left padding rows
    (the leading rows that sit before ``o`` or keep no key) attend densely (every key their mask keeps); the rows of
    its right padding are unspecified (invalid here). Returns None when no element is padded."""
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    segments = _padding_segments(mask, b_, sq, sk)
    if segments is None:
        return None
    out = torch.zeros(b_, h_, sq, v.shape[-1], dtype=F64)
    valid = torch.zeros(b_, h_, sq, dtype=torch.bool)
    for b, (m, o, end, rows, end_rows) in enumerate(segments):
        if rows:
            keep_all = torch.ones(1, h_, rows, sk, dtype=torch.bool)
            m_rows = m if m.shape[2] == 1 else m[:, :, :rows]
            out[b:b + 1, :, :rows], valid[b:b + 1, :, :rows] = attend(
                q[b:b + 1, :, :rows], k[b:b + 1], v[b:b + 1], keep_all, scale=scale, mask=m_rows)
        # the rows of the right padding (from end_rows on) are unspecified: left invalid
        if rows < end_rows:
            out[b:b + 1, :, rows:end_rows], valid[b:b + 1, :, rows:end_rows] = expected_attention(
                q[b:b + 1, :, rows:end_rows], k[b:b + 1, :, o:end], v[b:b + 1, :, o:end], forms, causal=causal,
                mask=_segment_mask(m, o, end, rows, end_rows), scale=scale, is_causal_flag=flag, padding_cut=True)
    return out, valid


def row_positions(mask, b_: int, h_: int, sq: int, sk: int, *, is_causal_flag: bool,
                  padding_cut: bool = False) -> torch.Tensor:
    """``[B, H, Sq]``: the query position at which a positional form places each row, among the keys the form sees
    (spec, "Attention forms", "Left padding", "Right padding"), as :func:`expected_attention` places them; -1 for
    the rows no form places (an element's left padding rows, which attend densely, and its right padding's rows)."""
    if mask is not None and not is_causal_flag and not padding_cut:
        segments = _padding_segments(mask, b_, sq, sk)
        if segments is not None:
            out = torch.full((b_, h_, sq), -1, dtype=torch.long)
            for b, (m, o, end, rows, end_rows) in enumerate(segments):
                if rows < end_rows:
                    out[b:b + 1, :, rows:end_rows] = row_positions(
                        _segment_mask(m, o, end, rows, end_rows), 1, h_, end_rows - rows, end - o,
                        is_causal_flag=is_causal_flag, padding_cut=True)
            return out
    if positions_from_mask(is_causal_flag, mask, sq, sk):
        return mask_positions(mask, b_, h_, sq, sk)
    return query_positions(sq, sk).expand(b_, h_, sq).clone()


def key_ranges(mask, b_: int, sq: int, sk: int, *, is_causal_flag: bool) -> List[Tuple[int, int]]:
    """Per batch element, ``(o, end)``: the keys ``[o, end)`` its forms see after the spec's padding rules (where
    its blocks are cut from, and what its random blocks are drawn among); ``(0, sk)`` where no rule applies."""
    segments = None if mask is None or is_causal_flag else _padding_segments(mask, b_, sq, sk)
    return [(0, sk)] * b_ if segments is None else [(o, end) for _, o, end, _, _ in segments]


def expected_attention(q, k, v, forms: Sequence[Optional[dict]], *, causal: bool, mask=None,
                       scale: Optional[float] = None, is_causal_flag: Optional[bool] = None,
                       padding_cut: bool = False):
    """The output of an attention site whose heads use ``forms`` (None: dense). Returns (out, valid rows).

    ``is_causal_flag``: whether causality comes from SDPA's ``is_causal`` (default: ``causal``); a site made
    causal by a mask tensor is "not causal" for the spec's position rule. ``padding_cut``: the spec's
    padding rules were already applied (the keys given start at the element's first shown key and end at its
    right padding).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    b_, h_, sq, _ = q.shape
    sk = k.shape[2]
    flag = causal if is_causal_flag is None else is_causal_flag
    if mask is not None and not flag and not padding_cut:
        padded = _by_padding(q, k, v, forms, causal=causal, mask=mask, scale=scale, flag=flag)
        if padded is not None:
            return padded
    if positions_from_mask(flag, mask, sq, sk):
        p = mask_positions(mask, b_, h_, sq, sk)
        # static heads apply at the mask's positions; dynamic heads select as if every row sat at
        # i + Sk - Sq, and a row the mask moves attends densely
        dynamic = [f is not None and f["form"] in DYNAMIC_FORMS for f in forms]
        keep_min, keep_max = _dynamic_keep(q, k, forms, scale=scale, causal=causal, mask=mask)
        moved = (p != query_positions(sq, sk))[..., None]
        for hi, f in enumerate(forms):
            if dynamic[hi]:
                keep_min[:, hi] |= moved[:, hi]
                keep_max[:, hi] |= moved[:, hi]
            else:
                keep_min[:, hi] = keep_max[:, hi] = _keep_at(f, p[:, hi], sk)
        return attend(q, k, v, keep_min, keep_max, scale=scale, mask=mask)
    keep_min, keep_max = _dynamic_keep(q, k, forms, scale=scale, causal=causal, mask=mask)
    return attend(q, k, v, keep_min, keep_max, scale=scale, mask=mask)


def removes_later_keys(mask, b: int, sq: int, sk: int) -> bool:
    """Spec, block_topk step 1: batch element ``b``'s mask removes every key after each query's position
    ``p = i + Sk - Sq`` (bool False, or additive at or below -1e4), for every head."""
    m = mask
    while m.dim() < 4:
        m = m[None]
    m = m[b if m.shape[0] > 1 else 0]                                   # [H|1, Sq|1, Sk]
    keeps = m if m.dtype == torch.bool else m > EFFECTIVELY_MASKED   # in the mask's dtype (docs/spec.md)
    keeps = torch.broadcast_to(keeps, (keeps.shape[0], sq, sk))
    for i in range(sq):
        if keeps[..., i, i + sk - sq + 1:].any():
            return False
    return True


def _dynamic_keep(q, k, forms, *, scale: float, causal: bool, mask):
    """head_keep, with the spec's rules that a mask removing every later key makes a dynamic estimate causal,
    decided per batch element, and that one query row without a mask is causal (no key lies after it)."""
    sq, sk = q.shape[2], k.shape[2]
    if causal or not {f["form"] for f in forms if f is not None} & set(DYNAMIC_FORMS):
        return head_keep(q, k, forms, scale=scale, causal=causal)
    if mask is None:
        return head_keep(q, k, forms, scale=scale, causal=causal, dynamic_causal=sq == 1)
    parts = [head_keep(q[b:b + 1], k[b:b + 1], forms, scale=scale, causal=causal,
                       dynamic_causal=sq <= sk and removes_later_keys(mask, b, sq, sk)) for b in range(q.shape[0])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# The FFN and linear forms live in their own module; every oracle is reachable as ``oracle.<name>``.
from tests.oracle.oracle_weights import (ACTIVATIONS, Ffn, expected_ffn, expected_linear,  # noqa: E402,F401
                                         prune_2_4, prune_block_weights, threshold)
