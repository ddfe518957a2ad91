"""Shared parts of every family's ``check``: rule lookup, policy and the cost verdict.

The family checks (attention, ffn, linear) work out which form the spec asks
for and whether it can apply to the site; ``verdict`` then turns that plus the
cost estimate into the final ``Decision``. Reasons are one sentence each,
written for the report.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from sparsecc.forms import Dense
from sparsecc.passes.site import Decision, Estimate, HeadGroup, Site

NO_RULE = "no rule"
# Under policy auto, CPU sites stay dense: the pure-PyTorch reference is the CPU path and is not a fast path.
# (Tests of the auto machinery on a CPU-only machine switch this off.)
KEEP_CPU_DENSE = True


def last_rule(site: Site, ctx):
    """The spec rule that decides a one-form site (``Spec.resolve``: the last one whose glob matches its module)."""
    if ctx.spec is None:
        return None
    return ctx.spec.resolve(site.kind, site.module)


def site_rule(site: Site, ctx):
    """(rule, policy, early decision) for a one-form site; the decision is set when there is nothing to apply.

    The early decision is "no rule" when no rule names the site, and the dense
    decision when the last matching rule asks for the dense form.
    """
    rule = last_rule(site, ctx)
    if rule is None:
        return None, None, no_rule()
    policy = ctx.spec.policy_for(rule)
    if isinstance(rule.form, Dense):
        return rule, policy, dense_rule(rule, policy)
    refused = site.attrs.get("refused")
    if refused:   # the matcher listed the site but no form can run there (e.g. its dtype)
        return rule, policy, Decision(False, rule.form, f"not rewritable: {refused}", rule=rule.key, policy=policy)
    return rule, policy, None


def no_rule() -> Decision:
    """Decision for a site no rule names."""
    return Decision(False, None, NO_RULE)


def dense_rule(rule, policy: str) -> Decision:
    """Decision for a site whose rule asks for the dense form."""
    return Decision(False, Dense(), f"{rule.key} asks for the dense form", rule=rule.key, policy=policy)


def fallback(form, rule, policy, why: str, estimate: Optional[Estimate] = None, **params) -> Decision:
    """The form cannot apply here; the site stays dense with ``why`` as the reason."""
    return Decision(False, form, f"dense fallback: {why}", estimate, rule, policy, params)


def verdict(site: Site, ctx, form, rule_key: str, policy: str, estimate: Estimate, kernel_op: str,
            **params) -> Decision:
    """Apply or not, by policy, training mode, kernel availability and the cost estimate."""
    if policy == "off":
        return Decision(False, form, f"policy off in {rule_key}", estimate, rule_key, policy, params)
    if ctx.autograd:
        return fallback(form, rule_key, policy, "autograd is recording; sparse forms are inference-only "
                        "(compile under torch.no_grad() or torch.inference_mode())", estimate, **params)
    has_kernel = ctx.has_kernel(kernel_op, site.device)
    if ctx.kernels == "triton" and not has_kernel:
        return fallback(form, rule_key, policy, f"kernels='triton' but no Triton kernel for {kernel_op} "
                        f"on {site.device.type}", estimate, **params)
    gain = f"predicted {estimate.speedup:.2f}x on {ctx.hardware.name}"
    if policy == "force":
        # Forced at every length: the cost model's crossover is an estimate here, never a runtime switch.
        impl = "triton kernel" if has_kernel and ctx.kernels != "reference" else "reference"
        crossover = f"; the cost model would run it {estimate.crossover}" if estimate.crossover is not None else ""
        return Decision(True, form, f"policy force: applied ({impl}; {gain}{crossover})", estimate, rule_key,
                        policy, params)
    if estimate.crossover is not None:
        gain += f"; {estimate.crossover}"
    # policy auto
    if site.device.type == "cpu" and KEEP_CPU_DENSE:
        return Decision(False, form, "auto: on CPU the reference path is not faster than dense "
                        "(policy = \"force\" runs it for accuracy studies)", estimate, rule_key, policy, params)
    if not has_kernel or ctx.kernels == "reference":
        return Decision(False, form, f"auto: no fast kernel for {kernel_op} on {site.device.type} "
                        "(the reference would be slower than dense)", estimate, rule_key, policy, params)
    margin = ctx.spec.defaults.margin if ctx.spec is not None else 1.0
    if estimate.crossover is not None:
        # A symbolic size: decide along it, and let the op branch at run time below the crossover.
        if estimate.crossover_at is None:
            return Decision(False, form, f"auto: kept dense, {estimate.crossover} (margin {margin:g})", estimate,
                            rule_key, policy, params)
        branch = {} if estimate.crossover_at <= 1 else {"dense_below": estimate.crossover_at}
        return Decision(True, form, f"auto: applied, {estimate.crossover} (runtime branch, no recompile; "
                        f"predicted {estimate.speedup:.2f}x at the traced size)", estimate, rule_key, policy,
                        {**params, **branch})
    if estimate.speedup >= margin:
        return Decision(True, form, f"auto: applied, {gain} >= margin {margin:g}", estimate, rule_key, policy, params)
    return Decision(False, form, f"auto: kept dense, {gain} < margin {margin:g}", estimate, rule_key, policy, params)


def group_head_forms(per_head, offset: int = 0) -> List[HeadGroup]:
    """The heads grouped by the form they get, in head order; heads no rule covers, or a dense rule covers, are
    "dense". ``per_head[i]`` is head ``offset + i`` (tensor parallelism: a rank's first global head)."""
    forms: Dict[str, Tuple[str, List[int]]] = {}
    for h, rule in enumerate(per_head, start=offset):
        dense = rule is None or isinstance(rule.form, Dense)
        name, text = ("dense", "dense") if dense else (rule.form.name, str(rule.form))
        forms.setdefault(text, (name, []))[1].append(h)
    return [HeadGroup(name, text, head_spans(heads)) for text, (name, heads) in forms.items()]


def head_spans(heads: List[int]) -> str:
    """Sorted head indices as spans: ``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], heads[0]
    for prev, cur in zip(heads, heads[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)
