"""FX helpers shared by the matchers: module paths, parameters, users.

Module paths are the qualified names of ``model.named_modules()`` of the
compiled root, resolved by module identity in ``passes/module_tree.py``
(stored on each node by the pipeline's first stage). A module that is not in
the root's tree has no path: ``UNRESOLVED`` stands in its place, and the site
says why in the report instead of being matched against the spec's globs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch.fx import GraphModule, Node

from sparsecc.passes.module_tree import ModuleTree, stack_entries
from sparsecc.sharding import local_tensor

# The module path of a site whose owner is not in the compiled root's module tree.
UNRESOLVED = "<unresolved>"


def stack_paths(node: Node) -> List[str]:
    """The module paths enclosing ``node``, outermost first ("" is the root; UNRESOLVED when unknown)."""
    return [UNRESOLVED if name is None else name for _, name in stack_entries(node)]


def innermost_module(node: Node) -> str:
    """Path of the innermost module whose forward produced ``node``."""
    paths = stack_paths(node)
    return paths[-1] if paths else ""


def common_module(nodes: Iterable[Node]) -> str:
    """Innermost module whose forward contains all ``nodes`` ("" is the root)."""
    stacks = [stack_entries(n) for n in nodes]
    if not stacks:
        return ""
    common = stacks[0]
    for stack in stacks[1:]:
        keys = {key for key, _ in stack}
        common = [entry for entry in common if entry[0] in keys]
    if not common:
        return ""
    name = common[-1][1]
    return UNRESOLVED if name is None else name


@dataclass(frozen=True)
class ParamRef:
    """A parameter (or buffer) the graph reads: its qualified name and where it enters the graph."""

    qualname: str              # e.g. "layers.0.q.weight"
    module: str                # e.g. "layers.0.q"
    node: Node                 # the placeholder or get_attr node
    input_index: Optional[int]  # position among the graph's placeholders, None for get_attr
    tensor: torch.Tensor       # the real tensor (example input or module attribute)
    owners: Tuple[str, ...] = ()  # every module holding the tensor (a tied weight has several), ``module`` first

    def owner_at(self, node: Node) -> str:
        """The module that uses this tensor at ``node``: the innermost module of ``node``'s stack that holds it.

        A tied weight (an embedding shared with the LM head) is named after its first holder; the linear that
        reads it inside ``lm_head``'s forward is ``lm_head``'s site, as ``named_modules()`` and a spec name it.
        """
        for path in reversed(stack_paths(node)):
            if path in self.owners:
                return path
        return self.module

    @property
    def shape(self) -> tuple:
        """The shape this rank computes with: a DTensor parameter's local shard shape (tensor parallelism)."""
        return tuple(local_tensor(self.tensor).shape)

    @property
    def is_parameter(self) -> bool:
        """True for an nn.Parameter (weights), False for buffers."""
        return isinstance(self.tensor, torch.nn.Parameter)


def collect_params(gm: GraphModule, example_inputs: Sequence, tree: Optional[ModuleTree] = None) -> dict:
    """Map each placeholder/get_attr node that is a module parameter or buffer to its ParamRef.

    A lifted parameter is recognised by its Dynamo source (a ``_parameters``
    or ``_buffers`` entry) or by being an ``nn.Parameter``; its name comes from
    ``tree`` by tensor identity (UNRESOLVED module when it is not in the tree).
    """
    tree = tree or ModuleTree()
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
        refs[node] = _param_ref(tree, node, index, tensor)
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
        refs[node] = _param_ref(tree, node, None, tensor)
    return refs


def _param_ref(tree: ModuleTree, node: Node, index: Optional[int], tensor: torch.Tensor) -> "ParamRef":
    qualname = tree.tensor_name(tensor)
    if qualname is None:
        # Not a tensor of the compiled root: it still needs a unique name for its bindings.
        return ParamRef(f"{UNRESOLVED}.{node.name}", UNRESOLVED, node, index, tensor)
    module, _, _ = qualname.rpartition(".")
    return ParamRef(qualname, module, node, index, tensor, tree.tensor_owner_paths(tensor) or (module,))


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
