"""FFN sites: Linear -> act -> Linear, and gated act(x W_g) * (x W_u) -> W_d.

The activation is whatever single-input pointwise chain sits between the
linears. It is named by evaluating the chain on the activation table's probe
and comparing with the table's references (``sparsecc.activations``), so
hand-written forms (GPT-2's tanh GELU, ``relu(x) ** 2``) are recognised as
well as ``F.gelu``/``F.silu``. Gate and
up may be one fused Linear split by ``chunk``/``split``. An FFN site belongs
to the innermost module containing all of its nodes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

from sparsecc.activations import BY_NAME, named_by_probe, probe as activation_probe
from sparsecc.codegen.linear_ops import (GATE_SPARSE_FFN, THRESHOLD_FFN, THRESHOLD_LINEAR, GateSparseFfnArgs,
                                         ThresholdFfnArgs, ThresholdLinearArgs)
from sparsecc.codegen.activation_sparse import MAX_DECODE_TOKENS
from sparsecc.cost import ASSUMED_ACTIVATION_SPARSITY, estimate_ffn
from sparsecc.forms import ActivationThreshold
from sparsecc.passes.decide import fallback, site_rule, verdict
from sparsecc.passes.fx_utils import common_module, concrete_shape, device_of, dtype_of, is_static, shape_of, size_hint
from sparsecc.passes.linear import SUPPORTED_DTYPES, LinearMatch, match_linear, unsupported_dtype
from sparsecc.passes.normalize import op_of
from sparsecc.passes.plan import Plan, op_call
from sparsecc.passes.site import Decision, Estimate, Rewrite, Site, debug_no_match

_MAX_ACT_NODES = 16  # activations are short chains; longer ones are not an activation
# The fused input-mode op is planned up to this many tokens: at 4 and 16 tokens the three per-projection GEMVs
# (their tl.dot union path) measured 3-18% faster than it on the H200; at 2 tokens the fused op took 2-16% less
# time at 70-90% and was within 2% at 50% on an H100, while at 3-4 tokens it took 1.7-4.8% more at 50% (one H100
# round at 16 tokens and 70% had it 6-7% ahead; bench/RESULTS.md "Two tokens through the fused op").
FUSED_FFN_MAX_TOKENS = 2
# The weighted criterion's fused op is planned for one token only: at 2-4 tokens it (its stage 1 scores both
# projections' channels per trip on the tl.dot union) took 1.3-1.5x the per-projection GEMVs' time on an H100.
FUSED_FFN_MAX_TOKENS_WEIGHTED = 1


@dataclass
class FfnMatch:
    """The linears of one FFN and how the hidden activation is formed."""

    x: Node
    first: LinearMatch               # W1 (plain) or W_gate (gated) or the fused gate_up linear
    first_node: Node
    up: Optional[LinearMatch]        # W_up for unfused gated FFNs
    up_node: Optional[Node]
    down: LinearMatch
    down_node: Node
    act_nodes: Tuple[Node, ...]
    act: Optional[str]               # recognised activation name, None if unknown
    fused_halves: Optional[Tuple[int, int]] = None  # (gate half, up half) of a fused gate_up weight


def _eval_chain(start: Node, nodes: Tuple[Node, ...], probe: torch.Tensor) -> Optional[torch.Tensor]:
    env: Dict[Node, torch.Tensor] = {start: probe}

    def sub(a):
        if isinstance(a, Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(sub(x) for x in a)
        return a
    try:
        for n in nodes:
            args = sub(n.args)
            kwargs = {k: sub(v) for k, v in n.kwargs.items()}
            if n.op == "call_function":
                env[n] = n.target(*args, **kwargs)
            else:
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        return env[nodes[-1]] if nodes else probe
    except Exception:  # noqa: BLE001 - a chain we cannot evaluate is simply not a known activation
        return None


def name_activation(start: Node, nodes: Tuple[Node, ...]) -> Optional[str]:
    """Name of the activation the pointwise ``nodes`` compute from ``start``, or None."""
    return named_by_probe(_eval_chain(start, nodes, activation_probe()))


_POINTWISE_NAMES = ("pointwise", "scale", "cast", "identity", "add")


def _pointwise_cone(end: Node) -> Optional[Tuple[Node, Tuple[Node, ...]]]:
    """The pointwise subgraph computing ``end`` from exactly one non-pointwise node.

    Returns (root, nodes in graph order) when ``end`` is a function of a single
    tensor ``root`` through pointwise ops only (a chain, or a DAG such as the
    hand-written tanh GELU, which reads its input three times) and no
    intermediate value escapes to other users. None otherwise.
    """
    cone, roots, stack = set(), set(), [end]
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        op = op_of(node)
        if op is None or op.name not in _POINTWISE_NAMES or len(cone) >= _MAX_ACT_NODES:
            if node is end:
                return None
            roots.add(node)
            continue
        cone.add(node)
        tensors = [a for a in op.inputs if isinstance(a, Node)]
        if not tensors:
            return None
        stack.extend(tensors)
    if len(roots) != 1:
        return None
    root = next(iter(roots))
    for node in cone | {root}:
        if node is not end and any(u not in cone for u in node.users):
            return None
    order = {n: i for i, n in enumerate(end.graph.nodes)}
    return root, tuple(sorted(cone, key=order.__getitem__))


def _fused_half(node: Node) -> Optional[Tuple[Node, int]]:
    """If ``node`` is getitem(chunk(lin, 2, -1), i) or getitem(split(lin, F, -1), i), return (lin, i)."""
    op = op_of(node)
    if op is None or op.name != "getitem" or not isinstance(op.params["index"], int):
        return None
    parent = op_of(op.inputs[0])
    if parent is None or parent.name not in ("chunk", "split"):
        return None
    src = parent.inputs[0]
    shape = shape_of(src)
    if shape is None or parent.params["dim"] not in (-1, len(shape) - 1):
        return None
    if parent.name == "chunk" and parent.params["chunks"] != 2:
        return None
    if parent.name == "split" and not (isinstance(shape[-1], int) and parent.params["size"] == shape[-1] // 2):
        return None
    return src, op.params["index"]


def search_ffn(gm: GraphModule, ctx) -> List[Site]:
    """Find plain and gated FFNs ending in a linear with a parameter weight."""
    sites = []
    for node in gm.graph.nodes:
        down = match_linear(node, ctx)
        if down is None:
            continue
        hidden = _through_view(down.x)
        if not isinstance(hidden, Node) or op_of(hidden) is None or op_of(hidden).name not in _POINTWISE_NAMES:
            continue  # the linear's input is not an activation: not an FFN's second projection
        if len(hidden.users) != 1:
            debug_no_match("ffn", node, "the hidden activation is used elsewhere")
            continue
        found = _match_plain(hidden, ctx) or _match_gated(hidden, ctx)
        if found is None:
            continue
        match = FfnMatch(down=down, down_node=node, **found)
        site = _make_site(match)
        if dtype_of(node) not in SUPPORTED_DTYPES:   # listed with the reason, as attention sites are
            site.attrs["refused"] = unsupported_dtype(dtype_of(node))
        sites.append(site)
    return sites


def _through_view(node):
    """Skip one single-user view/reshape (Conv1D reshapes its 2-D addmm output back to 3-D and down again)."""
    op = op_of(node)
    if op is not None and op.name == "view" and isinstance(op.inputs[0], Node) and len(node.users) == 1:
        return op.inputs[0] if len(op.inputs[0].users) == 1 else node
    return node


def _linear_output(ctx, node):
    """(linear node, match) when ``node`` is a linear's output, possibly behind one single-user view."""
    m = match_linear(node, ctx)
    if m is not None:
        return node, m
    op = op_of(node)
    if op is not None and op.name == "view" and isinstance(op.inputs[0], Node) and len(op.inputs[0].users) == 1:
        inner = op.inputs[0]
        m = match_linear(inner, ctx)
        if m is not None:
            return inner, m
    return node, None


