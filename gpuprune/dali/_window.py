"""The published window: which plan entries each DALI iteration of the running DALI epoch reads.

Before each DALI epoch the iterator publishes entries ``[start, end)`` of this rank's plan (the
ids themselves are stored by the source) and the training epoch they belong to; DALI then calls the
source with ``BatchInfo(iteration, epoch_idx)``, and iteration ``i`` reads entries
``start + i * batch_size`` onwards, up to ``end``. ``epoch_idx`` must be the DALI epoch the window
was published for (the *tag*, DALI's count of pipeline resets).

The window is a few int64 fields, in shared memory for a source whose callback runs in DALI's
parallel workers (they read it while the main process may rewrite it: a new DALI epoch, or a cut
that ends the running one). The fields are written under a sequence number (a seqlock): the writer
makes it odd, writes, makes it even; a reader copies the fields and checks that the number was even
and did not change. Only stale tasks (prefetched for a DALI epoch that has ended) and tasks racing a
cut can see a rewrite, and both must stop, so a reader that sees one answers ``StopIteration``.
"""

from __future__ import annotations

import numpy as np

from ._shared import SharedArray

__all__ = ["Window"]

_SEQ, _TAG, _EPOCH, _START, _END = range(5)
_FIELDS = 5
NO_PLAN = -1


class Window:
    """The published window of one source.

    Args:
        batch_size: the pipeline's batch size (entries per DALI iteration).
        shared: keep the fields in shared memory (for parallel workers); else a plain array.
    """

    def __init__(self, batch_size: int, shared: bool) -> None:
        self.batch_size = batch_size
        self._store = SharedArray((_FIELDS,), np.int64, fill=0) if shared else None
        self.fields = self._store.array if shared else np.zeros(_FIELDS, np.int64)
        self.fields[_TAG] = NO_PLAN

    def __getstate__(self) -> dict:        # a spawned worker re-attaches to the shared fields
        return {"batch_size": self.batch_size, "store": self._store,
                "fields": None if self._store is not None else self.fields}

    def __setstate__(self, state: dict) -> None:
        self.batch_size, self._store = state["batch_size"], state["store"]
        self.fields = self._store.array if self._store is not None else state["fields"]

    def _write(self, tag: int, epoch: int, start: int, end: int) -> None:
        h = self.fields
        h[_SEQ] += 1                        # odd: being rewritten
        h[_TAG], h[_EPOCH], h[_START], h[_END] = tag, epoch, start, end
        h[_SEQ] += 1

    def publish(self, tag: int, epoch: int, start: int, end: int) -> None:
        """DALI epoch ``tag`` serves entries ``[start, end)`` for training epoch ``epoch``."""
        self._write(tag, epoch, start, end)

    def cut(self) -> None:
        """End the running DALI epoch now: every later iteration raises ``StopIteration``."""
        h = self.fields
        self._write(int(h[_TAG]), int(h[_EPOCH]), int(h[_START]), int(h[_START]))

    def locate(self, info, owner: str) -> tuple[int, int, int]:
        """``(first entry, one past the last, training epoch)`` of DALI iteration ``info``.

        Raises:
            StopIteration: past the window's end, for a stale DALI epoch, or while the window is
                rewritten.
            RuntimeError: DALI runs an epoch nothing was published for (the pipeline is driven
                without :class:`~gpuprune.dali.PrunedDALIIterator`).
        """
        h = self.fields
        seq, tag, epoch, start, end = h.tolist()      # one copy of every field
        if seq & 1 or int(h[_SEQ]) != seq:
            raise StopIteration
        if info.epoch_idx != tag:
            if info.epoch_idx < tag:
                raise StopIteration                   # a stale prefetch of an ended DALI epoch
            raise RuntimeError(
                f"DALI asked {owner} for epoch {info.epoch_idx}, but the published plan is for "
                f"epoch {tag} (-1: none); drive the pipeline with PrunedDALIIterator")
        lo = start + info.iteration * self.batch_size
        if lo >= end:
            raise StopIteration
        return lo, min(lo + self.batch_size, end), epoch
