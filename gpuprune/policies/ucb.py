"""Upper confidence bound: the EMA loss plus c times its uncertainty.

The statistics are exponentially weighted because the rewards (losses) drift as the model learns;
this is not UCB1's count bonus. The paper's exact rule (std or variance, the value of c, the EMA
weight, any refresh of scores) is not confirmed: its full text is not available to us. :class:`UCB`'s
settings are chosen by measurement (docs/results.md).

**Lock-in, and why ``drift`` exists.** Only the samples trained in an epoch get new losses, so
only their statistics change. Each new loss moves a trained sample's mean, and that change feeds
its variance, so the uncertainty bonus ``c * std`` of exactly the trained samples *grows*, while
every unselected sample keeps the frozen mean and variance it had when last trained. With
``drift = 0`` the trained set's ``mean + c * std`` stays above every frozen score, and once all
samples have been seen UCB trains the same subset every epoch: dynamic pruning silently becomes
static pruning (measured on Fashion-MNIST, p = 0.5: a Jaccard overlap of exactly 1.0 between
consecutive plans from epoch 3 to 9 of 10). ``drift > 0`` lets the variance of an
unobserved sample grow with the epochs since it was last seen, as a random walk's does (the
reason UCB1's bonus grows with log t for an arm left alone), so long-unselected samples come back.
A re-score pass (:mod:`gpuprune.refresh`) removes the cause from the other side: it gives the
unselected samples fresh losses, at the price of a forward pass over them. UCB then still keeps a
stable subset (measured overlap 0.87 to 0.94), but one chosen on current losses, and it is the most
accurate setting measured; the pass cost 10 to 37 % of the run there.

**Defaults** (``c = 1``, ``"std"``, ``drift = 1``), from the sweep in docs/results.md (Fashion-MNIST
MLP, 10 epochs, 3 seeds): with ``drift = 0`` both ``"std"`` and ``"var"`` lock in (consecutive
selections overlap 0.93 to 1.0 for 4 to 7 epochs); ``drift = 1`` keeps it at 0.42 to 0.82,
matches ``drift = 0`` at p = 0.5 (89.50 +- 0.07 vs 89.52 +- 0.12 %) and beats it at p = 0.7
(88.67 +- 0.11 vs 87.84 +- 0.11 %). ``UCB(drift=0.0)`` is the rule without drift.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_float
from ..keys import Pick, UCBScore, upper_bound_score
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["UCB", "ucb_score", "ucb_select"]


def ucb_score(mean: torch.Tensor, var: torch.Tensor, seen: torch.Tensor, c: float,
              uncertainty: str = "std", age: torch.Tensor | None = None, drift: float = 0.0
              ) -> torch.Tensor:
    """``mean + c * sqrt(var)`` (``"std"``) or ``mean + c * var`` (``"var"``); unseen samples +inf.

    With ``drift > 0`` the variance of a sample grows while it goes unobserved, as for a random walk:
    ``var + drift * scale * age``, where ``age`` is the number of epochs since its last observation
    and ``scale`` a robust typical variance of the seen samples (the typical change of a loss
    between two visits, in loss units squared, so the term needs no scale of its own): their mean
    variance with each value capped at the 90th percentile, so that a few extreme losses cannot
    make every score equal (:func:`gpuprune.keys.drift_scale`). Computed in float64 and rounded
    once (:func:`gpuprune.keys.upper_bound_score`); extreme but finite losses (+-1e38) keep the
    scores finite and ordered.
    """
    return upper_bound_score(mean, var, seen, c, uncertainty, age, drift)


def ucb_select(k: int, seed: int, c: float, uncertainty: str, drift: float, epoch: int
               ) -> Selection:
    """The k samples of highest :func:`ucb_score` at ``epoch`` (ages ``epoch - last_epoch``), ties
    broken by ``hash32(id, seed)``."""
    return Selection(pick=Pick(UCBScore(c, uncertainty, drift, epoch), k, seed))


class UCB(Policy):
    """Keep the k samples with the highest upper confidence bound of their loss.

    Args:
        c: weight of the uncertainty term, >= 0. Default ``1.0``.
        uncertainty: ``"std"`` (default) or ``"var"``.
        drift: growth of an unobserved sample's variance per epoch, as a multiple of a robust
            typical variance of the seen samples (see :func:`ucb_score`), >= 0. Default ``1.0``;
            ``0.0`` disables it, and UCB then settles on one subset (see the module docstring).
    """

    name = "ucb"

    def __init__(self, c: float = 1.0, uncertainty: str = "std", drift: float = 1.0) -> None:
        self.c = check_float("c", c, low=0.0)
        self.uncertainty = check_choice("uncertainty", uncertainty, ("std", "var"))
        self.drift = check_float("drift", drift, low=0.0)

    def settings(self) -> dict:
        return {"c": self.c, "uncertainty": self.uncertainty, "drift": self.drift}

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        return ucb_select(k, seed, self.c, self.uncertainty, self.drift, epoch)
