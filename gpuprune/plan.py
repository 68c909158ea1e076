"""An epoch's plan: the sample ids in training order, their loss weights, a rank's share.

Sizes (the id dtype, shard sizes, batch counts) live in the leaf :mod:`gpuprune.sizes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_bool, check_int
from .keys import MASK32, fmix32, hash32
from .sizes import num_batches, shard_size

__all__ = ["Plan", "shard_indices", "pack_mask", "mask_lookup"]

# Constants of the plan fingerprint: a hash seed, an odd 32-bit Weyl step, a 32-bit weight key.
_FP_INDEX, _FP_POSITION, _FP_WEIGHT = 0x6A09E667F3BCC908, 0x9E3779B1, 0x3C6EF372


def shard_indices(indices: torch.Tensor, rank: int, world_size: int, drop_last: bool = False
                  ) -> torch.Tensor:
    """Rank ``rank``'s share of ``indices``: positions ``rank, rank + W, ...`` of the list padded by
    wrapping around to ``W * shard_size`` entries (or cut to it with ``drop_last``)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 1:
        raise ValueError(f"indices must be 1-D, got indices.shape={tuple(indices.shape)}")
    world_size = check_int("world_size", world_size, minimum=1)
    rank = check_int("rank", rank, minimum=0, maximum=world_size - 1)
    drop_last = check_bool("drop_last", drop_last)
    n = indices.numel()
    per = shard_size(n, world_size, drop_last)
    pos = rank + world_size * torch.arange(per, device=indices.device)
    if per * world_size > n:      # wrap-around padding (n > 0 here)
        pos = pos % n
    return indices[pos]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of N as N/8 bytes (bit ``i % 8`` of byte ``i // 8``)."""
    n = mask.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def mask_lookup(bits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The bools of :func:`pack_mask` at sample ids ``ids`` (any integer dtype, same device).

    Ids outside the packed range are clamped into it (a negative id reads id 0's bit), so an
    out-of-range id on a GPU cannot trigger a device-side assert and a negative one cannot wrap
    to the end. Such ids are not the caller's data: the observe path flags their batch as invalid
    (see :func:`gpuprune.update.observe_torch`) and the next plan raises; the bits read here are
    then only used for that batch's returned loss.
    """
    i = ids.long().clamp(0, bits.numel() * 8 - 1)
    return ((bits[i >> 3] >> (i & 7).to(torch.uint8)) & 1).bool()


@dataclass(frozen=True, eq=False)
class Plan:
    """One epoch of training data: the sample ids in training order and their loss weights.

    Attributes:
        epoch: the epoch this plan is for.
        indices: sample ids in training order, on the Pruner's device; int32 (int64 when
            N > 2**31). Read-only: the Pruner keeps it as its selection.
        full: True for a full-data epoch (warm-up, final epochs or the ``full`` policy).
        num_samples: N, the dataset size.
        weight: the loss weight of the rescaled samples (InfoBatch: ``1 / keep share``); 1.0 when
            no sample is rescaled.
        rescaled: packed bits over all N sample ids (:func:`pack_mask`) marking the samples whose
            loss is multiplied by ``weight``, or None. Kept per sample id rather than per plan entry
            so a plan costs 4 bytes per entry, whatever the policy.
    """

    epoch: int
    indices: torch.Tensor
    full: bool
    num_samples: int
    weight: float = 1.0
    rescaled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.indices.numel()

    @property
    def keep_fraction(self) -> float:
        """Planned samples divided by N."""
        return len(self) / self.num_samples

    def weights_of(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 loss weight of each sample id in ``ids`` (1.0 unless rescaled)."""
        if self.rescaled is None:
            return torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        flag = mask_lookup(self.rescaled, ids.to(self.rescaled.device)).to(ids.device)
        # fills from a Python scalar, not torch.tensor(weight): no host-to-device copy per step
        return torch.where(flag, torch.full((), self.weight, dtype=torch.float32, device=ids.device),
                           torch.ones((), dtype=torch.float32, device=ids.device))

    @property
    def weights(self) -> torch.Tensor | None:
        """The loss weight of every plan entry (float32, computed on each access), or None when all
        are 1."""
        return None if self.rescaled is None else self.weights_of(self.indices)

    def shard(self, rank: int, world_size: int, drop_last: bool = False) -> "Plan":
        """This rank's equal share of the plan (see :func:`shard_indices`)."""
        return Plan(self.epoch, shard_indices(self.indices, rank, world_size, drop_last), self.full,
                    self.num_samples, self.weight, self.rescaled)

    def overlap(self, previous: "Plan") -> torch.Tensor:
        """Jaccard overlap of this plan's sample set with ``previous``'s, as a float64 device
        scalar (no host read: a full plan's is a fill, not a host-to-device copy). Both plans'
        ids are unique."""
        a, b, dev = len(previous), len(self), self.indices.device
        if previous.full or self.full:
            inter = torch.full((), float(min(a, b)), dtype=torch.float64, device=dev)
        else:
            mark = torch.zeros(self.num_samples, dtype=torch.bool, device=dev)
            mark[previous.indices.long()] = True
            inter = mark[self.indices.long()].sum().double()
        return inter / (a + b - inter)

    def fingerprint(self) -> torch.Tensor:
        """Four int64 values identifying the plan: a hash-sum of (position, id, weight), the length,
        the epoch, the full flag (the ranks compare them, see :mod:`gpuprune.distributed`).

        Computed on the plan's device without a host synchronisation. Two plans that differ in any
        id, order or weight get different hash-sums except with probability about ``2**-32``.
        """
        idx = self.indices
        dev = idx.device
        n = idx.numel()
        term = hash32(idx, _FP_INDEX) + torch.arange(n, device=dev) * _FP_POSITION
        weights = self.weights
        if weights is not None:
            wbits = weights.contiguous().view(torch.int32).long() & MASK32
            term = term ^ fmix32(wbits ^ _FP_WEIGHT)
        total = fmix32(term).sum()           # < n * 2**32, no int64 overflow below 2**31 entries
        meta = torch.tensor([n, self.epoch, int(self.full)], dtype=torch.int64, device=dev)
        return torch.cat([total.reshape(1), meta])

    def batches(self, batch_size: int, drop_last: bool = False) -> int:
        """Number of batches of ``batch_size`` (the last one short unless ``drop_last``)."""
        return num_batches(len(self), check_int("batch_size", batch_size, minimum=1), drop_last)
