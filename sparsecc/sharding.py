"""Tensor parallelism: what one rank holds of a tensor sharded by PyTorch's DTensor (docs/distributed.md).

sparsecc builds no communication of its own. A model parallelised with
``torch.distributed.tensor.parallel.parallelize_module`` reaches the backend
with DTensor parameters and DTensor activations between its projections; this
module only reads their metadata (mesh, placements, global shape) to say which
slice of the global tensor this rank holds. The passes use it to map a spec's
global head indices to a rank's local heads and to run sparse ops on local
shards; ``sparsecc.weights`` uses it to prune a sharded weight with the
unsharded semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def is_dtensor(value) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (real or fake), False for anything else.

    Checked by the type's module and name so that a torch built without
    ``torch.distributed`` needs no import here.
    """
    return any(cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed.tensor")
               for cls in type(value).__mro__)


@dataclass(frozen=True)
class ShardInfo:
    """The slice of a global tensor one rank holds: ``global[offset[d] : offset[d] + local_shape[d]]`` per dim.

    ``dim`` is the one sharded dimension (None when the tensor is replicated
    or its placements are not a single ``Shard`` on a 1-D mesh, see
    ``supported``); ``placements`` is their text, for reasons and reports.
    """

    rank: int                     # this rank's coordinate on the mesh (1-D meshes)
    world: int                    # the mesh size
    global_shape: Tuple[int, ...]
    local_shape: Tuple[int, ...]
    offset: Tuple[int, ...]
    placements: str
    dim: Optional[int]
    partial: bool = False         # some placement is Partial (the local tensor is a summand, not a slice)
    supported: bool = True        # a 1-D mesh with Shard or Replicate placements

    def slices(self) -> Tuple[slice, ...]:
        """Index that cuts this rank's part out of the global tensor."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.local_shape))


def shard_of(value) -> Optional[ShardInfo]:
    """The ``ShardInfo`` of a DTensor (a parameter, or a fake DTensor from a graph node's metadata); None for a
    plain tensor or anything else."""
    if not is_dtensor(value):
        return None
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = value.device_mesh, tuple(value.placements)
    shape = tuple(_hint(d) for d in value.shape)
    text = "(" + ", ".join(str(p) for p in placements) + ")"
    partial = any(isinstance(p, Partial) for p in placements)
    supported = mesh.ndim == 1 and all(isinstance(p, (Shard, Replicate)) for p in placements)
    coordinate = mesh.get_coordinate()
    rank = int(coordinate[0]) if coordinate is not None and mesh.ndim == 1 else -1
    local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    dims = [p.dim % len(shape) for p in placements if isinstance(p, Shard)] if shape else []
    return ShardInfo(rank=rank, world=int(mesh.size()), global_shape=shape, local_shape=tuple(local),
                     offset=tuple(offset), placements=text, dim=dims[0] if len(dims) == 1 else None,
                     partial=partial, supported=supported)


def _hint(dim) -> int:
    """A size as an int; a symbolic size (dynamic shapes) by the hint it was traced with, so that reading it
    installs no guard. Only the sharded dims (weights' and features', which are static) are read exactly."""
    if isinstance(dim, int):
        return dim
    hint = getattr(getattr(dim, "node", None), "hint", None)
    return int(hint) if hint is not None else 1


def head_span(first: int, local: int, total: int, head_dim: int, local_heads: int) -> Tuple[int, int]:
    """(first global head, global head count) of the heads a rank holds, from the output features of the
    projection it computes: ``first .. first + local - 1`` of ``total``.

    The attention views the projection output as ``(..., -1, head_dim)``, so this rank's heads are the global
    ones its feature slice covers. Raises ``ValueError`` when the slice is not a whole number of heads or does
    not hold the ``local_heads`` the attention sees (the sharding cannot be established).
    """
    if total % head_dim or first % head_dim or local % head_dim:
        raise ValueError(f"this rank computes features {first}..{first + local - 1} of {total}, which is not a "
                         f"whole number of heads of {head_dim}")
    if local // head_dim != local_heads:
        raise ValueError(f"this rank's projection holds {local // head_dim} heads, but the attention sees "
                         f"{local_heads}")
    return first // head_dim, total // head_dim


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor of a DTensor (``to_local()``); any other tensor as it is."""
    return value.to_local() if is_dtensor(value) else value


def local_part(full: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """This rank's part of the global tensor ``full`` (a copy, contiguous)."""
    return full[info.slices()].contiguous()


def format_span(first: int, count: int) -> str:
    """``(2, 2)`` -> ``"2-3"``; one head -> ``"2"``."""
    return str(first) if count == 1 else f"{first}-{first + count - 1}"
