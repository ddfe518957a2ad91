"""Linear sites: any linear map whose weight is a module parameter.

Spellings: ``F.linear`` / ``nn.Linear``; ``torch.addmm(b, x, W)`` with W stored
[in, out] (HF ``Conv1D``, as in GPT-2); ``x @ W.t()`` / ``torch.matmul(x, W.T)``;
``x @ W`` with W [in, out]; and ``einsum("bsd,od->bso", x, W)`` (or ``do``). A linear site belongs to the module that owns
the weight. Weight forms (2:4, block_weights) compress the weight once at
compile time; the compressed tensors enter the compiled graph as extra inputs
that ``WeightBindings`` keeps in step with the parameter (see backend).

A ``block_weights`` site also takes over the pointwise chain that follows it
(bias, activation, gating multiply, residual add, cast: ``passes/epilogue.py``),
which its kernel computes in a generated epilogue. The backend option ``fold_epilogues=False``
turns folding off. The gate and up projections of a gated FFN that both get
``block_weights`` with the same block shape become one op computing
``act(x W_gᵀ) * (x W_uᵀ)`` in one pass over x (measured 1.27x faster than two
launches on an H100: docs/kernels.md); the backend option ``fuse_gate_up=False`` keeps them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

from sparsecc.codegen.linear_ops import (BLOCK_SPARSE_LINEAR, SEMI_STRUCTURED_LINEAR, BlockSparseLinearArgs,
                                         SemiStructuredLinearArgs)
from sparsecc.codegen.cusparselt_plan import TORCH_OP_HOST_S, plans_unavailable_reason
from sparsecc.codegen.semi_structured_linear import cslt_operand, cslt_operand_reason, planned_settings
from sparsecc.cost import estimate_linear
from sparsecc.forms import BlockWeights, TwoFour
from sparsecc.passes.decide import fallback, site_rule, verdict
from sparsecc.passes.epilogue import FoldedChain, fold_chain
from sparsecc.passes.fx_utils import ParamRef, concrete_shape, device_of, dtype_of, is_static, shape_of, size_hint
from sparsecc.passes.normalize import canonical, is_plain_matmul, op_of
from sparsecc.passes.plan import Plan, op_call
from sparsecc.passes.site import Decision, Rewrite, Site
from sparsecc.sharding import is_dtensor
from sparsecc.weights import compress

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LINEAR_OPS = ("linear", "addmm", "matmul")
_BSR_FIELDS = ("blocks", "row_ptr", "col_idx")


@dataclass
class LinearMatch:
    """A linear map ``y = x @ Wᵀ + b`` as found in the graph."""

    x: Node
    weight: ParamRef
    bias: Optional[Node]
    in_out: bool          # weight stored [in, out] (Conv1D) rather than [out, in]
    in_features: int
    out_features: int


def _param(ctx, node) -> Optional[ParamRef]:
    ref = ctx.params.get(node) if isinstance(node, Node) else None
    return ref if ref is not None and ref.is_parameter and ref.tensor.dim() == 2 else None


def match_linear(node: Node, ctx) -> Optional[LinearMatch]:
    """Return the LinearMatch for ``node`` if it is a linear map with a parameter weight."""
    op = op_of(node)
    if op is None:
        return None
    if op.name == "linear":
        x, w, b = op.inputs
        ref = _param(ctx, w)
        if ref is None:
            return None
        n, k = ref.shape
        return LinearMatch(x, ref, b if isinstance(b, Node) else None, False, k, n)
    if op.name == "addmm":
        x, w, b = op.inputs
        ref = _param(ctx, w)
        if ref is None:
            return None
        k, n = ref.shape
        return LinearMatch(x, ref, b if isinstance(b, Node) else None, True, k, n)
    if is_plain_matmul(op) and op.params["transpose_rhs"]:
        x, rhs = op.inputs          # einsum("bsd,od->bso", x, W): W stored [out, in]
        ref = _param(ctx, rhs)
        if ref is not None:
            n, k = ref.shape
            return LinearMatch(x, ref, None, False, k, n)
    if is_plain_matmul(op) and not op.params["transpose_rhs"]:
        x, rhs = op.inputs
        ref = _param(ctx, rhs)
        if ref is not None:
            k, n = ref.shape
            return LinearMatch(x, ref, None, True, k, n)
        t = op_of(rhs)
        if t is not None and t.name == "transpose":
            ref = _param(ctx, t.inputs[0])
            if ref is not None:
                n, k = ref.shape
                return LinearMatch(x, ref, None, False, k, n)
    return None


def unsupported_dtype(dtype) -> str:
    """Why a linear or FFN site of ``dtype`` cannot take a sparse form."""
    return f"unsupported dtype {dtype} (the forms take {', '.join(str(d) for d in SUPPORTED_DTYPES)})"


def search_linear(gm: GraphModule, ctx) -> List[Site]:
    """Find every linear map whose weight is a parameter."""
    sites = []
    for node in gm.graph.nodes:
        m = match_linear(node, ctx)
        if m is None:
            continue
        dtype = dtype_of(node)
        x_shape = shape_of(m.x)
        tokens = 1
        for d in (x_shape or ())[:-1]:
            tokens *= size_hint(d)
        shapes = {"x": concrete_shape(m.x), "weight": m.weight.shape}
        attrs = {"in_features": m.in_features, "out_features": m.out_features, "tokens": tokens,
                 "bias": m.bias is not None, "weight": m.weight.qualname,
                 "weight_layout": "in_out" if m.in_out else "out_in"}
        if dtype not in SUPPORTED_DTYPES:   # listed, so a rule naming it is said to match and why it stays dense
            attrs["refused"] = unsupported_dtype(dtype)
        sites.append(Site("linear", m.weight.owner_at(node), node, (node,), shapes, dtype,
                          device_of(node) or torch.device("cpu"), attrs, m, "linear",
                          not is_static(x_shape)))
    return sites


def check_linear(site: Site, ctx) -> Decision:
    """Decide a weight form for one linear site."""
    rule, policy, early = site_rule(site, ctx)
    if early is not None:
        return early
    form = rule.form
    if site.parent is not None and ctx.applied(site.parent):
        return fallback(form, rule.key, policy, f"inside {site.parent.label}, which is rewritten as "
                        f"{ctx.decision(site.parent).form.name}; weight forms do not compose with it yet")
    n, k = site.attrs["out_features"], site.attrs["in_features"]
    # A symbolic token count has no runtime branch for linears: judge the form at its worst probed count.
    estimate = estimate_linear(form, tokens=site.attrs["tokens"], in_features=k, out_features=n,
                               dtype=site.dtype, hw=ctx.hardware, symbolic_tokens=site.symbolic,
                               replayed=ctx.replayed)
    if isinstance(form, TwoFour):
        estimate = two_four_host_floor(estimate, site.device, ctx.replayed)
    # Under tensor parallelism n and k are this rank's shard (passes/tensor_parallel.py); the reason says so.
    shard = f" (this rank's shard of the {site.attrs['global_weight']} weight)" if "global_weight" in site.attrs else ""
    if isinstance(form, TwoFour):
        if k % 4:
            return fallback(form, rule.key, policy, f"2:4 needs in_features divisible by 4 (got {k}{shard})",
                            estimate)
        op_name = "semi_structured_linear"
    else:
        bm, bk = form.block
        if n % bm or k % bk:
            return fallback(form, rule.key, policy, f"block {bm}x{bk} does not tile the weight {n}x{k}{shard}",
                            estimate)
        op_name = "block_sparse_linear"
    try:
        ctx.compressed_weight(site, form)
    except ValueError as err:
        return fallback(form, rule.key, policy, f"cannot compress {site.attrs['weight']}: {err}", estimate)
    return verdict(site, ctx, form, rule.key, policy, estimate, op_name)


def _operands(node: Node) -> Tuple[Node, Optional[Node]]:
    """(x, bias) of a linear node as its arguments stand now (an earlier rewrite may have replaced x)."""
    op = canonical(node)
    if op is None or op.name not in _LINEAR_OPS:
        raise ValueError(f"{node.name} is no longer a linear")
    bias = op.inputs[2] if op.name in ("linear", "addmm") and isinstance(op.inputs[2], Node) else None
    return op.inputs[0], bias


def _block_form(site: Site, ctx) -> Optional[BlockWeights]:
    """The site's applied block_weights form, else None."""
    d = ctx.decision(site)
    return d.form if d is not None and d.apply and isinstance(d.form, BlockWeights) else None


