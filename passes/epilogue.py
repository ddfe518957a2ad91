"""Epilogue folding: the pointwise chain after a block-sparse linear, folded into its kernel.

After a linear site chosen for ``block_weights``, :func:`fold_chain` walks the
nodes that consume its output, one at a time, while each intermediate value
has a single user, and collects what the kernel's generated epilogue
(``codegen/epilogue.py``) can compute:

* a bias add: ``+ b`` with ``b`` of shape ``[N]`` (only when the linear has no bias of its own);
* an activation of the table (``sparsecc.activations``): a call the table spells it with
  (``F.gelu`` exact / tanh, ``F.silu``, ``relu``; ``relu(v) ** 2`` / ``square`` for relu2), or a
  hand-written pointwise subgraph (GPT-2's tanh GELU) named by evaluating it on the table's
  probe, as the FFN matcher does;
* a gating multiply ``v * t`` and a residual add ``v + t`` with a tensor ``t`` of
  exactly the value's shape and dtype (no broadcasting, no type promotion); the
  multiply may instead take the product of a second block-sparse linear on the same
  input (fused gate/up, when enabled);
* a dtype cast to float16 / bfloat16 / float32, which ends the chain;
* identities (eval-mode dropout, ``contiguous``) are passed through.

It stops at anything else, including nodes of other rewritten sites. Nodes are
classified with ``normalize.canonical`` afresh, not through the cached
annotation, because an earlier rewrite may have replaced their operands.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.fx import Node

from sparsecc.activations import is_square, spelled_by, squared
from sparsecc.codegen.epilogue import CAST_DTYPES, EpilogueChain, EpilogueStep
from sparsecc.passes.fx_utils import dtype_of, shape_of
from sparsecc.passes.normalize import canonical

_MUL_TARGETS = (operator.mul, torch.mul, "mul", "__mul__")
_MAX_CONE_NODES = 16  # a hand-written activation is a short subgraph; larger ones are not folded


@dataclass
class FoldedChain:
    """What :func:`fold_chain` found after one linear: the steps, the nodes they replace, extra inputs."""

    chain: EpilogueChain = field(default_factory=EpilogueChain)
    nodes: Tuple[Node, ...] = ()          # folded nodes in graph order; the last one's value is the op's result
    bias: Optional[Node] = None           # a folded bias vector (the linear had none)
    gate: Optional[Node] = None           # the tensor of a ``mul:gate`` step
    residual: Optional[Node] = None       # the tensor of an ``add:residual`` step
    up: Optional[object] = None           # the partner linear site of a ``mul:up`` step (fused gate/up)
    # role ("bias", "gate", "residual") -> (the folded node that reads the operand, the chain value beside it)
    consumers: Dict[str, Tuple[Node, Node]] = field(default_factory=dict)

    @property
    def output(self) -> Optional[Node]:
        """The node whose users the op takes over (None when nothing was folded)."""
        return self.nodes[-1] if self.nodes else None

    def __str__(self) -> str:
        return str(self.chain) or "(nothing folded)"

    def current(self) -> "FoldedChain":
        """The same chain with its bias/gate/residual operands read from the graph as it stands now.

        The chain is planned before any rewrite; a rewrite that ran since (an attention site replaced by its
        op, say) redirected the folded nodes' inputs to new nodes, which is what the op must read.
        """
        fresh = {role: _operand(node, value) for role, (node, value) in self.consumers.items()}
        if any(v is None for v in fresh.values()):
            raise ValueError(f"the planned epilogue {self} no longer matches the graph")
        return replace(self, **fresh)


def _size_key(dim):
    """An int for a static or constant-valued symbolic size, else the symbol's expression."""
    if isinstance(dim, int):
        return dim
    expr = dim.node.expr
    return int(expr) if expr.is_number else expr


