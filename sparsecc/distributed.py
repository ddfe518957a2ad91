"""One report for a tensor-parallel compile: every rank's sites, gathered on one rank (docs/distributed.md)."""

from __future__ import annotations

import copy
from typing import Optional

from sparsecc.backend import last_report
from sparsecc.report.model import Report


def gather_reports(report: Optional[Report] = None, dst: int = 0, group=None) -> Optional[Report]:
    """Gather every rank's report on rank ``dst`` (``torch.distributed.gather_object``); call it on every rank.

    ``report`` defaults to this rank's ``sparsecc.last_report()``. On ``dst`` it returns one report holding the
    sites of all ranks in rank order, each with ``attrs["rank"]`` and its reason prefixed ``[rank r]``, and the
    notes of every rank; the other ranks get None. Needs an initialised process group (``RuntimeError``
    otherwise); ``dst`` is a global rank, ``group`` the process group (default: the world).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sparsecc.gather_reports needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    mine = report if report is not None else last_report()
    gathered = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(mine, gathered, dst=dst, group=group)
    if gathered is None:
        return None
    combined = Report()
    for rank, part in enumerate(gathered):
        if part is None:
            combined.notes.append(f"rank {rank}: no report (nothing was compiled there)")
            continue
        part = copy.deepcopy(part)
        for site in part.sites:
            site.attrs = {**site.attrs, "rank": rank}
            site.reason = f"[rank {rank}] {site.reason}"
            combined.sites.append(site)
        combined.notes.extend(f"rank {rank}: {note}" for note in part.notes)
        combined.stages.extend((f"rank {rank} {name}", ms) for name, ms in part.stages)
        combined.spec = combined.spec or part.spec
        combined.kernels, combined.hardware = part.kernels, part.hardware or combined.hardware
        combined.options = {**combined.options, **part.options}
        combined.graphs = max(combined.graphs, part.graphs)
        combined.rules.update(part.rules)
        combined.matched_rules.extend(k for k in part.matched_rules if k not in combined.matched_rules)
        combined.recompiles += part.recompiles
    return combined
