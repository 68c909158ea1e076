"""torch.utils.data integration: a Sampler over the Pruner's plan and an index-returning dataset."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from ._checks import check_bool, check_int
from .distributed import rank_and_world
from .plan import Plan

__all__ = ["PrunedSampler", "IndexedDataset"]


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so each item also returns its index.

    A tuple item ``(x, y)`` becomes ``(x, y, i)``; any other item ``x`` becomes ``(x, i)``.
    """

    def __init__(self, dataset) -> None:
        if (isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__")
                or not hasattr(dataset, "__len__")):
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

    Checkpoints, mid-epoch included: save ``sampler.state_dict(consumed=n)`` next to
    ``pruner.state_dict()``, where ``n`` is the number of this pass's samples whose training step
    has finished. The sampler cannot count them itself: a DataLoader draws indices ahead of training
    (``num_workers * prefetch_factor`` batches, more with pinned memory), so the indices it has
    yielded overstate what was trained. After :meth:`load_state_dict` the next pass over the
    same epoch skips the samples already trained and ``len()`` counts only the rest; moving to
    another epoch with :meth:`set_epoch` starts from the beginning again::

        for epoch in range(sampler.epoch, num_epochs):     # sampler.epoch: 0, or the resumed one
            sampler.set_epoch(epoch)
            trained = 0                                     # samples of this pass trained so far
            for x, y, idx in loader:
                ...                                         # forward, pruner.observe, step
                trained += len(idx)
                if time_to_save:
                    save_checkpoint({"pruner": pruner.state_dict(),
                                     "sampler": sampler.state_dict(consumed=trained),
                                     "model": ..., "optimizer": ...}, path)

    With ``DistributedSampler``-style sharding every rank trains the same number of samples, so
    one rank's sampler state restores all of them.

    Args:
        pruner: the :class:`~gpuprune.Pruner`.
        num_replicas: number of ranks (default: the size of the pruner's ``process_group``, 1 for
            a single-process pruner).
        rank: this rank (default: the rank in the pruner's group, else in the initialised default
            group, else 0).
        drop_last: cut the plan to a multiple of ``num_replicas`` instead of padding by wrap-around.
    """

    def __init__(self, pruner, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False) -> None:
        from .pruner import Pruner
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        group = getattr(pruner, "process_group", None)
        g_rank, g_world = rank_and_world(group if group is not None else "auto")
        if group is None and num_replicas is None and g_world > 1:
            # sharding plans that were not computed alike would overlap, and unequal plan lengths
            # (InfoBatch) would hang DDP; each rank training the whole plan is rarely meant either
            raise ValueError(f"torch.distributed runs {g_world} ranks but the pruner is not "
                             f"synchronised across them (process_group=None, or it was created "
                             f"before init_process_group): create the Pruner after "
                             f"init_process_group, or pass num_replicas and rank explicitly")
        if num_replicas is None:
            num_replicas = g_world
        if rank is None:
            rank = g_rank
        self.num_replicas = check_int("num_replicas", num_replicas, minimum=1)
        self.rank = check_int("rank", rank, minimum=0, maximum=self.num_replicas - 1)
        self.pruner = pruner
        self.drop_last = check_bool("drop_last", drop_last)
        self.epoch = 0
        self._start = 0   # samples of this epoch's shard already trained (set by load_state_dict)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next pass; a new epoch starts at its first sample."""
        epoch = check_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def plan(self) -> Plan:
        """This rank's share of the current epoch's plan."""
        plan = self.pruner.plan(self.epoch)
        if self.num_replicas == 1:
            return plan
        return plan.shard(self.rank, self.num_replicas, self.drop_last)

    def __iter__(self) -> Iterator[int]:
        plan = self.plan()
        start = self._checked_start(len(plan))
        return iter(plan.indices[start:].tolist())   # one device-to-host copy per epoch

    def __len__(self) -> int:
        total = len(self.plan())
        return total - self._checked_start(total)

    # ------------------------------------------------------------------ checkpoints
    def _checked_start(self, total: int) -> int:
        if self._start > total:
            raise ValueError(f"the sampler state says {self._start} samples of epoch {self.epoch} "
                             f"were trained, but this rank's plan has only {total}")
        return self._start

    def _shard_len(self) -> int | None:
        """Length of this rank's share of the epoch's plan, or None if it is not planned yet."""
        plan = self.pruner._plan
        if plan is None or plan.epoch != self.epoch:
            return None
        n, w = len(plan), self.num_replicas
        return n // w if self.drop_last else -(-n // w)

    def state_dict(self, *, consumed: int) -> dict:
        """The position to resume from: the epoch and how many of its samples were trained.

        Args:
            consumed: samples of the current pass (since the DataLoader iterator was created) whose
                training step has finished, on this rank. Count what was trained, not what the
                DataLoader fetched: it prefetches. Samples skipped on resume are added here.

        Returns:
            ``{"epoch", "consumed", "num_replicas", "drop_last"}`` (plain ints and bools).
        """
        consumed = check_int("consumed", consumed, minimum=0)
        length = self._shard_len()
        total = self._start + consumed
        if length is None and consumed:
            raise ValueError(f"consumed={consumed}, but epoch {self.epoch} has not been planned yet")
        if length is not None and total > length:
            raise ValueError(f"consumed={consumed} is more than the {length - self._start} samples "
                             f"this pass of epoch {self.epoch} yields")
        return {"epoch": self.epoch, "consumed": total, "num_replicas": self.num_replicas,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next pass over its epoch skips the trained samples.

        Load the Pruner's state from the same checkpoint, so the epoch's plan is the saved one.
        Raises TypeError/ValueError before changing anything if ``state`` does not fit.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from PrunedSampler.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [key for key in ("epoch", "consumed", "num_replicas", "drop_last")
                   if key not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        epoch = check_int("state_dict['epoch']", state["epoch"], minimum=0)
        consumed = check_int("state_dict['consumed']", state["consumed"], minimum=0)
        if consumed and (state["num_replicas"], bool(state["drop_last"])) != (self.num_replicas,
                                                                              self.drop_last):
            raise ValueError(f"a mid-epoch state saved with num_replicas={state['num_replicas']}, "
                             f"drop_last={state['drop_last']} cannot resume with num_replicas="
                             f"{self.num_replicas}, drop_last={self.drop_last}")
        self.epoch, self._start = epoch, consumed