def same_shape(a: Optional[tuple], b: Optional[tuple]) -> bool:
    """Shapes equal size by size, symbolic sizes by their expressions (never adds a guard)."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(_size_key(x) == _size_key(y) for x, y in zip(a, b))


def _activation(node: Node, value: Node) -> Optional[str]:
    """The activation a single node applies to ``value`` (its only tensor operand), or None."""
    tensors = [a for a in node.args if isinstance(a, Node)] + [v for v in node.kwargs.values() if isinstance(v, Node)]
    if tensors != [value]:
        return None
    return spelled_by(node.op, node.target, node.args, node.kwargs)


def _is_square(node: Node, value: Node) -> bool:
    """True when ``node`` is ``value ** 2`` / ``square(value)``."""
    return bool(node.args) and node.args[0] is value and is_square(node.op, node.target, node.args)


def _cone_activation(value: Node) -> Optional[Tuple[str, Tuple[Node, ...]]]:
    """A pointwise subgraph reading ``value`` several times (hand-written GELU): (name, nodes in graph order).

    Grows the set of pointwise nodes whose tensor inputs are all ``value`` or
    already in the set, then asks whether it has one sink and no escaping
    intermediate, and whether that sink computes a known activation.
    """
    from sparsecc.passes.ffn import name_activation  # ffn imports linear, which imports this module

    reachable, frontier = set(), [value]
    while frontier and len(reachable) < _MAX_CONE_NODES:
        for user in frontier.pop().users:
            op = canonical(user)
            if user not in reachable and op is not None and op.name in ("pointwise", "scale", "add"):
                reachable.add(user)
                frontier.append(user)
    order = {n: i for i, n in enumerate(value.graph.nodes)}
    cone: List[Node] = []
    inside = {value}
    for node in sorted(reachable, key=order.__getitem__):
        tensors = [a for a in node.args if isinstance(a, Node)]
        if not tensors or not all(t in inside for t in tensors) or node.kwargs:
            continue
        cone.append(node)
        inside.add(node)
        escaping = [n for n in cone if not n.users or any(u not in inside for u in n.users)]
        if escaping == [node] and all(u in inside for u in value.users):
            name = name_activation(value, tuple(cone))
            if name is not None:
                return name, tuple(cone)
    return None


def _operand(node: Node, value: Node) -> Optional[Node]:
    """The other tensor operand of a binary ``node`` applied to ``value`` (None when not exactly one)."""
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if a is value and isinstance(b, Node) and b is not value:
        return b
    if b is value and isinstance(a, Node) and a is not value:
        return a
    return None


def fold_chain(start: Node, has_bias: bool, blocked: Callable[[Node], bool],
               up_partner: Callable[[Node], Optional[object]] = lambda node: None) -> FoldedChain:
    """Walk the pointwise chain after the linear node ``start`` and return what the epilogue can fold.

    ``has_bias``: the linear adds its own bias (a further vector add is then not
    folded). ``blocked(node)``: True for nodes another rewrite owns. ``up_partner(node)``:
    the partner linear site when ``node`` is the output of a linear that may be fused as
    ``mul:up``, else None. Pure: the graph is not changed.
    """
    steps: List[EpilogueStep] = []
    nodes: List[Node] = []
    found = FoldedChain()
    value, shape, dtype = start, shape_of(start), dtype_of(start)
    while True:
        users = list(value.users)
        if len(users) != 1:
            cone = _cone_activation(value) if len(users) > 1 else None
            if cone is None or any(blocked(n) for n in cone[1]) or dtype_of(cone[1][-1]) != dtype \
                    or not same_shape(shape_of(cone[1][-1]), shape):
                break
            steps.append(EpilogueStep("act", cone[0]))
            nodes.extend(cone[1])
            value = cone[1][-1]
            continue
        user = users[0]
        op = canonical(user)
        if op is None or blocked(user) or dtype_of(user) != dtype:
            if op is not None and op.name == "cast" and not blocked(user) and _cast_ok(user, value):
                steps.append(EpilogueStep("cast", _dtype_name(dtype_of(user))))
                nodes.append(user)
            break
        if not same_shape(shape_of(user), shape):
            break
        if op.name == "identity" and op.inputs[0] is value:
            nodes.append(user)
        elif op.name == "cast":
            nodes.append(user)  # a cast to the dtype it already has
        elif _activation(user, value) is not None:
            name = _activation(user, value)
            nodes.append(user)
            square = only_user(user)
            if squared(name) is not None and square is not None and _is_square(square, user) \
                    and not blocked(square) and same_shape(shape_of(square), shape) and dtype_of(square) == dtype:
                name = squared(name)
                nodes.append(square)
                user = square
            steps.append(EpilogueStep("act", name))
        elif op.name == "add":
            other = _operand(user, value)
            if other is None or dtype_of(other) != dtype:
                break
            other_shape = shape_of(other)
            if (other_shape is not None and len(other_shape) == 1 and not has_bias and found.bias is None
                    and same_shape(other_shape, shape[-1:])):
                steps.append(EpilogueStep("bias"))
                found.bias = other
                found.consumers["bias"] = (user, value)
            elif same_shape(other_shape, shape) and found.residual is None:
                steps.append(EpilogueStep("add", "residual"))
                found.residual = other
                found.consumers["residual"] = (user, value)
            else:
                break
            nodes.append(user)
        elif op.name == "pointwise" and user.target in _MUL_TARGETS:
            other = _operand(user, value)
            if other is None or dtype_of(other) != dtype or not same_shape(shape_of(other), shape) \
                    or found.gate is not None or found.up is not None:
                break
            partner = up_partner(other)
            if partner is not None:
                steps.append(EpilogueStep("mul", "up"))
                found.up = partner
            else:
                steps.append(EpilogueStep("mul", "gate"))
                found.gate = other
                found.consumers["gate"] = (user, value)
            nodes.append(user)
        else:
            break
        value = user
    found.chain = EpilogueChain(tuple(steps))
    found.nodes = tuple(nodes)
    return found


def only_user(node: Node) -> Optional[Node]:
    """The single user of ``node``, or None."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _dtype_name(dtype: torch.dtype) -> Optional[str]:
    return next((name for name, d in CAST_DTYPES.items() if d == dtype), None)


def _cast_ok(node: Node, value: Node) -> bool:
    """A cast of ``value`` to a dtype the kernel can store, keeping the shape."""
    op = canonical(node)
    return (op is not None and op.inputs[0] is value and _dtype_name(dtype_of(node)) is not None
            and same_shape(shape_of(node), shape_of(value)))
