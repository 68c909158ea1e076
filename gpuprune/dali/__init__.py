"""NVIDIA DALI integration: feed a DALI pipeline only the samples the Pruner plans.

Swap ``DALIGenericIterator`` / ``DALIClassificationIterator`` for :class:`PrunedDALIIterator` and
start the graph from a plan-driven source; the decoding and augmentation graph stays yours::

    from gpuprune.dali import ArraySource, build_iterator

    source = ArraySource(images, labels, layouts=("HWC", None))
    it = build_iterator(pruner, source, my_graph, batch_size=256, device_id=0)
    for epoch in range(num_epochs):
        it.set_epoch(epoch)
        for (b,) in it:
            loss = pruner.observe(b["index"], F.cross_entropy(model(b["data"]), b["label"],
                                                             reduction="none"))

This module imports DALI (``nvidia-dali-cuda120`` or ``-cuda130``); ``import gpuprune`` does not.
See ``docs/dali.md``.
"""

from nvidia.dali.plugin.base_iterator import LastBatchPolicy

from .build import build_iterator, build_pipeline
from .iterator import PrunedDALIIterator
from .sources import (ArraySource, BadSampleError, CallbackSource, FileSource, PlanSource,
                      discover_files)

__all__ = [
    "PrunedDALIIterator", "ArraySource", "FileSource", "CallbackSource", "PlanSource",
    "BadSampleError", "discover_files", "build_pipeline", "build_iterator", "LastBatchPolicy",
]