def _blocked(site: Site, ctx) -> Callable[[Node], bool]:
    """Nodes that belong to another applied non-linear site, or that another linear's plan already folded:
    never folded into this one."""
    owned = {n for s in ctx.sites if s is not site and s.kind != "linear" and ctx.applied(s) for n in s.nodes}
    for other in ctx.sites:
        d = ctx.decision(other)
        if other is not site and other.kind == "linear" and d is not None and d.plan is not None \
                and "folded" in d.plan.state:
            owned.update(d.plan.state["folded"].nodes)
    return owned.__contains__


def _up_partner(site: Site, ctx) -> Callable[[Node], Optional[Site]]:
    """For fused gate/up: the linear site whose output ``node`` is, when it can fuse into ``site``'s op.

    It must be an unrewritten block_weights linear with the same block shape, the same input
    node and no bias, and the multiply must be its only user.
    """
    form = _block_form(site, ctx)
    if form is None or not ctx.fuse_gate_up:
        return lambda node: None
    x = _operands(site.output)[0]

    def partner(node: Node) -> Optional[Site]:
        for other in ctx.sites:
            if other is site or other.kind != "linear" or other.output is not node \
                    or _planned(other, ctx):
                continue
            other_form = _block_form(other, ctx)
            if other_form is None or other_form.block != form.block or len(node.users) != 1:
                return None
            op = canonical(node)
            if op is None or op.name not in _LINEAR_OPS or _operands(node) != (x, None):
                return None
            return other
        return None
    return partner


