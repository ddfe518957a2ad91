"""The sparsecc pipeline, readable top to bottom as a named list of stages.

    normalize  classify every node into the canonical op vocabulary
    localize   tensor parallelism: sharded linears as local linears on this rank's shard (no-op otherwise)
    match      structural search for attention / ffn / linear sites
    shard      tensor parallelism: the global heads and local weight shapes this rank holds of each site
    decide     one check per site: spec rule + cost model -> Decision(apply, form, reason, estimate)
    plan       every remaining choice for the applied sites: the op calls (typed arguments, kernel variant,
               traced into Inductor or opaque), epilogue folding, gate/up pairing -> Decision.plan
    rewrite    execute the plans: replace applied sites by torch.ops.sparsecc.* ops (weights bound here)
    lower      hand the rewritten graph to Inductor (compile_fx); the dense rest compiles as usual
    report     every site, its decision and reason, estimates, stage times

``explain`` runs the stages up to plan on a private copy of the graph (the captured graph is not changed). Each stage is timed; setting
``SPARSECC_DEBUG_DIR`` dumps the graph's code after every stage.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.fx import GraphModule, Node

from sparsecc.codegen import ops
from sparsecc.cost import HardwareProfile, profile_for
from sparsecc.forms import Dense
from sparsecc.passes import normalize as normalize_mod
from sparsecc.passes.attention import ATTENTION_REWRITES
from sparsecc.passes.ffn import FFN_REWRITES, linear_nodes
from sparsecc.passes import module_tree
from sparsecc.passes import tensor_parallel
from sparsecc.passes.fx_utils import UNRESOLVED, collect_params
from sparsecc.passes.linear import LINEAR_REWRITES
from sparsecc.passes.site import Decision, Rewrite, Site
from sparsecc.report.model import Report, SiteRecord
from sparsecc.sharding import local_tensor
from sparsecc.weights import DerivedBinding, WeightBinding, compress, register_binding

log = logging.getLogger("sparsecc")

DEBUG_DIR_ENV = "SPARSECC_DEBUG_DIR"

# Families in decision order: FFN before linear, so a linear inside a rewritten FFN knows it.
REWRITES: Tuple[Rewrite, ...] = ATTENTION_REWRITES + FFN_REWRITES + LINEAR_REWRITES


@dataclass
class CompileContext:
    """Everything the stages share for one graph."""

    spec: Any
    kernels: str = "auto"
    autograd: bool = False
    fold_epilogues: bool = True     # backend options that change the rewritten graph (shown in the report)
    fuse_gate_up: bool = True
    replayed: bool = False          # cudagraphs=True with kernels that allow capture: no per-call host floors
    params: Dict[Node, Any] = field(default_factory=dict)   # placeholder/get_attr node -> ParamRef
    example_inputs: Sequence = ()
    hardware: HardwareProfile = field(default_factory=lambda: profile_for(torch.device("cpu")))
    modules: module_tree.ModuleTree = field(default_factory=module_tree.ModuleTree)   # the compiled root's names
    sites: List[Site] = field(default_factory=list)
    rewrites: Dict[int, Rewrite] = field(default_factory=dict)
    decisions: Dict[int, Decision] = field(default_factory=dict)
    bindings: List[WeightBinding] = field(default_factory=list)
    stages: List[Tuple[str, float]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    _compressed: Dict[Tuple[str, Any], Any] = field(default_factory=dict)
    gm: Optional[GraphModule] = None

    def has_kernel(self, op_name: str, device: torch.device) -> bool:
        """True when a Triton kernel exists for ``op_name`` on ``device``."""
        return ops.has_triton_kernel(op_name, device)

    def warn_once(self, note: str) -> None:
        """Add ``note`` to the report's notes and the compile's summary, once however many sites raise it."""
        if note not in self.warnings:
            self.warnings.append(note)

    def decision(self, site: Site) -> Optional[Decision]:
        """The decision already made for ``site``."""
        return self.decisions.get(id(site))

    def applied(self, site: Site) -> bool:
        """True when ``site`` was decided "apply"."""
        d = self.decision(site)
        return bool(d and d.apply)

    def _weight_of(self, site: Site) -> torch.Tensor:
        m = site.match
        return m.weight.tensor.t() if m.in_out else m.weight.tensor

    def compressed_weight(self, site: Site, form):
        """Compress the site's weight for ``form`` (cached: check and replace share one compression)."""
        key = (site.match.weight.qualname, form)
        if key not in self._compressed:
            self._compressed[key] = compress(self._weight_of(site), form)
        return self._compressed[key]

    # ---- weight bindings: the one service through which rewrites feed tensors made from weights to the graph

    def bind_weight(self, site: Site, form, fields: Tuple[str, ...]) -> List[Node]:
        """Add graph inputs for the compressed weight's ``fields``; return their placeholder nodes.

        The backend passes ``extra_inputs`` after the graph's own inputs on
        every call, and ``WeightBinding.refresh`` updates them in place when
        the parameter changes.
        """
        container = self.compressed_weight(site, form)
        tensors = [getattr(container, f) for f in fields]
        ref = site.match.weight
        binding = WeightBinding(ref.input_index, ref.tensor, form, fields, tensors, ref.tensor._version,
                                ref.tensor.data_ptr(), ref.qualname, in_out=bool(site.match.in_out))
        return self._bind(binding, ref.qualname, fields, tensors)

    def bind_derived(self, ref, in_out: bool, what: str, derive: Callable,
                     initial: Optional[torch.Tensor] = None) -> Node:
        """A graph input holding ``derive(weight, in_out)`` of the weight ``ref`` (a ``ParamRef``), computed once.

        One per (weight, what) per graph (a K-major copy, column norms); re-derived, not compressed, when the
        parameter changes after compile (``DerivedBinding``). ``initial`` is its current value when the caller
        already made it (it is then not derived again here).
        """
        for binding in self.bindings:
            if getattr(binding, "derived_key", None) == (ref.qualname, what):
                return binding.node
        # A K-major copy or column norms of a DTensor weight are those of this rank's shard (the FFN's weighted
        # criterion, which needs whole columns, is refused under tensor parallelism before it gets here).
        tensor = derive(local_tensor(ref.tensor), in_out) if initial is None else initial
        binding = DerivedBinding(ref.input_index, ref.tensor, None, (what,), [tensor], ref.tensor._version,
                                 ref.tensor.data_ptr(), ref.qualname, in_out=in_out)
        binding.derived_key, binding.derive_fn = (ref.qualname, what), derive
        binding.node = self._bind(binding, ref.qualname, (what,), [tensor])[0]
        return binding.node

    def _bind(self, binding: WeightBinding, qualname: str, fields: Sequence[str], tensors) -> List[Node]:
        """Register ``binding`` and add one placeholder per tensor after the graph's last input."""
        self.bindings.append(binding)
        register_binding(binding)
        graph = self.gm.graph
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        nodes = []
        for f, t in zip(fields, tensors):
            with graph.inserting_after(last):
                node = graph.placeholder(f"sparsecc_{qualname.replace('.', '_')}_{f}")
            node.meta["example_value"] = t
            nodes.append(node)
            last = node
        return nodes

    @property
    def extra_inputs(self) -> List[torch.Tensor]:
        """The compressed tensors, in the order their placeholders were added."""
        return [t for b in self.bindings for t in b.tensors]


