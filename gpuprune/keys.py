"""Unique 64-bit selection keys: the torch reference that the CUDA kernels match bit for bit.

Every selection in gpuprune is "the k largest of a 64-bit key", where the key is unique per sample::

    key[i] = orderable(score[i]) << 32 | hash32(i, seed)

The high word orders samples by score (NaN sorted as -inf, -0 equal to +0); the low word is a keyed
bijection of the index, so equal scores fall in a pseudo-random order that depends on the seed and not
on the position in the dataset. Because the keys are unique, exactly k samples satisfy ``key >= T`` for
the k-th largest key ``T``: the selected *set* is a pure function of (scores, seed), whatever the
device, the top-k algorithm or the launch configuration.

The hash is the MurmurHash3 32-bit finaliser (``fmix32``), applied twice with two seed words. Each
step is a bijection of uint32, so for N < 2**32 the keys never collide. The torch forms compute in
int64 with explicit masks (same bits on CPU and CUDA); on the CPU the same bits are computed in native
uint32 numpy arithmetic, about 6x faster.

Nothing here chooses a backend: :mod:`gpuprune.backend` does, and uses these as the torch reference.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["MASK32", "fmix32", "split_seed", "hash32", "orderable", "composite_key"]

MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finaliser on uint32 values held in an int64 tensor (a bijection of [0, 2**32))."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = (h * _C1) & MASK32
    h = h ^ (h >> 13)
    h = (h * _C2) & MASK32
    return h ^ (h >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """Split a 64-bit seed into the two 32-bit words used by :func:`hash32`."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, (seed >> 32) & MASK32


def _fmix32_np(h: np.ndarray) -> np.ndarray:
    """fmix32 on a uint32 numpy array, in place (uint32 products wrap mod 2**32, as required)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(_C1)
    h ^= h >> np.uint32(13)
    h *= np.uint32(_C2)
    h ^= h >> np.uint32(16)
    return h


def hash32(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Keyed bijection of ids < 2**32: ``fmix32(fmix32(i ^ s_lo) ^ s_hi)``, as int64 in [0, 2**32)."""
    lo, hi = split_seed(seed)
    if index.device.type == "cpu":
        h = index.numpy().astype(np.uint32)          # ids are < 2**32: the low word is the id
        h ^= np.uint32(lo)
        h = _fmix32_np(h)
        h ^= np.uint32(hi)
        return torch.from_numpy(_fmix32_np(h).astype(np.int64))
    return fmix32(fmix32(index.long() ^ lo) ^ hi)


def orderable(score: torch.Tensor) -> torch.Tensor:
    """Map float32 scores to int64 values with the same order; NaN -> -inf, -0 -> +0.

    The result lies in [-2**31, 2**31), so it fits the high word of a 64-bit key.
    """
    if score.device.type == "cpu":  # same bits in numpy, without torch's int64 temporaries
        a = score.detach().numpy().astype(np.float32)           # a copy we may modify
        a[np.isnan(a)] = -np.inf
        a += np.float32(0.0)                                     # -0 + 0 = +0
        b = a.view(np.int32)
        np.bitwise_xor(b, np.int32(0x7FFFFFFF), out=b, where=b < 0)
        return torch.from_numpy(b.astype(np.int64))
    s = score.float()
    s = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s) + 0.0  # -0 + 0 = +0
    b = s.view(torch.int32).long()
    return torch.where(b >= 0, b, b ^ 0x7FFFFFFF)


def composite_key(score: torch.Tensor | None, seed: int, n: int = 0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Unique 64-bit keys of samples ``0 .. n-1``: score order first, then the keyed hash of the id.

    Args:
        score: 1-D float scores (higher = more wanted), or None when all samples rank equal (the
            key is then the hash alone: a uniformly random order).
        seed: 64-bit seed of the tie-break.
        n, device: number of samples and their device when ``score`` is None.
    """
    if score is None:
        return hash32(torch.arange(n, device=device), seed)
    h = hash32(torch.arange(score.numel(), device=score.device), seed)
    return (orderable(score) << 32) | h