def _planned(site: Site, ctx) -> bool:
    """True when the plan stage already planned ``site`` (its op, or its place in another's fused op)."""
    d = ctx.decision(site)
    return d is not None and d.plan is not None


def _fold(site: Site, ctx) -> FoldedChain:
    """The chain after ``site``'s linear that its op can compute (empty when folding is off)."""
    if not ctx.fold_epilogues:
        return FoldedChain()
    has_bias = _operands(site.output)[1] is not None
    return fold_chain(site.output, has_bias, _blocked(site, ctx), _up_partner(site, ctx))


def _gate_half(site: Site, ctx) -> Optional[Tuple[Site, FoldedChain]]:
    """When ``site`` is the up projection that another site's chain multiplies in (``mul:up``): that site."""
    if not ctx.fuse_gate_up or not ctx.fold_epilogues:
        return None
    x = _operands(site.output)[0]
    for other in ctx.sites:
        if other is site or other.kind != "linear" or _block_form(other, ctx) is None \
                or _planned(other, ctx):
            continue
        op = canonical(other.output)
        if op is None or op.name not in _LINEAR_OPS or op.inputs[0] is not x:
            continue  # only a linear on the same input can be the gate half (cheap test before folding)
        folded = _fold(other, ctx)
        if folded.up is site:
            return other, folded
    return None


def two_four_host_floor(estimate, device: torch.device, replayed: bool):
    """A 2:4 estimate with torch's per-call cuSPARSELt plan as its floor where plans are not kept on ``device``.

    The cost model's ``gemm_2to4`` floor (58 us) was fitted with cuSPARSELt's plans kept per shape
    (codegen/cusparselt_plan.py); where they cannot be (``plans_unavailable_reason``), every plain call makes its
    plan on the host (:data:`TORCH_OP_HOST_S`). A replayed graph pays neither.
    """
    if device.type != "cuda" or replayed or not plans_unavailable_reason():
        return estimate
    return replace(estimate, sparse_time_s=max(estimate.sparse_time_s, TORCH_OP_HOST_S))