# ---------------------------------------------------------------- stages

def stage_normalize(gm: GraphModule, ctx: CompileContext) -> None:
    """Annotate every node with its canonical op and its module stack (names from the root's module tree)."""
    module_tree.annotate(gm, ctx.modules)
    normalize_mod.annotate(gm.graph)
    ctx.params = collect_params(gm, ctx.example_inputs, ctx.modules)


def stage_match(gm: GraphModule, ctx: CompileContext) -> None:
    """Run every search; link linear sites to the FFN they belong to.

    A search that fails on an unexpected graph costs its sites, never the
    compile: the failure becomes a report warning.
    """
    for rewrite in REWRITES:
        try:
            found = rewrite.search(gm, ctx)
        except Exception as err:  # noqa: BLE001 - dense fallback rather than a crash
            log.warning("sparsecc: %s search failed: %r", rewrite.name, err)
            ctx.warnings.append(f"{rewrite.kind} search '{rewrite.name}' failed ({err!r}); its sites stay dense")
            continue
        for site in found:
            ctx.sites.append(site)
            ctx.rewrites[id(site)] = rewrite
    owner = {}
    for site in ctx.sites:
        if site.kind == "ffn":
            for node in linear_nodes(site):
                owner[node] = site
    for site in ctx.sites:
        if site.kind == "linear":
            site.parent = owner.get(site.output)


