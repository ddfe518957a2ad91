"""Compressed weights are never served stale where the docs promise otherwise.

Expected values are float64 and built here from docs/spec.md: 2:4 keeps the 2 largest |w| of every 4 along the
input dimension; block_weights keeps the ceil(density * blocks) blocks of largest Frobenius norm.
"""

import math

import pytest
import torch
import torch.nn as nn

import sparsecc
from sparsecc import SpecError
from tests import zoo


def _two_four(w):
    w = w.double()
    groups = w.reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, -1).indices, True)
    return (groups * keep).reshape(w.shape)


def _blocks(w, bm, bk, density):
    w = w.double()
    n, k = w.shape
    norms = w.reshape(n // bm, bm, k // bk, bk).permute(0, 2, 1, 3).flatten(2).norm(dim=-1)
    keep = torch.zeros(norms.numel(), dtype=torch.bool)
    keep[norms.flatten().topk(math.ceil(density * norms.numel())).indices] = True
    return w * keep.view(n // bm, k // bk).repeat_interleave(bm, 0).repeat_interleave(bk, 1)


TWO_FOUR = {"version": 1, "linear": [{"form": "2:4", "policy": "force"}]}
BLOCKS = {"version": 1, "linear": [{"form": "block_weights", "block": [16, 16], "density": 0.5, "policy": "force"}]}


def _linear_out(model, x, pruned):
    return x.double() @ pruned.t() + model.proj.bias.double()


def _compile(model, spec, **kwargs):
    compiled = sparsecc.compile(model, spec=spec, kernels="reference", **kwargs)
    return compiled


def _assert_applied():
    sites = [s for s in sparsecc.last_report().sites if s.kind == "linear"]
    assert sites and all(s.applied for s in sites)


@pytest.mark.parametrize("spec,prune", [(TWO_FOUR, _two_four), (BLOCKS, lambda w: _blocks(w, 16, 16, 0.5))],
                         ids=["2:4", "block_weights"])
def test_writes_through_data_are_seen_with_check_weights(spec, prune, eager_lowering):
    torch.manual_seed(0)
    model = zoo.ModuleLinear(k=64, n=32).eval()
    x = torch.randn(3, 64)
    compiled = _compile(model, spec, check_weights=True)
    with torch.no_grad():
        compiled(x)
        _assert_applied()
        model.proj.weight.data.mul_(-2.0).add_(0.25)     # bypasses the version counter
        out = compiled(x)
    torch.testing.assert_close(out.double(), _linear_out(model, x, prune(model.proj.weight)), atol=1e-4, rtol=1e-4)


def test_refresh_rebuilds_after_writes_through_data(eager_lowering):
    torch.manual_seed(1)
    model = zoo.ModuleLinear(k=64, n=32).eval()
    x = torch.randn(3, 64)
    compiled = _compile(model, TWO_FOUR)
    with torch.no_grad():
        compiled(x)
        _assert_applied()
        model.proj.weight.data.copy_(torch.randn(32, 64))
        assert sparsecc.refresh(model) == 1
        out = compiled(x)
    torch.testing.assert_close(out.double(), _linear_out(model, x, _two_four(model.proj.weight)), atol=1e-4,
                               rtol=1e-4)


def test_square_conv1d_weight_update_is_compressed_in_its_own_layout(eager_lowering):
    """A weight stored [in, out] (GPT-2 Conv1D) is pruned along the input dimension after an update too; a
    square one would otherwise be compressed transposed without any shape error."""
    torch.manual_seed(2)
    model = zoo.Conv1DLinear(k=32, n=32).eval()
    x = torch.randn(4, 32)
    compiled = _compile(model, TWO_FOUR)
    with torch.no_grad():
        compiled(x)
        _assert_applied()
        model.weight.copy_(torch.randn(32, 32))           # through the parameter: the version moves
        out = compiled(x)
    expected = x.double() @ _two_four(model.weight.t()).t() + model.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_weighted_criterion_column_norms_follow_data_writes_with_check_weights(eager_lowering):
    torch.manual_seed(3)
    ffn = zoo.PlainGeluFFN().eval()
    spec = {"version": 1, "ffn": [{"form": "activation_threshold", "mode": "input", "criterion": "weighted",
                                   "threshold": {"input": 0.05, "down": 0.05}, "policy": "force"}]}
    x = torch.randn(2, 6, ffn.fc1.in_features)
    compiled = _compile(ffn, spec, check_weights=True)
    with torch.no_grad():
        compiled(x)
        assert [s.applied for s in sparsecc.last_report().sites if s.kind == "ffn"] == [True]
        ffn.fc1.weight.data.mul_(3.0)
        out = compiled(x)

        def thresholded(inp, weight, tau):
            score = inp.double().abs() * weight.double().norm(dim=0)
            return inp.double() * (score > tau)

        h = thresholded(x, ffn.fc1.weight, 0.05) @ ffn.fc1.weight.double().t() + ffn.fc1.bias.double()
        h = torch.nn.functional.gelu(h)
        expected = thresholded(h, ffn.fc2.weight, 0.05) @ ffn.fc2.weight.double().t() + ffn.fc2.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_check_weights_must_be_a_bool():
    with pytest.raises(SpecError, match="options.check_weights"):
        sparsecc.compile(nn.Linear(4, 4), check_weights="yes")


def test_bound_weights_compile_with_static_sizes():
    """A weight sparsecc binds at compile time (here a block-sparse weight) reaches Inductor with its sizes fixed:
    handed over as a plain tensor, AOTAutograd would give it symbolic sizes and every kernel reading it would be
    compiled for them. Its sizes cannot change without a recompile (``refresh`` raises then)."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False)).eval()
    spec = {"version": 1, "defaults": {"policy": "force"},
            "linear": [{"modules": "0", "form": "block_weights", "block": [16, 16], "density": 0.5}]}
    x = torch.randn(4, 64)
    with torch.no_grad():
        compiled = torch.compile(model, backend="sparsecc", options={"spec": spec})
        out, sources = run_and_get_code(compiled, x)
    assert [s.applied for s in sparsecc.last_report().sites] == [True]
    code = "\n".join(sources)
    assert "block_sparse_linear" in code or "_bsr" in code
    assert re.findall(r"\bs\d+\b", code) == [], "the compiled graph has symbolic sizes"
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), out)   # the compiled graph serves the next call as it is
        assert (out - model(x)).abs().max() > 1e-2    # and it is the pruned weight's product, not the dense one
