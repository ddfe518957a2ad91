"""Sites of a tensor-parallel model: what each rank holds, and local rewrites of sharded linears.

A model parallelised with ``torch.distributed.tensor.parallel.parallelize_module`` (column-wise q/k/v/gate/up,
row-wise o/down) reaches the backend with DTensor weights, a DTensor input and output around every sharded
linear (``from_local`` / ``redistribute`` / ``to_local`` from the plan's hooks), and plain local tensors in
between: the attention sees this rank's heads only, because the model views the projection output as
``(..., -1, head_dim)``. The ``shard`` stage (``annotate_sharding``), between match and decide, records per
site what this rank holds, so that check decides with local shapes and global indices:

* an attention site gets the global heads it holds (``head_offset``, ``global_heads``; KV heads likewise),
  read from the DTensor placements of its q and k projections, so a spec's global head indices select the
  right local heads;
* a sharded linear site gets its local ``in_features`` / ``out_features`` and a replace that runs the sparse
  op on the local input and this rank's compressed shard, wrapping the result back into the DTensor the
  dense linear produced (same placements, same global shape); the compressed shard carries the unsharded
  2:4 / block pattern (``sparsecc.weights.compress_shard``).

A site whose sharding cannot be established gets ``attrs[REFUSED]``, a reason; the decide stage keeps it
dense with that reason. No communication is added: the DTensor hooks of the model do all of it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

from torch.fx import GraphModule, Node

from sparsecc.passes.fx_utils import size_hint
from sparsecc.passes.normalize import canonical, op_of
from sparsecc.passes.site import Site
from sparsecc.sharding import ShardInfo, format_span, head_span, is_dtensor, shard_of

# Site attribute holding why a site's sharding cannot be established (the site then stays dense).
REFUSED = "sharding_refused"
# How far back from q / k the search for their projection looks (nodes visited), so it stays local.
_MAX_WALK = 256
_LINEAR_OPS = ("linear", "addmm", "matmul")


def refused(site: Site) -> Optional[str]:
    """Why ``site`` stays dense because of its sharding (None when nothing prevents it)."""
    return site.attrs.get(REFUSED)


def annotate_sharding(gm: GraphModule, ctx) -> None:
    """Record what this rank holds of every site (a no-op for a model without DTensors)."""
    for site in ctx.sites:
        try:
            if site.kind == "linear":
                _annotate_linear(site, ctx)
            elif site.kind == "attention":
                _annotate_attention(site)
            else:
                _annotate_other(site)
        except ValueError as err:
            site.attrs[REFUSED] = f"tensor parallel: {err}"


def _value(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None


def _rank_text(info: ShardInfo) -> str:
    return f"{info.rank}/{info.world}"


# ---------------------------------------------------------------- attention

def _annotate_attention(site: Site) -> None:
    m = site.match
    if m is None:
        return
    for name in ("q", "k", "v"):
        if is_dtensor(_value(getattr(m, name))):
            raise ValueError(f"the attention's {name} is a DTensor; sparsecc's attention ops take the local "
                             "heads (the plan's use_local_output=True, as in parallelize_module's defaults)")
    q, k, v = (_projection_shard(n, name) for n, name in ((m.q, "q"), (m.k, "k"), (m.v, "v")))
    if q is None and k is None and v is None:
        return
    if q is None or k is None or v is None:
        missing = [name for name, info in (("q", q), ("k", k), ("v", v)) if info is None]
        raise ValueError(f"the projections of {', '.join(missing)} are not DTensor outputs while the others "
                         "are; which global heads this rank holds cannot be established")
    if m.folded_heads:
        raise ValueError("heads are folded into the batch dimension (3-D attention); which global heads this "
                         "rank holds cannot be established")
    a = site.attrs
    dim, heads, kv_heads = size_hint(a["head_dim"]), size_hint(a["heads"]), size_hint(a["kv_heads"])
    q0, total = head_span(q, dim, heads)
    k0, total_kv = head_span(k, dim, kv_heads)
    v0, v_total = head_span(v, dim, kv_heads)
    if (v0, v_total) != (k0, total_kv):
        raise ValueError(f"k holds KV heads {format_span(k0, kv_heads)} of {total_kv} but v holds "
                         f"{format_span(v0, kv_heads)} of {v_total}")
    # GQA: global query head h reads global KV head h // group; the local op pairs local heads the same way,
    # which is right only when this rank's query heads are exactly the groups of its KV heads.
    if total % total_kv or heads != kv_heads * (total // total_kv) or q0 != k0 * (total // total_kv):
        raise ValueError(f"this rank holds query heads {format_span(q0, heads)} of {total} and KV heads "
                         f"{format_span(k0, kv_heads)} of {total_kv}, which are not the same GQA groups")
    a.update(tp_rank=_rank_text(q), head_offset=q0, global_heads=total, kv_head_offset=k0,
             global_kv_heads=total_kv, holds_heads=format_span(q0, heads), holds_kv_heads=format_span(k0, kv_heads))


def _projection_shard(node: Node, name: str) -> Optional[ShardInfo]:
    """The sharding of the DTensor projection output that ``node`` (q, k or v) is a local view of.

    Walks back from ``node`` to the nearest ``to_local()`` calls (the plan's output hooks), not past any
    linear (an unsharded projection) or graph input. None when no ``to_local`` is reached (the operand is
    not sharded); raises ``ValueError`` when several are (it cannot say which one holds the heads).
    """
    found: List[Node] = []
    seen, todo = set(), [node]
    while todo:
        cur = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        if len(seen) > _MAX_WALK:
            raise ValueError(f"the projection of {name} is more than {_MAX_WALK} nodes away")
        if cur.op == "call_method" and cur.target == "to_local":
            found.append(cur)
            continue
        op = op_of(cur)
        if cur.op in ("placeholder", "get_attr") or (cur is not node and op is not None and op.name in _LINEAR_OPS):
            continue
        todo.extend(cur.all_input_nodes)
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{name} is computed from several local shards ({', '.join(n.name for n in found)})")
    info = shard_of(_value(found[0].args[0]))
    if info is None:
        raise ValueError(f"the tensor {found[0].name} of {name} comes from has no DTensor metadata")
    return info


# ---------------------------------------------------------------- linear

def _annotate_linear(site: Site, ctx) -> None:
    m = site.match
    w = shard_of(m.weight.tensor)
    if w is None:
        return
    x, y = shard_of(_value(m.x)), shard_of(_value(site.output))
    if x is None or y is None:
        raise ValueError(f"the weight {m.weight.qualname} is a DTensor but the linear's input or output is not")
    if not (w.supported and x.supported) or x.partial:
        raise ValueError(f"the input is placed {x.placements} and the weight {w.placements}; sparse linears "
                         "support Shard and Replicate placements on a 1-D mesh")
    if m.bias is not None:
        raise ValueError("a sharded linear with a bias is not supported yet (the bias of a row-wise shard "
                         "must be added once, after the reduction)")
    out_dim, in_dim = (1, 0) if m.in_out else (0, 1)
    x_last = len(x.global_shape) - 1
    if w.dim == out_dim and x.dim is None:
        expect, kind = y.dim == len(y.global_shape) - 1 and not y.partial, "column-wise"
    elif w.dim == in_dim and x.dim == x_last and x.offset[x_last] == w.offset[in_dim] \
            and x.local_shape[x_last] == w.local_shape[in_dim]:
        expect, kind = y.partial, "row-wise"
    elif w.dim is None and x.dim is None:
        expect, kind = y.dim is None and not y.partial, "replicated"
    else:
        raise ValueError(f"the input is placed {x.placements} and the weight {w.placements}: the local product "
                         "is not this rank's part of the output")
    if not expect:
        raise ValueError(f"a {kind} linear whose output is placed {y.placements}")
    n, k = (w.local_shape[1], w.local_shape[0]) if m.in_out else w.local_shape
    site.match = dataclasses.replace(m, in_features=k, out_features=n)
    site.shapes.update(x=tuple(x.local_shape), weight=tuple(w.local_shape))
    site.attrs.update(in_features=k, out_features=n, tp_rank=_rank_text(w), tp_linear=kind,
                      global_weight="x".join(str(d) for d in w.global_shape), tp_weight=w.placements)
    rewrite = ctx.rewrites[id(site)]
    ctx.rewrites[id(site)] = dataclasses.replace(rewrite, replace=local_linear_replace(rewrite.replace))


def local_linear_replace(inner: Callable) -> Callable:
    """Wrap a linear family's replace so that it runs on this rank's local tensors.

    Before ``inner`` runs, the linear reads ``x.to_local()`` and its users read ``DTensor.from_local`` of its
    result with the placements, global shape and stride of the DTensor the dense linear produced; ``inner``
    then replaces the linear by the sparse op on local tensors as for any model. The DTensor hooks around the
    linear (redistribute, to_local) are left as they are, so communication is unchanged.
    """
    def replace(gm: GraphModule, site: Site, decision, ctx) -> None:
        from torch.distributed.tensor import DTensor

        graph, linear = gm.graph, site.output
        produced = _value(linear)
        x = canonical(linear).inputs[0]
        stack = linear.meta.get("nn_module_stack", {})
        with graph.inserting_before(linear):
            x_local = graph.call_method("to_local", (x,))
            mesh = graph.call_function(getattr, (x, "device_mesh"))
        linear.replace_input_with(x, x_local)
        kwargs = {"run_check": False}
        if all(isinstance(d, int) for d in produced.shape):
            kwargs.update(shape=tuple(produced.shape), stride=tuple(produced.stride()))
        with graph.inserting_after(linear):
            wrapped = graph.call_function(DTensor.from_local, (linear, mesh, tuple(produced.placements)), kwargs)
        for node in (x_local, mesh, wrapped):
            node.meta["nn_module_stack"] = stack
        wrapped.meta["example_value"] = produced
        linear.replace_all_uses_with(wrapped, delete_user_cb=lambda user: user is not wrapped)
        inner(gm, site, decision, ctx)
    return replace


# ---------------------------------------------------------------- other sites

def _annotate_other(site: Site) -> None:
    """FFN sites: their rewrite computes the whole FFN from one input, which a sharded FFN does not hold."""
    sharded = [n for n in site.nodes if is_dtensor(_value(n))]
    if sharded:
        raise ValueError(f"the {site.kind} computes on DTensors ({sharded[0].name}); {site.kind} forms under "
                         "tensor parallelism are not supported yet (docs/distributed.md)")
