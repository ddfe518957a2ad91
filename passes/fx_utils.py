"""FX helpers shared by the matchers: module paths, parameters, users.

Module paths are reported the way ``model.named_modules()`` names them,
relative to the compiled module: Dynamo's ``L['self'].layers.0.q`` and
``L['self']._modules['layers']._modules['0']._modules['q']`` both become
``layers.0.q``. When the compiled callable is a plain function, the root is
its argument name (``model.layers.0.q`` for ``f(model, x)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

import torch
from torch.fx import GraphModule, Node

# One segment of a Dynamo source name: .attr, ['key'] or [index].
_SEGMENT = re.compile(r"\.([A-Za-z0-9_]+)|\[\s*'([^']*)'\s*\]|\[\s*\"([^\"]*)\"\s*\]|\[\s*(-?\d+)\s*\]")
# Dict names Dynamo walks through inside nn.Module; they are not part of the user's path.
_CONTAINER_ATTRS = {"_modules", "_parameters", "_buffers"}
# The name the compiled module's own forward binds; stripped from paths.
_ROOT_SELF = "self"


def split_source_name(name: str) -> List[str]:
    """Split a Dynamo source/stack name into user-visible path components.

    ``L['self']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``['layers', '0', 'weight']``. Unknown syntax (e.g. ``getattr(...)``)
    yields the components that could be read.
    """
    text = name.strip()
    m = re.match(r"^[A-Z]\[\s*'([^']*)'\s*\]", text)
    parts: List[str] = []
    if m:
        root = m.group(1)
        if root != _ROOT_SELF:
            parts.append(root)
        text = text[m.end():]
    for seg in _SEGMENT.finditer(text):
        piece = next(g for g in seg.groups() if g is not None)
        if piece in _CONTAINER_ATTRS:
            continue
        parts.append(piece)
    return parts


def stack_paths(node: Node) -> List[str]:
    """The module paths enclosing ``node``, outermost first ("" is the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        key = value[0] if isinstance(value, tuple) else str(value)
        paths.append(".".join(split_source_name(key)))
    return paths


def innermost_module(node: Node) -> str:
    """Path of the innermost module whose forward produced ``node``."""
    paths = stack_paths(node)
    return paths[-1] if paths else ""


def common_module(nodes: Iterable[Node]) -> str:
    """Innermost module whose forward contains all ``nodes``."""
    stacks = [stack_paths(n) for n in nodes]
    if not stacks:
        return ""
    common = stacks[0]
    for stack in stacks[1:]:
        keep = [p for p in common if p in stack]
        common = keep
    return common[-1] if common else ""


@dataclass(frozen=True)
class ParamRef:
    """A parameter (or buffer) the graph reads: its qualified name and where it enters the graph."""

    qualname: str              # e.g. "layers.0.q.weight"
    module: str                # e.g. "layers.0.q"
    node: Node                 # the placeholder or get_attr node
    input_index: Optional[int]  # position among the graph's placeholders, None for get_attr
    tensor: torch.Tensor       # the real tensor (example input or module attribute)

    @property
    def is_parameter(self) -> bool:
        """True for an nn.Parameter (weights), False for buffers."""
        return isinstance(self.tensor, torch.nn.Parameter)


def collect_params(gm: GraphModule, example_inputs: Sequence) -> dict:
    """Map each placeholder/get_attr node that is a module parameter or buffer to its ParamRef."""
    refs = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for index, node in enumerate(placeholders):
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        tensor = example_inputs[index] if index < len(example_inputs) else None
        if source is None or not isinstance(tensor, torch.Tensor):
            continue
        name = source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))
        if "_parameters[" not in name and "_buffers[" not in name and not isinstance(tensor, torch.nn.Parameter):
            continue
        parts = split_source_name(name)
        refs[node] = ParamRef(".".join(parts), ".".join(parts[:-1]), node, index, tensor)
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            tensor = gm.get_parameter(node.target)
        except AttributeError:
            try:
                tensor = gm.get_buffer(node.target)
            except AttributeError:
                continue
        parts = str(node.target).split(".")
        refs[node] = ParamRef(".".join(parts), ".".join(parts[:-1]), node, None, tensor)
    return refs


def only_user(node: Node) -> Optional[Node]:
    """The single user of ``node``, or None when it has zero or several."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def shape_of(node) -> Optional[tuple]:
    """Shape recorded for ``node`` (ints or SymInts), None if unknown."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def dtype_of(node) -> Optional[torch.dtype]:
    """Dtype recorded for ``node``."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def device_of(node) -> Optional[torch.device]:
    """Device recorded for ``node``."""
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return value.device if isinstance(value, torch.Tensor) else None


def size_hint(dim) -> int:
    """A concrete int for a (possibly symbolic) size: the hint Dynamo traced with."""
    if isinstance(dim, int):
        return dim
    try:
        return int(dim.node.hint) if dim.node.hint is not None else int(dim)
    except Exception:  # noqa: BLE001 - an unbacked symbol has no hint; estimates then use 1
        return 1


def concrete_shape(node) -> Optional[tuple]:
    """``shape_of`` with every symbolic size replaced by its hint (for estimates and reports)."""
    shape = shape_of(node)
    return tuple(size_hint(d) for d in shape) if shape is not None else None


def is_static(shape: Optional[tuple]) -> bool:
    """True when every size is a plain int."""
    return shape is not None and all(isinstance(d, int) for d in shape)
