"""Attention cases for the oracle tests: what a case is, how its tensors are built, hypothesis strategies.

A case fixes the spelling, shapes, causality (and how the model expresses it),
the model's mask, the dtype and the spec. ``run_case`` compiles it, checks that
the form was applied, and compares with ``oracle.expected_attention``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from hypothesis import assume
from hypothesis import strategies as st

from tests.oracle import harness as hn
from tests.oracle import oracle

SDPA = ("sdpa_gqa", "sdpa_repeat_kv", "sdpa_repeat_interleave")
BOOL_SPELLINGS = SDPA + ("matmul_masked_fill",)
ADDITIVE_SPELLINGS = SDPA + ("matmul_additive", "einsum_additive")
ALL_SPELLINGS = tuple(hn.SPELLINGS)


@dataclass
class AttnCase:
    spelling: str
    batch: int
    heads: int
    kv_heads: int
    sq: int
    sk: int
    dim: int
    causal: bool                  # the model's semantics
    causal_via: str               # "is_causal" (SDPA flag), "mask" (a mask tensor input), "" (bidirectional)
    mask_kind: str                # none, bool, additive, finfo, bias, neutral_bool, neutral_additive
    padding: str                  # none, left, right
    lengths: Tuple[int, ...]      # real tokens per sequence (padding != none)
    compact_mask: bool            # broadcastable [B,1,1,Sk] / [Sq,Sk] shape instead of [B,1,Sq,Sk]
    dtype: str                    # float32, bfloat16
    scale: Optional[float]
    temperature: float
    seed: int
    rules: List[dict] = field(default_factory=list)
    defaults_policy: str = "force"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def spec(self) -> dict:
        return {"version": 1, "defaults": {"policy": self.defaults_policy},
                "attention": [dict(r) for r in self.rules]}

    def replace(self, **kw) -> "AttnCase":
        return dataclasses.replace(self, **kw)


def tensors(c: AttnCase):
    """(q, k, v, mask) of a case."""
    g = torch.Generator().manual_seed(c.seed)
    dt = c.torch_dtype
    q = (torch.randn(c.batch, c.heads, c.sq, c.dim, generator=g) * c.temperature).to(dt)
    k = torch.randn(c.batch, c.kv_heads, c.sk, c.dim, generator=g).to(dt)
    v = torch.randn(c.batch, c.kv_heads, c.sk, c.dim, generator=g).to(dt)
    return q, k, v, build_mask(c, g)


def build_mask(c: AttnCase, g: Optional[torch.Generator] = None):
    if c.mask_kind == "none":
        return None
    dt = c.torch_dtype
    if c.mask_kind.startswith("neutral"):
        shape = (c.sq, c.sk) if c.compact_mask else (c.batch, 1, c.sq, c.sk)
        return torch.ones(shape, dtype=torch.bool) if c.mask_kind == "neutral_bool" else torch.zeros(shape, dtype=dt)
    if c.padding != "none" and c.causal_via != "mask" and c.compact_mask:
        keep = hn.padding_keep(c.lengths, c.sk, c.padding == "left")[:, None, None, :]
    elif c.padding == "none" and c.causal_via == "mask" and c.compact_mask:
        keep = oracle.causal_keep(c.sq, c.sk)
    else:
        keep = torch.ones(c.batch, 1, c.sq, c.sk, dtype=torch.bool)
        if c.padding != "none":
            keep = keep & hn.padding_keep(c.lengths, c.sk, c.padding == "left")[:, None, None, :]
        if c.causal_via == "mask":
            keep = keep & oracle.causal_keep(c.sq, c.sk)
    if c.mask_kind == "bool":
        return keep
    if c.mask_kind == "additive":
        return hn.bool_to_additive(keep, dt)
    if c.mask_kind == "finfo":
        return hn.bool_to_additive(keep, dt, torch.finfo(dt).min)
    if c.mask_kind == "bias":   # finite biases (ALiBi-like) plus -inf where the keep mask is False
        shape = (c.batch, 1, c.sq, c.sk)
        bias = torch.randn(shape, generator=g if g is not None else torch.Generator().manual_seed(c.seed))
        return bias.masked_fill(~keep.expand(shape), float("-inf")).to(dt)
    raise ValueError(c.mask_kind)


def model_of(c: AttnCase, n: int = 1):
    kw = {}
    if c.spelling in SDPA:
        kw["is_causal"] = c.causal_via == "is_causal"
    if c.scale is not None:
        kw["scale"] = c.scale
    return hn.AttnNet(c.spelling, n=n, **kw).eval()


def query_rows_defined(c: AttnCase) -> torch.Tensor:
    """``[B, 1, Sq]``: the query rows compared (all: spec.md places every row, padding rows included)."""
    return torch.ones(c.batch, 1, c.sq, dtype=torch.bool)


def mask_places_queries(c: AttnCase) -> bool:
    """The site is not causal, has a mask and fewer queries than keys: spec.md's mask rule places the queries."""
    return c.causal_via != "is_causal" and c.mask_kind != "none" and c.sq < c.sk