def plan_linear(site: Site, decision: Decision, ctx) -> Plan:
    """The op call of a decided linear; for block_weights also the epilogue it takes over and its gate/up pairing.

    A block_weights linear folds the pointwise chain after it (``passes/epilogue.py``); when the chain
    multiplies in the output of another block_weights linear on the same input (the up projection), one
    fused gate/up op computes both and the partner's plan says so. Pairing is decided here, in site order,
    so ``replace`` only executes it.
    """
    if decision.plan is not None:
        return decision.plan            # planned already, as the up half of an earlier site's fused op
    n, k = site.match.out_features, site.match.in_features
    if isinstance(decision.form, TwoFour):
        unbound, operand = _cslt_operand(site, decision.form, ctx)
        settings, how = _cslt_settings(site, operand, ctx)
        args = SemiStructuredLinearArgs(out_features=n, in_features=k, impl=ctx.kernels, **settings)
        plan = Plan(calls=[op_call(SEMI_STRUCTURED_LINEAR, args, site.device, site.symbolic)],
                    state={"cslt_operand": operand})
        plan.notes["cuSPARSELt operand"] = ("compressed at compile time" if not unbound
                                            else f"compressed on the first call ({unbound})")
        plan.notes["cuSPARSELt settings"] = how
        if operand is not None:
            why = plans_unavailable_reason()
            plan.notes["cuSPARSELt plans"] = ("kept per shape (a product they cannot take runs torch's op, logged once "
                                              "per reason)" if not why else f"made on every call by torch's op ({why})")
        return plan
    pair = _gate_half(site, ctx)
    root, folded = pair if pair is not None else (site, _fold(site, ctx))
    up: Optional[Site] = folded.up
    args = BlockSparseLinearArgs(out_features=root.match.out_features, in_features=root.match.in_features,
                                 impl=ctx.kernels, epilogue=str(folded.chain))
    plan = Plan(calls=[op_call(BLOCK_SPARSE_LINEAR, args, root.device, root.symbolic)],
                notes={"epilogue": str(folded.chain) or "none"}, state={"folded": folded})
    root.attrs["epilogue"] = str(folded.chain)
    if up is not None:
        pairing = f"gate={root.module}, up={up.module}"
        plan.notes["gate/up"] = pairing
        root.attrs["gate_up_kernel"] = up.attrs["gate_up_kernel"] = pairing
        _set_plan(up, Plan(fused_into=root.label), ctx)
    if root is not site:
        _set_plan(root, plan, ctx)
        return Plan(fused_into=root.label)
    return plan


def _cslt_operand(site: Site, form: TwoFour, ctx) -> Tuple[str, Optional[torch.Tensor]]:
    """(why not, None), or ('', the operand): a 2:4 site's cuSPARSELt operand, bound at compile time when it can be.

    Bound, the kernel runs the operand as it is; otherwise the kernel compresses the weight on its first call
    and caches it, which allocates inside a CUDA-graph capture (so ``cudagraphs=True`` is turned off for the
    graph, sparsecc/backend.py) and is re-done lazily after a weight update. The operand is made here, so a
    weight cuSPARSELt refuses is known before anything is bound; ``replace`` binds this one.
    """
    if ctx.kernels == "reference":
        return "reference kernels", None
    if is_dtensor(site.match.weight.tensor):
        return "tensor-parallel weight: the kernel compresses this rank's shard", None
    reason = cslt_operand_reason(site.match.out_features, site.match.in_features, site.dtype, site.device)
    if reason:
        return reason, None
    try:
        return "", cslt_operand(ctx.compressed_weight(site, form), site.dtype)
    except RuntimeError as err:
        return f"cuSPARSELt refused the weight ({err})", None


def _cslt_settings(site: Site, operand: Optional[torch.Tensor], ctx) -> Tuple[Dict[str, int], str]:
    """cuSPARSELt's settings for a 2:4 site's op (the op's ``alg_id``, ``split_k``, ``split_k_mode`` arguments) and
    how they were chosen.

    Planned here when the operand is bound and the token count is static: the search runs now, on the device, so
    the compiled model runs the same settings on every run and its first call searches nothing. Otherwise
    nothing is planned and the op searches on its first call of each power-of-two token bucket.
    """
    if operand is None:
        return {}, "searched on the first call (no operand bound at compile time)"
    if site.symbolic:
        return {}, "searched on the first call of each token bucket (the token count is symbolic)"
    tokens = site.attrs["tokens"]
    if tokens < 1:
        return {}, "searched on the first call (no tokens at compile time)"
    has_bias = _operands(site.output)[1] is not None
    config, how = planned_settings(operand, tokens, site.match.out_features, site.match.in_features, has_bias)
    mode = -1 if config.split_k_mode is None else int(config.split_k_mode)
    settings = {"alg_id": config.alg_id, "split_k": config.split_k, "split_k_mode": mode}
    return settings, f"algorithm {config.alg_id}, split-K {config.split_k} (mode {mode}): {how}"


