"""Where a site's queries sit, from docs/spec.md ("Attention forms"): the base the other oracle modules share.

Imports nothing from sparsecc; ``oracle.py`` re-exports both functions.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def query_positions(sq: int, sk: int) -> torch.Tensor:
    """``p = i + Sk - Sq``: the queries are the last Sq positions."""
    return torch.arange(sq) + (sk - sq)


def causal_keep(sq: int, sk: int) -> torch.Tensor:
    """``j <= p`` as a ``[Sq, Sk]`` mask."""
    return torch.arange(sk)[None, :] <= query_positions(sq, sk)[:, None]
