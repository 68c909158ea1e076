"""A small numpy array in shared memory that DALI's external-source workers can see.

Parallel external-source workers hold their own copy of the source callable: forked at pipeline
build, or unpickled in a spawned process. A plain attribute set in the main process after that is
invisible to them, so the per-epoch plan lives in a shared mapping instead.

The mapping is a file in ``/dev/shm`` (tmpfs; the default temp folder elsewhere) opened with
``np.memmap``. Forked workers inherit the mapping; spawned workers re-open the file by path in
:meth:`SharedArray.__setstate__`. The creating process deletes the file when the array is garbage
collected or at exit (only a crash leaves it behind). A file is used rather than
``multiprocessing.shared_memory`` because on Python < 3.13 that one cannot be closed while numpy
views exist and registers every attach with the resource tracker.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np

__all__ = ["SharedArray"]


def _shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _remove(path: str, owner_pid: int) -> None:
    if os.getpid() != owner_pid:      # a forked worker's inherited copy must not delete it
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SharedArray:
    """A fixed-shape numpy array shared with forked and spawned worker processes.

    Args:
        shape: array shape.
        dtype: numpy dtype.
        fill: initial value of every element. Default ``0``.

    Attributes:
        array: the ``np.memmap`` view; writes are seen by every process that holds this object.
        path: the backing file.
    """

    def __init__(self, shape: tuple[int, ...], dtype, fill=0) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize)
        fd, self.path = tempfile.mkstemp(prefix="gpuprune-dali-", suffix=".bin", dir=_shm_dir())
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path, os.getpid())
        self.array = self._map()
        self.array[...] = fill

    def _map(self) -> np.ndarray:
        if int(np.prod(self.shape, dtype=np.int64)) == 0:
            return np.zeros(self.shape, self.dtype)
        # a plain ndarray view (its base keeps the mapping alive): memmap's own indexing is slower
        return np.memmap(self.path, dtype=self.dtype, mode="r+", shape=self.shape).view(np.ndarray)

    def __getstate__(self) -> dict:
        return {"shape": self.shape, "dtype": self.dtype.str, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        # a worker re-attaches; it does not own (delete) the file
        self.shape, self.dtype, self.path = tuple(state["shape"]), np.dtype(state["dtype"]), state["path"]
        self._finalizer = None
        self.array = self._map()
