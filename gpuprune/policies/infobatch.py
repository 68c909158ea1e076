"""InfoBatch (Qin et al., ICLR 2024): soft pruning of well-learned samples with loss rescaling.

The rule, as in the official code (NUS-HPC-AI-Lab/InfoBatch, ``infobatch/infobatch.py``) and by
default here:

* **Score**: the sample's latest training loss. The Pruner's ``decay`` defaults to ``0.0`` for this
  policy (its :meth:`InfoBatch.rule`), so the statistics' mean *is* the last finite loss.
  ``Pruner(..., decay=0.9)`` scores by an exponential moving average instead (an option: with it
  the below-mean set changes slowly, because a sample's score moves by a tenth of each change).
* **Well learned**: score strictly below the mean score.
* **Kept share** ``q = min(1, max(min_keep, 1 - ratio))`` with ``min_keep = 0.1``: of the
  ``n_below`` well-learned samples exactly ``floor(q * n_below)`` are kept, drawn uniformly without
  replacement, and their loss is multiplied by ``1 / q`` (at most 10), so the expected gradient is
  unchanged; every other sample is kept with weight 1. A pruned epoch therefore plans
  ``N - n_below + floor(q * n_below)`` samples, a number that depends on the losses.
* **Annealing**: epochs ``>= floor(delta * num_epochs)`` train on full data with every weight 1
  (the final full epochs of :meth:`InfoBatch.rule`; at ``num_epochs = 10``, ``delta = 0.875``:
  epochs 8 and 9).

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
from dataclasses import replace


from .._checks import check_bool, check_float
from ..keys import BelowMeanScore, Pick
from ..rng import draw_seeds
from .base import Policy, Rule, Selection

__all__ = ["InfoBatch", "infobatch_select", "kept_share"]


def kept_share(ratio: float, min_keep: float = 0.1) -> float:
    """The share q of the well-learned samples kept: ``min(1, max(min_keep, 1 - ratio))``.

    With the default ``min_keep = 0.1`` a ratio above 0.9 keeps 10% (loss weight 10), as the
    official code does; the weight ``1 / q`` never exceeds ``1 / min_keep``.
    """
    return min(1.0, max(min_keep, 1.0 - ratio))


def infobatch_select(num_samples: int, ratio: float, seed: int, min_keep: float = 0.1
                     ) -> Selection:
    """Every sample whose score (the statistics' mean: the latest loss, or its EMA) is at or above
    the mean score of the seen samples, plus ``floor(q * n_below)`` of the ``n_below`` seen ones
    strictly below it, drawn uniformly by ``hash32(id, seed)``, with ``q = kept_share(ratio,
    min_keep)``; the below-mean samples are rescaled by ``1 / q``. The mean is a fixed-order float64
    sum (:func:`gpuprune.stats.masked_mean`), so every device agrees on the below-mean set; never-seen
    samples are never below it. Carrying it out costs one host read: ``n_below``.
    """
    q = kept_share(ratio, min_keep)
    return Selection(pick=Pick(BelowMeanScore(), num_samples, seed, below_share=q), weight=1.0 / q)


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
        rescale: multiply the kept well-learned samples' loss by ``1 / q``. Default ``True`` (the
            official rule); ``False`` is the ablation without rescaling (weight 1).

    The Pruner scores this policy by the latest loss (its rule's ``decay = 0.0``); pass
    ``Pruner(decay=0.9)`` for an exponential moving average.
    """

    name = "infobatch"

    def __init__(self, ratio: float | None = None, delta: float = 0.875,
                 min_keep: float = 0.1, rescale: bool = True) -> None:
        self.ratio = None if ratio is None else check_float("ratio", ratio, low=0.0, high=1.0,
                                                            high_open=True)
        self.delta = check_float("delta", delta, low=0.0, high=1.0)
        self.min_keep = check_float("min_keep", min_keep, low=0.0, high=1.0, low_open=True)
        self.rescale = check_bool("rescale", rescale)

    def settings(self) -> dict:
        out = {"ratio": self.ratio, "delta": self.delta, "min_keep": self.min_keep}
        if not self.rescale:        # only when off: the configuration of 0.2 checkpoints otherwise
            out["rescale"] = False
        return out

    def _weight(self) -> float:
        """The loss weight of the kept well-learned samples: ``1 / q``, or 1 without rescaling."""
        return 1.0 / kept_share(self.ratio, self.min_keep) if self.rescale else 1.0

    def rule(self, keep, num_samples, schedule, decay=None) -> Rule:
        """InfoBatch's rule: ``ratio`` from ``1 - keep`` unless set, its annealing epochs as the
        final full epochs unless the schedule sets them, pruned sizes that depend on the losses,
        and ``decay=0.0`` (the latest loss) unless given. Needs ``num_epochs``."""
        if schedule.num_epochs is None:
            raise ValueError("policy='infobatch' needs num_epochs for its annealing (epochs >= "
                             "floor(delta * num_epochs) train on full data)")
        policy = (self if self.ratio is not None
                  else InfoBatch(1.0 - keep, self.delta, self.min_keep, self.rescale))
        final = schedule.final_full_epochs
        if final is None:
            final = schedule.num_epochs - self.first_full_epoch(schedule.num_epochs)
        rule = super().rule(keep, num_samples, replace(schedule, final_full_epochs=final),
                            0.0 if decay is None else decay)
        return replace(rule, policy=policy, schedule=replace(rule.schedule, exact_size=False))

    def first_full_epoch(self, num_epochs: int) -> int:
        """The first annealing epoch, ``floor(delta * num_epochs)`` (the official sampler trains
        epoch e on full data when ``e + 1 > delta * num_epochs``)."""
        return math.floor(self.delta * num_epochs)

    def check_selection(self, selection, k, num_samples, name) -> None:
        """A selection InfoBatch makes: weight ``1 / q``, every sample outside the below-mean mask
        kept, and ``floor(q * n_below)`` of the ``n_below`` inside it."""
        q = kept_share(self.ratio, self.min_keep)
        below = selection.rescaled
        if below is None or selection.weight != self._weight():
            raise ValueError(f"{name}: an InfoBatch plan rescales its kept below-mean samples by "
                             f"{'1/q = ' if self.rescale else ''}{self._weight()!r}, got "
                             f"weight={selection.weight!r} and "
                             f"{'no' if below is None else 'a'} rescaled mask")
        n_below = int(below.sum())
        want = num_samples - n_below + math.floor(q * n_below)
        ids = selection.indices.long()
        kept_above = int((~below[ids]).sum())
        if ids.numel() != want or kept_above != num_samples - n_below:
            raise ValueError(f"{name} holds {ids.numel()} ids ({kept_above} of the "
                             f"{num_samples - n_below} samples at or above the mean); InfoBatch "
                             f"keeps all of those and floor(q * {n_below}) of the below-mean "
                             f"ones: {want} ids")

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        choice = infobatch_select(stats.num_samples, self.ratio, seed, self.min_keep)
        return choice if self.rescale else replace(choice, weight=1.0)
