"""Differential fuzzing of the Triton attention kernels on CUDA against the float64 oracle (tests/oracle/oracle.py).

The CPU differential tests (test_differential.py) run the reference kernels at tiny shapes; here the same kind
of case runs on CUDA tensors with ``kernels="triton"``, at shapes that cross several query and key tiles (Sk
up to a few hundred, ragged last tiles, head dims that need padding), in bfloat16, float16 and float32.

Two entry points:

* the model path: an attention spelling from harness.py compiled with ``backend="sparsecc"``,
  ``kernels="triton"`` and ``policy = "force"`` (rewritten graphs run without Inductor, as in the CPU oracle
  tests; tests/test_gpu_pipeline.py covers Inductor). The report must show the form applied with the Triton
  kernel before any number is compared.
* the op path: ``torch.ops.sparsecc.*`` called with ``impl="triton"`` for causal sites with Sq < Sk (chunked
  prefill), which the compiler never produces from a model (spec.md: a mask places such queries; block layouts
  then stay dense), but which the kernels implement and the oracle defines (bottom-right causality).

float16/bfloat16 run the Triton attention kernels; float32 runs the documented reference math on CUDA (the
dynamic forms' table kernels run for every dtype). Where a Triton launch is certain (the layout is not
equivalent to dense, and the dispatch rules in docs/spec.md's kernel notes send it to a kernel), the test also
asserts that one happened, so a silent fallback to the reference cannot pass as a kernel check.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.backend import reset_reports
from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import AttnCase

pytestmark = pytest.mark.gpu

HALF = ("bfloat16", "float16")
DTYPES = ("bfloat16", "float16", "float32")
# Head dims: the smallest kernel tile, one that is padded to the next power of two, and two model sizes.
DIMS = (16, 40, 64, 128)
# Key lengths: several 64-wide key tiles and a ragged last one; short sequences are drawn too.
MAX_SK = 320
DYNAMIC_BLOCKS = (16, 32, 64)
STATIC_BLOCKS = (16, 32, 64)   # the block-table kernel takes powers of two >= 16 (others run the reference)


# ---------------------------------------------------------------- strategies

@st.composite
def _streaming_rules(draw, heads: int, sk: int, per_head: bool):
    """1-2 streaming rules with sinks and windows up to the sequence length, maybe a dense rule for some heads."""
    rules = []
    for _ in range(draw(st.integers(1, 2))):
        r = {"form": "streaming", "sink": draw(st.sampled_from([0, 1, 4]) | st.integers(0, sk)),
             "window": draw(st.integers(1, 48) | st.integers(1, sk + 8))}
        if per_head and heads > 1 and draw(st.booleans()):
            r["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))
        rules.append(r)
    if per_head:
        cases.maybe_dense_heads(draw, rules, heads)
    if not any(f is not None for f in oracle.attention_site_rule({"version": 1, "attention": rules}, hn.SITE,
                                                                  heads).forms):
        rules.append({"form": "streaming", "sink": 4, "window": 32})
    return rules


@st.composite
def _block_sparse_rules(draw, heads: int, sk: int, per_head: bool):
    """One block_sparse layout (block 16-64, at most Sk) on all or some heads, the other heads dense."""
    rule = {"form": "block_sparse", "block": draw(st.sampled_from([b for b in STATIC_BLOCKS if b <= sk])),
            "local_blocks": draw(st.integers(1, 3)), "global_blocks": draw(st.integers(0, 2))}
    if per_head and heads > 1 and draw(st.booleans()):
        rule["heads"] = draw(st.lists(st.integers(0, heads - 1), min_size=1, max_size=heads, unique=True))
    rules = [rule]
    if per_head and heads > 1 and "heads" not in rule and draw(st.booleans()):
        rules.append({"form": "dense", "heads": draw(st.lists(st.integers(0, heads - 1), min_size=1,
                                                               max_size=heads - 1, unique=True))})
    return rules


@st.composite
def gpu_cases(draw, form: str, *, decode: Optional[bool] = None, causal: Optional[bool] = None,
              masked: Optional[bool] = None, spellings=cases.ALL_SPELLINGS, op_level: bool = False):
    """An attention case at kernel-tile sizes (see cases.attention_cases for the fields).

    Sites where the mask places the queries (not causal, a mask, Sq < Sk) follow spec.md's position rule for
    every form. ``op_level``: the case is called through the op (see run_causal_op_case), where that rule does not arise.
    """
    dynamic = form in oracle.DYNAMIC_FORMS
    causal = draw(st.booleans()) if causal is None else causal
    decode = draw(st.booleans()) if decode is None else decode
    block = 0
    if dynamic:
        block = draw(st.sampled_from(DYNAMIC_BLOCKS))
        n_blocks = draw(st.integers(1, 6))
        lo = max(block + int(decode), (n_blocks - 1) * block + 1)
        sk = draw(st.integers(lo, max(lo, n_blocks * block)))
    else:
        low = 16 if form == "block_sparse" else 2
        sk = draw(st.integers(65, MAX_SK) | st.integers(low, 64))
    # Up to 16 query rows go to the split-KV decode kernel; longer chunks to the prefill kernel.
    sq = draw(st.integers(1, min(16, sk - 1)) | st.integers(1, sk - 1)) if decode else sk
    if causal:
        causal_via = "mask" if decode else draw(st.sampled_from(["is_causal", "mask"]))
    else:
        causal_via = ""
    if causal_via == "is_causal":
        masked = False
        spellings = [s for s in spellings if s in cases.SDPA]
    elif causal_via == "mask":
        masked = True
    elif masked is None:
        masked = draw(st.booleans())
    kind = "none"
    if masked:
        kind = draw(st.sampled_from(["bool", "additive", "finfo", "bias"]))
        ok = cases.BOOL_SPELLINGS if kind == "bool" else cases.ADDITIVE_SPELLINGS
        spellings = [s for s in spellings if s in ok]
    spelling = draw(st.sampled_from(sorted(spellings)))
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))      # MHA, GQA, MQA
    batch = draw(st.integers(1, 2))
    padding, lengths = "none", ()
    if masked:
        padding = draw(st.sampled_from(["none", "left", "right"]))
    if padding != "none":
        lengths = tuple(draw(st.integers(1, sk)) for _ in range(batch))
    scale = None
    if spelling in hn.SCALED and draw(st.booleans()):
        scale = draw(st.sampled_from([0.05, 0.125, 0.25]))
    c = AttnCase(spelling=spelling, batch=batch, heads=heads, kv_heads=kv_heads, sq=sq, sk=sk,
                 dim=draw(st.sampled_from(DIMS)), causal=causal, causal_via=causal_via, mask_kind=kind,
                 padding=padding, lengths=lengths, compact_mask=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)),
                 scale=scale, temperature=draw(st.sampled_from([0.5, 1.0, 2.0])), seed=draw(st.integers(0, 2 ** 16)))
    per_head = spelling != "bmm_folded"
    if form == "streaming":
        c.rules = draw(_streaming_rules(heads, sk, per_head))
    elif form == "block_sparse":
        c.rules = draw(_block_sparse_rules(heads, sk, per_head))
    elif form == "block_topk":
        rule = draw(cases.block_topk_rule(block))
        c.rules = cases.dynamic_rules(draw, rule, heads) if per_head else [rule]
    elif form == "vertical_slash":
        rule = draw(cases.vertical_slash_rule(block, sq, sk, causal))
        c.rules = cases.dynamic_rules(draw, rule, heads) if per_head else [rule]
    else:
        raise ValueError(form)
    return c


# ---------------------------------------------------------------- running a case

@contextlib.contextmanager
def triton_launches():
    """Count calls of the Python functions that launch the attention kernels (prefill, decode, dynamic tables, the
    Gluon programs for sm_90)."""
    from sparsecc.codegen import (block_attention, decode_attention, dynamic_attention_kernels, hopper_prefill,
                                  vertical_slash_kernels)

    calls = []
    targets = [(block_attention, "launch_prefill"), (decode_attention, "streaming_decode"),
               (hopper_prefill, "streaming_prefill_sm90_kernel"), (block_attention, "hopper_table_prefill"),
               (dynamic_attention_kernels, "block_topk_table"),
               (vertical_slash_kernels, "vertical_slash_attention_kernel")]
    with contextlib.ExitStack() as stack:
        for module, name in targets:
            real = getattr(module, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                calls.append(_name)
                return _real(*args, **kwargs)
            stack.enter_context(mock.patch.object(module, name, counted))
        yield calls


def layout_is_dense(c: AttnCase, q, k, forms) -> bool:
    """Whether the oracle's layout keeps every (causally) allowed key: then a kernel may hand over to SDPA."""
    if any(f is not None and f["form"] in oracle.DYNAMIC_FORMS for f in forms):
        return False
    keep, _ = oracle.head_keep(q, k, forms, scale=1.0, causal=c.causal)
    allowed = oracle.causal_keep(c.sq, c.sk) if c.causal else torch.ones(c.sq, c.sk, dtype=torch.bool)
    return bool((keep == allowed).all())


