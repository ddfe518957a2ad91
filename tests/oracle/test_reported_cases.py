"""The silent wrong answers first reported against sparsecc, each as the smallest case that showed it.

Every expected value comes from ``oracle.py`` (docs/spec.md alone) or from the
model's own dense computation; every sparse case first asserts that the form
was applied. These cases are a held-out check: the fuzzers elsewhere in this
directory draw from the same space, these pin the exact reproductions.
"""

from __future__ import annotations

import math
import os
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc import SpecError
from tests.oracle import cases
from tests.oracle import harness as hn
from tests.oracle import oracle
from tests.oracle.cases import case, run_case


# ---------------------------------------------------------------- 1. stale weights


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(32, 16)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("write", ["mul_", "copy_"])
def test_weights_written_through_data_are_not_served_stale(write):
    torch.manual_seed(0)
    model = _Linear().eval()
    x = torch.randn(4, 32)
    spec = {"version": 1, "linear": [{"form": "2:4", "policy": "force"}]}
    with hn.lowering("eager"), torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels="reference", check_weights=True)
        compiled(x)
        hn.assert_applied(sparsecc.last_report(), "linear", "lin", "2:4")
        if write == "mul_":
            model.lin.weight.data.mul_(2)
        else:
            model.lin.weight.data.copy_(torch.randn(16, 32))
        out = compiled(x)
    pruned, _ = oracle.prune_2_4(model.lin.weight.detach())
    expected = oracle.expected_linear(x, pruned, model.lin.bias.detach())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_refresh_after_writes_through_data():
    torch.manual_seed(1)
    model = _Linear().eval()
    x = torch.randn(4, 32)
    spec = {"version": 1, "linear": [{"form": "2:4", "policy": "force"}]}
    with hn.lowering("eager"), torch.no_grad():
        compiled = sparsecc.compile(model, spec=spec, kernels="reference")
        compiled(x)
        model.lin.weight.data.mul_(-3)
        sparsecc.refresh(model)
        out = compiled(x)
    pruned, _ = oracle.prune_2_4(model.lin.weight.detach())
    torch.testing.assert_close(out.double(), oracle.expected_linear(x, pruned, model.lin.bias.detach()),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 2. per-head policies


def test_the_last_covering_sparse_rule_decides_the_policy():
    """Rule A (streaming, heads [3], force) then rule B (streaming, heads [0], off): B is the last covering
    sparse rule, so the site is not rewritten and head 0 is dense."""
    c = case(heads=4, kv_heads=4, sq=12, sk=12, rules=[
        {"form": "streaming", "sink": 1, "window": 2, "heads": [3], "policy": "force"},
        {"form": "streaming", "sink": 1, "window": 2, "heads": [0], "policy": "off"}])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="off")
    exp, valid = oracle.expected_attention(q, k, v, [None] * 4, causal=False)
    hn.assert_rows_close(out, exp, valid, c.torch_dtype)


# ---------------------------------------------------------------- 3-6. attention forms


def test_vertical_slash_bidirectional_ragged_last_block():
    """vertical_slash is causal only (docs/spec.md): the bidirectional site stays dense, equal to eager."""
    c = case(sq=20, sk=20, dim=8, rules=[{"form": "vertical_slash", "last_q": 4, "vertical": 1, "slash": 1,
                                          "block": 16}])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="causal")
    with torch.no_grad():
        torch.testing.assert_close(out, cases.model_of(c)(q, k, v, mask), atol=0, rtol=0)


@pytest.mark.parametrize("sq,sk", [(3, 13), (5, 14), (2, 7)])
def test_block_sparse_rows_are_in_the_block_of_their_position(sq, sk):
    """(Sk - Sq) % block != 0: chunked prefill and multi-token decode."""
    run_case(case(sq=sq, sk=sk, dim=8, rules=[{"form": "block_sparse", "block": 4, "local_blocks": 1}]))
    run_case(case(sq=sq, sk=sk, dim=8, causal=True, causal_via="mask", mask_kind="bool",
                  rules=[{"form": "block_sparse", "block": 4, "local_blocks": 1, "global_blocks": 1}]))


@pytest.mark.parametrize("form", [{"form": "streaming", "sink": 1, "window": 3},
                                  {"form": "block_sparse", "block": 4, "local_blocks": 1},
                                  {"form": "block_topk", "block": 16, "topk": 1},
                                  {"form": "vertical_slash", "last_q": 2, "vertical": 1, "slash": 1, "block": 16}],
                         ids=lambda f: f["form"])
def test_an_all_zero_additive_mask_changes_nothing_with_fewer_queries(form):
    c = case(sq=3, sk=40, dim=8, heads=2, kv_heads=1, rules=[form])
    q, k, v, _ = cases.tensors(c)
    plain, report = hn.compile_and_run(cases.model_of(c), (q, k, v, None), c.spec)
    if form["form"] == "vertical_slash":   # causal only: without a mask the bidirectional site stays dense
        hn.assert_dense(report, "attention", hn.SITE, because="causal")
    else:
        hn.assert_applied(report, "attention", hn.SITE, form["form"])
    zero = torch.zeros(1, 1, 3, 40)
    masked, report = hn.compile_and_run(cases.model_of(c), (q, k, v, zero), c.spec)
    hn.assert_applied(report, "attention", hn.SITE, form["form"])
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)
    run_case(c.replace(mask_kind="neutral_additive"))


