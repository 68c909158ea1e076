"""torch.utils.data integration: a Sampler over the Pruner's plan and an index-returning dataset."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ._checks import check_int
from .plan import Plan

__all__ = ["PrunedSampler", "IndexedDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item also returns its index.

    A tuple item ``(x, y)`` becomes ``(x, y, i)``; any other item ``x`` becomes ``(x, i)``.
    """

    def __init__(self, dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset with __getitem__ and __len__, got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, (tuple, list)):
            return (*item, index)
        return item, index


class PrunedSampler(Sampler[int]):
    """Yield this epoch's planned sample ids (this rank's shard under multi-process training).

    Call :meth:`set_epoch` **before** creating the DataLoader iterator of each epoch, as with
    ``DistributedSampler``. ``len()`` matches the plan (or the shard), and changes with the epoch.

    Args:
        pruner: the :class:`~gpuprune.Pruner`.
        num_replicas: number of ranks (default: the initialised ``torch.distributed`` world, else 1).
        rank: this rank (default: ``torch.distributed`` rank, else 0).
        drop_last: cut the plan to a multiple of ``num_replicas`` instead of padding by wrap-around.
    """

    def __init__(self, pruner, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False) -> None:
        from .pruner import Pruner
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        self.num_replicas = check_int("num_replicas", num_replicas, minimum=1)
        self.rank = check_int("rank", rank, minimum=0, maximum=self.num_replicas - 1)
        self.pruner = pruner
        self.drop_last = bool(drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("epoch", epoch, minimum=0)

    def plan(self) -> Plan:
        """This rank's share of the current epoch's plan."""
        plan = self.pruner.plan(self.epoch)
        if self.num_replicas == 1:
            return plan
        return plan.shard(self.rank, self.num_replicas, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self.plan().indices.tolist())   # one device-to-host copy per epoch

    def __len__(self) -> int:
        return len(self.plan())
