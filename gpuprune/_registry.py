"""Int keys for the host objects a compiled step's custom ops reach at run time.

A ``torch.library`` op takes tensors and plain values, not Python objects, and dynamo must not
trace the objects' host counters (a count read while tracing would be frozen into the graph). So
each :class:`~gpuprune.guard.CoverageGuard` and :class:`~gpuprune.distributed.EpochSync` registers
itself here under a key at construction, and the ops of :mod:`gpuprune.library` look it up when they
run. Weak references: the registry keeps nothing alive.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

__all__ = ["lookup", "register"]

_OBJECTS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def register(obj: Any) -> int:
    """Register ``obj`` under a new key (never 0, never reused) and return the key."""
    key = next(_KEYS)
    _OBJECTS[key] = obj
    return key


def lookup(key: int) -> Any:
    """The live object registered under ``key``, or None."""
    return _OBJECTS.get(key)
