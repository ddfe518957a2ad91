"""Every FX spelling of the activation table, and the hand-written forms, recognised by the passes.

Each case is a tiny ``Linear -> activation -> Linear`` model run through ``sparsecc.explain`` with
``block_weights`` forced on the first linear, so one capture asks both passes that recognise activations:
the FFN matcher (the site's ``activation``, named by probing) and epilogue folding (the first linear's folded
chain ``act:<name>``, from the table's call spellings, or by probing a subgraph that reads its input several
times). The spellings come from the table's recognition data; the hand-written forms and the square step are
written out here.
"""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsecc
from sparsecc.activations import ACTIVATION_TABLE, BY_NAME

SPEC = {"version": 1, "defaults": {"policy": "force"},
        "linear": [{"modules": "up", "form": "block_weights", "block": [16, 16], "density": 0.5}]}


class Mlp(nn.Module):
    """down(act(up(x))); ``act`` is a function of the hidden tensor or an ``nn.Module`` (then a submodule)."""

    def __init__(self, act):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _call_spellings(act):
    """(label, function) for each call and module of one entry's recognition data."""
    kwargs = {a.name: a.value for a in act.fixed}
    for fn in act.functions:
        label = f"{fn.__module__}.{fn.__name__}"
        yield f"{label}({kwargs})", functools.partial(fn, **kwargs)
        if act.fixed and all(a.value == a.default for a in act.fixed):
            yield f"{label}() with defaults", fn
    for method in act.methods:
        yield f"Tensor.{method}()", lambda v, method=method: getattr(v, method)(**kwargs)
    for make in act.modules:
        yield f"module {make!r}", make()


# The square step of an activation the table spells as another one squared (relu2 = relu, then a square).
SQUARES = {"** 2": lambda v: v ** 2, "** 2.0": lambda v: v ** 2.0, "torch.square": torch.square,
           "Tensor.square": lambda v: v.square(), "Tensor.pow(2)": lambda v: v.pow(2),
           "torch.pow(., 2)": lambda v: torch.pow(v, 2)}


def _spellings():
    for act in ACTIVATION_TABLE:
        yield from ((act.name, label, fn) for label, fn in _call_spellings(act))
        if act.squares is not None:
            base = list(_call_spellings(BY_NAME[act.squares]))
            for i, (square_label, square) in enumerate(SQUARES.items()):
                base_label, base_fn = base[i % len(base)]  # every square spelling, every base spelling
                yield act.name, f"{square_label} of {base_label}", \
                    lambda v, b=base_fn, s=square: s(b(v))


SPELLINGS = list(_spellings())

# Hand-written forms: pointwise subgraphs the passes name by evaluating them on the table's probe.
HAND_WRITTEN = [
    ("silu", "x * sigmoid(x)", lambda v: v * torch.sigmoid(v)),
    ("silu", "sigmoid(x) * x", lambda v: torch.sigmoid(v) * v),
    ("silu", "x.sigmoid() * x", lambda v: v.sigmoid() * v),
    ("gelu", "0.5 x (1 + erf(x / sqrt 2))", lambda v: 0.5 * v * (1.0 + torch.erf(v / math.sqrt(2.0)))),
    ("gelu", "x 0.5 (1 + erf(x * 0.70710678))", lambda v: v * 0.5 * (1.0 + torch.erf(v * 0.7071067811865476))),
    ("gelu_tanh", "GPT-2 NewGELU", lambda v: 0.5 * v * (1.0 + torch.tanh(
        math.sqrt(2.0 / math.pi) * (v + 0.044715 * torch.pow(v, 3.0))))),
    ("gelu_tanh", "x ** 3 form", lambda v: 0.5 * v * (1.0 + torch.tanh(0.7978845608028654 * (v + 0.044715 * v ** 3)))),
]


def _recognised(act):
    """(the FFN site's activation, the first linear's folded epilogue) for ``Mlp(act)``."""
    report = sparsecc.explain(Mlp(act).eval(), torch.randn(2, 32), spec=SPEC)
    ffn = [s for s in report.sites if s.kind == "ffn"]
    up = [s for s in report.sites if s.kind == "linear" and s.module == "up"]
    assert len(ffn) == 1 and len(up) == 1 and up[0].applied, report.sites
    return ffn[0].attrs["activation"], up[0].attrs.get("epilogue", "")


def test_every_entry_has_a_spelling():
    names = {name for name, _, _ in SPELLINGS}
    assert names == set(BY_NAME)
    assert len(SPELLINGS) >= len(ACTIVATION_TABLE) + len(SQUARES) - 1


@pytest.mark.parametrize("name,label,act", SPELLINGS, ids=[f"{n}: {label}" for n, label, _ in SPELLINGS])
def test_table_spelling_is_recognised_by_both_passes(name, label, act):
    assert _recognised(act) == (name, f"act:{name}")


@pytest.mark.parametrize("name,label,act", HAND_WRITTEN, ids=[f"{n}: {label}" for n, label, _ in HAND_WRITTEN])
def test_hand_written_form_is_recognised_by_both_passes(name, label, act):
    assert _recognised(act) == (name, f"act:{name}")


@pytest.mark.parametrize("label,act,folded", [
    ("tanh", torch.tanh, ""),
    ("quick GELU x * sigmoid(1.702 x)", lambda v: v * torch.sigmoid(1.702 * v), ""),
    ("leaky relu", F.leaky_relu, ""),
    ("relu6", F.relu6, ""),  # equal to relu on [-6, 6]: naming it relu would compute relu past 6
    ("relu ** 3", lambda v: F.relu(v) ** 3, "act:relu"),  # the relu folds; the cube stays in the graph
], ids=["tanh", "quick GELU", "leaky relu", "relu6", "relu ** 3"])
def test_other_pointwise_functions_are_not_named(label, act, folded):
    """Functions outside the table: the FFN is found with an unknown activation, and no activation is folded
    in their place."""
    assert _recognised(act) == ("unknown", folded)
