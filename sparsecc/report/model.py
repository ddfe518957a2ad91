"""The compile-time report: every site found, what was decided, why, and the estimates."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from sparsecc.cost.estimate import Estimate
from sparsecc.spec.schema import rule_sort_key  # noqa: F401 (part of this module's interface)

# How many of the report's notes the one-line summary carries, and how long each may be there.
SUMMARY_NOTES = 3
SUMMARY_NOTE_CHARS = 200


class _FromEstimate:
    """A figure of the embedded estimate under the report's name and unit (``dense_time_us``: seconds x 1e6);
    None when the site has no estimate."""

    def __init__(self, attr: str, scale: float = 1.0):
        self.attr, self.scale = attr, scale

    def __get__(self, record, owner=None):
        if record is None:
            return self
        estimate = record.estimate
        if estimate is None:
            return None
        value = getattr(estimate, self.attr)
        return value * self.scale if value is not None and self.scale != 1.0 else value

    def __set__(self, record, value) -> None:
        # A data descriptor, so an assignment cannot shadow the figure with a copy that drifts from the estimate.
        raise AttributeError(f"SiteRecord.{self.attr} reads the embedded estimate; pass estimate= instead")


# Keys of an estimate in a site's JSON, in their order (the flat shape of earlier reports, plus crossover_at and
# worst_tokens).
ESTIMATE_KEYS = ("density", "dense_flops", "sparse_flops", "dense_bytes", "sparse_bytes", "dense_time_us",
                 "sparse_time_us", "crossover", "crossover_at", "worst_tokens")


def token_phase(site: "SiteRecord") -> str:
    """``"decode"`` for a site that reads one token per sequence (one query row; an FFN or linear input of one
    position, ``[B, 1, D]``, or one row ``[1, D]``), else ``"prefill"`` (also when the count is symbolic): a site's
    decisions may differ between the two (a rule's ``phase``, the one-token FFN op), so a recompile replaces only
    the records of its own phase."""
    shape = site.shapes.get("q" if site.kind == "attention" else "x")
    if not shape or len(shape) < 2 or not all(isinstance(n, int) for n in shape):
        return "prefill"
    return "decode" if shape[-2] == 1 else "prefill"


@dataclass
class SiteRecord:
    """One site in the report (plain data: renderers and JSON need nothing else).

    ``estimate`` is the decision's ``sparsecc.cost.Estimate`` itself (None
    when the site was never estimated); ``density``, ``dense_flops``, ...,
    ``dense_time_us``, ``crossover`` (its text) and ``predicted_speedup`` read
    it in the report's units.
    """

    kind: str                  # "attention" | "ffn" | "linear"
    module: str                # qualified module path, as in model.named_modules()
    form: Optional[str]        # the deciding rule's form name ("streaming", "2:4", ...); None when no rule names one
    applied: bool
    reason: str                # one sentence
    rule: Optional[str] = None
    policy: Optional[str] = None
    form_detail: Optional[str] = None   # the form with its parameters; per head group when the heads differ
    forms: List[str] = field(default_factory=list)   # every form the site's heads get, in head order ("dense"
    #                                                  for dense heads); filter on this, not on ``form``
    spelling: str = ""
    shapes: Dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    device: str = ""
    attrs: Dict[str, Any] = field(default_factory=dict)
    graph: int = 0
    frame: Optional[int] = None   # the Dynamo frame whose graph holds the site (a recompile replaces its sites)
    estimate: Optional[Estimate] = None

    density = _FromEstimate("density")
    dense_flops = _FromEstimate("dense_flops")
    sparse_flops = _FromEstimate("sparse_flops")
    dense_bytes = _FromEstimate("dense_bytes")
    sparse_bytes = _FromEstimate("sparse_bytes")
    dense_time_us = _FromEstimate("dense_time_s", 1e6)
    sparse_time_us = _FromEstimate("sparse_time_s", 1e6)
    worst_tokens = _FromEstimate("worst_tokens")
    crossover_at = _FromEstimate("crossover_at")

    @property
    def crossover(self) -> Optional[str]:
        """For a symbolic sequence length, where sparse starts to win, e.g. "sparse when seq_k >= 3712"."""
        cross = None if self.estimate is None else self.estimate.crossover
        return None if cross is None else str(cross)

    @property
    def predicted_speedup(self) -> Optional[float]:
        """Estimated dense time / sparse time, when an estimate exists."""
        if self.estimate is None or not self.estimate.sparse_time_s:
            return None
        return self.estimate.speedup

    def to_dict(self) -> Dict[str, Any]:
        """Plain-dict form (JSON-ready): the fields, the estimate's figures flat beside them, the speedup."""
        d = asdict(self)
        del d["estimate"]
        d.update((key, getattr(self, key)) for key in ESTIMATE_KEYS)
        d["predicted_speedup"] = self.predicted_speedup
        return d


