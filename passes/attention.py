"""Attention sites: search and replace (check: ``passes/attention_check.py``).

Two searches find attention however the model spells it:

* ``sdpa``: ``F.scaled_dot_product_attention`` with is_causal / attn_mask /
  scale / enable_gqa;
* ``softmax``: ``softmax(q @ kᵀ * scale + mask) @ v`` written by hand, with
  matmul / bmm / einsum / ``@``, masks by addition, ``masked_fill`` or
  ``where``, casts around the softmax and eval-mode dropout.

In both, GQA expansion of k/v (``repeat_interleave`` on the head dim, or the
``[:, :, None].expand(...).reshape(...)`` idiom) is peeled, so the sparse op
reads the un-repeated KV heads: query head h uses KV head h // (H // Hkv).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch.fx import GraphModule, Node

from sparsecc.passes.fx_utils import common_module, device_of, dtype_of, is_static, shape_of, size_hint
from sparsecc.codegen.attention_ops import (
    BLOCK_SPARSE_ATTENTION, DYNAMIC_BLOCK_ATTENTION, MIXED_HEAD_ATTENTION, STREAMING_ATTENTION,
    STREAMING_ATTENTION_FROM_MASK, BlockSparseAttentionArgs, DynamicAttentionArgs, MixedHeadArgs,
    StreamingAttentionArgs, StreamingFromMaskArgs)
from sparsecc.codegen.streaming_rules import streaming_runs_hopper_program
from sparsecc.forms import MASKED_LOGIT_MAX, Streaming
from sparsecc.passes.attention_check import DYNAMIC_FORMS, check_attention, site_facts
from sparsecc.passes.decide import head_spans
from sparsecc.passes.normalize import op_of
from sparsecc.passes.plan import Plan, op_call
from sparsecc.passes.site import Decision, Rewrite, Site, debug_no_match

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class MaskTerm:
    """One mask the model applies to the logits.

    ``node`` is a bool tensor (``keep=True`` means True takes part, as in SDPA;
    ``keep=False`` means True is filled out, as in masked_fill) or an additive
    float tensor (``additive=True``).
    """

    node: Node
    additive: bool
    keep: bool = True


@dataclass
class AttentionMatch:
    """Operands of a matched attention, in the layout the sparse op takes."""

    q: Node
    k: Node
    v: Node
    masks: List[MaskTerm]
    scale: Optional[float]          # None: 1/sqrt(head_dim)
    causal: bool
    folded_heads: bool              # 3-D (batch*heads, S, D) operands
    out_dtype: torch.dtype
    layout: Optional[tuple] = None  # permutation taking q/k/v as the model holds them to [B, H, S, D]
    out_perm: Optional[tuple] = None  # permutation taking the [B, H, Sq, D] result to the model's output layout


def permuted_shape(node: Node, perm: Optional[tuple]) -> Optional[tuple]:
    """The shape of ``node`` read through ``perm`` (None: as it is)."""
    shape = shape_of(node)
    if shape is None or perm is None:
        return shape
    return tuple(shape[p] for p in perm) if len(perm) == len(shape) else None


def _peel_repeat_kv(node: Node, head_axis: int = 1) -> Tuple[Node, int]:
    """Undo GQA expansion of the head axis: return (source with Hkv heads, n_rep).

    Spellings: ``repeat_interleave(n, dim=1)``, and a new axis after the head
    axis expanded and merged back: ``x[:, :, None].expand(...).reshape(...)``
    (or ``unsqueeze``) for ``[B, H, S, D]``, ``x[:, :, :, None]...`` for
    ``[B, S, H, D]``.
    """
    op = op_of(node)
    if op is not None and op.name == "repeat_kv" and head_axis == 1:
        return op.inputs[0], op.params["n_rep"]
    if op is None or op.name != "view":
        return node, 1
    expand = op.inputs[0]
    eop = op_of(expand)
    exp_shape, out_shape = shape_of(expand), shape_of(node)
    if eop is None or eop.name != "expand" or exp_shape is None or out_shape is None or len(exp_shape) != 5 \
            or len(out_shape) != 4 or not isinstance(exp_shape[head_axis + 1], int):
        return node, 1
    src = _new_axis_source(eop.inputs[0], head_axis + 1)
    src_shape = shape_of(src) if src is not None else None
    if src_shape is None or len(src_shape) != 4:
        return node, 1
    rep = exp_shape[head_axis + 1]
    merged = [d for i, d in enumerate(exp_shape) if i != head_axis + 1]
    if str(out_shape[head_axis]) != str(src_shape[head_axis] * rep) or any(
            str(a) != str(b) for i, (a, b) in enumerate(zip(out_shape, merged)) if i != head_axis):
        return node, 1
    return src, rep


def _new_axis_source(node: Node, axis: int) -> Optional[Node]:
    """The tensor ``node`` adds a length-1 axis to at ``axis`` (by ``x[..., None, ...]`` or ``unsqueeze``)."""
    if node.op == "call_method" and node.target == "unsqueeze" and len(node.args) == 2:
        src = node.args[0]
        value = shape_of(src)
        return src if value is not None and node.args[1] in (axis, axis - len(value) - 1) else None
    index = op_of(node)
    if index is None or index.name != "getitem":
        return None
    idx = index.params["index"]
    if not (isinstance(idx, tuple) and len(idx) > axis and idx[axis] is None):
        return None
    if all(i == slice(None) for i in idx[:axis]) and all(i == slice(None) or i is Ellipsis for i in idx[axis + 1:]):
        return index.inputs[0]
    return None


@dataclass(frozen=True)
class _ProbabilityPath:
    """How a softmax's probabilities reach their P @ V matmul."""

    pv: Node
    branched: bool   # a node on the way (the softmax included) also feeds something else
    sliced: bool     # every P @ V reached is behind a slice of the last axis (attention sinks' extra logits)
    dropout: Optional[float]   # the p of a training-mode dropout on the way to every P @ V reached, else None


