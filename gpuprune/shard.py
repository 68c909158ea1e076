"""One rank's view of the planned epochs: the object every loader delegates to.

A loader (:class:`~gpuprune.PrunedSampler`, the DALI iterator, the re-score pass) needs the same
few answers about the epochs it serves, and they are all here, once:

* **which samples this rank serves**: its share of the epoch's plan, positions ``rank, rank + W,
  ...`` of the plan padded by wrap-around to ``ceil(n / W)`` entries (as ``DistributedSampler``),
  or cut to ``floor(n / W)`` with ``drop_last``; with ``shuffle=False`` the plan's ids in increasing
  id order, then shared out the same way;
* **how many, without planning**: the share's length for any epoch, from the plan when it is made,
  else from the planner's prediction (the same on every rank, no collective);
* **which of them are this rank's own**: the share without the wrap-around padding (another rank
  serves those samples as its own), for work that must see each sample once over all ranks;
* **where the run stands**: a :class:`Position` ``(epoch, consumed)`` that survives a checkpoint,
  with every check on it ("``consumed`` beyond the share", another world size mid-epoch).

Loaders depend on the small :class:`Planner` protocol, not on :class:`~gpuprune.Pruner`: a Pruner is
a planner, and so is :attr:`gpuprune.refresh.Refresher.feed` (the samples a re-score pass covers).

Example (what :class:`~gpuprune.PrunedSampler` does with it)::

    view = EpochShard(pruner, num_replicas=2, rank=1)
    len(view)                      # samples this rank serves in epoch 0: a pure read
    view.set_epoch(0)              # plans epoch 0 (a collective under a process group)
    ids = view.host_ids()          # this rank's share, from the position on, as numpy int32
    view.state_dict(consumed=128)  # the position after 128 trained samples
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ._checks import check_bool, check_int
from .distributed import rank_and_world
from .guard import CoverageGuard
from .plan import Plan
from .sizes import num_batches, owned_size, shard_size

__all__ = ["Planner", "EpochShard", "Position", "shard_of"]


@runtime_checkable
class Planner(Protocol):
    """What a loader needs from the object that plans its epochs.

    :class:`gpuprune.Pruner` implements it; so does :attr:`gpuprune.refresh.Refresher.feed`.
    Every method is keyed by the epoch; none depends on which loader asks.
    """

    @property
    def num_samples(self) -> int:
        """N: every planned id lies in ``[0, N)``."""

    @property
    def rank(self) -> int:
        """This process's rank in the planner's process group (0 without one)."""

    @property
    def world_size(self) -> int:
        """Ranks in the planner's process group (1 without one)."""

    @property
    def num_epochs(self) -> int | None:
        """Epochs of the run (plannable epochs are ``0 .. num_epochs - 1``), or None if open-ended."""

    @property
    def device(self) -> torch.device:
        """Where plans' ids live (the device ``observe`` takes them on)."""

    def check_epoch(self, epoch: int, name: str = "epoch") -> int:
        """``epoch`` as an int, or TypeError/ValueError naming ``name`` (epochs count from 0)."""

    def epoch_size(self, epoch: int) -> int | None:
        """Samples planned for ``epoch`` over all ranks, without planning it (no collective, no
        state change); None when only planning can tell (a loss-dependent epoch size)."""

    def plan(self, epoch: int) -> Plan:
        """The plan of ``epoch``; the first call for an epoch makes it (under a process group a
        collective: every rank calls it for every new epoch, in the same order)."""


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
                             f"drop_last={saved[1]} cannot resume with "
                             f"num_replicas={num_replicas}, drop_last={drop_last}")
        return epoch, consumed


def shard_of(planner: Planner, num_replicas: int | None, rank: int | None, owner: str, *,
             names: tuple[str, str] = ("num_replicas", "rank")) -> tuple[int, int]:
    """``(rank, num_replicas)`` of a loader over ``planner``: from the planner's process group
    unless given; explicit values that disagree with a distributed planner raise.

    Args:
        planner: the :class:`Planner` whose plans the loader shards.
        num_replicas, rank: the caller's explicit values, or None to take them from the planner
            (a local one: 1 replica, rank 0).
        owner: the caller's class name, which starts the process-group messages.
        names: what the caller calls ``num_replicas`` and ``rank``, used in every message (the DALI
            iterator passes ``("num_shards", "shard_id")``). Default ``("num_replicas", "rank")``.

    Raises:
        TypeError: a given value is not an int.
        ValueError: a given value is out of range, or disagrees with the planner's process group;
            or torch.distributed runs several ranks, the planner is local and no ``num_replicas``
            was given.
    """
    world_name, rank_name = names
    if num_replicas is not None:
        num_replicas = check_int(world_name, num_replicas, minimum=1)
    if rank is not None:
        rank = check_int(rank_name, rank, minimum=0)
    p_rank, p_world = planner.rank, planner.world_size
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