def launch_expected(c: AttnCase, q, k, forms, mask_placed: bool) -> bool:
    """A Triton launch is certain: dynamic tables always; attention for fp16/bf16 on a layout that is not dense.

    Streaming sites whose queries the mask places run the decode kernel for one query row whose heads share one
    rule (anything else runs the reference, as codegen/decode_attention.py documents).
    """
    if any(f is not None and f["form"] == "vertical_slash" for f in forms):
        # its attention kernel takes fp16/bf16 causal calls; fp32 runs the reference, non-causal calls dense
        return c.dtype in HALF and c.causal
    if any(f is not None and f["form"] in oracle.DYNAMIC_FORMS for f in forms):
        return True
    if c.dtype not in HALF or layout_is_dense(c, q, k, forms):
        return False
    if mask_placed:
        # streaming: the decode kernel; block_sparse: the kernel only when the mask moves no row (else the
        # reference runs the call, codegen/ops.py)
        streaming = all(f is None or f["form"] == "streaming" for f in forms)
        return streaming and c.sq == 1 and all(f is not None and f == forms[0] for f in forms)
    return True


def run_model_case(c: AttnCase):
    """Compile the case's model on CUDA with the Triton kernels; report, launches, then the oracle's numbers."""
    q, k, v, mask = cases.tensors(c)
    site = oracle.attention_site_rule(c.spec, hn.SITE, c.heads)
    assert site.sparse, "the case must ask for a sparse form under policy force"
    mask_placed = cases.mask_places_queries(c)
    expected, valid, _ = cases.expected(c, q, k, v, mask)
    args = tuple(None if t is None else t.cuda() for t in (q, k, v, mask))
    torch._dynamo.reset()
    reset_reports()
    with hn.lowering("eager"), torch.no_grad(), triton_launches() as launches:
        compiled = torch.compile(cases.model_of(c), backend="sparsecc",
                                 options={"spec": c.spec, "kernels": "triton"})
        out = compiled(*args)
        torch.cuda.synchronize()
    report = sparsecc.last_report()
    hn.assert_applied(report, "attention", hn.SITE, cases.form_name(c))
    for s in hn.sites(report, "attention"):
        assert "triton kernel" in s.reason, s.reason
    if launch_expected(c, q, k, site.forms, mask_placed):
        assert launches, f"no Triton kernel ran for {c}"
    assert out.device.type == "cuda" and out.dtype == c.torch_dtype
    hn.assert_rows_close(out.cpu(), expected, valid, c.torch_dtype, what=f"{c}")