def _match_plain(hidden: Node, ctx) -> Optional[dict]:
    cone = _pointwise_cone(hidden)
    if cone is None:
        return None
    root, nodes = cone
    lin_node, first = _linear_output(ctx, root)
    if first is None:
        debug_no_match("ffn", hidden, "the activation does not start at a linear with a parameter weight")
        return None
    return dict(x=first.x, first=first, first_node=lin_node, up=None, up_node=None, act_nodes=nodes,
                act=name_activation(root, nodes))


def _match_gated(hidden: Node, ctx) -> Optional[dict]:
    op = op_of(hidden)
    if op is None or op.name != "pointwise" or hidden.target not in (operator.mul, torch.mul, "mul", "__mul__"):
        return None
    operands = [a for a in op.inputs if isinstance(a, Node)]
    if len(operands) != 2:
        return None
    for gate_side, up_side in (operands, operands[::-1]):
        # gate_side = act(...) chain ending at a linear (or fused half); up_side = linear (or fused half)
        gate_src = _chain_source(gate_side)
        if gate_src is None:
            continue
        gate_root, chain = gate_src
        fused_gate, fused_up = _fused_half(gate_root), _fused_half(up_side)
        if fused_gate and fused_up and fused_gate[0] is fused_up[0]:
            lin = match_linear(fused_gate[0], ctx)
            if lin is None or len(fused_gate[0].users) != 1:
                continue
            return dict(x=lin.x, first=lin, first_node=fused_gate[0], up=None, up_node=None,
                        act_nodes=chain, act=name_activation(gate_root, chain),
                        fused_halves=(fused_gate[1], fused_up[1]))
        g_lin, u_lin = match_linear(gate_root, ctx), match_linear(up_side, ctx)
        if g_lin is None or u_lin is None or g_lin.x is not u_lin.x:
            continue
        if len(up_side.users) != 1:
            debug_no_match("ffn", hidden, "the up projection is used elsewhere")
            continue
        return dict(x=g_lin.x, first=g_lin, first_node=gate_root, up=u_lin, up_node=up_side,
                    act_nodes=chain, act=name_activation(gate_root, chain))
    return None