def stage_localize(gm: GraphModule, ctx: CompileContext) -> None:
    """Tensor parallelism: sharded linears become local linears on this rank's weight shard, wrapped back into
    their DTensors, so the searches see the model as one rank computes it (``passes/tensor_parallel.py``)."""
    tensor_parallel.localize(gm, ctx)


def stage_shard(gm: GraphModule, ctx: CompileContext) -> None:
    """Tensor parallelism: record what this rank holds of each site (global heads, local weight shapes), so that
    decide reasons with the local shapes and the spec's global head indices (``passes/tensor_parallel.py``)."""
    tensor_parallel.annotate_sharding(gm, ctx)


def stage_decide(gm: GraphModule, ctx: CompileContext) -> None:
    """Make one decision per site, in family order.

    A graph of a frame inside the model (after a graph break) is first tied to that frame's modules, since its
    decisions hold for them only (``module_tree.guard_frame_modules``).
    """
    if ctx.sites:
        module_tree.guard_frame_modules(ctx.modules)
    for site in ctx.sites:
        if site.module == UNRESOLVED:
            ctx.decisions[id(site)] = Decision(False, None, unresolved_reason(ctx))
            continue
        if ctx.modules.unguarded_reason:
            ctx.decisions[id(site)] = refused_decision(site, ctx, ctx.modules.unguarded_reason)
            continue
        why = tensor_parallel.refused(site)
        if why is not None:
            ctx.decisions[id(site)] = refused_decision(site, ctx, why)
            continue
        try:
            ctx.decisions[id(site)] = ctx.rewrites[id(site)].check(site, ctx)
        except Exception as err:  # noqa: BLE001 - dense fallback rather than a crash
            log.warning("sparsecc: check of %s failed: %r", site.label, err)
            ctx.decisions[id(site)] = Decision(False, None, f"dense fallback: the check failed ({err!r})")


def refused_decision(site: Site, ctx: CompileContext, why: str) -> Decision:
    """A site whose sharding cannot be established stays dense: "no rule" when no rule names it, else a dense
    fallback naming the rules that asked for a form (the check is not run: its compression would gather
    weights that this site will never use)."""
    rules = ctx.spec.matching(site.kind, site.module) if ctx.spec is not None else []
    if not rules:
        return Decision(False, None, "no rule")
    keys = ", ".join(r.key for r in rules)
    return Decision(False, rules[-1].form, f"dense fallback: {why}", rule=keys, policy=ctx.spec.policy_for(rules[-1]))


def unresolved_reason(ctx: CompileContext) -> str:
    """Why a site has no module path (so no rule can name it)."""
    why = ctx.modules.unresolved_reason or "its owning module is not in the compiled module's named_modules()"
    return f"no module path: {why}; no rule applies"


def stage_plan(gm: GraphModule, ctx: CompileContext) -> None:
    """Plan every applied site (``Rewrite.plan``) and record the plan in its decision and its report attrs."""
    for site in ctx.sites:
        decision = ctx.decisions[id(site)]
        if not decision.apply:
            continue
        try:
            plan = ctx.rewrites[id(site)].plan(site, decision, ctx)
        except Exception as err:  # noqa: BLE001 - dense fallback rather than a crash
            _fall_back(ctx, site, decision, "plan", err)
            continue
        # planning a site may have planned a partner already (fused gate/up): read the decision again
        ctx.decisions[id(site)] = dataclasses.replace(ctx.decisions[id(site)], plan=plan)
        site.attrs["launch"] = plan.launch()
        site.attrs["plan"] = plan.summary()


def _fall_back(ctx: CompileContext, site: Site, decision: Decision, stage: str, err: Exception) -> None:
    """Keep ``site`` dense after its ``stage`` failed: log it, and record the decision with the reason."""
    log.warning("sparsecc: %s of %s failed: %r", stage, site.label, err)
    ctx.decisions[id(site)] = Decision(False, decision.form, f"dense fallback: the {stage} failed ({err!r})",
                                       decision.estimate, decision.rule, decision.policy)


