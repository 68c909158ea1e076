"""Upper confidence bound: the EMA loss plus c times its uncertainty.

The statistics are exponentially weighted because the rewards (losses) drift as the model learns;
this is not UCB1's count bonus.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_float
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["UCB", "ucb_score"]

_F32_MAX = float(torch.finfo(torch.float32).max)


def ucb_score(mean: torch.Tensor, var: torch.Tensor, seen: torch.Tensor, c: float,
              uncertainty: str = "std", age: torch.Tensor | None = None, drift: float = 0.0
              ) -> torch.Tensor:
    """``mean + c * sqrt(var)`` (``"std"``) or ``mean + c * var`` (``"var"``); unseen samples +inf.

    With ``drift > 0`` the variance of a sample grows while it goes unobserved, as for a random walk:
    ``var + drift * vbar * age``, where ``age`` is the number of epochs since its last observation
    and ``vbar`` the mean variance of the seen samples (the typical change of a loss between two
    visits, in loss units squared, so the term needs no scale of its own). Those terms are computed
    in float64 and saturate at the float32 maximum, so extreme but finite losses (+-1e38) keep the
    scores finite and ordered.
    """
    var = var.clamp(min=0)
    if drift > 0.0 and age is not None:
        v64 = var.double()
        n_seen = seen.sum().clamp(min=1)
        vbar = torch.where(seen, v64, torch.zeros_like(v64)).sum() / n_seen
        grown = v64 + (drift * vbar) * age.to(torch.float64).clamp(min=0)
        var = grown.clamp(max=_F32_MAX).to(torch.float32)
    spread = var.sqrt() if uncertainty == "std" else var
    score = mean + c * spread
    return torch.where(seen, score, torch.full_like(score, float("inf")))


class UCB(Policy):
    """Keep the k samples with the highest upper confidence bound of their loss.

    Args:
        c: weight of the uncertainty term, >= 0. Default ``1.0``.
        uncertainty: ``"std"`` (default) or ``"var"``.
        drift: growth of an unobserved sample's variance per epoch, as a multiple of the mean
            variance of the seen samples (see :func:`ucb_score`). Default ``0.0``.
    """

    name = "ucb"

    def __init__(self, c: float = 1.0, uncertainty: str = "std", drift: float = 0.0) -> None:
        self.c = check_float("c", c, low=0.0)
        self.uncertainty = check_choice("uncertainty", uncertainty, ("std", "var"))
        self.drift = check_float("drift", drift, low=0.0)

    def settings(self) -> dict:
        return {"c": self.c, "uncertainty": self.uncertainty, "drift": self.drift}

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        age = (epoch - stats.last_epoch) if self.drift > 0.0 else None
        score = ucb_score(stats.mean, stats.var, stats.seen, self.c, self.uncertainty, age,
                          self.drift)
        return Selection(backend.top_k(score, stats.num_samples, k, seed))
