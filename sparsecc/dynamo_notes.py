"""Why Dynamo may have handed sparsecc no graph: the text of the compile warnings that say a model ran without
sparsecc (``backend.first_call_check`` and Dynamo's recompile-limit message, ``backend._RecompileLimitFilter``).
Nothing here runs at import."""

from __future__ import annotations

from typing import Any, Optional

import torch

__all__ = ["no_graph_reason", "code_name", "cache_entries"]


def no_graph_reason(code: Any = None) -> str:
    """Why Dynamo may have compiled nothing, and what to do (for the warnings of ``backend.first_call_check`` and
    ``backend._RecompileLimitFilter``)."""
    config = torch._dynamo.config
    if getattr(config, "disable", False):
        return "Dynamo is disabled (torch._dynamo.config.disable, TORCHDYNAMO_DISABLE=1)."
    limit = getattr(config, "recompile_limit", getattr(config, "cache_size_limit", "?"))
    total = getattr(config, "accumulated_recompile_limit", getattr(config, "accumulated_cache_size_limit", "?"))
    where = "the compiled code"
    if isinstance(code, type(no_graph_reason.__code__)):
        where = code_name(code)
        entries = cache_entries(code)
        if entries is not None:
            where += f", which holds {entries} compiled entries already"
    return (f"Typically Dynamo's recompile limit: Dynamo keeps compiles on the code object, and every compile of "
            f"one model class (every HF model shares transformers' forward wrapper) counts against "
            f"torch._dynamo.config.recompile_limit ({limit}) and accumulated_recompile_limit ({total}) for "
            f"{where}; past the limit Dynamo runs that code eagerly, for this compile and every later one. "
            f"Call torch._dynamo.reset() between compiles (trying several specs in one process), or raise "
            f"torch._dynamo.config.recompile_limit; also check that Dynamo is not disabled "
            f"(torch.compiler.set_stance('force_eager'), TORCHDYNAMO_DISABLE=1).")


def code_name(code) -> str:
    """A code object as the warnings name it: ``'forward' (file.py:12)``."""
    return f"'{code.co_name}' ({code.co_filename}:{code.co_firstlineno})"


def cache_entries(code) -> Optional[int]:
    """How many compiled entries Dynamo holds on ``code`` (all isolation regions), or None when torch cannot say."""
    from torch._dynamo import eval_frame

    try:
        if hasattr(eval_frame, "_get_total_cache_entry_count"):
            return int(eval_frame._get_total_cache_entry_count(code))
        return len(eval_frame._debug_get_cache_entry_list(code))
    except Exception:   # a private helper of Dynamo's: only the count in a message depends on it
        return None