def stage_rewrite(gm: GraphModule, ctx: CompileContext) -> None:
    """Replace every applied site, then drop the dead dense nodes."""
    for site in ctx.sites:
        decision = ctx.decisions[id(site)]
        if not decision.apply:
            continue
        try:
            # Replacements redirect the site's users last, so a failure leaves only dead nodes behind.
            ctx.rewrites[id(site)].replace(gm, site, decision, ctx)
        except Exception as err:  # noqa: BLE001 - dense fallback rather than a crash
            _fall_back(ctx, site, decision, "rewrite", err)
    # FX's default purity test knows in-place *functions* but not in-place *methods*: a KV cache's
    # ``keys.index_copy_(...)`` or a buffer's ``count.add_(1)`` has no users and would be erased.
    gm.graph.eliminate_dead_code(is_impure_node=_keeps_side_effects)
    gm.graph.lint()
    gm.recompile()


def _keeps_side_effects(node: Node) -> bool:
    """True for nodes dead-code elimination must keep although nothing reads them (they write state)."""
    return node.is_impure() or normalize_mod.writes_inputs(node)


STAGES: Tuple[Tuple[str, Callable[[GraphModule, CompileContext], None]], ...] = (
    ("normalize", stage_normalize),
    ("localize", stage_localize),
    ("match", stage_match),
    ("shard", stage_shard),
    ("decide", stage_decide),
    ("plan", stage_plan),
    ("rewrite", stage_rewrite),
)
EXPLAIN_STAGES = STAGES[:6]


def run_stages(gm: GraphModule, ctx: CompileContext, stages=STAGES) -> None:
    """Run ``stages`` in order, timing each and dumping the graph when SPARSECC_DEBUG_DIR is set."""
    ctx.gm = gm
    debug_dir = os.environ.get(DEBUG_DIR_ENV)
    for index, (name, fn) in enumerate(stages):
        start = time.perf_counter()
        fn(gm, ctx)
        ctx.stages.append((name, (time.perf_counter() - start) * 1e3))
        if debug_dir:
            os.makedirs(debug_dir, exist_ok=True)
            with open(os.path.join(debug_dir, f"graph_{id(gm):x}_{index}_{name}.py"), "w") as fh:
                fh.write(gm.code)


def build_report(ctx: CompileContext) -> Report:
    """Turn the context's sites and decisions into a Report (one graph)."""
    report = Report(spec=getattr(ctx.spec, "source", None) or ("<inline spec>" if ctx.spec else None),
                    kernels=ctx.kernels, hardware=ctx.hardware.name, graphs=1, stages=list(ctx.stages),
                    frame=_frame_of(ctx.gm),
                    options={"fold_epilogues": ctx.fold_epilogues, "fuse_gate_up": ctx.fuse_gate_up})
    report.notes.extend(ctx.warnings)
    used_rules = set()
    for site in ctx.sites:
        d = ctx.decisions.get(id(site))
        if d is None:
            continue
        if d.rule:
            used_rules.update(r.strip() for r in d.rule.split(","))
        # a site whose heads differ lists each form with its heads (dense heads included)
        if d.head_forms:
            detail = "; ".join(f"{group.text} on heads {group.heads}" for group in d.head_forms)
            forms = list(dict.fromkeys(group.name for group in d.head_forms))
        else:
            detail, forms = (str(d.form), [d.form.name]) if d.form else (None, [])
        record = SiteRecord(
            kind=site.kind, module=site.module, form=getattr(d.form, "name", None), applied=d.apply,
            reason=d.reason, rule=d.rule, policy=d.policy, form_detail=detail, forms=forms,
            spelling=site.spelling, shapes={k: list(v) if v else v for k, v in site.shapes.items()},
            dtype=str(site.dtype).replace("torch.", ""), device=str(site.device),
            attrs={k: (v if v is None or isinstance(v, (int, float, bool, str)) else str(v))
                   for k, v in site.attrs.items()},
            estimate=d.estimate)
        report.sites.append(record)
    if ctx.spec is not None:
        covering, deciding = set(), set()
        for site in ctx.sites:
            if site.module != UNRESOLVED:
                site_covering, site_deciding = _rule_use(site, ctx.spec)
                covering |= site_covering
                deciding |= site_deciding
        report.covering_rules.extend(sorted(covering))
        report.deciding_rules.extend(sorted(deciding))
        # (a walk over every module: only for specs whose FFN or linear rules could name expert weights)
        stacked = ctx.modules.stacked_weight_modules() if ctx.spec.ffn or ctx.spec.linear else {}
        for kind in ("attention", "ffn", "linear"):
            for rule in ctx.spec.rules(kind):
                report.rules[rule.key] = (kind, rule.modules)
                experts = _stacked_weights_named(rule, kind, stacked)
                if experts:
                    report.notes.append(_stacked_weights_note(rule, kind, experts, stacked))
                if rule.key in used_rules or any(rule.matches(s.module) for s in ctx.sites
                                                 if s.kind == kind and s.module != UNRESOLVED):
                    report.matched_rules.append(rule.key)
                else:
                    path = next((p for p in experts if rule.matches(p)), None)   # what it meant: experts
                    if path is None:
                        path = next((p for p in ctx.modules.module_names.values() if rule.matches(p)), None)
                    if path is not None:
                        report.rule_modules[rule.key] = path
    return report


