"""Static pruning baselines: one fixed subset for the whole run.

``Static()`` keeps a fixed random subset; ``Static(scores)`` keeps the k highest of user-supplied
per-sample scores, for example EL2N scores or forgetting counts computed with
:mod:`gpuprune.static_scores` (their cost is paid before training and should be counted).
"""

from __future__ import annotations

import torch

from ..rng import draw_seeds
from ..scores import ScoreBank
from ..select import random_k, top_k_by_score
from .base import Policy, Selection

__all__ = ["Static"]


class Static(Policy):
    """A fixed subset of k samples (the Pruner passes the same generator every epoch).

    Args:
        scores: optional 1-D float tensor of N scores; the k highest are kept (NaN ranks lowest,
            ties broken at random). ``None`` (default) keeps a random subset.
    """

    name = "static"
    fixed_subset = True

    def __init__(self, scores: torch.Tensor | None = None) -> None:
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
                raise TypeError("scores must be a floating torch.Tensor, got "
                                f"{type(scores).__name__}"
                                f"{'' if not isinstance(scores, torch.Tensor) else ' ' + str(scores.dtype)}")
            if scores.dim() != 1:
                raise ValueError(f"scores must be 1-D, got scores.shape={tuple(scores.shape)}")
        self.scores = scores

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        kernels = getattr(bank, "kernels", None)       # the CUDA kernels, if any: same set
        if self.scores is None:
            if kernels is not None:
                return Selection(kernels.random_k(bank.num_samples, k, seed))
            return Selection(random_k(bank.num_samples, k, seed, bank.device))
        if self.scores.numel() != bank.num_samples:
            raise ValueError(f"scores has {self.scores.numel()} entries, the dataset has "
                             f"{bank.num_samples}")
        if kernels is not None:
            return Selection(kernels.top_k_scores(self.scores.to(bank.device), k, seed))
        return Selection(top_k_by_score(self.scores.to(bank.device), k, seed))

    def __repr__(self) -> str:
        return f"Static(scores={'None' if self.scores is None else 'tensor'})"
