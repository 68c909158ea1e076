"""One epoch's plan from the rule: select (or reuse the last selection), then shuffle.

A pure function of (the schedule, the policy, the budget, the statistics, the seed, the epoch and
the previous plan): :class:`~gpuprune.Pruner` calls it to plan, and to rebuild a
restored full plan. It changes nothing; the Pruner commits what it returns.
"""

from __future__ import annotations

import torch

from .plan import Plan, pack_mask
from .policies import FULL_DATA, Policy
from .rng import epoch_generator, shuffle_seed
from .schedule import Schedule
from .sizes import index_dtype
from .stats import LossStats

__all__ = ["make_plan"]


def make_plan(epoch: int, current: Plan | None, *, schedule: Schedule, policy: Policy, k: int,
              stats: LossStats, seed: int, backend) -> tuple[Plan, bool]:
    """The plan of ``epoch`` made right after ``current`` (None: the first), and whether it drew
    a new selection.

    A pruned epoch that reuses (:meth:`Schedule.reuses`) keeps ``current``'s ids and weights; any
    other epoch is a selection, by ``policy`` with budget ``k`` or, for a full epoch, by
    :data:`~gpuprune.policies.FULL_DATA` with all N, from the generator of (``seed``,
    :meth:`Schedule.draw_epoch`). The ids are then shuffled by :func:`gpuprune.rng.shuffle_seed`
    of (``seed``, ``epoch``): the order depends on the set only.
    """
    n = stats.num_samples
    full, reselect = schedule.is_full(epoch), False
    weight, rescaled = 1.0, None
    if schedule.reuses(epoch, None if current is None else current.epoch):
        ids, weight, rescaled = current.indices, current.weight, current.rescaled
    else:                                     # a full epoch is FullData's selection
        chooser, budget = (FULL_DATA, n) if full else (policy, k)
        choice = chooser.select(stats, budget, epoch=epoch, backend=backend,
                                generator=epoch_generator(seed, schedule.draw_epoch(epoch)))
        ids = _checked(chooser, choice.indices, schedule.epoch_size(epoch, n, k), stats)
        if choice.rescaled is not None:
            weight, rescaled = float(choice.weight), pack_mask(choice.rescaled)
        reselect = not full
    order = backend.shuffle(ids, shuffle_seed(seed, epoch))
    return Plan(epoch, order, full, n, weight, rescaled), reselect


def _checked(policy: Policy, idx: torch.Tensor, count: int | None, stats: LossStats
             ) -> torch.Tensor:
    """A fresh selection's ids in the id dtype, after checking their form and, when the schedule
    knows it (``count``), their number; no host read."""
    device = stats.device
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.device != device
            or idx.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"{policy!r}.select must return 1-D int32/int64 ids on {device}")
    if count is not None and idx.numel() != count:
        raise ValueError(f"{policy!r} returned {idx.numel()} ids, expected k={count}")
    return idx.to(index_dtype(stats.num_samples))
