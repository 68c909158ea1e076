"""Full data: every sample, every epoch (the reference baseline, and every policy's full epochs)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..sizes import index_dtype
from .base import Policy, Rule, Selection

__all__ = ["FullData", "full_select", "FULL_DATA"]


def full_select(num_samples: int, device: torch.device) -> Selection:
    """Every id ``0 .. N-1`` (in the id dtype, on ``device``); the plan's shuffle orders them."""
    return Selection(torch.arange(num_samples, dtype=index_dtype(num_samples), device=device))


class FullData(Policy):
    """Train on all N samples every epoch; the budget is N. Its :meth:`select` also makes the
    full-data epochs (warm-up, final, annealing) of every other policy."""

    name = "full"

    def rule(self, keep, num_samples, schedule, decay=None) -> Rule:
        rule = super().rule(keep, num_samples, schedule, decay)
        return replace(rule, schedule=replace(rule.schedule, all_full=True), k=num_samples)

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        return full_select(stats.num_samples, stats.device)


#: the policy every full-data epoch is planned with
FULL_DATA = FullData()
