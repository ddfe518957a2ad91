"""Compile-time reports: ``Report`` and ``SiteRecord``, with terminal, Markdown, HTML and JSON renderers."""

from sparsecc.report.model import Report, SiteRecord
from sparsecc.report.render import REPORT_SUFFIXES

__all__ = ["Report", "SiteRecord", "REPORT_SUFFIXES"]
