"""Replay the dense layers before a thresholded one: per-projection measurements without recomputing the prefix.

A sensitivity table thresholds one projection at a time. Every layer of the
stack (an ``nn.ModuleList`` holding every FFN site, e.g. ``model.layers`` of a
transformers decoder) that runs before that projection's layer sees only dense
inputs, so it computes what it computed in the dense run: its outputs can be
recorded once and replayed. The layers before the projection's layer are
swapped for :class:`_Replay` modules that return the recorded output; on a
30-layer model this halves the cost of a table.

That holds when the layers run in index order, once each per forward. A model
that runs them otherwise (reversed, shared, skipped) would silently compute
something else, so :class:`LayerPrefix` checks it once: every layer must have
run once per batch in index order, and the model with all but the last layer
replayed must give the dense output; otherwise replaying is switched off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from sparsecc.tune.capture import first_tensor, run


class _Replay(torch.nn.Module):
    """Stands in for a layer: returns that layer's recorded dense output for the batch being run."""

    def __init__(self, outputs: List[object], current: List[int]):
        super().__init__()
        self.outputs = outputs
        self.current = current

    def forward(self, *args, **kwargs):
        out = self.outputs[self.current[0]]
        # A copy: a later layer that updated its input in place must not change the recording.
        return out.clone() if isinstance(out, torch.Tensor) else out


def find_stack(model: torch.nn.Module, sites: Sequence[str]) -> Optional[Tuple[str, torch.nn.ModuleList]]:
    """(path, ModuleList) of the layer stack that holds every site (``<path>.<i>.…``), or None."""
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{path}." if path else ""
        if sites and all(s.startswith(prefix) and s[len(prefix):].split(".")[0].isdigit() for s in sites):
            return path, module
    return None


class LayerPrefix:
    """Recorded dense outputs of every layer of the stack holding ``sites``, per batch, and a replaying context.

    ``dense`` are the model's dense outputs on ``batches``. ``enabled`` is
    False when no stack holds every site or when replaying does not reproduce
    the dense output (then :meth:`replaying` does nothing).
    """

    def __init__(self, model: torch.nn.Module, batches: Sequence, sites: Sequence[str]):
        self.model = model
        self.batches = list(batches)
        self.current = [0]
        found = find_stack(model, list(sites))
        self.path, self.stack = found if found is not None else ("", None)
        self.outputs: List[List[object]] = []
        self.enabled = False
        if self.stack is None:
            self.dense = [run(model, b) for b in self.batches]
            return
        self.outputs = [[] for _ in self.stack]
        self.order: List[int] = []
        handles = [layer.register_forward_hook(self._recorder(i)) for i, layer in enumerate(self.stack)]
        try:
            self.dense = [run(model, b) for b in self.batches]
        finally:
            for h in handles:
                h.remove()
        if self.order != list(range(len(self.stack))) * len(self.batches):
            return   # the layers did not run once each, in index order: replaying would compute something else
        self.enabled = True
        replayed = self.run_batches(len(self.stack) - 1)
        self.enabled = all(torch.allclose(first_tensor(d), first_tensor(r), rtol=1e-5, atol=1e-6)
                           for d, r in zip(self.dense, replayed))

    def _recorder(self, index: int):
        def hook(module, args, out):
            self.order.append(index)
            self.outputs[index].append(out)
        return hook

    def layer_of(self, site: str) -> int:
        """The index in the stack of the layer holding ``site`` (0 when replaying is off)."""
        if not self.enabled:
            return 0
        prefix = f"{self.path}." if self.path else ""
        return int(site[len(prefix):].split(".")[0])

    @contextlib.contextmanager
    def replaying(self, first: int) -> Iterator[None]:
        """Layers ``[0, first)`` replay their dense outputs for the duration (batch chosen by :meth:`run_batches`)."""
        if not self.enabled or first <= 0:
            yield
            return
        originals = [self.stack[i] for i in range(first)]
        try:
            for i in range(first):
                self.stack[i] = _Replay(self.outputs[i], self.current)
            yield
        finally:
            for i, layer in enumerate(originals):
                self.stack[i] = layer

    def run_batches(self, first: int) -> List[object]:
        """The model's outputs on every batch with layers before ``first`` replayed (all run when it is off)."""
        outs = []
        with self.replaying(first):
            for i, batch in enumerate(self.batches):
                self.current[0] = i
                outs.append(run(self.model, batch))
        return outs


__all__ = ["LayerPrefix", "find_stack"]