def _chain_source(end: Node) -> Optional[Tuple[Node, Tuple[Node, ...]]]:
    return _pointwise_cone(end)


def _make_site(m: FfnMatch) -> Site:
    nodes = (m.first_node,) + ((m.up_node,) if m.up_node is not None else ()) + m.act_nodes + (m.down_node,)
    x_shape = shape_of(m.x)
    tokens = 1
    for d in (x_shape or ())[:-1]:
        tokens *= size_hint(d)
    hidden = m.down.in_features
    attrs = {"gated": m.up is not None or m.fused_halves is not None, "fused_gate_up": m.fused_halves is not None,
             "activation": m.act or "unknown", "hidden": m.first.in_features, "intermediate": hidden,
             "tokens": tokens, "bias": m.first.bias is not None,
             # Owner modules of first/[up]/down weights, and which fused half is the gate: calibrate hooks them.
             "linear_modules": ",".join(lin.weight.module for lin in (m.first, m.up, m.down) if lin is not None),
             "gate_half": m.fused_halves[0] if m.fused_halves is not None else None}
    shapes = {"x": concrete_shape(m.x), "down.weight": m.down.weight.shape}
    dtype = m.down_node.meta["example_value"].dtype
    return Site("ffn", common_module(nodes), m.down_node, nodes, shapes, dtype,
                device_of(m.down_node) or torch.device("cpu"), attrs, m, "gated" if attrs["gated"] else "plain",
                not is_static(x_shape))


def linear_nodes(site: Site) -> Tuple[Node, ...]:
    """The linear nodes of an FFN site (so the linear family can tell they belong to it)."""
    m: FfnMatch = site.match
    return tuple(n for n in (m.first_node, m.up_node, m.down_node) if n is not None)


# ---------------------------------------------------------------- check

def check_ffn(site: Site, ctx) -> Decision:
    """Decide activation thresholding for one FFN site."""
    rule, policy, early = site_rule(site, ctx)
    if early is not None:
        return early
    form = rule.form
    estimate = _estimate(site, form, ctx)
    if not form.calibrated:
        ctx.warn_once(form.uncalibrated_note(rule.key))   # every site of the rule stays dense: said in the summary
        return fallback(form, rule.key, policy, f"{rule.key} gives a target sparsity but no threshold; "
                        "run sparsecc.calibrate to fill it in", estimate)
    m: FfnMatch = site.match
    if form.mode == "gate":
        if m.act is None:
            return fallback(form, rule.key, policy, "gate mode needs a recognised activation "
                            f"(one of {sorted(BY_NAME)})", estimate)
        return verdict(site, ctx, form, rule.key, policy, estimate, "gate_sparse_ffn", tau=form.tau("gate"))
    if form.tau("input") is None and form.tau("down") is None:
        return fallback(form, rule.key, policy, "input mode with neither an input nor a down threshold", estimate)
    params = dict(tau_input=form.tau("input"), tau_down=form.tau("down"))
    return verdict(site, ctx, form, rule.key, policy, estimate, "threshold_linear", **params)


def column_norms(weight: torch.Tensor, in_out: bool = False) -> torch.Tensor:
    """``||W[:, i]||_2`` per input channel i, in float32, for W stored [out, in] (``in_out``: [in, out])."""
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.detach().float(), dim=1 if in_out else 0).contiguous()


