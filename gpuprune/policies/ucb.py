"""Upper confidence bound: the EMA loss plus c times its uncertainty.

The statistics are exponentially weighted because the rewards (losses) drift as the model learns;
this is not UCB1's count bonus.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_float
from ..rng import draw_seeds
from ..scores import ScoreBank
from ..select import top_k_by_score
from .base import Policy, Selection

__all__ = ["UCB", "ucb_score"]


def ucb_score(mean: torch.Tensor, var: torch.Tensor, seen: torch.Tensor, c: float,
              uncertainty: str = "std") -> torch.Tensor:
    """``mean + c * sqrt(var)`` (``"std"``) or ``mean + c * var`` (``"var"``); unseen samples +inf."""
    spread = var.clamp(min=0).sqrt() if uncertainty == "std" else var.clamp(min=0)
    score = mean + c * spread
    return torch.where(seen, score, torch.full_like(score, float("inf")))


class UCB(Policy):
    """Keep the k samples with the highest upper confidence bound of their loss.

    Args:
        c: weight of the uncertainty term, >= 0. Default ``1.0``.
        uncertainty: ``"std"`` (default) or ``"var"``.
    """

    name = "ucb"

    def __init__(self, c: float = 1.0, uncertainty: str = "std") -> None:
        self.c = check_float("c", c, low=0.0)
        self.uncertainty = check_choice("uncertainty", uncertainty, {"std", "var"})

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        if getattr(bank, "kernels", None) is not None:     # the CUDA kernels: same set
            return Selection(bank.kernels.ucb(bank, k, seed, self.c, self.uncertainty))
        score = ucb_score(bank.mean, bank.var, bank.seen, self.c, self.uncertainty)
        return Selection(top_k_by_score(score, k, seed))