@dataclass
class Report:
    """All sites of one compile (every graph Dynamo handed over), plus warnings and stage times.

    ``rules`` lists the spec's rules (key -> its ``modules`` glob and kind) and
    ``matched_rules`` the keys that cover at least one site of any graph, so
    that a rule which matches nothing is reported once per compile, not per
    graph. ``frames`` maps each site's graph to the Dynamo frame it came from:
    a recompile of a frame replaces that frame's earlier sites.
    """

    sites: List[SiteRecord] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    stages: List[Tuple[str, float]] = field(default_factory=list)   # (stage name, milliseconds)
    spec: Optional[str] = None
    kernels: str = "auto"
    hardware: str = ""
    graphs: int = 0
    rules: Dict[str, Tuple[str, str]] = field(default_factory=dict)   # rule key -> (kind, modules glob)
    matched_rules: List[str] = field(default_factory=list)
    # rule key -> a module path its glob names although no site of its kind is there (MoE experts, code sparsecc
    # does not recognise): told apart from a glob that names no module at all (a typo)
    rule_modules: Dict[str, str] = field(default_factory=dict)
    deciding_rules: List[str] = field(default_factory=list)   # rules that decide some site, or some head of one
    covering_rules: List[str] = field(default_factory=list)   # rules covering some site at its phase and heads
    frame: Optional[int] = None         # the Dynamo frame of a one-graph report (None: unknown)
    recompiles: int = 0
    options: Dict[str, Any] = field(default_factory=dict)   # backend options that change the rewritten graph

    def extend(self, other: "Report") -> None:
        """Append another graph's report to this one (graph indices are renumbered).

        When ``other`` recompiles a frame this report already holds, the
        frame's earlier sites at the same module paths and of the same phase
        (:func:`token_phase`) are replaced, so a recompile never lists a site
        twice, while ``generate()`` keeps its prefill's decisions beside its
        decode steps'. The same code run by another module (a graph break
        inside a decoder layer's forward: each layer is a compile of one frame)
        has other paths, and its sites are added.
        """
        if other.frame is not None:
            again = {(s.kind, s.module, token_phase(s)) for s in other.sites}
            kept = [s for s in self.sites
                    if s.frame != other.frame or (s.kind, s.module, token_phase(s)) not in again]
            if len(kept) < len(self.sites):
                self.sites = kept
                self.recompiles += 1
        for site in other.sites:
            site.graph = self.graphs + site.graph
            site.frame = other.frame
            self.sites.append(site)
        self.notes.extend(w for w in other.notes if w not in self.notes)
        self.stages.extend(other.stages)
        self.spec = self.spec or other.spec
        self.kernels = other.kernels
        self.options = {**self.options, **other.options}
        self.hardware = other.hardware or self.hardware
        self.graphs += max(1, other.graphs)
        self.rules.update(other.rules)
        self.matched_rules.extend(k for k in other.matched_rules if k not in self.matched_rules)
        for key, path in other.rule_modules.items():
            self.rule_modules.setdefault(key, path)
        self.deciding_rules.extend(k for k in other.deciding_rules if k not in self.deciding_rules)
        self.covering_rules.extend(k for k in other.covering_rules if k not in self.covering_rules)

    def unmatched_rules(self) -> List[str]:
        """The spec rules that cover no site of any graph, as ``key (modules='glob')``; when the glob names modules
        of the model, one of them and that no site of the rule's kind is there."""
        out = []
        for key, (kind, glob) in self._sorted_rules():
            if key in self.matched_rules:
                continue
            path = self.rule_modules.get(key)
            there = ""
            if path is not None:
                deeper = [s.module for s in self.sites
                          if s.kind == kind and (path == "" or s.module.startswith(path + "."))]
                named = "the whole model (module '')" if path == "" else f"module {path!r}"
                there = (f": names {named}, whose {kind} sites sit deeper (e.g. {deeper[0]!r}); a rule "
                         f"names a site's own module" if deeper else
                         f": names {named}, but no {kind} site is in it")
            out.append(f"{key} (modules={glob!r}{there})")
        return out

    def overridden_rules(self) -> List[str]:
        """The rules that cover sites but decide none of them, or none of their heads: a later rule covers every
        one (a duplicated rule, a rule before a catch-all), so the rule does nothing."""
        return [key for key, _ in self._sorted_rules() if key in self.covering_rules and key not in self.deciding_rules]

    def _sorted_rules(self) -> List[Tuple[str, Tuple[str, str]]]:
        # Reports merged from several graphs can hold the keys in any order; list them numerically.
        return sorted(self.rules.items(), key=lambda item: rule_sort_key(item[0]))

    @property
    def warnings(self) -> List[str]:
        """Everything the user should look at: notes of the stages, rules that match nothing, recompiles."""
        out = list(self.notes)
        out += [f"{key} (modules={glob!r}) matches no {kind} site" for key, (kind, glob) in self._sorted_rules()
                if key not in self.matched_rules]
        if self.recompiles:
            out.append(f"{self.recompiles} recompile(s): each frame shows the sites of its latest graph")
        return out

    def summary(self) -> str:
        """One line: ``K/N sites rewritten (per kind); rules that matched nothing: ...``, then the stages' notes
        (e.g. a rule naming heads a site does not have)."""
        counts = self.counts()
        kinds = ", ".join(f"{kind} {counts.get(kind + '.applied', 0)}/{counts[kind]}"
                          for kind in ("attention", "ffn", "linear") if counts.get(kind))
        line = f"{len(self.applied)}/{len(self.sites)} sites rewritten" + (f" ({kinds})" if kinds else "")
        if self.spec is None:
            line += "; no spec given, so every site stays dense"
        unmatched = self.unmatched_rules()
        # With graph breaks each graph adds its sites: a rule may still match in a graph compiled later.
        so_far = f" in the {self.graphs} graphs so far" if self.graphs > 1 else ""
        line += f"; rules that matched nothing{so_far}: " + (", ".join(unmatched) if unmatched else "none")
        if unmatched and self.spec is not None:
            line += f" (spec {self.spec})"   # the warning stands alone in a log: say which file the keys are in
        overridden = self.overridden_rules()
        if overridden:
            line += f"; rules that later rules override at every site they cover{so_far}: {', '.join(overridden)}"
        if self.notes:   # the first few, each cut short: the line is warned and logged at every compile
            shown = [note if len(note) <= SUMMARY_NOTE_CHARS else note[:SUMMARY_NOTE_CHARS - 3] + "..."
                     for note in self.notes[:SUMMARY_NOTES]]
            more = len(self.notes) - len(shown)
            line += "; " + "; ".join(shown) + (f"; {more} more note(s) in the report" if more else "")
        return line

    @property
    def applied(self) -> List[SiteRecord]:
        """The sites that were rewritten."""
        return [s for s in self.sites if s.applied]

    def counts(self) -> Dict[str, int]:
        """Number of sites found and applied, per kind (keys like "attention", "attention.applied")."""
        out: Dict[str, int] = {}
        for s in self.sites:
            out[s.kind] = out.get(s.kind, 0) + 1
            if s.applied:
                out[f"{s.kind}.applied"] = out.get(f"{s.kind}.applied", 0) + 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Plain-dict form of the whole report."""
        return {"spec": self.spec, "kernels": self.kernels, "options": dict(self.options),
                "hardware": self.hardware, "graphs": self.graphs,
                "sites": [s.to_dict() for s in self.sites], "warnings": list(self.warnings),
                "summary": self.summary(),
                "stages_ms": [{"stage": n, "ms": ms} for n, ms in self.stages], "counts": self.counts()}

    def to_json(self, indent: int = 2) -> str:
        """JSON text of ``to_dict()``."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_markdown(self) -> str:
        """Markdown rendering (a table of sites, then warnings and stage times)."""
        from sparsecc.report.render import render_markdown
        return render_markdown(self)

    def to_html(self) -> str:
        """Standalone HTML page."""
        from sparsecc.report.render import render_html
        return render_html(self)

    def save(self, path) -> None:
        """Write the report; the format follows the suffix (.json, .md or .html)."""
        from sparsecc.report.render import write_report
        write_report(self, path)

    def __str__(self) -> str:
        from sparsecc.report.render import render_terminal
        return render_terminal(self)
