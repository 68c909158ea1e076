"""torch.utils.data integration: a sampler over a Pruner's plans, an index-returning dataset."""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from .shard import EpochShard, Position

__all__ = ["PrunedSampler", "IndexedDataset", "Position"]


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


def _from_shard(name: str, doc: str) -> property:
    """A read-only attribute of the sampler that is its :class:`EpochShard`'s."""
    return property(lambda self: getattr(self.shard, name), doc=doc)


class PrunedSampler(DistributedSampler[int]):
    """``DistributedSampler``'s counterpart over a planner's epochs: yields this epoch's planned
    sample ids, this rank's share under multi-process training.

    A ``DistributedSampler`` by type, so frameworks that shard a loader again unless its sampler
    is already distributed (PyTorch Lightning's ``use_distributed_sampler``, Lightning Fabric) leave
    it alone; ``DistributedSampler.__init__`` is not called, and only the attributes listed here
    (``num_replicas``, ``rank``, ``epoch``, ``drop_last``, ``shuffle``, ``seed``, ``num_samples``,
    ``total_size``) are provided.

    Call :meth:`set_epoch` **before** creating the DataLoader iterator of each epoch, as with
    ``DistributedSampler``. It plans the epoch (under a process group that is a collective: every
    rank calls it). ``len()`` only reads: the planned share's length, or, before ``set_epoch``, the
    length the schedule predicts (the same answer on every rank, and no planning). Everything
    per-rank (the share, its length, the position) is the :class:`~gpuprune.shard.EpochShard` in
    :attr:`shard`; docs/distributed.md lists every difference from ``DistributedSampler``. Each
    pass is counted by the pruner's coverage guard (:mod:`gpuprune.guard`): a second pass over an
    epoch without ``set_epoch`` in between, or a pass trained only in part, warns
    (:class:`~gpuprune.CoverageWarning`).

    Checkpoints, mid-epoch included: save ``sampler.state_dict(consumed=n)`` next to
    ``pruner.state_dict()``, where ``n`` is the number of this pass's samples whose training step
    has finished. The sampler cannot count them itself: a DataLoader draws indices ahead of training
    (``num_workers * prefetch_factor`` batches, more with pinned memory), so the indices it has
    yielded overstate what was trained. After :meth:`load_state_dict` the next pass over the same
    epoch skips the samples already trained and ``len()`` counts only the rest; moving to another
    epoch with :meth:`set_epoch` starts from the beginning again::

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

    Args:
        pruner: the :class:`~gpuprune.Pruner` (or another :class:`~gpuprune.shard.Planner`, such
            as :attr:`gpuprune.refresh.Refresher.feed`).
        num_replicas: number of ranks. Default: the size of the pruner's process group (1 for a
            single-process pruner). A value that disagrees with a distributed pruner raises.
        rank: this rank. Default: the rank in the pruner's group, else 0.
        drop_last: cut each plan to a multiple of ``num_replicas`` instead of padding it by
            wrap-around. Default ``False``.
        shuffle: ``True`` (default) yields the plan in its (seeded, shuffled) training order;
            ``False`` yields the planned ids in increasing id order.
    """

    def __init__(self, pruner, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False, shuffle: bool = True) -> None:
        #: the per-rank view every question is delegated to
        self.shard = EpochShard(pruner, num_replicas, rank, drop_last=drop_last, shuffle=shuffle)

    pruner = _from_shard("planner", "The planner whose epochs this sampler serves.")
    num_replicas = _from_shard("num_replicas", "Ranks sharing each plan.")
    rank = _from_shard("rank", "This rank.")
    drop_last = _from_shard("drop_last", "Whether plans are cut to a multiple of num_replicas.")
    shuffle = _from_shard("shuffle", "Whether ids come in the plan's order (else by id).")

    @property
    def seed(self) -> int | None:
        """The seed of the plans' order: the pruner's (None for a planner without one)."""
        return getattr(self.pruner, "seed", None)

    @property
    def epoch(self) -> int:
        """The epoch the next pass serves (0, the last :meth:`set_epoch`, or a restored one).
        Assigning it moves there without planning (``DistributedSampler.epoch`` is a plain
        attribute); :meth:`set_epoch` also plans."""
        return self.shard.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        epoch = self.pruner.check_epoch(epoch)      # a plannable epoch, not the run's end
        if epoch != self.shard.epoch:
            self.shard.seek(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` (a collective under a process group); a new epoch starts at its first
        sample, the epoch of a restored position keeps it."""
        self.shard.set_epoch(epoch)

    def plan(self):
        """This rank's share of the current epoch's plan, in the order it is yielded (planned now
        if :meth:`set_epoch` was not called for it)."""
        return self.shard.plan()

    def __iter__(self) -> Iterator[int]:
        self.shard.begin()                  # the coverage guard counts this pass
        ids = self.shard.host_ids()
        for lo in range(0, len(ids), 4096):
            yield from ids[lo:lo + 4096].tolist()

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def num_samples(self) -> int:
        """This rank's share of the current epoch, whole (``DistributedSampler.num_samples``: the
        padded share; unlike ``len()``, it does not subtract the samples a resumed pass skips).
        Before ``set_epoch``, the schedule's prediction; RuntimeError where only planning can
        tell (a future InfoBatch pruned epoch)."""
        n = self.shard.shard_size()
        if n is None:
            len(self.shard)                         # raises the RuntimeError that says why
        return n

    @property
    def total_size(self) -> int:
        """``num_samples * num_replicas``, as ``DistributedSampler.total_size``: the plan's length
        after padding (or, with ``drop_last``, after cutting)."""
        return self.num_samples * self.num_replicas

    def state_dict(self, *, consumed: int) -> dict:
        """The position to resume from (see :class:`~gpuprune.shard.Position`).

        Args:
            consumed: samples of the current pass (since the DataLoader iterator was created) whose
                training step has finished, on this rank. Count what was trained, not what the
                DataLoader fetched: it prefetches. Samples skipped on resume are added here.
        """
        return self.shard.state_dict(consumed)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next pass over its epoch skips the trained samples.

        Load the Pruner's state from the same checkpoint, so the epoch's plan is the saved one.
        Raises TypeError/ValueError before changing anything if ``state`` does not fit.
        """
        self.shard.load_state_dict(state)
