"""The data every rewrite shares: sites, decisions and the rewrite triple (estimates: ``sparsecc.cost.Estimate``).

A rewrite family (attention, ffn, linear) is a table of ``Rewrite`` entries.
Each entry is a search -> check -> replace triple:

* ``search(gm, ctx)`` finds sites structurally and returns ``Site`` objects;
  it never decides anything;
* ``check(site, ctx)`` is the one decision point: it consults the spec and the
  cost model and returns a ``Decision`` with a one-sentence reason;
* ``plan(site, decision, ctx)`` makes the remaining choices for an applied
  site (the op calls and their launch, epilogue folding, gate/up pairing) and
  returns a ``passes.plan.Plan``, stored in the decision;
* ``replace(gm, site, decision, ctx)`` executes that plan: it rewrites the
  site into ``torch.ops.sparsecc.*`` custom ops, deciding nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.fx import GraphModule, Node

# The cost model's estimate is the one estimate type: decisions carry it and the report embeds it as it is.
from sparsecc.cost.estimate import Estimate
from sparsecc.forms import Form

log = logging.getLogger("sparsecc")

# Set to 1 to log, for every candidate node, why it did not become a site.
DEBUG_MATCH_ENV = "SPARSECC_DEBUG_MATCH"


def debug_no_match(kind: str, node: Node, why: str) -> None:
    """Log why ``node`` did not become a ``kind`` site: at DEBUG (``TORCH_LOGS=+sparsecc``), or as a warning
    when SPARSECC_DEBUG_MATCH is set."""
    loud = os.environ.get(DEBUG_MATCH_ENV, "") not in ("", "0")
    if loud or log.isEnabledFor(logging.DEBUG):
        log.log(logging.WARNING if loud else logging.DEBUG, "sparsecc: %s candidate %s not matched: %s",
                kind, node.name, why)


@dataclass
class Site:
    """One matched attention / ffn / linear computation in the graph."""

    kind: str                       # "attention" | "ffn" | "linear"
    module: str                     # qualified module path, as in model.named_modules()
    output: Node                    # the node whose value the site produces
    nodes: Tuple[Node, ...]         # nodes that belong to the site (removed when it is rewritten)
    shapes: Dict[str, tuple]        # named operand shapes (hints for symbolic sizes)
    dtype: torch.dtype
    device: torch.device
    attrs: Dict[str, Any] = field(default_factory=dict)   # causal, heads, activation, bias, ...
    match: Any = None               # the family's own match record
    spelling: str = ""              # which search found it (e.g. "sdpa", "softmax")
    symbolic: bool = False          # True when some size is symbolic
    parent: Optional["Site"] = None  # the ffn site a linear belongs to

    @property
    def label(self) -> str:
        """Readable identifier, e.g. ``attention @ layers.0.self_attn``."""
        return f"{self.kind} @ {self.module or '<root>'}"


@dataclass(frozen=True)
class HeadGroup:
    """Heads of one attention site that get one form: its name ("streaming", "dense"), its text with the
    parameters ("streaming(sink=4, window=64)") and the heads as spans ("0-3, 6")."""

    name: str
    text: str
    heads: str


@dataclass(frozen=True)
class Decision:
    """What ``check`` decided for one site, and why."""

    apply: bool
    form: Optional[Form]
    reason: str
    estimate: Optional[Estimate] = None
    rule: Optional[str] = None      # the spec rule that named the form, e.g. "attention[1]"
    policy: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)  # resolved per-site parameters (per-head lists, taus)
    head_forms: Tuple[HeadGroup, ...] = ()   # a site whose heads ask for different forms: each form, its heads
    program: str = "triton"           # the kernels an attention site's estimate timed (cost.formulas.PROGRAMS)
    plan: Any = None                  # the plan stage's ``passes.plan.Plan`` for an applied site


@dataclass(frozen=True)
class Rewrite:
    """A named search -> check -> replace triple."""

    name: str
    kind: str
    search: Callable[[GraphModule, Any], List[Site]]
    check: Callable[[Site, Any], Decision]
    replace: Callable[[GraphModule, Site, Decision, Any], None]
    plan: Callable[[Site, Decision, Any], Any]   # the plan stage's part: returns a passes.plan.Plan
