"""Measured rows as bench/costmodel.py reads them: sites and forms as JSON, and the older measurement files.

A row is ``{label, site, dense_ms, sparse_ms, timing}``; ``site`` names the form (:func:`form_spec`) and the sizes,
so the cost formulas recompute its work whenever they change. :func:`load_rows` reads the script's own ``--json``
rows, the older ``bench/costmodel_*.json`` grids, ``bench/crossover_*.json`` (bench/ffn.py) and the attention table
of ``bench/RESULTS.md`` into that shape.
"""

from __future__ import annotations

import json
import re
from typing import List, Optional

import torch

from sparsecc.forms import BlockSparse, BlockTopK, BlockWeights, Streaming, TwoFour

from attention import random_form  # bench/ is on the path (bench/costmodel.py puts it there)

DTYPE = torch.bfloat16
ATTN = dict(batch=1, heads=32, kv_heads=8, head_dim=128)
LLAMA_D, LLAMA_F = 4096, 14336           # Llama-3-8B FFN
LINEAR_SHAPES = ((LLAMA_D, LLAMA_F), (LLAMA_F, LLAMA_D))


# ------------------------------------------------------------------ sites and forms as JSON

def form_spec(form) -> Optional[dict]:
    """A JSON description of a form (None stays None)."""
    if form is None:
        return None
    if isinstance(form, Streaming):
        return dict(name="streaming", sink=form.sink, window=form.window)
    if isinstance(form, BlockSparse):
        return dict(name="block_sparse", block=form.block, local_blocks=form.local_blocks,
                    global_blocks=form.global_blocks, random_blocks=form.random_blocks, seed=form.seed)
    if isinstance(form, BlockTopK):
        return dict(name="block_topk", block=form.block, topk=form.topk)
    if isinstance(form, BlockWeights):
        return dict(name="block_weights", block=list(form.block), density=form.density)
    if isinstance(form, TwoFour):
        return dict(name="2:4")
    raise TypeError(f"bench/costmodel.py has no JSON form for {form!r}")


def make_form(spec: Optional[dict]):
    """Inverse of ``form_spec``."""
    if spec is None:
        return None
    kw = {k: v for k, v in spec.items() if k != "name"}
    makers = {"streaming": Streaming, "block_sparse": BlockSparse, "block_topk": BlockTopK, "2:4": TwoFour,
              "block_weights": lambda block, density: BlockWeights(tuple(block), density)}
    if spec["name"] not in makers:
        raise ValueError(f"unknown form {spec['name']!r} in a cost-model row; known: {sorted(makers)}")
    return makers[spec["name"]](**kw)


# ------------------------------------------------------------------ older measurements in this format

_FORM_RE = re.compile(r"(\w+)\((.*)\)")


def _parse_form_str(text: str):
    name, args = _FORM_RE.fullmatch(text).groups()
    kw = {k.strip(): int(v) for k, v in (a.split("=") for a in args.split(","))}
    if name == "streaming":
        return Streaming(**kw)
    return BlockSparse(kw["block"], kw["local"], kw["global"], kw["random"], kw["seed"])


def rows_from_costmodel_json(data: dict) -> List[dict]:
    """Rows of an older ``bench/costmodel.py --out`` file (sites given by their labels) in today's format."""
    out = []
    for r in data["rows"]:
        if "site" in r:
            out.append(r)
            continue
        label = r["label"]
        if r["kind"] == "attention":
            site = dict(kind="attention", form=form_spec(_parse_form_str(r["form"])), seq=r["size"], **ATTN)
        elif label.startswith("bsr"):
            d, m, k, n = re.fullmatch(r"bsr d=([\d.]+) M=(\d+) (\d+)->(\d+)", label).groups()
            site = dict(kind="linear", form=form_spec(BlockWeights((64, 64), float(d))), tokens=int(m),
                        **{"in": int(k), "out": int(n)})
        else:
            s, m = re.fullmatch(r"teal s=([\d.]+) M=(\d+)", label).groups()
            site = dict(kind="linear", form=None, activation_sparsity=float(s), tokens=int(m),
                        **{"in": LLAMA_D, "out": LLAMA_F})
        out.append(dict(label=label, site=site, dense_ms=r["dense_ms"], sparse_ms=r["sparse_ms"],
                        timing="do_bench"))
    return out