def _path_to_pv(softmax: Node) -> Optional[_ProbabilityPath]:
    """Walk from a softmax through casts, dropout and at most one slice of its last axis to ``P @ V``.

    Every branch is followed to its end, so probabilities that are also returned still lead to their matmul, and
    the answer does not depend on the order of the users: a matmul reached without a slice or a training-mode
    dropout is preferred, and the path counts as sliced (dropped out) only when every matmul reached is behind
    one. It branched when any node walked has another user (on an unbranched path those are exactly the path's
    nodes). None when no ``@ v`` matmul is reached (a router, a classifier).
    """
    frontier, branched, reached = [(softmax, False, None)], False, []
    while frontier:
        cur, sliced, dropout = frontier.pop()
        branched |= len(cur.users) > 1
        for user in cur.users:
            op = op_of(user)
            if op is None or not op.inputs or op.inputs[0] is not cur:
                continue
            if op.name in ("cast", "identity"):
                frontier.append((user, sliced, dropout))
            elif op.name == "dropout" and dropout is None:
                frontier.append((user, sliced, op.params["p"]))
            elif not sliced and _is_last_axis_slice(op, cur):
                frontier.append((user, True, dropout))
            elif _is_pv(op, cur):
                reached.append((sliced, dropout is not None, dropout, user))
    if not reached:
        return None
    sliced, _, dropout, pv = min(reached, key=lambda r: r[:2])   # the plainest matmul, else the first one found
    return _ProbabilityPath(pv, branched, sliced, dropout)


def _is_pv(op, probs: Node) -> bool:
    """True when ``op`` is ``probs @ v``: a matmul taking the probabilities, untransposed, as its left operand."""
    return (op.name == "matmul" and op.inputs[0] is probs and not op.params["transpose_rhs"]
            and op.params.get("lhs_perm") is None)


def _is_last_axis_slice(op, src: Node) -> bool:
    """True when ``op`` is ``src[..., a:b]``: a proper slice of the last axis and nothing else."""
    if op.name != "getitem" or op.inputs[0] is not src:
        return False
    index = op.params["index"]
    index = index if isinstance(index, tuple) else (index,)
    shape = shape_of(src)
    last_axis = bool(index) and (index[0] is Ellipsis or (shape is not None and len(index) == len(shape)))
    return (last_axis and isinstance(index[-1], slice) and index[-1] != slice(None)
            and all(i is Ellipsis or i == slice(None) for i in index[:-1]))


