"""InfoBatch (Qin et al., ICLR 2024): soft pruning of well-learned samples with loss rescaling.

The rule, as in the official code (NUS-HPC-AI-Lab/InfoBatch, ``infobatch/infobatch.py``) and by
default here:

* **Score**: the sample's latest training loss. The Pruner's ``decay`` defaults to ``0.0`` for this
  policy (:attr:`InfoBatch.default_decay`), so the statistics' mean *is* the last finite loss.
  ``Pruner(..., decay=0.9)`` scores by an exponential moving average instead (an option: with it
  the below-mean set changes slowly, because a sample's score moves by a tenth of each change).
* **Well learned**: score strictly below the mean score.
* **Kept share** ``q = min(1, max(min_keep, 1 - ratio))`` with ``min_keep = 0.1``: of the
  ``n_below`` well-learned samples exactly ``floor(q * n_below)`` are kept, drawn uniformly without
  replacement, and their loss is multiplied by ``1 / q`` (at most 10), so the expected gradient is
  unchanged; every other sample is kept with weight 1. A pruned epoch therefore plans
  ``N - n_below + floor(q * n_below)`` samples, a number that depends on the losses.
* **Annealing**: epochs ``>= floor(delta * num_epochs)`` train on full data with every weight 1
  (:meth:`InfoBatch.final_full_epochs`; at ``num_epochs = 10``, ``delta = 0.875``: epochs 8 and 9).

Where gpuprune deliberately differs from the official code, and why:

* **Randomness.** The official sampler calls ``np.random.seed(iteration)`` on numpy's *global* RNG
  every epoch (reseeding every other user of it); gpuprune draws from a generator seeded from
  (seed, epoch) and a keyed hash, so the *kept* well-learned samples are a different (equally
  uniform) draw. Counts, the below-mean set and the weights are the same for the same losses.
* **Weights during annealing.** The official code resets the weights only when ``delta *
  num_epochs`` is an integer, so with ``num_epochs = 10`` the samples rescaled in the last pruned
  epoch keep weight ``1 / q`` through the full-data epochs. gpuprune resets them (weight 1 in every
  full epoch), which is what the paper describes.
* **The mean.** The official mean is a float32 mean over all N stored scores: never-trained
  samples count with the initial score 3.0, and one NaN loss makes the mean NaN (then nothing is
  "well learned" and nothing is pruned). gpuprune averages (in float64) the scores of the samples
  that have a finite loss, and never stores a NaN/inf loss (it keeps the previous one). Never-seen
  samples are tracked explicitly and are never "well learned", instead of relying on the initial
  3.0 being above the mean (which one numpy version broke, InfoBatch issue #25).
* **Duplicates.** A sample appearing twice in one batch gets the mean of its losses (the official
  code keeps whichever write lands last).
* **Distributed.** The official code all-gathers (index, loss) every step; gpuprune merges the
  observations of all ranks once per epoch, before planning: the plan sees the same scores.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_float
from ..keys import BelowMeanScore, Rule
from ..rng import draw_seeds
from ..stats import masked_mean
from .base import Policy, Selection

__all__ = ["InfoBatch", "infobatch_select", "kept_share"]


def kept_share(ratio: float, min_keep: float = 0.1) -> float:
    """The share q of the well-learned samples kept: ``min(1, max(min_keep, 1 - ratio))``.

    With the default ``min_keep = 0.1`` a ratio above 0.9 keeps 10% (loss weight 10), as the
    official code does; the weight ``1 / q`` never exceeds ``1 / min_keep``.
    """
    return min(1.0, max(min_keep, 1.0 - ratio))


def infobatch_select(score: torch.Tensor, seen: torch.Tensor, ratio: float, seed: int, backend,
                     min_keep: float = 0.1) -> Selection:
    """Kept ids, and the below-mean mask they are rescaled by. One host read: the below-mean count.

    Args:
        score: per-sample score (float32): the latest loss, or its EMA.
        seen: which samples have a finite loss; only they enter the mean, and only they can be
            well learned.
        ratio: the prune ratio r of the well-learned samples, in [0, 1).
        seed: hash seed of the uniform draw among the well-learned samples.
        backend: provides ``top_k``.
        min_keep: lower bound of the kept share (see :func:`kept_share`).
    """
    n = score.numel()
    s64 = score.double()
    # summed in a fixed order, so CPU and GPU agree on the below-mean set whatever the values
    mean = masked_mean(s64, seen)
    below = seen & (s64 < mean)
    n_below = int(below.sum())                       # the one host read of the plan
    q = kept_share(ratio, min_keep)
    kept = n - n_below + math.floor(q * n_below)
    rank = torch.where(below, torch.zeros_like(score), torch.ones_like(score))
    idx = backend.top_k(rank, n, kept, seed)         # everything not below, then random below ones
    return Selection(idx, below, 1.0 / q)


class InfoBatch(Policy):
    """InfoBatch soft pruning, with the official code's semantics (see the module docstring).

    Args:
        ratio: the prune ratio r of the well-learned samples, in [0, 1). ``None`` (default) takes
            the Pruner's prune ratio ``1 - keep``.
        delta: share of ``num_epochs`` pruned; epochs ``>= floor(delta * num_epochs)`` train on
            full data. Default ``0.875``.
        min_keep: lower bound of the kept share of the well-learned samples, in (0, 1]; the loss
            weight is at most ``1 / min_keep``. Default ``0.1`` (the official clamp: a ratio above
            0.9 keeps 10% at weight 10).

    The Pruner scores this policy by the latest loss (``default_decay = 0.0``); pass
    ``Pruner(decay=0.9)`` for an exponential moving average.
    """

    name = "infobatch"
    exact_k = False
    default_decay = 0.0

    def __init__(self, ratio: float | None = None, delta: float = 0.875,
                 min_keep: float = 0.1) -> None:
        self.ratio = None if ratio is None else check_float("ratio", ratio, low=0.0, high=1.0,
                                                            high_open=True)
        self.delta = check_float("delta", delta, low=0.0, high=1.0)
        self.min_keep = check_float("min_keep", min_keep, low=0.0, high=1.0, low_open=True)

    def settings(self) -> dict:
        return {"ratio": self.ratio, "delta": self.delta, "min_keep": self.min_keep}

    def resolve(self, keep, num_samples, num_epochs) -> "InfoBatch":
        if num_epochs is None:
            raise ValueError("policy='infobatch' needs num_epochs for its annealing (epochs >= "
                             "floor(delta * num_epochs) train on full data)")
        if self.ratio is not None:
            return self
        return InfoBatch(ratio=1.0 - keep, delta=self.delta, min_keep=self.min_keep)

    def first_full_epoch(self, num_epochs: int) -> int:
        """The first annealing epoch, ``floor(delta * num_epochs)`` (the official sampler trains
        epoch e on full data when ``e + 1 > delta * num_epochs``)."""
        return math.floor(self.delta * num_epochs)

    def final_full_epochs(self, num_epochs: int | None) -> int:
        """Epochs of full data at the end: ``num_epochs - floor(delta * num_epochs)``."""
        return 0 if num_epochs is None else num_epochs - self.first_full_epoch(num_epochs)

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        q = kept_share(self.ratio, self.min_keep)
        return Selection(rule=Rule(BelowMeanScore(), stats.num_samples, seed, below_share=q),
                         weight=1.0 / q)
