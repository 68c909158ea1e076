"""An epoch's plan: the shuffled sample ids to train on and their loss weights, and its shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_int

__all__ = ["Plan", "shard_indices"]


def shard_indices(indices: torch.Tensor, rank: int, world_size: int, drop_last: bool = False
                  ) -> torch.Tensor:
    """Rank ``rank``'s equal-sized share of ``indices`` (positions rank, rank + W, ...).

    Like ``DistributedSampler``: with ``drop_last=False`` the list is padded by wrapping around to
    ``ceil(n / W) * W`` entries (so at most ``W - 1`` ids appear twice in an epoch); with
    ``drop_last=True`` it is cut to ``floor(n / W) * W``. Every rank gets the same count, so DDP
    step counts match.
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got indices.shape={tuple(indices.shape)}")
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    n = indices.numel()
    per = n // world_size if drop_last else -(-n // world_size)
    total = per * world_size
    if total > n:  # wrap around (n > 0 here, since total > n >= 0 needs per >= 1)
        reps = -(-total // n)
        indices = indices.repeat(reps)[:total]
    else:
        indices = indices[:total]
    return indices[rank::world_size]


@dataclass(frozen=True)
class Plan:
    """One epoch of training data.

    Attributes:
        epoch: the epoch this plan is for.
        indices: int64 sample ids in training order, on the Pruner's device.
        weights: float32 loss weight per entry of ``indices``, or None when all are 1.
        full: True for a full-data epoch (warm-up, final epochs or the ``full`` policy).
        num_samples: N, the dataset size.
    """

    epoch: int
    indices: torch.Tensor
    weights: torch.Tensor | None
    full: bool
    num_samples: int

    def __len__(self) -> int:
        return self.indices.numel()

    @property
    def keep_fraction(self) -> float:
        """Planned samples divided by N."""
        return len(self) / self.num_samples

    def shard(self, rank: int, world_size: int, drop_last: bool = False) -> "Plan":
        """This rank's equal share of the plan (see :func:`shard_indices`)."""
        idx = shard_indices(self.indices, rank, world_size, drop_last)
        w = None
        if self.weights is not None:
            w = shard_indices(self.weights, rank, world_size, drop_last)
        return Plan(self.epoch, idx, w, self.full, self.num_samples)

    def batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of batches of ``batch_size`` (the last one short unless ``drop_last``)."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
