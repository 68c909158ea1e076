"""torch.utils.data integration: a Sampler over the Pruner's plan and an index-returning dataset."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, IterableDataset

from ._checks import check_bool, check_int
from .distributed import rank_and_world
from .plan import Plan

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


class Position:
    """Where a loader stands in the run: an epoch and how many of this rank's samples of it were
    trained. The sampler and the DALI iterator save and restore the same format, with one rule: a
    restored position continues with the rest of that epoch, then the following epochs.

    ``state_dict()`` format: ``{"epoch", "consumed", "num_replicas", "drop_last"}`` (plain ints and
    bools); a mid-epoch position only restores into a loader with the same ``num_replicas`` and
    ``drop_last``.
    """

    KEYS = ("epoch", "consumed", "num_replicas", "drop_last")

    @staticmethod
    def make(epoch: int, consumed: int, num_replicas: int, drop_last: bool) -> dict:
        return {"epoch": epoch, "consumed": consumed, "num_replicas": num_replicas,
                "drop_last": drop_last}

    @classmethod
    def check(cls, state, num_replicas: int, drop_last: bool, owner: str) -> tuple[int, int]:
        """``(epoch, consumed)`` of a saved position, or TypeError/ValueError naming the problem."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from {owner}.state_dict(), got "
                            f"{type(state).__name__}")
        missing = [key for key in cls.KEYS if key not in state]
        if missing:
            raise ValueError(f"state_dict is missing {missing}")
        unknown = sorted(str(key) for key in state if key not in cls.KEYS)
        if unknown:
            raise ValueError(f"state_dict has unknown keys {unknown} (a {owner} position holds "
                             f"{list(cls.KEYS)}): was it saved by another object?")
        epoch = check_int("state_dict['epoch']", state["epoch"], minimum=0)
        consumed = check_int("state_dict['consumed']", state["consumed"], minimum=0)
        saved = (check_int("state_dict['num_replicas']", state["num_replicas"], minimum=1),
                 check_bool("state_dict['drop_last']", state["drop_last"]))
        if consumed and saved != (num_replicas, drop_last):
            raise ValueError(f"a mid-epoch state saved with num_replicas={saved[0]}, "
                             f"drop_last={saved[1]} cannot resume with num_replicas={num_replicas}, "
                             f"drop_last={drop_last}")
        return epoch, consumed


def shard_of(pruner, num_replicas: int | None, rank: int | None, owner: str, *,
             names: tuple[str, str] = ("num_replicas", "rank")) -> tuple[int, int]:
    """``(rank, num_replicas)`` of a loader over ``pruner``: from the Pruner's process group unless
    given; explicit values that disagree with a distributed Pruner raise.

    Args:
        pruner: the Pruner whose plans the loader shards.
        num_replicas, rank: the caller's explicit values, or None to take them from the Pruner
            (a local Pruner: 1 replica, rank 0).
        owner: the caller's class name, which starts the process-group messages.
        names: what the caller calls ``num_replicas`` and ``rank``, used in every message (the DALI
            iterator passes ``("num_shards", "shard_id")``). Default ``("num_replicas", "rank")``.

    Raises:
        TypeError: a given value is not an int.
        ValueError: a given value is out of range, or disagrees with the Pruner's process group;
            or torch.distributed runs several ranks, the Pruner is local and no ``num_replicas``
            was given.
    """
    world_name, rank_name = names
    if num_replicas is not None:
        num_replicas = check_int(world_name, num_replicas, minimum=1)
    if rank is not None:
        rank = check_int(rank_name, rank, minimum=0)
    p_rank, p_world = pruner.rank, pruner.world_size
    if p_world > 1:
        for name, given, own in ((world_name, num_replicas, p_world), (rank_name, rank, p_rank)):
            if given is not None and given != own:
                raise ValueError(f"{owner}: {name}={given}, but the pruner is synchronised over a "
                                 f"process group where {name}={own}; leave {name} unset")
        return p_rank, p_world
    _, g_world = rank_and_world("auto")
    if num_replicas is None and g_world > 1:
        # sharding plans that were not computed alike would overlap, and unequal plan lengths
        # (InfoBatch) would hang DDP; each rank training the whole plan is rarely meant either
        raise ValueError(f"{owner}: torch.distributed runs {g_world} ranks but the pruner is not "
                         f"synchronised across them (process_group=None, or it was created before "
                         f"init_process_group): create the Pruner after init_process_group, or "
                         f"pass {world_name} and {rank_name} explicitly")
    num_replicas = 1 if num_replicas is None else num_replicas
    rank = check_int(rank_name, 0 if rank is None else rank, minimum=0, maximum=num_replicas - 1)
    return rank, num_replicas