def _op_call(c: AttnCase, forms, scale: float, q, k, v, mask):
    """The ``torch.ops.sparsecc`` call a causal site with the case's per-head forms lowers to (impl "triton")."""
    from sparsecc.codegen import ops
    from sparsecc.codegen.block_attention import FULL_WINDOW

    name = next(f["form"] for f in forms if f is not None)
    if name == "streaming":
        sink = [0 if f is None else f["sink"] for f in forms]
        window = [FULL_WINDOW if f is None else f["window"] for f in forms]
        return ops.op("streaming_attention")(q, k, v, mask, scale, True, sink, window, 0, "triton")
    f = next(f for f in forms if f is not None)
    if name == "block_sparse":
        dense = [h for h, g in enumerate(forms) if g is None]
        return ops.op("block_sparse_attention")(q, k, v, mask, scale, True, f["block"], f["local_blocks"],
                                                f["global_blocks"], 0, 0, dense, 0, "triton")
    assert all(g == f for g in forms), "a dynamic rule covers every head"
    return ops.op("dynamic_block_attention")(
        q, k, v, mask, scale, True, name, f["block"], f.get("topk", 0), float(f.get("cdf", 0.0)),
        float(f.get("min_mass", 0.0)),
        f.get("sink_blocks", 1), f.get("local_blocks", 1), f.get("pool", "mean"), f.get("rows", 0),
        f.get("last_q", 0), f.get("vertical", 0), f.get("slash", 0), 0, "triton")


