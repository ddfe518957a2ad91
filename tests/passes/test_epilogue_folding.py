"""Epilogue folding after block-sparse linears: which nodes fold, what the op receives, and the numbers.

Models are compiled with ``torch.compile(backend="sparsecc")``, a spec that puts
``block_weights`` on every linear with policy ``force``, the reference kernels and
``SPARSECC_LOWERING=eager``. Expected outputs come from the eager model with each
weight replaced by its block-pruned dense copy, pruned by the float64 oracle written from
docs/spec.md (tests/oracle: the blocks of largest Frobenius norm), so they test the folded
chain's semantics, not a copy of sparsecc's pruning.
"""

import copy

import pytest
import sparsecc
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsecc.backend import last_report, rewritten_graphs
from sparsecc.codegen import ops
from tests import zoo
from tests.oracle import oracle

BLOCK, DENSITY = (16, 16), 0.5
SPEC = {"version": 1, "defaults": {"policy": "force"},
        "linear": [{"form": "block_weights", "block": list(BLOCK), "density": DENSITY}]}
# Argument positions of sparsecc::block_sparse_linear (codegen/ops.py).
ARG_BIAS, ARG_EPILOGUE, ARG_GATE, ARG_RESIDUAL, ARG_UP_BLOCKS = "bias", "epilogue", "gate", "residual", "up_blocks"


class _Call:
    """An emitted block_sparse_linear call whose arguments are read by name (``call.args["epilogue"]``)."""

    def __init__(self, node):
        self.node = node
        self.args = ops.record("block_sparse_linear").arguments(node)

    def __eq__(self, other):
        return self.node is getattr(other, "node", other)

    def __hash__(self):
        return hash(self.node)


@pytest.fixture(autouse=True)
def _eager(eager_lowering):
    pass


def pruned(model):
    """The model with every 2-D ``weight`` parameter replaced by its block-pruned dense copy."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1] == "weight" and param.dim() == 2:  # [out, in] weights of the models here
                kept, defined = oracle.prune_block_weights(param, block=BLOCK, density=DENSITY)
                assert defined, f"{name}: a tie at the density cut; the test's weights must not have one"
                param.copy_(kept.to(param.dtype))
    return model


def compile_and_run(model, x, **switches):
    with torch.no_grad():
        compiled = torch.compile(model, backend="sparsecc", options={"spec": SPEC, "kernels": "reference", **switches})
        return compiled(x)


def bsr_ops():
    return [_Call(n) for gm in rewritten_graphs() for n in gm.graph.nodes
            if n.op == "call_function" and n.target is ops.op("block_sparse_linear")]


def targets():
    return {getattr(n.target, "__name__", str(n.target)) for gm in rewritten_graphs() for n in gm.graph.nodes
            if n.op in ("call_function", "call_method")}


def check(model, x, atol=1e-5, **switches):
    """Compile (``switches``: backend options), compare with the pruned eager model, return the
    block_sparse_linear nodes."""
    out = compile_and_run(model, x, **switches)
    with torch.no_grad():
        expected = pruned(model)(x)
    torch.testing.assert_close(out, expected, atol=atol, rtol=atol)
    return bsr_ops()


# ------------------------------------------------------------------ models


class UpFirstGatedFFN(zoo.GatedSiluFFN):
    """up(x) * silu(gate(x)): the up projection comes first in the graph."""

    def forward(self, x):
        return self.down_proj(self.up_proj(x) * F.silu(self.gate_proj(x)))


class Residual(nn.Module):
    """x + proj(x), with or without bias; ``first`` puts the residual on the left."""

    def __init__(self, hidden=32, bias=True):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x):
        return x + self.proj(x)


class CastAfter(nn.Module):
    """gelu(proj(x)) cast to bfloat16."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 64)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh").to(torch.bfloat16)