def _estimate(site: Site, form: ActivationThreshold, ctx) -> Estimate:
    m: FfnMatch = site.match
    sparsity = form.sparsity if form.sparsity is not None else ASSUMED_ACTIVATION_SPARSITY
    linears = [m.first] + ([m.up] if m.up is not None else []) + [m.down]
    return estimate_ffn([(lin.in_features, lin.out_features) for lin in linears],
                        tokens=site.attrs["tokens"], dtype=site.dtype, hw=ctx.hardware,
                        activation_sparsity=sparsity, mode=form.mode, symbolic_tokens=site.symbolic,
                        replayed=ctx.replayed)


# ---------------------------------------------------------------- replace

def _weight_node(graph, lin: LinearMatch):
    """The weight as [out, in], transposing Conv1D-style [in, out] storage."""
    w = lin.weight.node
    return graph.call_method("t", (w,)) if lin.in_out else w


def plan_ffn(site: Site, decision: Decision, ctx) -> Plan:
    """Input mode: one ``threshold_ffn`` call where the whole gated FFN runs the decode kernels (see
    :func:`_threshold_ffn_refusal`), else one ``threshold_linear`` call per thresholded projection (first, up,
    down; a projection without a threshold stays dense); gate mode: one ``gate_sparse_ffn`` call."""
    m: FfnMatch = site.match
    if decision.form.mode == "input":
        tau_input, tau_down = decision.params["tau_input"], decision.params["tau_down"]
        refusal = _threshold_ffn_refusal(site, decision, ctx)
        if refusal is None:
            args = ThresholdFfnArgs(act=m.act, tau_input=float(tau_input), tau_down=float(tau_down), impl=ctx.kernels)
            return Plan(calls=[op_call(THRESHOLD_FFN, args, site.device, site.symbolic)],
                        notes={"fusion": "gate, up, activation and down in one op (two launches)"},
                        state={"fused": True})
        plan = Plan(notes={"fusion": f"one op per projection: {refusal}"})
        roles = [("first", tau_input)]
        if m.up is not None:
            roles.append(("up", tau_input))
        roles.append(("down", tau_down))
        plan.state["roles"] = [role for role, tau in roles if tau is not None]
        for role, tau in roles:
            if tau is not None:
                plan.calls.append(op_call(THRESHOLD_LINEAR, ThresholdLinearArgs(tau=float(tau), impl=ctx.kernels),
                                          site.device, site.symbolic))
        return plan
    args = GateSparseFfnArgs(act=m.act, tau=float(decision.params["tau"]), impl=ctx.kernels)
    return Plan(calls=[op_call(GATE_SPARSE_FFN, args, site.device, site.symbolic)])


def _weighted(decision: Decision) -> bool:
    """Whether the decision's activation-threshold form scores with the weighted criterion."""
    return getattr(decision.form, "criterion", "magnitude") == "weighted"


def _threshold_ffn_refusal(site: Site, decision: Decision, ctx) -> Optional[str]:
    """Why an input-mode site does not run as one ``threshold_ffn`` op (None: it does).

    The fused op computes ``act(gate) * up`` itself, so it needs a gated FFN with a recognised activation and
    separate gate and up weights, and both thresholds; it is planned where its decode kernel runs (otherwise the
    per-projection ops give the same result, and Inductor compiles the activation between them).
    """
    m: FfnMatch = site.match
    if m.up is None:
        return "a fused gate_up weight" if m.fused_halves is not None else "a plain (ungated) FFN"
    if m.act is None:
        return "the activation between the projections is not one sparsecc recognises"
    if decision.params["tau_input"] is None or decision.params["tau_down"] is None:
        return "only one of the input and down thresholds is set"
    if not _runs_decode_kernel(ctx, site, "threshold_ffn"):
        return "the decode kernels do not run here (reference kernels, no CUDA, or more than " \
               f"{MAX_DECODE_TOKENS} or symbolic tokens)"
    weighted = _weighted(decision)
    most = FUSED_FFN_MAX_TOKENS_WEIGHTED if weighted else FUSED_FFN_MAX_TOKENS
    if site.attrs["tokens"] > most:
        criterion = "weighted criterion" if weighted else "magnitude criterion"
        return f"{site.attrs['tokens']} tokens: above {most} ({criterion}) the per-projection GEMVs measured " \
               "faster than the fused op (bench/RESULTS.md, bench/ffn_input.py)"
    return None


