"""Epsilon-greedy: exploit the highest EMA losses, explore a random share of the rest."""

from __future__ import annotations

import math

import torch

from .._checks import check_float
from ..rng import draw_seeds
from ..scores import ScoreBank
from ..select import hash32, top_k, top_k_by_score
from .base import Policy, Selection

__all__ = ["EpsilonGreedy", "epsilon_greedy_select", "greedy_score"]


def greedy_score(bank: ScoreBank) -> torch.Tensor:
    """The EMA loss, with never-seen samples at +inf so that each is visited before exploitation."""
    return torch.where(bank.seen, bank.mean, torch.full_like(bank.mean, float("inf")))


def epsilon_greedy_select(score: torch.Tensor, k: int, epsilon: float, seeds: tuple[int, int]
                          ) -> torch.Tensor:
    """Top ``k - m`` by score plus ``m = floor(epsilon * k)`` uniform picks from the others.

    Both parts are exact-k selections over unique keys (see :mod:`gpuprune.select`).
    """
    n = score.numel()
    m = math.floor(epsilon * k)
    exploit = top_k_by_score(score, k - m, seeds[0])
    if m == 0:
        return exploit
    taken = torch.zeros(n, dtype=torch.bool, device=score.device)
    taken[exploit] = True
    key = torch.where(taken, torch.full((), -1, dtype=torch.long, device=score.device),
                      hash32(torch.arange(n, device=score.device), seeds[1]))
    explore = top_k(key, m)
    return torch.cat([exploit, explore])


class EpsilonGreedy(Policy):
    """Epsilon-greedy selection on the EMA loss.

    Args:
        epsilon: share of the budget explored uniformly at random, in [0, 1]. Default ``0.1``.
    """

    name = "epsilon_greedy"

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = check_float("epsilon", epsilon, low=0.0, high=1.0)

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        seeds = draw_seeds(generator, 2)
        if getattr(bank, "kernels", None) is not None:     # the CUDA kernels: same set
            return Selection(bank.kernels.epsilon_greedy(bank, k, self.epsilon,
                                                         (seeds[0], seeds[1])))
        return Selection(epsilon_greedy_select(greedy_score(bank), k, self.epsilon,
                                               (seeds[0], seeds[1])))