def _stacked_weights_named(rule, kind: str, stacked: Dict[str, tuple]) -> List[str]:
    """The modules of stacked expert weights that a sparse FFN or linear rule covers: a linear rule names the
    module owning the weight, an FFN rule that module or a block around it (the MoE layer)."""
    if kind == "attention" or isinstance(rule.form, Dense):
        return []
    def covered(path):
        parts = path.split(".")
        within = [path] if kind == "linear" else [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        return any(rule.matches(p) for p in within)
    return [path for path in stacked if covered(path)]


def _stacked_weights_note(rule, kind: str, experts: List[str], stacked: Dict[str, tuple]) -> str:
    first = experts[0]
    weights = ", ".join(f"{name} {list(shape)}" for name, shape in stacked[first])
    more = f" and {len(experts) - 1} more module(s) like it" if len(experts) > 1 else ""
    return (f"{rule.key} (modules={rule.modules!r}) covers {first} ({weights}){more}: weights stacked per expert "
            f"(mixture-of-experts) are reached by no {kind} form, so those experts run dense")


def _rule_use(site: Site, spec) -> Tuple[set, set]:
    """The keys of the rules that cover ``site`` at its phase (naming at least one head it has), and of those that
    decide it or one of its heads (``Spec.resolve``, the one resolution)."""
    seq_q = site.attrs.get("seq_q")
    heads = site.attrs.get("heads") if site.kind == "attention" else None
    if not isinstance(heads, int):
        # No head count (FFN and linear sites; an attention site refused before its heads were read, which may also
        # lack a query count): a rule decides something unless a later one covers every head and phase it does.
        matching = spec.matching(site.kind, site.module, seq_q)
        return ({rule.key for rule in matching},
                {rule.key for i, rule in enumerate(matching)
                 if not any(_covers_all_of(later, rule, seq_q is not None) for later in matching[i + 1:])})
    indices = [site.attrs.get("head_offset", 0) + h for h in range(heads)]
    covering = {rule.key for rule in spec.matching("attention", site.module, seq_q)
                if any(rule.covers_head(h) for h in indices)}
    deciding = (spec.resolve("attention", site.module, h, seq_q) for h in indices)
    return covering, {rule.key for rule in deciding if rule is not None}


def _covers_all_of(later, earlier, phase_known: bool) -> bool:
    """True when ``later`` takes every head and (unless the site's phase is known) every phase ``earlier`` names."""
    heads = later.heads is None or (earlier.heads is not None and set(earlier.heads) <= set(later.heads))
    return heads and (phase_known or later.phase in ("both", earlier.phase))


def _frame_of(gm: Optional[GraphModule]) -> Optional[int]:
    """The Dynamo frame a graph was captured from (its recompiles share it), when Dynamo recorded one."""
    compile_id = gm.meta.get("dynamo_compile_id") if gm is not None else None
    return getattr(compile_id, "frame_id", None)