def _cslt_derivation(form: TwoFour, dtype: torch.dtype) -> Callable:
    """``derive(weight, in_out)`` for ``bind_derived``: the weight pruned by ``form``, as cuSPARSELt's operand."""
    def derive(weight: torch.Tensor, in_out: bool) -> torch.Tensor:
        with torch.no_grad():
            return cslt_operand(compress(weight.t() if in_out else weight, form), dtype)
    return derive


def _set_plan(site: Site, plan: Plan, ctx) -> None:
    """Store ``plan`` in ``site``'s decision (planning one site may plan its fused partner too)."""
    ctx.decisions[id(site)] = replace(ctx.decision(site), plan=plan)


def replace_linear(gm: GraphModule, site: Site, decision: Decision, ctx) -> None:
    """Replace the linear by its planned compressed-weight op, whose weight tensors are extra graph inputs.

    A block_weights op also takes over the planned epilogue chain (and, fused, the up projection); a site
    the plan fused into another's op has nothing left to do.
    """
    plan: Plan = decision.plan
    if plan.fused_into is not None:
        return
    graph = gm.graph
    call = plan.calls[0]
    if isinstance(decision.form, TwoFour):
        x, bias = _operands(site.output)
        values, indices = ctx.bind_weight(site, decision.form, ("values", "indices"))
        packed = None
        if plan.state["cslt_operand"] is not None:
            # one operand per (weight, dtype, pruning rule): a tied weight under two rules gets two
            packed = ctx.bind_derived(site.match.weight, bool(site.match.in_out),
                                      f"cslt_{str(site.dtype)[6:]}_{decision.form.prune}",
                                      _cslt_derivation(decision.form, site.dtype), plan.state["cslt_operand"])
        with graph.inserting_before(site.output):
            out = call.record.emit(graph, call.args, x=x, values=values, indices=indices, bias=bias, packed=packed)
        out.meta["nn_module_stack"] = site.output.meta.get("nn_module_stack", {})
        _take_over(graph, site.output, out, (site.output,))
        return
    folded: FoldedChain = plan.state["folded"].current()
    up: Optional[Site] = folded.up
    x, bias = _operands(site.output)
    if folded.bias is not None:
        bias = folded.bias
    tensors = ctx.bind_weight(site, _block_form(site, ctx), _BSR_FIELDS)
    up_tensors = ctx.bind_weight(up, _block_form(up, ctx), _BSR_FIELDS) if up is not None else (None, None, None)
    row_ptr = tensors[1].meta["example_value"]
    if row_ptr.device.type == "cuda" and ctx.kernels != "reference":
        from sparsecc.codegen.block_sparse_linear import prepare_row_order
        prepare_row_order(row_ptr, up_tensors[1].meta["example_value"] if up is not None else None)
    last = folded.output or site.output
    with graph.inserting_before(last):
        out = call.record.emit(
            graph, call.args, x=x, **dict(zip(_BSR_FIELDS, tensors)), bias=bias, gate=folded.gate,
            residual=folded.residual, **{f"up_{name}": t for name, t in zip(_BSR_FIELDS, up_tensors)})
    out.meta["nn_module_stack"] = site.output.meta.get("nn_module_stack", {})
    _take_over(graph, last, out, (site.output,) + folded.nodes + ((up.output,) if up is not None else ()))


def _take_over(graph, last: Node, out: Node, replaced: Tuple[Node, ...]) -> None:
    """Point ``last``'s users at ``out``, then erase the replaced nodes that nothing reads any more."""
    if "example_value" in last.meta:
        out.meta["example_value"] = last.meta["example_value"]
    last.replace_all_uses_with(out)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(set(replaced), key=order.__getitem__, reverse=True):
        if not node.users:
            graph.erase_node(node)


LINEAR_REWRITES = (
    Rewrite("linear", "linear", search_linear, check_linear, replace_linear, plan_linear),
)