def expected(c: AttnCase, q, k, v, mask):
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    out, valid = oracle.expected_attention(q, k, v, site.forms, causal=c.causal, mask=mask, scale=c.scale,
                                           is_causal_flag=c.causal_via == "is_causal")
    return out, valid & query_rows_defined(c), site


def form_name(c: AttnCase) -> str:
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    names = {f["form"] for f in site.forms if f is not None}
    assert len(names) == 1, names
    return names.pop()


def run_case(c: AttnCase, lower: str = "eager"):
    """Compile the case, assert the form was applied, compare with the oracle on the defined rows."""
    q, k, v, mask = tensors(c)
    out, report = hn.compile_and_run(model_of(c), (q, k, v, mask), c.spec, lower=lower)
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    assert site.sparse, "the case must ask for a sparse form under policy force"
    exp, valid, site = expected(c, q, k, v, mask)
    hn.assert_applied(report, "attention", hn.SITE, form_name(c))
    hn.assert_rows_close(out, exp, valid, c.torch_dtype, what=f"{c}")
    return out, exp, valid


# ---------------------------------------------------------------- strategies

def maybe_dense_heads(draw, rules: List[dict], heads: int) -> None:
    """Maybe insert, anywhere in ``rules``, a dense rule for some (not all) heads."""
    if heads > 1 and draw(st.booleans()):
        rules.insert(draw(st.integers(0, len(rules))),
                     {"form": "dense", "heads": draw(st.lists(st.integers(0, heads - 1), min_size=1,
                                                              max_size=heads - 1, unique=True))})


@st.composite
def streaming_rules(draw, heads: int, per_head: bool = True, policy: Optional[str] = None):
    """1-3 streaming rules (per-head sink/window), maybe a dense rule for some heads; >= 1 sparse head left."""
    rules = []
    for _ in range(draw(st.integers(1, 3))):
        r = {"modules": draw(st.sampled_from(["*", "layers.*.attn", "layers.0.attn", "*.attn"])),
             "form": "streaming", "sink": draw(st.integers(0, 6)), "window": draw(st.integers(1, 12))}
        if per_head and draw(st.booleans()):
            r["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))
        rules.append(r)
    if per_head:
        maybe_dense_heads(draw, rules, heads)
    if policy is not None:
        for r in rules:
            r["policy"] = policy
    site = oracle.attention_site_rule({"version": 1, "attention": rules}, hn.SITE, heads)
    if not any(f is not None for f in site.forms):
        rules.append({"form": "streaming", "sink": 1, "window": 2})
    return rules


@st.composite
def block_sparse_rules(draw, heads: int, sk: int, per_head: bool = True):
    """One block_sparse layout on all or some heads (the other heads dense), block <= Sk."""
    blocks = [b for b in (1, 2, 4, 8, 16) if b <= sk]
    form = {"form": "block_sparse", "block": draw(st.sampled_from(blocks)),
            "local_blocks": draw(st.integers(1, 3)), "global_blocks": draw(st.integers(0, 2))}
    rule = dict(form)
    if per_head and heads > 1 and draw(st.booleans()):
        rule["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))
    rules = [rule]
    if per_head and heads > 1 and "heads" not in rule and draw(st.booleans()):
        rules.append({"form": "dense", "heads": draw(st.lists(st.integers(0, heads - 1), min_size=1,
                                                               max_size=heads - 1, unique=True))})
    if "heads" not in rule and draw(st.booleans()):
        # an earlier rule that the block_sparse rule overrides on every head
        rules.insert(0, {"form": "streaming", "sink": 1, "window": 1, "modules": "layers.*"})
    return rules


def rule_block(rules) -> int:
    return next(r["block"] for r in rules if r["form"] == "block_sparse")


@st.composite
def block_topk_rule(draw, block: int):
    r = {"form": "block_topk", "block": block, "sink_blocks": draw(st.integers(0, 2)),
         "local_blocks": draw(st.integers(0, 2)), "pool": draw(st.sampled_from(["mean", "max", "rows"]))}
    if r["pool"] == "rows":
        r["rows"] = draw(st.sampled_from([n for n in (1, 2, 4, 8, 16) if n <= block]))
    budget = draw(st.sampled_from(["topk", "cdf", "min_mass"]))
    if budget == "topk":
        r["topk"] = draw(st.integers(1, 3))
    elif budget == "cdf":
        r["cdf"] = draw(st.sampled_from([0.2, 0.5, 0.8, 0.9, 0.99, 1.0]))
    else:
        r["min_mass"] = draw(st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.5, 1.0]))
    return r