def rows_from_crossover_json(data: dict) -> List[dict]:
    """Rows of ``bench/crossover_<device>.json`` (``bench/ffn.py``) in today's format."""
    out = []
    for r in data["rows"]:
        a, b = (int(x) for x in r["shape"].split("x"))
        m, density = r["tokens"], r["density"]
        if r["form"] == "gate_ffn":
            site = dict(kind="ffn", mode="gate", d_model=a, d_ff=b, gated=True, tokens=m,
                        sparsity=round(1 - density, 6))
        elif r["form"] == "activation_threshold":
            site = dict(kind="linear", form=None, activation_sparsity=round(1 - density, 6), tokens=m,
                        **{"in": a, "out": b})
        elif r["form"] == "semi_structured":
            site = dict(kind="linear", form=form_spec(TwoFour()), tokens=m, **{"in": a, "out": b})
        elif r["form"] == "block_weights":
            site = dict(kind="linear", form=form_spec(BlockWeights((64, 64), round(density, 6))), tokens=m,
                        **{"in": a, "out": b})
        else:
            raise ValueError(f"unknown form {r['form']!r} in a crossover row")
        out.append(dict(label=f"{r['form']} d={density:.2f} M={m} {r['shape']}", site=site, dense_ms=r["dense_ms"],
                        sparse_ms=r["sparse_ms"], timing=r.get("timing", "do_bench")))
    return out


_ATTN_ROW = re.compile(r"\| (stream|random|block_topk) (\d+)K( hkv(\d+))?( d(\d+))? \| ([\d.]+) \| ([\d.]+) \|")
_ESTIMATE_LINE = re.compile(r"- block_topk (\d+)K hkv(\d+): estimate \+ table build ([\d.]+) ms")
# bench/attention.py's forms: sink 128 + window 4096; random 128-blocks with the diagonal; top-12 of 128-blocks.
_RESULTS_FORMS = {"stream": lambda s: Streaming(128, 4096),
                  "random": random_form,
                  "block_topk": lambda s: BlockTopK(block=128, topk=12)}


def rows_from_results_md(text: str) -> List[dict]:
    """The prefill rows of the attention table in ``bench/RESULTS.md`` and block_topk's estimate times.

    vertical_slash rows are left out: on the bench's random q/k its selection
    keeps every block (RESULTS.md notes), unlike the clustered patterns the
    cost model assumes. Dense-spec and decode rows are not form-vs-dense points.
    """
    out = []
    for kind, k_tokens, _, hkv, _, d, ours, sdpa in _ATTN_ROW.findall(text):
        s = int(k_tokens) * 1024
        hkv = int(hkv) if hkv else (8 if kind == "block_topk" else 32)
        site = dict(kind="attention", form=form_spec(_RESULTS_FORMS[kind](s)), batch=1, heads=32, kv_heads=hkv,
                    seq=s, head_dim=int(d) if d else 128)
        out.append(dict(label=f"{kind} {k_tokens}K hkv{hkv}", site=site, dense_ms=float(sdpa), sparse_ms=float(ours),
                        timing="do_bench"))
    for k_tokens, hkv, ms in _ESTIMATE_LINE.findall(text):
        site = dict(kind="estimate", form=form_spec(BlockTopK(block=128, topk=12)), batch=1, heads=32,
                    kv_heads=int(hkv), seq=int(k_tokens) * 1024, head_dim=128)
        out.append(dict(label=f"block_topk estimate {k_tokens}K", site=site, dense_ms=None, sparse_ms=float(ms)))
    return out


def load_rows(path: str) -> List[dict]:
    """Measured rows from any supported file (by its content)."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".md"):
        return rows_from_results_md(text)
    data = json.loads(text)
    if "crossover" in data:
        return rows_from_crossover_json(data)
    return rows_from_costmodel_json(data)
