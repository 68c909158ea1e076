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
              uncertainty: str = "std", age: torch.Tensor | None = None, drift: float = 0.0
              ) -> torch.Tensor:
    """``mean + c * sqrt(var)`` (``"std"``) or ``mean + c * var`` (``"var"``); unseen samples +inf.

    With ``drift > 0`` the variance of a sample grows while it goes unobserved, as for a random walk:
    ``var + drift * vbar * age``, where ``age`` is the number of epochs since its last observation
    and ``vbar`` the mean variance of the seen samples (the typical change of a loss between two
    visits, in loss units squared, so the term needs no scale of its own).
    """
    var = var.clamp(min=0)
    if drift > 0.0 and age is not None:
        n_seen = seen.sum().clamp(min=1)
        vbar = torch.where(seen, var, torch.zeros_like(var)).sum() / n_seen
        var = var + (drift * vbar) * age.to(var.dtype).clamp(min=0)
    spread = var.sqrt() if uncertainty == "std" else var
    score = mean + c * spread
    return torch.where(seen, score, torch.full_like(score, float("inf")))


class UCB(Policy):
    """Keep the k samples with the highest upper confidence bound of their loss.

    Args:
        c: weight of the uncertainty term, >= 0. Default ``1.0``.
        uncertainty: ``"std"`` (default) or ``"var"``.
        drift: growth of an unobserved sample's variance per epoch, as a multiple of the mean
            variance of the seen samples (see :func:`ucb_score`). Default ``0.0``, the paper's rule.
            With stale scores that rule keeps picking the same subset once every sample has been
            seen (unselected samples' statistics never change); ``drift > 0`` (e.g. 1) makes
            long-unselected samples come back. This is gpuprune's extension, not the paper's.
    """

    name = "ucb"

    def __init__(self, c: float = 1.0, uncertainty: str = "std", drift: float = 0.0) -> None:
        self.c = check_float("c", c, low=0.0)
        self.uncertainty = check_choice("uncertainty", uncertainty, {"std", "var"})
        self.drift = check_float("drift", drift, low=0.0)

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        kernels = getattr(bank, "kernels", None)
        if kernels is not None and self.drift == 0.0:     # the CUDA kernels: same set
            return Selection(kernels.ucb(bank, k, seed, self.c, self.uncertainty))
        age = (bank.epoch - bank.last_epoch) if self.drift > 0.0 else None
        score = ucb_score(bank.mean, bank.var, bank.seen, self.c, self.uncertainty, age, self.drift)
        if kernels is not None:
            return Selection(kernels.top_k_scores(score, k, seed))
        return Selection(top_k_by_score(score, k, seed))
