"""The plan stage's records: what ``replace`` will emit for a decided site, decided before any rewrite.

After ``decide`` has chosen a form for every site, each family's ``plan`` function makes the remaining
choices for the applied sites and writes them into the site's :class:`Plan`:

* which op each call uses and its typed arguments (:class:`OpCall`), which fixes the kernel variant
  (``impl``, the crossover branch) and whether the call is traced into Inductor's graph or stays an
  opaque op, with the record's reason;
* for weight-sparse linears, the epilogue chain the op takes over and the gate/up pairing.

``replace`` then only executes the plan: it inserts the planned calls, reading the current graph's
nodes for their tensor inputs. The report shows every plan (``Plan.summary``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from sparsecc.codegen.op_record import OpRecord

__all__ = ["OpCall", "Plan", "op_call"]


@dataclass(frozen=True)
class OpCall:
    """One planned op call: the record, its typed arguments and how it will be launched."""

    record: OpRecord
    args: Any
    launch: str          # "inductor" (traced into Inductor's graph) or "opaque" (one op via the dispatcher)
    why: str = ""        # the record's reason when opaque

    def describe(self) -> str:
        """``streaming_attention: inductor`` or ``block_sparse_linear: opaque (reason)``."""
        return f"{self.record.name}: {self.launch}" + (f" ({self.why})" if self.why else "")


def op_call(record: OpRecord, args: Any, device: torch.device, symbolic: bool) -> OpCall:
    """Plan one call of ``record`` with ``args`` on ``device`` (``symbolic``: some input shape is symbolic)."""
    launch, why = record.launch_mode(args, device, symbolic)
    return OpCall(record, args, launch, why)


@dataclass
class Plan:
    """Everything ``replace`` does for one applied site, decided by the plan stage."""

    calls: List[OpCall] = field(default_factory=list)
    notes: Dict[str, str] = field(default_factory=dict)   # e.g. epilogue chain, gate/up pairing
    fused_into: Optional[str] = None   # this site's computation is emitted by another site's op (its label)
    state: Dict[str, Any] = field(default_factory=dict)   # family-private data replace needs (not reported)

    def launch(self) -> str:
        """How the site's calls are launched: "inductor", "opaque", or "mixed" (several calls that differ)."""
        kinds = {c.launch for c in self.calls}
        if not kinds:
            return "fused" if self.fused_into else "none"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def summary(self) -> str:
        """One line for the report: the calls with their launch, then the notes."""
        parts = [c.describe() for c in _distinct(self.calls)]
        if self.fused_into:
            parts.append(f"computed by the op of {self.fused_into}")
        parts.extend(f"{k}: {v}" for k, v in self.notes.items())
        return "; ".join(parts)


def _distinct(calls: List[OpCall]) -> List[OpCall]:
    """Calls with the same description once (an input-mode FFN plans three alike)."""
    seen, out = set(), []
    for call in calls:
        text = call.describe()
        if text not in seen:
            seen.add(text)
            out.append(call)
    return out
