"""Renderers for ``Report``: terminal table, Markdown, HTML, and file output."""

from __future__ import annotations

import html
import os
from typing import List, Optional

REPORT_SUFFIXES = (".json", ".md", ".html")
_COLUMNS = ("kind", "module", "form", "applied", "launch", "est. speedup", "reason")
_PLAN_COLUMNS = _COLUMNS + ("plan",)   # the Markdown and HTML pages also show each applied site's whole plan


def _fmt_speedup(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rows(report, plan: bool = False) -> List[List[str]]:
    """One row per site; ``launch`` is how its ops run (traced into Inductor's code, or opaque ops), ``plan``
    the plan stage's whole record (op calls with their launch and reason, folded epilogue, gate/up pairing)."""
    rows = []
    for s in report.sites:
        launch = s.attrs.get("launch", "-") if s.applied else "-"
        row = [s.kind, s.module or "<root>", s.form_detail or s.form or "-", "yes" if s.applied else "no", launch,
               _fmt_speedup(s.predicted_speedup), s.reason]
        if plan:
            row.append(s.attrs.get("plan", "") if s.applied else "")
        rows.append(row)
    return rows


def _summary(report) -> str:
    counts = report.counts()
    parts = []
    for kind in ("attention", "ffn", "linear"):
        if counts.get(kind):
            parts.append(f"{kind}: {counts.get(kind + '.applied', 0)}/{counts[kind]} rewritten")
    total_ms = sum(ms for _, ms in report.stages)
    head = (f"sparsecc report: {len(report.sites)} sites in {report.graphs} graph(s); "
            f"spec {report.spec or '(none)'}; kernels={report.kernels}; hardware={report.hardware or '?'}"
            + "".join(f"; {name}={value}" for name, value in sorted(report.options.items())))
    return head + ("\n" + "; ".join(parts) if parts else "") + f"\ncompile stages: {total_ms:.1f} ms"


def render_terminal(report, reason_width: int = 90) -> str:
    """A fixed-width table, one row per site, reasons wrapped to ``reason_width``."""
    rows = [[c if i < 6 else (c if len(c) <= reason_width else c[:reason_width - 3] + "...")
             for i, c in enumerate(r)] for r in _rows(report)]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_COLUMNS)]
    line = "  ".join(h.ljust(w) for h, w in zip(_COLUMNS, widths))
    out = [_summary(report), "", line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if report.warnings:
        out += ["", "warnings:"] + [f"  - {w}" for w in report.warnings]
    if report.stages:
        out += ["", "stages: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in report.stages)]
    return "\n".join(out)


def render_markdown(report) -> str:
    """GitHub-flavoured Markdown: summary, site table, warnings, stage times."""
    def esc(text: str) -> str:
        return text.replace("|", "\\|")
    out = ["# sparsecc compile report", "", "```", _summary(report), "```", "",
           "| " + " | ".join(_PLAN_COLUMNS) + " |", "|" + "---|" * len(_PLAN_COLUMNS)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in _rows(report, plan=True)]
    if report.warnings:
        out += ["", "## Warnings", ""] + [f"- {esc(w)}" for w in report.warnings]
    if report.stages:
        out += ["", "## Stages", "", "| stage | ms |", "|---|---|"]
        out += [f"| {n} | {ms:.2f} |" for n, ms in report.stages]
    return "\n".join(out) + "\n"


def render_html(report) -> str:
    """A standalone HTML page with the same content as the Markdown rendering."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n"
                    for r in _rows(report, plan=True))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _PLAN_COLUMNS)
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in report.warnings)
    stages = "".join(f"<tr><td>{html.escape(n)}</td><td>{ms:.2f}</td></tr>" for n, ms in report.stages)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>sparsecc report</title>"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:left}</style></head><body>"
            f"<h1>sparsecc compile report</h1><pre>{html.escape(_summary(report))}</pre>"
            f"<table><tr>{head}</tr>\n{cells}</table>"
            + (f"<h2>Warnings</h2><ul>{warn}</ul>" if warn else "")
            + (f"<h2>Stages</h2><table><tr><th>stage</th><th>ms</th></tr>{stages}</table>" if stages else "")
            + "</body></html>\n")


def report_suffix(path) -> str:
    """The report format ``path`` names (``.json``, ``.md`` or ``.html``, lower-cased), or "" for none of them."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    return suffix if suffix in REPORT_SUFFIXES else ""


def unwritable_reason(path) -> Optional[str]:
    """Why a report cannot be written at ``path`` (None when it can). A missing folder is a reason: a report
    path is checked before the compile, and a typo in it should not create folders."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "it is a folder"
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is not writable"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def write_report(report, path) -> None:
    """Write ``report`` to ``path`` in the format its suffix names (into an existing folder)."""
    path = os.fspath(path)
    suffix = report_suffix(path)
    if not suffix:
        raise ValueError(f"report path {path!r}: suffix must be one of {REPORT_SUFFIXES}")
    problem = unwritable_reason(path)
    if problem:
        raise OSError(f"report path {path!r} cannot be written: {problem}")
    text = {".json": report.to_json, ".md": report.to_markdown, ".html": report.to_html}[suffix]()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
