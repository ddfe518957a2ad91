"""A check on every Triton launch the interpreter runs: a tensor passed more than once is never written.

codegen/launch.py's rule: a pointer a launch never touches (an absent optional input, an unused scratch buffer)
still reaches Inductor's copy of the launch, so it must be a tensor the launch only reads, never an alias of one
it writes. An output passed again as such a dummy made Inductor's functionalization of a launch return wrong
results on the GPU, while the eager launch was right; no CPU test can see that directly.

The guard sees it on CPU instead. Under ``TRITON_INTERPRET=1`` every launch goes through
``InterpretedFunction.run``; the guard wraps it, finds the storages that reach one launch through more than one
argument, copies their bytes before the launch and fails the test if the launch changed any of them. The
interpreter children of the kernel test files (tests/interpreter.py) turn it on for every test they run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch


def _storages(values) -> Counter:
    """How many arguments reach each storage (keyed by its address)."""
    count: Counter = Counter()
    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.numel() > 0:
            count[value.untyped_storage().data_ptr()] += 1
    return count


def _bytes(storage) -> torch.Tensor:
    """A uint8 view of a whole storage (bytes compare exactly, NaN payloads included)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _snapshot(values, shared: set) -> dict:
    copies = {}
    for value in values:
        if isinstance(value, torch.Tensor) and value.numel() > 0:
            storage = value.untyped_storage()
            if storage.data_ptr() in shared and storage.data_ptr() not in copies:
                copies[storage.data_ptr()] = (storage, _bytes(storage).clone())
    return copies


class AliasedWriteError(AssertionError):
    """A launch wrote a storage that reached it through more than one argument."""


@contextlib.contextmanager
def guard_launches() -> Iterator[list]:
    """Check every interpreted launch in the block; yields the list of (kernel name, shared storages) it saw."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: list = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        values = list(args) + list(kwargs.values())
        shared = {ptr for ptr, n in _storages(values).items() if n > 1}
        if warmup or not shared:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        before = _snapshot(values, shared)
        result = original(self, *args, grid=grid, warmup=warmup, **kwargs)
        names = self.arg_names
        for ptr, (storage, data) in before.items():
            if not torch.equal(_bytes(storage), data):
                params = [names[i] for i, v in enumerate(args) if isinstance(v, torch.Tensor)
                          and v.numel() > 0 and v.untyped_storage().data_ptr() == ptr]
                params += [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)
                           and v.numel() > 0 and v.untyped_storage().data_ptr() == ptr]
                raise AliasedWriteError(
                    f"{self.__name__} wrote a tensor passed to it as {', '.join(params)}: a dummy pointer must "
                    "be a tensor the launch only reads (codegen/launch.py)")
        seen.append((self.__name__, len(shared)))
        return result

    InterpretedFunction.run = run
    try:
        yield seen
    finally:
        InterpretedFunction.run = original
