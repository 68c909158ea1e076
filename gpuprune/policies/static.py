"""Static pruning baselines: one fixed subset for the whole run.

``Static()`` keeps a fixed random subset; ``Static(scores)`` keeps the k highest of user-supplied
per-sample scores, for example EL2N scores or forgetting counts computed with
:mod:`gpuprune.static_scores` (their cost is paid before training and should be counted).
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import torch

from ..keys import GivenScore, Pick
from ..rng import draw_seeds
from .base import Policy, Rule, Selection

__all__ = ["Static", "static_select"]


def static_select(scores: torch.Tensor | None, k: int, seed: int) -> Selection:
    """The k highest ``scores`` (NaN lowest, ties broken by ``hash32(id, seed)``), or k random ids
    when None."""
    return Selection(pick=Pick(None if scores is None else GivenScore(scores), k, seed))


class Static(Policy):
    """A fixed subset of k samples, chosen once (``Schedule.select_once``: drawn from epoch 0's
    generator, whatever epoch it is drawn in, and reused by every later pruned epoch).

    Args:
        scores: optional 1-D float tensor of N scores; the k highest are kept (NaN ranks lowest,
            ties broken at random). ``None`` (default) keeps a random subset.
    """

    name = "static"

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

    def rule(self, keep, num_samples, schedule, decay=None) -> Rule:
        if self.scores is not None and self.scores.numel() != num_samples:
            raise ValueError(f"static scores must have one score per sample: got "
                             f"{self.scores.numel()} scores for num_samples={num_samples}")
        rule = super().rule(keep, num_samples, schedule, decay)
        return replace(rule, schedule=replace(rule.schedule, select_once=True, reads_losses=False))

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        (seed,) = draw_seeds(generator, 1)
        scores = None if self.scores is None else self.scores.to(stats.device)
        return static_select(scores, k, seed)

    def __repr__(self) -> str:
        return f"Static(scores={'None' if self.scores is None else 'tensor'})"
