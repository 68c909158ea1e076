"""Full data: every sample, every epoch (the baseline, and warm-up / final epochs)."""

from __future__ import annotations

import torch

from ..scores import ScoreBank
from .base import Policy, Selection

__all__ = ["FullData"]


class FullData(Policy):
    """Train on all N samples; ``k`` is ignored."""

    name = "full"
    exact_k = False

    def select(self, bank: ScoreBank, k: int, generator: torch.Generator) -> Selection:
        return Selection(torch.arange(bank.num_samples, device=bank.device))
