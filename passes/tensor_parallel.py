"""Tensor-parallel graphs: sharded linears made local, and what each rank holds of every site.

A model parallelised with ``torch.distributed.tensor.parallel.parallelize_module`` (column-wise q/k/v/gate/up,
row-wise o/down, as in PyTorch's TP tutorial and HF's Llama plan) reaches the backend with DTensor weights and,
around every sharded linear, the plan's hooks: ``from_local`` on its input, ``redistribute`` and ``to_local`` on
its output. Between the projections the model computes on plain local tensors: the attention sees this rank's
heads only, because the model views the projection output as ``(..., -1, head_dim)``.

Two stages handle it (docs/distributed.md):

* ``localize`` (before match) rewrites each sharded linear whose local product is this rank's part of its output
  (column-wise: replicated input, weight sharded on its output dim; row-wise: input and weight sharded alike on
  the input dim) into ``F.linear(local input, weight.to_local())`` wrapped back into the same DTensor
  (``from_local`` with the dense linear's placements, global shape and stride), and drops the then empty round
  trip ``to_local(redistribute(from_local(y, P), P))``. The values are the same; the graph now spells the
  model as one rank computes it, so the usual searches find its attention, FFN and linear sites with local
  shapes, and the cost model sees the shapes a rank runs. The weight's ``to_local`` node becomes a parameter
  reference of the DTensor parameter, so compression prunes with the unsharded semantics
  (``sparsecc.weights.compress_shard``) and bindings follow the parameter.
* ``shard`` (after match) records per site what this rank holds: the global heads of an attention (read from
  the sharding of its q/k/v projections; a spec's head indices are global), the placements of a linear. A
  site whose sharding cannot be established gets ``attrs[REFUSED]``, a reason; decide keeps it dense with it.

No communication is added or removed: the reductions of the plan's hooks stay where they were.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

from sparsecc.passes.fx_utils import ParamRef, size_hint
from sparsecc.passes.normalize import META_KEY, canonical, op_of
from sparsecc.passes.site import Site
from sparsecc.sharding import ShardInfo, format_span, head_span, is_dtensor, shard_of

log = logging.getLogger("sparsecc")

# Site attribute holding why a site's sharding cannot be established (the site then stays dense).
REFUSED = "sharding_refused"
# How far back from q / k / v the search for their projection looks (nodes visited), so it stays local.
_MAX_WALK = 256
_LINEAR_OPS = ("linear", "addmm", "matmul")


def refused(site: Site) -> Optional[str]:
    """Why ``site`` stays dense because of its sharding (None when nothing prevents it)."""
    return site.attrs.get(REFUSED)


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None


def _is_call(node, name: str) -> bool:
    return isinstance(node, Node) and (
        (node.op == "call_method" and node.target == name)
        or (node.op == "call_function" and getattr(node.target, "__name__", "") == name))


# ---------------------------------------------------------------- localize (before match)

def localize(gm: GraphModule, ctx) -> int:
    """Rewrite the sharded linears of a tensor-parallel graph into local linears (see the module docstring).

    Returns how many were rewritten; registers the weights' ``to_local`` nodes in ``ctx.params``, the model's
    own ones too (transformers' ``tp_plan`` computes ``F.linear(x, weight.to_local())`` itself).
    """
    for node in list(gm.graph.nodes):
        ref = ctx.params.get(node.args[0]) if _is_call(node, "to_local") and node.args else None
        if ref is not None and is_dtensor(ref.tensor):
            ctx.params[node] = dataclasses.replace(ref, node=node)
    count = 0
    for node in list(gm.graph.nodes):
        try:
            kind = _local_kind(node, ctx)
        except Exception as err:  # noqa: BLE001 - an unreadable linear is left as it is (shard keeps it dense)
            log.warning("sparsecc: %s not made local: %r", node.name, err)
            continue
        if kind is not None:
            _localize_linear(gm.graph, node, kind, ctx)
            count += 1
    if count:
        _drop_round_trips(gm.graph)
        gm.graph.eliminate_dead_code(is_impure_node=_impure)
        gm.recompile()
    return count


def _impure(node: Node) -> bool:
    # Only the nodes this pass orphaned may go (dead from_local/to_local calls); keep the rest as it was.
    return not (_is_call(node, "from_local") or _is_call(node, "to_local") or _is_call(node, "redistribute"))


def _local_kind(node: Node, ctx) -> Optional[str]:
    """"column-wise" or "row-wise" when ``node`` is ``F.linear(from_local(h), W)`` with a DTensor parameter W,
    no bias, whose local product ``h @ W.to_local().T`` is this rank's part of the DTensor it produces."""
    op = op_of(node)
    if op is None or op.name != "linear" or node.op != "call_function":
        return None
    x, w, b = op.inputs
    ref = ctx.params.get(w)
    if b is not None or ref is None or not is_dtensor(ref.tensor) or not _is_call(x, "from_local"):
        return None
    wi, xi, yi = shard_of(ref.tensor), shard_of(_value(x)), shard_of(_value(node))
    if wi is None or xi is None or yi is None or not (wi.supported and xi.supported) or xi.partial:
        return None
    x_last, y_last = len(xi.global_shape) - 1, len(yi.global_shape) - 1
    if wi.dim == 0 and xi.dim is None and yi.dim == y_last and not yi.partial:
        return "column-wise"
    if wi.dim == 1 and xi.dim == x_last and yi.partial and xi.offset[x_last] == wi.offset[1] \
            and xi.local_shape[x_last] == wi.local_shape[1]:
        return "row-wise"
    return None


def _localize_linear(graph, node: Node, kind: str, ctx) -> None:
    x, w = node.args[0], node.args[1]
    local_x, mesh = x.args[0], x.args[1] if len(x.args) > 1 else x.kwargs["device_mesh"]
    produced = _value(node)
    meta = {k: v for k, v in node.meta.items() if k not in ("example_value", "val", META_KEY)}
    kwargs = {"run_check": False}
    if all(isinstance(d, int) for d in produced.shape):
        kwargs.update(shape=tuple(produced.shape), stride=tuple(produced.stride()))
    with graph.inserting_before(node):
        w_local = graph.call_method("to_local", (w,))
        linear = graph.call_function(torch.nn.functional.linear, (local_x, w_local, None))
        wrapped = graph.call_function(x.target, (linear, mesh, tuple(produced.placements)), kwargs)
    for new, value in ((w_local, _value(w)._local_tensor), (linear, produced._local_tensor), (wrapped, produced)):
        new.meta.update(meta)
        new.meta["example_value"] = value
    ref: ParamRef = ctx.params[w]
    ctx.params[w_local] = dataclasses.replace(ref, node=w_local)
    _redirect(node, wrapped)
    graph.erase_node(node)


def _redirect(old: Node, new: Node) -> None:
    """Point ``old``'s users at ``new`` and classify them again (normalize cached their operands)."""
    users = list(old.users)
    old.replace_all_uses_with(new)
    for user in users:
        user.meta[META_KEY] = canonical(user)


def _placements(placements, ndim: int) -> Tuple[str, ...]:
    """Placements as text with Shard dims made non-negative (Shard(-1) == Shard(ndim - 1))."""
    from torch.distributed.tensor.placement_types import Shard
    return tuple(f"S({p.dim % ndim})" if isinstance(p, Shard) else str(p) for p in placements)


def _drop_round_trips(graph) -> None:
    """``to_local(redistribute(from_local(y, mesh, P), P))`` is ``y``: read ``y`` directly, so an FFN's
    activation and gating multiply sit right after its local projections, as in an unsharded model."""
    for node in list(graph.nodes):
        if not _is_call(node, "to_local") or not _is_call(node.args[0], "redistribute"):
            continue
        redist = node.args[0]
        wrapped = redist.args[0]
        if not _is_call(wrapped, "from_local") or len(redist.users) != 1 or len(wrapped.users) != 1:
            continue
        target = redist.kwargs.get("placements", redist.args[2] if len(redist.args) > 2 else None)
        value = _value(wrapped)
        if target is None or value is None or len(target) != len(value.placements):
            continue
        if _placements(target, value.ndim) == _placements(value.placements, value.ndim):
            _redirect(node, wrapped.args[0])


# ---------------------------------------------------------------- shard (after match)

def annotate_sharding(gm: GraphModule, ctx) -> None:
    """Record what this rank holds of every site (a no-op for a model without DTensors)."""
    for site in ctx.sites:
        try:
            if site.kind == "linear":
                _annotate_linear(site)
            elif site.kind == "attention":
                _annotate_attention(site, ctx)
            else:
                _annotate_ffn(site, ctx)
        except ValueError as err:
            site.attrs[REFUSED] = f"tensor parallel: {err}"
        except Exception as err:  # noqa: BLE001 - a site whose sharding cannot be read stays dense, never a crash
            site.attrs[REFUSED] = f"tensor parallel: the sharding could not be read ({err!r})"


def _is_local(ref: ParamRef) -> bool:
    """True when the graph reads the weight as ``weight.to_local()``: the linear computes on this rank's shard
    with plain tensors (after localize, or as the model wrote it), so a sparse op on the same tensors is exact."""
    return _is_call(ref.node, "to_local")


def _annotate_linear(site: Site) -> None:
    ref = site.match.weight
    info = shard_of(ref.tensor)
    if info is None:
        return
    if not _is_local(ref):
        raise ValueError(f"the weight {ref.qualname} is a DTensor placed {info.placements} in a linear that is "
                         "neither column-wise (replicated input, weight sharded on dim 0) nor row-wise (input "
                         "and weight sharded on the input dim) without a bias")
    out_dim = 1 if site.match.in_out else 0
    kind = "replicated" if info.dim is None else ("column-wise" if info.dim == out_dim else "row-wise")
    site.attrs.update(tp_rank=f"{info.rank}/{info.world}", tp_linear=kind, tp_weight=info.placements,
                      global_weight="x".join(str(d) for d in info.global_shape))
    if info.dim is not None and info.global_shape[info.dim] % info.world:
        # Uneven shards would let ranks decide differently, and a weight form's compression gathers the weight
        # (a collective) on the ranks that apply it only: every rank must reach the same decision.
        raise ValueError(f"the weight's dim {info.dim} ({info.global_shape[info.dim]}) is not divisible by the "
                         f"{info.world} ranks; uneven shards are not supported")


def _annotate_attention(site: Site, ctx) -> None:
    m = site.match
    if m is None:
        return
    for name in ("q", "k", "v"):
        if is_dtensor(_value(getattr(m, name))):
            raise ValueError(f"the attention's {name} is a DTensor; sparsecc's attention ops take the local "
                             "heads (the plan's use_local_output=True, as in parallelize_module's defaults)")
    spans = {name: _projection_features(getattr(m, name), name, ctx) for name in ("q", "k", "v")}
    if all(s is None for s in spans.values()):
        return
    missing = [name for name, s in spans.items() if s is None]
    if missing:
        raise ValueError(f"the projections of {', '.join(missing)} are not sharded while the others are; which "
                         "global heads this rank holds cannot be established")
    if m.folded_heads:
        raise ValueError("heads are folded into the batch dimension (3-D attention); which global heads this "
                         "rank holds cannot be established")
    a = site.attrs
    dim, heads, kv_heads = size_hint(a["head_dim"]), size_hint(a["heads"]), size_hint(a["kv_heads"])
    q0, total = head_span(*spans["q"][:3], head_dim=dim, local_heads=heads)
    k0, total_kv = head_span(*spans["k"][:3], head_dim=dim, local_heads=kv_heads)
    if head_span(*spans["v"][:3], head_dim=dim, local_heads=kv_heads) != (k0, total_kv):
        raise ValueError("k and v hold different KV heads on this rank")
    # GQA: global query head h reads global KV head h // group; the local op pairs local heads the same way,
    # which is right only when this rank's query heads are exactly the groups of its KV heads.
    group = total // total_kv if total_kv and total % total_kv == 0 else 0
    if not group or heads != kv_heads * group or q0 != k0 * group:
        raise ValueError(f"this rank holds query heads {format_span(q0, heads)} of {total} and KV heads "
                         f"{format_span(k0, kv_heads)} of {total_kv}, which are not the same GQA groups")
    a.update(tp_rank=spans["q"][3], head_offset=q0, global_heads=total, kv_head_offset=k0,
             global_kv_heads=total_kv, holds_heads=format_span(q0, heads), holds_kv_heads=format_span(k0, kv_heads))


def _projection_features(node: Node, name: str, ctx) -> Optional[Tuple[int, int, int, str]]:
    """(first global feature, local features, global features, "rank/world") of the projection that ``node``
    (q, k or v) is a view of, when that projection is sharded; None when it is not.

    Walks back from ``node`` to the nearest linear or ``to_local()`` (a plan hook the localize stage left),
    not past graph inputs. The linear's weight, or the DTensor the ``to_local`` reads, says which output
    features this rank computes. Raises ``ValueError`` when several sharded sources are found.
    """
    found: List[Tuple[int, int, int, str]] = []
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if len(seen) > _MAX_WALK:
            raise ValueError(f"the projection of {name} is more than {_MAX_WALK} nodes away")
        op = op_of(cur)
        if _is_call(cur, "to_local"):
            info = shard_of(_value(cur.args[0]))
            if info is not None:
                found.append(_features(info, len(info.global_shape) - 1, name))
            continue
        if cur is not node and op is not None and op.name in _LINEAR_OPS:
            found.extend(_weight_features(cur, op, name, ctx))
            continue
        if cur.op not in ("placeholder", "get_attr"):
            todo.extend(cur.all_input_nodes)
    if len(found) > 1:
        raise ValueError(f"{name} is computed from several sharded projections")
    return found[0] if found else None


def _weight_features(node: Node, op, name: str, ctx) -> List[Tuple[int, int, int, str]]:
    """The output features a linear's DTensor weight gives this rank ([] for an unsharded weight)."""
    for arg in op.inputs:
        ref = ctx.params.get(arg) if isinstance(arg, Node) else None
        info = shard_of(ref.tensor) if ref is not None else None
        if info is not None:
            # F.linear stores the weight [out, in]; addmm / matmul read it [in, out].
            return [_features(info, 0 if op.name == "linear" else 1, name)]
    return []


def _features(info: ShardInfo, dim: int, name: str) -> Tuple[int, int, int, str]:
    if not info.supported or info.partial or (info.dim is not None and info.dim != dim):
        raise ValueError(f"the projection of {name} is placed {info.placements}; expected its output features "
                         "sharded (Shard on the feature dim of a 1-D mesh) or replicated")
    return info.offset[dim], info.local_shape[dim], info.global_shape[dim], f"{info.rank}/{info.world}"


def _annotate_ffn(site: Site, ctx) -> None:
    """An FFN of local linears computes per element (docs/spec.md's thresholds), so it runs as it is; only the
    ``weighted`` criterion needs whole columns of the gate/up weights, which a column-wise shard splits."""
    m = site.match
    nodes = [(lin, node) for lin, node in ((m.first, m.first_node), (m.up, m.up_node), (m.down, m.down_node))
             if lin is not None]
    sharded = [lin for lin, _ in nodes if is_dtensor(lin.weight.tensor)]
    if not sharded:
        return
    unlocal = [lin.weight.qualname for lin, _ in nodes if is_dtensor(lin.weight.tensor) and not _is_local(lin.weight)]
    if unlocal:
        raise ValueError(f"the weight {unlocal[0]} is a DTensor in a linear that is neither column-wise nor "
                         "row-wise (the FFN's rewrite needs local tensors)")
    rule = ctx.spec.resolve("ffn", site.module) if ctx.spec is not None else None
    if getattr(rule.form if rule is not None else None, "criterion", None) == "weighted":
        raise ValueError("criterion 'weighted' needs the norms of whole weight columns, which column-wise "
                         "shards split across ranks; use criterion 'magnitude' (docs/distributed.md)")
    info = shard_of(sharded[0].weight.tensor)
    site.attrs.update(tp_rank=f"{info.rank}/{info.world}")