SLICED_SOFTMAX = ("the softmax runs over more logits than the keys and drops some before P @ V (e.g. attention "
                  "sinks: a learned logit per head beside the keys); no sparse form keeps that normalisation")
PROBABILITIES_USED_ELSEWHERE = ("the attention probabilities are also used outside P @ V (e.g. returned, as with "
                                "output_attentions=True), so they must be computed in full")
LOGITS_NOT_QK = "the logits are not q @ kᵀ with only scale / mask / cast steps"
LOGITS_USED_ELSEWHERE = ("the logits the softmax reads are also used outside it (e.g. a logsumexp that scales the "
                         "output for a learned per-head sink), so they must be computed over every key")


def _path_refusal(softmax_op, path: _ProbabilityPath) -> Optional[str]:
    """Why a softmax whose path to P @ V slices, drops out or branches cannot be rewritten (every reason), else
    None.

    Logits that are not q @ kᵀ are named first when the path branches or drops out: a softmax that is not
    attention at all (a soft quantiser whose weights meet a matmul and something else) then reads as such. Sliced
    logits are not q @ kᵀ by construction (the extra logits are concatenated), so the slice alone is named.
    """
    reasons = []
    if path.sliced:
        reasons.append(SLICED_SOFTMAX)
    elif path.branched or path.dropout is not None:
        peeled = _peel_logits(softmax_op.inputs[0], [])
        if isinstance(peeled, str):
            reasons.append(f"{LOGITS_NOT_QK}: {peeled}")
    if path.dropout is not None:
        reasons.append(f"training-mode dropout (p={path.dropout!r}) between the softmax and P @ V: no sparse form "
                       "draws its random mask (compile the model in eval mode)")
    if path.branched:
        reasons.append(PROBABILITIES_USED_ELSEWHERE)
    return "; ".join(reasons) or None


def _peel_logits(node: Node, nodes: List[Node]) -> Union[Tuple[Node, float, List[MaskTerm]], str]:
    """Walk back from the softmax input to the q @ kᵀ matmul; collect scale and masks.

    Returns (matmul node, scale, masks), or why the walk stopped (the step that is not a scale, mask or cast).
    """
    cur, scale, masks = node, 1.0, []
    seen_scale = False   # walking backwards: a scale seen before an additive mask would scale that mask
    while True:
        op = op_of(cur)
        if op is None or op.name not in _LOGIT_STEPS:
            return _not_a_logit_step(cur)
        nodes.append(cur)
        if op.name == "matmul":
            return cur, scale, masks
        if len(cur.users) != 1 and cur is not node:
            return f"an intermediate step ({_step_name(cur)}) is also used outside the attention"
        if op.name in ("cast", "identity"):
            cur = op.inputs[0]
        elif op.name == "scale":
            if op.params["factor"] <= 0:
                return f"they are scaled by {op.params['factor']:g}, which is not positive"
            seen_scale = True
            scale *= op.params["factor"]
            cur = op.inputs[0]
        elif op.name == "masked_fill":
            value = op.params.get("value")
            if value is None or value > MASKED_LOGIT_MAX:
                return f"a masked_fill writes {value!r}, which is not a masking value (-inf or a large negative one)"
            masks.append(MaskTerm(op.inputs[1], additive=False, keep=not op.params["fill_where"]))
            cur = op.inputs[0]
        elif op.name == "add":
            a, b = op.inputs
            logits_side = _logits_operand(a, b)
            if logits_side is None:   # name the step that stops the walk on the logits' side, not the mask's
                stops = [_walk_logit_steps(a), _walk_logit_steps(b)]
                return _not_a_logit_step(max(stops, key=lambda w: (_has_matmul_above(w[1]), w[0]))[1])
            other = b if logits_side is a else a
            if dtype_of(other) == torch.bool:
                return "a boolean tensor is added to them (a mask is applied with masked_fill or where, not added)"
            if seen_scale:
                return "a term is added before they are scaled, so the scale would apply to it too"
            masks.append(MaskTerm(other, additive=True))
            cur = logits_side


