"""Linear sites: any linear map whose weight is a module parameter.

Spellings: ``F.linear`` / ``nn.Linear``; ``torch.addmm(b, x, W)`` with W stored
[in, out] (HF ``Conv1D``, as in GPT-2); ``x @ W.t()`` / ``torch.matmul(x, W.T)``;
and ``x @ W`` with W [in, out]. A linear site belongs to the module that owns
the weight. Weight forms (2:4, block_weights) compress the weight once at
compile time; the compressed tensors enter the compiled graph as extra inputs
that ``WeightBindings`` keeps in step with the parameter (see backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.fx import GraphModule, Node

from sparsecc.codegen import ops
from sparsecc.cost import estimate_linear
from sparsecc.forms import TwoFour
from sparsecc.passes.decide import fallback, site_rule, verdict
from sparsecc.passes.fx_utils import ParamRef, concrete_shape, device_of, dtype_of, is_static, shape_of, size_hint
from sparsecc.passes.normalize import op_of
from sparsecc.passes.site import Decision, Estimate, Rewrite, Site, debug_no_match

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
        n, k = ref.tensor.shape
        return LinearMatch(x, ref, b if isinstance(b, Node) else None, False, k, n)
    if op.name == "addmm":
        x, w, b = op.inputs
        ref = _param(ctx, w)
        if ref is None:
            return None
        k, n = ref.tensor.shape
        return LinearMatch(x, ref, b if isinstance(b, Node) else None, True, k, n)
    if op.name == "matmul" and not op.params["transpose_rhs"]:
        x, rhs = op.inputs
        ref = _param(ctx, rhs)
        if ref is not None:
            k, n = ref.tensor.shape
            return LinearMatch(x, ref, None, True, k, n)
        t = op_of(rhs)
        if t is not None and t.name == "transpose":
            ref = _param(ctx, t.inputs[0])
            if ref is not None:
                n, k = ref.tensor.shape
                return LinearMatch(x, ref, None, False, k, n)
    return None


def search_linear(gm: GraphModule, ctx) -> List[Site]:
    """Find every linear map whose weight is a parameter."""
    sites = []
    for node in gm.graph.nodes:
        m = match_linear(node, ctx)
        if m is None:
            continue
        dtype = dtype_of(node)
        if dtype not in SUPPORTED_DTYPES:
            debug_no_match("linear", node, f"unsupported dtype {dtype}")
            continue
        x_shape = shape_of(m.x)
        tokens = 1
        for d in (x_shape or ())[:-1]:
            tokens *= size_hint(d)
        shapes = {"x": concrete_shape(m.x), "weight": tuple(m.weight.tensor.shape)}
        attrs = {"in_features": m.in_features, "out_features": m.out_features, "tokens": tokens,
                 "bias": m.bias is not None, "weight": m.weight.qualname,
                 "weight_layout": "in_out" if m.in_out else "out_in"}
        sites.append(Site("linear", m.weight.module, node, (node,), shapes, dtype,
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
    estimate = Estimate.of(estimate_linear(form, tokens=site.attrs["tokens"], in_features=k, out_features=n,
                                           dtype=site.dtype, hw=ctx.hardware))
    if isinstance(form, TwoFour):
        if k % 4:
            return fallback(form, rule.key, policy, f"2:4 needs in_features divisible by 4 (got {k})", estimate)
        op_name = "semi_structured_linear"
    else:
        bm, bk = form.block
        if n % bm or k % bk:
            return fallback(form, rule.key, policy, f"block {bm}x{bk} does not tile the weight {n}x{k}", estimate)
        op_name = "block_sparse_linear"
    try:
        ctx.compressed_weight(site, form)
    except ValueError as err:
        return fallback(form, rule.key, policy, f"cannot compress {site.attrs['weight']}: {err}", estimate)
    return verdict(site, ctx, form, rule.key, policy, estimate, op_name)


def replace_linear(gm: GraphModule, site: Site, decision: Decision, ctx) -> None:
    """Replace the linear by a compressed-weight op whose weight tensors are extra graph inputs."""
    m: LinearMatch = site.match
    graph = gm.graph
    compressed = ctx.compressed_weight(site, decision.form)
    n, k = m.out_features, m.in_features
    if isinstance(decision.form, TwoFour):
        values, indices = ctx.bind_weight(site, decision.form, ("values", "indices"))
        target, tensors = ops.op("semi_structured_linear"), (values, indices)
    else:
        blocks, row_ptr, col_idx = ctx.bind_weight(site, decision.form, ("blocks", "row_ptr", "col_idx"))
        target, tensors = ops.op("block_sparse_linear"), (blocks, row_ptr, col_idx)
    del compressed
    with graph.inserting_before(site.output):
        out = graph.call_function(target, (m.x, *tensors, m.bias, n, k, ctx.kernels))
    out.meta["nn_module_stack"] = site.output.meta.get("nn_module_stack", {})
    site.output.replace_all_uses_with(out)


LINEAR_REWRITES = (
    Rewrite("linear", "linear", search_linear, check_linear, replace_linear),
)
