"""Epsilon-greedy: exploit the highest EMA losses, explore a random share of the rest."""

from __future__ import annotations

import math

import torch

from .._checks import check_float
from ..keys import MeanScore, Pick, mean_score
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["EpsilonGreedy", "epsilon_greedy_select", "greedy_score"]


def greedy_score(mean: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """The EMA loss, with never-seen samples at +inf so that each is visited before exploitation
    (:func:`gpuprune.keys.mean_score`, the reference of the kernels' ``MeanScore``)."""
    return mean_score(mean, seen)


def epsilon_greedy_select(k: int, epsilon: float, seeds: tuple[int, int]) -> Selection:
    """Top ``k - m`` by :func:`greedy_score` plus ``m = floor(epsilon * k)`` uniform picks from the
    others: the ``m`` largest ``hash32(id, seeds[1])`` among the samples not taken by the first
    part. Both parts are exact-k selections over unique keys (see :mod:`gpuprune.keys`)."""
    return Selection(pick=Pick(MeanScore(), k, seeds[0], explore=math.floor(epsilon * k),
                               explore_seed=seeds[1]))


class EpsilonGreedy(Policy):
    """Epsilon-greedy selection on the EMA loss.

    Args:
        epsilon: share of the budget explored uniformly at random, in [0, 1]. Default ``0.1``.
    """

    name = "epsilon_greedy"

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = check_float("epsilon", epsilon, low=0.0, high=1.0)

    def settings(self) -> dict:
        return {"epsilon": self.epsilon}

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        seeds = draw_seeds(generator, 2)
        return epsilon_greedy_select(k, self.epsilon, (seeds[0], seeds[1]))