_LOGIT_STEPS = ("matmul", "cast", "identity", "scale", "masked_fill", "add")


def _walk_logit_steps(node: Node) -> Tuple[int, Node]:
    """(steps, node) where a walk back through scale / mask / cast steps (an add's first operand) stops."""
    steps, op = 0, op_of(node)
    while op is not None and op.name in _LOGIT_STEPS and op.name != "matmul" and steps < 16:
        node, steps, op = op.inputs[0], steps + 1, op_of(op.inputs[0])
    return steps, node


def _has_matmul_above(node: Node, depth: int = 6) -> bool:
    """Whether a matmul feeds ``node`` within ``depth`` steps (the logits' side of a sum, as opposed to a mask's)."""
    frontier, seen = [node], set()
    for _ in range(depth):
        frontier = [i for n in frontier for i in n.all_input_nodes if i not in seen]
        seen.update(frontier)
        if any((op_of(n) is not None and op_of(n).name == "matmul") for n in frontier):
            return True
    return False


def _not_a_logit_step(node: Node) -> str:
    return (f"they pass through {_step_name(node)}, which is not a scale, mask or cast (e.g. a tanh soft-cap, a "
            "learned temperature)")


def _step_name(node: Node) -> str:
    """A graph node as a reason names it: its function, method or module name (``tanh``, ``mul``)."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _logits_operand(a: Node, b: Node) -> Optional[Node]:
    """Which operand of an add carries the logits: the one that leads back to a matmul."""
    for cand in (a, b):
        cur = cand
        for _ in range(8):  # logits chains are short; this bounds the walk
            op = op_of(cur)
            if op is None:
                break
            if op.name == "matmul":
                return cand
            if op.name in ("cast", "identity", "scale", "masked_fill", "add"):
                cur = op.inputs[0] if op.name != "add" else (_logits_operand(*op.inputs) or op.inputs[0])
                continue
            break
    return None


def _check_operands(q: Node, k: Node, v: Node, n_rep_k: int, n_rep_v: int, layout: Optional[tuple] = None) -> str:
    qs, ks, vs = (permuted_shape(t, layout) for t in (q, k, v))
    if qs is None or ks is None or vs is None:
        return "operand shapes are unknown"
    if not (len(qs) == len(ks) == len(vs)) or len(qs) not in (3, 4):
        return f"operands are not 3-D or 4-D alike (q {len(qs)}-D, k {len(ks)}-D, v {len(vs)}-D)"
    if n_rep_k != n_rep_v:
        return "k and v are repeated differently for GQA"
    dt = dtype_of(q)
    if dt not in SUPPORTED_DTYPES or dtype_of(k) != dt or dtype_of(v) != dt:
        return f"unsupported or mixed dtypes ({dt}, {dtype_of(k)}, {dtype_of(v)})"
    return ""


def search_sdpa(gm: GraphModule, ctx) -> List[Site]:
    """Find ``F.scaled_dot_product_attention`` calls."""
    sites = []
    for node in gm.graph.nodes:
        op = op_of(node)
        if op is None or op.name != "sdpa":
            continue
        q, k, v, mask = op.inputs
        dropout = op.params["dropout_p"]
        if not (isinstance(dropout, (int, float)) and dropout == 0):
            why = f"dropout_p={dropout!r} (only 0 is supported)"
            debug_no_match("attention", node, why)
            sites.append(_refused_site(node, why, "sdpa"))
            continue
        k0, rk = _peel_repeat_kv(k)
        v0, rv = _peel_repeat_kv(v)
        why = _check_operands(q, k0, v0, rk, rv)
        if why:
            debug_no_match("attention", node, why)
            sites.append(_refused_site(node, why, "sdpa"))
            continue
        masks = []
        if isinstance(mask, Node):
            masks.append(MaskTerm(mask, additive=dtype_of(mask) != torch.bool, keep=True))
        scale = op.params["scale"]
        if isinstance(scale, Node):
            # Dynamo passes a float attribute it saw change between compiles as a graph value; Inductor's
            # lowering then asks Dynamo to retrace with the float fixed, and that graph is matched again.
            why = "the softmax scale is a run-time value, not a constant (a Python float Dynamo did not specialise)"
            debug_no_match("attention", node, why)
            sites.append(_refused_site(node, why, "sdpa"))
            continue
        match = AttentionMatch(q, k0, v0, masks, float(scale) if scale is not None else None,
                               bool(op.params["is_causal"]), len(shape_of(q)) == 3, dtype_of(node))
        sites.append(_make_site(node, (node,), match, "sdpa", ctx))
    return sites


def search_softmax(gm: GraphModule, ctx) -> List[Site]:
    """Find hand-written ``softmax(q @ kᵀ * scale + mask) @ v`` attention, in any einsum axis order.

    A softmax whose result feeds ``@ v`` but whose logits are not a plain
    ``q @ kᵀ`` with scale / mask / cast steps (a tanh soft-cap, a learned
    temperature, an intermediate used elsewhere), or whose probabilities are
    also used outside ``@ v``, is still reported, as a refused site with the
    reason.
    """
    sites = []
    for node in gm.graph.nodes:
        op = op_of(node)
        if op is None or op.name != "softmax":
            continue
        path = _path_to_pv(node)
        if path is None:
            debug_no_match("attention", node, "softmax output is not consumed by a matmul with v")
            continue
        why = _path_refusal(op, path)
        if why:   # recognisably attention (or shaped like it): a site refused with its reasons
            debug_no_match("attention", node, why)
            sites.append(_refused_site(path.pv, why, "softmax"))
            continue
        pv = path.pv
        matched = _match_softmax(node, op, pv)
        if isinstance(matched, str):
            debug_no_match("attention", node, matched)
            sites.append(_refused_site(pv, matched, "softmax"))
            continue
        site_nodes, match = matched
        sites.append(_make_site(pv, site_nodes, match, "softmax", ctx))
    return sites


def _match_softmax(node: Node, op, pv: Node):
    """(site nodes, AttentionMatch) for one softmax -> P @ V candidate, or the reason it is refused."""
    chain: List[Node] = []
    if any(user is not node for user in op.inputs[0].users):
        # A sparse form would change the softmax and leave the other reader on every key's logits.
        return LOGITS_USED_ELSEWHERE
    peeled = _peel_logits(op.inputs[0], chain)
    if isinstance(peeled, str):
        return f"{LOGITS_NOT_QK}: {peeled}"
    qk, scale, masks = peeled
    if len(qk.users) != 1:
        return "the q @ kᵀ product is used elsewhere"
    qk_op, pv_op = op_of(qk), op_of(pv)
    if qk_op.params.get("out_perm") is not None:
        return "the q @ kᵀ product is not laid out [..., query, key]"
    q, kt = qk_op.inputs
    if qk_op.params["transpose_rhs"]:
        k, k_perm = kt, qk_op.params.get("rhs_perm")
    else:
        t_op = op_of(kt)
        if t_op is None or t_op.name != "transpose" or qk_op.params.get("rhs_perm") is not None:
            return "the right operand of q @ k is not a transposed k"
        k, k_perm = t_op.inputs[0], None
    q_perm, v, v_perm = qk_op.params.get("lhs_perm"), pv_op.inputs[1], pv_op.params.get("rhs_perm")
    if not (q_perm == k_perm == v_perm):
        return f"q, k and v are read in different axis orders ({q_perm}, {k_perm}, {v_perm})"
    head_axis = q_perm[1] if q_perm is not None else 1
    k0, rk = _peel_repeat_kv(k, head_axis)
    v0, rv = _peel_repeat_kv(v, head_axis)
    why = _check_operands(q, k0, v0, rk, rv, q_perm)
    if why:
        return why
    site_nodes = tuple(chain) + (node,) + _between(node, pv)
    match = AttentionMatch(q, k0, v0, masks, scale, False, len(shape_of(q)) == 3, dtype_of(pv),
                           layout=q_perm, out_perm=pv_op.params.get("out_perm"))
    return site_nodes, match


def _refused_site(output: Node, why: str, spelling: str) -> Site:
    """A candidate the matcher cannot rewrite: reported with its reason, never replaced."""
    return Site("attention", common_module((output,)), output, (), {}, dtype_of(output) or torch.float32,
                device_of(output) or torch.device("cpu"), {"refused": why}, None, spelling)


def _between(start: Node, end: Node) -> Tuple[Node, ...]:
    out, cur = [], start
    while cur is not end:
        cur = next(iter(cur.users))
        out.append(cur)
    return tuple(out)


def _make_site(output: Node, nodes, match: AttentionMatch, spelling: str, ctx) -> Site:
    qs, ks = permuted_shape(match.q, match.layout), permuted_shape(match.k, match.layout)
    if match.folded_heads:
        batch, heads, kv_heads = 1, qs[0], ks[0]
        sq, sk, dim = qs[1], ks[1], qs[2]
    else:
        batch, heads, sq, dim = qs
        kv_heads, sk = ks[1], ks[2]
    module = common_module(nodes)
    shapes = {name: tuple(size_hint(d) for d in permuted_shape(t, match.layout))
              for name, t in (("q", match.q), ("k", match.k), ("v", match.v))}
    attrs = {
        "batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": sq, "seq_k": sk, "head_dim": dim,
        "causal": match.causal, "scale": match.scale if match.scale is not None else 1.0 / math.sqrt(size_hint(dim)),
        "masks": len(match.masks), "gqa_groups": size_hint(heads) // max(1, size_hint(kv_heads)),
        "folded_heads": match.folded_heads,
    }
    if match.layout is not None:
        attrs["layout"] = "".join("bhsd"[match.layout.index(i)] for i in range(4))   # e.g. "bshd"
    symbolic = not all(is_static(shape_of(n)) for n in (match.q, match.k))
    return Site("attention", module, output, tuple(nodes), shapes, match.out_dtype,
                device_of(match.q) or torch.device("cpu"), attrs, match, spelling, symbolic)



# ---------------------------------------------------------------- replace

def replace_attention(gm: GraphModule, site: Site, decision: Decision, ctx) -> None:
    """Swap the site's computation for one ``torch.ops.sparsecc`` attention op."""
    m: AttentionMatch = site.match
    graph = gm.graph
    with graph.inserting_before(site.output):
        q, k, v = m.q, m.k, m.v
        if m.layout is not None:
            q, k, v = (graph.call_method("permute", (t, *m.layout)) for t in (q, k, v))
        if m.folded_heads:
            q, k, v = (graph.call_method("unsqueeze", (t, 0)) for t in (q, k, v))
        mask = _combine_masks(graph, m.masks)
        if mask is not None and m.folded_heads:
            mask = graph.call_method("unsqueeze", (mask, 0))
        call = decision.plan.calls[0]
        out = call.record.emit(graph, call.args, q=q, k=k, v=v, mask=mask)
        if m.folded_heads:
            out = graph.call_method("squeeze", (out, 0))
        if m.out_perm is not None:
            out = graph.call_method("permute", (out, *m.out_perm))
        if m.out_dtype != dtype_of(m.q):
            out = graph.call_method("to", (out, m.out_dtype))
    out.meta["nn_module_stack"] = site.output.meta.get("nn_module_stack", {})
    site.output.replace_all_uses_with(out)


