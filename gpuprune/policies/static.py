"""Static pruning baselines: one fixed subset for the whole run.

``Static()`` keeps a fixed random subset; ``Static(scores)`` keeps the k highest of user-supplied
per-sample scores, for example EL2N scores or forgetting counts computed with
:mod:`gpuprune.static_scores` (their cost is paid before training and should be counted).
"""

from __future__ import annotations

import hashlib

import torch

from ..keys import GivenScore, Rule
from ..rng import draw_seeds
from .base import Policy, Selection

__all__ = ["Static", "static_select"]


def static_select(scores: torch.Tensor | None, num_samples: int, k: int, seed: int,
                  backend) -> torch.Tensor:
    """The k highest ``scores`` (NaN lowest, ties at random), or k random ids when None."""
    return backend.top_k(scores, num_samples, k, seed)


class Static(Policy):
    """A fixed subset of k samples, chosen once.

    Args:
        scores: optional 1-D float tensor of N scores; the k highest are kept (NaN ranks lowest,
            ties broken at random). ``None`` (default) keeps a random subset.
    """

    name = "static"
    reads_losses = False
    fixed_subset = True

    def __init__(self, scores: torch.Tensor | None = None) -> None:
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
                got = type(scores).__name__ + (f" {scores.dtype}" if isinstance(scores, torch.Tensor)
                                               else "")
                raise TypeError(f"scores must be a floating torch.Tensor, got {got}")
            if scores.dim() != 1:
                raise ValueError(f"scores must be 1-D, got scores.shape={tuple(scores.shape)}")
            scores = scores.detach().to(torch.float32).clone()
        self.scores = scores
        # hashed once: settings() is read by every config() (each plan, checkpoint and rank check)
        self._scores_setting = None if scores is None else (
            f"sha256:{hashlib.sha256(scores.cpu().numpy().tobytes()).hexdigest()[:16]}:"
            f"{scores.numel()}")

    def settings(self) -> dict:
        return {"scores": self._scores_setting}

    def resolve(self, keep, num_samples, num_epochs) -> "Static":
        if self.scores is not None and self.scores.numel() != num_samples:
            raise ValueError(f"static scores must have one score per sample: got "
                             f"{self.scores.numel()} scores for num_samples={num_samples}")
        return self

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        scores = None if self.scores is None else GivenScore(self.scores.to(stats.device))
        return Selection(rule=Rule(scores, k, seed))

    def __repr__(self) -> str:
        return f"Static(scores={'None' if self.scores is None else 'tensor'})"
