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
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

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
    # A frame inside the compiled model (after a graph break): the frame locals holding its modules, which its
    # graph must be tied to (``guard_frame_modules``), and why that failed when it did.
    frame_module_locals: List[str] = field(default_factory=list)
    unguarded_reason: str = ""
    # That frame's own module: Dynamo's module stacks start below it (its forward's own nodes have none).
    frame_module: Optional[torch.nn.Module] = None

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

    def module_at(self, path: str) -> Optional[torch.nn.Module]:
        """The module named ``path`` in the first root that has it (None when none has)."""
        for root in self.roots:
            try:
                return root.get_submodule(path)
            except AttributeError:
                continue
        return None

    def tensor_name(self, tensor: Any) -> Optional[str]:
        """The qualified name of a parameter or buffer of the root, by identity."""
        return self.tensor_names.get(id(tensor))

    def stacked_weight_modules(self) -> Dict[str, Tuple[Tuple[str, Tuple[int, ...]], ...]]:
        """Modules that hold weights stacked along a leading axis (a 3-D or larger parameter of more than one
        slice, outside convolutions): mixture-of-experts experts stored ``[experts, out, in]``. Path -> each such
        parameter's name and shape. No sparse form reaches these weights: a rule naming them is told so."""
        found = {}
        for root in self.roots:
            for module in root.modules():
                if isinstance(module, torch.nn.modules.conv._ConvNd) or id(module) not in self.module_names:
                    continue
                stacked = tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False)
                                if p.dim() >= 3 and p.shape[0] > 1)
                if stacked:
                    found.setdefault(self.module_names[id(module)], stacked)
        return found

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
               registered: Optional[Dict[str, Any]] = None,
               callers: Sequence[torch.nn.Module] = ()) -> ModuleTree:
    """The module tree of a compiled frame: its root is the first module among the frame's locals, or the
    outermost of ``callers`` (the modules whose forward called the frame, outermost first) that holds it."""
    tree = ModuleTree(scope={"L": dict(f_locals), "G": f_globals},
                      registered={k: v for k, v in (registered or {}).items() if isinstance(v, torch.nn.Module)})
    ordered = sorted(f_locals.items(), key=lambda kv: kv[0] != "self")   # self first, then argument order
    frame_modules = [module for _, value in ordered for module in _modules_in(value)]
    if frame_modules:
        enclosing = next((c for c in callers if any(m is frame_modules[0] for m in c.modules())), None)
    else:   # a plain function called from the model's code: the model is still the root
        enclosing = callers[0] if callers else None
    if enclosing is not None:
        tree.add_root(enclosing)
        if frame_modules and enclosing is not frame_modules[0]:
            tree.frame_module = frame_modules[0]
            tree.frame_module_locals = [name for name, value in ordered if isinstance(value, torch.nn.Module)]
    for module in frame_modules:
        tree.add_root(module)
    return tree


def guard_frame_modules(tree: ModuleTree) -> None:
    """Tie the graph Dynamo is compiling to the module objects its frame holds (an identity guard each).

    A frame inside the compiled model runs the same code for every layer, and Dynamo reuses one graph for all
    modules that pass its guards; the sites of that graph were named, and decided, for this frame's modules.
    With the guards every layer's frame is compiled, and decided, for its own modules (Dynamo's recompile
    limit counts entries per guarded module). Records ``unguarded_reason`` when the guards cannot be added.
    """
    if not tree.frame_module_locals or tree.unguarded_reason:
        return
    try:
        from torch._dynamo.guards import GuardBuilder
        from torch._dynamo.source import LocalSource
        from torch._dynamo.symbolic_convert import InstructionTranslator
        guards = InstructionTranslator.current_tx().output.guards
        for name in tree.frame_module_locals:
            guards.add(LocalSource(name).make_guard(GuardBuilder.ID_MATCH))
    except Exception as err:  # noqa: BLE001 - reported, and the sites stay dense
        tree.unguarded_reason = (f"a graph break put this site in a frame Dynamo may reuse for other modules, and "
                                 f"the frame could not be tied to its own module ({err!r})")
    else:
        tree.frame_module_locals = []   # guarded once per graph


# Modules whose frames sit between the backend and the frame Dynamo compiles (its hooks), and the module whose
# frame is the compiled callable's entry: the caller frames of the compiled frame lie between the two.
_DYNAMO_HOOK_MODULE = "torch._dynamo.convert_frame"
_DYNAMO_ENTRY_MODULE = "torch._dynamo.eval_frame"


def calling_modules() -> List[torch.nn.Module]:
    """The modules whose forward called the frame Dynamo compiles now, outermost first, up to the compiled call.

    After a graph break Dynamo compiles frames inside the model (a decoder layer's forward, a submodule's); their
    own locals hold only that submodule, while the model the user compiled is the ``self`` of a frame further up
    the Python stack, below Dynamo's entry into the compiled callable. Empty when the stack does not have that
    shape (a graph not captured from a running frame).
    """
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    names = [f.f_globals.get("__name__", "") for f in frames]
    hooks = [i for i, name in enumerate(names) if name == _DYNAMO_HOOK_MODULE]
    if not hooks:
        return []
    start = hooks[0]
    while start + 1 < len(frames) and names[start + 1] == _DYNAMO_HOOK_MODULE:
        start += 1
    end = next((i for i in range(start + 1, len(frames)) if names[i] == _DYNAMO_ENTRY_MODULE), None)
    if end is None:
        return []
    modules: List[torch.nn.Module] = []
    for f in reversed(frames[start + 1:end]):
        owner = f.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and not any(owner is m for m in modules):
            modules.append(owner)
    return modules


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
    return from_frame(getattr(tx, "f_locals", {}) or {}, getattr(tx, "f_globals", {}) or {}, registered,
                      calling_modules())


def annotate(gm: GraphModule, tree: ModuleTree) -> None:
    """Store each node's resolved module stack in ``node.meta[STACK_META]`` (outermost first)."""
    cache: Dict[Tuple[str, str], Optional[str]] = {}
    # A frame inside the model (after a graph break in it): every node runs inside the frame's own module, which
    # Dynamo's stacks leave out (the frame's forward is their root), so it heads every stack here.
    frame = None
    if tree.frame_module is not None and id(tree.frame_module) in tree.module_names:
        frame = (f"frame:{id(tree.frame_module)}", tree.module_names[id(tree.frame_module)])
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        entries: List[Tuple[str, Optional[str]]] = []
        for key, value in stack.items():
            source = value[0] if isinstance(value, tuple) else str(value)
            if (key, source) not in cache:
                cache[(key, source)] = tree.name_of(str(key), source)
            entries.append((str(key), cache[(key, source)]))
        if frame is not None and not (entries and entries[0][1] == frame[1]):
            entries.insert(0, frame)
        node.meta[STACK_META] = entries
    tree.scope = {}   # the frame's objects are not kept past the compile


def stack_entries(node: Node) -> List[Tuple[str, Optional[str]]]:
    """``(stack key, qualified name)`` of the modules enclosing ``node``, outermost first.

    The name is None for an entry that is not in the compiled root's tree.
    """
    return list(node.meta.get(STACK_META) or [])
