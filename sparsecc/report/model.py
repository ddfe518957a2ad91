"""The compile-time report: every site found, what was decided, why, and the estimates."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class SiteRecord:
    """One site in the report (plain data: renderers and JSON need nothing else)."""

    kind: str                  # "attention" | "ffn" | "linear"
    module: str                # qualified module path, as in model.named_modules()
    form: Optional[str]        # form name ("streaming", "2:4", ...) or None when no rule names one
    applied: bool
    reason: str                # one sentence
    rule: Optional[str] = None
    policy: Optional[str] = None
    form_detail: Optional[str] = None
    spelling: str = ""
    shapes: Dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    device: str = ""
    attrs: Dict[str, Any] = field(default_factory=dict)
    graph: int = 0
    density: Optional[float] = None
    dense_flops: Optional[float] = None
    sparse_flops: Optional[float] = None
    dense_bytes: Optional[float] = None
    sparse_bytes: Optional[float] = None
    dense_time_us: Optional[float] = None
    sparse_time_us: Optional[float] = None
    crossover: Optional[str] = None   # for symbolic sizes, e.g. "sparse when seq_k >= 3712"

    @property
    def predicted_speedup(self) -> Optional[float]:
        """Estimated dense time / sparse time, when an estimate exists."""
        if self.dense_time_us is None or not self.sparse_time_us:
            return None
        return self.dense_time_us / self.sparse_time_us

    def to_dict(self) -> Dict[str, Any]:
        """Plain-dict form (JSON-ready), including the predicted speedup."""
        d = asdict(self)
        d["predicted_speedup"] = self.predicted_speedup
        return d


@dataclass
class Report:
    """All sites of one compile (every graph Dynamo handed over), plus warnings and stage times."""

    sites: List[SiteRecord] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    stages: List[Tuple[str, float]] = field(default_factory=list)   # (stage name, milliseconds)
    spec: Optional[str] = None
    kernels: str = "auto"
    hardware: str = ""
    graphs: int = 0

    def extend(self, other: "Report") -> None:
        """Append another graph's report to this one (graph indices are renumbered)."""
        for site in other.sites:
            site.graph = self.graphs + site.graph
            self.sites.append(site)
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)
        self.stages.extend(other.stages)
        self.spec = self.spec or other.spec
        self.kernels = other.kernels
        self.hardware = other.hardware or self.hardware
        self.graphs += max(1, other.graphs)

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
        return {"spec": self.spec, "kernels": self.kernels, "hardware": self.hardware, "graphs": self.graphs,
                "sites": [s.to_dict() for s in self.sites], "warnings": list(self.warnings),
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
