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

import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from sparsecc.activations import FX_FUNCTIONS, FX_METHODS
from sparsecc.forms import MASKED_LOGIT_MAX

log = logging.getLogger("sparsecc")

META_KEY = "sparsecc_op"


@dataclass(frozen=True)
class CanonicalOp:
    """One node in the canonical vocabulary.

    ``name`` is one of: linear, addmm, matmul, transpose, softmax, scale, add,
    masked_fill, cast, identity, dropout (training mode, p > 0), repeat_kv, sdpa,
    pointwise, chunk, getitem, view. ``inputs`` are the tensor operands in a fixed order per name;
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

# Elementwise functions and methods that may form an activation: the spellings of the activation table
# (sparsecc.activations), the building blocks of hand-written forms (named by probing), and activations
# without a kernel (their FFN sites are found and named "unknown").
_POINTWISE_FUNCS = set(FX_FUNCTIONS) | {
    torch.tanh, torch.sigmoid, torch.erf, torch.exp, F.relu6, F.leaky_relu, F.mish, F.hardswish,
    torch.nn.functional.hardtanh, torch.abs, operator.neg, torch.neg, torch.sqrt, torch.rsqrt,
    operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div,
}
_POINTWISE_METHODS = set(FX_METHODS) | {"sigmoid", "tanh", "exp", "mul", "add", "sub", "div", "neg", "abs", "sqrt",
                                        "rsqrt", "erf", "__mul__", "__add__"}
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
    """A Python number, or a 0-d constant tensor made by ``torch.full([], c)`` (GPT-2's mask value and scale)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if isinstance(arg, Node) and arg.op == "call_function" and arg.target is torch.full and len(arg.args) >= 2 \
            and tuple(arg.args[0]) == () and isinstance(arg.args[1], (int, float)) \
            and not isinstance(arg.args[1], bool):
        return float(arg.args[1])
    return None


def _kw(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _einsum_matmul(node: Node) -> Optional[CanonicalOp]:
    """Recognise a two-operand einsum that is a batched matrix product, in any axis order.

    The result is a ``matmul`` whose params say how to read it as the
    standard ``[batch..., i, c] @ [batch..., c, j] -> [batch..., i, j]``:
    ``lhs_perm`` / ``rhs_perm`` permute the operands into that order (None:
    already in it), ``transpose_rhs`` says the right operand is stored
    ``[batch..., j, c]``, and ``out_perm`` permutes the standard result into
    the einsum's output order (None: the same). ``bqhd,bkhd->bhqk`` is then
    q and k permuted to ``[b, h, s, d]`` with k transposed, and
    ``bhqk,bkhd->bqhd`` a product whose result is permuted back to
    ``[b, q, h, d]``. A right operand without batch letters and a left operand
    whose free letters all lead the output (``bsd,od->bso``) is a plain
    ``x @ Wᵀ`` (or ``x @ W``) with no permutation.
    """
    equation = node.args[0]
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str) or len(operands) != 2:
        return None
    m = re.fullmatch(r"\s*([a-zA-Z]+)\s*,\s*([a-zA-Z]+)\s*->\s*([a-zA-Z]+)\s*", equation)
    if not m:
        return None
    left, right, out = m.groups()
    if any(len(set(t)) != len(t) for t in (left, right, out)) or not set(out) <= set(left) | set(right):
        return None
    contracted = [c for c in left if c in right and c not in out]
    batch = [c for c in out if c in left and c in right]
    left_free = [c for c in left if c not in right]
    right_free = [c for c in right if c not in left]
    if len(contracted) != 1 or any(c not in out for c in left_free + right_free):
        return None
    (c,) = contracted
    if not batch and len(right) == 2 and len(right_free) == 1 and left[-1] == c \
            and out == left[:-1] + right_free[0]:
        # x @ Wᵀ (W stored [out, in]) or x @ W (W stored [in, out]): the linear spellings.
        return CanonicalOp("matmul", (operands[0], operands[1]), {"transpose_rhs": right[0] != c})
    if len(left_free) != 1 or len(right_free) != 1:
        return None
    i, j = left_free[0], right_free[0]
    transpose_rhs = right.index(j) < right.index(c)
    lhs_order = "".join(batch) + i + c
    rhs_order = "".join(batch) + ((j + c) if transpose_rhs else (c + j))
    std_out = "".join(batch) + i + j

    def perm(src: str, dst: str) -> Optional[tuple]:
        p = tuple(src.index(ch) for ch in dst)
        return None if p == tuple(range(len(p))) else p

    return CanonicalOp("matmul", (operands[0], operands[1]), {
        "transpose_rhs": transpose_rhs, "lhs_perm": perm(left, lhs_order), "rhs_perm": perm(right, rhs_order),
        "out_perm": perm(std_out, out)})


def is_plain_matmul(op: Optional[CanonicalOp]) -> bool:
    """True for a ``matmul`` read as written: no operand or result permutation (see ``_einsum_matmul``)."""
    return (op is not None and op.name == "matmul" and op.params.get("lhs_perm") is None
            and op.params.get("rhs_perm") is None and op.params.get("out_perm") is None)


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
        # Kept as its own op so a matcher can name it (attention reports a training-mode dropout as the reason
        # a site is refused); no matcher steps through it.
        return CanonicalOp("dropout", (args[0],), {"p": p})
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
        if _selects_everything(args[0], args[1]):   # x[..., 0:] or x[:, :]: the tensor itself
            return CanonicalOp("identity", (args[0],))
        return CanonicalOp("getitem", (args[0],), {"index": args[1]})
    if fn is getattr and len(args) == 2 and args[1] in ("mT", "T"):
        value = example_value(args[0])
        if value is not None and (args[1] == "mT" or value.dim() == 2):
            return CanonicalOp("transpose", (args[0],))
        return None
    if fn in _POINTWISE_FUNCS:
        return CanonicalOp("pointwise", tuple(a for a in args if isinstance(a, Node)))
    return None


def _selects_everything(source: Any, index: Any) -> bool:
    """True when ``source[index]`` is ``source`` itself: a tensor indexed only by ``...`` and slices that keep
    every element of their axis (start 0, step 1, and no stop or one at or past the axis' static size)."""
    value = example_value(source)
    if value is None:
        return False
    index = index if isinstance(index, tuple) else (index,)
    ellipses = [position for position, part in enumerate(index) if part is Ellipsis]
    if len(ellipses) > 1:
        return False
    slices = [i for i in index if i is not Ellipsis]
    if len(slices) > value.dim() or not all(isinstance(i, slice) for i in slices):
        return False
    ellipsis_at = ellipses[0] if ellipses else len(index)
    axes = list(range(ellipsis_at)) + list(range(value.dim() - (len(index) - ellipsis_at - 1), value.dim()))
    for axis, part in zip(axes, slices):
        size = value.shape[axis]
        if part.start not in (None, 0) or part.step not in (None, 1):
            return False
        if part.stop is not None and not (isinstance(part.stop, int) and isinstance(size, int) and part.stop >= size):
            return False
    return True


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
    """Store ``canonical(node)`` in every node's meta; return how many nodes were classified.

    Before classifying, constant causal masks of SDPA calls are folded into
    ``is_causal=True`` (:func:`fold_causal_masks`): the one graph edit of this
    pass, exact by construction, so that neither Inductor nor a sparse op
    reads a materialised ``S x S`` mask.
    """
    fold_causal_masks(graph)
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


# ---------------------------------------------------------------- constant causal masks
#
# HF transformers builds its causal mask inside the traced forward (masking_utils). Eagerly it
# passes attn_mask=None / is_causal=True to SDPA, but under torch.compile with torch < 2.14 it
# always materialises the (B, 1, S, S) mask from aranges: SDPA then cannot take the causal flash
# path, and the mask costs S*S bytes of reads per head. When such a mask depends on no graph input,
# it is a constant of the graph: evaluate it once and, when it is exactly the causal mask, drop it
# for is_causal=True. Masks that read inputs (padding, cache positions) are left alone.

# Rows compared with the causal pattern per step, so the check never builds a second S x S tensor.
_CHECK_ROWS = 4096
# Host-memory budget for evaluating a CPU mask; device masks are checked against free device memory.
_CPU_FOLD_BYTES = 8 << 30
# The mask's subgraph holds a few S x S intermediates at once (mask, comparison, logical and).
_LIVE_COPIES = 3


def fold_causal_masks(graph: Graph) -> int:
    """Replace constant causal ``attn_mask`` arguments of SDPA by ``is_causal=True``; return how many.

    A mask qualifies when every node it is computed from is a function call,
    method call or attribute of the module (no placeholder, no in-place
    method), ``Sq == Sk`` (so SDPA's top-left causal alignment is the same as
    the mask's), and its value keeps exactly ``j <= i`` for every batch row
    and head. Anything else, or a mask too large to evaluate, is left as is.
    """
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_FUNCS:
            continue
        mask = _kw(node, 3, "attn_mask")
        if not isinstance(mask, Node) or _kw(node, 5, "is_causal", False):
            continue
        q, k = example_value(node.args[0]), example_value(node.args[1])
        if q is None or k is None or q.dim() != 4:
            continue
        sq, sk = q.shape[-2], k.shape[-2]
        if not (isinstance(sq, int) and isinstance(sk, int)) or sq != sk:
            continue
        value = _evaluate_constant(mask, graph)
        if value is None or not _is_causal_value(value, sq):
            continue
        kwargs = {"attn_mask": None, "dropout_p": _kw(node, 4, "dropout_p", 0.0), "is_causal": True,
                  "scale": _kw(node, 6, "scale")}
        if "enable_gqa" in node.kwargs:
            kwargs["enable_gqa"] = node.kwargs["enable_gqa"]
        node.args = tuple(node.args[:3])
        node.kwargs = kwargs
        _erase_dead(_constant_subgraph(mask) or [])
        folded += 1
    return folded


def _erase_dead(nodes: list) -> None:
    """Erase the now unused nodes of a folded mask (only those: a graph-wide DCE could drop cache writes)."""
    for node in reversed(nodes):
        if not node.users:
            node.graph.erase_node(node)


def _constant_subgraph(root: Node) -> Optional[list]:
    """The nodes ``root`` is computed from, in graph order, or None if one reads an input or mutates."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        if node.op not in ("call_function", "call_method", "get_attr"):
            return None
        if node.op == "call_method" and _inplace_method(str(node.target)):
            return None
        if any(writes_inputs(user) for user in node.users):
            return None   # e.g. mask[i, j] = False after the mask was built: its value is not the traced one
        seen.add(node)
        for arg in node.all_input_nodes:
            stack.append(arg)
    return [n for n in root.graph.nodes if n in seen]


def writes_inputs(node: Node) -> bool:
    """True for nodes that may write into one of their inputs (setitem, in-place methods, mutable ops).

    Dead-code elimination must keep them even when nothing reads their result.
    """
    if node.op == "call_method":
        return _inplace_method(str(node.target))
    if node.op == "call_function":
        target, name = node.target, getattr(node.target, "__name__", "")
        if getattr(target, "__module__", None) == "_operator" or target in vars(operator).values():
            # operator.and_ / or_ are pure; setitem and the augmented assignments (iadd, iand, ...) write.
            augmented = name.startswith("i") and (hasattr(operator, name[1:]) or hasattr(operator, name[1:] + "_"))
            return target is operator.setitem or augmented
        return name.endswith("_") or node.is_impure()
    return False


def _inplace_method(name: str) -> bool:
    """True for tensor methods that write into ``self``: ``add_``, ``masked_fill_``, ``__iadd__``, ``__setitem__``.

    Plain dunders end with an underscore too, but ``__eq__`` or ``__and__``
    (which torch 2.11's Dynamo records as method calls) return new tensors.
    """
    if name.startswith("__") and name.endswith("__"):
        return name == "__setitem__" or (name.startswith("__i") and hasattr(operator, name[3:-2] + "_"))
    return name.endswith("_")


def _fits_in_memory(value: torch.Tensor) -> bool:
    """True when a few copies of ``value`` fit where it would be evaluated."""
    need = _LIVE_COPIES * value.numel() * value.element_size()
    device = value.device
    if device.type == "cuda" and torch.cuda.is_available():
        # Blocks the caching allocator holds but no tensor uses are free for this too (a previous compile or
        # run may have left tens of GiB reserved).
        unused_reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        available = torch.cuda.mem_get_info(device)[0] + unused_reserved
    else:
        available = _CPU_FOLD_BYTES
    if need >= available:
        log.warning("sparsecc: a constant attention mask of shape %s stays in the graph: checking whether it is "
                    "causal needs about %.1f GiB and %.1f GiB is available on %s", tuple(value.shape),
                    need / 2**30, available / 2**30, device)
        return False
    return True


def _evaluate_constant(root: Node, graph: Graph) -> Optional[torch.Tensor]:
    """Evaluate a mask that depends on no graph input, freeing intermediates as soon as they are dead."""
    nodes = _constant_subgraph(root)
    fake = example_value(root)
    if nodes is None or fake is None or not _fits_in_memory(fake):
        return None
    last_use = {}
    for index, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = index
    values: dict = {}
    module = graph.owning_module
    try:
        for index, node in enumerate(nodes):
            args = torch.fx.node.map_arg(node.args, lambda n: values[n])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
            if node.op == "get_attr":
                if module is None:
                    return None
                out = module
                for part in str(node.target).split("."):
                    out = getattr(out, part)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
            values[node] = out
            for arg in node.all_input_nodes:
                if last_use.get(arg) == index and arg is not root:
                    values.pop(arg, None)
    except Exception as err:  # noqa: BLE001 - an unevaluable mask simply stays in the graph
        log.warning("sparsecc: a constant attention mask stays in the graph: evaluating it failed (%s: %s)",
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return None
    out = values.get(root)
    return out if isinstance(out, torch.Tensor) else None


def _is_causal_value(value: torch.Tensor, seq: int) -> bool:
    """True when a bool (True keeps) or additive mask of shape (..., seq, seq) keeps exactly ``j <= i``."""
    if value.dim() < 2 or value.shape[-1] != seq or value.shape[-2] != seq:
        return False
    if value.dtype != torch.bool and not value.is_floating_point():
        return False
    cols = torch.arange(seq, device=value.device)
    for r0 in range(0, seq, _CHECK_ROWS):
        rows = torch.arange(r0, min(seq, r0 + _CHECK_ROWS), device=value.device)
        causal = cols[None, :] <= rows[:, None]
        part = value[..., r0:r0 + len(rows), :]
        if value.dtype == torch.bool:
            if not bool((part == causal).all()):
                return False
        else:
            kept_ok = bool((part.masked_fill(~causal, 0) == 0).all())
            masked_ok = bool((part.masked_fill(causal, float("-inf")) <= MASKED_LOGIT_MAX).all())
            if not (kept_ok and masked_ok):
                return False
    return True
