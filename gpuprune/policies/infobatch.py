"""InfoBatch (Qin et al., ICLR 2024): soft pruning of well-learned samples with loss rescaling.

Each pruned epoch, a sample is "well learned" when its score (the EMA loss) is below the mean score
of the seen samples. Of the ``n_below`` well-learned samples, exactly ``floor((1 - ratio) * n_below)``
are kept, drawn uniformly without replacement, and their loss is scaled by ``1 / (1 - ratio)`` so the
expected gradient is unchanged; every other sample is kept with weight 1. The kept count therefore
depends on the scores: ``N - n_below + floor((1 - ratio) * n_below)``. Near the end of training
(epoch >= ``delta * num_epochs``) the Pruner switches to full data, which InfoBatch calls annealing.

Never-seen samples are tracked explicitly (they are never "well learned") instead of starting at a
score of 3.0 as in the released code.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_float
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["InfoBatch", "infobatch_select"]


def infobatch_select(score: torch.Tensor, seen: torch.Tensor, ratio: float, seed: int, backend
                     ) -> Selection:
    """Kept ids, and the below-mean mask they are rescaled by. One host read: the below-mean count."""
    n = score.numel()
    s64 = score.double()
    mean = torch.where(seen, s64, torch.zeros_like(s64)).sum() / seen.sum().clamp(min=1)
    below = seen & (s64 < mean)
    n_below = int(below.sum())                       # the one host read of the plan
    kept = n - n_below + math.floor((1.0 - ratio) * n_below)
    rank = torch.where(below, torch.zeros_like(score), torch.ones_like(score))
    idx = backend.top_k(rank, n, kept, seed)         # everything not below, then random below ones
    return Selection(idx, below, 1.0 / (1.0 - ratio))


class InfoBatch(Policy):
    """InfoBatch soft pruning.

    Args:
        ratio: share of the well-learned samples pruned each epoch, in [0, 1). ``None`` (default)
            takes the Pruner's prune ratio ``1 - keep`` (capped at 0.999).
        delta: fraction of ``num_epochs`` after which training uses full data. Default ``0.875``.
    """

    name = "infobatch"
    exact_k = False

    def __init__(self, ratio: float | None = None, delta: float = 0.875) -> None:
        self.ratio = None if ratio is None else check_float("ratio", ratio, low=0.0, high=1.0,
                                                            high_open=True)
        self.delta = check_float("delta", delta, low=0.0, high=1.0)

    def settings(self) -> dict:
        return {"ratio": self.ratio, "delta": self.delta}

    def resolve(self, keep, num_samples, num_epochs) -> "InfoBatch":
        if num_epochs is None:
            raise ValueError("policy='infobatch' needs num_epochs for its annealing (the last "
                             "(1 - delta) of the epochs train on full data)")
        if self.ratio is not None:
            return self
        return InfoBatch(ratio=min(1.0 - keep, 0.999), delta=self.delta)

    def final_full_epochs(self, num_epochs: int | None) -> int:
        """Epochs of full data at the end: those with ``epoch >= delta * num_epochs``."""
        return 0 if num_epochs is None else num_epochs - math.ceil(self.delta * num_epochs)

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        return infobatch_select(stats.mean, stats.seen, self.ratio, seed, backend)