class EpochShard:
    """One rank's view of a planner's epochs: its share of each plan, that share's length without
    planning, the part of it this rank owns, and the resume position.

    **The position** is ``(epoch, start)``: the epoch being served and how many entries of this
    rank's share of it were consumed before the current pass (non-zero only after
    :meth:`load_state_dict`). A pass serves the share from ``start`` on. Moving to another epoch
    (:meth:`set_epoch`, :meth:`seek`) starts at its first entry; the epoch of the position keeps
    its ``start``. The position is plain data: :meth:`state_dict` / :meth:`load_state_dict` in the
    :class:`Position` format.

    **The share** of a plan (:meth:`share`): with ``shuffle=True`` the plan in its training order;
    with ``shuffle=False`` its ids in increasing id order (a full plan: ``0, 1, ..., N-1``); then
    positions ``rank, rank + W, ...`` of that list, padded by wrapping around to ``ceil(n / W)``
    entries (up to ``W - 1`` samples of the epoch served twice over all ranks), or cut to
    ``floor(n / W)`` with ``drop_last`` (up to ``W - 1`` skipped). Every rank gets the same count,
    so DDP step counts match. The share is a :class:`~gpuprune.Plan` (same epoch and loss weights).

    **Reads never plan**: :meth:`shard_size`, :meth:`remaining`, :meth:`num_batches`, ``len()`` and
    :meth:`state_dict` answer from the plan once it is made and from the planner's prediction
    before (the same on every rank), so logging a length on one rank cannot deadlock the others.
    Only :meth:`set_epoch` and :meth:`plan` plan (a collective under a process group).

    What a loader uses (the sampler: the first group; the DALI iterator: all):

    ============================================  ===============================================
    ``set_epoch(e)``, ``plan()``, ``len()``        plan and take the share; its remaining length
    ``begin()``                                    a pass starts: the share, counted by the guard
    ``host_ids()``, ``ids()``                      the share from ``start`` on (host / device)
    ``state_dict(consumed)``, ``load_state_dict``  the resume position and its checks
    ``shard_size(e)``, ``seek(e, start)``          a future epoch's share length; move, no planning
    ``share(plan)``                                the share of any plan
    ``num_batches(b, drop)``, ``end(b, drop)``     batches of the pass; one past its last entry
    ``consumed_after(k, b, drop)``                 the ``consumed`` of the position after k batches
    ``owned()``                                    the share without wrap-around padding
    ============================================  ===============================================

    Args:
        planner: the :class:`Planner` (a :class:`~gpuprune.Pruner`, or ``Refresher.feed``).
        num_replicas: ranks sharing each plan. Default: the planner's ``world_size`` (1 for a
            single-process Pruner). A value that disagrees with a distributed planner raises.
        rank: this rank, in ``[0, num_replicas)``. Default: the planner's ``rank`` (else 0).
        drop_last: cut each plan to a multiple of ``num_replicas`` instead of padding it by
            wrap-around. Default ``False``.
        shuffle: serve the plan in its training order (default ``True``); ``False`` serves its ids
            in increasing id order (the pruned set without the shuffle, like a reader without
            ``random_shuffle``).
        owner: the loader's class name, which starts messages about the process group and the
            expected type of a saved state. Default ``"PrunedSampler"``.
        names: what the loader calls ``num_replicas`` and ``rank`` in its messages. Default
            ``("num_replicas", "rank")``; the DALI iterator's are ``("num_shards", "shard_id")``.
    """

    def __init__(self, planner: Planner, num_replicas: int | None = None, rank: int | None = None,
                 *, drop_last: bool = False, shuffle: bool = True, owner: str = "PrunedSampler",
                 names: tuple[str, str] = ("num_replicas", "rank")) -> None:
        if not isinstance(planner, Planner):
            raise TypeError(f"pruner must be a gpuprune.Pruner or another Planner (num_samples, "
                            f"rank, world_size, num_epochs, device, check_epoch, epoch_size, plan), got "
                            f"{type(planner).__name__}")
        self.rank, self.num_replicas = shard_of(planner, num_replicas, rank, owner, names=names)
        self.drop_last = check_bool("drop_last", drop_last)
        self.shuffle = check_bool("shuffle", shuffle)
        self.planner = planner
        self.owner = owner
        self._epoch, self._start = 0, 0
        self._taken: tuple[Plan, Plan] | None = None    # (the planner's plan, its share)
        self._host: np.ndarray | None = None            # host copy of the share, [start:]
        self._begun = False                             # a pass began since the position moved

    # ------------------------------------------------------------------ the position
    @property
    def epoch(self) -> int:
        """The epoch of the position (0 until :meth:`set_epoch`, :meth:`seek` or a restore)."""
        return self._epoch

    @property
    def start(self) -> int:
        """Entries of this epoch's share consumed before the current pass (0 unless restored)."""
        return self._start

    def seek(self, epoch: int, start: int = 0) -> None:
        """Move the position to entry ``start`` of ``epoch``'s share, without planning. Raises
        (and moves nothing) for an epoch the planner refuses, or a ``start`` beyond the share when
        its length is known. ``(num_epochs, 0)`` is the position after the run's last epoch: a
        loader that finished the run stands there (its length is 0, and it has nothing to plan)."""
        start = check_int("start", start, minimum=0)
        epoch = self._position_epoch(epoch, start)
        if start:
            self._check_start(epoch, start, self.shard_size(epoch))
        self._set(epoch, start)

    def _position_epoch(self, epoch: int, start: int, name: str = "epoch") -> int:
        """``epoch`` as the epoch of a position: one the planner plans, or ``num_epochs`` itself
        with ``start == 0`` (the end of the run)."""
        if self._at_end(epoch) and start == 0:
            return epoch
        return self.planner.check_epoch(epoch, name)

    def _at_end(self, epoch) -> bool:
        end = self.planner.num_epochs
        return end is not None and type(epoch) is int and epoch == end

    def _set(self, epoch: int, start: int) -> None:
        if (epoch, start) != (self._epoch, self._start):
            self._host = None
        self._epoch, self._start = epoch, start
        self._begun = False

    def _check_start(self, epoch: int, start: int, n: int | None) -> None:
        if n is not None and start > n:
            raise ValueError(f"state_dict['consumed']={start} is more than the {n} samples this "
                             f"rank's share of epoch {epoch} holds")

    def state_dict(self, consumed: int = 0) -> dict:
        """The :class:`Position` after ``consumed`` more entries of the current pass (a pure read).

        Args:
            consumed: entries of this pass (from :attr:`start`) whose training step has finished.
                Must not exceed :meth:`remaining` when that is known. Default 0.
        """
        consumed = check_int("consumed", consumed, minimum=0)
        if consumed and consumed > self.remaining():
            raise ValueError(f"consumed={consumed} is more than the {self.remaining()} samples "
                             f"this pass of epoch {self._epoch} yields")
        return Position.make(self._epoch, self._start + consumed, self.num_replicas,
                             self.drop_last)

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved :class:`Position`: the next pass over its epoch starts at entry
        ``consumed`` of this rank's share. Checks everything first (the format, the epoch against
        the planner, the world size and ``drop_last`` of a mid-epoch state, ``consumed`` against
        the share when its length is known) and raises TypeError/ValueError changing nothing.
        Restore the planner from the same checkpoint, so the epoch's plan is the saved one."""
        epoch, consumed = Position.check(state, self.num_replicas, self.drop_last, self.owner)
        epoch = self._position_epoch(epoch, consumed, "state_dict['epoch']")
        self._check_start(epoch, consumed, self.shard_size(epoch))
        self._set(epoch, consumed)
        self._taken = None

    # ------------------------------------------------------------------ sizes: pure reads
    def shard_size(self, epoch: int | None = None) -> int | None:
        """Entries of this rank's share of ``epoch`` (default: the position's), from the whole
        share's start: from the plan when it is made, else predicted (None when only planning can
        tell: a loss-dependent epoch size). Never plans."""
        epoch = self._epoch if epoch is None else self._position_epoch(epoch, 0)
        if self._at_end(epoch):
            return 0                                 # after the run's last epoch: nothing left
        if self._taken is not None and self._taken[1].epoch == epoch:
            return len(self._taken[1])
        n = self.planner.epoch_size(epoch)
        return None if n is None else shard_size(n, self.num_replicas, self.drop_last)

    def remaining(self) -> int:
        """Entries left in the current pass: the share's length minus :attr:`start`. Never plans.

        Raises:
            RuntimeError: the length is known only once the epoch is planned (call
                :meth:`set_epoch` first).
            ValueError: a restored ``start`` is beyond the share.
        """
        n = self.shard_size()
        if n is None:
            raise RuntimeError(f"the length of epoch {self._epoch} is known once it is planned "
                               f"(its size depends on the losses observed until then): call "
                               f"set_epoch({self._epoch}) first")
        self._check_start(self._epoch, self._start, n)
        return n - self._start

    def __len__(self) -> int:
        return self.remaining()

    def num_batches(self, batch_size: int, drop_last_batch: bool = False) -> int:
        """Batches of ``batch_size`` in the current pass (the last one short unless
        ``drop_last_batch``). Never plans."""
        return num_batches(self.remaining(), check_int("batch_size", batch_size, minimum=1),
                           check_bool("drop_last_batch", drop_last_batch))

    def end(self, batch_size: int, drop_last_batch: bool = False) -> int:
        """One past the last share entry the current pass serves: the share's end, or with
        ``drop_last_batch`` the end of its last whole batch from :attr:`start`."""
        nb = self.num_batches(batch_size, drop_last_batch)
        return self._start + nb * batch_size if drop_last_batch else self._start + self.remaining()

    def consumed_after(self, batches: int, batch_size: int, drop_last_batch: bool = False) -> int:
        """The share entries consumed once ``batches`` batches of the current pass were trained
        (the ``consumed`` of the :class:`Position` to save then): ``start + batches * batch_size``,
        at most :meth:`end`."""
        batches = check_int("batches", batches, minimum=0)
        return min(self._start + batches * batch_size, self.end(batch_size, drop_last_batch))

    # ------------------------------------------------------------------ plans
    def share(self, plan: Plan) -> Plan:
        """This rank's share of ``plan`` in serving order (see the class docstring). Pure: it
        changes no position and plans nothing."""
        shard = plan
        if not self.shuffle:
            ids = plan.indices
            ids = (torch.arange(len(ids), dtype=ids.dtype, device=ids.device)
                   if plan.full and len(ids) == plan.num_samples else torch.sort(ids).values)
            shard = Plan(plan.epoch, ids, plan.full, plan.num_samples, plan.weight, plan.rescaled)
        if self.num_replicas > 1:
            shard = shard.shard(self.rank, self.num_replicas, self.drop_last)
        return shard

    def set_epoch(self, epoch: int) -> Plan:
        """Make ``epoch`` the position's epoch and plan it (a collective under a process group);
        return this rank's share. A new epoch starts at its first entry; the position's own
        epoch (e.g. a restored one) keeps its ``start``. If the plan or a check fails, the
        position is unchanged."""
        epoch = self.planner.check_epoch(epoch)
        share = self._take(epoch, ask=True)
        self._set(epoch, self._start if epoch == self._epoch else 0)
        return share

    def plan(self) -> Plan:
        """This rank's share of the position's epoch, in serving order (planned now if it was not:
        a collective under a process group). The whole share, from its first entry."""
        return self._take(self._epoch)

    def begin(self) -> Plan:
        """A loader starts a pass over the position's epoch: :meth:`plan`, and the planner's
        coverage guard (a Pruner's :attr:`~gpuprune.Pruner.coverage`, see :mod:`gpuprune.guard`)
        learns how many samples the pass serves, :meth:`remaining`. A second pass over the same
        epoch with no :meth:`set_epoch`, :meth:`seek` or restore in between (a loop that never
        calls ``set_epoch``) warns :class:`~gpuprune.CoverageWarning`, once per run."""
        share = self.plan()
        guard = getattr(self.planner, "coverage", None)
        if isinstance(guard, CoverageGuard):
            guard.begin((self.rank, self.num_replicas), self._epoch, len(share) - self._start,
                        again=self._begun)
        self._begun = True
        return share

    def _take(self, epoch: int, ask: bool = False) -> Plan:
        """The share of ``epoch``: the one taken before unless ``ask`` (then the planner is asked
        again, and a plan it has replaced, e.g. by a restore, is taken anew)."""
        taken = self._taken
        if taken is not None and taken[1].epoch == epoch and not ask:
            return taken[1]
        source = self.planner.plan(epoch)
        if taken is not None and taken[0] is source:
            return taken[1]
        share = self.share(source)
        if epoch == self._epoch:
            self._check_start(epoch, self._start, len(share))
        self._taken, self._host = (source, share), None
        return share

    def ids(self) -> torch.Tensor:
        """The share from :attr:`start` on (a view, on the planner's device; plans if needed)."""
        return self.plan().indices[self._start:]

    def host_ids(self) -> np.ndarray:
        """:meth:`ids` as a numpy array: one device-to-host copy per pass (4 bytes per id)."""
        ids = self.ids()
        if self._host is None:
            self._host = ids.cpu().numpy()
        return self._host

    def owned(self) -> torch.Tensor:
        """The entries of the share this rank owns: the share without its wrap-around padding,
        which other ranks serve as their own. Over all ranks the owned entries are the plan's
        entries, each once (with ``drop_last``, the cut plan's). Plans if needed."""
        share = self.plan()
        n = len(self._taken[0]) if self._taken is not None else len(share)
        return share.indices[:owned_size(n, self.rank, self.num_replicas)]

    def __repr__(self) -> str:
        return (f"EpochShard(rank={self.rank}, num_replicas={self.num_replicas}, "
                f"drop_last={self.drop_last}, shuffle={self.shuffle}, epoch={self._epoch}, "
                f"start={self._start})")
