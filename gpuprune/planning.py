"""One epoch's plan from the rule: select (or reuse the last selection), shuffle, count.

A pure function of (the schedule, the policy, the budget, the statistics, the seed, the epoch and
the previous plan): :class:`~gpuprune.Pruner` calls it to plan, and to rebuild a restored full
plan. The policy describes its selection and :meth:`Backend.plan <gpuprune.backend.Backend.plan>`
carries it out in one call: the selected set, its keyed order, the ``selected`` counts and the
overlap with the previous plan (one kernel launch on a GPU). It changes nothing; the Pruner commits
what it returns.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .plan import Plan, pack_mask
from .policies import FULL_DATA, Policy, Rule, Selection
from .rng import epoch_generator, shuffle_seed
from .schedule import Schedule, call_keep, keep_budgets
from .sizes import index_dtype
from .stats import LossStats

__all__ = ["make_plan", "Planned", "run_rule"]


def run_rule(policy: Policy, keep, num_samples: int, asked: Schedule,
             decay: float | None) -> Rule:
    """The whole rule of one run: ``policy``'s :meth:`~gpuprune.policies.Policy.rule` under
    ``keep``, a float or a keep schedule (:func:`gpuprune.schedule.check_keep`, already checked).

    The policy's rule sees the fraction of the first epoch that may be pruned (InfoBatch's ratio;
    the others' k); a keep schedule then sets every pruned epoch's budget in the returned
    schedule's ``budgets``, and ``k`` is the first pruned epoch's. A callable is called once per
    epoch here, checked and frozen. Raises ValueError for a keep schedule without ``num_epochs``,
    for InfoBatch (its sizes follow the losses) and for a static subset whose size would change.
    """
    if not isinstance(keep, float) and asked.num_epochs is None:
        raise ValueError(f"keep={keep!r} is a keep schedule, which needs num_epochs")
    fractions = call_keep(keep, asked.num_epochs).__getitem__ if callable(keep) else keep
    first = keep if isinstance(keep, float) else keep[1] if isinstance(keep, tuple) else \
        fractions(min(asked.warmup_epochs, asked.num_epochs - 1))
    rule = policy.rule(first, num_samples, asked, decay)
    schedule, k = _apply_keep(fractions, rule, num_samples, shown=keep)
    return replace(rule, schedule=schedule, k=k)


def _apply_keep(keep, rule: Rule, num_samples: int, shown=None) -> tuple[Schedule, int]:
    """``(schedule, k)`` of ``rule`` under a keep schedule ``keep`` (the rule's own for a float);
    errors name ``shown`` (the ``keep`` the user gave; default ``keep``).
    Refused (ValueError) for a policy whose pruned sizes depend on the losses (InfoBatch) or that
    selects once (static) with sizes that change; the ``"full"`` baseline ignores it."""
    schedule, shown = rule.schedule, keep if shown is None else shown
    if isinstance(keep, float) or schedule.all_full:
        return schedule, rule.k
    if not schedule.exact_size:
        raise ValueError(
            f"keep={shown!r}: a keep schedule sets each pruned epoch's size, but policy "
            f"{rule.policy.name!r} plans a loss-dependent number of samples (InfoBatch prunes a "
            f"share of the below-mean samples: give it a float keep, or InfoBatch(ratio=...))")
    budgets = keep_budgets(keep, schedule, num_samples)
    pruned = [b for e, b in enumerate(budgets) if not schedule.is_full(e)]
    if schedule.select_once and len(set(pruned)) > 1:
        raise ValueError(f"keep={shown!r}: policy {rule.policy.name!r} selects one subset for the "
                         f"whole run, so its size cannot change with the epoch (budgets "
                         f"{sorted(set(pruned))}); give a float keep")
    return replace(schedule, budgets=budgets), pruned[0] if pruned else rule.k


class Planned(NamedTuple):
    """What :func:`make_plan` returns.

    Attributes:
        plan: the epoch's :class:`~gpuprune.Plan`.
        reselect: whether it drew a new selection.
        selected: the statistics' ``selected`` counts with this plan counted (a new tensor; the
            old one for a full plan, which counts nothing).
        overlap: 0-d float64 Jaccard overlap of its set with the previous plan's, or None.
    """

    plan: Plan
    reselect: bool
    selected: torch.Tensor
    overlap: torch.Tensor | None


def make_plan(epoch: int, current: Plan | None, *, schedule: Schedule, policy: Policy, k: int,
              stats: LossStats, seed: int, backend) -> Planned:
    """The plan of ``epoch`` made right after ``current`` (None: the first).

    A pruned epoch that reuses (:meth:`Schedule.reuses`) keeps ``current``'s ids and weights; any
    other epoch is a selection, by ``policy`` with budget ``k`` or, for a full epoch, by
    :data:`~gpuprune.policies.FULL_DATA`, from the generator of (``seed``,
    :meth:`Schedule.draw_epoch`). The order is the keyed shuffle of (``seed``, ``epoch``)
    (:func:`gpuprune.rng.shuffle_seed`): it depends on the set only.
    """
    n = stats.num_samples
    full, reselect = schedule.is_full(epoch), False
    weight, rescaled = 1.0, None
    if schedule.reuses(epoch, None if current is None else current.epoch):
        what = {"ids": current.indices}
        weight, rescaled = current.weight, current.rescaled
    else:                                     # a full epoch is FullData's selection
        chooser, budget = (FULL_DATA, n) if full else (policy, schedule.budget(epoch, k))
        choice = chooser.select(stats, budget, epoch=epoch, backend=backend,
                                generator=epoch_generator(seed, schedule.draw_epoch(epoch)))
        what = _what(chooser, choice, schedule.epoch_size(epoch, n, k), stats)
        weight = float(choice.weight)
        if choice.rescaled is not None:
            rescaled = pack_mask(choice.rescaled)
        reselect = not full
    previous = None if current is None else (None if current.full else current.indices,
                                             len(current))
    parts = backend.plan(stats, shuffle_seed=shuffle_seed(seed, epoch), previous=previous,
                         count=True, **what)
    if parts.rescaled is not None:
        rescaled = parts.rescaled
    plan = Plan(epoch, parts.indices, full, n, weight if rescaled is not None else 1.0, rescaled)
    return Planned(plan, reselect, parts.selected, parts.overlap)


def _what(policy: Policy, choice: Selection, count: int | None, stats: LossStats) -> dict:
    """The backend's arguments for a fresh selection, after checking its form and, when the
    schedule knows it (``count``), its size; no host read."""
    if not isinstance(choice, Selection):
        raise TypeError(f"{policy!r}.select must return a gpuprune.Selection, got "
                        f"{type(choice).__name__}")
    if choice.everything:
        if count is not None and count != stats.num_samples:
            raise ValueError(f"{policy!r} selected every sample, expected k={count}")
        return {"full": True}
    if choice.pick is not None:
        size = None if choice.pick.below_share is not None else choice.pick.k
        if count is not None and size != count:
            raise ValueError(f"{policy!r} returned a pick of {size} samples, expected k={count}")
        return {"pick": choice.pick}
    idx, device = choice.indices, stats.device
    if (not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.device != device
            or idx.dtype not in (torch.int32, torch.int64)):
        raise TypeError(f"{policy!r}.select must return 1-D int32/int64 ids on {device}")
    if count is not None and idx.numel() != count:
        raise ValueError(f"{policy!r} returned {idx.numel()} ids, expected k={count}")
    return {"ids": idx.to(index_dtype(stats.num_samples))}
