"""Driving the pipeline: one DALI epoch per pass, through DALI's own iterator.

The pipeline is held by a stock ``DALIGenericIterator`` (``size=-1``: it runs until the source raises
``StopIteration``), and driven only through its public methods: ``next()`` takes a batch (DALI's
scheduling and DALI's own conversion to torch tensors, zero-copy with the dynamic executor) and
``reset()`` starts the pipeline's next epoch and prefetches it, so every DALI epoch starts the same
way. To make that true of the first one too, the constructor runs an empty DALI epoch: a stock
iterator whose first epoch is started by ``reset()`` schedules one run more than its prefetch queue
when it is first read, and with a parallel external source that overwrites a batch the pipeline
still holds (its shared-memory ring has room for the prefetch queue only).

The source must know which DALI epoch it serves (``BatchInfo.epoch_idx``): that is DALI's count of
the pipeline's resets, counted here, because a pipeline's reset moves to the next epoch exactly when
its epoch has ended (the source raised ``StopIteration``), which is true whenever this class resets
it: the previous pass ran to its end (the source was asked past its last batch by the prefetch that
followed it) or was cut and drained.
"""

from __future__ import annotations

import gc

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .sources import PlanSource

__all__ = ["Feed"]


class Feed:
    """One pipeline, fed from one source, read one DALI epoch at a time.

    Building the pipeline happens here (``DALIGenericIterator`` builds it), and the empty DALI
    epoch 0: the source is asked for its first batch once and answers ``StopIteration``.
    """

    def __init__(self, pipe, source: PlanSource, output_map: list[str]) -> None:
        if source.parallel and pipe.py_start_method == "fork":
            # DALI forks its Python workers in this build. A forked child inherits every
            # unreachable object still waiting for the cycle collector, DALI pipelines included,
            # and if the collector runs in the child their finalisers shut down a pipeline the
            # child does not own (a segfault in DALI 2.4). Collect them in the parent first.
            gc.collect()
        self.engine = DALIGenericIterator(pipe, output_map, size=-1, auto_reset=False,
                                          prepare_first_batch=False)
        self.pipe, self.source = pipe, source
        self.dali_epoch = 0             # DALI's epoch counter (BatchInfo.epoch_idx) of the last
        source.publish(0, 0, torch.empty(0, dtype=torch.int64), 0, 0)   # DALI epoch: empty
        try:
            self.take()
            raise RuntimeError("internal error: an empty DALI epoch delivered a batch")
        except StopIteration:
            pass

    @property
    def checkpointing(self) -> bool:
        """Whether the pipeline was built with DALI checkpointing (DALI's iterator says so)."""
        try:
            self.engine.checkpoints()
        except ValueError:              # "Cannot access checkpoints with checkpointing disabled"
            return False
        return True

    def in_flight(self) -> int:
        """How many batches past the last one taken DALI may have asked the source for: its
        prefetch queue and what parallel workers compute ahead."""
        depth = max(self.pipe.cpu_queue_size, self.pipe.gpu_queue_size)
        return depth + (self.source.prefetch_queue_depth if self.source.parallel else 0)

    def start(self, epoch: int, ids: torch.Tensor, start: int, end: int) -> None:
        """Begin a DALI epoch serving entries ``[start, end)`` of ``ids`` (for training epoch
        ``epoch``) and let DALI prefetch its first batches."""
        if not self.pipe.empty():
            raise RuntimeError("internal error: the DALI pipeline still holds batches of its "
                               "previous epoch")
        tag = self.dali_epoch + 1
        self.source.publish(tag, epoch, ids, start, end)    # before DALI asks for data
        self.dali_epoch = tag
        self.engine.reset()             # the pipeline's next epoch, prefetched

    def take(self) -> dict[str, torch.Tensor]:
        """The next batch as torch tensors keyed by the output map; StopIteration at the end of
        the DALI epoch."""
        return next(self.engine)[0]

    def stop(self) -> None:
        """End the running DALI epoch: the source stops, and what DALI prefetched is drained and
        dropped (a pipeline's reset does nothing mid-epoch)."""
        self.source.cut()
        try:
            while True:
                next(self.engine)
        except StopIteration:
            pass
