"""The bytes of tensor storages alive during a forward and backward, op by op (:class:`LiveBytes`)."""
from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes"]


class LiveBytes(TorchDispatchMode):
    """A dispatch mode that records, op by op, the bytes of the tensor storages alive.

    A storage is counted from the op that first returns it until its last reference dies (a weak
    reference's callback), so a view or an in-place op adds nothing. Storages an op *receives* that
    were made before the mode started (parameters, inputs) are known but not counted. The record is
    a list of ``(storage key, signed bytes)`` events; :meth:`peak` replays it, optionally without
    some storages (the parameters' gradients) and within marked phases.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._live: dict[int, list] = {}  # id(storage) -> [serial, counted bytes, weak reference]
        self._serials = itertools.count()
        self._marks: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in _tensor_leaves((args, kwargs)):
            self._note(tensor, counted=False)
        out = func(*args, **kwargs)
        for tensor in _tensor_leaves(out):
            self._note(tensor, counted=True)
        return out

    def _note(self, tensor: torch.Tensor, counted: bool) -> None:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        nbytes, entry = storage.nbytes(), self._live.get(id(storage))
        if entry is not None:
            if entry[1] and nbytes != entry[1]:  # resized in place (out= ops)
                self.events.append((entry[0], nbytes - entry[1]))
                entry[1] = nbytes
            return
        serial = next(self._serials)  # ids are reused once a storage dies; serials are not
        counted_bytes = nbytes if counted else 0
        if counted_bytes:
            self.events.append((serial, counted_bytes))
        forget = functools.partial(self._forget, id(storage))
        self._live[id(storage)] = [serial, counted_bytes, weakref.ref(storage, forget)]

    def _forget(self, key: int, _: weakref.ref) -> None:
        serial, nbytes, _ = self._live.pop(key)
        if nbytes:
            self.events.append((serial, -nbytes))

    def keys(self, tensors: Sequence[Optional[torch.Tensor]]) -> frozenset:
        """The record's keys of the (live) storages of ``tensors``, e.g. of the parameters' ``.grad``."""
        entries = (self._live.get(id(t.untyped_storage())) for t in tensors if t is not None)
        return frozenset(entry[0] for entry in entries if entry is not None)

    def mark(self, name: str) -> None:
        """Names the current point of the record (a phase boundary)."""
        self._marks[name] = len(self.events)

    def live(self, at: Optional[str] = None, exclude: frozenset = frozenset()) -> int:
        """Bytes alive at mark ``at`` (the end when None), without storages in ``exclude``."""
        end = len(self.events) if at is None else self._marks[at]
        return sum(delta for key, delta in self.events[:end] if key not in exclude)

    def peak(self, start: Optional[str] = None, end: Optional[str] = None,
             exclude: frozenset = frozenset()) -> int:
        """The most bytes alive at once between marks ``start`` and ``end``, without ``exclude``."""
        first = 0 if start is None else self._marks[start]
        last = len(self.events) if end is None else self._marks[end]
        live = self.live(start, exclude) if start is not None else 0
        best = live
        for key, delta in self.events[first:last]:
            if key not in exclude:
                live += delta
                best = max(best, live)
        return best


def _tensor_leaves(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))