def run_causal_op_case(c: AttnCase):
    """Bottom-right causal attention with Sq <= Sk through the op with the Triton kernels, against the oracle."""
    assert c.causal
    q, k, v, mask = cases.tensors(c)
    forms = oracle.attention_site_rule(c.spec, hn.SITE, c.heads).forms
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.dim)
    expected, valid = oracle.expected_attention(q, k, v, forms, causal=True, mask=mask, scale=scale,
                                                is_causal_flag=True)
    args = tuple(None if t is None else t.cuda() for t in (q, k, v, mask))
    with torch.no_grad(), triton_launches() as launches:
        out = _op_call(c, forms, scale, *args)
        torch.cuda.synchronize()
    if launch_expected(c, q, k, forms, mask_placed=False):
        assert launches, f"no Triton kernel ran for {c}"
    hn.assert_rows_close(out.cpu(), expected, valid, c.torch_dtype, what=f"{c}")


def _causal_flag(c: AttnCase) -> AttnCase:
    """Causality as the op's flag (like SDPA's is_causal): the case's mask, if any, holds padding or biases only."""
    return c.replace(causal=True, causal_via="is_causal")


# ---------------------------------------------------------------- tests: the model path

@hn.examples(8)
@given(c=gpu_cases("streaming", decode=False))
def test_gpu_streaming_prefill(c):
    """Sq == Sk: is_causal, a causal mask tensor or bidirectional; every mask kind, padding, per-head rules."""
    run_model_case(c)


@hn.examples(6)
@given(c=gpu_cases("streaming", decode=True))
def test_gpu_streaming_decode(c):
    """Sq < Sk: the decode kernel (Sq <= 16) and offset prefill tiles; with a mask, positions come from it."""
    run_model_case(c)


@hn.examples(8)
@given(c=gpu_cases("block_sparse"))
def test_gpu_block_sparse(c):
    """Block tables 16-64 wide on full and ragged tiles, dense heads, Sq == Sk and bidirectional Sq < Sk."""
    run_model_case(c)


@hn.examples(6)
@given(c=gpu_cases("block_topk"))
def test_gpu_block_topk(c):
    """The Triton estimate and table (topk and cdf; mean, max and sampled-row estimates), then the block-table
    kernel."""
    run_model_case(c)


@hn.examples(6)
@given(c=gpu_cases("vertical_slash", causal=True))
def test_gpu_vertical_slash(c):
    """The vertical/slash selection, the Triton index build and the range + column attention kernel (the form
    is causal only: docs/spec.md keeps bidirectional sites dense, which test_differential.py checks)."""
    run_model_case(c)


# ---------------------------------------------------------------- tests: causal chunked prefill at the op

@hn.examples(8)
@given(c=st.sampled_from(["streaming", "block_sparse", "block_topk", "vertical_slash"]).flatmap(
    lambda form: gpu_cases(form, decode=True, causal=False, op_level=True)).map(_causal_flag))
def test_gpu_causal_chunked_prefill_ops(c):
    """Causal Sq < Sk (queries at p = i + Sk - Sq) for every form, with and without masks, through the ops."""
    run_causal_op_case(c)
