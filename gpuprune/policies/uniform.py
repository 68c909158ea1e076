"""Uniform random dynamic pruning: a fresh random subset every epoch ("Random*", RS2)."""

from __future__ import annotations

import torch

from ..rng import draw_seeds
from ..scores import ScoreBank
from ..select import random_k
from .base import Policy, Selection

__all__ = ["Uniform"]


class Uniform(Policy):
    """k samples drawn uniformly without replacement, anew each epoch; scores are not used."""

    name = "uniform"

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        if getattr(bank, "kernels", None) is not None:     # the CUDA kernels: same set
            return Selection(bank.kernels.random_k(bank.num_samples, k, seed))
        return Selection(random_k(bank.num_samples, k, seed, bank.device))
