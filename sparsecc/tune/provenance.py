"""Provenance written to a tuned spec's ``[meta.tune]``: what was tuned, on what, when, and how well."""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any, Iterable

import torch

# Hex digits kept of each SHA-256: 64 bits tell calibration sets and configs apart, and stay readable.
HASH_DIGITS = 16


def model_class(model) -> str:
    """The model's class as ``module.QualName``."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def config_hash(model) -> str:
    """SHA-256 of the model's configuration: its ``config`` (HF models) or its parameter names, shapes and dtypes."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    else:
        text = json.dumps([(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_DIGITS]


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for k in sorted(value):
            digest.update(str(k).encode())
            _feed(digest, value[k])
    elif isinstance(value, (list, tuple)):
        for v in value:
            _feed(digest, v)
    else:
        digest.update(repr(value).encode())


def batches_hash(batches: Iterable) -> str:
    """SHA-256 over every batch's tensors (dtype, shape, bytes) and other values, in order."""
    digest = hashlib.sha256()
    for batch in batches:
        _feed(digest, batch)
    return digest.hexdigest()[:HASH_DIGITS]


def count_items(batches) -> int:
    """Calibration examples: the leading dimension of each batch's first tensor, summed."""
    total = 0
    for batch in batches:
        values = batch.values() if isinstance(batch, dict) else (batch if isinstance(batch, (list, tuple)) else [batch])
        first = next((v for v in values if isinstance(v, torch.Tensor)), None)
        total += int(first.shape[0]) if first is not None and first.dim() else 1
    return total


def library_versions() -> dict:
    """Versions of the libraries that shaped a spec: sparsecc, torch and (when installed) transformers."""
    import sys
    import sparsecc
    versions = {"sparsecc": sparsecc.__version__, "torch": str(torch.__version__)}
    loaded = sys.modules.get("transformers")
    if loaded is not None and hasattr(loaded, "__version__"):
        versions["transformers"] = str(loaded.__version__)
    else:
        # Installed but not imported: read its metadata rather than pay for the import.
        from importlib import metadata
        try:
            versions["transformers"] = metadata.version("transformers")
        except metadata.PackageNotFoundError:
            pass
    return versions


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (a string: spec [meta] holds no TOML dates)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def rounded(value: float, digits: int = 6) -> float:
    """A float rounded for the spec file (measurements do not carry more digits than this)."""
    return float(f"{value:.{digits}g}")
