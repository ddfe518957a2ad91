"""Site paths from the model's own module tree.

A site's module path is the qualified name its owning module has in
``root.named_modules()``, found by module *identity*: Dynamo records, for
every node, the stack of modules whose forward produced it (``nn_module_stack``:
``str(id(module))`` or a registered module key, with the module's source
expression). The backend resolves each entry to the module object and looks
its name up in the named modules of the compiled root. Source expressions
(``L['self']``, ``L['args'][0]``, ``L['fn']``) are only ever *evaluated* to reach
an object, never parsed into a path, so a ``*args``-wrapped ``forward``, a
``forward(s, x)``, an ``nn.Sequential`` or ``torch.compile(model.forward)``
all give the names ``model.named_modules()`` prints.

The root is the module the compiled callable is bound to: the first
``nn.Module`` among the frame's locals (``self``, then the positional
arguments, including those packed in ``*args``). A plain function that takes
several modules names each module by the first of them that contains it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

# Where the resolved stack of a node is stored: (key, name) pairs, outermost first; name None when unresolved.
STACK_META = "sparsecc_module_stack"
# A source expression's root: L['name'] (a local of the compiled frame) or G['name'] (a global).
_SOURCE_ROOT = re.compile(r"^\s*([LG])\[\s*(['\"])([^'\"]+)\2\s*\]")
# Dynamo suffixes a module's key with "@N" when the module is called more than once.
_CALL_SUFFIX = re.compile(r"@\d+$")


@dataclass
class ModuleTree:
    """Qualified names of the compiled root's modules and tensors, by object identity."""

    roots: List[torch.nn.Module] = field(default_factory=list)
    module_names: Dict[int, str] = field(default_factory=dict)    # id(module) -> qualified name
    tensor_names: Dict[int, str] = field(default_factory=dict)    # id(parameter or buffer) -> qualified name
    # id(parameter or buffer) -> every module holding it (tied weights: the embedding and the LM head)
    tensor_owners: Dict[int, List[str]] = field(default_factory=dict)
    registered: Dict[str, torch.nn.Module] = field(default_factory=dict)  # Dynamo's registered module keys
    scope: Dict[str, Any] = field(default_factory=dict)           # {"L": frame locals, "G": frame globals}
    unresolved_reason: str = ""                                   # why nothing could be resolved (no frame)

    def add_root(self, root: torch.nn.Module) -> None:
        """Name ``root``'s modules and tensors; names already given by an earlier root are kept."""
        if any(r is root for r in self.roots):
            return
        self.roots.append(root)
        for name, module in root.named_modules(remove_duplicate=False):
            self.module_names.setdefault(id(module), name)
        for name, tensor in [*root.named_parameters(remove_duplicate=False),
                             *root.named_buffers(remove_duplicate=False)]:
            self.tensor_names.setdefault(id(tensor), name)
            owners = self.tensor_owners.setdefault(id(tensor), [])
            owner = name.rpartition(".")[0]
            if owner not in owners:
                owners.append(owner)

    def module_object(self, key: str, source: str) -> Optional[torch.nn.Module]:
        """The module behind one ``nn_module_stack`` entry, by its key or by evaluating its source."""
        module = self.registered.get(key)
        if module is not None:
            return module
        if self.scope:
            try:
                value = eval(source, {"__builtins__": {}}, self.scope)  # noqa: S307 - Dynamo's own source syntax
            except Exception:  # noqa: BLE001 - an expression we cannot evaluate stays unresolved
                return None
            if isinstance(value, torch.nn.Module):
                return value
        return None

    def name_of(self, key: str, source: str) -> Optional[str]:
        """The qualified name of one ``nn_module_stack`` entry, or None when it is not in the tree."""
        bare = _CALL_SUFFIX.sub("", str(key))
        if bare.isdigit() and int(bare) in self.module_names:
            return self.module_names[int(bare)]
        module = self.module_object(bare, source)
        if module is None:
            return None
        if id(module) not in self.module_names:
            # A module outside every root (e.g. a global used inside the compiled function) is named from
            # the root of its own source expression, which is then a root too.
            base = _root_object(source, self.scope)
            if isinstance(base, torch.nn.Module):
                self.add_root(base)
        return self.module_names.get(id(module))

    def tensor_name(self, tensor: Any) -> Optional[str]:
        """The qualified name of a parameter or buffer of the root, by identity."""
        return self.tensor_names.get(id(tensor))

    def tensor_owner_paths(self, tensor: Any) -> Tuple[str, ...]:
        """Every module path holding ``tensor`` (several for a tied weight), in ``named_parameters`` order."""
        return tuple(self.tensor_owners.get(id(tensor), ()))


def _root_object(source: str, scope: Dict[str, Any]) -> Any:
    match = _SOURCE_ROOT.match(source)
    if not match or not scope:
        return None
    table = scope.get(match.group(1)) or {}
    return table.get(match.group(3)) if isinstance(table, dict) else None


def _modules_in(value: Any) -> Iterable[torch.nn.Module]:
    """Modules held directly by a frame local, or inside its tuple/list/dict (``*args``, ``**kwargs``)."""
    if isinstance(value, torch.nn.Module):
        yield value
    elif isinstance(value, (tuple, list)):
        yield from (v for v in value if isinstance(v, torch.nn.Module))
    elif isinstance(value, dict):
        yield from (v for v in value.values() if isinstance(v, torch.nn.Module))


def from_frame(f_locals: Dict[str, Any], f_globals: Dict[str, Any],
               registered: Optional[Dict[str, Any]] = None) -> ModuleTree:
    """The module tree of a compiled frame: its root is the first module among the frame's locals."""
    tree = ModuleTree(scope={"L": dict(f_locals), "G": f_globals},
                      registered={k: v for k, v in (registered or {}).items() if isinstance(v, torch.nn.Module)})
    ordered = sorted(f_locals.items(), key=lambda kv: kv[0] != "self")   # self first, then argument order
    for _, value in ordered:
        for module in _modules_in(value):
            tree.add_root(module)
    return tree


def from_dynamo() -> ModuleTree:
    """The module tree of the frame Dynamo is compiling now (called from inside the backend)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - no Dynamo frame (a graph built by other means)
        tx = None
    if tx is None:
        return ModuleTree(unresolved_reason="the graph was not captured by Dynamo, so its frame is unknown")
    registered = getattr(getattr(tx, "output", None), "nn_modules", None) or {}
    return from_frame(getattr(tx, "f_locals", {}) or {}, getattr(tx, "f_globals", {}) or {}, registered)


def annotate(gm: GraphModule, tree: ModuleTree) -> None:
    """Store each node's resolved module stack in ``node.meta[STACK_META]`` (outermost first)."""
    cache: Dict[Tuple[str, str], Optional[str]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        entries: List[Tuple[str, Optional[str]]] = []
        for key, value in stack.items():
            source = value[0] if isinstance(value, tuple) else str(value)
            if (key, source) not in cache:
                cache[(key, source)] = tree.name_of(str(key), source)
            entries.append((str(key), cache[(key, source)]))
        node.meta[STACK_META] = entries
    tree.scope = {}   # the frame's objects are not kept past the compile


def stack_entries(node: Node) -> List[Tuple[str, Optional[str]]]:
    """``(stack key, qualified name)`` of the modules enclosing ``node``, outermost first.

    The name is None for an entry that is not in the compiled root's tree.
    """
    return list(node.meta.get(STACK_META) or [])
