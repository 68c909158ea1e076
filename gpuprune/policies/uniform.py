"""Uniform random dynamic pruning: a fresh random subset every epoch ("Random*", RS2)."""

from __future__ import annotations

import torch

from ..keys import Rule
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["Uniform", "uniform_select"]


def uniform_select(num_samples: int, k: int, seed: int, backend) -> torch.Tensor:
    """k ids drawn uniformly without replacement: the k largest ``hash32(id, seed)``."""
    return backend.top_k(None, num_samples, k, seed)


class Uniform(Policy):
    """k samples drawn uniformly without replacement, anew each epoch; the losses are not used."""

    name = "uniform"
    reads_losses = False

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        return Selection(rule=Rule(None, k, seed))