class Unfoldable(nn.Module):
    """Chains the kernel cannot take: a broadcast residual, a scalar scale, tanh, a reused output."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(32, 64, bias=False)
        self.row = nn.Parameter(torch.randn(1, 64))

    def forward(self, x):
        y = self.proj(x)
        if self.kind == "broadcast":
            return y + self.row          # [1, N] broadcasts over rows: not the [N] bias or a full residual
        if self.kind == "scale":
            return y * 0.5
        if self.kind == "tanh":
            return torch.tanh(y)
        if self.kind == "promote":
            return y.to(torch.bfloat16) + torch.ones(64)  # bfloat16 + float32 promotes: no fold after the cast
        return F.silu(y), y              # "reused": the linear's value escapes


# ------------------------------------------------------------------ folding


@pytest.mark.parametrize("cls,epilogue,gone", [
    (zoo.PlainGeluFFN, "act:gelu", "gelu"),
    (zoo.HandTanhGeluFFN, "act:gelu_tanh", "tanh"),
    (zoo.ReluSquaredFFN, "act:relu2", "relu"),
], ids=lambda v: getattr(v, "__name__", v))
def test_plain_ffn_activation_is_folded(cls, epilogue, gone):
    torch.manual_seed(1)
    nodes = check(cls().eval(), torch.randn(2, 5, 32), atol=1e-4)
    assert [n.args[ARG_EPILOGUE] for n in nodes] == [epilogue, ""]
    assert all(n.args[ARG_BIAS] is not None for n in nodes)  # the linears' own biases
    assert gone not in targets() and "pow" not in targets()
    sites = [s for s in last_report().sites if s.kind == "linear"]
    assert [s.attrs["epilogue"] for s in sites] == [epilogue, ""]


def test_matmul_bias_add_is_folded_into_the_bias():
    torch.manual_seed(2)
    model = zoo.MatmulTransposeLinear().eval()  # x @ W.t() + b: the linear itself has no bias
    (node,) = check(model, torch.randn(3, 32))
    assert node.args[ARG_EPILOGUE] == "bias"
    assert node.args[ARG_BIAS].op == "placeholder"
    assert "add" not in targets()


def test_gated_ffn_folds_the_gating_multiply():
    torch.manual_seed(3)
    # the unfused form: gate and up as two ops
    nodes = check(zoo.GatedSiluFFN().eval(), torch.randn(2, 5, 32), fuse_gate_up=False)
    gate = next(n for n in nodes if n.args[ARG_EPILOGUE])
    epilogues = sorted(n.args[ARG_EPILOGUE] for n in nodes)
    assert epilogues == ["", "", "act:silu;mul:gate"]
    assert gate.args[ARG_GATE] in nodes  # the up projection's op output
    assert "silu" not in targets() and "mul" not in targets()


def test_gate_up_fusion_is_the_default_and_the_report_says_so():
    torch.manual_seed(4)
    nodes = check(zoo.GatedSiluFFN().eval(), torch.randn(2, 5, 32))
    assert len(nodes) == 2 and sum(n.args[ARG_UP_BLOCKS] is not None for n in nodes) == 1
    report = last_report()
    assert report.options == {"fold_epilogues": True, "fuse_gate_up": True}
    assert "fuse_gate_up=True" in str(report) and report.to_dict()["options"]["fold_epilogues"] is True


@pytest.mark.parametrize("cls", [zoo.GatedSiluFFN, UpFirstGatedFFN], ids=lambda c: c.__name__)
def test_fused_gate_up_is_one_op(cls):
    torch.manual_seed(4)
    nodes = check(cls().eval(), torch.randn(2, 5, 32))
    assert len(nodes) == 2
    fused = [n for n in nodes if n.args[ARG_UP_BLOCKS] is not None]
    assert len(fused) == 1 and fused[0].args[ARG_EPILOGUE] == "act:silu;mul:up"
    assert fused[0].args[ARG_GATE] is None
    sites = {s.module: s for s in last_report().sites if s.kind == "linear"}
    assert sites["gate_proj"].applied and sites["up_proj"].applied
    assert sites["gate_proj"].attrs["gate_up_kernel"] == sites["up_proj"].attrs["gate_up_kernel"] == \
        "gate=gate_proj, up=up_proj"


def test_fused_gate_up_needs_the_same_block_shape():
    spec = {"version": 1, "defaults": {"policy": "force"},
            "linear": [{"form": "block_weights", "block": [16, 16], "density": 0.5},
                       {"modules": "up_proj", "form": "block_weights", "block": [32, 16], "density": 0.5}]}
    with torch.no_grad():
        torch.compile(zoo.GatedSiluFFN().eval(), backend="sparsecc",
                      options={"spec": spec, "kernels": "reference"})(torch.randn(2, 5, 32))
    assert sorted(n.args[ARG_EPILOGUE] for n in bsr_ops()) == ["", "", "act:silu;mul:gate"]


@pytest.mark.parametrize("bias", [True, False])
def test_residual_add_is_folded(bias):
    torch.manual_seed(5)
    (node,) = check(Residual(bias=bias).eval(), torch.randn(2, 5, 32))
    assert node.args[ARG_EPILOGUE] == "add:residual"
    assert node.args[ARG_RESIDUAL].op == "placeholder"
    assert "add" not in targets()


def test_residual_after_o_proj_and_down_proj_in_a_block():
    """Both residual adds fold; the MLP reads the o_proj op's output (an operand an earlier rewrite replaced)."""
    torch.manual_seed(6)
    block = zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden=32, heads=4, kv_heads=2, inner=64,
                      bias=False).eval()
    nodes = check(block, torch.randn(2, 16, 32), atol=1e-4)
    by_module = {s.module: s.attrs.get("epilogue") for s in last_report().sites if s.kind == "linear"}
    assert by_module["attn.o_proj"] == "add:residual"
    assert by_module["mlp.down_proj"] == "add:residual"
    assert by_module["mlp.gate_proj"] == "act:silu;mul:up"  # gate and up fused (the default)
    o_proj = next(n for n in nodes if n.args[ARG_EPILOGUE] == "add:residual" and n.args[ARG_RESIDUAL].op ==
                  "placeholder")
    assert any(n.args["x"] is o_proj.node for n in nodes)  # gate/up read the folded residual stream
    assert "add" not in targets()


