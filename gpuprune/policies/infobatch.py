"""InfoBatch (Qin et al., ICLR 2024): soft pruning of well-learned samples with loss rescaling.

Each pruned epoch, a sample is "well learned" when its EMA loss is below the mean EMA loss of the
seen samples. Of the ``n_below`` well-learned samples, exactly ``floor((1 - ratio) * n_below)`` are
kept, drawn uniformly without replacement, and their loss is scaled by ``1 / (1 - ratio)`` so the
expected gradient is unchanged; every other sample is kept with weight 1. The kept count therefore
depends on the scores: ``N - n_below + floor((1 - ratio) * n_below)``. Near the end of training
(epoch >= ``delta * num_epochs``) the Pruner switches to full data, which InfoBatch calls annealing.

Differences from the released code, on purpose: the score is the EMA of the loss (the paper's
smoothing) rather than the latest loss, and never-seen samples are tracked explicitly instead of
starting at a score of 3.0.
"""

from __future__ import annotations

import math

import torch

from .._checks import check_float
from ..rng import draw_seeds
from ..scores import ScoreBank
from ..select import hash32, top_k
from .base import Policy, Selection

__all__ = ["InfoBatch", "infobatch_select"]


def infobatch_select(score: torch.Tensor, seen: torch.Tensor, ratio: float, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (kept ids, their loss weights). One host sync: the number of below-mean samples."""
    n = score.numel()
    s64 = score.double()
    n_seen = seen.sum()
    mean = torch.where(seen, s64, torch.zeros_like(s64)).sum() / n_seen.clamp(min=1)
    below = seen & (s64 < mean)
    n_below = int(below.sum())                       # the one sync per epoch
    kept = n - n_below + math.floor((1.0 - ratio) * n_below)
    h = hash32(torch.arange(n, device=score.device), seed)
    key = torch.where(below, h, h + (1 << 32))      # all others rank above every below-mean one
    idx = top_k(key, kept)
    weights = torch.where(below[idx], torch.full((), 1.0 / (1.0 - ratio), device=score.device),
                          torch.ones((), device=score.device)).float()
    return idx, weights


class InfoBatch(Policy):
    """InfoBatch soft pruning.

    Args:
        ratio: probability-like share of the well-learned samples pruned each epoch, in [0, 1).
            ``None`` (default) takes the Pruner's prune ratio ``1 - keep``.
        delta: fraction of ``num_epochs`` after which training uses full data. Default ``0.875``.
    """

    name = "infobatch"
    exact_k = False

    def __init__(self, ratio: float | None = None, delta: float = 0.875) -> None:
        self.ratio = None if ratio is None else check_float("ratio", ratio, low=0.0, high=1.0,
                                                            high_open=True)
        self.delta = check_float("delta", delta, low=0.0, high=1.0)

    def final_full_epochs(self, num_epochs: int) -> int:
        """Epochs of full data at the end: those with ``epoch >= delta * num_epochs``."""
        return num_epochs - math.ceil(self.delta * num_epochs)

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        ratio = self.ratio
        if ratio is None:  # from the budget k = round(keep * N)
            ratio = min(max(1.0 - k / bank.num_samples, 0.0), 0.999)
        (seed,) = draw_seeds(generator, 1)
        if getattr(bank, "kernels", None) is not None:     # the CUDA kernels: same set and weights
            return Selection(*bank.kernels.infobatch(bank, ratio, seed))
        idx, w = infobatch_select(bank.mean, bank.seen, ratio, seed)
        return Selection(idx, w)
