"""Uniform random dynamic pruning: a fresh random subset every epoch ("Random*", RS2)."""

from __future__ import annotations

from dataclasses import replace

from ..keys import Pick
from ..rng import draw_seeds
from .base import Policy, Rule, Selection

__all__ = ["Uniform", "uniform_select"]


def uniform_select(k: int, seed: int) -> Selection:
    """k ids drawn uniformly without replacement: the k largest ``hash32(id, seed)``."""
    return Selection(pick=Pick(None, k, seed))


class Uniform(Policy):
    """k samples drawn uniformly without replacement, anew each epoch; the losses are not used,
    so every plan is determined in advance (``Schedule.reads_losses`` is False)."""

    name = "uniform"

    def rule(self, keep, num_samples, schedule, decay=None) -> Rule:
        rule = super().rule(keep, num_samples, schedule, decay)
        return replace(rule, schedule=replace(rule.schedule, reads_losses=False))

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        return uniform_select(k, seed)
