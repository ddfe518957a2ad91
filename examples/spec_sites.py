"""Which sites an example's spec means to rewrite, read from the spec and the model alone, and a loud check.

Examples build their reference semantics from ``intended_sites`` (the model's
own module tree and the spec's rules, per docs/spec.md), never from the
compile report, and call ``require_rewrites`` so that a spec which silently
rewrites less than it forces ends the example with a non-zero exit.
"""

from __future__ import annotations

from typing import Optional

import torch

from sparsecc.forms import Dense


def _kind_of(module) -> str:
    name = type(module).__name__
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("MLP"):
        return "ffn"
    return "linear" if isinstance(module, torch.nn.Linear) else ""


def _deciding(spec, kind: str, path: str, head=None):
    """The rule that decides ``path`` (for attention: one head), per docs/spec.md: the last covering rule."""
    rules = [r for r in spec.matching(kind, path) if head is None or r.heads is None or head in r.heads]
    return rules[-1] if rules else None


def intended_sites(model, spec) -> dict:
    """{(kind, module path): form or per-head forms} that the spec forces onto ``model``'s sites.

    A site is intended when its deciding rule (for attention: some head's)
    asks for a sparse form under policy ``force``; the quickstart's spec forces
    everything, so every such site must be rewritten.
    """
    heads = model.config.num_attention_heads
    out = {}
    for path, module in model.named_modules():
        kind = _kind_of(module)
        if not kind or path.endswith("lm_head"):
            continue
        if kind == "attention":
            forms = []
            for h in range(heads):
                rule = _deciding(spec, kind, path, h)
                sparse = rule is not None and not isinstance(rule.form, Dense) and spec.policy_for(rule) == "force"
                forms.append(rule.form if sparse else None)
            if any(forms):
                out[(kind, path)] = forms
        else:
            rule = _deciding(spec, kind, path)
            if rule is not None and not isinstance(rule.form, Dense) and spec.policy_for(rule) == "force":
                out[(kind, path)] = rule.form
    return out


def require_rewrites(report, spec, intended: Optional[dict] = None) -> None:
    """Exit non-zero when the compile rewrote less than the spec forces.

    With ``intended`` (from ``intended_sites``), every intended site must be
    rewritten; without it, every sparse rule under policy ``force`` must have
    rewritten at least one site.
    """
    applied = {(s.kind, s.module) for s in report.sites if s.applied}
    if intended is not None:
        missing = sorted(set(intended) - applied)
        if missing:
            raise SystemExit("the spec forces sparse forms on sites the compile did not rewrite: "
                             + ", ".join(f"{kind} {path}" for kind, path in missing))
        return
    used = {key.strip() for s in report.sites if s.applied and s.rule for key in s.rule.split(",")}
    idle = [rule.key for kind in ("attention", "ffn", "linear") for rule in spec.rules(kind)
            if not isinstance(rule.form, Dense) and spec.policy_for(rule) == "force" and rule.key not in used]
    if idle:
        raise SystemExit(f"spec rules that force a sparse form rewrote nothing: {', '.join(idle)}")