class PrunedSampler(DistributedSampler[int]):
    """Yield this epoch's planned sample ids (this rank's shard under multi-process training).

    A ``DistributedSampler`` by type, so frameworks that shard a loader again unless its sampler
    is already distributed (PyTorch Lightning's ``use_distributed_sampler``, Lightning Fabric) leave
    it alone; ``DistributedSampler.__init__`` is not called, and only the attributes listed here
    (``num_replicas``, ``rank``, ``epoch``, ``drop_last``, ``shuffle``, ``seed``) are provided.

    Call :meth:`set_epoch` **before** creating the DataLoader iterator of each epoch, as with
    ``DistributedSampler``. It plans the epoch (under a process group that is a collective: every
    rank calls it). ``len()`` only reads: the planned shard's length, or, before ``set_epoch``, the
    length the schedule predicts (the same answer on every rank, and no planning).

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
        pruner: the :class:`~gpuprune.Pruner`.
        num_replicas: number of ranks (default: the size of the pruner's process group, 1 for a
            single-process pruner). A value that disagrees with a distributed pruner raises.
        rank: this rank (default: the rank in the pruner's group, else 0).
        drop_last: cut the plan to a multiple of ``num_replicas`` instead of padding by wrap-around.
    """

    def __init__(self, pruner, num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False) -> None:
        from .pruner import Pruner
        if not isinstance(pruner, Pruner):
            raise TypeError(f"pruner must be a gpuprune.Pruner, got {type(pruner).__name__}")
        self.rank, self.num_replicas = shard_of(pruner, num_replicas, rank, "PrunedSampler")
        self.pruner = pruner
        self.shuffle, self.seed = True, pruner.seed      # as DistributedSampler: plans are shuffled
        self.drop_last = check_bool("drop_last", drop_last)
        self.epoch = 0
        self._start = 0                     # samples of this epoch's shard already trained
        self._shard: Plan | None = None     # this rank's share of the epoch's plan, once planned
        self._host: np.ndarray | None = None

    def set_epoch(self, epoch: int) -> None:
        """Plan ``epoch`` (a collective under a process group); a new epoch starts at its first
        sample, the epoch of a restored position keeps it."""
        epoch = self.pruner.schedule.check_epoch(epoch)
        plan = self.pruner.plan(epoch)
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch
        self._take(plan)

    def _take(self, plan: Plan) -> None:
        shard = plan if self.num_replicas == 1 else plan.shard(self.rank, self.num_replicas,
                                                               self.drop_last)
        if self._start > len(shard):
            raise ValueError(f"the sampler state says {self._start} samples of epoch {self.epoch} "
                             f"were trained, but this rank's plan has only {len(shard)}")
        self._shard, self._host = shard, None

    def plan(self) -> Plan:
        """This rank's share of the current epoch's plan (planned now if :meth:`set_epoch` was not
        called for it)."""
        if self._shard is None or self._shard.epoch != self.epoch:
            self._take(self.pruner.plan(self.epoch))
        return self._shard

    def __iter__(self) -> Iterator[int]:
        shard = self.plan()
        if self._host is None:     # one device-to-host copy per epoch, 4 bytes per id
            self._host = shard.indices.cpu().numpy()
        ids = self._host[self._start:]
        for lo in range(0, len(ids), 4096):
            yield from ids[lo:lo + 4096].tolist()

    def __len__(self) -> int:
        if self._shard is not None and self._shard.epoch == self.epoch:
            return len(self._shard) - self._start
        n = self.pruner.shard_size(self.epoch, self.num_replicas, self.drop_last)
        if n is None:
            raise RuntimeError(f"the length of epoch {self.epoch} is known once it is planned "
                               f"(policy {self.pruner.policy.name!r} plans a loss-dependent number "
                               f"of samples): call sampler.set_epoch({self.epoch}) first")
        if self._start > n:
            raise ValueError(f"the sampler state says {self._start} samples of epoch {self.epoch} "
                             f"were trained, but this rank's plan has only {n}")
        return n - self._start

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, *, consumed: int) -> dict:
        """The position to resume from (see :class:`Position`).

        Args:
            consumed: samples of the current pass (since the DataLoader iterator was created) whose
                training step has finished, on this rank. Count what was trained, not what the
                DataLoader fetched: it prefetches. Samples skipped on resume are added here.
        """
        consumed = check_int("consumed", consumed, minimum=0)
        if consumed and consumed > len(self):
            raise ValueError(f"consumed={consumed} is more than the {len(self)} samples this pass "
                             f"of epoch {self.epoch} yields")
        return Position.make(self.epoch, self._start + consumed, self.num_replicas, self.drop_last)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next pass over its epoch skips the trained samples.

        Load the Pruner's state from the same checkpoint, so the epoch's plan is the saved one.
        Raises TypeError/ValueError before changing anything if ``state`` does not fit.
        """
        epoch, consumed = Position.check(state, self.num_replicas, self.drop_last, "PrunedSampler")
        self.pruner.schedule.check_epoch(epoch, "state_dict['epoch']")
        self.epoch, self._start = epoch, consumed
        self._shard, self._host = None, None
