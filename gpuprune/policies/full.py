"""Full data: every sample, every epoch (the reference baseline, and every policy's full epochs)."""

from __future__ import annotations

from dataclasses import replace

from .base import Policy, Rule, Selection

__all__ = ["FullData", "full_select", "FULL_DATA"]


def full_select() -> Selection:
    """Every id ``0 .. N-1``; the plan's shuffle orders them, and a full plan counts in no
    sample's ``selected``."""
    return Selection(everything=True)


class FullData(Policy):
    """Train on all N samples every epoch; the budget is N. Its :meth:`select` also makes the
    full-data epochs (warm-up, final, annealing) of every other policy."""

    name = "full"

    def rule(self, keep, num_samples, schedule, decay=None) -> Rule:
        rule = super().rule(keep, num_samples, schedule, decay)
        return replace(rule, schedule=replace(rule.schedule, all_full=True), k=num_samples)

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        return full_select()


#: the policy every full-data epoch is planned with
FULL_DATA = FullData()
