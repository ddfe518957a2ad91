"""Canonical view of Dynamo FX nodes.

Dynamo graphs spell one operation many ways: ``q @ k``, ``torch.matmul``,
``torch.bmm``, ``q.matmul(k)`` and ``torch.einsum`` are all a batched matrix
product; ``x.float()``, ``x.to(torch.float32)`` and ``x.type_as(y)`` are all a
cast. The matchers should not care. ``canonical(node)`` classifies a node into
one small vocabulary and extracts its operands, so every matcher in this
package reads the same canonical ops. The graph itself is not mutated: the
pass that runs this only annotates ``node.meta["sparsecc_op"]``, so that
Inductor still sees the model's own graph for everything we leave alone.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

META_KEY = "sparsecc_op"


@dataclass(frozen=True)
class CanonicalOp:
    """One node in the canonical vocabulary.

    ``name`` is one of: linear, addmm, matmul, transpose, softmax, scale, add,
    masked_fill, cast, identity, repeat_kv, sdpa, pointwise, chunk, getitem,
    view. ``inputs`` are the tensor operands in a fixed order per name;
    ``params`` holds the non-tensor arguments the matchers need.
    """

    name: str
    inputs: tuple = ()
    params: dict = field(default_factory=dict)


_MATMUL_FUNCS = {operator.matmul, torch.matmul, torch.bmm}
_LINEAR_FUNCS = {F.linear, torch._C._nn.linear}
_SOFTMAX_FUNCS = {F.softmax, torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax}
_SDPA_FUNCS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_DROPOUT_FUNCS = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}
_MUL_FUNCS = {operator.mul, torch.mul, operator.imul}
_DIV_FUNCS = {operator.truediv, torch.div, torch.true_divide, operator.itruediv}
_WHERE_FUNCS = {torch.where}
_CHUNK_FUNCS = {torch.chunk}
_SPLIT_FUNCS = {torch.split}
_TRANSPOSE_FUNCS = {torch.transpose, torch.swapaxes}
_PERMUTE_FUNCS = {torch.permute}

# Single-input elementwise functions and methods that may form an activation.
_POINTWISE_FUNCS = {
    F.gelu, torch._C._nn.gelu, F.relu, torch.relu, F.silu, torch.tanh, torch.sigmoid, torch.erf,
    torch.square, torch.pow, operator.pow, torch.exp, F.relu6, F.leaky_relu, F.mish, F.hardswish,
    torch.nn.functional.hardtanh, torch.abs, operator.neg, torch.neg, torch.sqrt, torch.rsqrt,
    operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "pow", "square", "exp", "mul", "add", "sub", "div",
                      "neg", "abs", "sqrt", "rsqrt", "erf", "__mul__", "__add__", "__pow__"}
_CAST_METHODS = {"float", "half", "bfloat16", "to", "type_as", "double", "type", "contiguous"}
_VIEW_METHODS = {"view", "reshape"}


def example_value(node: Any) -> Optional[torch.Tensor]:
    """The fake tensor Dynamo recorded for a node, or None for non-tensor values."""
    if not isinstance(node, Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def _is_tensor_node(arg: Any) -> bool:
    return isinstance(arg, Node) and example_value(arg) is not None


def _scalar(arg: Any) -> Optional[float]:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    return None


def _kw(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _einsum_matmul(node: Node) -> Optional[CanonicalOp]:
    """Recognise a two-operand einsum that is a batched matmul, possibly with a transposed right operand."""
    equation = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return None
    m = re.fullmatch(r"\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z.]+)\s*->\s*([a-zA-Z.]+)\s*", equation)
    if not m or "." in equation:
        return None
    left, right, out = m.groups()
    if not (len(left) == len(right) == len(out) >= 2):
        return None
    batch = left[:-2]
    if right[:-2] != batch or out[:-2] != batch:
        return None
    i, c = left[-2], left[-1]
    if out[-2:] != i + right[-1] and out[-2:] != i + right[-2]:
        return None
    if right[-2:] == c + out[-1]:       # ...ic,...cj->...ij: plain matmul
        return CanonicalOp("matmul", (operands[0], operands[1]), {"transpose_rhs": False})
    if right[-2:] == out[-1] + c:       # ...ic,...jc->...ij: right operand transposed
        return CanonicalOp("matmul", (operands[0], operands[1]), {"transpose_rhs": True})
    return None


def _transpose_last_two(node: Node, dims: tuple) -> bool:
    value = example_value(node.args[0]) if node.args else None
    if value is None:
        return False
    ndim = value.dim()
    return sorted(_norm_dim(d, ndim) for d in dims) == [ndim - 2, ndim - 1]


def canonical(node: Node) -> Optional[CanonicalOp]:
    """Classify ``node``; None when it is not in the vocabulary."""
    if node.op == "call_function":
        return _canonical_function(node, node.target)
    if node.op == "call_method":
        return _canonical_method(node, node.target)
    return None


def _canonical_function(node: Node, fn) -> Optional[CanonicalOp]:
    args = node.args
    if fn in _LINEAR_FUNCS:
        return CanonicalOp("linear", (args[0], args[1], _kw(node, 2, "bias")))
    if fn is torch.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        return CanonicalOp("addmm", (args[1], args[2], args[0]))
    if fn in _MATMUL_FUNCS:
        return CanonicalOp("matmul", (args[0], args[1]), {"transpose_rhs": False})
    if fn is torch.einsum:
        return _einsum_matmul(node)
    if fn in _SOFTMAX_FUNCS:
        return _softmax(node, args[0], _kw(node, 1, "dim"))
    if fn in _SDPA_FUNCS:
        return CanonicalOp("sdpa", (args[0], args[1], args[2], _kw(node, 3, "attn_mask")), {
            "dropout_p": _kw(node, 4, "dropout_p", 0.0), "is_causal": _kw(node, 5, "is_causal", False),
            "scale": _kw(node, 6, "scale"), "enable_gqa": node.kwargs.get("enable_gqa", False)})
    if fn in _DROPOUT_FUNCS:
        # Dropout is the identity in eval (training=False) or with p == 0; anything else is not ours to drop.
        if fn is torch.dropout:
            p, training = _kw(node, 1, "p"), _kw(node, 2, "train")
        else:
            p, training = _kw(node, 1, "p", 0.5), _kw(node, 2, "training", True)
        if training is False or p == 0:
            return CanonicalOp("identity", (args[0],))
        return None
    if fn in _ADD_FUNCS and len(args) == 2 and not node.kwargs:
        return _binary(node, "add", args)
    if fn in _MUL_FUNCS and len(args) == 2:
        return _scale_or_pointwise(node, args, invert=False)
    if fn in _DIV_FUNCS and len(args) == 2 and not node.kwargs:
        if _is_tensor_node(args[0]) and _scalar(args[1]) is not None:
            return CanonicalOp("scale", (args[0],), {"factor": 1.0 / _scalar(args[1])})
        return CanonicalOp("pointwise", tuple(a for a in args if isinstance(a, Node)))
    if fn in _WHERE_FUNCS and len(args) == 3:
        # where(cond, x, -inf) keeps x where cond holds: a masked_fill by ~cond.
        if _is_tensor_node(args[1]) and _scalar(args[2]) is not None:
            return CanonicalOp("masked_fill", (args[1], args[0]), {"value": _scalar(args[2]), "fill_where": False})
        return None
    if fn is torch.masked_fill:
        return CanonicalOp("masked_fill", (args[0], args[1]), {"value": _scalar(args[2]), "fill_where": True})
    if fn in _TRANSPOSE_FUNCS:
        if _transpose_last_two(node, (args[1], args[2])):
            return CanonicalOp("transpose", (args[0],))
        return None
    if fn in _PERMUTE_FUNCS:
        return _permute(node, args[0], args[1:] if len(args) > 2 else args[1])
    if fn is torch.repeat_interleave:
        return _repeat_interleave(node, args[0], _kw(node, 1, "repeats"), node.kwargs.get("dim"))
    if fn in _CHUNK_FUNCS:
        return CanonicalOp("chunk", (args[0],), {"chunks": _kw(node, 1, "chunks"), "dim": _kw(node, 2, "dim", 0)})
    if fn in _SPLIT_FUNCS:
        return CanonicalOp("split", (args[0],), {"size": _kw(node, 1, "split_size_or_sections"),
                                                  "dim": _kw(node, 2, "dim", 0)})
    if fn is operator.getitem:
        return CanonicalOp("getitem", (args[0],), {"index": args[1]})
    if fn is getattr and len(args) == 2 and args[1] in ("mT", "T"):
        value = example_value(args[0])
        if value is not None and (args[1] == "mT" or value.dim() == 2):
            return CanonicalOp("transpose", (args[0],))
        return None
    if fn in _POINTWISE_FUNCS:
        return CanonicalOp("pointwise", tuple(a for a in args if isinstance(a, Node)))
    return None


def _canonical_method(node: Node, name: str) -> Optional[CanonicalOp]:
    args = node.args
    if name in ("matmul", "bmm", "__matmul__"):
        return CanonicalOp("matmul", (args[0], args[1]), {"transpose_rhs": False})
    if name == "softmax":
        return _softmax(node, args[0], _kw(node, 1, "dim"))
    if name in ("transpose", "swapaxes") and len(args) == 3:
        if _transpose_last_two(node, (args[1], args[2])):
            return CanonicalOp("transpose", (args[0],))
        return None
    if name == "t" and len(args) == 1:
        return CanonicalOp("transpose", (args[0],))
    if name == "permute":
        return _permute(node, args[0], args[1:])
    if name == "masked_fill" and len(args) == 3:
        return CanonicalOp("masked_fill", (args[0], args[1]), {"value": _scalar(args[2]), "fill_where": True})
    if name in _CAST_METHODS:
        return _cast(node, name)
    if name == "repeat_interleave":
        return _repeat_interleave(node, args[0], _kw(node, 1, "repeats"), _kw(node, 2, "dim"))
    if name in ("add", "__add__") and len(args) == 2 and not node.kwargs:
        return _binary(node, "add", args)
    if name in ("mul", "__mul__") and len(args) == 2:
        return _scale_or_pointwise(node, args, invert=False)
    if name in ("div", "__truediv__") and len(args) == 2 and not node.kwargs and _scalar(args[1]) is not None:
        return CanonicalOp("scale", (args[0],), {"factor": 1.0 / _scalar(args[1])})
    if name == "chunk":
        return CanonicalOp("chunk", (args[0],), {"chunks": _kw(node, 1, "chunks"), "dim": _kw(node, 2, "dim", 0)})
    if name == "split":
        return CanonicalOp("split", (args[0],), {"size": _kw(node, 1, "split_size"), "dim": _kw(node, 2, "dim", 0)})
    if name in _VIEW_METHODS:
        return CanonicalOp("view", (args[0],))
    if name == "expand":
        return CanonicalOp("expand", (args[0],))
    if name in _POINTWISE_METHODS:
        return CanonicalOp("pointwise", tuple(a for a in args if isinstance(a, Node)))
    return None


def _softmax(node: Node, x, dim) -> Optional[CanonicalOp]:
    value = example_value(x)
    if value is None or dim is None or _norm_dim(dim, value.dim()) != value.dim() - 1:
        return None
    return CanonicalOp("softmax", (x,))


def _binary(node: Node, name: str, args) -> Optional[CanonicalOp]:
    tensors = [a for a in args if _is_tensor_node(a)]
    if len(tensors) == 2:
        return CanonicalOp(name, tuple(args))
    return CanonicalOp("pointwise", tuple(tensors))


def _scale_or_pointwise(node: Node, args, invert: bool) -> CanonicalOp:
    a, b = args
    if _is_tensor_node(a) and _scalar(b) is not None:
        return CanonicalOp("scale", (a,), {"factor": _scalar(b)})
    if _is_tensor_node(b) and _scalar(a) is not None:
        return CanonicalOp("scale", (b,), {"factor": _scalar(a)})
    return CanonicalOp("pointwise", tuple(x for x in args if isinstance(x, Node)))


def _permute(node: Node, x, dims) -> Optional[CanonicalOp]:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    value = example_value(x)
    if value is None or len(dims) != value.dim():
        return None
    dims = [_norm_dim(d, value.dim()) for d in dims]
    n = value.dim()
    if dims == list(range(n - 2)) + [n - 1, n - 2]:
        return CanonicalOp("transpose", (x,))
    return None


def _cast(node: Node, name: str) -> Optional[CanonicalOp]:
    if name == "contiguous":
        return CanonicalOp("identity", (node.args[0],))
    out = example_value(node)
    if out is None:
        return None
    return CanonicalOp("cast", (node.args[0],), {"dtype": out.dtype})


def _repeat_interleave(node: Node, x, repeats, dim) -> Optional[CanonicalOp]:
    value = example_value(x)
    if value is None or not isinstance(repeats, int) or dim is None or value.dim() != 4:
        return None
    if _norm_dim(dim, 4) != 1:
        return None
    return CanonicalOp("repeat_kv", (x,), {"n_rep": repeats})


def annotate(graph: Graph) -> int:
    """Store ``canonical(node)`` in every node's meta; return how many nodes were classified."""
    count = 0
    for node in graph.nodes:
        op = canonical(node)
        node.meta[META_KEY] = op
        count += op is not None
    return count


def op_of(node: Any) -> Optional[CanonicalOp]:
    """The canonical op of a node (classifying it now if the normalize pass has not run)."""
    if not isinstance(node, Node):
        return None
    if META_KEY not in node.meta:
        node.meta[META_KEY] = canonical(node)
    return node.meta[META_KEY]