def plan_attention(site: Site, decision: Decision, ctx) -> Plan:
    """The one op call that runs a decided site, and how it is launched."""
    record, args = attention_call(decision, float(site.attrs["scale"]), site.match.causal, ctx.kernels)
    plan = Plan(calls=[op_call(record, args, site.device, site.symbolic)])
    # check asked the kernels' rules which program the site's op runs (Decision.program); a mixed op's streaming
    # groups each run through the streaming op, asked here per group
    if decision.program == "sm90" and record is STREAMING_ATTENTION:
        plan.notes["sm_90 prefill"] = "the Gluon program (codegen/hopper_prefill.py), one opaque call"
    elif decision.program == "sm90" and record is BLOCK_SPARSE_ATTENTION:
        plan.notes["sm_90 prefill"] = ("the Gluon program over the block table (codegen/hopper_prefill.py), "
                                       "inside the opaque block-table op")
    elif record is MIXED_HEAD_ATTENTION and args.impl != "reference":
        heads = _mixed_hopper_prefill_heads(site, args, decision.params["head_table"])
        if heads is not None:
            plan.notes["sm_90 prefill"] = (f"the Gluon program (codegen/hopper_prefill.py) for heads {heads}, one "
                                           "launch per streaming group inside the mixed op")
    return plan