@st.composite
def vertical_slash_rule(draw, block: int, sq: int, sk: int, causal: bool):
    # Budgets below the minimums (30 / 50), between them and the forced 100 diagonals, and above, so that the
    # score-ranked part of the selection is reached on the longer cases (Sk up to 192).
    return {"form": "vertical_slash", "block": block, "last_q": draw(st.integers(1, sq + 4)),
            "vertical": draw(st.integers(0, 3) | st.integers(25, 40) | st.integers(0, sk + 2)),
            "slash": draw(st.integers(0, 3) | st.integers(45, 110) | st.integers(0, sk + 2))}


def dynamic_rules(draw, form_rule: dict, heads: int) -> List[dict]:
    """The dynamic rule covers every head; maybe after another rule it overrides."""
    rules = [form_rule]
    if draw(st.booleans()):
        rules.insert(0, {"form": "streaming", "sink": 2, "window": 3,
                         "heads": draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))})
    return rules


@st.composite
def attention_cases(draw, form: str, *, decode: Optional[bool] = None, causal: Optional[bool] = None,
                    causal_via: Optional[str] = None, masked: Optional[bool] = None,
                    aligned: Optional[bool] = None, spellings=ALL_SPELLINGS, per_head: bool = True,
                    paddings=("none", "left", "right"), min_sk: int = 1, max_sk: int = 40,
                    sparse_layouts: bool = False):
    """An attention case for ``form``; keyword arguments pin parts of it (None: drawn).

    decode: Sq < Sk (True) or Sq == Sk (False). causal_via: "is_causal" or "mask".
    masked: the model passes a mask. aligned: for block_sparse decode, whether
    (Sk - Sq) is a multiple of the block (or Sq == 1). paddings: the padding
    kinds to draw from when the mask is a padding mask. sparse_layouts: only key
    lengths at which the dynamic forms can leave keys out (vertical_slash keeps the
    100 nearest diagonals, so Sk > 128; block_topk at least 4 key blocks), for tests
    that compare two sparse runs and would pass vacuously on dense layouts.
    """
    dynamic = form in oracle.DYNAMIC_FORMS
    causal = draw(st.booleans()) if causal is None else causal
    decode = draw(st.booleans()) if decode is None else decode
    if dynamic and sparse_layouts:
        dyn_block = draw(st.sampled_from([16, 32]))
        lo = 129 if form == "vertical_slash" else 3 * dyn_block + 1
        sk = draw(st.integers(lo, max(lo, 192 if form == "vertical_slash" else 6 * dyn_block)))
    elif dynamic:
        # 1-6 key blocks, the last one often ragged
        dyn_block = draw(st.sampled_from([16, 32]))
        n_blocks = draw(st.sampled_from([4, 5, 3, 6, 2, 1] if dyn_block == 16 else [3, 4, 2, 1]))
        lo = max(dyn_block + int(decode), (n_blocks - 1) * dyn_block + 1)
        sk = draw(st.integers(lo, max(lo, n_blocks * dyn_block)))
    else:
        sk = draw(st.integers(max(min_sk, 2 if decode else 1), max_sk))
    sq = draw(st.integers(1, sk - 1)) if decode else sk
    if causal:
        if causal_via is None:
            causal_via = "mask" if decode else draw(st.sampled_from(["is_causal", "mask"]))
        assert causal_via == "mask" or not decode
    else:
        causal_via = ""
    if causal_via == "is_causal":
        masked = False
        spellings = [s for s in spellings if s in SDPA]
    elif causal_via == "mask":
        masked = True
    elif masked is None:
        masked = draw(st.booleans())
    if masked:
        kind = draw(st.sampled_from(["bool", "additive", "finfo", "bias", "neutral_bool", "neutral_additive"]))
        if causal_via == "mask" and kind.startswith("neutral"):
            kind = kind[len("neutral_"):]
        ok = BOOL_SPELLINGS if kind in ("bool", "neutral_bool") else ADDITIVE_SPELLINGS
        spellings = [s for s in spellings if s in ok]
    else:
        kind = "none"
    spelling = draw(st.sampled_from(sorted(spellings)))
    folded = spelling == "bmm_folded"
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))       # GQA, MQA (kv_heads 1) and MHA
    batch = draw(st.integers(1, 3))
    padding = "none"
    lengths: Tuple[int, ...] = ()
    if masked and not kind.startswith("neutral"):
        padding = draw(st.sampled_from(paddings))
    if padding != "none":
        lengths = tuple(draw(st.integers(1, sk)) for _ in range(batch))   # ragged
    dtype = draw(st.sampled_from(["float32", "bfloat16"]))
    scale = None
    if spelling in hn.SCALED and draw(st.booleans()):
        scale = draw(st.sampled_from([0.1, 0.25, 0.5]))
    c = AttnCase(spelling=spelling, batch=batch, heads=heads, kv_heads=kv_heads, sq=sq, sk=sk,
                 dim=draw(st.sampled_from([4, 8, 16])), causal=causal, causal_via=causal_via, mask_kind=kind,
                 padding=padding, lengths=lengths, compact_mask=draw(st.booleans()), dtype=dtype, scale=scale,
                 temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])), seed=draw(st.integers(0, 2 ** 16)))
    per_head = per_head and not folded
    if form == "streaming":
        c.rules = draw(streaming_rules(heads, per_head=per_head))
    elif form == "block_sparse":
        rules = draw(block_sparse_rules(heads, sk, per_head=per_head))
        if decode and aligned is not None:
            block = rule_block(rules)
            cand = [s for s in range(1, sk) if ((sk - s) % block == 0 or s == 1) == aligned]
            assume(cand)
            c.sq = draw(st.sampled_from(cand))
        c.rules = rules
    elif form == "block_topk":
        rule = draw(block_topk_rule(dyn_block))
        c.rules = dynamic_rules(draw, rule, heads) if per_head else [rule]
    elif form == "vertical_slash":
        rule = draw(vertical_slash_rule(dyn_block, c.sq, sk, causal))
        c.rules = dynamic_rules(draw, rule, heads) if per_head else [rule]
    else:
        raise ValueError(form)
    return c


def case(**kw) -> AttnCase:
    """A hand-written case: one batch element, one head, float32, SDPA, no mask unless given."""
    base = dict(spelling="sdpa_gqa", batch=1, heads=1, kv_heads=1, sq=8, sk=8, dim=4, causal=False, causal_via="",
                mask_kind="none", padding="none", lengths=(), compact_mask=False, dtype="float32", scale=None,
                temperature=1.0, seed=0, rules=[], defaults_policy="force")
    base.update(kw)
    return AttnCase(**base)
