"""NVIDIA DALI integration: feed a DALI pipeline only the samples the Pruner plans.

Swap ``DALIGenericIterator`` / ``DALIClassificationIterator`` for :class:`PrunedDALIIterator` /
:class:`PrunedDALIClassificationIterator` and start the graph from a plan-driven source; the
decoding and augmentation graph stays yours::

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
from .discover import READER_FILE_FILTERS, discover_files
from .files import FileSource
from .gpu import GpuArraySource
from .iterator import PrunedDALIClassificationIterator, PrunedDALIIterator
from .sources import ArraySource, BadSampleError, CallbackSource, PlanSource

__all__ = [
    "PrunedDALIIterator", "PrunedDALIClassificationIterator", "ArraySource", "GpuArraySource",
    "FileSource", "CallbackSource", "PlanSource", "BadSampleError", "discover_files",
    "READER_FILE_FILTERS", "build_pipeline", "build_iterator", "LastBatchPolicy",
]