def test_cast_is_folded_last():
    torch.manual_seed(7)
    model = CastAfter().eval()
    x = torch.randn(3, 32)
    (node,) = check(model, x, atol=1e-2)  # one bfloat16 rounding
    assert node.args[ARG_EPILOGUE] == "act:gelu_tanh;cast:bfloat16"
    assert compile_and_run(model, x).dtype == torch.bfloat16
    assert node.node.meta["example_value"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["broadcast", "scale", "tanh", "promote", "reused"])
def test_unfoldable_chains_are_left_alone(kind):
    torch.manual_seed(8)
    model = Unfoldable(kind).eval()
    x = torch.randn(3, 32)
    out = compile_and_run(model, x)
    with torch.no_grad():
        expected = pruned(model)(x)
    (node,) = bsr_ops()
    folded = {"promote": "cast:bfloat16", "reused": ""}.get(kind, "")
    assert node.args[ARG_EPILOGUE] == folded
    left = {"broadcast": "add", "scale": "mul", "tanh": "tanh", "promote": "add", "reused": "silu"}[kind]
    assert left in targets()
    torch.testing.assert_close(out, expected, atol=1e-2 if kind == "promote" else 1e-5, rtol=1e-5)


def test_folding_can_be_turned_off():
    torch.manual_seed(9)
    nodes = check(zoo.GatedSiluFFN().eval(), torch.randn(2, 5, 32), fold_epilogues=False)
    assert [n.args[ARG_EPILOGUE] for n in nodes] == ["", "", ""]
    assert "silu" in targets()
    assert last_report().options == {"fold_epilogues": False, "fuse_gate_up": True}
    assert "fold_epilogues=False" in str(last_report())


@pytest.mark.parametrize("name", ["fold_epilogues", "fuse_gate_up"])
def test_a_switch_that_is_not_a_bool_names_the_option(name):
    from sparsecc.backend import parse_options

    with pytest.raises(sparsecc.SpecError, match=f"options.{name}.*True or False"):
        parse_options({"spec": SPEC, name: "yes"})


def test_two_four_sites_are_not_folded():
    torch.manual_seed(10)
    spec = {"version": 1, "defaults": {"policy": "force"}, "linear": [{"form": "2:4"}]}
    with torch.no_grad():
        torch.compile(zoo.PlainGeluFFN().eval(), backend="sparsecc",
                      options={"spec": spec, "kernels": "reference"})(torch.randn(2, 5, 32))
    assert "gelu" in targets()


@pytest.mark.parametrize("cls", [zoo.GatedSiluFFN, Residual], ids=lambda c: c.__name__)
def test_folding_with_dynamic_shapes(cls):
    """Symbolic sizes compare by expression: the chain still folds, and other lengths reuse the graph."""
    torch.manual_seed(11)
    model = cls().eval()
    with torch.no_grad():
        compiled = torch.compile(model, backend="sparsecc", dynamic=True,
                                 options={"spec": SPEC, "kernels": "reference"})
        for seq in (5, 9):
            x = torch.randn(2, seq, 32)
            torch.testing.assert_close(compiled(x), pruned(model)(x), atol=1e-5, rtol=1e-5)
    assert len(rewritten_graphs()) == 1
    # Gated FFNs fold as one fused gate+up op ("mul:up", the default) or as gate with "mul:gate".
    assert sorted(n.args[ARG_EPILOGUE] for n in bsr_ops())[-1] in ("act:silu;mul:gate", "act:silu;mul:up",
                                                                    "add:residual")