@pytest.mark.parametrize("form", [{"form": "streaming", "sink": 1, "window": 3},
                                  {"form": "block_sparse", "block": 4, "local_blocks": 1, "global_blocks": 1},
                                  {"form": "block_topk", "block": 16, "topk": 1}],
                         ids=lambda f: f["form"])
def test_right_padded_decode_uses_each_rows_position(form):
    """Bidirectional decode (a mask, no is_causal) over a right-padded batch: each row sits at the last key its
    mask keeps (docs/spec.md), not at the end of the buffer."""
    run_case(case(batch=3, sq=1, sk=37, dim=8, mask_kind="bool", padding="right", lengths=(37, 20, 9),
                  rules=[form]))
    run_case(case(batch=2, sq=2, sk=33, dim=8, mask_kind="additive", padding="right", lengths=(33, 17),
                  rules=[form]))


def test_cross_attention_with_more_queries_than_keys_stays_dense():
    c = case(sq=12, sk=5, mask_kind="additive", rules=[{"form": "streaming", "sink": 1, "window": 2}])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_dense(report, "attention", hn.SITE, because="more queries than keys")
    exp, valid = oracle.expected_attention(q, k, v, [None], causal=False, mask=mask)
    hn.assert_rows_close(out, exp, valid, c.torch_dtype)


@pytest.mark.parametrize("form", [{"form": "block_topk", "block": 16, "topk": 1, "sink_blocks": 0, "local_blocks": 1},
                                  {"form": "vertical_slash", "last_q": 4, "vertical": 2, "slash": 2, "block": 16}],
                         ids=lambda f: f["form"])
def test_causal_mask_tensor_with_padding_does_not_leak_batch_mates(form):
    """HF passes its causal mask as a tensor whenever a batch is padded: future blocks must not compete, and a
    sequence's output must not change with its batch-mate's padding."""
    c = case(batch=2, sq=48, sk=48, dim=8, causal=True, causal_via="mask", mask_kind="additive", padding="left",
             lengths=(48, 30), rules=[form])
    out, _, _ = run_case(c)
    alone = c.replace(batch=1, lengths=(48,))
    q, k, v, mask = cases.tensors(c)
    solo, report = hn.compile_and_run(cases.model_of(alone), (q[:1], k[:1], v[:1], mask[:1]), c.spec)
    hn.assert_applied(report, "attention", hn.SITE, form["form"])
    torch.testing.assert_close(out[:1], solo, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the other reports


def test_block_sparse_seed_at_the_top_of_int64():
    c = case(sq=16, sk=16, rules=[{"form": "block_sparse", "block": 4, "random_blocks": 1, "seed": 2 ** 63 - 1}])
    q, k, v, mask = cases.tensors(c)
    out, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    hn.assert_applied(report, "attention", hn.SITE, "block_sparse")
    again, _ = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    assert torch.equal(out, again)


def test_load_spec_on_a_fifo_raises_instead_of_blocking(tmp_path):
    fifo = tmp_path / "spec.toml"
    os.mkfifo(fifo)
    result = {}

    def load():
        try:
            sparsecc.load_spec(str(fifo))
        except SpecError as e:
            result["error"] = e
        except BaseException as e:   # anything else is a failure of the test below
            result["other"] = e

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():   # unblock the reader so the thread can end, then fail
        with open(fifo, "w") as f:
            f.write("")
        pytest.fail("load_spec blocked on a FIFO")
    assert "error" in result, result
    assert str(fifo) in str(result["error"])


def test_margin_beyond_int64_is_a_spec_error():
    with pytest.raises(SpecError, match="margin"):
        sparsecc.compile(_Linear(), spec={"version": 1, "defaults": {"margin": 2 ** 63}})


def test_a_rule_whose_heads_all_exceed_the_head_count_says_so():
    c = case(heads=2, kv_heads=2, rules=[{"form": "streaming", "sink": 1, "window": 2, "heads": [5, 7]}])
    q, k, v, mask = cases.tensors(c)
    _, report = hn.compile_and_run(cases.model_of(c), (q, k, v, mask), c.spec)
    (site,) = hn.sites(report, "attention")
    assert not site.applied and "do not exist" in site.reason and "dense form" not in site.reason, site.reason


class _SoftCapped(nn.Module):
    def forward(self, q, k, v):
        a = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        a = 30.0 * torch.tanh(a / 30.0)
        return F.softmax(a, dim=-1) @ v


def test_refused_attention_sites_are_in_the_report():
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    spec = {"version": 1, "attention": [{"form": "streaming", "sink": 1, "window": 2, "policy": "force"}]}
    with hn.lowering("eager"), torch.no_grad():
        out = sparsecc.compile(_SoftCapped(), spec=spec, kernels="reference")(q, k, v)
    (site,) = hn.sites(sparsecc.last_report(), "attention")
    assert not site.applied and "not rewritable" in site.reason, site.reason
    torch.testing.assert_close(out, _SoftCapped()(q, k, v))