def replace_ffn(gm: GraphModule, site: Site, decision: Decision, ctx) -> None:
    """Input mode: one fused threshold_ffn op or thresholded linears; gate mode: one gate-sparse FFN op (as planned)."""
    m: FfnMatch = site.match
    graph = gm.graph
    plan: Plan = decision.plan
    weighted = _weighted(decision)
    if decision.form.mode == "input" and plan.state.get("fused"):
        call = plan.calls[0]
        with graph.inserting_before(m.down_node):
            weights = {role: _decode_weight_node(graph, ctx, site, lin, "threshold_ffn")
                       for role, lin in (("w_gate", m.first), ("w_up", m.up), ("w_down", m.down))}
            scales = {role: _bind_column_norms(ctx, lin) if weighted else None
                      for role, lin in (("scale_gate", m.first), ("scale_up", m.up), ("scale_down", m.down))}
            out = call.record.emit(graph, call.args, x=m.x, b_gate=m.first.bias, b_up=m.up.bias,
                                   b_down=m.down.bias, **weights, **scales)
        out.meta["nn_module_stack"] = m.down_node.meta.get("nn_module_stack", {})
        m.down_node.replace_all_uses_with(out)
        return
    if decision.form.mode == "input":
        projections = {"first": (m.first_node, m.first), "up": (m.up_node, m.up), "down": (m.down_node, m.down)}
        for role, call in zip(plan.state["roles"], plan.calls):
            node, lin = projections[role]
            with graph.inserting_before(node):
                out = call.record.emit(graph, call.args, x=lin.x,
                                       weight=_decode_weight_node(graph, ctx, site, lin, "threshold_linear"),
                                       bias=lin.bias, channel_scale=_bind_column_norms(ctx, lin) if weighted else None)
            out.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            node.replace_all_uses_with(out)
        return
    with graph.inserting_before(m.down_node):
        if m.fused_halves is not None:
            w = _weight_node(graph, m.first)
            half = m.first.out_features // 2
            gate_i, up_i = m.fused_halves
            w_gate = graph.call_function(operator.getitem, (w, slice(gate_i * half, (gate_i + 1) * half)))
            w_up = graph.call_function(operator.getitem, (w, slice(up_i * half, (up_i + 1) * half)))
            b = m.first.bias
            b_gate = graph.call_function(operator.getitem, (b, slice(gate_i * half, (gate_i + 1) * half))) if b else None
            b_up = graph.call_function(operator.getitem, (b, slice(up_i * half, (up_i + 1) * half))) if b else None
        else:
            w_gate, b_gate = _weight_node(graph, m.first), m.first.bias
            w_up = _weight_node(graph, m.up) if m.up is not None else None
            b_up = m.up.bias if m.up is not None else None
        call = plan.calls[0]
        out = call.record.emit(
            graph, call.args, x=m.x, w_gate=w_gate, b_gate=b_gate, w_up=w_up, b_up=b_up,
            w_down=_decode_weight_node(graph, ctx, site, m.down, "gate_sparse_ffn"), b_down=m.down.bias)
    out.meta["nn_module_stack"] = m.down_node.meta.get("nn_module_stack", {})
    m.down_node.replace_all_uses_with(out)


def k_major_copy(weight: torch.Tensor, in_out: bool = False) -> torch.Tensor:
    """The weight as a contiguous ``[in, out]`` buffer (K-major), detached, for the decode GEMVs."""
    with torch.no_grad():
        w = weight.detach()
        return (w if in_out else w.t()).contiguous()


def _bind_column_norms(ctx, lin: LinearMatch) -> Node:
    """``column_norms`` of ``lin``'s weight as a bound graph input (criterion "weighted")."""
    return ctx.bind_derived(lin.weight, lin.in_out, "column_norms", column_norms)


def _decode_weight_node(graph, ctx, site: Site, lin: LinearMatch, op: str):
    """The weight [out, in] for a decode GEMV that reads it K-major (input rows contiguous).

    Where the site's GEMV kernel will run (Triton kernels on this device, at
    most MAX_DECODE_TOKENS tokens), a K-major copy is bound once at compile time
    and its ``.t()`` view is passed, so the kernel neither transposes nor
    caches a copy per call. Conv1D-style ``[in, out]`` storage already is
    K-major. Elsewhere the plain weight is passed.
    """
    if lin.in_out or not _runs_decode_kernel(ctx, site, op):
        return _weight_node(graph, lin)
    return graph.call_method("t", (ctx.bind_derived(lin.weight, lin.in_out, "k_major", k_major_copy),))


def _runs_decode_kernel(ctx, site: Site, op: str) -> bool:
    """True when ``op`` will run its Triton GEMV at this site (kernels allowed, decode-sized, static tokens)."""
    tokens = site.attrs.get("tokens")
    return (ctx.kernels != "reference" and ctx.has_kernel(op, site.device) and isinstance(tokens, int)
            and 0 < tokens <= MAX_DECODE_TOKENS)


FFN_REWRITES = (
    Rewrite("ffn", "ffn", search_ffn, check_ffn, replace_ffn, plan_ffn),
)
