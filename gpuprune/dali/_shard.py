"""This rank's view of the Pruner's epochs, for the DALI iterator: every per-rank computation in one
place (its share of a plan, the wrap-around padding, the length before planning, the resume
position and its checks).

A stand-in with the interface of ``gpuprune.shard.EpochShard`` (being written in the core), limited to
what the iterator uses, so that the iterator can switch to the core object by changing one import.
What the iterator needs beyond that interface: the position after a run's final epoch is
``(num_epochs, 0)``, so :meth:`EpochShard.seek` moves there (it checks nothing) and
:meth:`EpochShard.load_state_dict` accepts it (a checkpoint saved after the last batch restores).
"""

from __future__ import annotations

import torch

from .._checks import check_bool
from ..plan import Plan
from ..sampler import Position, shard_of
from ..sizes import num_batches, shard_size

__all__ = ["EpochShard"]


class EpochShard:
    """One rank's share of each planned epoch, and the position ``(epoch, start)`` in it.

    The share of a plan: with ``shuffle`` the plan in its training order, else its ids sorted (a
    full plan: ``0 .. N-1``); then positions ``rank, rank + W, ...`` of that list, padded by wrapping
    around to ``ceil(n / W)`` entries, or cut to ``floor(n / W)`` with ``drop_last``: every rank gets
    the same count. ``start`` counts the share's entries served before the current pass (non-zero
    only after :meth:`load_state_dict`). Reads (:meth:`shard_size`, :meth:`remaining`,
    :meth:`num_batches`, :meth:`state_dict`) never plan; :meth:`set_epoch` and :meth:`plan` do (a
    collective under a process group).

    Args:
        pruner: the :class:`~gpuprune.Pruner`.
        num_replicas, rank: see :func:`gpuprune.sampler.shard_of` (default: the Pruner's group).
        drop_last: cut each plan to a multiple of ``num_replicas`` instead of padding it.
        shuffle: serve the plan's order (True) or its ids in increasing order.
        owner, names: the loader's name and its words for ``num_replicas`` and ``rank``, for
            messages.
    """

    def __init__(self, pruner, num_replicas: int | None = None, rank: int | None = None, *,
                 drop_last: bool = False, shuffle: bool = True, owner: str = "PrunedSampler",
                 names: tuple[str, str] = ("num_replicas", "rank")) -> None:
        self.rank, self.num_replicas = shard_of(pruner, num_replicas, rank, owner, names=names)
        self.drop_last = check_bool("drop_last", drop_last)
        self.shuffle = check_bool("shuffle", shuffle)
        self.planner, self.owner = pruner, owner
        self._epoch, self._start = 0, 0
        self._taken: tuple[Plan, Plan] | None = None    # (the Pruner's plan, this rank's share)

    # ------------------------------------------------------------------ the position
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start(self) -> int:
        return self._start

    def seek(self, epoch: int, start: int = 0) -> None:
        """Move the position (no planning, no checks: the caller's values are checked)."""
        self._epoch, self._start = epoch, start

    def state_dict(self, consumed: int = 0) -> dict:
        """The :class:`~gpuprune.sampler.Position` after ``consumed`` more entries of this pass."""
        return Position.make(self._epoch, self._start + consumed, self.num_replicas, self.drop_last)

    def load_state_dict(self, state: dict) -> None:
        """Move to a saved position; TypeError/ValueError, moving nothing, if it does not fit."""
        epoch, consumed = Position.check(state, self.num_replicas, self.drop_last, self.owner)
        if not (consumed == 0 and epoch == self.planner.schedule.num_epochs):   # (the run's end)
            epoch = self.planner.schedule.check_epoch(epoch, "state_dict['epoch']")
            self._check_start(epoch, consumed, self.shard_size(epoch))
        self._epoch, self._start = epoch, consumed

    def _check_start(self, epoch: int, start: int, n: int | None) -> None:
        if n is not None and start > n:
            raise ValueError(f"state_dict['consumed']={start} is more than the {n} samples this "
                             f"rank's share of epoch {epoch} holds")

    # ------------------------------------------------------------------ sizes: pure reads
    def shard_size(self, epoch: int | None = None) -> int | None:
        """Entries of this rank's share of ``epoch`` (default: the position's); None while only
        planning can tell (a loss-dependent epoch size). Never plans."""
        epoch = self._epoch if epoch is None else epoch
        if self._taken is not None and self._taken[1].epoch == epoch:
            return len(self._taken[1])
        n = self.planner.epoch_size(epoch)
        return None if n is None else shard_size(n, self.num_replicas, self.drop_last)

    def remaining(self) -> int:
        """Entries of the share from ``start`` on; RuntimeError while unknown. Never plans."""
        n = self.shard_size()
        if n is None:
            raise RuntimeError(f"the length of epoch {self._epoch} is known once it is planned (its "
                               f"size depends on the losses observed until then): call "
                               f"set_epoch({self._epoch}) first")
        return max(0, n - self._start)

    def num_batches(self, batch_size: int, drop_last_batch: bool = False) -> int:
        """Batches of ``batch_size`` from ``start`` on (the last short unless dropped)."""
        return num_batches(self.remaining(), batch_size, drop_last_batch)

    # ------------------------------------------------------------------ plans
    def set_epoch(self, epoch: int) -> Plan:
        """Plan ``epoch`` (a collective under a process group) and make it the position's epoch,
        keeping ``start`` if it already was; returns the share. A failure moves nothing."""
        epoch = self.planner.schedule.check_epoch(epoch)
        share = self._take(epoch)
        if epoch != self._epoch:
            self._epoch, self._start = epoch, 0
        return share

    def plan(self) -> Plan:
        """The share of the position's epoch (planned now if it was not)."""
        return self._take(self._epoch)

    def _take(self, epoch: int) -> Plan:
        source = self.planner.plan(epoch)
        if self._taken is not None and self._taken[0] is source:
            return self._taken[1]
        share = self.share(source)
        if epoch == self._epoch:
            self._check_start(epoch, self._start, len(share))
        self._taken = (source, share)
        return share

    def share(self, plan: Plan) -> Plan:
        """This rank's share of ``plan``, in serving order (pure)."""
        shard = plan
        if not self.shuffle:
            ids = plan.indices
            ids = (torch.arange(len(ids), dtype=ids.dtype, device=ids.device)
                   if plan.full and len(ids) == plan.num_samples else torch.sort(ids).values)
            shard = Plan(plan.epoch, ids, plan.full, plan.num_samples, plan.weight, plan.rescaled)
        if self.num_replicas > 1:
            shard = shard.shard(self.rank, self.num_replicas, self.drop_last)
        return shard
