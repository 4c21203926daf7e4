"""Lazy tensors for the passes: large results are computed while the output is written.

Rules:

1. A large new tensor is an ``ir.LazyTensor`` whose function reads its source (memory-mapped
   external data, or another lazy tensor) when the writer asks for its bytes, so memory holds
   only the tensors being written (``io.save`` bounds the bytes in flight).
2. A memory-mapped source is unmapped after each read (``release``): pages of the input file
   that stayed mapped would count in the process's resident memory until the end.
3. A computed tensor read by several initializers (a block's widened weight and its twins'
   copies, which are equal until the twin's own edits) is computed once: ``SharedResult``
   keeps the result until its last reader took it, and ``keep_together`` places those readers
   next to each other in the write order, so the result lives for one tensor's write.
"""

from __future__ import annotations

import threading
from typing import Iterable

import numpy as np
import onnx_ir as ir

__all__ = ["SharedResult", "keep_together", "read", "release", "release_all"]


#: held while a memory-mapped tensor is mapped or unmapped: the writer's threads read the same
#: source tensor for a block and its twins' copies, and onnx-ir's ExternalTensor maps on the
#: first read without a lock of its own (two threads mapping at once fail its check that the
#: array is loaded only once).  Mapping is cheap; the pages are read outside the lock.
_MAP_LOCK = threading.Lock()


def read(tensor, packed: bool = False):
    """``tensor.numpy()`` (``packed``: ``tensor.tobytes()``, sub-byte types packed as ONNX
    stores them), mapping a memory-mapped tensor under ``_MAP_LOCK``."""
    get = tensor.tobytes if packed else tensor.numpy
    if isinstance(tensor, ir.ExternalTensor):
        with _MAP_LOCK:
            return get()
    return get()


def release(tensor) -> None:
    """Unmap a memory-mapped external tensor (it maps again if read later)."""
    if isinstance(tensor, ir.ExternalTensor):
        with _MAP_LOCK:
            try:
                tensor.release()
            except BufferError:  # an array still views the map: it is unmapped when collected
                pass


def release_all(model: ir.Model) -> None:
    """Unmap every memory-mapped initializer of ``model``'s graph: recognition reads some
    large weights (a tied head is compared with the embedding table), and their pages would
    otherwise stay resident for the rest of the run."""
    for v in model.graph.initializers.values():
        release(v.const_value)


class SharedResult:
    """One tensor's value, computed on the first read and dropped after the last reader's.

    ``reader(name)`` returns a lazy tensor for one more reader; each evaluation of a reader
    takes the result once.  A reader evaluated again after the result was dropped recomputes
    it (correct, only slower).  Thread-safe: the writer may evaluate readers concurrently."""

    def __init__(self, tensor):
        self.tensor = tensor
        self.readers = 0
        self._taken = 0
        self._value: np.ndarray | None = None
        self._lock = threading.Lock()

    def reader(self, name: str) -> ir.LazyTensor:
        self.readers += 1
        return ir.LazyTensor(lambda: ir.tensor(self._take(), name=name),
                             dtype=self.tensor.dtype, shape=ir.Shape(tuple(self.tensor.shape)),
                             name=name)

    def _take(self) -> np.ndarray:
        with self._lock:
            value = self._value
            if value is None:
                value = np.asarray(read(self.tensor))
                release(self.tensor)
            self._taken += 1
            if self._taken >= self.readers:
                self._value, self._taken = None, 0
            else:
                self._value = value
            return value


def keep_together(graph: ir.Graph, groups: Iterable[list]) -> None:
    """Reorder the initializers so that each group's values are written one after another
    (at the place of the group's first member); the rest keep their order."""
    first: dict = {}
    members: set = set()
    for group in groups:
        names = [v.name for v in group if v.name in graph.initializers]
        if len(names) > 1:
            first[names[0]] = names
            members.update(names)
    if not first:
        return
    order: list = []
    for name in graph.initializers:
        if name in first:
            order.extend(first[name])
        elif name not in members:
            order.append(name)
    data = graph.initializers.data  # a UserDict: reorder without re-registering values
    reordered = {n: data[n] for n in order}
    data.clear()
    data.update(reordered)
