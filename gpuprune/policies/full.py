"""Full data: every sample, every epoch (the reference baseline)."""

from __future__ import annotations

from .base import Policy, Selection

__all__ = ["FullData"]


class FullData(Policy):
    """Train on all N samples every epoch; the budget is ignored."""

    name = "full"
    reads_losses = False
    keeps_all = True

    def select(self, stats, k, *, epoch, generator, backend) -> Selection:
        n = stats.num_samples
        return Selection(backend.top_k(None, n, n, 0))
