"""The user cache directory of sparsecc: measured hardware profiles (``sparsecc.cost.hardware``) and generated
epilogue kernels (``sparsecc.codegen.epilogue``) live under it."""

from __future__ import annotations

import os

__all__ = ["CACHE_ENV", "cache_dir"]

CACHE_ENV = "SPARSECC_CACHE_DIR"


def cache_dir() -> str:
    """$SPARSECC_CACHE_DIR, else $XDG_CACHE_HOME/sparsecc, else ~/.cache/sparsecc."""
    base = os.environ.get(CACHE_ENV)
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "sparsecc")
