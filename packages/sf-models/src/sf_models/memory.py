"""What a region of code allocates: peak live bytes of the tensors torch ops create in it.

``torch.cuda.max_memory_allocated`` answers this on a GPU, but CPU ranks have no allocator
statistics (the process's peak RSS includes loading and everything before). The meter
counts on any device, per op, from the ops themselves::

    with ActivationMeter() as meter:
        out = model(**inputs)
    meter.peak_bytes    # most bytes held at once by tensors created inside the block
    meter.peak_op       # the op after which that peak was reached

A tensor counts from the op that allocated its storage until the storage is freed; views and
in-place results share their input's storage and add nothing; tensors that existed before
the block (weights, the inputs) are not counted. ``check`` sees every op's outputs (the
full-sequence audit in the model tests uses it to fail on a tensor holding every token).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["ActivationMeter"]

Check = Callable[[Any, torch.Tensor], None]


class ActivationMeter(TorchDispatchMode):
    """Peak bytes held by tensors allocated inside the ``with`` block (see the module
    docstring). ``check(op, tensor)``, if given, is called on every op output."""

    def __init__(self, check: Check | None = None) -> None:
        super().__init__()
        self.check = check
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_op = ""
        self._tracked: set[int] = set()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if self.check is not None:
                self.check(func, t)
            self._track(t.untyped_storage(), inputs)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_op = self.live_bytes, str(func)
        return out

    def _track(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key = id(storage)
        if key in inputs or key in self._tracked:
            return  # a view or an in-place result: its storage is already counted, or older
        self._tracked.add(key)
        self.live_bytes += storage.nbytes()
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes
