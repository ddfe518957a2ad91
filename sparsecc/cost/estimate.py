"""The one estimate type: what the cost model predicts for a site, carried unchanged to the decision and the report.

``estimate_attention`` / ``estimate_linear`` / ``estimate_ffn`` return an
``Estimate``; a ``check`` puts it into its ``Decision``; the report's
``SiteRecord`` embeds it. Nothing copies it field by field, so a field added
here (``worst_tokens`` was once dropped on the way to the report) reaches
every reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Crossover:
    """Where a sparse form starts to pay along one size.

    ``threshold`` is the smallest value of ``symbol`` from which sparse wins
    (None when it never does within the search range; 1 when it always does).
    A compiled attention op runs dense below it (``dense_below``).
    """

    symbol: str
    threshold: Optional[int]

    @property
    def always(self) -> bool:
        """Sparse wins at every size."""
        return self.threshold == 1

    @property
    def never(self) -> bool:
        """Sparse never wins."""
        return self.threshold is None

    def __str__(self) -> str:
        if self.never:
            return f"dense for every {self.symbol}"
        if self.always:
            return f"sparse for every {self.symbol}"
        return f"sparse when {self.symbol} >= {self.threshold}"


@dataclass(frozen=True)
class Estimate:
    """Dense and sparse FLOPs, bytes and predicted seconds of one site, plus how a symbolic size was judged.

    ``crossover`` is set when the sequence length is symbolic: the length
    from which the sparse form wins by the margin. ``worst_tokens`` is set
    when the token count is symbolic: the probed count with the lowest
    predicted speedup, at which the figures are taken.
    """

    dense_flops: float
    sparse_flops: float
    dense_bytes: float
    sparse_bytes: float
    dense_time_s: float
    sparse_time_s: float
    crossover: Optional[Crossover] = None
    worst_tokens: Optional[int] = None

    @property
    def speedup(self) -> float:
        """Predicted dense time / sparse time."""
        return self.dense_time_s / self.sparse_time_s if self.sparse_time_s > 0 else float("inf")

    @property
    def density(self) -> float:
        """Kept work: sparse FLOPs / dense FLOPs (a dynamic form's estimate pass included); 1 without dense work."""
        return self.sparse_flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def crossover_at(self) -> Optional[int]:
        """The crossover's threshold (None: no symbolic size, or sparse never wins)."""
        return None if self.crossover is None else self.crossover.threshold


__all__ = ["Crossover", "Estimate"]