def _mixed_hopper_prefill_heads(site: Site, args, head_table) -> Optional[str]:
    """The model's heads (as spans, ``"0-1, 5"``) of a mixed site's streaming groups that run the Gluon program for
    sm_90 at its shapes, or None: a table that no one-launch family runs sends each group through the streaming op.
    The kernel wrapper's own rule, ``streaming_runs_hopper_program``, asked with the site's facts (a symbolic length
    answers no)."""
    if head_table.launch_family(args.causal) is not None:
        return None
    facts = site_facts(site)
    rule = dict(scale=args.scale, causal=args.causal, masked=bool(site.match.masks), return_lse=False)
    heads = [h + args.head_offset for form, members in head_table.groups().items()
             if isinstance(form, Streaming)
             and streaming_runs_hopper_program(*facts, sinks=[form.sink] * len(members),
                                               windows=[form.window] * len(members), **rule)
             for h in members]
    return head_spans(sorted(heads)) if heads else None


def attention_call(decision: Decision, scale: float, causal: bool, impl: str):
    """(op record, typed arguments) of the attention op that runs a decided site."""
    params = decision.params
    # Run-time dense branches every attention op takes (codegen/attention_ops.py, runs_dense).
    dense = {"dense_below": params.get("dense_below", 0), "own_window": params.get("own_window", 0)}
    from_mask = params.get("anchor") == "mask"
    if "head_table" in params:
        return MIXED_HEAD_ATTENTION, MixedHeadArgs.of(params["head_table"], scale=scale, causal=causal, impl=impl,
                                                      positions_from_mask=from_mask,
                                                      head_offset=params.get("head_offset", 0), **dense)
    if isinstance(decision.form, DYNAMIC_FORMS):
        return DYNAMIC_BLOCK_ATTENTION, DynamicAttentionArgs.of(decision.form, scale=scale, causal=causal,
                                                                impl=impl, positions_from_mask=from_mask, **dense)
    if isinstance(decision.form, Streaming) and from_mask:
        return STREAMING_ATTENTION_FROM_MASK, StreamingFromMaskArgs(
            scale=scale, sink=tuple(params["sink"]), window=tuple(params["window"]), impl=impl, **dense)
    if isinstance(decision.form, Streaming):
        return STREAMING_ATTENTION, StreamingAttentionArgs(
            scale=scale, causal=causal, sink=tuple(params["sink"]), window=tuple(params["window"]), impl=impl,
            **dense)
    return BLOCK_SPARSE_ATTENTION, BlockSparseAttentionArgs.of(
        decision.form, scale=scale, causal=causal, dense_heads=tuple(params["dense_heads"]), impl=impl,
        positions_from_mask=from_mask, head_offset=params.get("head_offset", 0), **dense)


def _combine_masks(graph, masks: List[MaskTerm]):
    """One mask for the op: bool (True takes part) when all masks are boolean, else additive float."""
    if not masks:
        return None
    keep = None
    for term in masks:
        if term.additive:
            continue
        b = term.node if term.keep else graph.call_function(torch.logical_not, (term.node,))
        keep = b if keep is None else graph.call_function(torch.logical_and, (keep, b))
    additive = [t.node for t in masks if t.additive]
    if not additive:
        return keep
    bias = additive[0]
    for extra in additive[1:]:
        bias = graph.call_function(operator.add, (bias, extra))
    if keep is not None:
        bias = graph.call_method("masked_fill", (bias, graph.call_function(torch.logical_not, (keep,)),
                                                 float("-inf")))
    return bias


ATTENTION_REWRITES = (
    Rewrite("sdpa", "attention", search_sdpa, check_attention, replace_attention, plan_attention),
    Rewrite("softmax", "attention", search_softmax, check_attention, replace_attention, plan_attention),
)
