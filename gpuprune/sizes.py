"""Sizes, the leaf every layer may import: the id dtype, the budget, shard sizes, batch counts.

Everything that needs to know how many samples or batches a rank gets (the per-rank view of a plan,
the DALI iterator, the distributed merge, :class:`~gpuprune.Schedule` step counts) calls these, so
the answers cannot drift apart. Plain arithmetic: no planning, no state.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float, check_int

__all__ = ["index_dtype", "budget", "shard_size", "owned_size", "num_batches"]


def index_dtype(num_samples: int) -> torch.dtype:
    """int32 while every id fits (N <= 2**31), else int64: 4 bytes per planned sample, not 8."""
    return torch.int32 if num_samples <= 2**31 else torch.int64


def budget(keep: float, num_samples: int) -> int:
    """k = round(keep * N), rounding half up, at least 1."""
    keep = check_float("keep", keep, low=0.0, high=1.0, low_open=True)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    return max(1, math.floor(keep * num_samples + 0.5))


def shard_size(n: int, world_size: int, drop_last: bool = False) -> int:
    """Entries each of ``world_size`` ranks gets from a list of ``n``: ``ceil(n / W)`` (wrap-around
    padding, as ``DistributedSampler``), or ``floor(n / W)`` with ``drop_last``. Equal on every rank,
    so DDP step counts match."""
    return n // world_size if drop_last else -(-n // world_size)


def owned_size(n: int, rank: int, world_size: int) -> int:
    """How many of the first entries of rank ``rank``'s :func:`shard_indices` share of a list of
    ``n`` are its own: positions ``rank, rank + W, ... < n``. The entries after them (at most one,
    without ``drop_last``) are wrap-around padding that another rank holds as its own."""
    return len(range(rank, n, world_size))


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches of ``batch_size`` in ``n`` samples (the last one short unless ``drop_last``)."""
    return n // batch_size if drop_last else -(-n // batch_size)
