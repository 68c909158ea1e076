"""The ``--loader dali`` batch source: :class:`gpuprune.dali.PrunedDALIIterator` over the plan.

Each run builds one DALI pipeline around an :class:`gpuprune.dali.ArraySource` holding the uint8
images and labels (host arrays and a CPU-only pipeline with ``--device cpu``; CUDA tensors and a
pipeline on that GPU with ``--device cuda``), with no operators after the source, so the batches
are exactly those of the ``tensor`` loader and only the feeding mechanism differs. Building the
pipeline happens before the run's clock starts.
"""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["dali_unavailable_reason", "DaliBatches"]


def dali_unavailable_reason() -> str | None:
    """None when the DALI loader can be used, else a sentence saying why not."""
    try:
        from ..dali import PrunedDALIIterator, build_iterator  # noqa: F401
    except ImportError as e:
        return f"DALI loader unavailable: gpuprune.dali cannot be imported ({e})"
    return None


class DaliBatches:
    """Batches from a DALI pipeline fed by the Pruner's plan.

    Args:
        data: the :class:`~gpuprune.bench.train.DeviceData`.
        batch_size: training batch size.
        num_threads: DALI worker threads. Default ``1`` (the graph has no operators to run).

    Raises:
        RuntimeError: DALI or :mod:`gpuprune.dali` cannot be imported.
    """

    name = "dali"

    def __init__(self, data, batch_size: int, num_threads: int = 1) -> None:
        reason = dali_unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        self.data, self.batch_size, self.num_threads = data, batch_size, num_threads
        self.iterator = None

    def bind(self, pruner) -> "DaliBatches":
        from ..dali import ArraySource, build_iterator

        dev = self.data.device
        if dev.type == "cuda":
            source = ArraySource(self.data.x_train, self.data.y_train)
            device_id = dev.index
        else:
            source = ArraySource(self.data.data.x_train.numpy(), self.data.data.y_train.numpy())
            device_id = None
        bound = DaliBatches.__new__(DaliBatches)
        bound.__dict__.update(self.__dict__)
        bound.iterator = build_iterator(pruner, source, batch_size=self.batch_size,
                                        output_map=("data", "label"), num_threads=self.num_threads,
                                        device_id=device_id)
        return bound

    def epoch(self, plan) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it, dev = self.iterator, self.data.device
        it.set_epoch(plan.epoch)
        for (batch,) in it:
            yield (batch["data"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True),
                   batch["index"].to(dev, non_blocking=True))
