"""Attention sites: check. Which heads get which form, whether the site applies, and why.

Every decision about an attention site is made here and recorded in its
``Decision`` (the op to call and its parameters included); ``replace`` in
``passes/attention.py`` only builds the call.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

from sparsecc.codegen.block_attention import FULL_WINDOW
from sparsecc.codegen.hopper_prefill import hopper_table_runs
from sparsecc.codegen.mixed_attention import MIXABLE_FORMS, HeadTable
from sparsecc.codegen.streaming_rules import streaming_runs_decode_kernel, streaming_runs_hopper_program
from sparsecc.cost import estimate_attention
from sparsecc.forms import BlockSparse, BlockTopK, Dense, Streaming, VerticalSlash
from sparsecc.passes.decide import dense_rule, fallback, group_head_forms, no_rule, verdict
from sparsecc.passes.fx_utils import dtype_of, shape_of, size_hint
from sparsecc.passes.site import Decision, Estimate, Site
from sparsecc.spec.schema import rule_sort_key

# What the report says of a site whose query positions come from the mask (docs/spec.md), per op.
_AT_MASK = "query positions from the mask (min(i + Sk - Sq, last key the row keeps))"
MASK_POSITIONS = {
    "streaming_attention_from_mask": _AT_MASK,
    "block_sparse_attention": _AT_MASK + "; a static cache's unwritten tail is cut as right padding; a call whose "
                              "mask still moves a row runs the reference path",
    "dynamic_block_attention": _AT_MASK + "; a static cache's unwritten tail is cut as right padding; rows the "
                               "mask still moves off i + Sk - Sq attend densely",
    "mixed_head_attention": _AT_MASK + "; each head as its form's op treats it",
}
# What the reason adds when the estimate timed kernels other than the Triton prefill kernels (sparse_program).
SM90_ESTIMATE = "estimated for the sm_90 Gluon program (codegen/hopper_prefill.py)"
DECODE_ESTIMATE = "estimated for the split-KV decode kernel, which reads the kept K/V only (codegen/decode_attention.py)"
PROGRAM_ESTIMATES = {"sm90": SM90_ESTIMATE, "decode": DECODE_ESTIMATE}
# Forms whose layout is chosen per input by torch.ops.sparsecc.dynamic_block_attention.
DYNAMIC_FORMS = (BlockTopK, VerticalSlash)


def check_attention(site: Site, ctx) -> Decision:
    """Decide one attention site: which heads get which form, whether it applies, and why.

    A site whose heads ask for different forms records them, grouped, in ``Decision.head_forms``.
    """
    resolved: List[list] = []          # the rule in force for each head, once the heads are resolved
    decision = _decide_attention(site, ctx, resolved)
    if resolved:
        groups = group_head_forms(resolved[0], site.attrs.get("head_offset", 0))
        if len(groups) > 1:
            decision = dataclasses.replace(decision, head_forms=tuple(groups))
    return decision


def _imported_head_count_mismatch(spec, heads: int) -> Optional[str]:
    """Why an imported spec's head lists cannot be trusted at a site of ``heads`` query heads, else None.

    An importer that maps per-KV-head data onto query heads (DuoAttention) records the query head count it was
    given in ``meta.import.options.query_heads``; at a site with another count, KV head ``kv``'s rules name
    other query heads than ``kv``'s group, so the spec would sparsify the wrong heads without any error.
    """
    options = spec.meta.get("import", {}).get("options", {})
    imported = options.get("query_heads") if hasattr(options, "get") else None
    if not isinstance(imported, int) or isinstance(imported, bool) or imported == heads:
        return None
    return (f"the spec was imported for {imported} query heads (meta.import.options.query_heads) and this "
            f"attention site has {heads}: its head lists would name other heads than the imported ones; import "
            f"it again with query_heads={heads} (--query-heads {heads})")


def _decide_attention(site: Site, ctx, resolved: List[list]) -> Decision:
    rules = ctx.spec.matching("attention", site.module) if ctx.spec is not None else []
    if site.match is None:   # the rules covering it are named, so a refused rule can be found in the report
        refused = f"not rewritable: {site.attrs['refused']}"
        if not rules:
            return Decision(False, None, refused)
        sparse = [r for r in rules if not isinstance(r.form, Dense)] or rules
        return Decision(False, sparse[-1].form, refused, rule=", ".join(r.key for r in rules),
                        policy=ctx.spec.policy_for(sparse[-1]))
    if not rules:
        return no_rule()
    # docs/spec.md: a rule whose phase excludes this site (prefill: more than one query; decode: one) does not
    # cover it at all, so a decode rule and a prefill rule can share modules.
    seq_q = site.attrs["seq_q"]
    at_phase = ctx.spec.matching("attention", site.module, seq_q)
    if not at_phase:
        keys = ", ".join(r.key for r in rules)
        here = "decode (one query)" if seq_q == 1 else "prefill (more than one query)"
        phases = " / ".join(sorted({r.phase for r in rules}))
        verb = "applies" if len(rules) == 1 else "apply"
        return Decision(False, None, f"{keys} {verb} at {phases} only; this site is {here}", rule=keys,
                        policy=ctx.spec.policy_for(rules[-1]))
    rules = at_phase
    heads = size_hint(site.attrs["heads"])
    # Tensor parallelism (passes/tensor_parallel.py): this rank holds global heads offset .. offset + heads - 1
    # of total; a spec's head indices are global.
    offset, total = site.attrs.get("head_offset", 0), site.attrs.get("global_heads", heads)
    mismatch = _imported_head_count_mismatch(ctx.spec, total)
    if mismatch:   # its head lists were laid out for another model: they would name the wrong heads here
        ctx.warn_once(mismatch)
        keys = ", ".join(r.key for r in rules)
        return Decision(False, None, mismatch, rule=keys, policy=ctx.spec.policy_for(rules[-1]))
    # docs/spec.md: each head's rule is the last rule in force that covers it (None: no rule covers the head)
    per_head = [ctx.spec.resolve("attention", site.module, offset + h, seq_q) for h in range(heads)]
    ignored = {h for rule in rules if rule.heads is not None for h in rule.heads if h >= total}
    for rule in rules:
        missing = sorted(ignored.intersection(rule.heads or ()))
        if missing:   # a spec written for another model: said in the compile's warning, not only in the report
            note = (f"{rule.key} names heads {missing}, which attention sites of {total} heads (0-{total - 1}) "
                    "do not have; they are ignored")
            ctx.warn_once(note)
    resolved.append(per_head)
    in_force = sorted({id(r): r for r in per_head if r is not None}.values(), key=lambda r: r.index)
    if not in_force:
        keys = ", ".join(r.key for r in rules)
        verb = "names" if len(rules) == 1 else "name"
        if total != heads and len(ignored) < len({h for r in rules if r.heads is not None for h in r.heads}):
            return Decision(False, None, f"{keys} {verb} only heads that other ranks hold (tensor parallel: this "
                            f"rank holds heads {site.attrs['holds_heads']} of {total})", rule=keys,
                            policy=ctx.spec.policy_for(rules[-1]))
        return Decision(False, None, f"{keys} {verb} only heads {sorted(ignored)}, which do not exist (the site "
                        f"has {heads} heads)", rule=keys, policy=ctx.spec.policy_for(rules[-1]))
    sparse = [r for r in per_head if r is not None and not isinstance(r.form, Dense)]
    if not sparse:
        last = in_force[-1]
        return dense_rule(last, ctx.spec.policy_for(last))
    # docs/spec.md: the last covering sparse rule (in spec order, among the rules in force for some head) sets
    # the site's policy and, for a site of one form, its form.
    deciding = [r for r in in_force if not isinstance(r.form, Dense)][-1]
    policy = ctx.spec.policy_for(deciding)
    rule_keys = ", ".join(sorted({r.key for r in sparse}, key=rule_sort_key))
    form = deciding.form
    head_forms = [None if r is None or isinstance(r.form, Dense) else r.form for r in per_head]
    distinct = {f for f in head_forms if f is not None}
    # One op per form covers its dense heads too, except the dynamic forms (one form for every head). Streaming heads
    # of several sinks and windows are one streaming op too: it takes a rule per head, in one launch (1.13-1.74x
    # faster than the mixed op's group-by-group run on an H100, bench/streaming_mix.py).
    several = len(distinct) > 1 and not all(isinstance(f, Streaming) for f in distinct)
    mixed = several or (isinstance(form, DYNAMIC_FORMS) and None in head_forms)
    if mixed and not all(isinstance(f, MIXABLE_FORMS) for f in distinct):
        names = " and ".join(sorted({f.name for f in distinct} | ({"dense"} if None in head_forms else set())))
        return fallback(form, rule_keys, policy, f"{names} heads in one site: block_topk needs one rule for "
                        "every head (heads of streaming, vertical_slash and block_sparse may mix)")
    if site.attrs["folded_heads"] and (len(sparse) != heads or len(distinct) > 1):
        return fallback(form, rule_keys, policy, "heads are folded into the batch dimension (3-D attention), "
                        "so per-head rules cannot be applied")
    sq, sk = site.attrs["seq_q"], site.attrs["seq_k"]
    if isinstance(sq, int) and isinstance(sk, int) and sq > sk:
        return fallback(form, rule_keys, policy, f"more queries than keys ({sq} > {sk}, e.g. cross-attention): "
                        "positional forms place queries at key positions (docs/spec.md)")
    if site.attrs["causal"] and not _same_size(sq, sk):
        return fallback(form, rule_keys, policy, "is_causal with seq_q != seq_k is top-left aligned in SDPA, "
                        "but sparse forms place queries at the end")
    for f in sorted(distinct, key=str):
        if isinstance(f, (VerticalSlash, BlockTopK, BlockSparse)) and isinstance(sk, int) and f.block > sk:
            return fallback(form, rule_keys, policy, f"block {f.block} is larger than the key sequence ({sk})")
    if (any(isinstance(f, VerticalSlash) for f in distinct) and not site.attrs["causal"]
            and not site.attrs["masks"] and sq != 1):   # one query row (a decode step) has no later key: causal
        return fallback(form, rule_keys, policy, "vertical_slash is MInference's causal prefill rule and "
                        "this attention is bidirectional (no is_causal, no mask): no rule says which keys "
                        "a query may see after it (docs/spec.md)")
    params = {}
    if _positions_from_mask(site, sq, sk):
        params["anchor"] = "mask"
    own_window = model_sliding_window(ctx.modules.module_at(site.module))
    if (own_window and isinstance(sq, int) and isinstance(sk, int) and sk - sq >= own_window - 1
            and params.get("anchor") != "mask"):   # with the mask placing the queries, each call decides
        return fallback(form, rule_keys, policy, f"the model's own sliding window is {own_window} and every call of "
                        f"this graph has {sk - sq} keys before its queries: its cache may no longer hold the first "
                        "tokens, so key positions are unknown (docs/spec.md)")
    if own_window:
        params["own_window"] = own_window
    if offset and any(isinstance(f, BlockSparse) and f.random_blocks > 0 for f in distinct):
        # Random blocks are drawn per model head (docs/spec.md): this rank's head 0 is the model's head `offset`.
        params["head_offset"] = offset
    notes = []
    if mixed:
        try:
            table = HeadTable.of(head_forms)
        except ValueError as e:
            return fallback(form, rule_keys, policy, str(e))
        params["head_table"] = table
        op_name = "mixed_head_attention"
        if table.family() is None:
            notes.append("no one-launch kernel for this mix: heads run form by form")
    elif isinstance(form, DYNAMIC_FORMS):
        op_name = "dynamic_block_attention"
    elif isinstance(form, Streaming):
        params["sink"] = [f.sink if f is not None else 0 for f in head_forms]
        params["window"] = [f.window if f is not None else FULL_WINDOW for f in head_forms]
        op_name = "streaming_attention_from_mask" if params.get("anchor") == "mask" else "streaming_attention"
    else:
        if site.attrs["folded_heads"] and form.random_blocks > 0:
            return fallback(form, rule_keys, policy, "random blocks are drawn per head (docs/spec.md), and heads "
                            "folded into the batch dimension (3-D attention) cannot be told from batch elements")
        params["dense_heads"] = [h for h, f in enumerate(head_forms) if f is None]
        op_name = "block_sparse_attention"
    program = sparse_program(site, op_name, form, params, ctx.kernels)
    estimate = _estimate(site, form, head_forms, ctx, program)
    decision = dataclasses.replace(verdict(site, ctx, form, rule_keys, policy, estimate, op_name, **params),
                                   program=program)
    if program in PROGRAM_ESTIMATES:
        if not decision.apply:   # kept dense: the note matters where the estimate decided (policy auto)
            if not decision.reason.startswith("auto:"):
                return decision
            return dataclasses.replace(decision, reason=f"{decision.reason}; {PROGRAM_ESTIMATES[program]}")
        notes.insert(0, PROGRAM_ESTIMATES[program])
    if not decision.apply:
        return decision
    # What an applied site's report adds to its reason (docs/spec.md), in this order.
    if params.get("anchor") == "mask":
        notes.insert(0, MASK_POSITIONS[op_name])
    for phase in ("prefill", "decode"):
        keys = sorted({r.key for r in sparse if r.phase == phase}, key=rule_sort_key)
        if keys:
            notes.append(f"{', '.join(keys)} appl{'ies' if len(keys) == 1 else 'y'} at {phase} only")
    if any(isinstance(f, VerticalSlash) for f in distinct) and not site.attrs["causal"]:
        notes.append("not is_causal: a call whose mask keeps a key after a query's position attends densely "
                     "(docs/spec.md)")
    if isinstance(form, BlockTopK) and form.local_blocks == 0 and site.attrs["masks"]:
        notes.append("local_blocks = 0 with a mask: a row whose kept blocks the mask hides entirely outputs zeros "
                     "(docs/spec.md)")
    if own_window:
        notes.append(f"the model's own sliding window is {own_window}: calls with {own_window - 1} or more keys "
                     "before the queries (a left-padded sequence's from its first key) run dense (its cache may "
                     "then no longer hold the first tokens, so key positions are unknown; docs/spec.md)")
    if ignored:
        notes.append(f"heads {sorted(ignored)} do not exist (site has {total})")
    if total != heads:
        notes.append(f"tensor parallel rank {site.attrs['tp_rank']}: holds heads {site.attrs['holds_heads']} of "
                     f"{total} (KV heads {site.attrs['holds_kv_heads']} of {site.attrs['global_kv_heads']})")
    return dataclasses.replace(decision, reason="; ".join([decision.reason] + notes))


def model_sliding_window(module) -> int:
    """The window of the KV cache the attention module's model keeps for this layer (0 when it keeps every token).

    transformers builds each layer's cache from its config (``cache_utils.get_layer_types_and_kwargs``): a
    sliding-window layer (Mistral, Phi-3, the sliding layers of Gemma 3, Qwen 2/3, GPT-OSS) or a chunked-attention
    layer (Llama 4: ``attention_chunk_size``) gets a cache that keeps only its last ``window - 1`` tokens, so the
    first cached key is no longer token 0 once the sequence outgrows the window. That rule is asked first, for the
    module's ``layer_idx``; without it (older transformers, other models), the module's own ``sliding_window``
    (None on full-attention layers), else its config's ``sliding_window``.
    """
    if module is None:
        return 0
    config = getattr(module, "config", None)
    window = _transformers_cache_window(config, getattr(module, "layer_idx", None))
    if window is None:
        if hasattr(module, "sliding_window"):
            window = module.sliding_window
        else:
            window = getattr(config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else 0


def _transformers_cache_window(config, layer_idx) -> Optional[int]:
    """The cache window transformers gives layer ``layer_idx`` of ``config`` (0: a full cache), or None when
    transformers has no such rule or it does not apply to this config."""
    if config is None or not isinstance(layer_idx, int):
        return None
    try:
        from transformers import cache_utils
        if hasattr(cache_utils, "get_layer_types_and_kwargs"):
            _, per_layer = cache_utils.get_layer_types_and_kwargs(config)
            return int(per_layer[layer_idx].get("sliding_window") or 0)
        # transformers before that function wrote the same rule inside its cache classes (5.0: StaticCache)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            kind = layer_types[layer_idx]
        elif getattr(config, "sliding_window", None) is not None:
            kind = "sliding_attention"
        elif getattr(config, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        else:
            kind = "full_attention"
        if kind == "sliding_attention":
            return int(config.sliding_window or 0)
        return int(config.attention_chunk_size or 0) if kind == "chunked_attention" else 0
    except Exception:  # noqa: BLE001 - not transformers' config, or one the rule does not read: attributes decide
        return None


def _positions_from_mask(site: Site, sq, sk) -> bool:
    """True when the queries' positions come from the mask (docs/spec.md): not causal, masked, and fewer
    queries than keys (or sizes that may differ at run time; the op then decides on the actual sizes).

    A static KV cache is a buffer longer than the tokens so far; HF hides its
    unfilled tail with the mask and calls SDPA with ``is_causal=False``. The
    end of the key axis is then not the query's position; the rule
    ``min(i + Sk - Sq, last key the row's mask keeps)`` is.
    """
    if site.attrs["causal"] or not site.attrs["masks"]:
        return False
    return not _same_size(sq, sk)


def _same_size(a, b) -> bool:
    """True when two sizes are provably equal: equal ints, or the same symbolic expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    # Comparing SymInts with == would install a guard; equal expressions need none.
    return str(a) == str(b)


def _estimate(site: Site, form, head_forms, ctx, program: str) -> Estimate:
    """The cost model's estimate; ``head_forms`` gives each head's form (None: dense); ``program`` the kernels the
    sparse side runs (:func:`sparse_program`)."""
    a = site.attrs
    margin = ctx.spec.defaults.margin if ctx.spec is not None else 1.0
    return estimate_attention(
        form, head_forms, batch=size_hint(a["batch"]), heads=size_hint(a["heads"]),
        kv_heads=size_hint(a["kv_heads"]), seq_q=size_hint(a["seq_q"]), seq_k=size_hint(a["seq_k"]),
        head_dim=size_hint(a["head_dim"]), dtype=site.dtype, causal=a["causal"], hw=ctx.hardware, margin=margin,
        symbolic_seq=not isinstance(a["seq_k"], int), program=program,
        # CUDA graphs are recorded per shape: a length that changes every call (a growing cache) is never replayed
        replayed=ctx.replayed and isinstance(a["seq_q"], int) and isinstance(a["seq_k"], int))


def site_facts(site: Site) -> tuple:
    """(device, q/k/v dtypes, q/k/v head dims, seq_q, seq_k): what the kernels' dispatch rules ask of a call, as a
    site knows it at compile time; a length known only at run time is None."""
    m = site.match

    def static(size):
        return int(size) if isinstance(size, int) else None

    return (site.device, tuple(dtype_of(t) for t in (m.q, m.k, m.v)),
            tuple(site.shapes[name][-1] for name in "qkv"), static(site.attrs["seq_q"]), static(site.attrs["seq_k"]))


def _mask_heads(site: Site) -> int:
    """The head axis of the site's masks combined (a mask of fewer than 3 dims broadcasts over the heads)."""
    heads = 1
    for term in site.match.masks:
        shape = shape_of(term.node) or ()
        if len(shape) >= 3 and shape[-3] != 1:
            heads = shape[-3] if isinstance(shape[-3], int) else 2   # symbolic: not known to be shared
    return heads


def sparse_program(site: Site, op_name: str, form, params: dict, kernels: str) -> str:
    """Which kernels run the site's sparse op (``formulas.PROGRAMS``), as the kernel wrappers' own rules answer for
    the site's static facts: "decode" when a streaming op's calls run the split-KV decode kernel
    (``streaming_runs_decode_kernel``: at most 16 query rows); "sm90" when the streaming or the block-table op's
    calls run the Gluon program for Hopper (``streaming_runs_hopper_program``, ``hopper_table_runs``); else
    "triton". The cost model then times the kernels that will run: the Gluon program ran 1.2-1.4x faster than the
    Triton kernel on an H100, and the decode kernel reads only the kept K/V (bench/RESULTS.md)."""
    streaming_ops = ("streaming_attention", "streaming_attention_from_mask")
    if kernels == "reference" or op_name not in (*streaming_ops, "block_sparse_attention"):
        return "triton"
    facts = site_facts(site)
    rule = dict(causal=site.attrs["causal"], masked=bool(site.match.masks), return_lse=False)
    if op_name in streaming_ops and isinstance(site.attrs["kv_heads"], int) and streaming_runs_decode_kernel(
            *facts, scale=float(site.attrs["scale"]), sinks=params["sink"], windows=params["window"],
            kv_heads=site.attrs["kv_heads"], positions_from_mask=op_name != "streaming_attention",
            mask_heads=_mask_heads(site), **rule):
        return "decode"   # a decode step over a cache of any length: the key length may be symbolic
    # (a symbolic length is None among the facts: the Gluon rules then keep the traced Triton kernels)
    if op_name == "streaming_attention":
        runs = streaming_runs_hopper_program(*facts, scale=float(site.attrs["scale"]), sinks=params["sink"],
                                             windows=params["window"], **rule)
    elif op_name == "block_sparse_attention":
        runs = hopper_table_runs(*facts, block=form.block, **rule)
    else:
        runs = False
    return "sm90" if runs else "triton"
